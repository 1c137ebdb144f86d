"""The filesystem core: namespace, file states, commit, read path. No kernel needed.

Methods are called by a FUSE session (`shufflefs.fuse`) on the trio thread, and directly by
tests. They raise FsError(errno) for every refusal; StoreError escapes only from reads that
needed the store and failed (`errno_of` gives the errno a session answers with). The core also
decides what the kernel may cache and for how long, and hands that to the sessions as neutral
replies (`Entry`, `Negative`, `Opened`), which they only encode.

A run of code between two `await`s is atomic (one trio thread), so each handler validates
everything first, then mutates, and re-validates after any await.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import NoReturn

import trio

from shufflefs.callers import Executor
from shufflefs.journal import Journal
from shufflefs.naming import INDEX_CACHE_MAX, checksum_companion, is_durable, is_index, is_unique
from shufflefs.registry import RESERVED
from shufflefs.remote import Op, Remote, same_bytes
from shufflefs.staging import StagingArea, StagingFile
from shufflefs.stores import PreconditionFailed, Store, StoreError
from shufflefs.views import Views
from shufflefs.waits import about_to_wait

log = logging.getLogger(__name__)

ROOT_INODE = 1
READAHEAD = 4 * 1024 * 1024
NAME_MAX = 255
#: modes of what is learned from the store (files, directories, and the parents of files
#: resumed from the journal), which keeps no modes: the mount owner's, as private as Spark's
#: own: the owner (the executors' uid) reads and writes; the group only reads, as Spark's 0770
#: local dirs let an external shuffle service of the owner's group read; others nothing
LEARNED_DIR_MODE = 0o750
LEARNED_FILE_MODE = 0o640
#: how long a name removed from a directory this mount does not own stays hidden from store
#: listings (deletes are asynchronous, and SeaweedFS lists emptied prefixes for ~2 minutes)
TOMBSTONE_TTL = 180.0
# renameat2(2) flags, as the kernel passes them
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: `listed_at` of a directory never listed (one shared float, not one per inode)
NEVER = float("-inf")
#: seconds the kernel may keep entries and attributes of directories this mount owns: nothing
#: changes them behind its back
OWNED_TTL = 300.0
#: st_blksize: the I/O size programs are told to prefer
BLOCK_SIZE = 128 * 1024
#: a writable open passes through only while 1/PASSTHROUGH_HEADROOM of the cache budget is free
PASSTHROUGH_HEADROOM = 10
#: seconds between two counts of what passed-through writers wrote (see _may_pass_through)
WRITERS_SYNC_INTERVAL = 0.1
#: how many committed files read lately, and for how long, are remembered as possible sources
#: of a copy (Filesystem._read_lately)
RECENT_READS = 4096
RECENT_READ_SECONDS = 60.0
#: ... and how many of one name (the map outputs of several applications have the same names)
RECENT_READS_PER_NAME = 4


class FsError(Exception):
    def __init__(self, errno_: int, message: str = ""):
        super().__init__(message or os.strerror(errno_))
        self.errno = errno_


class Node:
    """An inode. A file has exactly one name (no hard links); a directory's children are its
    entries. `committed` files are durable: immutable, and their bytes live (or are on their
    way) at the store key of their path."""

    __slots__ = (
        "ino",
        "mode",
        "uid",
        "gid",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "parent",
        "name",
        "linked",
        "lookups",
        "children",
        "subdirs",
        "owned",
        "created_here",
        "listed_at",
        "size",
        "staging",
        "opens",
        "writers",
        "committed",
        "from_remote",
        "version",
        "stored_at",
        "write_error",
        "passthrough",
        "unseen_writes",
        "executor",
        "adopter",
        "registered",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: Node | None, name: str):
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.parent = parent
        self.name = name
        self.linked = True
        self.lookups = 0
        # directories
        self.children: dict[str, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.subdirs = 0  # how many of the children are directories (st_nlink)
        # its entries are all known here: created by this mount, and by nothing else (see
        # Filesystem.mkdir); misses are answered without asking the store
        self.owned = False
        self.created_here = False  # by a mkdir on this mount (another mount may have made it too)
        self.listed_at = NEVER
        # a block manager's directory made here by an executor, and the executor that adopted it
        # once that one died (see shufflefs.views)
        self.executor: Executor | None = None
        self.adopter: Executor | None = None
        self.registered = False  # told to every mount, through the store (shufflefs.registry)
        # files
        self.size = 0
        self.staging: StagingFile | None = None
        self.opens = 0
        self.writers = 0
        self.committed = False
        self.from_remote = False  # learned from a store listing, not created here
        self.version: str | None = None  # of the object a committed file's bytes are in the store
        # when this mount's upload of it to its current key finished (time.monotonic()): a
        # store listing begun later that lacks it means another mount deleted it
        self.stored_at: float | None = None
        # errno of a write that failed since the file was last empty: its bytes are not what
        # the program wrote, so it is never committed (see Filesystem._write_failed)
        self.write_error = 0
        # written under its durable name past this daemon (passed through as a predicted copy):
        # a failed write would be unseen, so it is committed only as an exact copy
        self.unseen_writes = False
        # the staging file its opens are passed through to (FUSE passthrough: they bypass this
        # daemon), decided at the first open and kept until the last close: the kernel allows
        # one mode, and one backing file, per open inode
        self.passthrough: StagingFile | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def nlink(self) -> int:
        if not self.linked:
            return 0
        return 2 + self.subdirs if self.children is not None else 1

    @property
    def st_size(self) -> int:
        return 4096 if self.children is not None else self.size


class Entry:
    """A name the kernel may cache for `entry_ttl` seconds, and its attributes for `attr_ttl`."""

    __slots__ = ("node", "entry_ttl", "attr_ttl")

    def __init__(self, node: Node, entry_ttl: float, attr_ttl: float):
        self.node = node
        self.entry_ttl = entry_ttl
        self.attr_ttl = attr_ttl


class Negative:
    """A name that does not exist, and the kernel may remember so for `ttl` seconds."""

    __slots__ = ("ttl",)

    def __init__(self, ttl: float):
        self.ttl = ttl


class Opened:
    """An opened file: its handle, whether the kernel may keep its pages from earlier opens,
    and the local file its reads and writes may go to directly (FUSE passthrough), if any."""

    __slots__ = ("fh", "keep_cache", "backing")

    def __init__(self, fh: int, keep_cache: bool, backing: StagingFile | None = None):
        self.fh = fh
        self.keep_cache = keep_cache
        self.backing = backing


def errno_of(exc: BaseException, request: str) -> int:
    """The errno a FUSE request that raised `exc` is answered with. FsError carries its own,
    a store failure its errno (EIO unless the store knows better), an OSError of the staging
    disk keeps its errno; anything else is a bug: logged with its traceback and answered with
    EIO, so that it fails one request instead of stopping the session (a dead mount)."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, StoreError):
        log.error("%s: store error: %s", request, exc)
        return exc.errno
    if isinstance(exc, OSError):
        log.error("%s: %s", request, exc)
        return exc.errno or errno.EIO
    log.error("internal error in %s", request, exc_info=exc)
    return errno.EIO


class Handle:
    """An open file. A writable handle counts in its node's `writers` until it is flushed
    (close(2)); the kernel may send RELEASE only after the next syscall, e.g. Spark's rename."""

    __slots__ = ("node", "writable", "flushed", "buf_off", "buf", "version")

    def __init__(self, node: Node, writable: bool):
        self.node = node
        self.writable = writable
        self.flushed = False
        self.buf_off = 0
        self.buf = b""
        #: the store version this handle reads: all its bytes come from that one object
        self.version = node.version


class Filesystem:
    def __init__(
        self,
        store: Store,
        remote: Remote,
        journal: Journal,
        staging: StagingArea,
        *,
        commit_mode: str = "sync",
        cache_size: int,
        remote_ttl: float = 1.0,
        owner: tuple[int, int] | None = None,
        views: Views | None = None,
        readahead: int = READAHEAD,
        owned_ttl: float = OWNED_TTL,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ):
        self.store = store
        #: bytes at least that a read of what only the store has fetches at once
        self.readahead = readahead
        #: seconds the kernel may keep entries and attributes of directories this mount owns
        self.owned_ttl = owned_ttl
        #: seconds a name removed from a directory this mount does not own stays hidden
        self.tombstone_ttl = tombstone_ttl
        #: what executors listing the shared local dir see (None: every caller sees it all)
        self.views = views
        self.remote = remote
        self.journal = journal
        self.staging = staging
        self.commit_mode = commit_mode
        self.cache_size = cache_size
        self.remote_ttl = remote_ttl
        self.draining = False
        #: set by a session that can pass opens through to staging files (FUSE passthrough)
        self.passthrough_possible = False
        self._writers_synced_at = NEVER
        self.stats: Counter[str] = Counter()
        # the owner of the root also owns what is learned from the store
        uid, gid = owner if owner is not None else (os.getuid(), os.getgid())
        root = Node(ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, None, "")
        root.lookups = 1
        self.root = root
        self.inodes: dict[int, Node] = {ROOT_INODE: root}
        self._next_ino = ROOT_INODE + 1
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, tuple[Node, list[tuple[str, Node]]]] = {}
        self._next_fh = 1
        # least recently used first: an entry is removed while its file is open and added again
        # at the end (a dict keeps insertion order, at half the memory of an OrderedDict)
        self.evictable: dict[int, Node] = {}
        self._listings: dict[int, trio.Event] = {}
        self._tombstones: OrderedDict[str, float] = OrderedDict()
        #: committed files opened for reading lately, by name (see _read_lately)
        self._recent_reads: OrderedDict[str, list[tuple[Node, float]]] = OrderedDict()
        self._put_owner: dict[Op, Node] = {}
        #: the longest path (bytes) a directory or durable file may have: its key must fit in
        #: LMDB (directories and the index cache are keyed by path) and in the store
        self.max_key_bytes = min(journal.max_key_size, store.max_key_bytes or journal.max_key_size)
        remote.on_put_done = self._put_done
        remote.on_failed = self._put_refused
        # what the kernel must forget: ("inode", ino) its attributes and pages of an inode,
        # ("entry", parent_ino, name) a directory entry. The FUSE adapter sends them once the
        # current request has been answered (sending one from the handler of a related request
        # can deadlock).
        self._invalidate, self.invalidations = trio.open_memory_channel(math.inf)

    # ------------------------------------------------------------------ helpers
    def key_of(self, node: Node) -> str:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def node(self, ino: int) -> Node:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def _new_node(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        node = Node(self._next_ino, mode, uid, gid, parent, name)
        self._next_ino += 1
        self.inodes[node.ino] = node
        parent.children[name] = node
        parent.subdirs += node.is_dir
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns
        return node

    @staticmethod
    def _check_length(name: str) -> None:
        if len(os.fsencode(name)) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)

    @classmethod
    def _check_name(cls, name: str) -> None:
        """A name a new entry may get on any filesystem."""
        if name in ("", ".", "..") or "/" in name:
            raise FsError(errno.EINVAL)
        cls._check_length(name)

    def _check_stored(self, parent: Node, name: str, below: int = 0) -> None:
        """Refuse, before anything changes, a directory or durable file called `name` in
        `parent` whose path the store or LMDB cannot hold: a name the store would reject, alias
        or hide (its `name_error`, EINVAL), or a path longer than max_key_bytes with `below`
        more bytes of the longest such path under it (ENAMETOOLONG)."""
        error = self.store.name_error(name)
        if error is not None:
            raise FsError(error, f"{self.store.url} cannot hold the name {name!r}")
        if parent is self.root and name == RESERVED:
            raise FsError(errno.EINVAL, f"{RESERVED} at the top of the store is shufflefs' own")
        parent_key = self.key_of(parent)
        length = (len(os.fsencode(parent_key)) + 1 if parent_key else 0) + len(os.fsencode(name)) + below
        if length > self.max_key_bytes:
            raise FsError(errno.ENAMETOOLONG, f"paths are limited to {self.max_key_bytes} bytes")

    def _stored_depth(self, directory: Node) -> int:
        """How many bytes ('/' and names) the longest path of a directory or durable file below
        `directory` adds to its path."""
        longest = 0
        for name, child in directory.children.items():
            if child.is_dir:
                longest = max(longest, 1 + len(os.fsencode(name)) + self._stored_depth(child))
            elif is_durable(name):
                longest = max(longest, 1 + len(os.fsencode(name)))
        return longest

    def _detach(self, node: Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            parent.subdirs -= node.is_dir
            parent.mtime_ns = parent.ctime_ns = time.time_ns()
        node.linked = False

    def _attach(self, parent: Node, name: str, node: Node) -> None:
        node.parent = parent
        node.name = name
        node.linked = True
        parent.children[name] = node
        parent.subdirs += node.is_dir
        node.ctime_ns = parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _bury(self, node: Node, key: str) -> None:
        """Remember that `key` left a directory whose listing comes from the store, so that a
        listing taken before the store caught up does not bring it back."""
        if node.parent is not None and not node.parent.owned:
            self._tombstones[key] = time.monotonic()
            self._tombstones.move_to_end(key)

    def _buried(self, key: str) -> bool:
        return key in self._tombstones

    def _maybe_free(self, node: Node) -> None:
        """Drop an unlinked inode once the kernel and all handles forgot it."""
        if node.linked or node.lookups > 0 or node.opens > 0:
            return
        self.inodes.pop(node.ino, None)
        self.evictable.pop(node.ino, None)
        if node.staging is not None:
            node.staging.unref()
            node.staging = None

    @property
    def commits_at_flush(self) -> bool:
        """Whether close(2) commits (and in sync mode reports a failed upload); otherwise the
        last RELEASE of a writer does."""
        return self.commit_mode == "sync"

    def is_owned_entry(self, node: Node) -> bool:
        """Whether the kernel may cache this entry for long: its directory is this mount's."""
        parent = node.parent
        return parent is not None and parent.owned

    def entry(self, node: Node) -> Entry:
        # a stale size in a reply would shrink the kernel's own size of a passed-through file
        ttl = self.attr_ttl(node)
        return Entry(self._current(node), ttl, ttl)

    def attr_ttl(self, node: Node) -> float:
        return self.owned_ttl if self.is_owned_entry(node) else self.remote_ttl

    # ------------------------------------------------------------------ remote view
    async def _refresh(self, directory: Node) -> None:
        """Merge the store's listing of a directory this mount does not own into its entries,
        at most once per remote_ttl. Local entries win over remote ones."""
        if time.monotonic() - directory.listed_at < self.remote_ttl:
            return
        in_flight = self._listings.get(directory.ino)
        if in_flight is not None:
            about_to_wait()
            await in_flight.wait()
            return
        in_flight = self._listings[directory.ino] = trio.Event()
        prefix = self.key_of(directory)
        started = time.monotonic()
        try:
            listing = await self.remote.call(self.store.list_dir, prefix, what=f"listing {prefix or '/'}")
        finally:
            del self._listings[directory.ino]
            in_flight.set()
        self.stats["remote_lists"] += 1
        if not directory.linked and directory is not self.root:
            return
        now = directory.listed_at = time.monotonic()
        while self._tombstones and now - next(iter(self._tombstones.values())) > self.tombstone_ttl:
            self._tombstones.popitem(last=False)
        seen = set(listing.dirs)
        for name in listing.dirs:
            if not prefix and name == RESERVED:
                continue  # shufflefs' own records (shufflefs.registry)
            if name not in directory.children and not self._buried(f"{prefix}/{name}" if prefix else name):
                child = self._new_node(directory, name, stat.S_IFDIR | LEARNED_DIR_MODE, self.root.uid, self.root.gid)
                child.from_remote = True
        for obj in listing.files:
            seen.add(obj.name)
            key = f"{prefix}/{obj.name}" if prefix else obj.name
            if self.remote.last_op(key) is not None or self._buried(key):
                continue  # what this mount did, or is doing, to that key wins
            child = directory.children.get(obj.name)
            if child is not None:
                if not (
                    child.from_remote and not child.is_dir and (obj.version, obj.size) != (child.version, child.size)
                ):
                    continue
                # another mount replaced the object: the new one is another inode, so that
                # nothing the kernel cached of the old one (pages, size) is taken for it
                log.info("%s changed in the store (another mount replaced it)", key)
                self.stats["remote_replacements"] += 1
                if is_index(obj.name):
                    self.journal.index_delete(key)
                self._detach(child)
                self._maybe_free(child)
            child = self._new_node(directory, obj.name, stat.S_IFREG | LEARNED_FILE_MODE, self.root.uid, self.root.gid)
            child.from_remote = child.committed = True
            child.size = obj.size
            child.version = obj.version
            child.atime_ns = child.mtime_ns = child.ctime_ns = obj.mtime_ns
        for name, child in list(directory.children.items()):
            key = f"{prefix}/{name}" if prefix else name
            # what this mount learned from the store, or stored there before the listing began
            known_stored = child.from_remote or (
                child.committed and child.stored_at is not None and child.stored_at < started
            )
            # a name this mount is still moving an object to is not listed yet, but it exists
            gone = known_stored and name not in seen and child.opens == 0 and self.remote.last_op(key) is None
            if gone and not (child.is_dir and child.children):
                if not child.from_remote:
                    log.info("%s was deleted from the store (by another mount)", key)
                    self.stats["remote_deletions"] += 1
                if is_index(name):
                    self.journal.index_delete(key)
                self._detach(child)
                self._maybe_free(child)
                companion = directory.children.get(checksum_companion(name))
                if companion is not None and not companion.committed and companion.opens == 0:
                    self._detach(companion)
                    self._maybe_free(companion)
        if any(
            op.kind == "move"
            and op.dst.rpartition("/")[0] == prefix
            and op.dst.rpartition("/")[2] not in directory.children
            for op in self.remote.pending
        ):
            # a move resumed after a crash, of a file this mount no longer holds (its upload
            # had finished), is on its way here: this listing cannot show its file; the next can
            directory.listed_at = NEVER

    # ------------------------------------------------------------------ lookups and attributes
    async def lookup(self, parent_ino: int, name: str) -> Node | None:
        """The entry, with its lookup count raised; None if it does not exist."""
        parent = self._dir(parent_ino)
        if name == ".":
            child = parent
        elif name == "..":
            child = parent.parent or parent
        else:
            self._check_length(name)
            child = parent.children.get(name)
            if not parent.owned and (
                child is None or (not child.is_dir and (child.from_remote or child.stored_at is not None))
            ):
                # a miss, or a stored file another mount may have replaced or deleted: look at
                # the store again (at most once per remote_ttl)
                try:
                    await self._refresh(parent)
                except StoreError as exc:
                    if child is None:
                        raise  # whether it exists is unknown
                    log.warning("%s: answering from what was listed before: %s", name, exc)
                child = parent.children.get(name)
        if child is None:
            return None
        child.lookups += 1
        return child

    async def lookup_entry(self, parent_ino: int, name: str) -> Entry | Negative:
        """LOOKUP: the entry; a miss in a directory this mount owns is remembered by the kernel
        (nothing else can add to it), a miss elsewhere is ENOENT (another mount may add it)."""
        node = await self.lookup(parent_ino, name)
        if node is not None:
            return self.entry(node)
        if self.node(parent_ino).owned:
            return Negative(self.owned_ttl)
        raise FsError(errno.ENOENT)

    def forget(self, ino: int, count: int) -> None:
        node = self.inodes.get(ino)
        if node is None or node is self.root:
            return
        node.lookups -= count
        self._maybe_free(node)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Node:
        node = self.node(ino)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            self._truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = time.time_ns()
        if node.is_dir and node is not self.root and (mode, uid, gid) != (None, None, None):
            self._record_dir(node)
        return node

    def _record_dir(self, node: Node) -> None:
        executors = {
            role: who.record()
            for role, who in (("executor", node.executor), ("adopter", node.adopter))
            if who is not None
        }
        if node.registered:
            executors["registered"] = True
        self.journal.dir_set(self.key_of(node), stat.S_IMODE(node.mode), node.uid, node.gid, **executors)

    def _truncate(self, node: Node, size: int) -> None:
        if node.committed:
            raise FsError(errno.EPERM, "committed shuffle files are immutable")
        if node.passthrough is not None:
            # its writes never reached this daemon: count what the staging file holds first,
            # or the budget would forget the bytes kept below `size`
            self._sync_passed_through(node)
        os.ftruncate(node.staging.fd, size)
        if node.opens == 0:
            node.staging.close_fd()  # truncate(2) by path: a closed file keeps no descriptor
        # the cache budget counts a file up to the end of the bytes written to it: extending
        # makes a hole, which takes no disk space until a write there is charged for it
        node.staging.resize(min(size, node.staging.size))
        node.size = size
        node.mtime_ns = node.ctime_ns = time.time_ns()
        if size == 0:
            node.write_error = 0  # rewritten from empty: no lost write is left in it
            if node.passthrough is None:
                node.unseen_writes = False

    def statfs(self) -> dict:
        block = 4096
        free = max(0, self.cache_size - self.staging.bytes)
        return {
            "f_bsize": block,
            "f_frsize": block,
            "f_blocks": self.cache_size // block,
            "f_bfree": free // block,
            "f_bavail": free // block,
            "f_files": 1 << 32,
            "f_ffree": (1 << 32) - len(self.inodes),
            "f_favail": (1 << 32) - len(self.inodes),
            "f_namemax": NAME_MAX,
        }

    # ------------------------------------------------------------------ namespace changes
    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int, caller: int = 0) -> Node:
        parent = self._dir(parent_ino)
        self._check_name(name)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        self._check_stored(parent, name)
        node = self._new_node(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        node.created_here = True
        # Another mount can create the same directory (Spark's fallback path
        # `{appId}/{shuffleId}/{hash}` on every node that decommissions): only a name no one else
        # can pick, or a directory inside one this mount owns, has no entries elsewhere.
        node.owned = parent.owned or is_unique(name)
        node.lookups += 1
        if self.views is not None:
            node.executor = self.views.creator(node, caller)
        self._record_dir(node)
        return node

    async def create(self, parent_ino: int, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Node]:
        parent = self._dir(parent_ino)
        self._check_name(name)
        existing = parent.children.get(name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            fh = await self.open(existing.ino, flags)
            existing.lookups += 1
            return fh, existing
        if is_durable(name):
            self._check_stored(parent, name)
        staging = self.staging.new()
        node = self._new_node(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        node.staging = staging
        node.lookups += 1
        return self._open_handle(node, flags), node

    @staticmethod
    def link(*_) -> NoReturn:
        raise FsError(errno.EPERM, "hard links are not supported")

    @staticmethod
    def symlink(*_) -> NoReturn:
        raise FsError(errno.EPERM, "symbolic links are not supported")

    @staticmethod
    def mknod(*_) -> NoReturn:
        raise FsError(errno.EPERM, "only regular files and directories are supported")

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent = self._dir(parent_ino)
        self._check_length(name)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        key = self.key_of(node)
        if node.committed:
            self._forget_remote(node, key)
        self._bury(node, key)
        self._detach(node)
        self._maybe_free(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent = self._dir(parent_ino)
        self._check_length(name)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if not node.owned:
            await self._refresh(node)
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        if parent.children.get(name) is not node:
            raise FsError(errno.ENOENT)  # removed by someone else while we listed
        self.journal.dir_remove(self.key_of(node))
        self._bury(node, self.key_of(node))
        self._detach(node)
        self._maybe_free(node)

    async def rename(
        self, old_parent_ino: int, old_name: str, new_parent_ino: int, new_name: str, flags: int = 0
    ) -> None:
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent = self._dir(old_parent_ino)
        new_parent = self._dir(new_parent_ino)
        self._check_length(old_name)
        self._check_name(new_name)
        node = old_parent.children.get(old_name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not new_parent.owned and new_name not in new_parent.children:
            await self._refresh(new_parent)
            if old_parent.children.get(old_name) is not node:
                raise FsError(errno.ENOENT)
        target = new_parent.children.get(new_name)
        if target is node:
            return
        # what another mount put in either directory decides what the rename may do
        for directory in (node, target):
            if directory is not None and directory.is_dir and not directory.owned:
                await self._refresh(directory)
        if old_parent.children.get(old_name) is not node or new_parent.children.get(new_name) is not target:
            raise FsError(errno.ENOENT)  # changed by someone else while we listed
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR)
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and target.children:
                raise FsError(errno.ENOTEMPTY)
        if node.is_dir:
            ancestor = new_parent
            while ancestor is not None:
                if ancestor is node:
                    raise FsError(errno.EINVAL)
                ancestor = ancestor.parent
            if self._holds_remote_data(node):
                raise FsError(errno.EXDEV, "directories holding committed files are not renamed")
            self._check_stored(new_parent, new_name, below=self._stored_depth(node))
        will_be_durable = not node.is_dir and is_durable(new_name)
        if will_be_durable:
            self._check_stored(new_parent, new_name)
        if will_be_durable and node.write_error:
            raise FsError(errno.EIO, "a write to this file failed; it cannot be committed")
        if node.committed and not will_be_durable and node.staging is None:
            raise FsError(errno.EXDEV, "an evicted committed file can only keep a durable name")
        commits = will_be_durable and not node.committed and node.writers == 0
        if commits and self.draining:  # refused before anything changed (_commit would be too late)
            raise FsError(errno.EROFS, "shufflefs is draining for unmount; no new commits")

        old_key = self.key_of(node)
        target_upload_cancelled = False
        replaced = target.version if target is not None and target.committed else None
        if target is not None:
            target_key = self.key_of(target)
            if target.committed:
                target_upload_cancelled = self._put_owner.get(self.remote.last_op(target_key)) is target
                # a put or move of `node` to the same key replaces the object: no delete needed
                self._forget_remote(
                    target, target_key, delete=not (will_be_durable and (node.committed or node.writers == 0))
                )
            self._bury(target, target_key)
            self._detach(target)
        self._bury(node, old_key)
        self._detach(node)
        self._attach(new_parent, new_name, node)
        node.stored_at = None  # not at the new key yet (a move), or never again (a local name)
        try:
            if node.is_dir:
                self.journal.dir_move(old_key, self.key_of(node))
                return
            new_key = self.key_of(node)
            if node.committed and will_be_durable:
                adopted, left_behind = (
                    self.views.left_behind(old_parent, old_name, new_parent) if self.views is not None else (None, [])
                )
                op = None
                try:
                    op = self.remote.move(old_key, new_key, version=node.version, replaces=replaced)
                    self.journal.index_move(old_key, new_key)
                    # Spark's recovery plugin renames an adopted directory's files one after the
                    # other in a map task: their bytes are in the store already and the journal
                    # keeps the move, so it is not waited for (reads of the name wait for it)
                    if self.commit_mode == "sync" and adopted is None:
                        await self._wait_stored(op)
                except Exception:
                    self._undo_rename(
                        node, old_parent, old_name, target, target_upload_cancelled, was_committed=True, move=op
                    )
                    raise
                if adopted is not None:
                    await self._remove_what_adoption_leaves(adopted, left_behind, old_parent)
            elif node.committed:
                self._uncommit(node, old_key, delete=True)
            elif commits:
                try:
                    await self._commit(node, replaces=replaced)
                except Exception:
                    self._undo_rename(node, old_parent, old_name, target, target_upload_cancelled, was_committed=False)
                    raise
        finally:
            if target is not None:
                self._maybe_free(target)  # only now: a failed commit or move brings it back

    async def _remove_what_adoption_leaves(
        self, adopted: Node, checksums: list[tuple[Node, str]], emptied: Node
    ) -> None:
        """Spark's recovery plugin moved a map output's file out of `emptied`, in a block manager
        directory `adopted` from a dead executor: the checksum files it leaves there, and the
        directories it empties, are of no use to anyone (docs/RECOVERY.md, "Leftovers"). A
        failure to remove them only leaves them."""
        try:
            for parent, name in checksums:
                await self.unlink(parent.ino, name)
            for directory in {emptied, *(parent for parent, _ in checksums)}:
                await self._remove_if_empty(directory, adopted)
        except (FsError, StoreError) as exc:
            log.info("left in %s after its adoption: %s", adopted.name, exc)

    async def _remove_if_empty(self, directory: Node, top: Node) -> None:
        """rmdir of `directory` and of its parents up to `top` while they are empty."""
        while not directory.children and directory.linked and directory.parent is not None:
            parent = directory.parent
            await self.rmdir(parent.ino, directory.name)
            if directory is top:
                return
            directory = parent

    def _undo_rename(
        self,
        node: Node,
        old_parent: Node,
        old_name: str,
        target: Node | None,
        target_upload_cancelled: bool,
        *,
        was_committed: bool,
        move: Op | None = None,
    ) -> None:
        """A rename whose commit or move failed (a sync one the store kept failing, or a journal
        write) changes nothing: the kernel did not rename either, and would otherwise keep
        showing the old name while this mount has the new one. The file goes back to its old
        name, a file it replaced comes back (with its upload, if the rename had cancelled it);
        Spark's retry renames new files over the final name again. The failed put or move is
        cancelled, so the store ends as it was: it has just settled after failing (or while it
        waited for a failing operation before it), so no attempt of it is in flight.
        `was_committed`: the rename moved a committed file, with `move` (None if journaling
        it failed); otherwise it committed the file, which is committed if its put was
        journaled."""
        new_parent, new_name, new_key = node.parent, node.name, self.key_of(node)
        if not (node.linked and new_parent.children.get(new_name) is node and old_name not in old_parent.children):
            # the kernel keeps both directories locked during a rename, so only a caller of the
            # core can get here; what it did to these names while the rename waited stands
            return
        self._detach(node)
        self._attach(old_parent, old_name, node)
        self._tombstones.pop(self.key_of(node), None)
        if was_committed:
            if move is not None:
                self.remote.cancel(move)
                self.journal.index_move(new_key, self.key_of(node))
        elif node.committed:
            self._uncommit(node, new_key, delete=False)
        if target is not None:  # after the cancel above: its re-issued upload must come last
            self._attach(new_parent, new_name, target)
            self._tombstones.pop(new_key, None)
            if target_upload_cancelled:
                self._put_owner[self.remote.put(new_key, target.staging)] = target

    def _uncommit(self, node: Node, key: str, delete: bool) -> None:
        """Make a committed file writable again (its pending upload is cancelled; with `delete`
        its object goes too, else the next commit replaces it)."""
        self._forget_remote(node, key, delete=delete)
        node.committed = False
        self.evictable.pop(node.ino, None)  # its bytes are the only copy again
        # stores may share the uploaded file (a file:// hard link): later writes go to a copy
        shared, node.staging = node.staging, self.staging.copy(node.staging)
        shared.unref()

    def _holds_remote_data(self, directory: Node) -> bool:
        """Whether a directory has, or may have, entries in the store (as last listed, for one
        another mount can add to)."""
        if not directory.created_here:
            return True
        return any(
            child.committed or child.from_remote or (child.is_dir and self._holds_remote_data(child))
            for child in directory.children.values()
        )

    # ------------------------------------------------------------------ commit
    async def _commit(
        self, node: Node, close_returned: bool = False, replaces: str | None = None, copied: Node | None = None
    ) -> None:
        """Make `node` durable at the key of its path, replacing the object there (`replaces`:
        its version; by default the one an early commit of this file stored, see `write`).
        While draining, commits are refused, except when the writer's close() already
        returned success (async mode commits at RELEASE, after it): refusing that one would
        lose the file. `copied`: the committed file it was found an exact copy of."""
        if self.draining and not close_returned:
            raise FsError(errno.EROFS, "shufflefs is draining for unmount; no new commits")
        if node.passthrough is not None:
            self._sync_passed_through(node)  # e.g. renamed after a FLUSH of an inherited copy
        copy_of, compared = self._copy_candidate(node), False
        if node.unseen_writes:
            source = copied or await self._copied_source(node)
            if source is None:
                node.write_error = errno.EIO
                log.error(
                    "%s was written as a copy, past this daemon, but holds bytes of no file "
                    "read lately: a write may have failed unseen, it is not committed",
                    self.key_of(node),
                )
                raise FsError(errno.EIO, "not an exact copy of the file it was predicted to copy")
            copy_of, compared = (self.key_of(source), source.version, source.staging), True
        key = self.key_of(node)
        cached_index = is_index(node.name) and node.size <= INDEX_CACHE_MAX
        try:
            if cached_index:
                self.journal.index_put(key, os.pread(node.staging.fd, node.size, 0))
            op = self.remote.put(
                key, node.staging, replaces=replaces or node.version, copy_of=copy_of, compared=compared
            )
        except BaseException:
            if cached_index:
                self.journal.index_delete(key)
            raise  # not committed: nothing was journaled, the caller gets the error
        finally:
            if node.opens == 0:
                # reopened for the index read only (a rename commits closed files): a cached
                # file must not hold a descriptor, or thousands of them run into EMFILE
                node.staging.close_fd()
        node.committed = True
        self._put_owner[op] = node
        self.stats["commits"] += 1
        if self.commit_mode == "sync":
            # bounded: a hung store must not hang the program; a move is not, see DESIGN.md
            await self._wait_stored(op, self.remote.request_timeout)
        else:
            await self.remote.wait_for_backlog(self.cache_size // 2)

    async def _wait_stored(self, op: Op, timeout: float = math.inf) -> None:
        try:
            await self.remote.wait(op, timeout)
        except StoreError as exc:
            log.error("%r could not be stored: %s", op, exc)
            raise FsError(exc.errno, str(exc)) from None

    def _forget_remote(self, node: Node, key: str, delete: bool = True) -> None:
        """`node` no longer holds `key`: stop its upload if still pending, drop it from the
        index cache, and remove the object."""
        op = self.remote.last_op(key)
        if op is not None and op.kind == "put" and self._put_owner.get(op) is node:
            self.remote.cancel(op)
            del self._put_owner[op]  # a cancelled put never reports back through _put_done
        self.journal.index_delete(key)
        if delete:
            self.remote.delete(key, version=node.version)
            node.version = None

    def _put_done(self, op: Op) -> None:
        node = self._put_owner.pop(op, None)
        if node is not None and node.staging is op.staging:
            node.version = op.version
            node.stored_at = time.monotonic()
            if node.opens == 0 and node.linked:
                self.evictable[node.ino] = node
                self._evict(0)

    def _put_refused(self, op: Op) -> None:
        """The store refused the upload for good: the file is local again (kept, never
        evicted, readable here; a later rename or close may commit it again)."""
        node = self._put_owner.pop(op, None)
        if node is not None and node.staging is op.staging and node.committed:
            node.committed = False
            self.journal.index_delete(op.key)
            self.evictable.pop(node.ino, None)

    def _make_room(self, needed: int) -> None:
        if not self._evict(needed):
            raise FsError(errno.ENOSPC, f"--cache-size {self.cache_size} is full")

    def _evict(self, needed: int) -> bool:
        """Drop local copies of uploaded files, least recently used first, until `needed` more
        bytes fit in the cache budget. Returns whether they fit."""
        if self.staging.bytes + needed <= self.cache_size:
            return True
        for node in list(self.evictable.values()):
            if self.staging.bytes + needed <= self.cache_size:
                break
            if self._can_evict(node):
                node.staging.unref()
                node.staging = None
                self.stats["evictions"] += 1
            elif node.linked and node.committed and node.staging is not None and node.opens == 0:
                continue  # only an operation on its key is pending: a candidate again later
            del self.evictable[node.ino]
        return self.staging.bytes + needed <= self.cache_size

    def _can_evict(self, node: Node) -> bool:
        return (
            node.linked
            and node.committed
            and node.opens == 0
            and node.staging is not None
            and self.remote.last_op(self.key_of(node)) is None
        )

    # ------------------------------------------------------------------ open files
    async def open(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        return self._open_handle(node, flags)

    def _open_handle(self, node: Node, flags: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            if node.committed:
                raise FsError(errno.EPERM, "committed shuffle files are immutable")
            if node.passthrough is not None and node.passthrough is not node.staging:
                # open, passed through to the copy a store shares; see _uncommit
                raise FsError(errno.EBUSY, "reopen for writing once its readers have closed it")
            if flags & os.O_TRUNC and (node.size or node.write_error):
                self._truncate(node, 0)
            node.writers += 1
        elif node.committed and node.staging is not None:
            self._read_lately(node)
        node.opens += 1
        self.evictable.pop(node.ino, None)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node, writable)
        return fh

    def _read_lately(self, node: Node) -> None:
        """Remember a committed file opened for reading, by name: a durable file of the same
        name committed soon after may be a copy of it (a decommission's fallback copy keeps the
        name, docs/RECOVERY.md), which the store can make without the bytes again."""
        now = time.monotonic()
        reads = [(other, at) for other, at in self._recent_reads.pop(node.name, ()) if other is not node]
        self._recent_reads[node.name] = [*reads[-(RECENT_READS_PER_NAME - 1) :], (node, now)]
        while len(self._recent_reads) > RECENT_READS or (
            now - next(iter(self._recent_reads.values()))[-1][1] > RECENT_READ_SECONDS
        ):
            self._recent_reads.popitem(last=False)

    def _copy_sources(self, node: Node, size: int | None) -> list[Node]:
        """Committed files read lately that `node` may be a copy of, the latest read first:
        same name, a local copy, and `size` bytes (any size with None)."""
        now = time.monotonic()
        return [
            source
            for source, read_at in reversed(self._recent_reads.get(node.name, ()))
            if source is not node
            and now - read_at <= RECENT_READ_SECONDS
            and source.linked
            and source.committed
            and source.staging is not None
            and size in (None, source.size)
        ]

    def _copy_candidate(self, node: Node) -> tuple[str, str | None, StagingFile] | None:
        """(key, version, local copy) of the committed file `node` is most likely a copy of
        (Remote.put compares the bytes before the store copies)."""
        sources = self._copy_sources(node, node.size) if node.size else []
        if not sources:
            return None
        return self.key_of(sources[0]), sources[0].version, sources[0].staging

    async def _copied_source(self, node: Node) -> Node | None:
        """The committed file read lately whose bytes `node` holds exactly, if any."""
        sources = self._copy_sources(node, node.size)
        if not sources:
            return None
        about_to_wait()
        copy, paths = node.staging.path, [(source, source.staging.path) for source in sources]
        return await trio.to_thread.run_sync(
            lambda: next((source for source, path in paths if same_bytes(copy, path)), None)
        )

    def opened(self, fh: int) -> Opened:
        """How the kernel is to serve an open file. Every open of an inode is served the same
        way until its last close: passed through to its staging file, or by this daemon."""
        handle = self.handles[fh]
        node = handle.node
        if node.opens == 1 and self._may_pass_through(node, handle.writable):
            node.passthrough = node.staging
            if handle.writable and is_durable(node.name):
                node.unseen_writes = True
        if node.passthrough is not None:
            return Opened(fh, keep_cache=False, backing=node.passthrough)
        # The kernel may keep a file's pages across opens: every byte of a local file is
        # written through this mount's page cache (truncation included), and committed files
        # never change (an object another mount replaces is another inode here). Otherwise
        # each open would read the file again.
        return Opened(fh, keep_cache=True)

    def _may_pass_through(self, node: Node, writable: bool) -> bool:
        """Whether the kernel may read and write the file's staging file directly: it has one,
        and nothing this daemon must see in each write is at stake. A durable name written
        directly (a shell's `>`, never Spark) stays daemon-served, so that a failed write is
        seen and the file is not committed (SEMANTICS "Write errors"); Spark writes temporary
        names and renames them after a successful close. The exception is a predicted copy
        (a decommission's fallback copy: a committed file of the same name was read lately),
        which is committed only if it holds exactly the bytes of such a file. The cache budget cannot refuse a
        passed-through write, so a writer passes through only while a tenth of the budget
        is free (after evicting uploaded copies); below that, writes are counted one by one
        and refused with ENOSPC once the budget is full. What the writers passed through so
        far have written is counted first (at most every WRITERS_SYNC_INTERVAL: an fstat
        each)."""
        if not self.passthrough_possible or node.staging is None or node.write_error:
            return False
        if not writable:
            return True
        if is_durable(node.name) and not self._copy_sources(node, None):
            return False
        now = time.monotonic()
        if now - self._writers_synced_at >= WRITERS_SYNC_INTERVAL:
            self._writers_synced_at = now
            for handle in self.handles.values():
                if handle.writable and handle.node.passthrough is not None:
                    self._sync_passed_through(handle.node)
        return self._evict(self.cache_size // PASSTHROUGH_HEADROOM)

    def passthrough_refused(self, fh: int) -> None:
        """The kernel would not take the staging file of `fh` (the session could not register
        it); the inode is served by this daemon until its last close."""
        self.handles[fh].node.passthrough = None

    def _sync_passed_through(self, node: Node) -> None:
        """Learn size and mtime of a passed-through file from its staging file: its writes
        never reach this daemon."""
        st = os.fstat(node.passthrough.fd)
        if st.st_size != node.size or st.st_mtime_ns > node.mtime_ns:
            node.size = st.st_size
            node.passthrough.resize(st.st_size)
            node.mtime_ns = node.ctime_ns = max(node.mtime_ns, st.st_mtime_ns)

    def _current(self, node: Node) -> Node:
        # whenever it is open: `writers` cannot tell whether a passed-through writer is done.
        # A FLUSH also comes when any copy of a descriptor is closed (a child process that
        # inherited it, as every process a JVM starts does), and the writes after it do not
        # come here to count the writer again; Java takes the position of an append channel
        # from the file's size
        if node.passthrough is not None:
            self._sync_passed_through(node)
        return node

    def getattr(self, ino: int) -> Node:
        return self._current(self.node(ino))

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        if node.staging is not None:
            return os.pread(node.staging.fd, size, offset)
        if offset >= node.size:
            return b""
        key = await self._settled_key(node)
        if handle.version != node.version:
            raise FsError(errno.ESTALE, f"{key} was replaced in the store since it was opened")
        if is_index(node.name) and node.size <= INDEX_CACHE_MAX:
            data = self.journal.index_get(key)
            if data is None:
                data = await self._get(handle, key, 0, node.size)
                self.stats["index_fetches"] += 1
                self.journal.index_put(key, data)
            else:
                self.stats["index_cache_hits"] += 1
            return data[offset : offset + size]
        end = min(offset + size, node.size)  # reads past EOF (the kernel's last page) need no more
        if not (handle.buf_off <= offset and end <= handle.buf_off + len(handle.buf)):
            length = min(max(size, self.readahead), node.size - offset)
            handle.buf = await self._get(handle, key, offset, length)
            handle.buf_off = offset
            self.stats["range_gets"] += 1
        start = offset - handle.buf_off
        return handle.buf[start : start + size]

    async def _get(self, handle: Handle, key: str, offset: int, length: int) -> bytes:
        """Bytes of the one object version the handle reads (ESTALE once it was replaced)."""
        try:
            return await self.remote.call(
                self.store.get_range, key, offset, length, what=f"reading {key}", expect=handle.version
            )
        except PreconditionFailed:
            if handle.node.parent is not None:
                handle.node.parent.listed_at -= self.remote_ttl  # the next lookup learns the new one
            raise FsError(errno.ESTALE, f"{key} was replaced in the store since it was opened") from None

    async def _settled_key(self, node: Node) -> str:
        """The key of an evicted or remote file once no operation on it is pending."""
        while True:
            if not node.linked:
                # its object went with its name; there is no local copy to read any more
                raise FsError(errno.ESTALE, "file removed after its local copy was evicted")
            key = self.key_of(node)
            op = self.remote.last_op(key)
            if op is None:
                return key
            about_to_wait()
            await op.finished.wait()

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        if not handle.writable:
            raise FsError(errno.EBADF)
        if node.committed:
            # a descriptor opened before the commit: the close() of a duplicate committed the
            # file early (a shell's `> file` dups the descriptor and closes the original). It
            # is written again, and committed again at its last close.
            self._uncommit(node, self.key_of(node), delete=False)
            self.stats["recommits"] += 1
        if handle.flushed:
            handle.flushed = False
            node.writers += 1
        end = offset + len(data)
        charged = node.staging.size  # bytes up to the end of what was written (see _truncate)
        try:
            if end > charged:
                self._make_room(end - charged)
            written = os.pwrite(node.staging.fd, data, offset)
        except (FsError, OSError) as exc:
            raise self._write_failed(node, exc.errno or errno.EIO) from None
        if end > charged:
            node.staging.resize(end)
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return written

    def _write_failed(self, node: Node, error: int) -> FsError:
        """A WRITE failed. With the kernel's writeback cache the program's write() succeeded
        long ago; the kernel reports the failure to one close() or fsync() at most, and keeps
        showing the bytes it could not write. So the file is marked: it is never committed, and
        every later close (FLUSH) of a writer and every fsync fails with `error`, until it is
        rewritten from empty. So that the mount shows what is held here, the kernel is told to
        drop its attributes and pages of the file, and its entry: with the writeback cache the
        kernel keeps its own size of a file for as long as it has the inode, and it lets go of
        an inode only once it has no entry and nobody has it open; the next lookup then gets
        the size from here."""
        if not node.write_error:
            node.write_error = error
            log.error(
                "a write to %s failed (%s): the file stays local and is never committed; "
                "close and fsync report the error until it is truncated to 0",
                self.key_of(node),
                os.strerror(error),
            )
            if node.linked and is_durable(node.name):
                # an early commit (see `write`) may have stored a beginning of it
                self.remote.delete(self.key_of(node), version=node.version)
                node.version = None
        self._invalidate.send_nowait(("inode", node.ino))
        if node.linked:
            self._invalidate.send_nowait(("entry", node.parent.ino, node.name))
        return FsError(error)

    async def flush(self, fh: int) -> None:
        """close(2) of a descriptor: commit a durable-named file now if this is its last writer,
        so a failed upload in sync mode reaches the caller of close()."""
        handle = self._handle(fh)
        node = handle.node
        if handle.writable and not handle.flushed:
            if node.passthrough is not None:
                self._sync_passed_through(node)
            copied = None
            if node.unseen_writes and node.writers == 1 and self._commit_due(node):
                copied = await self._copied_source(node)
                if copied is None:
                    # Not an exact copy (yet). A FLUSH also comes when a child process closes an
                    # inherited descriptor (Hadoop forks `chmod` while it copies) and this
                    # daemon sees none of the writes after it: the last RELEASE decides.
                    return
            handle.flushed = True
            node.writers -= 1
            if node.writers == 0 and self._commit_due(node):
                await self._commit(node, copied=copied)
        if handle.writable and node.write_error:
            raise FsError(node.write_error)

    def _commit_due(self, node: Node) -> bool:
        return node.linked and not node.committed and not node.write_error and is_durable(node.name)

    def uncommitted_writers(self) -> int:
        """Open writable handles of shuffle files not committed yet: each commits at its RELEASE,
        which the kernel sends after close() has returned (async mode)."""
        return sum(1 for handle in self.handles.values() if handle.writable and self._commit_due(handle.node))

    async def fsync(self, fh: int) -> None:
        node = self._handle(fh).node
        if node.write_error:
            raise FsError(node.write_error)
        if node.staging is not None:
            about_to_wait()
            await trio.to_thread.run_sync(os.fsync, node.staging.fd)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        if handle.writable and node.passthrough is not None:
            self._sync_passed_through(node)
        node.opens -= 1
        if node.opens == 0:
            node.passthrough = None
        if handle.writable and not handle.flushed:
            node.writers -= 1
        try:
            if handle.writable and node.writers == 0 and self._commit_due(node):
                await self._commit(node, close_returned=not self.commits_at_flush)
        finally:
            if node.opens == 0:
                if node.staging is not None:
                    node.staging.close_fd()
                if self._can_evict(node):
                    self.evictable[node.ino] = node
                self._maybe_free(node)

    # ------------------------------------------------------------------ directories
    async def opendir(self, ino: int, caller: int = 0) -> int:
        """A handle to list the directory with, as `caller` (the id of the thread asking; 0:
        unknown) may see it (see shufflefs.views)."""
        directory = self._dir(ino)
        if not directory.owned:
            try:
                await self._refresh(directory)
            except StoreError as exc:
                if directory.listed_at == NEVER:
                    raise  # never listed: nothing to answer with
                log.warning("listing %s from what was listed before: %s", self.key_of(directory) or "/", exc)
        entries = list(directory.children.items())
        if self.views is not None:
            entries, changed = await self.views.entries(directory, entries, caller, self.key_of)
            for node in changed:
                self._record_dir(node)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = (directory, entries)
        return fh

    def readdir_entries(self, fh: int) -> tuple[Node, list[tuple[str, Node]]]:
        """The directory and the entries it had at opendir (stable offsets for readdir)."""
        try:
            return self.dir_handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def readdir(self, fh: int, offset: int, plus: bool) -> Iterator[tuple[int, str, Entry]]:
        """(offset of the next entry, name, entry) from `offset` on, of the entries still there.
        With `plus` (READDIRPLUS) the kernel looks each entry up: its lookup count is raised
        once the session asks for the next one, i.e. once this one went into the reply."""
        directory, entries = self.readdir_entries(fh)
        for index in range(offset, len(entries)):
            name, node = entries[index]
            if directory.children.get(name) is not node:
                continue  # removed or renamed since opendir
            yield index + 1, name, self.entry(node)
            if plus:
                node.lookups += 1

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # ------------------------------------------------------------------ start-up and shutdown
    def resume_journal(self) -> int:
        """Re-issue the remote operations an earlier run left pending, and put the files they
        concern back into the namespace. Returns how many were resumed."""
        for key, record in self.journal.dirs():
            # not owned: whatever the store holds below it is merged in, as for any directory
            # learned from the store
            node = self._materialize_dir(key)
            node.mode, node.uid, node.gid = stat.S_IFDIR | record["mode"], record["uid"], record["gid"]
            node.executor, node.adopter = (
                Executor.from_record(record[role]) if role in record else None for role in ("executor", "adopter")
            )
            node.registered = record.get("registered", False)
            if node.executor is not None and self.views is not None:
                self.views.resumed(node, key)
        keep = set()
        ops = self.journal.pending_ops()
        for seq, record in ops:
            kind, key = record["kind"], record["key"]
            if kind == "put":
                try:
                    staging = self.staging.adopt(record["path"])
                except FileNotFoundError:
                    log.error(
                        "staging file %s of pending upload %s is gone; that file is lost",
                        self.staging.path_of(record["path"]),
                        key,
                    )
                    self.journal.remove_op(seq)
                    continue
                keep.add(staging.path)
                node = self._materialize(key)
                node.staging = staging
                node.size = staging.size
                node.committed = True
                self._put_owner[self.remote.resume(seq, record, staging)] = node
            elif kind in ("sweep", "discard"):  # the debris of a put; no file of the namespace
                self.remote.resume(seq, record, None)
            else:
                self.remote.resume(seq, record, None)
                node = self._find(key)
                if kind == "move":
                    dst_dir, _, dst_name = record["dst"].rpartition("/")
                    dst_dir = self._materialize_dir(dst_dir)
                    replaced = dst_dir.children.get(dst_name)
                    if replaced is not None and replaced is not node:
                        # an earlier record's file: the move replaces its object. Whatever is
                        # there once the move is done is learned from the store (the source's
                        # upload may have finished before the crash: nothing else has its bytes)
                        self._detach(replaced)
                        self._maybe_free(replaced)
                    if node is not None:
                        self._detach(node)
                        self._attach(dst_dir, dst_name, node)
                elif node is not None:
                    self._detach(node)
                    self._maybe_free(node)
        # the index cache is rebuilt on demand; entries of files this run does not know are stale
        pending_keys = {r["dst"] if r["kind"] == "move" else r["key"] for _, r in ops}
        self.journal.index_retain(pending_keys)
        removed = self.staging.remove_unreferenced(keep)
        if removed:
            # local copies of files already in the store, and scratch files, not data owed to it
            log.info(
                "cleared %d local files of an earlier run (scratch files and copies of what the store "
                "already holds; nothing was waiting for upload)",
                removed,
            )
        return len(ops)

    def _find(self, key: str) -> Node | None:
        node = self.root
        for part in key.split("/"):
            node = node.children.get(part) if node.is_dir else None
            if node is None:
                return None
        return node

    def _materialize_dir(self, key: str) -> Node:
        node = self.root
        for part in filter(None, key.split("/")):
            child = node.children.get(part)
            if child is None:
                child = self._new_node(node, part, stat.S_IFDIR | LEARNED_DIR_MODE, self.root.uid, self.root.gid)
            node = child
        return node

    def _materialize(self, key: str) -> Node:
        parent_key, _, name = key.rpartition("/")
        parent = self._materialize_dir(parent_key)
        existing = parent.children.get(name)
        if existing is not None:
            self._detach(existing)
            self._maybe_free(existing)
        return self._new_node(parent, name, stat.S_IFREG | LEARNED_FILE_MODE, self.root.uid, self.root.gid)
