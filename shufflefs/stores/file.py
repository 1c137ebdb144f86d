"""A store in any POSIX directory (local disk, NFS, a shared volume): `file:///abs/dir`.

Objects are regular files at `<dir>/<key>`. Writes go to a hidden temporary name in the target
directory and are renamed into place, so a reader never sees a partial object; moves are
renames. The temporary name is derived from the write's token and the key, so a put or copy
that a killed daemon left half done is cleaned up by the same write when the next daemon
resumes it (the journal keeps its token; a resumed copy may go on as a put of the bytes), or
discards it, and never by anyone else's: several nodes may share one store directory, and
their tokens differ.

When the source file is on the same filesystem, a put is a hard link instead of a copy: the
callers' source files (committed staging files) and objects are never modified in place, only
replaced or removed, so sharing the inode is safe and costs no I/O. Directories left empty by
deletes and moves are removed again, so the tree only holds directories that lead to objects
(like an object store's prefixes).
"""

from __future__ import annotations

import errno
import hashlib
import os
import urllib.parse
import uuid

from shufflefs.stores.base import (
    Listing,
    ObjectInfo,
    ObjectMissing,
    PreconditionFailed,
    Store,
    StoreError,
    Unfinished,
    UploadAborted,
)

TEMP_PREFIX = ".shufflefs-tmp-"
#: the temporary name: TEMP_PREFIX and 32 hex digits
TEMP_NAME_BYTES = len(TEMP_PREFIX) + 32
COPY_CHUNK = 8 * 1024 * 1024
#: Linux's limit on a path passed to a system call, its terminating NUL included
PATH_MAX = 4096


class FileStore(Store):
    keeps_put_files = True

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"
        # `<root>/<key>` must fit PATH_MAX, also with the key's last name replaced by the
        # (possibly longer) temporary name of a put
        self.max_key_bytes = PATH_MAX - 1 - len(os.fsencode(self.root)) - 1 - TEMP_NAME_BYTES

    @classmethod
    def from_url(cls, parsed: urllib.parse.SplitResult, **_options) -> FileStore:
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(
                f"file:// store URL must be file:///absolute/path, got host {parsed.netloc!r}", transient=False
            )
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise StoreError("file:// store URL needs an absolute path: file:///abs/dir", transient=False)
        return cls(path)

    def unfinished_writes(self):
        found = []
        try:
            for directory, _dirs, names in os.walk(self.root, onerror=_raise):
                for name in names:
                    if name.startswith(TEMP_PREFIX):
                        path = os.path.join(directory, name)
                        try:
                            st = os.lstat(path)
                        except FileNotFoundError:
                            continue  # its write just finished
                        key = os.path.relpath(path, self.root)
                        found.append(Unfinished(key, st.st_mtime_ns, path, st.st_size))
        except OSError as exc:
            raise self._os_error(exc, "looking for unfinished writes") from exc
        return found

    def abort_unfinished(self, write):
        _remove_quietly(write.handle)
        self._prune_empty_dirs(write.key)

    def local_paths(self) -> list[str]:
        return [self.root]

    def name_error(self, name):
        # listings hide the temporary files of puts: an object of that name would be invisible
        return errno.EINVAL if name.startswith(TEMP_PREFIX) else None

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise StoreError(f"store directory {self.root} does not exist (create it first)", transient=False)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not writable", transient=False)

    def _os_error(self, exc: OSError, what: str) -> StoreError:
        transient = exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS)
        return StoreError(f"{what}: {exc.strerror}", transient=transient)

    def put_file(self, key, path, abort=None, *, expect=None, token=None):
        if abort is not None and abort.is_set():
            raise UploadAborted(key)
        try:
            self._place(key, path, token, abort)
        except OSError as exc:
            raise self._os_error(exc, f"storing {key}") from exc
        return None

    def _place(self, key: str, path: str, token: str | None, abort=None) -> None:
        """Make local file `path` the object at `key`: a hard link to it (or a copy) at the
        write's temporary name, renamed into place, so that a reader never sees part of it."""
        target = self._path(key)
        temp = _temp_path(target, key, token)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # left by this very write, interrupted in an earlier life of the daemon (no other
            # write has its token)
            _remove_quietly(temp)
            try:
                os.link(path, temp)
            except FileNotFoundError:
                raise
            except OSError:  # another filesystem (EXDEV), or one without hard links
                self._copy(key, path, temp, abort)
            os.replace(temp, target)
            # rename(2) does nothing when both names are links to one file: an earlier attempt
            # of this write placed it (its daemon died before it could tell)
            _remove_quietly(temp)
        except BaseException:
            _remove_quietly(temp)
            raise

    def discard_put(self, key, token):
        try:
            _remove_quietly(_temp_path(self._path(key), key, token))
        except OSError as exc:
            raise self._os_error(exc, f"removing the temporary file of {key}") from exc

    @staticmethod
    def _copy(key: str, path: str, temp: str, abort) -> None:
        with open(path, "rb") as src, open(temp, "wb") as dst:
            # in-kernel copy: no user-space buffer, and the GIL is free while it runs
            offset = 0
            while copied := os.sendfile(dst.fileno(), src.fileno(), offset, COPY_CHUNK):
                offset += copied
                if abort is not None and abort.is_set():
                    raise UploadAborted(key)

    def get_range(self, key, offset, length, *, expect=None):
        try:
            with open(self._path(key), "rb") as f:
                if expect is not None and _version(os.fstat(f.fileno())) != expect:
                    raise PreconditionFailed(key)
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise self._os_error(exc, f"reading {key}") from exc

    def head(self, key):
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._os_error(exc, f"stat {key}") from exc
        if not os.path.isfile(self._path(key)):
            return None
        return ObjectInfo(key.rsplit("/", 1)[-1], st.st_size, st.st_mtime_ns, _version(st))

    def list_dir(self, prefix):
        dirs, files = [], []
        try:
            with os.scandir(self._path(prefix) if prefix else self.root) as entries:
                for entry in entries:
                    if entry.name.startswith(TEMP_PREFIX):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        files.append(ObjectInfo(entry.name, st.st_size, st.st_mtime_ns, _version(st)))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise self._os_error(exc, f"listing {prefix or '/'}") from exc
        return Listing(sorted(dirs), sorted(files, key=lambda o: o.name))

    copies = True

    def copy(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        # objects are never modified in place (see the module docstring): the copy may share
        # the source's inode, like a put shares its staging file's
        try:
            self._place(dst, self._path(src), token)
        except FileNotFoundError:
            raise self._missing(src, f"copying {src} to {dst}") from None
        except OSError as exc:
            raise self._os_error(exc, f"copying {src} to {dst}") from exc
        return None

    def _missing(self, src: str, what: str) -> StoreError:
        """What a FileNotFoundError of an operation reading `src` means: the object is gone,
        or a directory vanished under it (a concurrent prune of an emptied one; retried)."""
        if not os.path.exists(self._path(src)):
            return ObjectMissing(src)
        return StoreError(f"{what}: directory vanished", transient=True)

    def move(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        source, target = self._path(src), self._path(dst)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            moved = os.lstat(source)
            os.replace(source, target)
            # rename(2) does nothing when both names are links to one file (a copy is a hard
            # link to its source): the source must still go
            if _is_file(source, moved):
                _remove_quietly(source)
        except FileNotFoundError:
            raise self._missing(src, f"moving {src} to {dst}") from None
        except OSError as exc:
            raise self._os_error(exc, f"moving {src} to {dst}") from exc
        self._prune_empty_dirs(src)
        return None

    def delete_many(self, keys, *, expect=None):
        failed = {}
        for key in keys:
            try:
                os.unlink(self._path(key))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                error = self._os_error(exc, f"deleting {key}")
                if error.transient:
                    raise error from exc
                failed[key] = error
                continue
            self._prune_empty_dirs(key)
        return failed

    def _prune_empty_dirs(self, key: str) -> None:
        parent = os.path.dirname(self._path(key))
        while parent != self.root and parent.startswith(self.root + "/"):
            try:
                os.rmdir(parent)
            except OSError:  # not empty, or already gone: either way stop climbing
                return
            parent = os.path.dirname(parent)


def _version(st: os.stat_result) -> str:
    """Which object a file is: every put stores a new inode (a link or a copy), a move keeps it."""
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"


def _temp_path(target: str, key: str, token: str | None) -> str:
    """The temporary name of a write at `key`: the same for the same token (the write resumed
    after a restart, as a put or as a copy), unique otherwise (a write without a token cannot
    be resumed or discarded)."""
    seed = os.fsencode(token) if token else uuid.uuid4().bytes
    digest = hashlib.sha256(seed + b"\0" + os.fsencode(key)).hexdigest()
    return os.path.join(os.path.dirname(target), TEMP_PREFIX + digest[:32])


def _is_file(path: str, st: os.stat_result) -> bool:
    """Whether `path` is (still) the file `st` describes."""
    try:
        return os.path.samestat(os.lstat(path), st)
    except FileNotFoundError:
        return False


def _raise(exc: OSError) -> None:
    raise exc


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
