"""The bridge between the trio loop and a blocking store.

Writes (put, move, delete) are *operations*: journaled in LMDB when issued, executed in worker
threads, retried with backoff, and ordered per key: an operation starts only after every
earlier operation on any of its keys has finished, so "put K, delete K, put K" ends with the
last put's bytes whatever the timing. Deletes that are ready together go out as one batch.
Reads (list, head, ranged get) are plain calls with the same retries.

Only the trio thread touches this object; the store runs in `trio.to_thread` workers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Callable

import trio

from shufflefs.journal import Journal
from shufflefs.staging import StagingFile
from shufflefs.stores import ObjectMissing, Store, StoreError, UploadAborted

log = logging.getLogger(__name__)

DELETE_BATCH = 1000
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0


class Op:
    """One remote write. `settled` wakes waiters when the op finished, was cancelled, or has
    failed `max_attempts` times (then `error` is set and retries go on in the background)."""

    def __init__(self, kind: str, key: str, *, dst: str | None = None,
                 staging: StagingFile | None = None):
        self.kind = kind
        self.key = key
        self.dst = dst
        self.staging = staging
        self.size = staging.size if staging is not None else 0
        self.seq = 0
        self.deps: list[Op] = []
        self.started = False
        self.cancelled = False
        self.given_up = False
        self.abort = threading.Event()
        self.finished = trio.Event()
        self.settled = trio.Event()
        self.error: StoreError | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, self.dst) if self.dst is not None else (self.key,)

    def record(self) -> dict:
        record = {"kind": self.kind, "key": self.key}
        if self.dst is not None:
            record["dst"] = self.dst
        if self.staging is not None:
            record["path"] = os.path.basename(self.staging.path)
            record["size"] = self.size
        return record

    def __repr__(self) -> str:
        return f"<{self.kind} {' -> '.join(self.keys)}>"


class Remote:
    def __init__(self, store: Store, journal: Journal, *, workers: int = 8, max_attempts: int = 6,
                 on_put_done: Callable[[Op], None] | None = None):
        self.store = store
        self.journal = journal
        self.max_attempts = max_attempts
        self.on_put_done = on_put_done
        self.pending: set[Op] = set()
        self.pending_put_bytes = 0
        self.given_up: list[Op] = []
        self.stats: Counter[str] = Counter()
        self.draining = False
        self._tail: dict[str, Op] = {}
        self._limiter = trio.CapacityLimiter(workers)
        # reads (listings, ranged GETs) must not queue behind large uploads
        self._read_limiter = trio.CapacityLimiter(workers)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._delete_queue: list[Op] = []
        self._delete_ready = trio.Event()

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._delete_batcher)

    # -- issuing operations (synchronous: safe to call between two awaits of a handler)
    def put(self, key: str, staging: StagingFile) -> Op:
        return self._submit(Op("put", key, staging=staging))

    def move(self, src: str, dst: str) -> Op:
        return self._submit(Op("move", src, dst=dst))

    def delete(self, key: str) -> Op:
        return self._submit(Op("delete", key))

    def resume(self, seq: int, record: dict, staging: StagingFile | None) -> Op:
        """Re-issue an operation found in the journal at start-up (keeps its journal entry)."""
        op = Op(record["kind"], record["key"], dst=record.get("dst"), staging=staging)
        return self._submit(op, seq=seq)

    def _submit(self, op: Op, seq: int | None = None) -> Op:
        op.seq = seq if seq is not None else self.journal.add_op(op.record())
        if op.staging is not None:
            op.staging.ref()  # only once journaled: a failed add_op leaves nothing to undo
        op.deps = [self._tail[k] for k in op.keys if k in self._tail]
        for k in op.keys:
            self._tail[k] = op
        self.pending.add(op)
        if op.kind == "put":
            self.pending_put_bytes += op.size
        assert self._nursery is not None, "Remote.start() was not called"
        self._nursery.start_soon(self._run, op)
        return op

    def last_op(self, key: str) -> Op | None:
        """The newest unfinished operation on `key`, if any."""
        return self._tail.get(key)

    def cancel(self, op: Op) -> None:
        """Give up a put that is no longer wanted. Not started: it never will be. In flight:
        the upload is aborted as soon as the store allows."""
        op.cancelled = True
        op.abort.set()
        # a cancelled put is never needed again, even after a crash
        self.journal.remove_op(op.seq)
        self._notify()  # end its backoff sleep now

    async def wait(self, op: Op) -> None:
        """Wait until `op` settles; raise its StoreError if it could not be done."""
        await op.settled.wait()
        if op.error is not None:
            raise op.error

    async def wait_for_backlog(self, limit: int) -> None:
        while self.pending_put_bytes > limit:
            await self._changed.wait()

    async def settle(self) -> None:
        """Wait until every operation issued so far has finished (later ones are not waited
        for); unlike drain, new operations keep being accepted."""
        for op in list(self.pending):
            await op.finished.wait()

    async def drain(self) -> list[Op]:
        """Wait until every operation finished or gave up; return those that gave up (their
        journal entries stay, for the next mount with this cache dir)."""
        self.draining = True
        self._notify()  # wake ops sleeping in backoff after their last attempt
        reported = float("-inf")
        while self.pending:
            if trio.current_time() - reported >= 5:
                reported = trio.current_time()
                log.info("draining: %d remote operations pending", len(self.pending))
            with trio.move_on_after(5):
                await self._changed.wait()
        return self.given_up

    # -- reads
    async def call(self, fn: Callable, *args, what: str = "", attempts: int = 4):
        """Run one blocking store read with retries; StoreError after the last attempt."""
        delay = BACKOFF_FIRST
        for attempt in range(1, attempts + 1):
            try:
                result = await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)
            except ObjectMissing:
                self.stats[f"{fn.__name__}_requests"] += 1
                raise
            except StoreError as exc:
                if attempt == attempts or not exc.transient:
                    raise
                log.warning("%s failed (attempt %d): %s; retrying", what or fn.__name__, attempt, exc)
            else:
                self.stats[f"{fn.__name__}_requests"] += 1
                if isinstance(result, bytes):
                    self.stats[f"{fn.__name__}_bytes"] += len(result)
                return result
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    # -- execution
    async def _run(self, op: Op) -> None:
        for dep in op.deps:
            await dep.settled.wait()
            if dep.error is not None and not op.settled.is_set():
                # whoever waits for this op learns now that it cannot happen soon
                op.error = dep.error
                op.settled.set()
            await dep.finished.wait()
        if any(dep.given_up for dep in op.deps):
            # after an earlier op on its key was given up, running this one would reorder them
            self._give_up([op])
            return
        if op.cancelled and op.kind == "put":
            self._finish(op)
            return
        if op.kind == "delete":
            self._delete_queue.append(op)
            self._delete_ready.set()
            return  # the batcher finishes it
        op.started = True
        if op.kind == "put":
            op.staging.shared |= self.store.keeps_put_files
            done = await self._attempt([op], self.store.put_file, op.key, op.staging.path, op.abort)
            if done:
                self.stats["put_requests"] += 1
                self.stats["put_bytes"] += op.size
        else:
            done = await self._attempt([op], self.store.move, op.key, op.dst)
            if done:
                self.stats["move_requests"] += 1
        if done:
            self._finish(op)

    async def _delete_batcher(self) -> None:
        while True:
            await self._delete_ready.wait()
            self._delete_ready = trio.Event()
            while self._delete_queue:
                batch, self._delete_queue = self._delete_queue[:DELETE_BATCH], self._delete_queue[DELETE_BATCH:]
                for op in batch:
                    op.started = True
                if await self._attempt(batch, self.store.delete_many, [op.key for op in batch]):
                    self.stats["delete_requests"] += 1
                    self.stats["deleted_keys"] += len(batch)
                    for op in batch:
                        self._finish(op)

    async def _attempt(self, ops: list[Op], fn: Callable, *args) -> bool:
        """Run fn until it succeeds (True) or the op was aborted / given up while draining
        (False, the op is finished either way)."""
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            if all(op.cancelled for op in ops):  # no longer wanted: stop retrying it
                for op in ops:
                    self._finish(op)
                return False
            try:
                await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
                return True
            except UploadAborted:
                for op in ops:
                    self._finish(op)
                return False
            except ObjectMissing as exc:
                # a move whose source is gone: nothing left to move; report, don't retry forever
                log.error("%r: %s", ops[0], exc)
                return True
            except Exception as exc:  # a store bug must not kill the loop: treat as a failure
                error = exc if isinstance(exc, StoreError) else StoreError(f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, StoreError):
                    log.exception("unexpected error from the store in %r", ops[0])
            self.stats["failed_requests"] += 1
            log.warning("%r failed (attempt %d): %s", ops[0], attempt, error)
            if attempt >= self.max_attempts:
                for op in ops:
                    if not op.settled.is_set():
                        op.error = error
                        op.settled.set()
                if self.draining:
                    log.error("giving up on %d operation(s) while draining, kept in the journal "
                              "for the next mount: %r: %s", len(ops), ops[0], error)
                    self._give_up(ops)
                    return False
            with trio.move_on_after(delay):
                while not (self.draining and attempt >= self.max_attempts) and not all(op.cancelled for op in ops):
                    await self._changed.wait()
            delay = min(delay * 2, BACKOFF_MAX)

    def _give_up(self, ops: list[Op]) -> None:
        for op in ops:
            op.given_up = True
            self.given_up.append(op)
            self._finish(op, keep_journal=True)

    def _finish(self, op: Op, keep_journal: bool = False) -> None:
        if op.finished.is_set():
            return
        if not keep_journal:
            self.journal.remove_op(op.seq)
        for k in op.keys:
            if self._tail.get(k) is op:
                del self._tail[k]
        self.pending.discard(op)
        if op.kind == "put":
            self.pending_put_bytes -= op.size
            if not op.cancelled and not keep_journal and self.on_put_done is not None:
                try:
                    self.on_put_done(op)
                except Exception:  # must not take the scheduler (and the daemon) down
                    log.exception("after storing %r", op)
            if not keep_journal:
                op.staging.unref()
        op.finished.set()
        op.settled.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
