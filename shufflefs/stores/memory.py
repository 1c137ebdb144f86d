"""An in-process store for tests. `memory://NAME` returns the same store for the same NAME
within one process, so two filesystems in one test can share it. Not for production: nothing
survives the process."""

from __future__ import annotations

import threading
import time
import urllib.parse

from shufflefs.stores.base import Listing, ObjectInfo, ObjectMissing, Store, StoreError, UploadAborted

_named_stores: dict[str, "MemoryStore"] = {}
_named_lock = threading.Lock()


class MemoryStore(Store):
    def __init__(self, name: str = ""):
        self.url = f"memory://{name}"
        self.objects: dict[str, tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        #: tests: the next `fail_next` calls (of any kind) raise a transient StoreError
        self.fail_next = 0
        #: tests: every call counted by method name
        self.calls: dict[str, int] = {}

    @classmethod
    def from_url(cls, parsed: urllib.parse.SplitResult, **_options) -> "MemoryStore":
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

    def put_file(self, key, path, abort=None):
        self._enter("put_file")
        with open(path, "rb") as f:
            data = f.read()
        if abort is not None and abort.is_set():
            raise UploadAborted(key)
        with self._lock:
            self.objects[key] = (data, time.time_ns())

    def get_range(self, key, offset, length):
        self._enter("get_range")
        with self._lock:
            if key not in self.objects:
                raise ObjectMissing(key)
            return self.objects[key][0][offset:offset + length]

    def head(self, key):
        self._enter("head")
        with self._lock:
            if key not in self.objects:
                return None
            data, mtime_ns = self.objects[key]
            return ObjectInfo(key.rsplit("/", 1)[-1], len(data), mtime_ns)

    def list_dir(self, prefix):
        self._enter("list_dir")
        start = prefix + "/" if prefix else ""
        dirs, files = set(), []
        with self._lock:
            for key, (data, mtime_ns) in self.objects.items():
                if not key.startswith(start):
                    continue
                rest = key[len(start):]
                if "/" in rest:
                    dirs.add(rest.split("/", 1)[0])
                else:
                    files.append(ObjectInfo(rest, len(data), mtime_ns))
        return Listing(sorted(dirs), sorted(files, key=lambda o: o.name))

    def move(self, src, dst):
        self._enter("move")
        with self._lock:
            if src not in self.objects:
                raise ObjectMissing(src)
            self.objects[dst] = self.objects.pop(src)

    def delete_many(self, keys):
        self._enter("delete_many")
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)
