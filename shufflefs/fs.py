"""The FUSE adapter: decode requests, call the filesystem core, encode replies.

Every handler goes through `_translated`, the one place where failures become errno: FsError
carries its own, a store failure its errno (EIO unless the store knows better), an OSError of the staging disk keeps its errno, and
anything unexpected is logged with its traceback and answered with EIO, so that a bug fails
one request instead of stopping pyfuse3 (which would leave a dead mount behind).
"""

from __future__ import annotations

import errno
import functools
import logging
import os

import pyfuse3
import trio

from shufflefs.core import Filesystem, FsError, Node
from shufflefs.stores import StoreError

log = logging.getLogger(__name__)

#: entries and attributes of directories this mount owns cannot change behind the kernel's back
OWNED_TIMEOUT = 300.0
BLOCK_SIZE = 128 * 1024


def _translated(method):
    counter = "fuse_" + method.__name__  # requests by kind, for stats and bench

    @functools.wraps(method)
    async def handler(self, *args):
        self.fs.stats[counter] += 1
        try:
            return await method(self, *args)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except StoreError as exc:
            log.error("%s: store error: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", method.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self, fs: Filesystem):
        super().__init__()
        self.fs = fs

    async def send_invalidations(self) -> None:
        """For the life of the mount: tell the kernel to forget what the core names
        (`Filesystem.invalidations`). Each notification goes from a worker thread: the kernel
        first waits for the inode's writeback, i.e. for WRITE requests that this loop must
        still be free to answer, or for the reply of the request that queued it."""
        async for kind, *what in self.fs.invalidations:
            if kind == "inode":
                call, args = pyfuse3.invalidate_inode, (what[0],)
            else:
                call, args = pyfuse3.invalidate_entry, (what[0], os.fsencode(what[1]))
            try:
                # abandoned on cancel: one the kernel holds up must not hold up the daemon's exit
                await trio.to_thread.run_sync(call, *args, abandon_on_cancel=True)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the kernel has forgotten it already
                    log.warning("cannot invalidate %s %r in the kernel: %s", kind, what, exc.strerror)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.st_mode = node.mode
        attrs.st_nlink = (2 + node.subdirs if node.is_dir else 1) if node.linked else 0
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_size = 4096 if node.is_dir else node.size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = node.atime_ns
        attrs.st_mtime_ns = node.mtime_ns
        attrs.st_ctime_ns = node.ctime_ns
        timeout = OWNED_TIMEOUT if self.fs.is_owned_entry(node) else self.fs.remote_ttl
        attrs.entry_timeout = attrs.attr_timeout = timeout
        return attrs

    @_translated
    async def lookup(self, parent_inode, name, ctx=None):
        node = await self.fs.lookup(parent_inode, os.fsdecode(name))
        if node is not None:
            return self._attrs(node)
        if self.fs.node(parent_inode).owned:
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = OWNED_TIMEOUT
            return negative
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                self.fs.forget(inode, count)
            except Exception:  # forget has no reply to carry an error; never stop the loop
                log.exception("forget(%d, %d)", inode, count)

    @_translated
    async def getattr(self, inode, ctx=None):
        return self._attrs(self.fs.node(inode))

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
        return self._attrs(node)

    @_translated
    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        for name, value in self.fs.statfs().items():
            setattr(data, name, value)
        return data

    @_translated
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attrs(await self.fs.mkdir(parent_inode, os.fsdecode(name), mode, ctx.uid, ctx.gid))

    @_translated
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, os.fsdecode(name))

    @_translated
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(parent_inode, os.fsdecode(name))

    @_translated
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(parent_inode_old, os.fsdecode(name_old), parent_inode_new,
                             os.fsdecode(name_new), flags)

    @_translated
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FsError(errno.EPERM, "hard links are not supported")

    @_translated
    async def symlink(self, parent_inode, name, target, ctx):
        raise FsError(errno.EPERM, "symbolic links are not supported")

    @_translated
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise FsError(errno.EPERM, "only regular files and directories are supported")

    @staticmethod
    def _file_info(fh: int) -> pyfuse3.FileInfo:
        # The kernel may keep a file's pages across opens: every byte of a local file is
        # written through this mount's page cache (writeback cache; truncation included), and
        # committed files never change (an object another mount replaces is another inode
        # here). Otherwise each open would read the file again.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_translated
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, node = await self.fs.create(parent_inode, os.fsdecode(name), mode, flags, ctx.uid, ctx.gid)
        return self._file_info(fh), self._attrs(node)

    @_translated
    async def open(self, inode, flags, ctx):
        return self._file_info(await self.fs.open(inode, flags))

    @_translated
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @_translated
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @_translated
    async def flush(self, fh):
        if not self.fs.commits_at_flush:
            # async commit reports nothing to close(2): ENOSYS makes the kernel stop sending
            # FLUSH at all (one request less per close); commits then happen at RELEASE
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
        return await self.fs.opendir(inode)

    @_translated
    async def readdir(self, fh, start_id, token):
        directory, entries = self.fs.readdir_entries(fh)
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if directory.children.get(name) is not node:
                continue  # removed or renamed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), index + 1):
                break
            node.lookups += 1

    @_translated
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @_translated
    async def fsyncdir(self, fh, datasync):
        pass
