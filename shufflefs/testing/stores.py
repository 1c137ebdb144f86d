"""Real stores for tests that see what was asked of them and play what a test scripts: the
core's tests record calls and hold them at gates (`Recorder`); the store machinery's tests
script each call per method and key (`Steering`: wait, refuse, fail, lose the answer, land
late, crash)."""

from __future__ import annotations

import os
import tempfile
import threading
import time

from shufflefs.stores import StoreError
from shufflefs.stores.file import FileStore
from shufflefs.stores.memory import MemoryStore


class Recorder:
    """Mixin for a real store: logs every call with its keys, and can hold uploads at a gate
    (to see what happens while an upload is in flight) or ignore the abort event (a store that
    cannot stop an upload once it started)."""

    def _setup_recorder(self) -> None:
        self.log: list[tuple] = []
        self.gate = threading.Event()  # holds put_file
        self.gate.set()
        self.move_gate = threading.Event()  # holds move
        self.move_gate.set()
        self.copy_gate = threading.Event()  # holds copy
        self.copy_gate.set()
        self.delete_gate = threading.Event()  # holds delete_many
        self.delete_gate.set()
        self.honor_abort = True
        self.hang_listings = threading.Event()

    def calls_of(self, method: str, key: str | None = None) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == method and (key is None or entry[1] == key)]

    def put_file(self, key, path, abort=None, **conditions):
        self.log.append(("put_file", key))
        if not self.gate.wait(30):
            raise StoreError("test gate stayed closed", transient=False)
        return super().put_file(key, path, abort if self.honor_abort else None, **conditions)

    def get_range(self, key, offset, length, **conditions):
        self.log.append(("get_range", key, offset, length))
        return super().get_range(key, offset, length, **conditions)

    def head(self, key):
        self.log.append(("head", key))
        return super().head(key)

    def list_dir(self, prefix):
        self.log.append(("list_dir", prefix))
        while self.hang_listings.is_set():  # a store that does not answer
            time.sleep(0.01)
        return super().list_dir(prefix)

    def move(self, src, dst, **conditions):
        self.log.append(("move", src, dst))
        if not self.move_gate.wait(30):
            raise StoreError("test gate stayed closed", transient=False)
        return super().move(src, dst, **conditions)

    def copy(self, src, dst, **conditions):
        self.log.append(("copy", src, dst))
        if not self.copy_gate.wait(30):
            raise StoreError("test gate stayed closed", transient=False)
        return super().copy(src, dst, **conditions)

    def delete_many(self, keys, **conditions):
        self.log.append(("delete_many", tuple(keys)))
        if not self.delete_gate.wait(30):
            raise StoreError("test gate stayed closed", transient=False)
        return super().delete_many(keys, **conditions)


class RecordingMemoryStore(Recorder, MemoryStore):
    def __init__(self):
        MemoryStore.__init__(self)
        self._setup_recorder()


class RecordingFileStore(Recorder, FileStore):
    def __init__(self, root: str):
        os.makedirs(root)
        FileStore.__init__(self, root)
        self._setup_recorder()


def contents(store) -> dict[str, bytes]:
    """Every object in the store, byte for byte."""
    if isinstance(store, MemoryStore):
        return {key: value[0] for key, value in store.objects.copy().items()}
    result = {}
    for dirpath, _, filenames in os.walk(store.root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            with open(path, "rb") as f:
                result[os.path.relpath(path, store.root)] = f.read()
    return result


# -- one filesystem core as the daemon builds it ------------------------------------------------


class Steering:
    """Mixin for a real store: every call logged with its keys when it comes in (`log`) and
    writes when they took effect (`applied`), and a script of what the next call of a method
    on a key does (`then`):

    - a threading.Event: wait for the test to set it (a call in flight);
    - "refuse": fail for good (a 4xx: `transient=False`);
    - "fail": fail transiently without reaching the store (a connection reset);
    - "lose": take effect, then fail transiently (the answer was lost on the way back);
    - "late": fail transiently now and take effect when the test calls `land_late()`
      (a request the store applied after its sender timed out);
    - "crash": raise something that is no StoreError (a bug in a store).

    Deletes follow the script per key: a key's "refuse" or "fail" is that key's result in
    delete_many's answer (S3 DeleteObjects reports errors per key). `malformed` keys make a
    delete_many of several keys fail as a whole, for good (SeaweedFS answers MalformedXML for
    a batch with a key XML cannot carry), and fail for good alone.
    """

    def _setup_steering(self) -> None:
        self.log: list[tuple] = []
        self.applied: list[tuple] = []
        self.script: dict[tuple[str, str], list] = {}
        self.gates: list[threading.Event] = []
        self.malformed: set[str] = set()
        self._late: list = []
        self._steer_lock = threading.Lock()

    def then(self, method: str, key: str, *actions) -> None:
        self.script.setdefault((method, key), []).extend(actions)

    def hold(self, method: str, key: str) -> threading.Event:
        """Hold the next `method` call on `key` until the returned event is set."""
        gate = threading.Event()
        self.gates.append(gate)
        self.then(method, key, gate)
        return gate

    def open_gates(self) -> None:
        for gate in self.gates:
            gate.set()

    def land_late(self) -> list:
        """Apply every call that failed with "late" now; what each returned or raised."""
        outcomes = []
        for apply in self._late:
            try:
                outcomes.append(apply())
            except StoreError as exc:
                outcomes.append(exc)
        self._late.clear()
        return outcomes

    def count(self, method: str, key: str | None = None) -> int:
        """Calls of `method` (on `key`, one of the keys of a batch too) so far."""
        total = 0
        for entry in self.log:
            keys = entry[1] if isinstance(entry[1], tuple) else entry[1:]
            total += entry[0] == method and (key is None or key in keys)
        return total

    def _next(self, method: str, key: str):
        with self._steer_lock:
            actions = self.script.get((method, key))
            return actions.pop(0) if actions else None

    @staticmethod
    def _wait(gate: threading.Event) -> None:
        if not gate.wait(20):
            raise StoreError("the test's gate stayed closed", transient=False)

    def _before(self, method: str, key: str):
        action = self._next(method, key)
        if isinstance(action, threading.Event):
            self._wait(action)
        elif action == "refuse":
            raise StoreError(f"{method} {key}: InvalidArgument", transient=False)
        elif action == "fail":
            raise StoreError(f"{method} {key}: connection reset", transient=True)
        elif action == "crash":
            raise RuntimeError(f"{method} {key}: a bug in the store")
        return action

    def put_file(self, key, path, abort=None, **conditions):
        self.log.append(("put_file", key))
        action = self._before("put_file", key)
        if action == "late":
            with open(path, "rb") as f:  # the body was sent: what the store applies later
                body = f.read()

            def apply():
                fd, late_path = tempfile.mkstemp()
                try:
                    os.write(fd, body)
                    version = super(Steering, self).put_file(key, late_path, **conditions)
                finally:
                    os.close(fd)
                    os.unlink(late_path)
                self.applied.append(("put_file", key))
                return version

            self._late.append(apply)
            raise StoreError(f"put_file {key}: read timed out", transient=True)
        version = super().put_file(key, path, abort, **conditions)
        self.applied.append(("put_file", key))
        if action == "lose":
            raise StoreError(f"put_file {key}: read timed out", transient=True)
        return version

    def move(self, src, dst, **conditions):
        self.log.append(("move", src, dst))
        self._before("move", src)
        version = super().move(src, dst, **conditions)
        self.applied.append(("move", src, dst))
        return version

    def head(self, key):
        self.log.append(("head", key))
        self._before("head", key)
        return super().head(key)

    def get_range(self, key, offset, length, **conditions):
        self.log.append(("get_range", key))
        self._before("get_range", key)
        return super().get_range(key, offset, length, **conditions)

    def delete_many(self, keys, **conditions):
        self.log.append(("delete_many", tuple(keys)))
        if len(keys) > 1 and self.malformed.intersection(keys):
            raise StoreError("DeleteObjects: MalformedXML", transient=False)
        failed, rest = {}, []
        for key in keys:
            action = self._next("delete_many", key)
            if isinstance(action, threading.Event):
                self._wait(action)
            if action == "refuse" or key in self.malformed:
                failed[key] = StoreError(f"deleting {key}: InvalidArgument", transient=False)
            elif action == "fail":
                failed[key] = StoreError(f"deleting {key}: InternalError", transient=True)
            else:
                rest.append(key)
        failed.update(super().delete_many(rest, **conditions))
        self.applied.append(("delete_many", tuple(k for k in rest if k not in failed)))
        return failed


class SteeredMemoryStore(Steering, MemoryStore):
    def __init__(self):
        MemoryStore.__init__(self)
        self._setup_steering()


class SteeredFileStore(Steering, FileStore):
    def __init__(self, root: str):
        os.makedirs(root)
        FileStore.__init__(self, root)
        self._setup_steering()
