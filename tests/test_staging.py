"""`shufflefs.staging`: the local files that hold bytes, on their own.

Covers reference counting (a file goes only with its last reference), the byte count that
`--cache-size` bounds (always the sum of the live files' sizes), the reuse of released files
under fresh names (never of files a store may hold), the housekeeping thread (truncating and
preparing files off the trio thread), and what a restart does with an earlier run's files
(`adopt`, `remove_unreferenced`).
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from shufflefs.staging import StagingArea, StagingFile


@pytest.fixture
def area(tmp_path):
    return StagingArea(str(tmp_path / "staging"))


def write(staging: StagingFile, data: bytes, offset: int = 0) -> None:
    """What the core does on a write: the bytes, then the size it knows."""
    os.pwrite(staging.fd, data, offset)
    staging.resize(max(staging.size, offset + len(data)))


def names(area: StagingArea) -> set[str]:
    return set(os.listdir(area.directory))


def read(staging: StagingFile) -> bytes:
    with open(staging.path, "rb") as f:
        return f.read()


async def until(condition, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


# -- files and their references -------------------------------------------------------------------


def test_new_files_are_empty_distinct_and_count_no_bytes(area):
    files = [area.new() for _ in range(3)]
    assert len({f.path for f in files}) == 3
    assert {os.path.basename(f.path) for f in files} == names(area)
    assert all(os.path.getsize(f.path) == 0 and f.size == 0 and f.refs == 1 for f in files)
    assert area.bytes == 0


def test_the_staging_dir_is_private(area):
    # staging files hold the bytes of every file written through the mount
    assert os.stat(area.directory).st_mode & 0o777 == 0o700


def test_a_file_stays_until_its_last_reference_lets_go(area):
    staging = area.new()
    write(staging, b"shuffle bytes")
    assert staging.ref() is staging  # an upload reads it too
    staging.unref()
    assert read(staging) == b"shuffle bytes" and area.bytes == 13
    assert staging.path not in area.free
    staging.unref()
    assert area.bytes == 0
    assert staging.path in area.free and os.path.getsize(staging.path) == 0


def test_a_released_file_is_reused_empty_under_a_fresh_name(area):
    old = area.new()
    write(old, b"x" * 1000)
    inode = os.stat(old.path).st_ino
    old.unref()
    new = area.new()
    # a journal entry naming the old file must never find the new file's bytes
    assert new.path != old.path and not os.path.exists(old.path)
    assert os.stat(new.path).st_ino == inode
    assert read(new) == b"" and new.size == 0 and area.bytes == 0
    write(new, b"fresh")
    assert read(new) == b"fresh"


def test_a_file_a_store_may_hold_is_removed_never_reused(area):
    staging = area.new()
    write(staging, b"linked into the store")
    staging.shared = True
    path = staging.path
    staging.unref()
    assert not os.path.exists(path)
    assert area.free == [] and names(area) == set() and area.bytes == 0


def test_no_more_than_keep_free_released_files_are_kept(tmp_path):
    area = StagingArea(str(tmp_path / "staging"), keep_free=2)
    files = [area.new() for _ in range(5)]
    for i, f in enumerate(files):
        write(f, b"y" * (i * 10))  # the first is empty: kept without truncating
    for f in files:
        f.unref()
    assert len(area.free) == 2
    assert names(area) == {os.path.basename(path) for path in area.free}
    assert all(os.path.getsize(path) == 0 for path in area.free)


def test_new_skips_a_released_file_removed_behind_its_back(area):
    older, newer = area.new(), area.new()
    inode = os.stat(older.path).st_ino
    older.unref()
    newer.unref()
    os.unlink(newer.path)  # the newest released one is taken first
    staging = area.new()
    assert os.stat(staging.path).st_ino == inode and area.free == []
    write(staging, b"works")
    assert read(staging) == b"works"


def test_a_staging_file_that_vanished_fails_loudly_instead_of_reading_empty(area):
    staging = area.new()
    write(staging, b"data")
    staging.close_fd()
    os.unlink(staging.path)
    with pytest.raises(FileNotFoundError):
        _ = staging.fd
    assert not os.path.exists(staging.path)  # not created again by the attempt


def test_a_copy_holds_the_bytes_of_its_source_and_counts_them(area):
    source = area.new()
    write(source, b"0123456789" * 100)
    copy = area.copy(source)
    assert copy.path != source.path
    assert read(copy) == read(source) and copy.size == source.size == 1000
    assert area.bytes == 2000
    write(source, b"changed", 0)  # independent files
    assert read(copy)[:7] == b"0123456"
    source.unref()
    assert area.bytes == 1000


# -- the byte count -------------------------------------------------------------------------------


@pytest.mark.parametrize("housekeeping", [False, True])
async def test_the_byte_count_is_the_sum_of_the_live_files_sizes(tmp_path, housekeeping, nursery):
    area = StagingArea(str(tmp_path / "staging"), keep_free=8, ready_files=4)
    if housekeeping:
        nursery.start_soon(area.housekeep)
    rng = random.Random(3)
    live: list[StagingFile] = []  # one entry per reference held
    earlier = tmp_path / "staging" / "from-an-earlier-run"
    earlier.write_bytes(b"e" * 77)
    adopted_once = False
    for step in range(400):
        action = rng.choice(["new", "new", "write", "write", "truncate", "ref", "unref", "unref", "copy", "adopt"])
        distinct = list({id(f): f for f in live}.values())
        if action == "new" or not distinct:
            live.append(area.new())
        elif action == "write":
            f = rng.choice(distinct)
            write(f, bytes([step % 256]) * rng.randrange(1, 5000), rng.randrange(0, 3000))
        elif action == "truncate":
            f = rng.choice(distinct)
            size = rng.randrange(0, f.size + 1)
            os.ftruncate(f.fd, size)
            f.resize(size)
        elif action == "ref":
            live.append(rng.choice(distinct).ref())
        elif action == "unref":
            f = live.pop(rng.randrange(len(live)))
            f.unref()
        elif action == "copy":
            live.append(area.copy(rng.choice(distinct)))
        elif action == "adopt" and (str(earlier) in area.adopted or not adopted_once):
            # a restart adopts a file once per pending operation, never after its release
            live.append(area.adopt(earlier.name))
            adopted_once = True
        distinct = list({id(f): f for f in live}.values())
        assert area.bytes == sum(f.size for f in distinct), step
        if step % 20 == 0:
            await trio.sleep(0.001)  # the housekeeping thread gets to work on released files
            # and never touches a live one
            assert [os.path.getsize(f.path) for f in distinct] == [f.size for f in distinct], step
    for f in live:
        f.unref()
    assert area.bytes == 0 and area.adopted == {}


# -- housekeeping ---------------------------------------------------------------------------------


async def test_housekeeping_truncates_released_files_off_the_trio_thread_and_keeps_files_ready(tmp_path, nursery):
    area = StagingArea(str(tmp_path / "staging"), ready_files=4)
    nursery.start_soon(area.housekeep)
    await until(lambda: len(area.free) == 4)  # prepared before anyone asked
    files = [area.new() for _ in range(3)]
    assert len(area.free) == 1
    await until(lambda: len(area.free) == 4)  # fewer than half were left: made again
    for f in files:
        write(f, b"z" * 4096)
    for f in files:
        f.unref()
    # queued for the thread, not truncated on the spot
    assert [os.path.getsize(f.path) for f in files] == [4096] * 3
    assert not any(f.path in area.free for f in files)
    assert area.bytes == 0
    await until(lambda: all(f.path in area.free for f in files))
    assert [os.path.getsize(f.path) for f in files] == [0] * 3
    assert names(area) == {os.path.basename(path) for path in area.free}


async def test_housekeeping_removes_a_file_a_store_may_hold(tmp_path, nursery):
    area = StagingArea(str(tmp_path / "staging"), ready_files=2)
    nursery.start_soon(area.housekeep)
    staging = area.new()
    write(staging, b"hard-linked by the file store")
    staging.shared = True
    staging.unref()
    await until(lambda: not os.path.exists(staging.path))
    assert staging.path not in area.free


async def test_without_housekeeping_a_release_is_done_on_the_spot(area):
    staging = area.new()
    write(staging, b"q" * 100)
    staging.unref()
    assert os.path.getsize(staging.path) == 0 and staging.path in area.free


# -- an earlier run's files -----------------------------------------------------------------------


def test_adopting_a_file_twice_gives_one_object_counted_once(area):
    with open(os.path.join(area.directory, "0123abcd"), "wb") as f:
        f.write(b"pending upload")
    first = area.adopt("0123abcd")
    second = area.adopt("0123abcd")
    assert first is second and first.refs == 2
    assert first.size == 14 and area.bytes == 14
    first.unref()
    assert area.bytes == 14 and os.path.exists(first.path)
    second.unref()
    # an earlier run may have handed it to the store: removed, not reused
    assert not os.path.exists(first.path) and area.free == []
    assert area.bytes == 0 and area.adopted == {}


def test_adopt_finds_a_journal_name_inside_the_staging_dir_only(area, tmp_path):
    (tmp_path / "outside").write_bytes(b"not ours")
    with open(os.path.join(area.directory, "outside"), "wb") as f:
        f.write(b"ours")
    # journals record names; a cache dir reached by another path still finds its files
    assert area.path_of("/some/other/path/outside") == os.path.join(area.directory, "outside")
    assert area.path_of("../outside") == os.path.join(area.directory, "outside")
    assert read(area.adopt("../outside")) == b"ours"


def test_adopting_a_file_that_is_gone_fails_and_counts_nothing(area):
    with pytest.raises(FileNotFoundError):
        area.adopt("never-there")
    assert area.bytes == 0 and area.adopted == {}


def test_remove_unreferenced_keeps_exactly_the_files_pending_operations_need(area):
    for name in ("pending-1", "pending-2", "scratch", "cached-copy", "empty"):
        with open(os.path.join(area.directory, name), "wb") as f:
            f.write(name.encode())
    keep = {area.adopt("pending-1").path, area.adopt("pending-2").path}
    assert area.remove_unreferenced(keep) == 3
    assert names(area) == {"pending-1", "pending-2"}
    assert area.bytes == len("pending-1") + len("pending-2")
    assert area.remove_unreferenced(keep) == 0
