"""The store interface: a small set of blocking calls on keys relative to the store's prefix.

Stores never import pyfuse3 or trio. They are called from worker threads; the caller
(`shufflefs.remote`) owns retries, so a store makes one attempt per call (the S3 store's
multipart upload excepted: it sends a failed part again) and classifies its failure as
transient (worth retrying) or not.

Keys are '/'-separated paths relative to the store URL's prefix, never starting or ending with
'/', e.g. 'spark-1/executor-2/blockmgr-3/0c/shuffle_0_5_0.data'.
"""

from __future__ import annotations

import errno as _errno
import threading
from dataclasses import dataclass


class StoreError(Exception):
    """A store call failed. `transient` says whether retrying may help; `errno` is what a
    caller waiting for it (a sync commit, a read) is told."""

    def __init__(self, message: str, transient: bool = True, errno: int = _errno.EIO):
        super().__init__(message)
        self.transient = transient
        self.errno = errno


class ObjectMissing(StoreError):
    """The key does not exist in the store."""

    def __init__(self, key: str):
        super().__init__(f"no object at key {key!r}", transient=False)
        self.key = key


class UploadAborted(StoreError):
    """An upload was abandoned because its abort event was set; nothing was stored."""

    def __init__(self, key: str):
        super().__init__(f"upload of {key!r} aborted", transient=False)


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # last path component
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Listing:
    dirs: list[str]  # names of sub-directories (common prefixes)
    files: list[ObjectInfo]


class Store:
    """Base class of every store. Subclasses implement each method as one blocking attempt."""

    #: URL shown to users and logs (never contains credentials)
    url: str = ""
    #: files at least this big are uploaded in parts (where the store has multipart upload)
    multipart_threshold = 16 * 1024 * 1024
    #: whether put_file may keep the local file itself (a hard link) instead of a copy; then
    #: that file must never be reused
    keeps_put_files = False

    def check(self) -> None:
        """Verify the store is usable (reachable, exists, credentials work) or raise StoreError
        with a one-line message for the user."""
        raise NotImplementedError

    def put_file(self, key: str, path: str, abort: threading.Event | None = None) -> None:
        """Store the bytes of local file `path` at `key`, replacing any object there.
        Atomic: readers see the old object or the whole new one. If `abort` is set while the
        upload runs, the store stops as early as it can, leaves no object, and raises
        UploadAborted. Callers never modify `path` in place afterwards (they replace or remove
        it), so a store may keep the file itself instead of a copy (see keeps_put_files)."""
        raise NotImplementedError

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return up to `length` bytes from `offset` (fewer at the end of the object)."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    def list_dir(self, prefix: str) -> Listing:
        """One level of the tree below `prefix` ('' for the top, else a key without the
        trailing '/')."""
        raise NotImplementedError

    def move(self, src: str, dst: str) -> None:
        """Make the object at `src` appear at `dst` (replacing it) and remove `src`, without
        the bytes passing through this process when the store can do that."""
        raise NotImplementedError

    def delete_many(self, keys: list[str]) -> None:
        """Delete the objects; keys that do not exist are not an error."""
        raise NotImplementedError

    def local_paths(self) -> list[str]:
        """Local directories the store writes into (they must not lie inside the mount)."""
        return []

    def close(self) -> None:
        pass


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
