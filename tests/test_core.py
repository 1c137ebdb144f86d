"""Layer 2: the filesystem core (`shufflefs.core.Filesystem`) called directly, without FUSE or a
kernel, against the in-process MemoryStore, and against a FileStore where the store's own
behaviour matters (moves, deletes, listings of real directories).

Every `core` row of docs/SEMANTICS.md has its test here, under the name the row gives; the
remaining tests cover commit timing, the journal across a crash, and the shared namespace.
The helpers play the kernel's part: a lookup before mkdir, flush then release on close(2),
forget once the kernel drops an inode.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid

import pyfuse3
import pytest
import trio
import trio.testing

import shufflefs.remote
import shufflefs.stores.file
from shufflefs.callers import Executor
from shufflefs.core import READAHEAD, ROOT_INODE, Filesystem, FsError, Negative, Node
from shufflefs.registry import Registry
from shufflefs.staging import StagingArea
from shufflefs.testing.corefs import (
    APPEND,
    BM,
    CHECKSUM,
    DATA,
    GID,
    INDEX,
    NEW,
    UID,
    KiB,
    MiB,
    Mount,
    close,
    commit,
    create,
    errno_of,
    forget,
    index_bytes,
    key,
    mkdirs,
    open_staging_fds,
    read_all,
    resolve,
    settle,
    until,
    write_file,
)
from shufflefs.testing.stores import RecordingMemoryStore, contents
from shufflefs.views import Views

MODES = pytest.mark.parametrize("mode", ["sync", "async"])
STORES = pytest.mark.parametrize("store_kind", ["memory", "file"])


# -- create, write, truncate --------------------------------------------------------------------


async def test_create_exclusive(env):
    m = env.mount()
    fs = m.fs
    env.plant(m.store, "shuffle_9_9_0.data", b"from another node")
    d = await mkdirs(fs, BM)
    excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fh, node = await create(fs, d, "temp_shuffle_a", excl)
    await fs.write(fh, 0, b"first")
    await close(fs, fh)

    with pytest.raises(FsError) as exc:
        await create(fs, d, "temp_shuffle_a", excl)
    assert errno_of(exc) == errno.EEXIST
    assert await read_all(fs, node.ino) == b"first"

    # without O_EXCL the existing file is opened (same inode); O_TRUNC empties it
    fh, again = await create(fs, d, "temp_shuffle_a", os.O_WRONLY | os.O_CREAT)
    assert again is node and node.size == 5
    await close(fs, fh)
    fh, again = await create(fs, d, "temp_shuffle_a", NEW)
    assert again is node and node.size == 0 and m.staging.bytes == 0
    await close(fs, fh)

    # EEXIST also for a directory, a committed file and a file only the store knows
    with pytest.raises(FsError) as exc:
        await create(fs, ROOT_INODE, "blockmgr-10000000-0000-4000-8000-000000000000", excl)
    assert errno_of(exc) == errno.EEXIST
    await commit(fs, d, DATA, b"committed")
    with pytest.raises(FsError) as exc:
        await create(fs, d, DATA, excl)
    assert errno_of(exc) == errno.EEXIST
    assert (await fs.lookup(ROOT_INODE, "shuffle_9_9_0.data")).size == 17  # the kernel looks up first
    with pytest.raises(FsError) as exc:
        await create(fs, ROOT_INODE, "shuffle_9_9_0.data", excl)
    assert errno_of(exc) == errno.EEXIST
    assert contents(m.store) == {key(DATA): b"committed", "shuffle_9_9_0.data": b"from another node"}


async def test_committed_file_is_immutable(env):
    m = env.mount()
    fs = m.fs
    env.plant(m.store, "shuffle_1_1_0.data", b"remote")
    d = await mkdirs(fs, BM)
    node = await commit(fs, d, DATA, b"x" * 1000)
    before = list(m.store.log)

    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(FsError) as exc:
            await fs.open(node.ino, flags)
        assert errno_of(exc) == errno.EPERM, flags
    with pytest.raises(FsError) as exc:
        await create(fs, d, DATA, NEW)  # open(O_CREAT|O_TRUNC) of the existing name
    assert errno_of(exc) == errno.EPERM
    for size in (0, 10, 2000):
        with pytest.raises(FsError) as exc:
            await fs.setattr(node.ino, size=size)
        assert errno_of(exc) == errno.EPERM
    assert node.size == 1000 and node.writers == 0 and node.opens == 0
    # metadata stays changeable (local only); reading works
    await fs.setattr(node.ino, mode=0o600)
    assert node.mode & 0o777 == 0o600
    assert await read_all(fs, node.ino) == b"x" * 1000

    # a descriptor still open when its file committed (the close of a dup: a shell's
    # `head ... > file` dups the descriptor and closes the original before head writes) writes
    # the file again; it is committed again at its last close, replacing the early object
    fh, direct = await create(fs, d, INDEX, NEW)
    await fs.write(fh, 0, b"i" * 8)
    await fs.flush(fh)  # the close of the duplicate: commits what is there
    assert direct.committed and contents(m.store)[key(INDEX)] == b"i" * 8
    await fs.write(fh, 8, b"i" * 8)
    assert not direct.committed and fs.stats["recommits"] == 1
    await fs.flush(fh)  # the last close
    await fs.release(fh)
    assert direct.committed and direct.size == 16

    # a file learned from the store is just as immutable
    remote_node = await fs.lookup(ROOT_INODE, "shuffle_1_1_0.data")
    with pytest.raises(FsError) as exc:
        await fs.open(remote_node.ino, os.O_RDWR)
    assert errno_of(exc) == errno.EPERM

    assert contents(m.store) == {key(DATA): b"x" * 1000, key(INDEX): b"i" * 16, "shuffle_1_1_0.data": b"remote"}
    assert [e for e in m.store.log[len(before) :] if e[0] not in ("put_file", "list_dir")] == []
    assert len(m.store.calls_of("put_file", key(DATA))) == 1
    assert len(m.store.calls_of("put_file", key(INDEX))) == 2


async def test_truncate_local_file(env):
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    m.store.log.clear()
    temp = f"{DATA}.{uuid.uuid4()}"
    fh, node = await create(fs, d, temp, APPEND)
    await fs.write(fh, 0, b"a" * 1000)
    # a failed write is reverted with ftruncate to the last good position, then writing goes on
    await fs.setattr(node.ino, size=600)
    assert node.size == 600 and m.staging.bytes == 600
    await fs.write(fh, 600, b"b" * 100)
    await close(fs, fh)
    assert await read_all(fs, node.ino) == b"a" * 600 + b"b" * 100

    # growing fills with zeros; the hole is not charged to the cache (test_sparse_truncate)
    await fs.setattr(node.ino, size=1000)
    assert await read_all(fs, node.ino) == b"a" * 600 + b"b" * 100 + bytes(300)
    assert m.staging.bytes == 700
    await fs.setattr(node.ino, size=700)
    assert m.store.log == []
    assert open_staging_fds(m) == set()  # truncate(2) of a closed file leaves no descriptor

    # what the commit uploads is exactly the truncated file
    await fs.rename(d, temp, d, DATA)
    assert contents(m.store) == {key(DATA): b"a" * 600 + b"b" * 100}

    # O_TRUNC of a local file
    scratch = await write_file(fs, d, "temp_local_1", b"z" * 50)
    fh = await fs.open(scratch.ino, os.O_WRONLY | os.O_TRUNC)
    assert scratch.size == 0
    await close(fs, fh)
    assert await read_all(fs, scratch.ino) == b""
    assert m.staging.bytes == 700


# -- reads --------------------------------------------------------------------------------------


async def test_evicted_file_read_back_with_ranged_gets(env):
    m = env.mount(cache_size=12 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    data = os.urandom(2 * READAHEAD + MiB + 3)
    node = await commit(fs, d, DATA, data)
    assert node.staging is not None  # a local copy while the cache allows

    # local data that needs the room pushes the uploaded file out of the cache
    await write_file(fs, d, "temp_shuffle_x", bytes(4 * MiB))
    assert node.staging is None and fs.stats["evictions"] == 1
    assert m.staging.bytes == 4 * MiB and len(m.staging_paths()) == 1
    assert node.size == len(data)

    # a sequential read: one GET per readahead window
    assert await read_all(fs, node.ino) == data
    gets = m.store.calls_of("get_range", key(DATA))
    assert [(offset, length) for _, _, offset, length in gets] == [
        (0, READAHEAD),
        (READAHEAD, READAHEAD),
        (2 * READAHEAD, MiB + 3),
    ]

    # pread in the middle: one GET from there, later reads in the window are served from it
    m.store.log.clear()
    fh = await fs.open(node.ino, os.O_RDONLY)
    start = 5 * MiB + 10
    assert await fs.read(fh, start, 100) == data[start : start + 100]
    assert await fs.read(fh, start + 100, 4000) == data[start + 100 : start + 4100]
    assert await fs.read(fh, len(data) - 5, 100) == data[-5:]
    assert await fs.read(fh, len(data), 100) == b""
    assert [(e[2], e[3]) for e in m.store.log] == [(start, min(READAHEAD, len(data) - start))]
    await fs.release(fh)
    assert node.staging is None  # reading does not bring the file back into the cache


async def test_index_cache(env):
    m = env.mount(cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    index = index_bytes(200)
    data = os.urandom(400 * KiB)
    index_node = await commit(fs, d, INDEX, index)
    data_node = await commit(fs, d, DATA, data)
    assert m.journal.index_get(key(INDEX)) == index  # filled at commit, on the writing node
    assert m.journal.index_get(key(DATA)) is None  # only .index files
    assert m.staging_paths() == {index_node.staging.path, data_node.staging.path}
    # an idle cached file keeps no descriptor open (thousands of cached files would hit EMFILE)
    assert open_staging_fds(m) == set()

    await write_file(fs, d, "temp_shuffle_x", bytes(900 * KiB))
    assert index_node.staging is None and data_node.staging is None
    m.store.log.clear()

    # a reducer reads its two offsets; every open is served from LMDB, never from the store
    for reduce_id in (0, 17, 199):
        fh = await fs.open(index_node.ino, os.O_RDONLY)
        assert await fs.read(fh, reduce_id * 8, 8) == index[reduce_id * 8 : reduce_id * 8 + 8]
        assert await fs.read(fh, reduce_id * 8 + 8, 8) == index[reduce_id * 8 + 8 : reduce_id * 8 + 16]
        await fs.release(fh)
    assert m.store.calls_of("get_range", key(INDEX)) == []
    assert fs.stats["index_cache_hits"] == 6 and fs.stats["index_fetches"] == 0
    assert await read_all(fs, data_node.ino) == data  # .data goes to the store
    assert len(m.store.calls_of("get_range", key(DATA))) == 1

    # the entry goes when the file goes
    await fs.unlink(d, INDEX)
    assert m.journal.index_get(key(INDEX)) is None


# -- rename -------------------------------------------------------------------------------------


async def test_rename_before_commit_costs_no_request(env):
    m = env.mount()
    fs = m.fs
    src = await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/0c")
    dst = await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/1a")
    m.store.log.clear()

    # UnsafeShuffleWriter: temp_shuffle_<uuid> moves across directories into .data.<uuid>
    temp = f"{DATA}.{uuid.uuid4()}"
    moved = await write_file(fs, src, "temp_shuffle_1", b"d" * 300, flags=APPEND)
    await fs.rename(src, "temp_shuffle_1", dst, temp)
    assert await fs.lookup(src, "temp_shuffle_1") is None
    assert (await fs.lookup(dst, temp)) is moved and moved.size == 300

    # replacing an existing local file: atomic, the old bytes are gone
    old = await write_file(fs, dst, "rdd_0_1", b"old" * 10)
    await write_file(fs, dst, "temp_local_2", b"new")
    await fs.rename(dst, "temp_local_2", dst, "rdd_0_1")
    replaced_by = await fs.lookup(dst, "rdd_0_1")
    assert replaced_by is not old and not old.linked
    assert await read_all(fs, replaced_by.ino) == b"new"
    assert await fs.lookup(dst, "temp_local_2") is None
    forget(fs, old)
    assert m.staging.bytes == 303  # the replaced file's staging file is gone

    # a durable name's temp file renamed to another temp name: still local
    await fs.rename(dst, temp, src, temp + ".2")
    assert not moved.committed and moved.size == 300
    assert m.store.log == [] and contents(m.store) == {}


@MODES
@STORES
async def test_commit_on_rename(env, mode, store_kind):
    m = env.mount(env.store(store_kind), commit_mode=mode)
    fs = m.fs
    d = await mkdirs(fs, BM)
    other = await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/3f")
    data = os.urandom(300 * KiB + 7)
    index = index_bytes(10)
    checksum = os.urandom(80)
    m.store.log.clear()

    # Spark's order: index, then data (a temp_shuffle file moved in from another directory
    # first), then checksum; each rename commits, nothing before it does
    temp_index = f"{INDEX}.{uuid.uuid4()}"
    index_node = await write_file(fs, d, temp_index, index)
    assert m.store.log == []
    await fs.rename(d, temp_index, d, INDEX)
    if mode == "sync":
        assert contents(m.store) == {key(INDEX): index}
    assert index_node.committed and index_node.size == len(index)
    assert m.journal.index_get(key(INDEX)) == index

    temp_data = f"{DATA}.{uuid.uuid4()}"
    data_node = await write_file(fs, other, "temp_shuffle_7", data, flags=APPEND)
    await fs.rename(other, "temp_shuffle_7", d, temp_data)
    assert not data_node.committed
    await fs.rename(d, temp_data, d, DATA)
    assert data_node.committed and data_node.size == len(data)  # exact right after rename
    if mode == "sync":
        assert contents(m.store) == {key(INDEX): index, key(DATA): data}

    await commit(fs, d, CHECKSUM, checksum)
    if mode == "async":
        await m.remote.drain()
    assert contents(m.store) == {key(INDEX): index, key(DATA): data, key(CHECKSUM): checksum}
    assert sorted(e[1] for e in m.store.calls_of("put_file")) == sorted([key(INDEX), key(DATA), key(CHECKSUM)])
    assert {e[0] for e in m.store.log} == {"put_file"}
    assert m.journal.pending_ops() == []
    # still readable, from the local copy
    assert await read_all(fs, data_node.ino) == data
    assert m.store.calls_of("get_range") == []


@MODES
async def test_rename_replaces_committed_file(env, mode):
    m = env.mount(commit_mode=mode)
    fs = m.fs
    d = await mkdirs(fs, BM)
    first = await commit(fs, d, DATA, b"first attempt" * 100)
    await commit(fs, d, INDEX, index_bytes(5, seed=1))
    # a retried task writes its output again and renames it over the first attempt's
    new_data, new_index = b"second" * 77, index_bytes(5, seed=2)
    second = await commit(fs, d, DATA, new_data)
    await commit(fs, d, INDEX, new_index)
    assert (await fs.lookup(d, DATA)) is second and not first.linked
    assert second.size == len(new_data)
    if mode == "async":
        await m.remote.drain()
    assert contents(m.store) == {key(DATA): new_data, key(INDEX): new_index}
    assert m.store.calls_of("delete_many") == []  # the new object replaces the old one
    assert m.journal.index_get(key(INDEX)) == new_index
    assert await read_all(fs, second.ino) == new_data
    assert m.journal.pending_ops() == []


@MODES
@STORES
async def test_rename_committed_file_moves_object(env, mode, store_kind):
    m = env.mount(env.store(store_kind), commit_mode=mode, cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    data, index = os.urandom(600 * KiB), index_bytes(30)
    data_node = await commit(fs, d, DATA, data)
    await settle(m)
    index_node = await commit(fs, d, INDEX, index)
    await settle(m)
    await write_file(fs, d, "temp_shuffle_x", bytes(500 * KiB))
    assert data_node.staging is None and index_node.staging is not None  # one evicted, one local
    m.store.log.clear()

    # an executor recovering a dead one's output moves it into its own block manager directory
    new_dir = "blockmgr-20000000-0000-4000-8000-000000000000/1a"
    dst = await mkdirs(fs, new_dir)
    m.store.log.clear()
    await fs.rename(d, DATA, dst, DATA)
    await fs.rename(d, INDEX, dst, INDEX)
    assert (await fs.lookup(dst, DATA)) is data_node and data_node.size == len(data)
    assert await fs.lookup(d, DATA) is None
    # readable at once under the new name (an async move is waited for)
    assert await read_all(fs, data_node.ino) == data
    if mode == "async":
        await m.remote.drain()
    assert contents(m.store) == {key(DATA, new_dir): data, key(INDEX, new_dir): index}
    assert sorted(m.store.calls_of("move")) == [
        ("move", key(DATA), key(DATA, new_dir)),
        ("move", key(INDEX), key(INDEX, new_dir)),
    ]
    assert m.store.calls_of("put_file") == [] and m.store.calls_of("delete_many") == []
    assert [e[1] for e in m.store.calls_of("get_range")] == [key(DATA, new_dir)]
    # the index cache entry moved along
    assert m.journal.index_get(key(INDEX)) is None
    assert m.journal.index_get(key(INDEX, new_dir)) == index
    if store_kind == "file":  # the store's emptied directories went with the objects
        assert os.listdir(m.store.root) == ["blockmgr-20000000-0000-4000-8000-000000000000"]

    # another durable name in the same directory, replacing a committed file there
    other = os.urandom(1000)
    await commit(fs, dst, "shuffle_0_6_0.data", other)
    await settle(m)
    await fs.rename(dst, DATA, dst, "shuffle_0_6_0.data")
    await settle(m)
    assert contents(m.store) == {key("shuffle_0_6_0.data", new_dir): data, key(INDEX, new_dir): index}
    assert m.store.calls_of("delete_many") == []  # the moved object replaced the other one
    assert m.journal.pending_ops() == []


@MODES
async def test_rename_committed_to_local_name(env, mode):
    m = env.mount(commit_mode=mode, cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    data, index = os.urandom(100 * KiB), index_bytes(8)
    evicted = await commit(fs, d, "shuffle_0_1_0.data", os.urandom(700 * KiB))
    await settle(m)
    await write_file(fs, d, "temp_shuffle_x", bytes(500 * KiB))
    assert evicted.staging is None
    node = await commit(fs, d, DATA, data)
    index_node = await commit(fs, d, INDEX, index)
    await settle(m)
    m.store.log.clear()

    # with its local copy: the object is deleted and the file is an ordinary local file again
    await fs.rename(d, DATA, d, DATA + ".bak")
    await fs.rename(d, INDEX, d, "index-copy")
    assert not node.committed and not index_node.committed
    await settle(m)
    assert set(contents(m.store)) == {key("shuffle_0_1_0.data")}
    assert m.journal.index_get(key(INDEX)) is None
    fh = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
    await fs.write(fh, node.size, b"more")
    await close(fs, fh)
    assert await read_all(fs, node.ino) == data + b"more"
    assert m.store.calls_of("put_file") == []

    # evicted: there are no local bytes to keep, so mv must copy (EXDEV); nothing changes
    with pytest.raises(FsError) as exc:
        await fs.rename(d, "shuffle_0_1_0.data", d, "shuffle_0_1_0.data.bak")
    assert errno_of(exc) == errno.EXDEV
    assert (await fs.lookup(d, "shuffle_0_1_0.data")) is evicted and evicted.committed
    assert await fs.lookup(d, "shuffle_0_1_0.data.bak") is None

    # renamed back to a durable name, the local file commits again
    await fs.rename(d, DATA + ".bak", d, DATA)
    await settle(m)
    assert contents(m.store)[key(DATA)] == data + b"more"
    assert m.journal.pending_ops() == []


async def test_writes_after_uncommit_never_change_a_stored_file(env):
    """file:// stores hard-link the committed staging file; once the file leaves its durable
    name and is written again, those writes must go to a private copy."""
    store = env.store("file")
    m = env.mount(store)
    fs = m.fs
    d = await mkdirs(fs, BM)
    data = os.urandom(100 * KiB)
    node = await commit(fs, d, DATA, data)
    await settle(m)
    stored = os.path.join(store.root, key(DATA))
    assert os.stat(stored).st_ino == os.stat(node.staging.path).st_ino  # linked, not copied
    reader = os.open(stored, os.O_RDONLY)  # e.g. another node reading the object
    try:
        await fs.rename(d, DATA, d, "kept-copy")
        fh = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, node.size, b"more")
        await close(fs, fh)
        assert os.pread(reader, len(data) + 100, 0) == data
    finally:
        os.close(reader)
    assert await read_all(fs, node.ino) == data + b"more"


@pytest.mark.parametrize("store_kind", ["memory", "file"])
async def test_staging_files_are_reused_under_new_names(env, store_kind):
    m = env.mount(env.store(store_kind), commit_mode="async")
    fs = m.fs
    d = await mkdirs(fs, BM)
    scratch = await write_file(fs, d, "temp_shuffle_a", os.urandom(5000))
    scratch_path = scratch.staging.path
    scratch_inode = os.stat(scratch_path).st_ino
    await fs.unlink(d, "temp_shuffle_a")
    forget(fs, scratch)
    assert m.staging.bytes == 0
    reused = await write_file(fs, d, "temp_shuffle_b", b"new")
    assert reused.staging.path != scratch_path  # a name is never used twice
    assert os.stat(reused.staging.path).st_ino == scratch_inode
    assert await read_all(fs, reused.ino) == b"new"

    committed = await commit(fs, d, DATA, os.urandom(3000))
    await settle(m)
    assert m.staging.free == []
    await fs.unlink(d, DATA)
    forget(fs, committed)
    await settle(m)
    # a file:// store hard-linked the upload: that file must not be reused
    assert len(m.staging.free) == (1 if store_kind == "memory" else 0)
    fresh = await write_file(fs, d, "temp_shuffle_c", b"c")
    assert m.staging.free == []
    assert m.staging_paths() == {reused.staging.path, fresh.staging.path}


async def test_rename_noreplace(env):
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    a = await write_file(fs, d, "temp_shuffle_a", b"A")
    b = await write_file(fs, d, "temp_shuffle_b", b"B")
    committed = await commit(fs, d, DATA, b"durable")
    m.store.log.clear()

    for target in ("temp_shuffle_b", DATA):
        with pytest.raises(FsError) as exc:
            await fs.rename(d, "temp_shuffle_a", d, target, pyfuse3.RENAME_NOREPLACE)
        assert errno_of(exc) == errno.EEXIST
    with pytest.raises(FsError) as exc:
        await fs.rename(d, "temp_shuffle_a", d, "temp_shuffle_b", pyfuse3.RENAME_EXCHANGE)
    assert errno_of(exc) == errno.EINVAL
    assert (await fs.lookup(d, "temp_shuffle_a")) is a and (await fs.lookup(d, "temp_shuffle_b")) is b
    assert (await fs.lookup(d, DATA)) is committed and committed.committed
    assert await read_all(fs, b.ino) == b"B" and await read_all(fs, committed.ino) == b"durable"

    await fs.rename(d, "temp_shuffle_a", d, "temp_shuffle_c", pyfuse3.RENAME_NOREPLACE)
    assert (await fs.lookup(d, "temp_shuffle_c")) is a and await fs.lookup(d, "temp_shuffle_a") is None
    assert m.store.log == [] and contents(m.store) == {key(DATA): b"durable"}


async def test_rename_directory(env):
    m = env.mount()
    fs = m.fs
    env.plant(m.store, "spark-9/blockmgr-90000000-0000-4000-8000-000000000000/0c/shuffle_1_1_0.data", b"other node")
    spark = await mkdirs(fs, "spark-1")
    await mkdirs(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")
    bm = await resolve(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000")
    bucket = await resolve(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")
    await write_file(fs, bucket.ino, "temp_shuffle_1", b"t" * 10)
    # a file being written under its final name when its directory moves
    fh, writing = await create(fs, bucket.ino, DATA, APPEND)
    await fs.write(fh, 0, b"data")
    m.store.log.clear()

    await fs.rename(
        spark, "blockmgr-10000000-0000-4000-8000-000000000000", spark, "blockmgr-20000000-0000-4000-8000-000000000000"
    )
    assert await resolve(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000") is None
    assert (await resolve(fs, "spark-1/blockmgr-20000000-0000-4000-8000-000000000000")) is bm
    assert (
        await read_all(
            fs, (await resolve(fs, "spark-1/blockmgr-20000000-0000-4000-8000-000000000000/0c/temp_shuffle_1")).ino
        )
        == b"t" * 10
    )
    assert m.store.log == []
    await close(fs, fh)  # commits where the file is now
    assert contents(m.store)["spark-1/blockmgr-20000000-0000-4000-8000-000000000000/0c/" + DATA] == b"data"
    assert writing.committed

    # holding a committed file: the objects' keys would all change, refused
    with pytest.raises(FsError) as exc:
        await fs.rename(
            spark,
            "blockmgr-20000000-0000-4000-8000-000000000000",
            spark,
            "blockmgr-30000000-0000-4000-8000-000000000000",
        )
    assert errno_of(exc) == errno.EXDEV
    assert (await resolve(fs, "spark-1/blockmgr-20000000-0000-4000-8000-000000000000")) is bm

    # into itself
    await mkdirs(fs, "spark-1/local/sub")
    local = await resolve(fs, "spark-1/local")
    sub = await resolve(fs, "spark-1/local/sub")
    with pytest.raises(FsError) as exc:
        await fs.rename(spark, "local", sub.ino, "x")
    assert errno_of(exc) == errno.EINVAL
    # onto a non-empty directory, onto an empty one
    await mkdirs(fs, "spark-1/full/f")
    with pytest.raises(FsError) as exc:
        await fs.rename(spark, "local", spark, "full")
    assert errno_of(exc) == errno.ENOTEMPTY
    empty = fs.node(await mkdirs(fs, "spark-1/empty"))
    await fs.rename(spark, "local", spark, "empty")
    assert (await resolve(fs, "spark-1/empty/sub")) is sub and (await resolve(fs, "spark-1/empty")) is local
    assert not empty.linked

    # a directory learned from the store (another node's): this mount does not know all of it
    foreign = await resolve(fs, "spark-9/blockmgr-90000000-0000-4000-8000-000000000000")
    assert foreign is not None and not foreign.owned
    with pytest.raises(FsError) as exc:
        await fs.rename(
            foreign.parent.ino,
            "blockmgr-90000000-0000-4000-8000-000000000000",
            foreign.parent.ino,
            "blockmgr-80000000-0000-4000-8000-000000000000",
        )
    assert errno_of(exc) == errno.EXDEV
    assert set(contents(m.store)) == {
        "spark-1/blockmgr-20000000-0000-4000-8000-000000000000/0c/" + DATA,
        "spark-9/blockmgr-90000000-0000-4000-8000-000000000000/0c/shuffle_1_1_0.data",
    }


# -- names and paths ----------------------------------------------------------------------------


async def test_names_over_255_bytes_are_enametoolong(env):
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    await write_file(fs, d, "f", b"x")
    long = "é" * 128  # 256 bytes
    assert await fs.lookup(d, "é" * 127) is None  # 254 bytes: just a missing name
    calls = [
        fs.lookup(d, long),
        fs.lookup(ROOT_INODE, long),
        fs.unlink(d, long),
        fs.rmdir(d, long),
        fs.mkdir(d, long, 0o755, UID, GID),
        create(fs, d, long),
        fs.rename(d, long, d, "g"),
        fs.rename(d, "f", d, long),
    ]
    for call in calls:
        with pytest.raises(FsError) as exc:
            await call
        assert errno_of(exc) == errno.ENAMETOOLONG, call
    assert sorted(fs.node(d).children) == ["f"]


async def test_paths_longer_than_a_key_are_refused_before_anything_changes(env):
    """Directories are recorded in LMDB and durable files are store objects, both by path: a
    path neither can hold is refused with ENAMETOOLONG and leaves nothing half done."""

    class ShortKeys(RecordingMemoryStore):
        max_key_bytes = 300

    # LMDB's limit: 511 bytes
    plain = env.mount(name="node2")
    deep = await mkdirs(plain.fs, "/".join(["d" * 255, "e" * 255]))  # 511 bytes
    with pytest.raises(FsError) as exc:
        await plain.fs.mkdir(deep, "x", 0o755, UID, GID)
    assert errno_of(exc) == errno.ENAMETOOLONG
    assert plain.fs.node(deep).children == {} and len(plain.journal.dirs()) == 2

    # a store's own limit, when lower
    m = env.mount(ShortKeys())
    fs = m.fs
    top = await mkdirs(fs, "/".join(["d" * 99] * 2))  # 199 bytes
    name = "e" * (300 - 200)
    sub = (await fs.mkdir(top, name, 0o755, UID, GID)).ino  # exactly 300 bytes
    recorded = dict(m.journal.dirs())
    with pytest.raises(FsError) as exc:
        await fs.mkdir(sub, "x", 0o755, UID, GID)
    assert errno_of(exc) == errno.ENAMETOOLONG
    # durable files too, at create and at rename; local files are never keys
    longer = "f" * (300 - 200 - len(DATA) + 1)
    spot = (await fs.mkdir(top, longer, 0o755, UID, GID)).ino  # its files' paths: 301 + len(DATA)
    with pytest.raises(FsError) as exc:
        await create(fs, spot, DATA)
    assert errno_of(exc) == errno.ENAMETOOLONG
    await write_file(fs, spot, "temp_shuffle_1", b"local")
    with pytest.raises(FsError) as exc:
        await fs.rename(spot, "temp_shuffle_1", spot, DATA)
    assert errno_of(exc) == errno.ENAMETOOLONG
    # renaming a directory makes the paths below it longer
    short = (await fs.mkdir(ROOT_INODE, "s", 0o755, UID, GID)).ino
    await fs.mkdir(short, name, 0o755, UID, GID)
    with pytest.raises(FsError) as exc:
        await fs.rename(ROOT_INODE, "s", top, "s")  # "s/<name>" under 199 bytes: 302
    assert errno_of(exc) == errno.ENAMETOOLONG
    # nothing changed: not in the namespace, not in LMDB, no store request
    assert sorted(fs.node(top).children) == sorted([name, longer])
    assert fs.node(sub).children == {}
    assert sorted(fs.node(spot).children) == ["temp_shuffle_1"]
    assert set(fs.node(short).children) == {name}
    assert {k for k, _ in m.journal.dirs()} == set(recorded) | {f"{'d' * 99}/{'d' * 99}/{longer}", "s", f"s/{name}"}
    assert [call for call in m.store.log if call[0] != "list_dir"] == []


async def test_index_file_another_writer_stored_at_a_longer_path_is_read(env):
    """The index cache cannot hold a key over LMDB's limit: such a file is read, not cached."""
    m = env.mount()
    deep = "/".join(["d" * 250, "e" * 250])
    env.plant(m.store, f"{deep}/{INDEX}", index_bytes(4))
    node = await resolve(m.fs, f"{deep}/{INDEX}")
    assert await read_all(m.fs, node.ino) == index_bytes(4)
    assert m.journal.index_get(f"{deep}/{INDEX}") is None


async def test_names_the_store_cannot_hold_are_einval(env):
    """The file store hides its temporary names from listings: a directory or durable file of
    such a name would vanish. Local files may have any name; nothing of theirs is stored."""
    m = env.mount(env.store("file"))
    fs = m.fs
    d = await mkdirs(fs, BM)
    hidden = ".shufflefs-tmp-0123"
    with pytest.raises(FsError) as exc:
        await fs.mkdir(d, hidden, 0o755, UID, GID)
    assert errno_of(exc) == errno.EINVAL
    await mkdirs(fs, f"{BM}/sub")
    with pytest.raises(FsError) as exc:
        await fs.rename(d, "sub", d, hidden)
    assert errno_of(exc) == errno.EINVAL
    assert set(fs.node(d).children) == {"sub"}
    await write_file(fs, d, hidden, b"scratch")  # a local file
    assert await read_all(fs, (await fs.lookup(d, hidden)).ino) == b"scratch"

    # names that are not UTF-8 are fine for a file store, also in LMDB (what a restart restores)
    raw = os.fsdecode(b"dir-\xff")
    odd = (await fs.mkdir(d, raw, 0o755, UID, GID)).ino
    await commit(fs, odd, DATA, b"odd")
    with open(os.path.join(os.fsencode(m.store.root), os.fsencode(BM), b"dir-\xff", DATA.encode()), "rb") as f:
        assert f.read() == b"odd"
    assert f"{BM}/{raw}" in dict(m.journal.dirs())


# -- unlink -------------------------------------------------------------------------------------


async def test_delete_before_commit_costs_nothing(env):
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    m.store.log.clear()
    names = ["temp_shuffle_1", "temp_local_2", f"{DATA}.{uuid.uuid4()}", f"{INDEX}.{uuid.uuid4()}", "rdd_0_1"]
    nodes = [await write_file(fs, d, name, os.urandom(1000), flags=APPEND) for name in names]
    # one still open while unlinked: readable through its descriptor until closed
    fh, open_node = await create(fs, d, "temp_shuffle_open", APPEND)
    await fs.write(fh, 0, b"still here")
    # a file written under its final name, deleted before its close would have committed it
    fh_durable, durable = await create(fs, d, DATA, APPEND)
    await fs.write(fh_durable, 0, b"never stored")
    assert m.staging.bytes == 5 * 1000 + 10 + 12

    for name in names + ["temp_shuffle_open", DATA]:
        await fs.unlink(d, name)
        assert await fs.lookup(d, name) is None
    assert await fs.read(fh, 0, 100) == b"still here"
    await close(fs, fh)
    await close(fs, fh_durable)
    assert not durable.committed
    for node in nodes + [open_node, durable]:
        forget(fs, node)
    assert m.staging.bytes == 0 and m.staging_paths() == set()
    with pytest.raises(FsError) as exc:
        await fs.unlink(d, "temp_shuffle_1")
    assert errno_of(exc) == errno.ENOENT
    await m.remote.drain()
    assert m.store.log == [] and contents(m.store) == {}
    assert m.journal.pending_ops() == []


@STORES
async def test_unlink_committed_deletes_object(env, store_kind):
    m = env.mount(env.store(store_kind), cache_size=1 * MiB)
    fs = m.fs
    env.plant(m.store, "blockmgr-00000000-0000-4000-8000-000000000000/shuffle_0_0_0.data", b"elsewhere")
    d = await mkdirs(fs, BM)
    evicted = await commit(fs, d, "shuffle_0_1_0.data", os.urandom(700 * KiB))
    await write_file(fs, d, "temp_shuffle_x", bytes(500 * KiB))
    assert evicted.staging is None
    nodes = [evicted]
    for name, data in ((DATA, b"d" * 5000), (INDEX, index_bytes(3)), (CHECKSUM, b"c" * 24)):
        nodes.append(await commit(fs, d, name, data))
    # and the one committed by another node, learned from the store
    foreign = await resolve(fs, "blockmgr-00000000-0000-4000-8000-000000000000/shuffle_0_0_0.data")
    assert foreign.committed
    nodes.append(foreign)
    assert len(contents(m.store)) == 5
    m.store.log.clear()

    for node in nodes:
        await fs.unlink(node.parent.ino, node.name)
        assert not node.linked
        forget(fs, node)
    assert m.journal.index_get(key(INDEX)) is None
    await m.remote.drain()
    assert contents(m.store) == {}
    deleted = [k for e in m.store.calls_of("delete_many") for k in e[1]]
    assert sorted(deleted) == sorted(
        [
            key("shuffle_0_1_0.data"),
            key(DATA),
            key(INDEX),
            key(CHECKSUM),
            "blockmgr-00000000-0000-4000-8000-000000000000/shuffle_0_0_0.data",
        ]
    )
    assert {e[0] for e in m.store.log} == {"delete_many"}  # no download, no upload
    assert m.staging.bytes == 500 * KiB  # only the scratch file is left locally
    assert m.journal.pending_ops() == []
    if store_kind == "file":
        assert os.listdir(m.store.root) == []


async def test_unlink_during_async_upload(env):
    m = env.mount(commit_mode="async")
    fs = m.fs
    d = await mkdirs(fs, BM)
    store = m.store
    store.gate.clear()

    # in flight, and the store honours the abort: nothing is ever stored
    node = await commit(fs, d, DATA, b"1" * 3000)
    await until(lambda: store.calls_of("put_file", key(DATA)))
    await fs.unlink(d, DATA)
    forget(fs, node)
    # written again and unlinked again while its upload waits behind the first: never started
    again = await commit(fs, d, DATA, b"2" * 3000)
    await fs.unlink(d, DATA)
    forget(fs, again)
    store.gate.set()
    await settle(m)
    assert contents(store) == {}
    assert len(store.calls_of("put_file", key(DATA))) == 1  # the second upload never began
    assert store.calls_of("delete_many")  # and the key was cleared after the aborted upload

    # in flight, and the store cannot stop it: the object is deleted right after
    store.gate.clear()
    store.honor_abort = False
    node = await commit(fs, d, INDEX, index_bytes(4))
    await until(lambda: store.calls_of("put_file", key(INDEX)))
    await fs.unlink(d, INDEX)
    forget(fs, node)
    store.gate.set()
    await m.remote.drain()
    assert contents(store) == {}
    put_at = store.log.index(("put_file", key(INDEX)))
    assert any(e[0] == "delete_many" and key(INDEX) in e[1] for e in store.log[put_at:])
    assert m.journal.index_get(key(INDEX)) is None
    assert m.journal.pending_ops() == [] and m.remote.given_up == []
    assert m.staging.bytes == 0 and m.staging_paths() == set()
    # white box: a long-running daemon keeps nothing for uploads it cancelled
    assert m.fs._put_owner == {}


# -- cache budget -------------------------------------------------------------------------------


@pytest.mark.allow_logged_errors(r"a write to .* failed \(No space left on device\)")
async def test_eviction_and_enospc(env):
    m = env.mount(cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    blobs = {name: os.urandom(256 * KiB) for name in ("shuffle_0_1_0.data", "shuffle_0_2_0.data", "shuffle_0_3_0.data")}
    a, b, c = [await commit(fs, d, name, data) for name, data in blobs.items()]
    assert m.staging.bytes == 768 * KiB

    reader = await fs.open(b.ino, os.O_RDONLY)  # open files stay
    assert await read_all(fs, a.ino) == blobs[a.name]  # now the most recently used
    await write_file(fs, d, "temp_shuffle_1", bytes(300 * KiB))
    assert c.staging is None  # least recently used went first, and only as much as needed
    assert a.staging is not None and b.staging is not None
    assert m.staging.bytes == 812 * KiB
    assert fs.statfs()["f_bfree"] == (1 * MiB - 812 * KiB) // 4096

    # local data never leaves: once nothing evictable is left, ENOSPC
    fh, big = await create(fs, d, "temp_shuffle_2", APPEND)
    with pytest.raises(FsError) as exc:
        await fs.write(fh, 0, bytes(600 * KiB))
    assert errno_of(exc) == errno.ENOSPC
    assert big.size == 0 and a.staging is None and b.staging is not None
    assert m.staging.bytes <= 1 * MiB
    assert await fs.write(fh, 0, bytes(200 * KiB)) == 200 * KiB  # what fits is fine
    assert b.staging is not None and m.staging.bytes == 756 * KiB
    # closing the reader makes its file evictable
    await fs.release(reader)
    assert await fs.write(fh, 200 * KiB, bytes(400 * KiB)) == 400 * KiB
    assert b.staging is None
    with pytest.raises(FsError) as exc:  # its first write failed: see test_failed_write_is_never_committed
        await close(fs, fh)
    assert errno_of(exc) == errno.ENOSPC
    assert m.staging.bytes == 900 * KiB and fs.stats["evictions"] == 3

    # every evicted file reads back from the store
    for node in (a, b, c):
        assert await read_all(fs, node.ino) == blobs[node.name]
    assert contents(m.store) == {key(name): data for name, data in blobs.items()}


@pytest.mark.allow_logged_errors(r"a write to .* failed \(No space left on device\)")
async def test_sparse_truncate(env):
    """Extending a file with ftruncate makes a hole, which takes no disk space: it is not
    refused for the cache budget, and bytes count once they are written."""
    m = env.mount(cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    await write_file(fs, d, "temp_shuffle_full", bytes(900 * KiB))
    fh, node = await create(fs, d, "temp_shuffle_sparse", NEW)
    await fs.setattr(node.ino, size=64 * MiB)  # 64 times --cache-size
    assert node.size == 64 * MiB and m.staging.bytes == 900 * KiB
    assert os.fstat(node.staging.fd).st_blocks == 0
    # writes into the hole are charged up to their end, and refused when they do not fit
    assert await fs.write(fh, 0, b"x" * (100 * KiB)) == 100 * KiB
    assert m.staging.bytes == 1000 * KiB
    with pytest.raises(FsError) as exc:
        await fs.write(fh, 100 * KiB, bytes(100 * KiB))
    assert errno_of(exc) == errno.ENOSPC
    assert fs.statfs()["f_bfree"] == (1 * MiB - 1000 * KiB) // 4096
    # truncating below what was written gives the bytes back
    await fs.setattr(node.ino, size=10 * KiB)
    assert m.staging.bytes == 910 * KiB
    with pytest.raises(FsError) as exc:  # a write of it failed: close reports it (see "Write errors")
        await close(fs, fh)
    assert errno_of(exc) == errno.ENOSPC
    assert await read_all(fs, node.ino) == b"x" * (10 * KiB)


def invalidated(fs: Filesystem) -> set[tuple]:
    """What the core asked the kernel to forget since the last call."""
    items = set()
    while True:
        try:
            items.add(fs.invalidations.receive_nowait())
        except trio.WouldBlock:
            return items


@pytest.mark.allow_logged_errors(r"a write to .* failed \(No space left on device\)")
@MODES
async def test_failed_write_is_never_committed(env, mode, caplog):
    """With the writeback cache, write() succeeded in the program long before the kernel sent
    the WRITE that failed. Such a file is never committed (not at close, release or rename),
    every later close of a writer and every fsync reports the error, it is logged once, and the
    kernel is told to drop what it cached of the file. Truncating it to 0 clears the error."""
    m = env.mount(commit_mode=mode, cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    await write_file(fs, d, "temp_shuffle_local", bytes(768 * KiB))  # local data is never evicted
    fh, node = await create(fs, d, DATA, APPEND)
    assert await fs.write(fh, 0, bytes(128 * KiB)) == 128 * KiB
    for offset in (128 * KiB, 384 * KiB):  # the kernel writes back in large pieces
        with pytest.raises(FsError) as exc:
            await fs.write(fh, offset, bytes(256 * KiB))
        assert errno_of(exc) == errno.ENOSPC
    assert node.size == 128 * KiB  # what is held
    assert [r.levelname for r in caplog.records if "failed" in r.message] == ["ERROR"]
    assert invalidated(fs) == {("inode", node.ino), ("entry", d, DATA)}
    for _ in range(2):
        with pytest.raises(FsError) as exc:
            await fs.fsync(fh)
        assert errno_of(exc) == errno.ENOSPC
    if mode == "sync":  # async mode: the adapter answers FLUSH itself, RELEASE would commit
        with pytest.raises(FsError) as exc:
            await fs.flush(fh)
        assert errno_of(exc) == errno.ENOSPC
    await fs.release(fh)
    assert not node.committed
    fh = await fs.open(node.ino, os.O_WRONLY)  # a later writer's close reports it again
    if mode == "sync":
        with pytest.raises(FsError) as exc:
            await fs.flush(fh)
        assert errno_of(exc) == errno.ENOSPC
    await fs.release(fh)
    # renamed into a durable name: refused, nothing changes; a local name is fine
    await fs.rename(d, DATA, d, DATA + ".tmp")
    with pytest.raises(FsError) as exc:
        await fs.rename(d, DATA + ".tmp", d, DATA)
    assert errno_of(exc) == errno.EIO
    assert (await fs.lookup(d, DATA + ".tmp")) is node and await fs.lookup(d, DATA) is None
    await m.remote.drain()
    assert not node.committed and contents(m.store) == {} and m.journal.pending_ops() == []
    assert len([r for r in caplog.records if "failed" in r.message]) == 1

    # rewritten from empty (O_TRUNC): a file like any other again
    fh = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    assert await fs.write(fh, 0, b"whole") == 5
    await close(fs, fh)
    await fs.rename(d, DATA + ".tmp", d, DATA)
    await m.remote.drain()
    assert contents(m.store) == {key(DATA): b"whole"}


@pytest.mark.allow_logged_errors(r"a write to .* failed \(No space left on device\)")
async def test_failed_write_after_an_early_commit_removes_its_object(env):
    """The close of a duplicate descriptor committed the file early (a shell's `> file`); a
    later write through the other one fails: the early object goes, nothing is committed."""
    m = env.mount(cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    fh, node = await create(fs, d, INDEX, NEW)
    await fs.flush(fh)  # the shell closes its copy of the descriptor
    assert contents(m.store) == {key(INDEX): b""}
    with pytest.raises(FsError) as exc:
        await fs.write(fh, 0, bytes(2 * MiB))
    assert errno_of(exc) == errno.ENOSPC
    with pytest.raises(FsError):
        await close(fs, fh)
    await m.remote.drain()
    assert not node.committed and contents(m.store) == {}


@pytest.mark.allow_logged_errors(r"a write to .* failed \(No space left on device\)")
async def test_file_evictable_again_after_its_move(env):
    """A cached file whose move is pending cannot be evicted yet, but must be once it is done."""
    m = env.mount(cache_size=1 * MiB, commit_mode="async")
    fs = m.fs
    d = await mkdirs(fs, BM)
    data = os.urandom(512 * KiB)
    node = await commit(fs, d, "shuffle_0_1_0.data", data)
    await settle(m)
    m.store.move_gate.clear()
    await fs.rename(d, "shuffle_0_1_0.data", d, "shuffle_0_9_0.data")
    await write_file(fs, d, "temp_shuffle_a", bytes(400 * KiB))  # fits without evicting
    with pytest.raises(FsError) as exc:
        await write_file(fs, d, "temp_shuffle_b", bytes(400 * KiB))
    assert errno_of(exc) == errno.ENOSPC and node.staging is not None  # the move still needs it
    m.store.move_gate.set()
    await settle(m)
    await write_file(fs, d, "temp_shuffle_c", bytes(400 * KiB))
    assert node.staging is None
    assert await read_all(fs, node.ino) == data


# -- file classes and commit timing -------------------------------------------------------------


@MODES
async def test_scratch_files_never_uploaded(env, mode):
    m = env.mount(commit_mode=mode)
    fs = m.fs
    d = await mkdirs(fs, BM)
    py = await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/python/4242")
    m.store.log.clear()
    local_names = [
        f"temp_shuffle_{uuid.uuid4()}",
        f"temp_local_{uuid.uuid4()}",
        f"{DATA}.{uuid.uuid4()}",
        f"{INDEX}.{uuid.uuid4()}",
        f"{CHECKSUM}.{uuid.uuid4()}",
        "rdd_3_7",
        "broadcast_0_python",
        "shuffle_0_5.data",
        "shuffle_0_5_0.dat",
        "shuffle_0_5_0.data.tmp",
        "xshuffle_0_5_0.data",
        "shuffle_a_5_0.index",
    ]
    for name in local_names:
        await write_file(fs, d, name, os.urandom(500), flags=APPEND)
    for i in range(20):
        await write_file(fs, py, f"spill_{i}", os.urandom(200))
    # renames among local names stay local too
    await fs.rename(d, local_names[0], d, local_names[2] + ".b")
    await fs.rename(d, local_names[1], py, "rdd_9_9")
    await m.remote.drain()
    assert m.store.log == [] and contents(m.store) == {}
    assert m.journal.pending_ops() == [] and m.remote.stats["put_requests"] == 0
    assert len(m.staging_paths()) == len(local_names) + 20


@MODES
async def test_commit_on_close_of_durable_name(env, mode):
    m = env.mount(commit_mode=mode)
    fs = m.fs
    d = await mkdirs(fs, BM)
    index = index_bytes(12)

    # written directly under the final name: the close of its last writer commits
    fh, node = await create(fs, d, INDEX, NEW)
    await fs.write(fh, 0, index)
    assert not node.committed
    await fs.flush(fh)
    assert node.committed
    if mode == "sync":
        assert contents(m.store) == {key(INDEX): index}  # stored before close() returns
    await fs.release(fh)

    # two writers (and a reader): only the last writer's close commits, with every byte
    fh1, data_node = await create(fs, d, DATA, APPEND)
    fh2 = await fs.open(data_node.ino, os.O_WRONLY)
    reader = await fs.open(data_node.ino, os.O_RDONLY)
    await fs.write(fh1, 0, b"a" * 100)
    await fs.write(fh2, 100, b"b" * 100)
    await close(fs, fh1)
    await close(fs, reader)
    assert not data_node.committed and m.store.calls_of("put_file", key(DATA)) == []
    await close(fs, fh2)
    assert data_node.committed
    if mode == "async":
        await m.remote.drain()
    assert contents(m.store) == {key(INDEX): index, key(DATA): b"a" * 100 + b"b" * 100}
    assert len(m.store.calls_of("put_file")) == 2  # release after flush does not upload again
    assert m.journal.index_get(key(INDEX)) == index


async def test_sync_commit_waits_for_store(env):
    m = env.mount(commit_mode="sync")
    fs = m.fs
    d = await mkdirs(fs, BM)
    data = os.urandom(50 * KiB)
    temp = f"{DATA}.{uuid.uuid4()}"
    await write_file(fs, d, temp, data, flags=APPEND)
    m.store.gate.clear()
    seen_at_return = []

    async def rename():
        await fs.rename(d, temp, d, DATA)
        seen_at_return.append(contents(m.store).get(key(DATA)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rename)
        await until(lambda: m.store.calls_of("put_file", key(DATA)))
        await trio.testing.wait_all_tasks_blocked()
        assert seen_at_return == [] and contents(m.store) == {}  # upload held: rename still waits
        m.store.gate.set()
    assert seen_at_return == [data]


@pytest.mark.allow_logged_errors(r"could not be stored: injected failure")
async def test_sync_commit_failure_is_eio(env):
    m = env.mount(commit_mode="sync", max_attempts=3)
    fs = m.fs
    d = await mkdirs(fs, BM)
    data = os.urandom(10 * KiB)
    index = index_bytes(6)
    temp = f"{DATA}.{uuid.uuid4()}"
    node = await write_file(fs, d, temp, data, flags=APPEND)
    m.store.log.clear()
    m.store.fail_next = 10**9

    with pytest.raises(FsError) as exc:
        await fs.rename(d, temp, d, DATA)
    assert errno_of(exc) == errno.EIO
    assert len(m.store.calls_of("put_file", key(DATA))) >= 3  # retried before giving up
    # the rename changed nothing (test_failed_sync_rename_changes_nothing)
    assert (await fs.lookup(d, temp)) is node and await fs.lookup(d, DATA) is None
    assert not node.committed and node.size == len(data)
    # the close that commits a file written under its final name fails the same way; that
    # file keeps its name (nothing to undo) and stays committed
    fh, index_node = await create(fs, d, INDEX, NEW)
    await fs.write(fh, 0, index)
    with pytest.raises(FsError) as exc:
        await close(fs, fh)
    assert errno_of(exc) == errno.EIO
    assert index_node.committed and fh not in fs.handles
    assert contents(m.store) == {}
    # owed: the upload; and a look, later, for a failed attempt of the cancelled one that the
    # store might still apply (tests/test_late_requests.py)
    assert sorted((r["kind"], r["key"]) for _, r in m.journal.pending_ops()) == [
        ("put", key(INDEX)),
        ("sweep", key(DATA)),
    ]

    # the store heals: the upload completes in the background, nobody has to ask again
    m.store.fail_next = 0
    await until(lambda: len(contents(m.store)) == 1)
    assert contents(m.store) == {key(INDEX): index}
    await fs.rename(d, temp, d, DATA)  # Spark's retry
    assert contents(m.store) == {key(DATA): data, key(INDEX): index}
    await settle(m)
    assert [r["kind"] for _, r in m.journal.pending_ops()] == ["sweep"] and m.remote.given_up == []
    assert await read_all(fs, node.ino) == data


async def test_async_commit_returns_before_upload_and_drain_completes(env):
    m = env.mount(commit_mode="async", cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    first, second = os.urandom(200 * KiB), os.urandom(400 * KiB)
    m.store.gate.clear()

    node = await commit(fs, d, DATA, first)  # returns although the upload cannot proceed
    assert node.committed and contents(m.store) == {}
    await until(lambda: m.store.calls_of("put_file", key(DATA)))
    assert m.remote.pending and len(m.journal.pending_ops()) == 1

    # more than half of --cache-size waiting for upload: the next commit waits
    temp = f"{INDEX}.{uuid.uuid4()}"
    await write_file(fs, d, temp, second)
    returned = trio.Event()

    async def rename():
        await fs.rename(d, temp, d, INDEX)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rename)
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()
        m.store.fail_next = 2  # and the store still fails a little once the gate opens
        m.store.gate.set()
        given_up = await m.remote.drain()
    assert returned.is_set() and given_up == []
    assert contents(m.store) == {key(DATA): first, key(INDEX): second}
    assert m.journal.pending_ops() == [] and not m.remote.pending
    assert m.remote.stats["failed_requests"] == 2


# -- crash and restart --------------------------------------------------------------------------


async def test_journal_resume_after_crash(env):
    store = env.store()
    expected = {}
    async with trio.open_nursery() as crashed:
        m1 = env.mount(store, nursery=crashed, commit_mode="async", max_attempts=2)
        fs = m1.fs
        d = await mkdirs(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")
        other = await mkdirs(fs, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/1a")
        store.fail_next = 10**9  # nothing gets through before the crash
        for name, data in ((INDEX, index_bytes(9)), (DATA, os.urandom(70 * KiB)), (CHECKSUM, os.urandom(72))):
            await commit(fs, d, name, data)
            expected[key(name, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")] = data
        # committed, then deleted
        gone = await commit(fs, d, "shuffle_0_6_0.data", b"deleted" * 10)
        await fs.unlink(d, "shuffle_0_6_0.data")
        forget(fs, gone)
        # committed, then moved
        moved = os.urandom(5000)
        await commit(fs, d, "shuffle_0_7_0.data", moved)
        await fs.rename(d, "shuffle_0_7_0.data", other, "shuffle_0_7_0.data")
        expected[key("shuffle_0_7_0.data", "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/1a")] = moved
        # written under its final name
        direct = os.urandom(3000)
        await write_file(fs, other, "shuffle_0_8_0.index", direct)
        expected[key("shuffle_0_8_0.index", "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/1a")] = direct
        # local files: one closed, one still open
        await write_file(fs, d, "temp_shuffle_x", b"scratch" * 100)
        fh, _ = await create(fs, d, "temp_local_y", APPEND)
        await fs.write(fh, 0, b"open scratch")
        await until(lambda: store.calls_of("put_file") and m1.remote.stats["failed_requests"] >= 10)

        pending = m1.journal.pending_ops()
        owed_paths = {m1.staging.path_of(record["path"]) for _, record in pending if record["kind"] == "put"}
        # the deleted file's upload was dropped before it began; its delete is owed
        assert [record["kind"] for _, record in pending].count("put") == 5
        assert {"delete", "move"} <= {record["kind"] for _, record in pending}
        assert owed_paths <= m1.staging_paths()
        old_staging = m1.staging_paths()
        assert len(old_staging - owed_paths) == 2  # the two scratch files
        crashed.cancel_scope.cancel()  # SIGKILL: no drain, no cleanup
    m1.close_journal()
    assert contents(store) == {}
    assert m1.staging_paths() == old_staging

    store.fail_next = 0
    m2 = env.mount(store)  # same name: same cache directory
    fs = m2.fs
    assert fs.resume_journal() == len(pending)
    # what the upload still needs is kept, the old run's scratch files are gone
    assert m2.staging_paths() == owed_paths
    assert await m2.remote.drain() == []
    assert contents(store) == expected
    # what is left is the look, later, for late arrivals of the dead daemon's puts at keys deleted since
    assert {r["kind"] for _, r in m2.journal.pending_ops()} <= {"sweep"}
    for k, data in expected.items():
        node = await resolve(fs, k)
        assert node is not None and node.committed, k
        assert node.size == len(data) and await read_all(fs, node.ino) == data
    assert (
        await resolve(fs, key("shuffle_0_6_0.data", "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")) is None
    )
    assert (
        await resolve(fs, key("shuffle_0_7_0.data", "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")) is None
    )
    assert await resolve(fs, key("temp_shuffle_x", "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")) is None
    index_key = key(INDEX, "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c")
    assert m2.journal.index_get(index_key) == expected[index_key]
    # only the cached copies of the uploaded files remain in staging
    live = {node.staging.path for node in fs.inodes.values() if node.staging is not None}
    assert m2.staging_paths() == live and len(live) == len(expected)


# -- shared namespace ---------------------------------------------------------------------------


async def test_a_put_a_crash_cuts_short_after_it_was_cancelled_leaves_no_temporary_file(env):
    """file://: an upload places its temporary file, an unlink cancels it, and the daemon dies
    before the upload renamed the file into place (tests/test_crash_storm.py found one left):
    the next daemon removes the temporary file."""
    store = env.store("file")
    placed, killed = threading.Event(), threading.Event()

    def place_and_die(key, path, token, abort=None):  # FileStore._place, killed between its two steps
        temp = shufflefs.stores.file._temp_path(store._path(key), key, token)
        os.makedirs(os.path.dirname(temp), exist_ok=True)
        os.link(path, temp)
        placed.set()
        killed.wait(10)
        raise OSError(errno.EINTR, "the daemon is dead by now")

    store._place = place_and_die
    async with trio.open_nursery() as crashed:
        m1 = env.mount(store, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, BM)
        node = await commit(m1.fs, d, DATA, b"unlinked" * 10)
        await until(placed.is_set)
        await m1.fs.unlink(d, DATA)
        forget(m1.fs, node)
        # SIGKILL, before the cancelled put finished: nothing the dead daemon would still do
        # (the attempt failing, the put finishing) reaches its journal
        m1.remote._finish = lambda *_, **__: None
        crashed.cancel_scope.cancel()
        killed.set()
    m1.close_journal()
    del store._place
    assert [os.path.basename(k) for k in contents(store)][0].startswith(shufflefs.stores.file.TEMP_PREFIX)

    m2 = env.mount(store, commit_mode="async")  # same cache dir
    m2.fs.resume_journal()
    await until(lambda: not m2.remote.sweeps)
    assert contents(store) == {}
    assert m2.journal.pending_ops() == []


async def test_a_file_a_resumed_move_brings_is_found_once_the_move_is_done(env):
    """The daemon dies after an upload finished and before its file's rename reached the store.
    The next daemon resumes the move; a listing taken while it runs cannot show the file, and
    must not hide it for a listing's lifetime once the move is done (crash storm, seed 7)."""
    store = env.store()
    async with trio.open_nursery() as crashed:
        m1 = env.mount(store, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, f"{BM}/00")
        await commit(m1.fs, d, "shuffle_0_1_0.data", b"moved" * 3)
        await settle(m1)
        store.move_gate.clear()  # the move hangs
        await m1.fs.rename(d, "shuffle_0_1_0.data", d, DATA)
        await until(lambda: store.calls_of("move", key("00/shuffle_0_1_0.data")))
        m1.remote._finish = lambda *_, **__: None  # SIGKILL: nothing more reaches the journal
        crashed.cancel_scope.cancel()
        store.move_gate.set()
    m1.close_journal()
    store.move_gate.clear()

    m2 = env.mount(store, commit_mode="async", remote_ttl=60)  # same cache dir
    m2.fs.resume_journal()
    await until(lambda: len(store.calls_of("move", key("00/shuffle_0_1_0.data"))) == 2)
    assert await resolve(m2.fs, f"{BM}/00/{DATA}") is None  # not there yet
    store.move_gate.set()
    await settle(m2)
    found = await resolve(m2.fs, f"{BM}/00/{DATA}")
    assert found is not None and await read_all(m2.fs, found.ino) == b"moved" * 3


async def test_a_move_resumed_after_a_crash_replaces_what_an_earlier_record_put_at_its_destination(env):
    """async: A (upload pending) and B (stored) are renamed over X in turn, and the daemon dies
    before the moves ran. The next daemon puts A back at X (its put, then the move A -> X); the
    move B -> X finds no B here (stored, not journaled), but replaces A at X all the same: X
    must read B's bytes, not A's local copy (tests/test_crash_storm.py, seed 17, 30 rounds)."""
    store = env.store()
    async with trio.open_nursery() as crashed:
        m1 = env.mount(store, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, BM)
        await commit(m1.fs, d, "shuffle_0_2_0.data", b"B" * 10)
        await settle(m1)
        store.gate.clear()  # A's upload hangs; the moves wait for it
        await commit(m1.fs, d, "shuffle_0_1_0.data", b"A" * 10)
        await until(lambda: store.calls_of("put_file", key("shuffle_0_1_0.data")))
        await m1.fs.rename(d, "shuffle_0_1_0.data", d, DATA)
        await m1.fs.rename(d, "shuffle_0_2_0.data", d, DATA)
        m1.remote._finish = lambda *_, **__: None  # SIGKILL: nothing more reaches the journal
        crashed.cancel_scope.cancel()
        store.gate.set()
    m1.close_journal()

    m2 = env.mount(store, commit_mode="async", remote_ttl=0.05)  # same cache dir
    m2.fs.resume_journal()
    await settle(m2)
    assert contents(store) == {key(DATA): b"B" * 10}
    await trio.sleep(0.06)
    found = await resolve(m2.fs, f"{BM}/{DATA}")
    assert found is not None and await read_all(m2.fs, found.ino) == b"B" * 10


class Processes:
    """Callers as /proc would tell them: executors by thread id (here: their pid), and which
    ones died."""

    def __init__(self, *executors: Executor):
        self.executors = {e.pid: e for e in executors}
        self.dead: set[Executor] = set()

    def executor_of(self, tid: int) -> Executor | None:
        executor = self.executors.get(tid)
        return None if executor is None or executor in self.dead else executor

    def alive(self, executor: Executor) -> bool:
        return executor not in self.dead


def node_with_registry(env, store, name: str, lease: float, *executors: Executor) -> Mount:
    """A mount of `store` as node `name`, whose views know `executors` and keep a registry in
    the store with leases of `lease` seconds."""
    return env.mount(
        store,
        name=name,
        views=lambda remote: Views(
            Processes(*executors), Registry(store, name, str(env.tmp_path / name), lease=lease), remote.call
        ),
    )


async def listing(fs: Filesystem, path: str, caller: int) -> list[str]:
    node = await resolve(fs, path) if path else fs.root
    fh = await fs.opendir(node.ino, caller=caller)
    try:
        return sorted(name for _, name, _ in fs.readdir(fh, 0, plus=False))
    finally:
        fs.releasedir(fh)


async def test_an_executor_lists_its_own_block_managers_and_adopts_only_dead_ones_of_its_application(env):
    """docs/RECOVERY.md, "Views": Spark's recovery plugin lists every blockmgr-* below its
    local dirs' parent and takes what it finds. An executor sees its own, and those of dead
    executors of its application, each adopted by the first one to list it; never a live
    executor's or another application's. Other callers see everything."""
    a1, a2, a3 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2, 3))
    b1 = Executor("app-B", "1", 201, 7)
    processes = Processes(a1, a2, a3, b1)
    m = env.mount(views=Views(processes))
    work = "spark-10000000-0000-4000-8000-000000000000"
    dirs = {}
    for executor, n in ((a1, 1), (a2, 2), (b1, 3)):
        parent = await mkdirs(m.fs, f"{work}/executor-{n}")
        name = f"blockmgr-{n}0000000-0000-4000-8000-000000000000"
        dirs[executor] = f"{work}/executor-{n}/{name}"
        bm = await m.fs.mkdir(parent, name, 0o755, UID, GID, caller=executor.pid)
        sub = await m.fs.mkdir(bm.ino, "00", 0o755, UID, GID, caller=executor.pid)
        for suffix in ("data", "index", "checksum.ADLER32"):
            await commit(m.fs, sub.ino, f"shuffle_0_{n}_0.{suffix}", b"x" * n)
    person = 999
    for caller, sees in ((a1, {a1}), (a2, {a2}), (b1, {b1}), (None, {a1, a2, b1})):
        tid = person if caller is None else caller.pid
        for executor, path in dirs.items():
            parent, name = path.rsplit("/", 1)
            assert (name in await listing(m.fs, parent, tid)) == (executor in sees), (caller, executor)
    assert await listing(m.fs, f"{dirs[a1]}/00", a1.pid) == sorted(
        f"shuffle_0_1_0.{suffix}" for suffix in ("data", "index", "checksum.ADLER32")
    )

    processes.dead.add(a2)
    a2_parent, a2_name = dirs[a2].rsplit("/", 1)
    assert a2_name not in await listing(m.fs, a2_parent, b1.pid)  # another application's
    assert a2_name in await listing(m.fs, a2_parent, a3.pid)  # adopted
    assert a2_name not in await listing(m.fs, a2_parent, a1.pid)  # its adopter lives
    assert a2_name in await listing(m.fs, a2_parent, a3.pid)
    assert a2_name in await listing(m.fs, a2_parent, person)
    # the plugin takes data and index files; checking a data file against its checksum file
    # would read it whole
    assert await listing(m.fs, f"{dirs[a2]}/00", a3.pid) == ["shuffle_0_2_0.data", "shuffle_0_2_0.index"]
    assert len(await listing(m.fs, f"{dirs[a2]}/00", person)) == 3

    # the adoption outlives a restart of the daemon, and ends with its adopter
    m.close_journal()
    m2 = env.mount(m.store, views=Views(processes))  # same cache dir
    m2.fs.resume_journal()
    assert a2_name not in await listing(m2.fs, a2_parent, a1.pid)
    assert a2_name in await listing(m2.fs, a2_parent, a3.pid)
    processes.dead.add(a3)
    assert a2_name in await listing(m2.fs, a2_parent, a1.pid)
    b1_parent, b1_name = dirs[b1].rsplit("/", 1)
    assert b1_name not in await listing(m2.fs, b1_parent, a1.pid)


async def test_what_the_recovery_plugin_leaves_of_an_adopted_directory_goes(env):
    """docs/RECOVERY.md, "Leftovers": the plugin moves an adopted directory's data and index
    files into its own and leaves their checksum files (hidden from it) and the emptied
    directories. Once a map output's data file is moved out, its checksum files go, wherever
    their names hashed them to; a directory emptied so goes, up to the adopted block
    manager's. A move out of a directory nobody adopted leaves its checksum files alone."""
    dead, adopter, live = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2, 3))
    processes = Processes(dead, adopter, live)
    m = env.mount(views=Views(processes))
    work = "spark-10000000-0000-4000-8000-000000000000/executor-1"
    parent = await mkdirs(m.fs, work)
    # Spark puts each file in the subdirectory its name hashes to
    layout = {"shuffle_0_{}_0.data": "00", "shuffle_0_{}_0.index": "0c", "shuffle_0_{}_0.checksum.ADLER32": "3f"}
    bms = {}
    for executor, n in ((dead, 1), (adopter, 2), (live, 3)):
        bms[executor] = f"blockmgr-{n}0000000-0000-4000-8000-000000000000"
        bm = (await m.fs.mkdir(parent, bms[executor], 0o755, UID, GID, caller=executor.pid)).ino
        for sub in sorted(set(layout.values())):
            sub_ino = (await m.fs.mkdir(bm, sub, 0o755, UID, GID, caller=executor.pid)).ino
            for map_id in (n, 10 + n) if executor is not adopter else ():
                for name in (pattern.format(map_id) for pattern, where in layout.items() if where == sub):
                    await commit(m.fs, sub_ino, name, name.encode())
    await settle(m)
    processes.dead.add(dead)
    assert bms[dead] in await listing(m.fs, work, adopter.pid)  # the plugin's scan adopts it
    for map_id in (1, 11):
        for pattern in ("shuffle_0_{}_0.data", "shuffle_0_{}_0.index"):  # as the plugin moves them
            name, sub = pattern.format(map_id), layout[pattern]
            await m.fs.rename(
                (await resolve(m.fs, f"{work}/{bms[dead]}/{sub}")).ino,
                name,
                (await resolve(m.fs, f"{work}/{bms[adopter]}/{sub}")).ino,
                name,
            )
        await settle(m)
        assert not any(f"shuffle_0_{map_id}_0." in key for key in contents(m.store) if bms[dead] in key)
    assert not {key for key in contents(m.store) if bms[dead] in key}
    assert bms[dead] not in await listing(m.fs, work, 999)
    for map_id in (1, 11):
        for pattern in ("shuffle_0_{}_0.data", "shuffle_0_{}_0.index"):
            name = pattern.format(map_id)
            node = await resolve(m.fs, f"{work}/{bms[adopter]}/{layout[pattern]}/{name}")
            assert await read_all(m.fs, node.ino) == name.encode()

    # a person moving a live executor's map output out of its directory
    await m.fs.rename(
        (await resolve(m.fs, f"{work}/{bms[live]}/00")).ino,
        "shuffle_0_3_0.data",
        (await resolve(m.fs, f"{work}/{bms[adopter]}/00")).ino,
        "shuffle_0_3_0.data",
    )
    await settle(m)
    assert f"{work}/{bms[live]}/3f/shuffle_0_3_0.checksum.ADLER32" in contents(m.store)


async def test_an_adoptions_renames_do_not_wait_for_the_store(env):
    """docs/RECOVERY.md, "Adoption is metadata only": Spark's recovery plugin renames an adopted
    directory's files one after the other inside a map task. Their bytes are in the store
    already, so in sync commit mode too such a rename returns once its move is journaled, and
    the new name reads the bytes while the move is on its way."""
    dead, adopter = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2))
    processes = Processes(dead, adopter)
    store = env.store()
    m = env.mount(store, views=Views(processes))
    work = "spark-10000000-0000-4000-8000-000000000000/executor-1"
    parent = await mkdirs(m.fs, work)
    names = {e: f"blockmgr-{n}0000000-0000-4000-8000-000000000000" for e, n in ((dead, 1), (adopter, 2))}
    subs = {
        e: (
            await m.fs.mkdir(
                (await m.fs.mkdir(parent, names[e], 0o755, UID, GID, caller=e.pid)).ino,
                "0c",
                0o755,
                UID,
                GID,
                caller=e.pid,
            )
        ).ino
        for e in (dead, adopter)
    }
    await commit(m.fs, subs[dead], "shuffle_0_1_0.data", b"map output")
    await settle(m)
    processes.dead.add(dead)
    assert names[dead] in await listing(m.fs, work, adopter.pid)
    store.move_gate.clear()
    with trio.fail_after(5):
        await m.fs.rename(subs[dead], "shuffle_0_1_0.data", subs[adopter], "shuffle_0_1_0.data")
    assert f"{work}/{names[dead]}/0c/shuffle_0_1_0.data" in contents(store)  # not moved yet
    node = await resolve(m.fs, f"{work}/{names[adopter]}/0c/shuffle_0_1_0.data")
    assert await read_all(m.fs, node.ino) == b"map output"  # while its move waits
    store.move_gate.set()
    await settle(m)
    assert contents(store) == {f"{work}/{names[adopter]}/0c/shuffle_0_1_0.data": b"map output"}


async def test_a_lost_nodes_block_managers_are_adopted_once_its_lease_ran_out_by_exactly_one_executor(env):
    """docs/RECOVERY.md: a block manager directory made on another mount is registered in the
    store with its node; an executor of the same application elsewhere may adopt it once that
    node's lease ran out (its daemon is gone), and of several claiming at once exactly one
    does (a conditional write). Another application's, or a live node's, are never shown."""
    store = env.store()
    a1, a2, a3, a4 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2, 3, 4))
    b2 = Executor("app-B", "1", 201, 7)
    lease = 0.5

    def node(name, *executors):
        return node_with_registry(env, store, name, lease, *executors)

    m1, m2, m3 = node("n1", a1), node("n2", a2, b2), node("n3", a3, a4)
    n1_alive = trio.CancelScope()

    async def n1_renews():
        with n1_alive:
            await m1.fs.views.keep_lease()

    env.nursery.start_soon(n1_renews)
    work = "spark-10000000-0000-4000-8000-000000000000/executor-1"
    parent = await mkdirs(m1.fs, work)
    names = [f"blockmgr-{n}0000000-0000-4000-8000-000000000000" for n in (1, 2)]
    for name in names:
        await m1.fs.mkdir(parent, name, 0o755, UID, GID, caller=a1.pid)
    assert not store.calls_of("put_file", ".shufflefs/nodes/n1")  # told only once a1 scans
    await listing(m1.fs, work, a1.pid)  # the plugin's scan, before a1's first map output
    for name in names:
        await commit(m1.fs, (await resolve(m1.fs, f"{work}/{name}")).ino, "shuffle_0_1_0.data", b"x")
    await settle(m1)

    async def sees(mount, executor) -> set[str]:
        return {n for n in await listing(mount.fs, work, executor.pid) if n.startswith("blockmgr-")}

    assert await sees(m2, a2) == set()  # node n1 lives
    assert await sees(m2, b2) == set()
    await trio.sleep(lease)
    assert await sees(m2, a2) == set()  # n1 renews its lease
    n1_alive.cancel()  # n1 is lost
    await trio.sleep(lease + 0.1)
    assert await sees(m2, b2) == set()  # another application's, ever
    claimed = {}
    async with trio.open_nursery() as nursery:  # two replacements, on two nodes, at once
        for mount, executor in ((m2, a2), (m3, a3)):

            async def claim(mount=mount, executor=executor):
                claimed[executor] = await sees(mount, executor)

            nursery.start_soon(claim)
    assert sorted(claimed[a2] | claimed[a3]) == names and not claimed[a2] & claimed[a3]
    assert await sees(m3, a4) == set()  # claimed by others
    assert await sees(m2, a2) == claimed[a2] and await sees(m3, a3) == claimed[a3]

    # the records are shufflefs' own: not in the namespace, and not a name to create
    assert ".shufflefs" not in await listing(m2.fs, "", 999)
    with pytest.raises(FsError) as refused:
        await m2.fs.mkdir(ROOT_INODE, ".shufflefs", 0o755, UID, GID)
    assert refused.value.errno == errno.EINVAL


async def test_while_the_store_is_unreachable_nothing_is_adopted_across_nodes_and_listings_work(env):
    """docs/RECOVERY.md, "What survives which failure", store unreachable: a lost node's
    directory is not adopted while the registry cannot be read (no claim can be made), the
    listing still answers, and nothing moves; once the store is back, it is adopted."""
    store = env.store()
    a1, a2 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2))
    lease = 0.3

    def node(name, *executors):
        return node_with_registry(env, store, name, lease, *executors)

    m1, m2 = node("n1", a1), node("n2", a2)
    work = "spark-10000000-0000-4000-8000-000000000000/executor-1"
    name = "blockmgr-10000000-0000-4000-8000-000000000000"
    bm = await m1.fs.mkdir(await mkdirs(m1.fs, work), name, 0o755, UID, GID, caller=a1.pid)
    await listing(m1.fs, work, a1.pid)  # the plugin's scan: told to other mounts
    await commit(m1.fs, bm.ino, "shuffle_0_1_0.data", b"x")
    await settle(m1)
    assert name not in await listing(m2.fs, work, a2.pid)  # n1's lease is fresh
    before = contents(store)
    await trio.sleep(lease + 0.1)  # n1 is lost: its lease ran out
    store.fail_next = 10**6
    assert name not in await listing(m2.fs, work, a2.pid)
    store.fail_next = 0
    assert contents(store) == before
    assert name in await listing(m2.fs, work, a2.pid)


async def test_a_restarted_daemon_keeps_its_executors_lease(env):
    """The daemon restarts (an update of the DaemonSet) while its executors live on: it renews
    the node's lease from its start, not only once a new executor comes, or executors elsewhere
    would adopt the live ones' outputs."""
    store = env.store()
    a1, a2 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2))
    lease = 0.6

    def node(name, *executors):
        return node_with_registry(env, store, name, lease, *executors)

    name = "blockmgr-10000000-0000-4000-8000-000000000000"
    m1 = node("n1", a1)
    parent = await mkdirs(m1.fs, "spark-10000000-0000-4000-8000-000000000000")
    bm = await m1.fs.mkdir(parent, name, 0o755, UID, GID, caller=a1.pid)
    await listing(m1.fs, "spark-10000000-0000-4000-8000-000000000000", a1.pid)  # the plugin's scan
    await commit(m1.fs, bm.ino, "shuffle_0_1_0.data", b"x")
    await settle(m1)
    m1.close_journal()
    restarted = node("n1", a1)  # same cache dir, same node
    restarted.fs.resume_journal()
    env.nursery.start_soon(restarted.fs.views.keep_lease)
    other = node("n2", a2)
    await trio.sleep(3 * lease)
    assert name not in await listing(other.fs, "spark-10000000-0000-4000-8000-000000000000", a2.pid)


async def test_a_dead_executor_of_a_live_node_is_adoptable_elsewhere_once_its_node_told(env):
    """An executor dies, its node lives on (its pod crashed; Spark starts the replacement on
    another node): the node's daemon tells the store at its next lease renewal, and an executor
    of the same application elsewhere adopts its directory; while it lived, never."""
    store = env.store()
    a1, a2 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2))
    processes = Processes(a1)
    lease = 0.6
    m1 = env.mount(store, name="n1")
    m1.fs.views = Views(processes, Registry(store, "n1", m1.staging.directory, lease=lease), m1.remote.call)
    m2 = env.mount(store, name="n2")
    m2.fs.views = Views(Processes(a2), Registry(store, "n2", m2.staging.directory, lease=lease), m2.remote.call)
    work = "spark-10000000-0000-4000-8000-000000000000"
    name = "blockmgr-10000000-0000-4000-8000-000000000000"
    bm = await m1.fs.mkdir(await mkdirs(m1.fs, work), name, 0o755, UID, GID, caller=a1.pid)
    await listing(m1.fs, work, a1.pid)  # the plugin's scan, before a1's first map output
    await commit(m1.fs, bm.ino, "shuffle_0_1_0.data", b"x")
    await settle(m1)
    env.nursery.start_soon(m1.fs.views.keep_lease)
    await trio.sleep(2 * lease)
    assert name not in await listing(m2.fs, work, a2.pid)  # alive, on a live node
    processes.dead.add(a1)
    await trio.sleep(lease)  # the next renewal tells
    assert name in await listing(m2.fs, work, a2.pid)


async def test_a_dead_executors_directory_adopted_on_its_node_is_not_adopted_elsewhere_too(env):
    """The replacement on the dead executor's own node adopts its directory: it claims it in
    the store as well, so an executor on another node, told of the death, does not take it too;
    if that adopter dies in turn, the next one on the node takes the claim over."""
    store = env.store()
    a1, a2, a3, a4 = (Executor("app-A", str(i), 100 + i, 7) for i in (1, 2, 3, 4))
    here = Processes(a1, a3, a4)
    lease = 0.6
    m1 = env.mount(store, name="n1")
    m1.fs.views = Views(here, Registry(store, "n1", m1.staging.directory, lease=lease), m1.remote.call)
    m2 = env.mount(store, name="n2")
    m2.fs.views = Views(Processes(a2), Registry(store, "n2", m2.staging.directory, lease=lease), m2.remote.call)
    env.nursery.start_soon(m1.fs.views.keep_lease)
    work = "spark-10000000-0000-4000-8000-000000000000"
    name = "blockmgr-10000000-0000-4000-8000-000000000000"
    bm = await m1.fs.mkdir(await mkdirs(m1.fs, work), name, 0o755, UID, GID, caller=a1.pid)
    await listing(m1.fs, work, a1.pid)  # the plugin's scan, before a1's first map output
    await commit(m1.fs, bm.ino, "shuffle_0_1_0.data", b"x")
    await settle(m1)
    here.dead.add(a1)
    assert name in await listing(m1.fs, work, a3.pid)  # adopted on its node
    await trio.sleep(lease)  # n1 has told the store that a1 died
    assert name not in await listing(m2.fs, work, a2.pid)
    here.dead.add(a3)
    assert name in await listing(m1.fs, work, a4.pid)  # taken over from a dead adopter
    assert name not in await listing(m2.fs, work, a2.pid)


async def test_owned_dirs_answer_locally(env):
    m = env.mount(remote_ttl=0.5)
    fs = m.fs
    lists = lambda: len(m.store.calls_of("list_dir"))  # noqa: E731

    assert await fs.lookup(ROOT_INODE, "blockmgr-10000000-0000-4000-8000-000000000000") is None
    assert lists() == 1
    bm = await fs.mkdir(ROOT_INODE, "blockmgr-10000000-0000-4000-8000-000000000000", 0o755, UID, GID)
    sub = await fs.mkdir(bm.ino, "0c", 0o755, UID, GID)
    # existence checks in an owned directory: answered here, negative answers included
    for i in range(100):
        assert await fs.lookup(bm.ino, f"{i:02x}-missing") is None
        assert await fs.lookup(sub.ino, f"shuffle_0_{i}_0.index") is None
    fh = await fs.opendir(sub.ino)
    assert fs.readdir_entries(fh)[1] == []
    fs.releasedir(fh)
    await fs.rmdir(bm.ino, "0c")
    # even an object another node put below it is not asked for
    env.plant(m.store, "blockmgr-10000000-0000-4000-8000-000000000000/zz", b"x")
    assert await fs.lookup(bm.ino, "zz") is None
    assert lists() == 1

    # the root is shared: misses go to the store, at most once per remote_ttl, even concurrently
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(fs.lookup, ROOT_INODE, f"missing-{i}")
    assert await fs.lookup(ROOT_INODE, "missing-x") is None
    assert lists() == 1
    await trio.sleep(0.55)
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(fs.lookup, ROOT_INODE, f"missing-{i}")
    assert lists() == 2
    assert (
        await fs.lookup(ROOT_INODE, "blockmgr-10000000-0000-4000-8000-000000000000") is bm
    )  # a known name asks nobody
    assert lists() == 2


@STORES
async def test_shared_namespace_between_two_filesystems(env, store_kind):
    store = env.store(store_kind)
    m1 = env.mount(store, name="node1")
    m2 = env.mount(store, name="node2", remote_ttl=0.05)
    path = "spark-1/executor-1/blockmgr-10000000-0000-4000-8000-000000000000/0c"
    d = await mkdirs(m1.fs, path)
    await mkdirs(
        m1.fs, "spark-1/executor-1/blockmgr-10000000-0000-4000-8000-000000000000/3f"
    )  # empty: not in the store
    index, data, checksum = index_bytes(50), os.urandom(300 * KiB), os.urandom(400)
    for name, blob in ((INDEX, index), (DATA, data), (CHECKSUM, checksum)):
        await commit(m1.fs, d, name, blob)
    await write_file(m1.fs, d, "temp_shuffle_1", b"local only")
    fh, _ = await create(m1.fs, d, "shuffle_0_9_0.data", APPEND)  # not committed yet
    await m1.fs.write(fh, 0, b"in progress")

    fs2 = m2.fs
    bucket = await resolve(fs2, path)
    assert bucket is not None and bucket.is_dir and not bucket.owned
    fh2 = await fs2.opendir(bucket.ino)
    listed = {name: node.size for name, node in fs2.readdir_entries(fh2)[1]}
    fs2.releasedir(fh2)
    assert listed == {INDEX: len(index), DATA: len(data), CHECKSUM: len(checksum)}
    assert await fs2.lookup(bucket.ino, "temp_shuffle_1") is None
    assert await fs2.lookup(bucket.ino, "shuffle_0_9_0.data") is None
    bm = await resolve(fs2, "spark-1/executor-1/blockmgr-10000000-0000-4000-8000-000000000000")
    fh2 = await fs2.opendir(bm.ino)
    assert [name for name, _ in fs2.readdir_entries(fh2)[1]] == ["0c"]
    fs2.releasedir(fh2)

    # the same bytes by the same path
    assert await read_all(fs2, (await fs2.lookup(bucket.ino, DATA)).ino) == data
    assert await read_all(fs2, (await fs2.lookup(bucket.ino, CHECKSUM)).ino) == checksum
    # the index: fetched once, then from this node's LMDB index cache
    index_node = await fs2.lookup(bucket.ino, INDEX)
    store.log.clear()
    for reduce_id in range(0, 50, 7):
        fh2 = await fs2.open(index_node.ino, os.O_RDONLY)
        assert await fs2.read(fh2, reduce_id * 8, 16) == index[reduce_id * 8 : reduce_id * 8 + 16]
        await fs2.release(fh2)
    assert store.calls_of("get_range", key(INDEX, path)) == [("get_range", key(INDEX, path), 0, len(index))]
    assert fs2.stats["index_fetches"] == 1 and fs2.stats["index_cache_hits"] == 7
    assert m2.journal.index_get(key(INDEX, path)) == index

    # the first node deletes: the second stops seeing the file with its next listing (a
    # readdir or a miss, once remote_ttl passed)
    await m1.fs.unlink(d, DATA)
    await m1.remote.drain()
    await trio.sleep(0.06)
    assert await fs2.lookup(bucket.ino, "shuffle_0_0_0.data") is None
    assert await fs2.lookup(bucket.ino, DATA) is None
    assert (await fs2.lookup(bucket.ino, INDEX)) is index_node
    await close(m1.fs, fh)


async def test_a_directory_two_mounts_create_is_shared(env):
    """Spark's fallback path `{appId}/{shuffleId}/{hash}` is created by every node that
    decommissions: a directory with a name anyone can pick is not this mount's alone, so a miss
    in it asks the store (and the kernel is not told to remember the miss)."""
    store = env.store("memory")
    m1 = env.mount(store, name="node1")
    m2 = env.mount(store, name="node2", remote_ttl=0.05)
    path = "fallback/app-1/0/17"
    d1, d2 = await mkdirs(m1.fs, path), await mkdirs(m2.fs, path)
    assert not m2.fs.node(d2).owned
    with pytest.raises(FsError) as exc:
        await m2.fs.lookup_entry(d2, DATA)
    assert errno_of(exc) == errno.ENOENT  # not Negative(OWNED_TTL): the kernel asks again
    await commit(m1.fs, d1, DATA, b"from node 1")
    await m1.remote.drain()
    await trio.sleep(0.06)
    found = await m2.fs.lookup(d2, DATA)
    assert found is not None and await read_all(m2.fs, found.ino) == b"from node 1"
    # below a name only one creator can pick, a mount still owns what it creates
    unique = await mkdirs(m2.fs, "spark-20000000-0000-4000-8000-000000000000/sub")
    assert m2.fs.node(unique).owned and isinstance(await m2.fs.lookup_entry(unique, DATA), Negative)

    # a shared directory holding another mount's file is not renamed (its keys would not follow)
    parent = await resolve(m2.fs, "fallback/app-1/0")
    with pytest.raises(FsError) as exc:
        await m2.fs.rename(parent.ino, "17", parent.ino, "18")
    assert errno_of(exc) == errno.EXDEV
    # one holding only what this mount wrote and has not committed is
    empty = await mkdirs(m2.fs, "fallback/app-1/0/19")
    await write_file(m2.fs, empty, "scratch", b"local")
    await m2.fs.rename(parent.ino, "19", parent.ino, "20")
    assert (await resolve(m2.fs, "fallback/app-1/0/20/scratch")) is not None
    # and an empty shared directory can be replaced, unless another mount filled it
    await mkdirs(m2.fs, "fallback/app-1/0/21")
    await m2.fs.rename(parent.ino, "20", parent.ino, "21")
    await mkdirs(m2.fs, "fallback/app-1/0/22")
    await commit(m1.fs, await mkdirs(m1.fs, "fallback/app-1/0/22"), INDEX, index_bytes(3))
    await m1.remote.drain()
    await trio.sleep(0.06)
    with pytest.raises(FsError) as exc:
        await m2.fs.rename(parent.ino, "21", parent.ino, "22")
    assert errno_of(exc) == errno.ENOTEMPTY


async def test_a_file_this_mount_stored_and_another_deleted_is_gone_at_the_next_listing(env):
    """Spark's fallback cleanUp removes every node's copies through one mount: on the others,
    the copies they wrote (and Hadoop's .crc beside them) must not stay behind, served from the
    local cache."""
    store = env.store("memory")
    m1 = env.mount(store, name="node1", remote_ttl=0.05)
    m2 = env.mount(store, name="node2", remote_ttl=0.05)
    path = "fallback/app-1/0/17"
    d2 = await mkdirs(m2.fs, path)
    await write_file(m2.fs, d2, f".{DATA}.crc", b"crc")
    await commit(m2.fs, d2, DATA, b"copy from node 2")
    await commit(m2.fs, d2, INDEX, index_bytes(3))
    await m2.remote.drain()
    assert await m2.fs.lookup(d2, "missing") is None  # a listing: both stored files are in it
    assert {DATA, INDEX, f".{DATA}.crc"} <= set(m2.fs.node(d2).children)

    d1 = (await resolve(m1.fs, path)).ino
    assert await m1.fs.lookup(d1, DATA) is not None
    await m1.fs.unlink(d1, DATA)
    await m1.remote.drain()
    await trio.sleep(0.06)
    assert await m2.fs.lookup(d2, DATA) is None
    assert await m2.fs.lookup(d2, f".{DATA}.crc") is None
    assert m2.fs.stats["remote_deletions"] == 1
    # the other file is still stored: kept
    assert await read_all(m2.fs, (await m2.fs.lookup(d2, INDEX)).ino) == index_bytes(3)

    # stored after the listing began: not taken for deleted
    listing_begun = trio.Event()
    release = trio.Event()
    real_list_dir = store.list_dir

    def slow_list_dir(prefix):
        listing = real_list_dir(prefix)
        trio.from_thread.run_sync(listing_begun.set)
        trio.from_thread.run(release.wait)
        return listing

    await trio.sleep(0.06)
    store.list_dir = slow_list_dir
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m2.fs.lookup, d2, "missing-2")
            await listing_begun.wait()
            # written under its durable name (no rename, which would wait for the listing)
            await write_file(m2.fs, d2, "shuffle_0_6_0.data", b"late")
            await m2.remote.drain()
            release.set()
    finally:
        del store.list_dir
    assert await read_all(m2.fs, (await m2.fs.lookup(d2, "shuffle_0_6_0.data")).ino) == b"late"


async def test_delete_batching(env):
    m = env.mount(commit_mode="async")
    m.remote.delete_batch = 50
    fs = m.fs
    d = await mkdirs(fs, BM)
    names = [f"shuffle_1_{i}_0.data" for i in range(120)]
    for i, name in enumerate(names):
        await commit(fs, d, name, str(i).encode() * 10)
    await m.remote.drain()
    assert len(contents(m.store)) == 120
    m.store.log.clear()

    for name in names:  # shuffle cleanup: one unlink after the other
        await fs.unlink(d, name)
    await settle(m)
    batches = [e[1] for e in m.store.calls_of("delete_many")]
    assert sorted(k for batch in batches for k in batch) == sorted(key(name) for name in names)
    assert len(batches) == 3 and max(map(len, batches)) == 50
    assert contents(m.store) == {} and m.remote.stats["deleted_keys"] == 120
    assert m.journal.pending_ops() == []

    # through the kernel, unlinks come one request at a time: they queue up behind the batch
    # whose request is in flight
    for i, name in enumerate(names[:40]):
        await commit(fs, d, name, str(i).encode())
    await settle(m)
    m.store.log.clear()
    m.store.delete_gate.clear()
    for name in names[:40]:
        await fs.unlink(d, name)
        await trio.sleep(0.001)
    m.store.delete_gate.set()
    await settle(m)
    assert [len(e[1]) for e in m.store.calls_of("delete_many")] == [1, 39]


async def test_rename_in_shared_directory_survives_listing(env):
    """A file of another node renamed in a directory this mount does not own: while the
    server-side move is on its way, a listing (which cannot show the new name yet) must not
    make the renamed file vanish."""
    store = env.store()
    m1 = env.mount(store, name="node1")
    m2 = env.mount(store, name="node2", commit_mode="async", remote_ttl=0.01)
    d = await mkdirs(m1.fs, "shared/0c")
    await commit(m1.fs, d, DATA, b"x" * 100)
    fs2 = m2.fs
    node = await resolve(fs2, "shared/0c/" + DATA)
    assert node.from_remote and node.committed
    bucket = node.parent
    store.move_gate.clear()
    await fs2.rename(bucket.ino, DATA, bucket.ino, "shuffle_0_6_0.data")
    await until(lambda: store.calls_of("move"))
    await trio.sleep(0.02)
    listings = len(store.calls_of("list_dir", "shared/0c"))
    assert await fs2.lookup(bucket.ino, "shuffle_0_0_0.data") is None  # a miss: lists again
    assert len(store.calls_of("list_dir", "shared/0c")) == listings + 1
    assert (await fs2.lookup(bucket.ino, "shuffle_0_6_0.data")) is node
    assert await fs2.lookup(bucket.ino, DATA) is None
    store.move_gate.set()
    await m2.remote.drain()
    assert contents(store) == {"shared/0c/shuffle_0_6_0.data": b"x" * 100}
    await trio.sleep(0.02)
    fh = await fs2.opendir(bucket.ino)
    assert [(name, n) for name, n in fs2.readdir_entries(fh)[1]] == [("shuffle_0_6_0.data", node)]
    fs2.releasedir(fh)
    assert await read_all(fs2, node.ino) == b"x" * 100


@MODES
async def test_drain_refuses_new_commits(env, mode):
    """Once draining for unmount, a rename or close that would commit fails with EROFS and
    changes nothing; everything else keeps working. In async mode close() returns before the
    commit (at RELEASE), so that commit is still taken: refusing it would lose the file."""
    m = env.mount(commit_mode=mode)
    fs = m.fs
    d = await mkdirs(fs, BM)
    old = await commit(fs, d, DATA, b"first")
    await settle(m)
    temp = f"{DATA}.{uuid.uuid4()}"
    new = await write_file(fs, d, temp, b"second", flags=APPEND)
    fh, direct = await create(fs, d, INDEX, NEW)
    await fs.write(fh, 0, index_bytes(2))
    fs.draining = True
    await m.remote.drain()
    m.store.log.clear()

    with pytest.raises(FsError) as exc:
        await fs.rename(d, temp, d, DATA)
    assert errno_of(exc) == errno.EROFS
    assert (await fs.lookup(d, temp)) is new and (await fs.lookup(d, DATA)) is old
    assert old.committed and old.linked and not new.committed
    if mode == "sync":
        with pytest.raises(FsError) as exc:
            await close(fs, fh)
        assert errno_of(exc) == errno.EROFS
        assert not direct.committed
    else:
        await fs.release(fh)  # async mode: the adapter answers FLUSH itself; RELEASE commits
        assert direct.committed
    # local work goes on
    await fs.rename(d, temp, d, "temp_shuffle_kept")
    await fs.unlink(d, "temp_shuffle_kept")
    await m.remote.drain()
    expected = {key(DATA): b"first"} if mode == "sync" else {key(DATA): b"first", key(INDEX): index_bytes(2)}
    assert contents(m.store) == expected
    assert [e for e in m.store.log if e[0] != "put_file"] == []


# -- found in review ------------------------------------------------------------------------------


async def test_rename_before_release_still_commits_synchronously(env):
    """The kernel sends RELEASE in the background: Spark's rename can arrive between FLUSH and
    RELEASE of the file it just closed. The sync rename must still commit."""
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    fh, _ = await create(fs, d, DATA + ".tmp", APPEND)
    await fs.write(fh, 0, b"payload")
    await fs.flush(fh)  # close(2) returned; RELEASE still queued
    await fs.rename(d, DATA + ".tmp", d, DATA)
    assert contents(m.store) == {key(DATA): b"payload"}
    await fs.release(fh)
    assert len(m.store.calls_of("put_file")) == 1


async def committed_while_the_store_fails(env, max_attempts: int) -> tuple[Mount, int]:
    """A mount (async commit) with DATA committed in BM and its upload failing for now."""
    m = env.mount(commit_mode="async", max_attempts=max_attempts)
    d = await mkdirs(m.fs, BM)
    m.store.fail_next = 10_000
    await commit(m.fs, d, DATA, b"x")
    return m, d


@pytest.mark.allow_logged_errors(r"could not be stored: injected failure")
async def test_sync_rename_of_committed_file_does_not_hang_on_a_failing_upload(env):
    m, d = await committed_while_the_store_fails(env, max_attempts=3)
    fs = m.fs
    fs.commit_mode = "sync"
    with trio.fail_after(5):
        with pytest.raises(FsError) as exc:
            await fs.rename(d, DATA, d, "shuffle_0_6_0.data")
    assert errno_of(exc) == errno.EIO
    assert (await fs.lookup(d, DATA)) is not None and await fs.lookup(d, "shuffle_0_6_0.data") is None
    m.store.fail_next = 0
    await settle(m)
    assert contents(m.store) == {key(DATA): b"x"}


@pytest.mark.allow_logged_errors(r"could not be stored: injected failure")
async def test_failed_sync_rename_changes_nothing(env):
    """A sync rename that fails with EIO (the store keeps failing) was not done: the kernel keeps
    the old names, so the mount must too. A commit over a committed file and a move of a
    committed file are undone, the replaced file comes back (its cancelled upload too), the
    store is left as it was, and Spark's retry works once the store is back."""
    m = env.mount(commit_mode="sync", max_attempts=3)
    fs = m.fs
    d = await mkdirs(fs, BM)
    old = await commit(fs, d, DATA, b"old")
    other = await commit(fs, d, "shuffle_0_7_0.data", b"other")
    temp = f"{DATA}.{uuid.uuid4()}"
    new = await write_file(fs, d, temp, b"new", flags=APPEND)
    m.store.fail_next = 10**9

    with pytest.raises(FsError) as exc:  # a commit replacing a committed file
        await fs.rename(d, temp, d, DATA)
    assert errno_of(exc) == errno.EIO
    assert (await fs.lookup(d, temp)) is new and (await fs.lookup(d, DATA)) is old
    assert old.committed and old.linked and not new.committed and new.linked
    for target in ("shuffle_0_6_0.data", "shuffle_0_7_0.data"):  # server-side moves
        with pytest.raises(FsError) as exc:
            await fs.rename(d, DATA, d, target)
        assert errno_of(exc) == errno.EIO
        assert (await fs.lookup(d, DATA)) is old
    assert await fs.lookup(d, "shuffle_0_6_0.data") is None
    assert (await fs.lookup(d, "shuffle_0_7_0.data")) is other and other.committed
    await settle(m)  # nothing is left to do remotely
    assert m.journal.pending_ops() == []
    assert contents(m.store) == {key(DATA): b"old", key("shuffle_0_7_0.data"): b"other"}

    m.store.fail_next = 0
    await fs.rename(d, temp, d, DATA)  # Spark's retry
    assert contents(m.store) == {key(DATA): b"new", key("shuffle_0_7_0.data"): b"other"}
    assert await read_all(fs, (await fs.lookup(d, DATA)).ino) == b"new"


@pytest.mark.allow_logged_errors(r"could not be stored: injected failure")
async def test_failed_sync_rename_brings_back_the_upload_of_the_file_it_replaced(env):
    m, d = await committed_while_the_store_fails(env, max_attempts=3)  # DATA = b"x", upload failing
    fs = m.fs
    fs.commit_mode = "sync"
    temp = f"{DATA}.{uuid.uuid4()}"
    new = await write_file(fs, d, temp, b"new", flags=APPEND)
    with pytest.raises(FsError) as exc:
        await fs.rename(d, temp, d, DATA)  # cancels DATA's upload, then fails
    assert errno_of(exc) == errno.EIO
    assert (await fs.lookup(d, temp)) is new and not new.committed
    assert (await fs.lookup(d, DATA)).committed
    m.store.fail_next = 0
    await settle(m)
    assert contents(m.store) == {key(DATA): b"x"} and m.journal.pending_ops() == []


async def test_failed_journal_write_leaves_the_file_uncommitted(env, monkeypatch):
    m = env.mount()
    fs = m.fs
    d = await mkdirs(fs, BM)
    node = await write_file(fs, d, INDEX + ".tmp", index_bytes(3))

    def full(record):
        raise OSError(errno.ENOSPC, "LMDB map full")

    monkeypatch.setattr(m.journal, "add_op", full)
    with pytest.raises(OSError):
        await fs.rename(d, INDEX + ".tmp", d, INDEX)
    assert not node.committed and node.staging.refs == 1
    assert m.journal.index_get(key(INDEX)) is None
    assert (await fs.lookup(d, INDEX + ".tmp")) is node and await fs.lookup(d, INDEX) is None
    monkeypatch.undo()
    fh = await fs.open(node.ino, os.O_WRONLY)  # still a local, writable file
    await close(fs, fh)


@pytest.mark.allow_logged_errors(
    r"giving up on 1 operation\(s\) while draining", r"could not be stored: injected failure"
)
async def test_dependents_of_a_given_up_upload_stay_in_the_journal(env):
    m, d = await committed_while_the_store_fails(env, max_attempts=2)
    await m.fs.rename(d, DATA, d, "shuffle_0_6_0.data")
    with trio.fail_after(10):
        given_up = await m.remote.drain()
    assert sorted(op.kind for op in given_up) == ["move", "put"]
    assert sorted(r["kind"] for _, r in m.journal.pending_ops()) == ["move", "put"]
    assert m.store.calls_of("move") == []  # the move never ran ahead of its put


async def test_rm_rf_of_a_tree_learned_from_the_store(env):
    store = env.store()
    for name in ("a/b/shuffle_0_1_0.data", "a/b/shuffle_0_1_0.index", "a/shuffle_0_2_0.data"):
        env.plant(store, name, b"data")
    m = env.mount(store, commit_mode="async")
    fs = m.fs
    a = await resolve(fs, "a")
    b = await resolve(fs, "a/b")
    for path in ("a/b/shuffle_0_1_0.data", "a/b/shuffle_0_1_0.index", "a/shuffle_0_2_0.data"):
        assert await resolve(fs, path) is not None  # the kernel looks names up before unlink
    store.delete_gate.clear()  # the store is slow to delete: every listing still shows the tree
    await fs.unlink(b.ino, "shuffle_0_1_0.data")
    await fs.unlink(b.ino, "shuffle_0_1_0.index")
    await fs.unlink(a.ino, "shuffle_0_2_0.data")
    a.listed_at = b.listed_at = float("-inf")
    await fs.rmdir(a.ino, "b")
    await fs.rmdir(ROOT_INODE, "a")
    fs.root.listed_at = float("-inf")
    assert await fs.lookup(ROOT_INODE, "a") is None  # no ghost from a listing of the old state
    store.delete_gate.set()
    await settle(m)
    assert contents(store) == {}


async def test_read_of_evicted_file_after_unlink_is_estale(env):
    m = env.mount(cache_size=1 * MiB)
    fs = m.fs
    d = await mkdirs(fs, BM)
    node = await commit(fs, d, DATA, b"A" * 600 * KiB)
    await write_file(fs, d, "temp_shuffle_x", bytes(600 * KiB))  # evicts it
    assert node.staging is None
    fh = await fs.open(node.ino, os.O_RDONLY)
    await fs.unlink(d, DATA)
    await commit(fs, d, DATA, b"B" * 100)
    with pytest.raises(FsError) as exc:
        await fs.read(fh, 0, 4096)
    assert errno_of(exc) == errno.ESTALE
    await fs.release(fh)


async def test_cache_dir_reached_by_another_path(env, tmp_path):
    """The journal names staging files relative to the cache dir: a symlink or a moved disk
    still finds them."""
    store = env.store()
    async with trio.open_nursery() as crashed:
        m1 = env.mount(store, name="real", commit_mode="async", nursery=crashed)
        d = await mkdirs(m1.fs, BM)
        store.fail_next = 10_000
        await commit(m1.fs, d, DATA, b"owed")
        crashed.cancel_scope.cancel()
    m1.close_journal()
    store.fail_next = 0
    os.symlink(tmp_path / "real", tmp_path / "link")
    async with trio.open_nursery() as nursery:
        m2 = env.mount(store, name="link", nursery=nursery)
        assert m2.fs.resume_journal() == 1
        await m2.remote.drain()
        nursery.cancel_scope.cancel()
    assert contents(store) == {key(DATA): b"owed"}


async def test_staging_housekeeping_in_a_worker_thread(tmp_path, nursery):
    area = StagingArea(str(tmp_path / "staging"), ready_files=4)
    nursery.start_soon(area.housekeep)

    async def until(condition) -> None:
        with trio.fail_after(10):
            while not condition():
                await trio.sleep(0.01)

    await until(lambda: len(area.free) == 4)  # prepared before anyone asked
    files = [area.new() for _ in range(6)]  # 4 prepared, 2 created on the spot
    assert len({os.stat(f.path).st_ino for f in files}) == 6
    for f in files:
        os.pwrite(f.fd, b"x" * 100, 0)
        f.resize(100)
    files[0].shared = True  # a store holds it: must be removed, not reused
    for f in files:
        f.unref()
    assert area.bytes == 0
    await until(lambda: len(os.listdir(area.directory)) == 5 == len(area.free))
    assert not os.path.exists(files[0].path)
    assert all(os.path.getsize(path) == 0 for path in area.free)


# -- copies (issue 13: a decommission's fallback copy) ------------------------------------------


async def fallback_copy(fs: Filesystem, source: Node, directory: str, data: bytes | None = None) -> Node:
    """What Spark's FallbackStorage does with Hadoop's copyFromLocalFile: read the committed file,
    write a file of the same name in another directory under that name (or other bytes)."""
    copied = await read_all(fs, source.ino)
    return await write_file(
        fs, await mkdirs(fs, directory), source.name, copied if data is None else data, chunk=64 * KiB
    )


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_a_copy_of_a_committed_file_is_copied_in_the_store(env, kind):
    """A durable file committed with the bytes of a committed file of the same name read just
    before is copied by the store (no bytes sent again); the source stays, and the two are
    independent afterwards."""
    store = env.store(kind)
    fs = env.mount(store).fs
    data = os.urandom(300 * KiB)
    source = await commit(
        fs, await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/0c"), "shuffle_3_7_0.data", data
    )
    await fallback_copy(fs, source, "fallback/app-1/3/123")
    assert store.calls_of("copy") == [
        (
            "copy",
            "blockmgr-10000000-0000-4000-8000-000000000000/0c/shuffle_3_7_0.data",
            "fallback/app-1/3/123/shuffle_3_7_0.data",
        )
    ]
    assert [call[1] for call in store.calls_of("put_file")] == [
        "blockmgr-10000000-0000-4000-8000-000000000000/0c/shuffle_3_7_0.data"
    ]
    assert fs.remote.stats["copy_requests"] == 1 and fs.remote.stats["copied_bytes"] == len(data)
    assert fs.remote.stats["put_bytes"] == len(data)
    await fs.unlink(source.parent.ino, source.name)
    await fs.remote.settle()
    assert contents(store) == {"fallback/app-1/3/123/shuffle_3_7_0.data": data}


async def test_a_copy_with_other_bytes_is_uploaded(env):
    """Same name and size, other bytes: an ordinary commit. And a copy whose source is gone
    from the store when its turn comes sends its own bytes."""
    store = env.store()
    fs = env.mount(store, commit_mode="async").fs
    data = os.urandom(64 * KiB)
    source = await commit(
        fs, await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/0c"), "shuffle_3_7_0.data", data
    )
    await fs.remote.settle()
    other = bytes(reversed(data))
    await fallback_copy(fs, source, "fallback/a", other)
    await fs.remote.settle()
    assert store.calls_of("copy") == [] and contents(store)["fallback/a/shuffle_3_7_0.data"] == other

    store.copy_gate.clear()
    await fallback_copy(fs, source, "fallback/b")
    while not store.calls_of("copy"):
        await trio.sleep(0.01)
    store.delete_many(
        ["blockmgr-10000000-0000-4000-8000-000000000000/0c/shuffle_3_7_0.data"]
    )  # gone behind the mount's back
    store.copy_gate.set()
    await fs.remote.settle()
    assert contents(store)["fallback/b/shuffle_3_7_0.data"] == data
    assert [call[1] for call in store.calls_of("put_file")][-1] == "fallback/b/shuffle_3_7_0.data"


@pytest.mark.allow_logged_errors(r"was written as a copy, past this daemon, but holds bytes of no file read lately")
async def test_a_predicted_copy_passes_through_and_is_committed_only_as_an_exact_copy(env):
    """A durable name opened for writing right after a committed file of that name was read is
    a predicted copy: its writes may pass the daemon by (FUSE passthrough), and since a failed
    one would go unseen, it is committed only if it holds exactly the bytes of that file."""
    store = env.store()
    fs = env.mount(store).fs
    fs.passthrough_possible = True  # as a root daemon on Linux >= 6.9
    data = os.urandom(200 * KiB)
    source = await commit(
        fs, await mkdirs(fs, "blockmgr-10000000-0000-4000-8000-000000000000/0c"), "shuffle_3_7_0.data", data
    )

    async def copy_past_the_daemon(directory: str, written: bytes) -> tuple[int, Node]:
        assert await read_all(fs, source.ino) == data
        fh, node = await create(fs, await mkdirs(fs, directory), source.name)
        assert fs.opened(fh).backing is node.staging  # passed through
        os.pwrite(node.staging.fd, written, 0)  # what the kernel writes to the backing file
        return fh, node

    fh, copied = await copy_past_the_daemon("fallback/a", data)
    await close(fs, fh)
    assert copied.committed
    assert store.calls_of("copy") == [("copy", key(source.name), "fallback/a/shuffle_3_7_0.data")]

    # a child process closing an inherited descriptor half-way (Hadoop forks `chmod` while it
    # copies): not a copy yet, and not the writer's close either; the writer's close commits
    fh, early = await copy_past_the_daemon("fallback/d", data[: 100 * KiB])
    await fs.flush(fh)
    assert not early.committed and not early.write_error
    os.pwrite(early.staging.fd, data[100 * KiB :], 100 * KiB)
    await close(fs, fh)
    assert early.committed and len(store.calls_of("copy")) == 2

    # a write that failed unseen: the bytes are not the source's, so nothing is committed
    fh, broken = await copy_past_the_daemon("fallback/b", data[: 100 * KiB])
    with pytest.raises(FsError) as exc:
        await close(fs, fh)  # the last RELEASE decides (its error is the kernel's, not close's)
    assert errno_of(exc) == errno.EIO
    assert not broken.committed and broken.write_error == errno.EIO
    assert "fallback/b/shuffle_3_7_0.data" not in contents(store)

    # no committed file of that name read lately: written through the daemon, as any durable name
    fh, node = await create(fs, await mkdirs(fs, "fallback/c"), "shuffle_3_8_0.data")
    assert fs.opened(fh).backing is None
    await close(fs, fh)
