"""Our own FUSE session (`--fuse own`): /dev/fuse read and written directly on the trio loop.

One task at a time reads requests, draining the descriptor until EAGAIN, and answers each
inline: decoding, the core's handler and encoding, with no task or thread per request. A
handler about to wait (`shufflefs.waits`) makes this task hand reading to a new task and carry
on with its request alone; its reply goes out when it is done, out of order (the kernel matches
replies by `unique`). Policy is the core's; this module decodes, calls, encodes. DESIGN.md
"Our FUSE session" has the rules; docs/FUSE_SESSION.md the reasoning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import NoReturn

import trio

from shufflefs.core import BLOCK_SIZE, Entry, Filesystem, FsError, Negative, Node, errno_of
from shufflefs.fuse import mount as fuse_mount
from shufflefs.fuse import protocol as p
from shufflefs.fuse.notify import forward_invalidations
from shufflefs.fuse.timing import RequestTimes
from shufflefs.waits import on_wait

log = logging.getLogger(__name__)

#: the largest WRITE (and READ) the kernel sends: 256 pages, as libfuse asks for
MAX_WRITE = 1 << 20
#: what the session asks for in INIT; the kernel grants what it supports. Then either
#: passthrough or, where the kernel or our privileges do not allow it, the writeback cache:
#: the kernel refuses the two together
WANTED = (
    p.ASYNC_READ
    | p.ATOMIC_O_TRUNC
    | p.BIG_WRITES
    | p.EXPORT_SUPPORT
    | p.AUTO_INVAL_DATA
    | p.DO_READDIRPLUS
    | p.READDIRPLUS_AUTO
    | p.ASYNC_DIO
    | p.PARALLEL_DIROPS
    | p.MAX_PAGES
    | p.INIT_EXT
)
#: requests between two trio checkpoints while requests keep coming: the store's uploads and
#: the control socket must get their turn
FAIR_SHARE = 32


def _attr(node: Node) -> bytes:
    size = node.st_size
    return p.attr(
        node.ino,
        size,
        (size + 511) // 512,
        node.atime_ns,
        node.mtime_ns,
        node.ctime_ns,
        node.mode,
        node.nlink,
        node.uid,
        node.gid,
        BLOCK_SIZE,
    )


def _entry_out(entry: Entry | Negative) -> bytes:
    if isinstance(entry, Negative):
        return p.entry_out(0, entry.ttl, 0, p.ATTR_ZERO)
    return p.entry_out(entry.node.ino, entry.entry_ttl, entry.attr_ttl, _attr(entry.node))


class Session:
    kind = "own"

    def __init__(
        self, fs: Filesystem, fd: int, mountpoint: str, made: tuple[int, str] | None, *, passthrough: bool = True
    ):
        self.fs = fs
        self.fd = fd
        # registering a backing file needs CAP_SYS_ADMIN: root's, as the daemon runs
        self._try_passthrough = passthrough and os.geteuid() == 0
        self.passthrough = False  # in force (negotiated, and not given up)
        self._backing: dict[int, list[int]] = {}  # inode -> [backing id, opens passed through]
        self._backed: dict[int, int] = {}  # fh passed through -> inode
        self._mountpoint = mountpoint
        self._made = made  # see fuse_mount.open_session_fd
        self.requests: Counter[int] = Counter()  # by opcode
        self.times = RequestTimes()
        self.negotiated: p.Negotiated | None = None
        self._reader: trio.lowlevel.Task | None = None
        self._nursery: trio.Nursery | None = None
        self._waiting: trio.CancelScope | None = None  # the reader's wait for the descriptor
        self._stopping = False
        self._stopped = trio.Event()
        self._handlers = {
            p.LOOKUP: self._lookup,
            p.GETATTR: self._getattr,
            p.SETATTR: self._setattr,
            p.MKDIR: self._mkdir,
            p.UNLINK: self._unlink,
            p.RMDIR: self._rmdir,
            p.RENAME: self._rename,
            p.RENAME2: self._rename2,
            p.LINK: self._refusing(fs.link),
            p.SYMLINK: self._refusing(fs.symlink),
            p.MKNOD: self._refusing(fs.mknod),
            p.CREATE: self._create,
            p.OPEN: self._open,
            p.READ: self._read,
            p.WRITE: self._write,
            p.FLUSH: self._flush,
            p.FSYNC: self._fsync,
            p.RELEASE: self._release,
            p.STATFS: self._statfs,
            p.OPENDIR: self._opendir,
            p.READDIR: self._readdir,
            p.READDIRPLUS: self._readdirplus,
            p.RELEASEDIR: self._releasedir,
            p.FSYNCDIR: self._nothing,
            p.INIT: self._init,
        }

    def request_counts(self) -> dict[str, int]:
        return {p.OPCODE_NAMES.get(op, str(op)): count for op, count in self.requests.items()}

    # ------------------------------------------------------------------ the loop
    async def serve(self) -> None:
        """Answer requests until the mount goes away (or `terminate`); requests still waiting
        then finish (their replies go nowhere)."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(forward_invalidations, self.fs, self._invalidate_inode, self._invalidate_entry)
            on_wait(self._hand_off)  # this task's context, copied into the readers it starts
            nursery.start_soon(self._read_requests)
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    def close(self, unmount: bool) -> None:
        try:
            if unmount:
                fuse_mount.unmount(self._mountpoint, self._made)
        finally:
            os.close(self.fd)

    def terminate(self) -> None:
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        self._stopped.set()

    def _hand_off(self) -> None:
        """The current request is about to wait: if its task is the reader, a new task reads."""
        if self._reader is trio.lowlevel.current_task() and not self._stopping:
            self._reader = None
            assert self._nursery is not None  # set while serving, and only then do requests wait
            self._nursery.start_soon(self._read_requests)

    async def _read_requests(self) -> None:
        me = self._reader = trio.lowlevel.current_task()
        buffer = bytearray(p.read_buffer_size(MAX_WRITE))  # per reader: a handed-off request keeps its bytes
        view = memoryview(buffer)
        fd = self.fd
        served = 0
        while not self._stopping:
            try:
                length = os.readv(fd, (buffer,))
            except BlockingIOError:
                with trio.CancelScope() as self._waiting:
                    await trio.lowlevel.wait_readable(fd)
                self._waiting = None
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):  # ENOENT: interrupted before we read it
                    continue
                if exc.errno != errno.ENODEV:
                    log.error("reading /dev/fuse: %s", exc.strerror)
                self._stopped.set()  # ENODEV: unmounted
                return
            await self._dispatch(view[:length])
            if self._reader is not me:
                return  # handed off while serving: another task reads now
            served += 1
            if served % FAIR_SHARE == 0:
                await trio.lowlevel.checkpoint()

    async def _dispatch(self, request: memoryview) -> None:
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = p.IN_HEADER.unpack_from(request)
        self.requests[opcode] += 1
        body = request[p.IN_HEADER.size :]
        if opcode == p.FORGET:
            self._forget(nodeid, p.FORGET_IN.unpack_from(body)[0])
            return
        if opcode == p.BATCH_FORGET:
            count = p.BATCH_FORGET_IN.unpack_from(body)[0]
            for index in range(count):
                self._forget(*p.FORGET_ONE.unpack_from(body, p.BATCH_FORGET_IN.size + index * p.FORGET_ONE.size))
            return
        if opcode == p.INTERRUPT:
            # every wait is bounded (--store-timeout) and a commit must not stop half-way:
            # the request finishes as if the signal came after it, as under pyfuse3
            return
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode == p.DESTROY:  # the last request of an unmount
                self._send(p.out_header(unique, 0))
                self._stopped.set()
            else:
                self._send(p.error_reply(unique, errno.ENOSYS))
            return
        started = time.perf_counter()
        try:
            reply = await handler(nodeid, body, uid, gid, pid)
        except Exception as exc:
            self._send(p.error_reply(unique, errno_of(exc, p.OPCODE_NAMES.get(opcode, str(opcode)))))
            return
        finally:
            self.times.record(p.OPCODE_NAMES.get(opcode, str(opcode)), time.perf_counter() - started)
        if isinstance(reply, tuple):  # (header-less body parts): READ's data is not copied
            self._send_parts(unique, reply)
        else:
            self._send(p.out_header(unique, len(reply)) + reply)

    def _send(self, message: bytes) -> None:
        try:
            os.write(self.fd, message)
        except OSError as exc:
            self._send_failed(exc)

    def _send_parts(self, unique: int, parts: tuple) -> None:
        try:
            os.writev(self.fd, (p.out_header(unique, sum(len(part) for part in parts)), *parts))
        except OSError as exc:
            self._send_failed(exc)

    def _send_failed(self, exc: OSError) -> None:
        # ENOENT: the request was aborted (its caller died); ENODEV: unmounted
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("replying on /dev/fuse: %s", exc.strerror)

    def _forget(self, nodeid: int, count: int) -> None:
        try:
            self.fs.forget(nodeid, count)
        except Exception:  # forget has no reply to carry an error; never stop the loop
            log.exception("forget(%d, %d)", nodeid, count)

    def _invalidate_inode(self, ino: int) -> None:
        os.write(self.fd, p.notify_inval_inode(ino))

    def _invalidate_entry(self, parent: int, name: str) -> None:
        os.write(self.fd, p.notify_inval_entry(parent, os.fsencode(name)))

    # ------------------------------------------------------------------ requests
    async def _init(self, nodeid, body, uid, gid, pid) -> bytes:
        reply, self.negotiated = p.negotiate(
            body, want=WANTED | p.PASSTHROUGH * self._try_passthrough, max_write=MAX_WRITE
        )
        self.passthrough = bool(self.negotiated.flags & p.PASSTHROUGH)
        if not self.passthrough:
            reply, self.negotiated = p.negotiate(body, want=WANTED | p.WRITEBACK_CACHE, max_write=MAX_WRITE)
        self.fs.passthrough_possible = self.passthrough
        log.info(
            "FUSE protocol 7.%d; %s",
            self.negotiated.minor,
            "local files are passed through to their staging files"
            if self.passthrough
            else "all reads and writes go through the daemon, with the kernel's writeback cache"
            + ("" if self._try_passthrough else " (passthrough needs root)"),
        )
        return reply

    async def _lookup(self, parent, body, uid, gid, pid) -> bytes:
        return _entry_out(await self.fs.lookup_entry(parent, os.fsdecode(p.decode_name(body))))

    async def _getattr(self, nodeid, body, uid, gid, pid) -> bytes:
        node = self.fs.getattr(nodeid)
        return p.attr_out(self.fs.attr_ttl(node), _attr(node))

    async def _setattr(self, nodeid, body, uid, gid, pid) -> bytes:
        (valid, _, _, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, new_uid, new_gid, _) = (
            p.SETATTR_IN.unpack_from(body)
        )
        now = time.time_ns()
        node = await self.fs.setattr(
            nodeid,
            mode=mode if valid & p.FATTR_MODE else None,
            uid=new_uid if valid & p.FATTR_UID else None,
            gid=new_gid if valid & p.FATTR_GID else None,
            size=size if valid & p.FATTR_SIZE else None,
            atime_ns=(now if valid & p.FATTR_ATIME_NOW else atime * 10**9 + atimensec)
            if valid & p.FATTR_ATIME
            else None,
            mtime_ns=(now if valid & p.FATTR_MTIME_NOW else mtime * 10**9 + mtimensec)
            if valid & p.FATTR_MTIME
            else None,
        )
        return p.attr_out(self.fs.attr_ttl(node), _attr(node))

    async def _mkdir(self, parent, body, uid, gid, pid) -> bytes:
        mode, _ = p.MKDIR_IN.unpack_from(body)
        name = os.fsdecode(p.decode_name(body, p.MKDIR_IN.size))
        return _entry_out(self.fs.entry(await self.fs.mkdir(parent, name, mode, uid, gid, caller=pid)))

    async def _unlink(self, parent, body, uid, gid, pid) -> bytes:
        await self.fs.unlink(parent, os.fsdecode(p.decode_name(body)))
        return b""

    async def _rmdir(self, parent, body, uid, gid, pid) -> bytes:
        await self.fs.rmdir(parent, os.fsdecode(p.decode_name(body)))
        return b""

    async def _rename(self, parent, body, uid, gid, pid) -> bytes:
        (new_parent,) = p.RENAME_IN.unpack_from(body)
        old, new = p.decode_two_names(body, p.RENAME_IN.size)
        await self.fs.rename(parent, os.fsdecode(old), new_parent, os.fsdecode(new))
        return b""

    async def _rename2(self, parent, body, uid, gid, pid) -> bytes:
        new_parent, flags, _ = p.RENAME2_IN.unpack_from(body)
        old, new = p.decode_two_names(body, p.RENAME2_IN.size)
        await self.fs.rename(parent, os.fsdecode(old), new_parent, os.fsdecode(new), flags)
        return b""

    @staticmethod
    def _refusing(refuse: Callable[[], NoReturn]):
        async def handler(nodeid, body, uid, gid, pid) -> bytes:
            refuse()

        return handler

    async def _create(self, parent, body, uid, gid, pid) -> bytes:
        flags, mode, _, _ = p.CREATE_IN.unpack_from(body)
        name = os.fsdecode(p.decode_name(body, p.CREATE_IN.size))
        fh, node = await self.fs.create(parent, name, mode, flags, uid, gid)
        return _entry_out(self.fs.entry(node)) + self._open_out(fh, node.ino)

    async def _open(self, nodeid, body, uid, gid, pid) -> bytes:
        flags, _ = p.OPEN_IN.unpack_from(body)
        return self._open_out(await self.fs.open(nodeid, flags), nodeid)

    def _open_out(self, fh: int, ino: int) -> bytes:
        opened = self.fs.opened(fh)
        if opened.backing is not None:
            backing_id = self._backing_id(ino, opened.backing.fd)
            if backing_id is not None:
                self._backed[fh] = ino
                return p.open_out(fh, p.FOPEN_PASSTHROUGH, backing_id)
            self.fs.passthrough_refused(fh)
        return p.open_out(fh, p.FOPEN_KEEP_CACHE if opened.keep_cache else 0)

    def _backing_id(self, ino: int, backing_fd: int) -> int | None:
        """The kernel's id of the inode's backing file: one per inode for all its opens."""
        backing = self._backing.get(ino)
        if backing is not None:
            backing[1] += 1
            return backing[0]
        try:
            backing_id = fcntl.ioctl(
                self.fd, p.FUSE_DEV_IOC_BACKING_OPEN, bytearray(p.BACKING_MAP.pack(backing_fd, 0, 0))
            )
        except OSError as exc:
            # e.g. ELOOP: the staging directory is itself on a stacked file system (overlayfs)
            log.warning(
                "passthrough given up: the kernel does not take staging files as backing files (%s); "
                "from now on the daemon serves all reads and writes",
                exc.strerror,
            )
            self.passthrough = self.fs.passthrough_possible = False
            return None
        self._backing[ino] = [backing_id, 1]
        return backing_id

    def _unback(self, fh: int) -> None:
        ino = self._backed.pop(fh, None)
        if ino is None:
            return
        backing = self._backing[ino]
        backing[1] -= 1
        if backing[1] == 0:
            del self._backing[ino]
            try:
                fcntl.ioctl(self.fd, p.FUSE_DEV_IOC_BACKING_CLOSE, bytearray(p.BACKING_ID.pack(backing[0])))
            except OSError as exc:
                log.error("cannot release backing file %d of inode %d: %s", backing[0], ino, exc.strerror)

    async def _read(self, nodeid, body, uid, gid, pid) -> tuple:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        return (await self.fs.read(fh, offset, size),)

    async def _write(self, nodeid, body, uid, gid, pid) -> bytes:
        fh, offset, size, *_ = p.WRITE_IN.unpack_from(body)
        start = p.WRITE_IN.size
        return p.write_out(await self.fs.write(fh, offset, body[start : start + size]))

    async def _flush(self, nodeid, body, uid, gid, pid) -> bytes:
        if not self.fs.commits_at_flush:
            # nothing to report to close(2): ENOSYS makes the kernel stop sending FLUSH at all
            raise FsError(errno.ENOSYS)
        await self.fs.flush(p.FLUSH_IN.unpack_from(body)[0])
        return b""

    async def _fsync(self, nodeid, body, uid, gid, pid) -> bytes:
        await self.fs.fsync(p.FSYNC_IN.unpack_from(body)[0])
        return b""

    async def _release(self, nodeid, body, uid, gid, pid) -> bytes:
        fh = p.RELEASE_IN.unpack_from(body)[0]
        try:
            await self.fs.release(fh)
        finally:
            self._unback(fh)
        return b""

    async def _statfs(self, nodeid, body, uid, gid, pid) -> bytes:
        s = self.fs.statfs()
        return p.kstatfs(
            s["f_blocks"],
            s["f_bfree"],
            s["f_bavail"],
            s["f_files"],
            s["f_ffree"],
            s["f_bsize"],
            s["f_namemax"],
            s["f_frsize"],
        )

    async def _opendir(self, nodeid, body, uid, gid, pid) -> bytes:
        return p.open_out(await self.fs.opendir(nodeid, caller=pid), 0)

    async def _readdir(self, nodeid, body, uid, gid, pid, plus: bool = False) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        parts = []
        room = size
        # the core counts an entry's lookup when the next one is asked for (see Filesystem.readdir)
        for next_offset, name, entry in self.fs.readdir(fh, offset, plus):
            node = entry.node
            if plus:
                part = p.direntplus(_entry_out(entry), node.ino, next_offset, os.fsencode(name), node.mode)
            else:
                part = p.dirent(node.ino, next_offset, os.fsencode(name), node.mode)
            if len(part) > room:
                break
            parts.append(part)
            room -= len(part)
        return b"".join(parts)

    async def _readdirplus(self, nodeid, body, uid, gid, pid) -> bytes:
        return await self._readdir(nodeid, body, uid, gid, pid, plus=True)

    async def _releasedir(self, nodeid, body, uid, gid, pid) -> bytes:
        self.fs.releasedir(p.RELEASE_IN.unpack_from(body)[0])
        return b""

    async def _nothing(self, nodeid, body, uid, gid, pid) -> bytes:
        return b""
