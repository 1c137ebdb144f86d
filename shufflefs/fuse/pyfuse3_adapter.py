"""The portable FUSE adapter (`--fuse pyfuse3`): pyfuse3 and libfuse run the request loop;
each handler decodes pyfuse3's arguments, calls the filesystem core, and encodes its reply.
Policy (TTLs, caching, errno) is the core's; this module only translates."""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import Counter

import pyfuse3
import trio

from shufflefs.core import BLOCK_SIZE, Entry, Filesystem, Negative, Node, Opened, errno_of
from shufflefs.fuse import mount as fuse_mount
from shufflefs.fuse.notify import forward_invalidations
from shufflefs.fuse.timing import RequestTimes

log = logging.getLogger(__name__)


def _translated(method):
    name = method.__name__

    @functools.wraps(method)
    async def handler(self, *args):
        self.requests[name] += 1
        started = time.perf_counter()
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(exc, f"{name}{args!r}")) from None
        finally:
            self.times.record(name, time.perf_counter() - started)

    return handler


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = True
    passthrough = False  # pyfuse3 cannot pass files through

    def __init__(self, fs: Filesystem):
        super().__init__()
        self.fs = fs
        self.requests: Counter[str] = Counter()  # by kind, for stats and bench
        self.times = RequestTimes()
        self._mountpoint = ""
        self._made: tuple[int, str] | None = None

    def mount(self, mountpoint: str, source: str, fstype: str, kernel_options: list[str]) -> None:
        """As root: mount(2) ourselves (see shufflefs.fuse.mount) and hand libfuse the
        descriptor; other users: libfuse mounts (through fusermount3)."""
        self._mountpoint = mountpoint
        options = {*pyfuse3.default_options, *kernel_options, f"subtype={fstype.partition('.')[2]}", f"fsname={source}"}
        if os.geteuid() != 0:
            pyfuse3.init(self, mountpoint, options)
            return
        fd, self._made = fuse_mount.open_session_fd(mountpoint, source, fstype, kernel_options)
        try:
            pyfuse3.init(self, f"/dev/fd/{fd}", options)
        except BaseException:
            fuse_mount.unmount(mountpoint, self._made)
            os.close(fd)
            raise

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.send_invalidations)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    @staticmethod
    def terminate() -> None:
        pyfuse3.terminate()

    def close(self, unmount: bool) -> None:
        try:
            if unmount and self._made is not None:
                fuse_mount.unmount(self._mountpoint, self._made)
        finally:
            pyfuse3.close(unmount=unmount and self._made is None)

    def request_counts(self) -> dict[str, int]:
        return dict(self.requests)

    async def send_invalidations(self) -> None:
        await forward_invalidations(
            self.fs, pyfuse3.invalidate_inode, lambda parent, name: pyfuse3.invalidate_entry(parent, os.fsencode(name))
        )

    @staticmethod
    def _attrs(node: Node, entry_ttl: float, attr_ttl: float) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.st_mode = node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_size = node.st_size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = node.atime_ns
        attrs.st_mtime_ns = node.mtime_ns
        attrs.st_ctime_ns = node.ctime_ns
        attrs.entry_timeout = entry_ttl
        attrs.attr_timeout = attr_ttl
        return attrs

    def _entry(self, entry: Entry | Negative) -> pyfuse3.EntryAttributes:
        if isinstance(entry, Negative):
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = entry.ttl
            return negative
        return self._attrs(entry.node, entry.entry_ttl, entry.attr_ttl)

    def _node_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.entry(node))

    @staticmethod
    def _file_info(opened: Opened) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=opened.fh, keep_cache=opened.keep_cache)

    @_translated
    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(await self.fs.lookup_entry(parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                self.fs.forget(inode, count)
            except Exception:  # forget has no reply to carry an error; never stop the loop
                log.exception("forget(%d, %d)", inode, count)

    @_translated
    async def getattr(self, inode, ctx=None):
        return self._node_attrs(self.fs.node(inode))

    @_translated
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._node_attrs(node)

    @_translated
    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        for name, value in self.fs.statfs().items():
            setattr(data, name, value)
        return data

    @_translated
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._node_attrs(
            await self.fs.mkdir(parent_inode, os.fsdecode(name), mode, ctx.uid, ctx.gid, caller=ctx.pid)
        )

    @_translated
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, os.fsdecode(name))

    @_translated
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(parent_inode, os.fsdecode(name))

    @_translated
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new), flags)

    @_translated
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self.fs.link()

    @_translated
    async def symlink(self, parent_inode, name, target, ctx):
        self.fs.symlink()

    @_translated
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self.fs.mknod()

    @_translated
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, node = await self.fs.create(parent_inode, os.fsdecode(name), mode, flags, ctx.uid, ctx.gid)
        return self._file_info(self.fs.opened(fh)), self._node_attrs(node)

    @_translated
    async def open(self, inode, flags, ctx):
        return self._file_info(self.fs.opened(await self.fs.open(inode, flags)))

    @_translated
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @_translated
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @_translated
    async def flush(self, fh):
        if not self.fs.commits_at_flush:
            # nothing to report to close(2): ENOSYS makes the kernel stop sending FLUSH at all
            # (one request less per close); commits then happen at RELEASE
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self.fs.flush(fh)

    @_translated
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh)

    @_translated
    async def release(self, fh):
        await self.fs.release(fh)

    @_translated
    async def opendir(self, inode, ctx):
        return await self.fs.opendir(inode, caller=ctx.pid)

    @_translated
    async def readdir(self, fh, start_id, token):
        # pyfuse3 always answers READDIRPLUS: each entry it takes is looked up by the kernel
        for next_id, name, entry in self.fs.readdir(fh, start_id, plus=True):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(entry), next_id):
                break

    @_translated
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @_translated
    async def fsyncdir(self, fh, datasync):
        pass
