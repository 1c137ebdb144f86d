"""The bridge between the trio loop and a blocking store.

Writes (put, move, delete) are *operations*: journaled in LMDB when issued, executed in worker
threads, retried with backoff, and ordered per key: an operation starts only after every
earlier operation on any of its keys has finished, so "put K, delete K, put K" ends with the
last put's bytes whatever the timing. Deletes that are ready together go out as one batch.
Reads (list, head, ranged get) are plain calls with the same retries.

On a conditional store every write also carries what it expects the key to hold (the version
the previous operation on the key left, or ABSENT) and a token naming it, so that a request the
store applies late (after its sender timed out, or died) cannot undo a later one; a put the
store may still apply after the key was deleted is looked for again after `late_window`
seconds and removed (a *sweep*). See DESIGN.md "Late requests".

A store error that retrying cannot cure (`transient=False`) fails the operation at once: it is
recorded in the journal's failed list for operators (`shufflefs journal`), and never holds back
other keys or later mounts.

Only the trio thread touches this object; the store runs in `trio.to_thread` workers.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import trio

from shufflefs.journal import Journal
from shufflefs.staging import StagingFile
from shufflefs.stores import ABSENT, ObjectMissing, PreconditionFailed, Store, StoreError, UploadAborted
from shufflefs.waits import about_to_wait

log = logging.getLogger(__name__)

DELETE_BATCH = 1000
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
#: a request is assumed applied or dropped by the store this long after its sender gave up on
#: it (twice boto3's read timeout); until then a put that may land late is watched for
LATE_WINDOW = 120.0
#: seconds a FUSE request waits for the store (a read, a sync commit's upload) before it fails
REQUEST_TIMEOUT = 10.0
#: conditional writes that find the key changed under them are re-aimed at most this often
#: before the attempt counts as failed
MAX_CONFLICTS = 4


class Op:
    """One remote write. `settled` wakes waiters when the op finished, was cancelled, failed
    for good, or has failed `max_attempts` times (then `error` is set and retries go on in the
    background)."""

    def __init__(
        self,
        kind: str,
        key: str,
        *,
        dst: str | None = None,
        staging: StagingFile | None = None,
        tokens: list[str] | None = None,
        hints: dict[str, str | None] | None = None,
    ):
        self.kind = kind
        self.key = key
        self.dst = dst
        self.created = time.monotonic()  # the age of what waits for the store (metrics)
        #: the version each key holds, as the caller knows it (None: unknown); used where no
        #: earlier operation on the key is pending, whose outcome is known better
        self.hints = hints or {}
        #: what it expects each key to hold when it runs (see Remote._expectations)
        self.expects: dict[str, str | None] = {}
        self.staging = staging
        self.size = staging.size if staging is not None else 0
        #: puts: a committed key whose object may hold the same bytes, and the local copy of
        #: them (see Remote.put); the put is then a copy in the store if the bytes are equal
        self.source: str | None = None
        self.source_staging: StagingFile | None = None
        self.source_compared = False  # the caller found the local copies equal already
        self.copied = False  # done as a copy: no bytes sent
        self.seq = 0
        self.token = ""
        #: sweeps: the tokens of the puts that may still land at `key`
        self.tokens = tokens or []
        self.not_before = 0.0  # sweeps: wall-clock time
        self.deps: list[Op] = []
        self.started = False
        self.cancelled = False
        self.given_up = False
        self.failed = False
        self.reported = False  # its error reached a caller waiting for it (a sync commit)
        #: an attempt failed in a way that may still reach the store later (or a dead
        #: daemon's attempt may): its token may show up at the key after this op finished
        self.uncertain = False
        self.version: str | None = None  # what the store holds at the op's key afterwards
        self.abort = threading.Event()
        self.finished = trio.Event()
        self.settled = trio.Event()
        self.error: StoreError | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, self.dst) if self.dst is not None else (self.key,)

    @property
    def landing_key(self) -> str:
        """Where this write puts an object."""
        return self.dst if self.dst is not None else self.key

    def record(self) -> dict:
        record = {"kind": self.kind, "key": self.key}
        if self.dst is not None:
            record["dst"] = self.dst
        if self.staging is not None:
            record["path"] = os.path.basename(self.staging.path)
            record["size"] = self.size
        if self.token:
            record["token"] = self.token
        if self.kind == "sweep":
            record["tokens"] = self.tokens
            record["not_before"] = self.not_before
        return record

    def __repr__(self) -> str:
        return f"<{self.kind} {' -> '.join(self.keys)}>"


class Remote:
    def __init__(
        self,
        store: Store,
        journal: Journal,
        *,
        workers: int = 8,
        max_attempts: int = 6,
        late_window: float = LATE_WINDOW,
        request_timeout: float = REQUEST_TIMEOUT,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        on_put_done: Callable[[Op], None] | None = None,
        on_failed: Callable[[Op], None] | None = None,
    ):
        self.store = store
        self.journal = journal
        self.max_attempts = max_attempts
        #: the wait before the first retry of a failed request, doubling up to backoff_max
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        #: keys per delete request (S3's DeleteObjects takes 1000)
        self.delete_batch = DELETE_BATCH
        self.late_window = late_window
        #: the longest a caller waits for a read of the store, or a sync commit for its upload
        self.request_timeout = request_timeout
        self.on_put_done = on_put_done
        self.on_failed = on_failed
        self.pending: set[Op] = set()
        self.pending_put_bytes = 0
        self.given_up: list[Op] = []
        #: operations the store refused for good during this run
        self.failed: list[Op] = []
        self.sweeps: set[Op] = set()
        self.stats: Counter[str] = Counter()
        self.draining = False
        self._writer = journal.writer_id()
        self._instance = self._writer.split(".")[0]
        self._tail: dict[str, Op] = {}
        #: what a key holds after the last finished operation on it (a version, ABSENT, or
        #: None: unknown), kept only while a later operation on the key waits: the callers
        #: know the versions of idle keys (each file's node keeps its own), so this costs no
        #: memory per file
        self._versions: dict[str, str | None] = {}
        #: tokens of this mount's writes that may still land at a key (see Op.uncertain)
        self._late: dict[str, list[str]] = {}
        # and those an earlier daemon with this cache dir left (journaled: it may have died
        # before a move or delete of the key journaled a sweep for them)
        journal.late_expire(time.time())
        for key, entries in journal.late_entries().items():
            self._late[key] = [token for token, _until in entries]
        self._limiter = trio.CapacityLimiter(workers)
        # reads (listings, ranged GETs) must not queue behind large uploads
        self._read_limiter = trio.CapacityLimiter(workers)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._delete_queue: list[Op] = []
        self._delete_ready = trio.Event()

    @property
    def instance(self) -> str:
        """This cache dir's name among the writers of the store (kept across runs)."""
        return self._instance

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._delete_batcher)

    # -- issuing operations (synchronous: safe to call between two awaits of a handler)
    def put(
        self,
        key: str,
        staging: StagingFile,
        *,
        replaces: str | None = None,
        copy_of: tuple[str, str | None, StagingFile] | None = None,
        compared: bool = False,
    ) -> Op:
        """Store `staging` at `key`; `replaces`: the version there now, if known. `copy_of`:
        (key, version if known, local copy) of a committed file that may hold the same bytes
        (a decommission's fallback copy, docs/RECOVERY.md): if the store can copy, the local
        files are equal and that object is still there, the store copies it instead of
        receiving the bytes again (`compared`: the caller found the local files equal). Not
        journaled: a put resumed after a crash sends its bytes."""
        op = Op("put", key, staging=staging, hints={key: replaces})
        if copy_of is not None and self.store.copies:
            op.source, op.hints[op.source], op.source_staging = copy_of
            op.source_staging.ref()
            op.source_compared = compared
        return self._submit(op)

    def move(self, src: str, dst: str, *, version: str | None = None, replaces: str | None = None) -> Op:
        """Move the object at `src` (in `version`, if known) to `dst` (holding `replaces`)."""
        return self._submit(Op("move", src, dst=dst, hints={src: version, dst: replaces}))

    def delete(self, key: str, *, version: str | None = None) -> Op:
        """Delete `key` (the object in `version`, if known; else whatever is there)."""
        return self._submit(Op("delete", key, hints={key: version}))

    def resume(self, seq: int, record: dict, staging: StagingFile | None) -> Op:
        """Re-issue an operation found in the journal at start-up (keeps its journal entry).
        The dead daemon's attempts at it may still be on their way to the store."""
        op = Op(record["kind"], record["key"], dst=record.get("dst"), staging=staging, tokens=record.get("tokens"))
        op.token = record.get("token", "")
        op.not_before = record.get("not_before", 0.0)
        if record.get("in_flight"):
            # a cancelled put whose request was on its way when the daemon died: it may land
            # until a late window after that death, which was before now
            op.not_before = time.time() + self.late_window
        op.uncertain = True
        return self._submit(op, seq=seq)

    def _submit(self, op: Op, seq: int | None = None) -> Op:
        if seq is None:
            if op.kind != "sweep":
                op.token = f"{self._writer}.{self.journal.peek_seq()}"
            seq = self.journal.add_op(op.record())
        op.seq = seq
        if op.staging is not None:
            op.staging.ref()  # only once journaled: a failed add_op leaves nothing to undo
        assert self._nursery is not None, "Remote.start() was not called"
        if op.kind in ("sweep", "discard"):  # ordered with nothing: they only remove their own debris
            self.sweeps.add(op)
            self._nursery.start_soon(self._sweep if op.kind == "sweep" else self._discard, op)
            return op
        op.deps = [self._tail[k] for k in op.keys if k in self._tail]
        if op.source in self._tail:
            # after the source's own upload; later operations on the source do not wait for
            # this one (a source deleted first only means the bytes are sent after all)
            op.deps.append(self._tail[op.source])
        for k in op.keys:
            self._tail[k] = op
        self.pending.add(op)
        if op.kind == "put":
            self.pending_put_bytes += op.size
        self._nursery.start_soon(self._run, op)
        return op

    def oldest_pending_seconds(self) -> float:
        """How long the oldest operation not yet done has waited (0: none)."""
        return max((time.monotonic() - op.created for op in self.pending), default=0.0)

    def last_op(self, key: str) -> Op | None:
        """The newest unfinished operation on `key`, if any."""
        return self._tail.get(key)

    def cancel(self, op: Op) -> None:
        """Give up a put that is no longer wanted. Not started: it never will be. In flight:
        the upload is aborted as soon as the store allows."""
        op.cancelled = True
        op.abort.set()
        if op.failed:
            # refused for good, and now no longer wanted (a failed sync rename, undone, cancels
            # its put): not a loss to report
            self.failed.remove(op)
            self.journal.drop_op(op.seq)
        elif op.kind == "put" and (op.started or op.uncertain) and not op.finished.is_set():
            if op.token and self.store.conditional:
                # never needed again, even after a crash; but a request of it may be on its way
                # (and a dead daemon's may: op.uncertain) and land after a crash, when this
                # daemon no longer knows to look for it: until it finished here, the journal
                # keeps its token for the next daemon, which sweeps the key a late window after
                # it started
                self.journal.rewrite_op(
                    op.seq, {"kind": "sweep", "key": op.key, "tokens": [op.token], "in_flight": True}
                )
            else:
                # an attempt cut short by a crash may leave what the store staged it under (the
                # file store's temporary file): until it finished here, the journal keeps what
                # the next daemon needs to remove that
                self.journal.rewrite_op(op.seq, {"kind": "discard", "key": op.key, "token": op.token})
        else:
            self.journal.remove_op(op.seq)
        self._notify()  # end its backoff sleep now

    async def wait(self, op: Op, timeout: float = math.inf) -> None:
        """Wait until `op` settles; raise its StoreError if it could not be done, or if it
        did not settle within `timeout` seconds (it goes on in the background)."""
        if not op.settled.is_set():
            about_to_wait()
        with trio.move_on_after(timeout):
            await op.settled.wait()
        if not op.settled.is_set():
            raise StoreError(f"{op!r}: no answer from the store within {timeout:g} s")
        if op.error is not None:
            op.reported = True
            raise op.error

    async def wait_for_backlog(self, limit: int) -> None:
        while self.pending_put_bytes > limit:
            about_to_wait()
            await self._changed.wait()

    async def settle(self) -> None:
        """Wait until every operation issued so far has finished (later ones are not waited
        for); unlike drain, new operations keep being accepted."""
        for op in list(self.pending):
            await op.finished.wait()

    async def drain(self) -> list[Op]:
        """Wait until every operation finished or gave up; return those that gave up (their
        journal entries stay, for the next mount with this cache dir). Sweeps not due yet stay
        in the journal too: the next mount with this cache dir does them."""
        self.draining = True
        self._notify()  # wake ops sleeping in backoff after their last attempt
        reported = float("-inf")
        while self.pending:
            if trio.current_time() - reported >= 5:
                reported = trio.current_time()
                log.info("draining: %d remote operations pending", len(self.pending))
            with trio.move_on_after(5):
                await self._changed.wait()
        self.journal.late_expire(time.time())
        return self.given_up

    # -- reads
    async def call(self, fn: Callable, *args, what: str = "", attempts: int = 4, **kwargs):
        """Run one blocking store read with retries; StoreError after the last attempt, or
        when the store gave no answer within `request_timeout` (the call is abandoned: a read
        changes nothing)."""
        about_to_wait()
        with trio.move_on_after(self.request_timeout):
            return await self._call(fn, args, kwargs, what, attempts)
        raise StoreError(f"{what or fn.__name__}: no answer from the store within {self.request_timeout:g} s")

    async def _call(self, fn: Callable, args: tuple, kwargs: dict, what: str, attempts: int):
        delay = self.backoff_first
        for attempt in range(1, attempts + 1):
            try:
                result = await trio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), limiter=self._read_limiter, abandon_on_cancel=True
                )
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
            delay = min(delay * 2, self.backoff_max)

    # -- execution
    def _expectations(self, op: Op) -> None:
        """What `op` expects each of its keys to hold: what the operation before it on the
        key left, else what its caller knew."""
        for key in op.keys:
            follows = any(key in dep.keys for dep in op.deps)
            op.expects[key] = self._versions.get(key) if follows else op.hints.get(key)

    def _write_expectation(self, op: Op, key: str) -> str | None:
        """The condition of a write to `key`: an unknown key is optimistically taken as absent
        (a wrong guess costs one HEAD); none on a store without conditions."""
        if not self.store.conditional:
            return None
        expect = op.expects.get(key)
        return ABSENT if expect is None else expect

    async def _run(self, op: Op) -> None:
        for dep in op.deps:
            await dep.settled.wait()
            if dep.error is not None and not dep.failed and not op.settled.is_set():
                # whoever waits for this op learns now that it cannot happen soon
                op.error = dep.error
                op.settled.set()
            await dep.finished.wait()
        self._expectations(op)
        if any(dep.given_up for dep in op.deps):
            # after an earlier op on its key was given up, running this one would reorder them
            self._give_up([op])
            return
        if op.cancelled and op.kind == "put":
            if op.uncertain:  # resumed after a crash: its interrupted attempt may have left debris
                try:
                    await trio.to_thread.run_sync(self.store.discard_put, op.key, op.token, limiter=self._limiter)
                except StoreError as exc:
                    log.warning("%r: %s", op, exc)
            self._finish(op)
            return
        if op.kind == "delete":
            self._delete_queue.append(op)
            self._delete_ready.set()
            return  # a delete batch finishes it
        op.started = True
        if op.kind == "put":
            op.staging.shared |= self.store.keeps_put_files
            version = await self._attempt([op], self._blocking_put, op, self._write_expectation(op, op.key))
        else:
            source = op.expects.get(op.key) if self.store.conditional else None
            version = await self._attempt([op], self._blocking_move, op, source, self._write_expectation(op, op.dst))
        if version is _NOT_DONE:
            return
        op.version = version
        if op.copied:
            self.stats["copy_requests"] += 1
            self.stats["copied_bytes"] += op.size
        else:
            self.stats[f"{op.kind}_requests"] += 1
            if op.kind == "put":
                self.stats["put_bytes"] += op.size
        self._finish(op)

    def _blocking_put(self, op: Op, expect: str | None) -> str | None:
        """One attempt at a put (in a worker thread): the write, re-aimed when the key is not
        what was expected. Whatever holds the key then is older than this put (operations on
        a key run in order; a late request of an earlier one, or another mount's write), so it
        is replaced; but if it is this put's own earlier attempt, the put is done."""
        copy, source_version = self._copy_source(op) if op.source is not None else (False, None)
        for _ in range(MAX_CONFLICTS):
            try:
                if copy:
                    try:
                        version = self.store.copy(
                            op.source, op.key, expect_src=source_version, expect_dst=expect, token=op.token
                        )
                        op.copied = True
                        return version
                    except ObjectMissing:
                        copy = False  # the source went since: send the bytes
                        continue
                    except PreconditionFailed:
                        source = self.store.head(op.source)  # which key was not as expected?
                        if source is None or source.version != source_version:
                            copy = False
                            continue
                        raise
                return self.store.put_file(op.key, op.staging.path, op.abort, expect=expect, token=op.token)
            except PreconditionFailed:
                info = self.store.head(op.key)
                if info is not None and info.token == op.token:
                    return info.version
                expect = info.version if info is not None else ABSENT
        raise StoreError(f"{op.key!r} kept changing while it was being written")

    def _copy_source(self, op: Op) -> tuple[bool, str | None]:
        """(in a worker thread) Whether the put can be a copy of op.source, and the version to
        copy: the local files hold the same bytes, and the object there is the one this mount
        stored (the version the caller knew, else one of the same size)."""
        if not (op.source_compared or same_bytes(op.staging.path, op.source_staging.path)):
            return False, None
        source = self.store.head(op.source)
        known = op.hints.get(op.source)
        if source is None or source.size != op.size or known not in (None, source.version):
            return False, None
        return True, source.version if self.store.conditional else None

    def _blocking_move(self, op: Op, expect_src: str | None, expect_dst: str | None) -> str | None:
        """One attempt at a move (in a worker thread); like a put, an unexpected object at the
        destination is replaced, and the move's own earlier attempt counts as done. A source
        that is not the version this mount wrote there is not moved: another writer replaced
        it, and its bytes are not the ones this mount's file holds."""
        if expect_src in (None, ABSENT) and self.store.conditional:
            # a source this mount never saw a version of (a move resumed after a restart):
            # move the version there now, and remove only that one
            source = self.store.head(op.key)
            expect_src = source.version if source is not None else None
        for _ in range(MAX_CONFLICTS):
            try:
                return self.store.move(op.key, op.dst, expect_src=expect_src, expect_dst=expect_dst, token=op.token)
            except (PreconditionFailed, ObjectMissing) as exc:
                landed = self.store.head(op.dst)
                if landed is not None and op.token and landed.token == op.token:
                    # the copy happened; its answer, or the source's removal, was lost
                    self._blocking_delete_stale(op.key, expect_src)
                    return landed.version
                if isinstance(exc, ObjectMissing):
                    raise
                source = self.store.head(op.key)
                if source is None:
                    raise ObjectMissing(op.key) from None
                if expect_src not in (None, ABSENT, source.version):
                    raise StoreError(
                        f"not moving {op.key!r} to {op.dst!r}: another writer replaced it", transient=False
                    ) from None
                expect_src = source.version if self.store.conditional else None
                expect_dst = landed.version if landed is not None else ABSENT
        raise StoreError(f"{op.dst!r} kept changing while {op.key!r} was being moved there")

    def _blocking_delete_stale(self, key: str, expect: str | None) -> None:
        """Remove `key` if it still holds `expect` (a source left behind by a move)."""
        failed = self.store.delete_many([key], expect={key: expect} if expect else None)
        if key in failed and not isinstance(failed[key], PreconditionFailed):
            raise failed[key]

    def _blocking_delete(self, keys: list[str], expect: dict[str, str | None]) -> dict[str, StoreError]:
        """One attempt at a batch of deletes (in a worker thread). A key is deleted only in the
        version this mount last saw; one that holds something else is deleted only if that is
        a late write of this mount's own (its token is ours), and otherwise left to whoever
        wrote it. Returns the keys that failed, with why."""
        conditions = {}
        if self.store.conditional:
            for key in keys:
                version = expect.get(key)
                if version is None:  # never seen: delete what is there now, in that version
                    info = self.store.head(key)
                    if info is None:
                        continue
                    version = info.version
                conditions[key] = version
        try:
            failed = self.store.delete_many(keys, expect=conditions or None)
        except StoreError as exc:
            if exc.transient or len(keys) == 1:
                raise
            # the store refused the whole batch (SeaweedFS answers MalformedXML for a batch with
            # one key XML cannot carry): find the key, rather than fail the others with it
            failed = {}
            for key in keys:
                try:
                    failed.update(
                        self.store.delete_many([key], expect={key: conditions[key]} if key in conditions else None)
                    )
                except StoreError as single:
                    if single.transient:
                        raise
                    failed[key] = single
        for _ in range(MAX_CONFLICTS):
            conflicts = [k for k, e in failed.items() if isinstance(e, PreconditionFailed)]
            if not conflicts:
                break
            again = {}
            for key in conflicts:
                del failed[key]
                info = self.store.head(key)
                if info is None:
                    continue
                if info.token is not None and info.token.startswith(self._instance + "."):
                    again[key] = info.version
                else:
                    log.warning("not deleting %s: another writer replaced it since this mount saw it", key)
            if not again:
                break
            failed.update(self.store.delete_many(list(again), expect=again))
        return failed

    async def _delete_batcher(self) -> None:
        while True:
            await self._delete_ready.wait()
            self._delete_ready = trio.Event()
            while self._delete_queue:
                size = self.delete_batch
                batch, self._delete_queue = self._delete_queue[:size], self._delete_queue[size:]
                for op in batch:
                    op.started = True
                # deletes queue up while a batch's first attempt runs (that makes the batches);
                # the keys of it that keep failing are retried on their own, holding back no
                # other delete
                await self._nursery.start(self._delete_batch, batch)

    async def _delete_batch(self, batch: list[Op], task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Delete a batch; reports started once its first attempt is done, and retries the
        keys that failed on their own."""
        remaining = batch
        delay = self.backoff_first
        attempt = 0
        while remaining:
            attempt += 1
            expect = {op.key: op.expects.get(op.key) for op in remaining}
            failed = await self._attempt(remaining, self._blocking_delete, [op.key for op in remaining], expect)
            if failed is _NOT_DONE:
                break
            self.stats["delete_requests"] += 1
            for op in remaining:
                if op.key not in failed:
                    self.stats["deleted_keys"] += 1
                    self._finish(op)
                elif not failed[op.key].transient:
                    self._fail([op], failed[op.key])
            remaining = [op for op in remaining if op.key in failed and failed[op.key].transient]
            if attempt == 1:
                task_status.started()
            if remaining:
                error = failed[remaining[0].key]
                self.stats["failed_requests"] += 1
                if attempt >= self.max_attempts:
                    self._settle_with(remaining, error)
                if self.draining and attempt >= self.max_attempts:
                    log.error(
                        "giving up on %d deletes while draining, kept in the journal for the next mount: %s",
                        len(remaining),
                        error,
                    )
                    self._give_up(remaining)
                    return
                log.warning("%d deletes failed, retrying them: %s", len(remaining), error)
                await self._backoff(remaining, delay, attempt)
                delay = min(delay * 2, self.backoff_max)
        if attempt == 1 and failed is _NOT_DONE:
            task_status.started()

    async def _sweep(self, op: Op) -> None:
        """Remove what a put of this mount's that is no longer wanted (its key was deleted
        since, or it was cancelled) left at its key, or may still leave there (an attempt that
        failed may be applied late): wait until no such request can still arrive, then delete
        the key if (and only if) it holds one of those puts' objects."""
        await trio.sleep(max(0.0, op.not_before - time.time()))

        def sweep() -> None:
            info = self.store.head(op.key)
            if info is not None and info.token in op.tokens:
                log.warning(
                    "removing %s: a write of this mount's that is no longer wanted reached the store late", op.key
                )
                self._blocking_delete_stale(op.key, info.version)
                self.stats["swept_keys"] += 1

        delay = self.backoff_first
        while True:
            try:
                await trio.to_thread.run_sync(sweep, limiter=self._limiter)
                break
            except StoreError as exc:
                if not exc.transient:
                    log.error("could not check %s for a late write: %s", op.key, exc)
                    break
            await trio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
        self.journal.remove_op(op.seq)
        self.sweeps.discard(op)

    async def _discard(self, op: Op) -> None:
        """Remove what a put that a crash cut short, and that was no longer wanted, may have
        left besides its object (Store.discard_put)."""
        try:
            await trio.to_thread.run_sync(self.store.discard_put, op.key, op.token, limiter=self._limiter)
        except StoreError as exc:
            log.warning("%r: %s", op, exc)  # a temporary file at most, never listed
        self.journal.remove_op(op.seq)
        self.sweeps.discard(op)

    async def _attempt(self, ops: list[Op], fn: Callable, *args):
        """Run fn until it succeeds (its result) or the ops were aborted, failed for good or
        given up while draining (_NOT_DONE; the ops are finished either way)."""
        delay = self.backoff_first
        attempt = 0
        while True:
            attempt += 1
            if all(op.cancelled for op in ops):  # no longer wanted: stop retrying it
                for op in ops:
                    self._finish(op)
                return _NOT_DONE
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
            except UploadAborted:
                for op in ops:
                    self._finish(op)
                return _NOT_DONE
            except ObjectMissing as exc:
                # a move whose source is gone: nothing left to move; report, don't retry forever
                log.error("%r: %s", ops[0], exc)
                return None
            except Exception as exc:  # a store bug must not kill the loop: treat as a failure
                error = exc if isinstance(exc, StoreError) else StoreError(f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, StoreError):
                    log.exception("unexpected error from the store in %r", ops[0])
            self.stats["failed_requests"] += 1
            if not error.transient:
                self._fail(ops, error)
                return _NOT_DONE
            for op in ops:
                op.uncertain = True  # the request may have reached the store, and may yet
            log.warning("%r failed (attempt %d): %s", ops[0], attempt, error)
            if attempt >= self.max_attempts:
                self._settle_with(ops, error)
                if self.draining:
                    log.error(
                        "giving up on %d operation(s) while draining, kept in the journal for the next mount: %r: %s",
                        len(ops),
                        ops[0],
                        error,
                    )
                    self._give_up(ops)
                    return _NOT_DONE
            await self._backoff(ops, delay, attempt)
            delay = min(delay * 2, self.backoff_max)

    @staticmethod
    def _settle_with(ops: list[Op], error: StoreError) -> None:
        """The ops used their attempts: whoever waits for them learns of `error` now, while
        the retries go on in the background."""
        for op in ops:
            if not op.settled.is_set():
                op.error = error
                op.settled.set()

    async def _backoff(self, ops: list[Op], delay: float, attempt: int = 0) -> None:
        """Sleep before the next attempt; cut short by a cancel, or by draining once the ops
        have used their attempts."""
        with trio.move_on_after(delay):
            while not (self.draining and attempt >= self.max_attempts) and not all(op.cancelled for op in ops):
                await self._changed.wait()

    def _fail(self, ops: list[Op], error: StoreError) -> None:
        """The store refused the ops for good: report, record for operators, go on."""
        for op in ops:
            log.error("the store refused %r for good: %s; not retried (`shufflefs journal` lists it)", op, error)
            op.failed = True
            op.error = error
            self.failed.append(op)
            self.journal.fail_op(op.seq, op.record(), str(error))
            if self.on_failed is not None:
                try:
                    self.on_failed(op)
                except Exception:  # must not take the scheduler (and the daemon) down
                    log.exception("after the failure of %r", op)
            self._finish(op, keep_journal=True)

    def _give_up(self, ops: list[Op]) -> None:
        for op in ops:
            op.given_up = True
            self.given_up.append(op)
            self._finish(op, keep_journal=True)

    def _track(self, op: Op) -> None:
        """Record what the store holds at the op's keys after it finished, for the next
        operation on each key; look, later, for what its late attempts may leave."""
        done = not (op.cancelled or op.given_up or op.failed)
        landed_unwanted = op.cancelled and op.version is not None  # an attempt in flight landed
        after = dict(op.expects)  # not done: as it found them
        if done and op.kind in ("move", "delete"):
            after[op.key] = ABSENT
        if (done and op.kind in ("put", "move")) or landed_unwanted:
            after[op.landing_key] = op.version
        for key, state in after.items():
            if self._tail.get(key) is op:
                self._versions.pop(key, None)
            else:
                self._versions[key] = state
        if op.kind in ("put", "move") and op.token and op.uncertain:
            # an attempt of it may still land, even when another one succeeded
            self._remember_late(op.landing_key, op.token)
        if op.kind == "put" and op.cancelled and self._tail.get(op.key) is op:
            # no later operation on the key will remove what the put left (if it landed) or
            # may still leave (its late attempts): look for it
            if landed_unwanted:
                self._sweep_later(op.key, [op.token], 0.0)
            self._sweep_late(op.key)
        if done and op.kind in ("move", "delete"):
            self._sweep_late(op.key)

    def _remember_late(self, key: str, token: str) -> None:
        self._late.setdefault(key, []).append(token)
        if self.store.conditional:
            # the request was given up (or answered) by now: it lands within a late window
            self.journal.late_add(key, token, time.time() + self.late_window)

    def _sweep_late(self, key: str) -> None:
        """`key` was moved away or deleted (or is left as it is): look, a late window from
        now, for this cache dir's writes that may still land there."""
        late = self._late.pop(key, None)
        if late:
            self._sweep_later(key, late, self.late_window)
            self.journal.late_take(key)  # the sweep's record took over

    def _sweep_later(self, key: str, tokens: list[str], delay: float) -> None:
        if self.store.conditional:
            sweep = Op("sweep", key, tokens=tokens)
            sweep.not_before = time.time() + delay
            self._submit(sweep)

    def _finish(self, op: Op, keep_journal: bool = False) -> None:
        if op.finished.is_set():
            return
        if not keep_journal:
            # done after all (or no longer wanted): a waiter from now on is told no error
            op.error = None
        if not keep_journal:
            self.journal.remove_op(op.seq)
        self._track(op)
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
            if not keep_journal or op.failed:
                op.staging.unref()
            if op.source_staging is not None:
                op.source_staging.unref()
                op.source_staging = None
        op.finished.set()
        op.settled.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


#: _attempt's answer when the operation did not happen (and was finished accordingly)
_NOT_DONE = object()
COMPARE_CHUNK = 1024 * 1024


def same_bytes(path: str, other: str) -> bool:
    """Whether two local files hold the same bytes."""
    with open(path, "rb") as a, open(other, "rb") as b:
        if os.fstat(a.fileno()).st_size != os.fstat(b.fileno()).st_size:
            return False
        while chunk := a.read(COMPARE_CHUNK):
            if chunk != b.read(COMPARE_CHUNK):
                return False
    return True
