"""LMDB state of one cache directory: the journal of pending remote operations, the index cache
and a little metadata. Used from the trio thread only; every method is one short transaction.

The environment is opened with sync=False: a daemon killed by SIGKILL loses nothing (the pages
are in the kernel), a power loss may lose the last transactions, as it may lose the local
staging files those transactions point to.

Keys of the index cache and of the directories are paths under the mount, stored as their
bytes (os.fsencode: a name that is not UTF-8 keeps its bytes). LMDB holds keys of at most
`max_key_size` bytes (511); the filesystem refuses longer paths where it records them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import time
import uuid

import lmdb

from shufflefs.places import SetupError

MAP_SIZE = 8 * 1024**3  # address space only; the file grows as needed


class Journal:
    def __init__(self, path: str):
        # private (directory 0700, files 0600): the index cache holds `.index` contents
        self.env = lmdb.open(path, max_dbs=6, map_size=MAP_SIZE, sync=False, metasync=False, mode=0o700)
        self._ops = self.env.open_db(b"ops")
        self._failed = self.env.open_db(b"failed")
        self._index = self.env.open_db(b"index")
        self._meta = self.env.open_db(b"meta")
        self._dirs = self.env.open_db(b"dirs")
        self._late = self.env.open_db(b"late")
        # failed operations keep their numbers: never hand one out again
        self._next_seq = 1
        for db in (self._ops, self._failed):
            with self.env.begin(db=db) as txn:
                cursor = txn.cursor()
                if cursor.last():
                    self._next_seq = max(self._next_seq, struct.unpack(">Q", cursor.key())[0] + 1)
        self.max_key_size = self.env.max_key_size()

    # -- pending remote operations, in the order they were issued
    def peek_seq(self) -> int:
        """The number the next add_op gives its operation."""
        return self._next_seq

    def add_op(self, record: dict) -> int:
        seq = self._next_seq
        self._next_seq += 1
        with self.env.begin(write=True, db=self._ops) as txn:
            txn.put(struct.pack(">Q", seq), json.dumps(record).encode())
        return seq

    def rewrite_op(self, seq: int, record: dict) -> None:
        """Replace the record of a pending operation (it keeps its place in the order)."""
        with self.env.begin(write=True, db=self._ops) as txn:
            txn.put(struct.pack(">Q", seq), json.dumps(record).encode())

    def remove_op(self, seq: int) -> None:
        with self.env.begin(write=True, db=self._ops) as txn:
            txn.delete(struct.pack(">Q", seq))

    def pending_ops(self) -> list[tuple[int, dict]]:
        with self.env.begin(db=self._ops) as txn:
            return [(struct.unpack(">Q", k)[0], json.loads(v)) for k, v in txn.cursor()]

    # -- operations the store refused for good: kept for operators (`shufflefs journal`), never
    # retried, so one bad key cannot hold back a mount or every later one
    def fail_op(self, seq: int, record: dict, error: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(struct.pack(">Q", seq), db=self._ops)
            failed = {**record, "error": error, "failed_at": time.time()}
            txn.put(struct.pack(">Q", seq), json.dumps(failed).encode(), db=self._failed)

    def failed_ops(self) -> list[tuple[int, dict]]:
        with self.env.begin(db=self._failed) as txn:
            return [(struct.unpack(">Q", k)[0], json.loads(v)) for k, v in txn.cursor()]

    def drop_op(self, seq: int) -> bool:
        """Remove a pending or failed operation; whether there was one."""
        with self.env.begin(write=True) as txn:
            key = struct.pack(">Q", seq)
            return bool(txn.delete(key, db=self._ops) | txn.delete(key, db=self._failed))

    def writer_id(self) -> str:
        """A name for this run's writes, unique across cache dirs and runs: the cache dir's
        instance id (made once) and a counter of runs. Tokens of writes are `<this>.<seq>`."""
        instance = self.meta_get("instance")
        if instance is None:
            instance = uuid.uuid4().hex[:16]
            self.meta_set("instance", instance)
        run = int(self.meta_get("runs") or 0) + 1
        self.meta_set("runs", str(run))
        return f"{instance}.{run}"

    # -- index cache: key -> whole .index file
    def index_get(self, key: str) -> bytes | None:
        with self.env.begin(db=self._index) as txn:
            return txn.get(os.fsencode(key))

    def index_put(self, key: str, data: bytes) -> None:
        if len(os.fsencode(key)) > self.max_key_size:
            return  # a file another node stored at a path too long for LMDB: read, not cached
        with self.env.begin(write=True, db=self._index) as txn:
            txn.put(os.fsencode(key), data)

    def index_delete(self, key: str) -> None:
        with self.env.begin(write=True, db=self._index) as txn:
            txn.delete(os.fsencode(key))

    def index_move(self, src: str, dst: str) -> None:
        with self.env.begin(write=True, db=self._index) as txn:
            data = txn.pop(os.fsencode(src))
            if data is not None:
                txn.put(os.fsencode(dst), data)

    def index_retain(self, keys: set[str]) -> int:
        """Drop every index cache entry but those of `keys`; return how many went."""
        with self.env.begin(write=True, db=self._index) as txn:
            stale = [k for k in txn.cursor().iternext(values=False) if os.fsdecode(k) not in keys]
            for k in stale:
                txn.delete(k)
        return len(stale)

    # -- directories the mount created: key -> {"mode", "uid", "gid"} and, for a block manager's
    # directory, its "executor" and "adopter" (shufflefs.views); a restarted daemon puts them
    # back, so a process that cached a directory's existence can still create files in it
    def dir_set(self, key: str, mode: int, uid: int, gid: int, **executors: dict) -> None:
        with self.env.begin(write=True, db=self._dirs) as txn:
            txn.put(os.fsencode(key), json.dumps({"mode": mode, "uid": uid, "gid": gid, **executors}).encode())

    def dir_remove(self, key: str) -> None:
        with self.env.begin(write=True, db=self._dirs) as txn:
            txn.delete(os.fsencode(key))

    def dir_move(self, src: str, dst: str) -> None:
        """The directory `src` and everything below it now live under `dst`."""
        with self.env.begin(write=True, db=self._dirs) as txn:
            src_b, dst_b = os.fsencode(src), os.fsencode(dst)
            moved = [(k, v) for k, v in txn.cursor() if k == src_b or k.startswith(src_b + b"/")]
            for k, v in moved:
                txn.delete(k)
                txn.put(dst_b + k[len(src_b) :], v)

    def dirs(self) -> list[tuple[str, dict]]:
        """Every recorded directory, parents before children."""
        with self.env.begin(db=self._dirs) as txn:
            return [(os.fsdecode(k), json.loads(v)) for k, v in txn.cursor()]

    def dirs_clear(self) -> None:
        with self.env.begin(write=True, db=self._dirs) as txn:
            txn.drop(self._dirs, delete=False)

    # -- writes of this cache dir's daemons that may still land at a key (their requests were
    # given up, or their daemon died): key -> [[token, until], ...], until a move or delete of
    # the key journals a sweep for them, or their window is over (`until`, wall clock)
    def late_add(self, key: str, token: str, until: float) -> None:
        with self.env.begin(write=True, db=self._late) as txn:
            entries = json.loads(txn.get(os.fsencode(key)) or b"[]")
            entries.append([token, until])
            txn.put(os.fsencode(key), json.dumps(entries).encode())

    def late_take(self, key: str) -> None:
        with self.env.begin(write=True, db=self._late) as txn:
            txn.delete(os.fsencode(key))

    def late_entries(self) -> dict[str, list[tuple[str, float]]]:
        with self.env.begin(db=self._late) as txn:
            return {os.fsdecode(k): [tuple(e) for e in json.loads(v)] for k, v in txn.cursor()}

    def late_expire(self, now: float) -> None:
        """Forget the writes whose window is over: they can no longer land."""
        with self.env.begin(write=True, db=self._late) as txn:
            for k, v in list(txn.cursor()):
                entries = [e for e in json.loads(v) if e[1] > now]
                if entries:
                    txn.put(k, json.dumps(entries).encode())
                else:
                    txn.delete(k)

    # -- metadata
    def meta_get(self, name: str) -> str | None:
        with self.env.begin(db=self._meta) as txn:
            value = txn.get(name.encode())
            return value.decode() if value is not None else None

    def meta_set(self, name: str, value: str) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.put(name.encode(), value.encode())

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


class CacheDirBusy(SetupError):
    pass


@contextlib.contextmanager
def open_journal(path: str, *, exclusive: bool):
    """The journal of an existing cache dir, for `shufflefs journal`; with `exclusive`, only
    while no daemon uses the cache dir (its journal would not see the change)."""
    if not os.path.isdir(os.path.join(path, "lmdb")):
        raise CacheDirBusy(f"{path} is not a shufflefs cache dir (no lmdb/ in it)")
    with open(os.path.join(path, "lock"), "a+") as lock:
        if exclusive:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise CacheDirBusy(
                    f"cache dir {path} is in use by a shufflefs daemon (pid "
                    f"{lock.read().strip() or '?'}): unmount it first"
                ) from None
        try:
            journal = Journal(os.path.join(path, "lmdb"))
        except lmdb.Error as exc:
            raise CacheDirBusy(f"cannot read the journal in {path}: {exc}") from None
        try:
            yield journal
        finally:
            journal.close()
