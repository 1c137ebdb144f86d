"""An in-process store for tests. `memory://NAME` returns the same store for the same NAME
within one process, so two filesystems in one test can share it. Not for production: nothing
survives the process. It is conditional the way S3 is: versions are content hashes (S3's
ETag of a single-part upload), and a write whose expectation fails changes nothing."""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.parse
from typing import NamedTuple

from shufflefs.stores.base import (
    ABSENT,
    Listing,
    ObjectInfo,
    ObjectMissing,
    PreconditionFailed,
    Store,
    StoreError,
    UploadAborted,
)


class _Object(NamedTuple):
    data: bytes
    mtime_ns: int
    version: str
    token: str | None


_named_stores: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


class MemoryStore(Store):
    conditional = True

    def __init__(self, name: str = ""):
        self.url = f"memory://{name}"
        self.objects: dict[str, _Object] = {}
        self._lock = threading.Lock()
        #: tests: the next `fail_next` calls (of any kind) raise a transient StoreError
        self.fail_next = 0
        #: tests: every call counted by method name
        self.calls: dict[str, int] = {}

    @classmethod
    def from_url(cls, parsed: urllib.parse.SplitResult, **_options) -> MemoryStore:
        name = parsed.netloc + parsed.path
        if not name:
            return cls()
        with _named_lock:
            return _named_stores.setdefault(name, cls(name))

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            if self.fail_next > 0:
                self.fail_next -= 1
                raise StoreError(f"injected failure in {method}", transient=True)

    def check(self) -> None:
        self._enter("check")

    def _check(self, key: str, expect: str | None) -> None:
        """Called with the lock held: raise PreconditionFailed unless `key` is as expected."""
        current = self.objects.get(key)
        if expect is not None and expect != (current.version if current else ABSENT):
            raise PreconditionFailed(key)

    def put_file(self, key, path, abort=None, *, expect=None, token=None):
        self._enter("put_file")
        with open(path, "rb") as f:
            data = f.read()
        if abort is not None and abort.is_set():
            raise UploadAborted(key)
        version = f'"{hashlib.md5(data).hexdigest()}"'
        with self._lock:
            self._check(key, expect)
            self.objects[key] = _Object(data, time.time_ns(), version, token)
        return version

    def get_range(self, key, offset, length, *, expect=None):
        self._enter("get_range")
        with self._lock:
            if key not in self.objects:
                raise ObjectMissing(key)
            self._check(key, expect)
            return self.objects[key].data[offset : offset + length]

    def head(self, key):
        self._enter("head")
        with self._lock:
            obj = self.objects.get(key)
            if obj is None:
                return None
            return ObjectInfo(key.rsplit("/", 1)[-1], len(obj.data), obj.mtime_ns, obj.version, obj.token)

    def list_dir(self, prefix):
        self._enter("list_dir")
        start = prefix + "/" if prefix else ""
        dirs, files = set(), []
        with self._lock:
            for key, obj in self.objects.items():
                if not key.startswith(start):
                    continue
                rest = key[len(start) :]
                if "/" in rest:
                    dirs.add(rest.split("/", 1)[0])
                else:
                    files.append(ObjectInfo(rest, len(obj.data), obj.mtime_ns, obj.version))
        return Listing(sorted(dirs), sorted(files, key=lambda o: o.name))

    copies = True

    def copy(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        self._enter("copy")
        with self._lock:
            if src not in self.objects:
                raise ObjectMissing(src)
            self._check(src, expect_src)
            self._check(dst, expect_dst)
            copied = self.objects[dst] = self.objects[src]._replace(mtime_ns=time.time_ns(), token=token)
            return copied.version

    def move(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        self._enter("move")
        with self._lock:
            if src not in self.objects:
                raise ObjectMissing(src)
            self._check(src, expect_src)
            self._check(dst, expect_dst)
            moved = self.objects.pop(src)._replace(token=token)
            self.objects[dst] = moved
            return moved.version

    def delete_many(self, keys, *, expect=None):
        self._enter("delete_many")
        failed = {}
        with self._lock:
            for key in keys:
                if key not in self.objects:
                    continue
                try:
                    self._check(key, (expect or {}).get(key))
                except PreconditionFailed as exc:
                    failed[key] = exc
                    continue
                del self.objects[key]
        return failed
