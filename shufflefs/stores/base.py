"""The store interface: a small set of blocking calls on keys relative to the store's prefix.

Stores never import pyfuse3 or trio. They are called from worker threads; the caller
(`shufflefs.remote`) owns retries, so a store makes one attempt per call (the S3 store's
multipart upload excepted: it sends a failed part again) and classifies its failure as
transient (worth retrying) or not.

Keys are '/'-separated paths relative to the store URL's prefix, never starting or ending with
'/', e.g. 'spark-1/executor-2/blockmgr-3/0c/shuffle_0_5_0.data'.

Conditional stores (`conditional = True`, S3) make every write conditional on the state the
caller expects the key to be in: `ABSENT`, or a version (S3: the ETag) that an earlier call
returned. A write whose expectation no longer holds raises `PreconditionFailed` and changes
nothing, so a request that reaches the store late (after its sender gave up, or died) cannot
undo a later one. Every write also carries a `token` naming it, kept with the object (`head`
returns it), so a sender can tell whether an attempt it saw fail had in fact landed. Other
stores ignore `expect` and `token`, and return no version; see DESIGN.md "Late requests".
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


#: `expect` value: the key holds no object
ABSENT = "<absent>"


class PreconditionFailed(StoreError):
    """A conditional write found the key in another state than expected; nothing changed."""

    def __init__(self, key: str):
        super().__init__(f"{key!r} is not in the expected state", transient=False)
        self.key = key


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
    #: what a conditional write may expect (S3: the ETag); None where the store has none
    version: str | None = None
    #: the token of the write that stored the object (head only; None when unknown)
    token: str | None = None


@dataclass(frozen=True)
class Unfinished:
    """A write the store began and nobody finished: its writer died (S3: a multipart upload;
    the file store: a temporary file). Found and aborted by `shufflefs gc`."""

    key: str  # where it would have landed
    started_ns: int
    handle: str  # what abort_unfinished needs (S3: the upload id; the file store: the path)
    size: int = 0  # bytes it holds, where the store tells


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
    #: whether writes honour `expect` (see the module docstring)
    conditional = False
    #: whether `copy` makes an object appear at another key without its bytes passing through
    #: this process (else a copy is uploaded from the local file like any other put)
    copies = False
    #: the longest key (UTF-8 bytes, relative to the store's prefix) the store holds; None when
    #: it has no limit of its own
    max_key_bytes: int | None = None

    def name_error(self, name: str) -> int | None:
        """Whether the store can hold `name` as a path component of a key faithfully: None if
        it can, else the errno a filesystem refusing it answers (EINVAL for a name the store
        would reject, alias to another key, or hide from listings). `name` is a str from
        os.fsdecode, so bytes that are not UTF-8 appear as lone surrogates. Names are never
        empty, '.', '..', contain '/', or exceed 255 bytes (the filesystem refuses those)."""
        return None

    def check(self) -> None:
        """Verify the store is usable (reachable, exists, credentials work) or raise StoreError
        with a one-line message for the user."""
        raise NotImplementedError

    def put_file(
        self,
        key: str,
        path: str,
        abort: threading.Event | None = None,
        *,
        expect: str | None = None,
        token: str | None = None,
    ) -> str | None:
        """Store the bytes of local file `path` at `key`, replacing any object there, and
        return the new object's version. Atomic: readers see the old object or the whole new
        one. If `abort` is set while the upload runs, the store stops as early as it can,
        leaves no object, and raises UploadAborted. Callers never modify `path` in place
        afterwards (they replace or remove it), so a store may keep the file itself instead of
        a copy (see keeps_put_files). `expect`: ABSENT, a version, or None (unconditional)."""
        raise NotImplementedError

    def discard_put(self, key: str, token: str) -> None:
        """Remove what a put_file or copy at `key` with `token` that was interrupted (its
        daemon was killed) and is no longer wanted may have left behind, other than the object
        itself. Nothing, unless the store stages writes under other names."""

    def get_range(self, key: str, offset: int, length: int, *, expect: str | None = None) -> bytes:
        """Return up to `length` bytes from `offset` (fewer at the end of the object). With
        `expect` (a version), raise PreconditionFailed if the object is another version now."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    def list_dir(self, prefix: str) -> Listing:
        """One level of the tree below `prefix` ('' for the top, else a key without the
        trailing '/')."""
        raise NotImplementedError

    def move(
        self,
        src: str,
        dst: str,
        *,
        expect_src: str | None = None,
        expect_dst: str | None = None,
        token: str | None = None,
    ) -> str | None:
        """Make the object at `src` appear at `dst` (replacing it) and remove `src`, without
        the bytes passing through this process when the store can do that; return the version
        at `dst`. With `expect_src`, only that version of `src` is copied and removed."""
        raise NotImplementedError

    def copy(
        self,
        src: str,
        dst: str,
        *,
        expect_src: str | None = None,
        expect_dst: str | None = None,
        token: str | None = None,
    ) -> str | None:
        """Make the bytes of the object at `src` appear at `dst` too (replacing it), without
        them passing through this process; return the version at `dst`. With `expect_src`,
        only that version of `src` is copied (else PreconditionFailed); ObjectMissing if `src`
        is gone. Only stores with `copies`."""
        raise NotImplementedError

    def delete_many(self, keys: list[str], *, expect: dict[str, str] | None = None) -> dict[str, StoreError]:
        """Delete the objects; keys that do not exist are not an error. `expect` maps a key to
        the only version that may be deleted. Returns the keys that were not deleted, with why
        (PreconditionFailed, or a per-key StoreError); a failure of the whole call raises."""
        raise NotImplementedError

    def unfinished_writes(self) -> list[Unfinished]:
        """Writes begun below the store's prefix and not finished (each may be a live daemon's,
        in progress: the caller judges by age). None where the store stages nothing."""
        return []

    def abort_unfinished(self, write: Unfinished) -> None:
        """Remove what an unfinished write holds; one that is gone already is no error."""
        raise NotImplementedError

    def local_paths(self) -> list[str]:
        """Local directories the store writes into (they must not lie inside the mount)."""
        return []

    def close(self) -> None:
        pass


def is_utf8(name: str) -> bool:
    """Whether `name` (from os.fsdecode) stands for bytes that are valid UTF-8."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
