"""The daos:// store beyond the shared conformance suite (tests/test_stores.py): its layout in
DAOS dictionaries, the DER_* error table, errors at mount time, and real mounts over it.

Here DAOS is the stand-in in tests/fake_pydaos (no DAOS server can run on these machines);
with SHUFFLEFS_DAOS_POOL and SHUFFLEFS_DAOS_CONT set, the same tests run against a real pool,
except those that need the stand-in's fault injection or counters (see docs/DAOS.md)."""

from __future__ import annotations

import errno
import json
import os
import re
import time

import pytest
from test_mount import commit_and_read_from_second_mount, spark_commit

from shufflefs.stores import StoreError, open_store
from shufflefs.stores.daos import CHUNKS_DICT, DER_ERRORS, DAOSStore, daos_error, der_name
from shufflefs.testing.mounting import Mount, daos_objects, is_mounted, run_cli

pytestmark = pytest.mark.daos
MiB = 1024 * 1024


@pytest.fixture
def local(tmp_path):
    def write(data: bytes, name: str = "local") -> str:
        path = tmp_path / f"{name}-{len(data)}-{time.monotonic_ns()}"
        path.write_bytes(data)
        return str(path)

    return write


def opened(url: str) -> DAOSStore:
    store = open_store(url)
    store.check()
    return store


def chunk_count(daos) -> int:
    return len(daos.fake.dict_items(daos.pool, daos.container, CHUNKS_DICT))


def one_line_error(url: str) -> StoreError:
    store = open_store(url)
    with pytest.raises(StoreError) as info:
        store.check()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return info.value


# -- URLs and errors when opening ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, needle",
    [
        ("daos://", "needs a pool and a container"),
        ("daos://tank", "needs a pool and a container"),
        ("daos://tank/", "needs a pool and a container"),
        ("daos://user@tank/c", "must not contain credentials"),
        ("daos://tank/bad*label", "invalid DAOS container label 'bad*label'"),
        ("daos://" + "p" * 128 + "/c", "invalid DAOS pool label"),
    ],
)
def test_url_errors(url, needle):
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert needle in str(info.value) and info.value.transient is False


def test_url_parts():
    store = open_store("daos://tank/shuffle/a/b/")
    assert (store.pool, store.container, store.prefix, store.url) == (
        "tank",
        "shuffle",
        "a/b",
        "daos://tank/shuffle/a/b",
    )
    assert open_store("daos://5f4a3b1c-0d9e-4f6a-8b7c-1d2e3f4a5b6c/shuffle").prefix == ""


def test_open_errors_say_what_to_do(daos):
    fake = daos.require_fake()
    fake.create_container(daos.pool, "posix-cont", layout="POSIX")
    fake.create_container(daos.pool, "locked")
    fake.deny(daos.pool, "locked")
    assert "does not exist" in str(one_line_error(f"daos://{daos.pool}/no-such-container"))
    assert "does not exist" in str(one_line_error("daos://no-such-pool/shuffle"))
    error = one_line_error(f"daos://{daos.pool}/posix-cont")
    assert "must be a PYTHON container" in str(error) and "--type PYTHON" in str(error)
    error = one_line_error(f"daos://{daos.pool}/locked")
    assert "access denied" in str(error) and error.errno == errno.EACCES


def test_no_agent_is_explained(daos, monkeypatch):
    daos.require_fake()
    import pydaos

    url = daos.url()
    monkeypatch.delenv("FAKE_PYDAOS_DIR")  # the stand-in's way of having no daos_agent
    pydaos.DaosClient.cleanup()
    try:
        assert "is daos_agent running" in str(one_line_error(url))
        assert "is daos_agent running" in str(one_line_error(url))  # pydaos would not init again
        monkeypatch.undo()  # the agent is back: the same process can now use DAOS
        opened(url).put_file("k", __file__)
    finally:
        monkeypatch.undo()
        pydaos.DaosClient.cleanup()


def test_mount_without_pydaos_fails_with_one_line(daos, tmp_path):
    daos.require_fake()  # a real pydaos would be found without PYTHONPATH
    (tmp_path / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FAKE_PYDAOS_DIR")}
    result = run_cli("mount", "daos://tank/shuffle", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "needs pydaos" in lines[0] and "daos-client" in lines[0]
    assert not is_mounted(str(tmp_path / "mnt"))


def test_mount_of_missing_container_fails_with_one_line(daos, tmp_path):
    (tmp_path / "mnt").mkdir()
    result = run_cli(
        "mount",
        f"daos://{daos.pool}/no-such-container",
        str(tmp_path / "mnt"),
        "--cache-dir",
        str(tmp_path / "c"),
        env={**os.environ, **daos.env},
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr, result.stderr


def test_keys_must_be_utf8(daos, local):
    store = opened(daos.url())
    name = os.fsdecode(b"blockmgr-\xff/00/shuffle_0_0_0.data")
    with pytest.raises(StoreError) as info:
        store.put_file(name, local(b"x"))
    assert info.value.transient is False and info.value.errno == errno.EILSEQ
    assert store.list_dir("").dirs == []


# -- the DER_* table --------------------------------------------------------------------------------


def test_error_table_names_real_codes(daos):
    fake = daos.require_fake()  # its list is daos_errno.h's
    assert set(DER_ERRORS) <= set(fake.ERRORS)


def test_error_mapping():
    import pydaos

    timeout = daos_error(pydaos.PyDError("failed to store KV value", -1011), "uploading x")
    assert str(timeout) == "uploading x: failed to store KV value: DER_TIMEDOUT"
    assert (timeout.transient, timeout.errno) == (True, errno.ETIMEDOUT)
    full = daos_error(pydaos.PyDError("failed to store KV value", -1007), "uploading x")
    assert (full.transient, full.errno) == (True, errno.ENOSPC)  # a write waits for space
    assert der_name(RuntimeError("something else")) == "DER_UNKNOWN"
    unknown = daos_error(RuntimeError("failed: DER_SOMETHING_NEW"), "x")
    assert (unknown.transient, unknown.errno) == (True, errno.EIO)


def test_failed_put_is_classified_and_leaves_no_chunks(daos, local):
    fake = daos.require_fake()
    store = opened(daos.url())
    before = chunk_count(daos)
    fake.inject("kv_put", "DER_TIMEDOUT", match=".3")  # the 4th chunk: three are stored already
    with pytest.raises(StoreError) as info:
        store.put_file("blockmgr/00/f.data", local(os.urandom(5 * MiB)))
    assert (info.value.transient, info.value.errno) == (True, errno.ETIMEDOUT)
    assert "DER_TIMEDOUT" in str(info.value)
    assert chunk_count(daos) == before and store.head("blockmgr/00/f.data") is None
    fake.inject("kv_put", "DER_NOSPACE")
    with pytest.raises(StoreError) as info:
        store.put_file("blockmgr/00/f.data", local(b"x" * 100))
    assert (info.value.transient, info.value.errno) == (True, errno.ENOSPC)
    store.put_file("blockmgr/00/f.data", local(b"y" * 100))
    assert store.get_range("blockmgr/00/f.data", 0, 200) == b"y" * 100


def test_stale_handle_is_reopened(daos, local):
    fake = daos.require_fake()
    store = opened(daos.url())
    store.put_file("k", local(b"before"))
    container = store._cont
    fake.inject("kv_get", "DER_NO_HDL")
    with pytest.raises(StoreError) as info:
        store.head("k")
    assert info.value.transient is True
    assert store.get_range("k", 0, 10) == b"before"
    assert store._cont is not None and store._cont is not container


def test_manifest_write_that_failed_after_landing_keeps_its_data(daos, local):
    """A timeout reported after the server applied the manifest write: the file is committed,
    so its chunks must stay (the store cannot tell from the error alone)."""
    fake = daos.require_fake()
    store = opened(daos.url())
    store.put_file("d/f.data", local(b"old" * 1000))
    data = os.urandom(MiB + 10)
    fake.inject("kv_put", "DER_TIMEDOUT", match="d/f.data", applied=True)
    store.put_file("d/f.data", local(data))  # the second look finds its own manifest: done
    assert store.get_range("d/f.data", 0, 2 * MiB) == data
    fake.inject("kv_put", "DER_TIMEDOUT", match="d/f.data", applied=True)
    fake.inject("kv_get", "DER_UNREACH", match="d/f.data", skip=1)  # and the second look fails too
    with pytest.raises(StoreError):
        store.put_file("d/f.data", local(b"new"))
    assert store.get_range("d/f.data", 0, 10) == b"new"  # it landed; its chunk was kept


def test_delete_failing_part_way_removes_the_data_of_what_it_deleted(daos, local):
    fake = daos.require_fake()
    store = opened(daos.url())
    before = chunk_count(daos)
    for name in ("a", "b", "c"):
        store.put_file(f"d/{name}", local(os.urandom(1000)))
    fake.inject("kv_put", "DER_TIMEDOUT", match="d/c")
    with pytest.raises(StoreError):
        store.delete_many(["d/a", "d/b", "d/c"])
    store.delete_many(["d/a", "d/b", "d/c"])  # the journal's retry
    assert chunk_count(daos) == before
    assert store.list_dir("").dirs == []


def test_layout_written_by_the_first_mount(daos):
    fake = daos.require_fake()
    fake.create_container(daos.pool, "fresh")
    store = opened(f"daos://{daos.pool}/fresh")
    assert (store.shards, store.chunk_size) == (1024, MiB)
    assert fake.dict_items(daos.pool, "fresh", "shufflefs.layout") == {
        b"version": b"1",
        b"shards": b"1024",
        b"chunk_size": b"1048576",
    }
    with pytest.raises(StoreError) as info:  # a later, incompatible layout is refused
        store._dict("shufflefs.layout").put("version", "2")
        opened(f"daos://{daos.pool}/fresh")
    assert "layout version 2" in str(info.value) and info.value.transient is False


# -- layout -----------------------------------------------------------------------------------------


def test_layout_chunks_and_manifest(daos, local):
    fake = daos.require_fake()
    url = daos.url()
    prefix = url.split("/", 4)[4]
    store = opened(url)
    data = os.urandom(2 * MiB + 3)
    before_chunks, before = chunk_count(daos), fake.counters()
    store.put_file("b/00/shuffle_0_1_0.data", local(data))
    store.put_file("b/00/empty", local(b""))
    assert chunk_count(daos) == before_chunks + 3  # 1 MiB, 1 MiB, 3 bytes; nothing for the empty file
    assert fake.counters()["max_value_size"] <= MiB
    shard = next(
        name
        for name in fake.dict_names(daos.pool, daos.container)
        if f"{prefix}/b/00/shuffle_0_1_0.data".encode() in fake.dict_items(daos.pool, daos.container, name)
    )
    assert shard.startswith("shufflefs.names.")
    entries = fake.dict_items(daos.pool, daos.container, shard)
    manifest = json.loads(entries[f"{prefix}/b/00/shuffle_0_1_0.data".encode()])
    assert manifest["size"] == len(data) and manifest["chunk"] == MiB and len(manifest["data"]) == 32
    assert json.loads(entries[f"{prefix}/b/00/empty".encode()])["size"] == 0

    reads = fake.counters()
    assert store.get_range("b/00/shuffle_0_1_0.data", 0, len(data)) == data
    after = fake.counters()
    assert after.get("kv_get_refetches", 0) == reads.get("kv_get_refetches", 0), "a chunk needed two round trips"
    assert after["kv_get_calls"] - reads["kv_get_calls"] == 2  # the manifest, then one bget of 3 chunks
    assert store.get_range("b/00/empty", 0, 10) == b""
    assert before  # counters exist from the start of the session


def test_replaced_moved_and_deleted_data_leaves_no_chunks(daos, local):
    daos.require_fake()
    store = opened(daos.url())
    before = chunk_count(daos)
    store.put_file("d/a", local(os.urandom(MiB + 1)))
    store.put_file("d/a", local(os.urandom(10)))  # replaces: the old two chunks go
    store.put_file("d/b", local(os.urandom(3 * MiB)))
    assert chunk_count(daos) == before + 4
    store.move("d/b", "d/a")  # a's chunk goes, b's chunks now belong to a
    assert chunk_count(daos) == before + 3
    store.move("d/a", "e/a")
    store.delete_many(["e/a"])
    assert chunk_count(daos) == before
    assert store.list_dir("").dirs == [] and store.list_dir("").files == []


def test_prefixes_share_a_container_without_mixing(daos, local):
    base = daos.url()
    sub, subway, parent = opened(f"{base}/pfx/sub"), opened(f"{base}/pfx/subway"), opened(f"{base}/pfx")
    sub.put_file("x", local(b"sub"))
    subway.put_file("x", local(b"subway"))
    parent.put_file("top", local(b"top"))
    assert [f.name for f in sub.list_dir("").files] == ["x"] and sub.list_dir("").dirs == []
    assert sub.get_range("x", 0, 10) == b"sub" and subway.get_range("x", 0, 10) == b"subway"
    listing = parent.list_dir("")
    assert listing.dirs == ["sub", "subway"] and [f.name for f in listing.files] == ["top"]
    sub.delete_many(["x"])
    assert parent.list_dir("").dirs == ["subway"]
    assert subway.get_range("x", 0, 10) == b"subway"


def test_put_racing_with_the_removal_of_its_emptied_directory(daos, local):
    """A delete empties a/b and is about to unlist it when a put into a/b lands (between its
    first look and the removal of the marker). The directory must stay listed, or `ls` could
    not find the new file."""
    url = daos.url()
    deleter, writer = opened(url), opened(url)
    deleter.put_file("a/b/old", local(b"old"))
    looks = []

    def look_then_race(directory):
        empty = DAOSStore._is_empty(deleter, directory)
        looks.append((directory.rsplit("/", 2)[-2:], empty))
        if len(looks) == 1:
            writer.put_file("a/b/new", local(b"new"))
        return empty

    deleter._is_empty = look_then_race
    deleter.delete_many(["a/b/old"])
    assert looks[:2] == [(["a", "b"], True), (["a", "b"], False)], "the delete looks again after unlisting"
    assert writer.list_dir("").dirs == ["a"]
    assert writer.list_dir("a").dirs == ["b"]
    assert [f.name for f in writer.list_dir("a/b").files] == ["new"]


def test_racing_deletes_at_two_levels_keep_a_new_file_listed(daos, local):
    """X empties a/b; a put into a/b lands after X's first look; while a/b is unlisted, Z
    empties a and unlists it too. X's second look must restore the markers up to the root."""
    url = daos.url()
    x, writer, z = opened(url), opened(url), opened(url)
    x.put_file("a/b/old", local(b"old"))
    z.put_file("a/h", local(b"h"))
    looks = []

    def racing_look(directory):
        looks.append(directory)
        if len(looks) == 2:  # X unlisted a/b: Z now deletes a's last file and prunes a
            z.delete_many(["a/h"])
        empty = DAOSStore._is_empty(x, directory)
        if len(looks) == 1:
            writer.put_file("a/b/new", local(b"new"))
        return empty

    x._is_empty = racing_look
    x.delete_many(["a/b/old"])
    assert writer.list_dir("").dirs == ["a"]
    assert writer.list_dir("a").dirs == ["b"]
    assert [f.name for f in writer.list_dir("a/b").files] == ["new"]


# -- real mounts over daos:// ----------------------------------------------------------------------


def test_two_mounts_share_committed_files(daos, tmp_path):
    url = daos.url("jobs")
    with (
        Mount(url, tmp_path / "a", tmp_path / "cache-a", env=daos.env) as first,
        Mount(url, tmp_path / "b", tmp_path / "cache-b", env=daos.env) as second,
    ):
        written = commit_and_read_from_second_mount(
            first, second, "blockmgr-20000000-0000-4000-8000-000000000000/0c", [os.urandom(3 * MiB), os.urandom(300)]
        )
        assert daos_objects(url) == written
        os.remove(f"{first.path}/blockmgr-20000000-0000-4000-8000-000000000000/0c/shuffle_0_7_0.data")
        assert first.umount().returncode == 0
        assert sorted(daos_objects(url)) == [
            "blockmgr-20000000-0000-4000-8000-000000000000/0c/shuffle_0_7_0.checksum.ADLER32",
            "blockmgr-20000000-0000-4000-8000-000000000000/0c/shuffle_0_7_0.index",
        ]


def test_sigkill_recovery_completes_pending_uploads(daos, tmp_path):
    fake = daos.require_fake()
    url = daos.url()
    mount = Mount(url, tmp_path / "mnt", tmp_path / "cache", "--commit", "async", env=daos.env)
    with mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        fake.inject("kv_put", "DER_UNREACH", times=-1)  # the servers stop answering writes
        try:
            written = spark_commit(
                f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00", 0, 1, [os.urandom(2 * MiB + 5)]
            )
            time.sleep(0.5)
            mount.kill()
        finally:
            fake.clear_faults()
        assert daos_objects(url) == {}
    with Mount(url, tmp_path / "mnt", tmp_path / "cache", "--commit", "async", env=daos.env) as again:
        assert sorted(os.listdir(f"{again.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")) == sorted(written)
        assert again.umount().returncode == 0
    assert daos_objects(url) == {f"blockmgr-10000000-0000-4000-8000-000000000000/00/{n}": c for n, c in written.items()}


def test_sync_commit_reports_a_full_pool_as_enospc(daos, tmp_path):
    """DER_NOSPACE reaches the committing rename as ENOSPC (not EIO) after the retries, and the
    rename changes nothing; once space is back the retried rename stores the file."""
    fake = daos.require_fake()
    url = daos.url()
    with Mount(url, tmp_path / "mnt", tmp_path / "cache", env=daos.env) as mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        temp = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index.tmp"
        with open(temp, "wb") as f:
            f.write(b"\0" * 16)
        fake.inject("kv_put", "DER_NOSPACE", times=-1)
        try:
            with pytest.raises(OSError) as raised:
                os.rename(temp, f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index")
            assert raised.value.errno == errno.ENOSPC
        finally:
            fake.clear_faults()
        assert os.listdir(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00") == [
            "shuffle_0_0_0.index.tmp"
        ]
        os.rename(temp, f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index")
        assert mount.umount().returncode == 0
    assert daos_objects(url) == {"blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index": b"\0" * 16}


def test_daos_doc_lists_every_error():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "DAOS.md")) as f:
        doc = f.read()
    table = doc[doc.index("## Errors") : doc.index("## The stand-in")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`DER_"):
            for name in re.findall(r"`(DER_[A-Z0-9_]+)`", cells[0]):
                rows[name] = (cells[1] == "yes", getattr(errno, cells[2].strip("`")))
    assert rows == DER_ERRORS
