"""The filesystem core as the daemon builds it, without a kernel, for tests and benchmarks: stores
that record what was asked of them (and can hold a request at a gate), one core per simulated
node (`Env.mount`), and the helpers that play the kernel's part (a lookup before mkdir, flush
then release on close(2), forget once the kernel drops an inode) and a program's (Spark's
commit by rename)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import trio

from shufflefs.assembly import Tunables, assemble
from shufflefs.core import ROOT_INODE, Filesystem, Node
from shufflefs.journal import Journal
from shufflefs.remote import Remote
from shufflefs.staging import StagingArea
from shufflefs.stores.memory import MemoryStore
from shufflefs.testing.stores import RecordingFileStore, RecordingMemoryStore
from shufflefs.views import Views

KiB = 1024
MiB = 1024 * KiB
UID, GID = os.getuid(), os.getgid()
NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC  # how Spark creates .index, .checksum, rdd_*, spills
APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # how Spark creates .data and temp files


# -- stores that record what was asked of them -------------------------------------------------


class Mount:
    def __init__(
        self,
        store,
        cache_dir: str,
        nursery: trio.Nursery,
        tunables: Tunables,
        views: Callable[[Remote], Views] | None = None,
    ):
        os.makedirs(cache_dir, exist_ok=True)
        self.store = store
        self.cache_dir = cache_dir
        self.journal = Journal(os.path.join(cache_dir, "lmdb"))
        self.staging = StagingArea(os.path.join(cache_dir, "staging"))
        self.fs = assemble(store, self.journal, self.staging, tunables, views)
        self.remote = self.fs.remote
        self.remote.start(nursery)
        self.closed = False

    def staging_paths(self) -> set[str]:
        """Staging files in use (not the empty ones kept for reuse)."""
        return {entry.path for entry in os.scandir(self.staging.directory)} - set(self.staging.free)

    def close_journal(self) -> None:
        if not self.closed:
            self.closed = True
            self.journal.close()


class Env:
    def __init__(self, tmp_path, nursery: trio.Nursery):
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.stores: list = []
        self.mounts: list[Mount] = []

    def store(self, kind: str = "memory"):
        store = RecordingMemoryStore() if kind == "memory" else RecordingFileStore(str(self.tmp_path / "store"))
        self.stores.append(store)
        return store

    def plant(self, store, key: str, data: bytes) -> None:
        """An object another node committed."""
        path = self.tmp_path / f"planted-{uuid.uuid4()}"
        path.write_bytes(data)
        store.put_file(key, str(path))

    def mount(
        self,
        store=None,
        *,
        name: str = "node1",
        nursery: trio.Nursery | None = None,
        commit_mode: str = "sync",
        cache_size: int = 64 * MiB,
        remote_ttl: float = 1.0,
        max_attempts: int = 3,
        workers: int = 8,
        views: Views | Callable[[Remote], Views] | None = None,
    ) -> Mount:
        """A core over `store` (a new recording memory store by default) as node `name`;
        `views`: what its executors see, or how to make it from the mount's Remote."""
        if store is None:
            store = self.store()
        # the retry schedule's shape is what matters in tests, not its pace
        tunables = Tunables(
            commit=commit_mode,
            cache_size=cache_size,
            listing_ttl=remote_ttl,
            max_attempts=max_attempts,
            upload_workers=workers,
            backoff_first=0.005,
        )
        make_views = (lambda _remote: views) if isinstance(views, Views) else views
        mount = Mount(store, str(self.tmp_path / name), nursery or self.nursery, tunables, make_views)
        self.mounts.append(mount)
        return mount

    def release(self) -> None:
        """Let no worker thread hang on a closed gate, a hung listing or an armed failure."""
        for store in self.stores:
            store.gate.set()
            store.move_gate.set()
            store.copy_gate.set()
            store.delete_gate.set()
            store.hang_listings.clear()
            if isinstance(store, MemoryStore):
                store.fail_next = 0

    def close(self) -> None:
        for mount in self.mounts:
            mount.close_journal()


# -- what the kernel and a program would do ----------------------------------------------------


async def create(fs: Filesystem, parent: int, name: str, flags: int = NEW) -> tuple[int, Node]:
    return await fs.create(parent, name, 0o644, flags, UID, GID)


async def close(fs: Filesystem, fh: int) -> None:
    """close(2) of the last descriptor: flush, and release even when flush failed."""
    try:
        await fs.flush(fh)
    finally:
        await fs.release(fh)


async def write_file(
    fs: Filesystem, parent: int, name: str, data: bytes, *, flags: int = NEW, chunk: int = 256 * KiB
) -> Node:
    fh, node = await create(fs, parent, name, flags)
    try:
        for offset in range(0, len(data), chunk):
            assert await fs.write(fh, offset, data[offset : offset + chunk]) == len(data[offset : offset + chunk])
    finally:
        await close(fs, fh)
    return node


async def read_all(fs: Filesystem, ino: int, chunk: int = 128 * KiB) -> bytes:
    fh = await fs.open(ino, os.O_RDONLY)
    try:
        parts, offset = [], 0
        while data := await fs.read(fh, offset, chunk):
            parts.append(data)
            offset += len(data)
        return b"".join(parts)
    finally:
        await fs.release(fh)


async def mkdirs(fs: Filesystem, path: str) -> int:
    """mkdir -p: look each component up first, as the kernel does before mkdir."""
    ino = ROOT_INODE
    for part in path.split("/"):
        node = await fs.lookup(ino, part)
        if node is None:
            node = await fs.mkdir(ino, part, 0o755, UID, GID)
        ino = node.ino
    return ino


async def resolve(fs: Filesystem, path: str) -> Node | None:
    node = fs.root
    for part in path.split("/"):
        node = await fs.lookup(node.ino, part)
        if node is None:
            return None
    return node


async def commit(fs: Filesystem, parent: int, name: str, data: bytes) -> Node:
    """Spark's commit: write `<name>.<uuid>`, close it, rename it to `name`."""
    temp = f"{name}.{uuid.uuid4()}"
    node = await write_file(fs, parent, temp, data, flags=APPEND)
    await fs.rename(parent, temp, parent, name)
    return node


def forget(fs: Filesystem, node: Node) -> None:
    """The kernel drops its references to the inode."""
    fs.forget(node.ino, node.lookups)


async def until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.002)


async def settle(mount: Mount) -> None:
    """Wait (without draining) until no remote operation is pending."""
    await until(lambda: not mount.remote.pending)


def open_staging_fds(m: Mount) -> set[str]:
    """Paths in the staging area this process holds a descriptor of."""
    result = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(m.staging.directory + "/"):
            result.add(target)
    return result


def errno_of(excinfo) -> int:
    return excinfo.value.errno


def index_bytes(partitions: int, seed: int = 0) -> bytes:
    """A Spark .index: (R+1) big-endian int64 offsets."""
    offsets, total = [0], 0
    for i in range(partitions):
        total += 100 + (i * 7 + seed) % 50
        offsets.append(total)
    return b"".join(o.to_bytes(8, "big") for o in offsets)


BM = "blockmgr-10000000-0000-4000-8000-000000000000/0c"
DATA, INDEX, CHECKSUM = "shuffle_0_5_0.data", "shuffle_0_5_0.index", "shuffle_0_5_0.checksum.ADLER32"


def key(name: str, directory: str = BM) -> str:
    return f"{directory}/{name}"


def invariant_problems(fs: Filesystem) -> list[str]:
    """What is wrong with the core's bookkeeping, checked after every core test: the staging
    byte count (what --cache-size bounds) is the sum of the sizes of the staging files that
    inodes and store operations hold; only committed files nobody has open are evictable; no
    handle points at a freed inode."""
    problems = []
    held = {id(node.staging): node.staging for node in fs.inodes.values() if node.staging is not None}
    for op in [*fs.remote.pending, *fs.remote.given_up, *fs.remote.failed, *fs.remote.sweeps]:
        for staging in (op.staging, op.source_staging):
            if staging is not None and staging.refs > 0:
                held[id(staging)] = staging
    counted = sum(staging.size for staging in held.values())
    if fs.staging.bytes != counted:
        problems.append(f"the staging area counts {fs.staging.bytes} bytes, its live files hold {counted}")
    for ino, node in fs.evictable.items():
        if node.opens or not node.committed or node.ino != ino:
            problems.append(f"inode {ino} ({node.name}) is evictable but open ({node.opens}) or not committed")
    for fh, handle in fs.handles.items():
        if fs.inodes.get(handle.node.ino) is not handle.node:
            problems.append(f"handle {fh} points at freed inode {handle.node.ino} ({handle.node.name})")
    for fh, (directory, _entries) in fs.dir_handles.items():
        if fs.inodes.get(directory.ino) is not directory:
            problems.append(f"directory handle {fh} points at freed inode {directory.ino} ({directory.name})")
    return problems
