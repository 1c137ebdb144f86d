"""`shufflefs.remote.Remote` on its own: a journal, a staging area and a real store (the memory
store, conditional like S3; the file store where its own behaviour matters), without the
filesystem core.

Covers the journaling of operations, their order per key (an operation starts only after the
earlier ones on any of its keys finished), the batching of deletes, retries of transient
failures with backoff, what a waiter learns after `max_attempts`, giving up while draining
(and the next run resuming what was given up), operations the store refuses for good (recorded
as failed, never retried, holding back no other key), cancelled puts, reads (`call`) with
retries and a timeout, and the tokens and conditions that keep late requests from undoing
later writes (DESIGN.md "Remote operations", "Late requests").

Backoff runs on trio's `autojump_clock` where a test retries: the schedule is checked in
virtual seconds and costs no real time.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import trio
import trio.testing

from shufflefs.journal import Journal
from shufflefs.remote import DELETE_BATCH, LATE_WINDOW, Remote
from shufflefs.staging import StagingArea, StagingFile
from shufflefs.stores import ObjectMissing, StoreError
from shufflefs.stores.memory import MemoryStore
from shufflefs.testing.stores import SteeredFileStore, SteeredMemoryStore, contents

OTHER_WRITER = "0123456789abcdef.1.1"  # a token of another cache dir's write


# -- stores the tests steer -----------------------------------------------------------------------


def plant(store, tmp_path, key: str, data: bytes, token: str | None = OTHER_WRITER) -> str | None:
    """An object someone else wrote (bypassing the steering); its version."""
    path = tmp_path / f"planted-{len(os.listdir(tmp_path))}"
    path.write_bytes(data)
    return MemoryStore.put_file(store, key, str(path), token=token)


# -- a remote as the daemon builds it ---------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path, nursery: trio.Nursery):
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.store = SteeredMemoryStore()
        self.stores = [self.store]
        self.journal = Journal(str(tmp_path / "lmdb"))
        self.staging = StagingArea(str(tmp_path / "staging"))
        self._scopes: dict[int, trio.CancelScope] = {}

    async def remote(self, store=None, **options) -> Remote:
        remote = Remote(store or self.store, self.journal, **options)
        self._scopes[id(remote)] = await self.nursery.start(self._run, remote)
        return remote

    @staticmethod
    async def _run(remote: Remote, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                remote.start(nursery)
                task_status.started(scope)
                await trio.sleep_forever()

    def stop(self, remote: Remote) -> None:
        """The daemon of `remote` ends (its tasks are cancelled)."""
        self._scopes.pop(id(remote)).cancel()

    def restart(self) -> None:
        """A new daemon with this cache dir: the journal reopened, a new staging area."""
        self.journal.close()
        self.journal = Journal(str(self.tmp_path / "lmdb"))
        self.staging = StagingArea(str(self.tmp_path / "staging"))

    def staged(self, data: bytes) -> StagingFile:
        staging = self.staging.new()
        os.pwrite(staging.fd, data, 0)
        staging.resize(len(data))
        return staging

    def put(self, remote: Remote, key: str, data: bytes, **options):
        """Upload `data` the way the core does and let go of the file: the op holds it now."""
        staging = self.staged(data)
        op = remote.put(key, staging, **options)
        staging.unref()
        return op


@pytest.fixture
async def rig(tmp_path):
    async with trio.open_nursery() as nursery:
        rig = Rig(tmp_path, nursery)
        try:
            yield rig
        finally:
            for store in rig.stores:  # let no worker thread hang on a gate
                store.open_gates()
                store.script.clear()
                if isinstance(store, MemoryStore):
                    store.fail_next = 0
            nursery.cancel_scope.cancel()
    rig.journal.close()


def bounded(timeout: float):
    """A deadline for a wait, except on the autojump clock: it would jump to the deadline as
    soon as the loop idles while a worker thread runs (pytest-timeout still bounds the test)."""
    clock = trio.lowlevel.current_clock()
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold == 0:
        return trio.CancelScope()
    return trio.fail_after(timeout)


async def done(*ops, timeout: float = 10.0) -> None:
    with bounded(timeout):
        for op in ops:
            await op.finished.wait()


async def until(condition, timeout: float = 10.0) -> None:
    with bounded(timeout):
        while not condition():
            await trio.sleep(0.002)


async def swept(remote: Remote) -> None:
    """Until the remote's sweeps are done (polled: a sweep's end sets no event)."""
    while remote.sweeps:
        await trio.sleep(1)


# -- journaling -------------------------------------------------------------------------------------


async def test_an_operation_is_journaled_before_it_runs_and_leaves_the_journal_once_done(rig):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "a/x.data")
    op = rig.put(remote, "a/x.data", b"12345")
    # in the journal before anything reached the store: a crash now loses nothing
    assert rig.journal.pending_ops() == [
        (
            op.seq,
            {"kind": "put", "key": "a/x.data", "size": 5, "token": op.token, "path": os.path.basename(op.staging.path)},
        )
    ]
    await until(lambda: rig.store.count("put_file") == 1)
    assert rig.journal.pending_ops()[0][0] == op.seq and not op.finished.is_set()
    gate.set()
    await remote.wait(op)
    assert contents(rig.store) == {"a/x.data": b"12345"}
    assert op.version == rig.store.objects["a/x.data"].version
    assert rig.journal.pending_ops() == [] and rig.journal.failed_ops() == []
    assert rig.staging.bytes == 0  # the upload let go of its staging file
    assert remote.stats["put_requests"] == 1 and remote.stats["put_bytes"] == 5
    assert remote.pending == set()


async def test_every_write_carries_a_token_naming_this_run_and_its_sequence_number(rig):
    first = await rig.remote()
    rig.stop(first)
    remote = await rig.remote()  # the second run of this cache dir
    instance = rig.journal.meta_get("instance")
    assert remote.instance == instance
    put = rig.put(remote, "a/x.data", b"x")
    move = remote.move("a/x.data", "a/y.data")
    await done(put, move)
    assert put.token == f"{instance}.2.{put.seq}" and move.token == f"{instance}.2.{move.seq}"
    assert put.seq < move.seq
    # the store keeps the token of the write that made the object
    assert rig.store.objects["a/y.data"].token == move.token


async def test_the_callback_of_a_stored_put_gets_the_op_with_its_version(rig):
    stored = []
    remote = await rig.remote(on_put_done=lambda op: stored.append((op.key, op.version)))
    ops = [rig.put(remote, f"k{i}", bytes([i]) * 10) for i in range(3)]
    await done(*ops)
    assert sorted(stored) == sorted((f"k{i}", rig.store.objects[f"k{i}"].version) for i in range(3))


@pytest.mark.allow_logged_errors(r"after storing <put k0>")
async def test_a_failing_callback_does_not_stop_the_scheduler(rig):
    def broken(op):
        raise ValueError("a bug in the caller")

    remote = await rig.remote(on_put_done=broken)
    first = rig.put(remote, "k0", b"a")
    await done(first)
    later = [rig.put(remote, "k0", b"b"), remote.delete("k1")]
    await done(*later)
    assert contents(rig.store) == {"k0": b"b"}
    assert rig.journal.pending_ops() == []


# -- order per key ----------------------------------------------------------------------------------


async def test_put_delete_put_on_one_key_end_with_the_last_puts_bytes(rig):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "k")
    first = rig.put(remote, "k", b"first")
    delete = remote.delete("k")
    last = rig.put(remote, "k", b"last")
    assert remote.last_op("k") is last
    await until(lambda: rig.store.count("put_file") == 1)
    await trio.sleep(0.05)
    # nothing after the first put starts while it is in flight
    assert rig.store.log == [("put_file", "k")]
    assert not delete.started and not last.started
    gate.set()
    await done(first, delete, last)
    assert rig.store.applied == [("put_file", "k"), ("delete_many", ("k",)), ("put_file", "k")]
    assert contents(rig.store) == {"k": b"last"}
    # each knew what the one before it left: no HEAD to find out
    assert rig.store.count("head") == 0
    assert remote.last_op("k") is None and rig.journal.pending_ops() == []


async def test_an_operation_waits_for_the_earlier_operations_on_each_of_its_keys_and_no_other(rig):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "a")
    put_a = rig.put(remote, "a", b"bytes of a")
    put_b = rig.put(remote, "b", b"bytes of b")
    move = remote.move("a", "b")
    put_c = rig.put(remote, "c", b"c")
    await done(put_b, put_c)  # other keys do not wait for the held put
    await trio.sleep(0.05)
    # put_b finished, but the move needs put_a too
    assert not move.started and ("move", "a", "b") not in rig.store.log
    gate.set()
    await done(put_a, move)
    assert rig.store.applied.index(("put_file", "a")) < rig.store.applied.index(("move", "a", "b"))
    assert rig.store.applied.index(("put_file", "b")) < rig.store.applied.index(("move", "a", "b"))
    assert contents(rig.store) == {"b": b"bytes of a", "c": b"c"}
    # the move expected exactly what both puts left (If-Match on both keys): no HEAD
    assert rig.store.count("head") == 0


# -- deletes in batches -----------------------------------------------------------------------------


async def test_deletes_ready_together_go_out_as_one_delete_many(rig, tmp_path):
    versions = {f"d/{i}": plant(rig.store, tmp_path, f"d/{i}", bytes([i]), token=None) for i in range(10)}
    remote = await rig.remote()
    ops = [remote.delete(key, version=version) for key, version in versions.items()]
    await done(*ops)
    [batch] = [entry[1] for entry in rig.store.log if entry[0] == "delete_many"]
    assert sorted(batch) == sorted(versions)
    assert contents(rig.store) == {} and rig.store.count("head") == 0
    assert remote.stats["delete_requests"] == 1 and remote.stats["deleted_keys"] == 10
    assert rig.journal.pending_ops() == []


async def test_deletes_issued_while_a_batch_is_in_flight_make_the_next_batch(rig):
    remote = await rig.remote()
    gate = rig.store.hold("delete_many", "k0")
    first = remote.delete("k0")
    await until(lambda: rig.store.count("delete_many") == 1)
    later = [remote.delete(f"k{i}") for i in range(1, 5)]
    await trio.sleep(0.05)
    assert rig.store.count("delete_many") == 1
    gate.set()
    await done(first, *later)
    assert [set(entry[1]) for entry in rig.store.log if entry[0] == "delete_many"] == [{"k0"}, {"k1", "k2", "k3", "k4"}]


async def test_a_batch_holds_at_most_delete_batch_keys(rig):
    remote = await rig.remote()
    ops = [remote.delete(f"gone/{i}") for i in range(DELETE_BATCH + 1)]
    await done(*ops, timeout=30)
    assert [len(entry[1]) for entry in rig.store.log if entry[0] == "delete_many"] == [DELETE_BATCH, 1]
    assert rig.journal.pending_ops() == []


# -- transient failures -----------------------------------------------------------------------------


async def test_a_transient_failure_is_retried_with_doubling_backoff_until_the_put_succeeds(rig, autojump_clock):
    remote = await rig.remote()
    rig.store.fail_next = 3
    start = trio.current_time()
    op = rig.put(remote, "k", b"bytes")
    await remote.wait(op)
    # 0.1 s, then 0.2 s, then 0.4 s before the attempts after the failed ones
    assert trio.current_time() - start == pytest.approx(0.7)
    assert rig.store.count("put_file") == 4 and contents(rig.store) == {"k": b"bytes"}
    assert remote.stats["failed_requests"] == 3 and remote.stats["put_requests"] == 1
    assert rig.journal.pending_ops() == [] and op.error is None


async def test_backoff_is_capped_at_thirty_seconds(rig, autojump_clock):
    remote = await rig.remote(max_attempts=20)
    rig.store.then("put_file", "k", *["fail"] * 12)
    start = trio.current_time()
    op = rig.put(remote, "k", b"x")
    await done(op)
    # 0.1 .. 25.6 doubling (9 waits), then three capped at 30
    assert trio.current_time() - start == pytest.approx(sum(0.1 * 2**i for i in range(9)) + 3 * 30)
    assert rig.store.count("put_file") == 13


async def test_a_waiter_learns_of_the_failure_after_max_attempts_while_the_retries_go_on(rig, autojump_clock):
    remote = await rig.remote(max_attempts=3)
    rig.store.then("put_file", "k", *["fail"] * 5)
    put = rig.put(remote, "k", b"in the end")
    delete = remote.delete("k")
    with pytest.raises(StoreError, match="connection reset"):
        await remote.wait(put)
    assert rig.store.count("put_file") == 3 and not put.finished.is_set()
    # whoever waits for the op behind it learns at once that it cannot happen soon
    with pytest.raises(StoreError, match="connection reset"):
        await remote.wait(delete)
    assert not delete.started
    await done(put, delete)
    assert rig.store.count("put_file") == 6
    assert rig.store.applied == [("put_file", "k"), ("delete_many", ("k",))]
    assert contents(rig.store) == {}
    # a failed attempt may still land after the delete: looked for a late window later
    [(_, sweep)] = rig.journal.pending_ops()
    assert (sweep["kind"], sweep["key"], sweep["tokens"]) == ("sweep", "k", [put.token])


@pytest.mark.allow_logged_errors(r"unexpected error from the store in <put k>")
async def test_an_unexpected_exception_of_the_store_is_retried_like_a_transient_failure(rig, autojump_clock):
    remote = await rig.remote()
    rig.store.then("put_file", "k", "crash")
    op = rig.put(remote, "k", b"x")
    await remote.wait(op)
    assert rig.store.count("put_file") == 2 and contents(rig.store) == {"k": b"x"}


async def test_a_key_that_keeps_failing_in_a_delete_batch_is_retried_without_the_others(rig, autojump_clock):
    remote = await rig.remote()
    rig.store.then("delete_many", "k1", "fail", "fail")
    ops = [remote.delete(f"k{i}") for i in range(3)]
    await done(ops[0], ops[2])
    assert not ops[1].finished.is_set()
    await done(ops[1])
    assert [set(entry[1]) for entry in rig.store.log if entry[0] == "delete_many"] == [
        {"k0", "k1", "k2"},
        {"k1"},
        {"k1"},
    ]
    assert rig.journal.pending_ops() == [] and rig.journal.failed_ops() == []


async def test_a_waiter_for_a_delete_learns_of_the_failure_after_max_attempts(rig, autojump_clock):
    remote = await rig.remote(max_attempts=3)
    rig.store.then("delete_many", "k", *["fail"] * 10)
    op = remote.delete("k")
    while rig.store.count("delete_many") < 6:  # polled: see bounded()
        await trio.sleep(1)
    assert op.settled.is_set() and op.error is not None


async def test_waiting_for_an_operation_that_succeeded_in_the_end_raises_nothing(rig, autojump_clock):
    remote = await rig.remote(max_attempts=2)
    rig.store.then("put_file", "k", "fail", "fail", "fail")
    op = rig.put(remote, "k", b"stored at the fourth attempt")
    await done(op)
    assert contents(rig.store) == {"k": b"stored at the fourth attempt"}
    await remote.wait(op)


async def test_a_waiter_with_a_timeout_stops_waiting_but_the_operation_goes_on(rig, autojump_clock):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "k")
    op = rig.put(remote, "k", b"slow")
    start = trio.current_time()
    with pytest.raises(StoreError, match="no answer from the store within 5 s"):
        await remote.wait(op, timeout=5)
    assert trio.current_time() - start == pytest.approx(5)
    assert not op.finished.is_set() and rig.journal.pending_ops() != []
    gate.set()
    await done(op)
    assert contents(rig.store) == {"k": b"slow"} and op.error is None


async def test_pending_put_bytes_count_the_unfinished_uploads_and_bound_the_backlog(rig):
    remote = await rig.remote()
    gates = [rig.store.hold("put_file", key) for key in ("a", "b")]
    ops = [rig.put(remote, "a", b"x" * 100), rig.put(remote, "b", b"y" * 50), rig.put(remote, "c", b"z" * 10)]
    assert remote.pending_put_bytes == 160
    await done(ops[2])
    assert remote.pending_put_bytes == 150
    returned = trio.Event()

    async def writer():
        await remote.wait_for_backlog(60)
        returned.set()

    rig.nursery.start_soon(writer)
    await trio.sleep(0.05)
    assert not returned.is_set()
    gates[0].set()
    with trio.fail_after(10):
        await returned.wait()
    assert remote.pending_put_bytes == 50
    gates[1].set()
    await done(ops[1])
    assert remote.pending_put_bytes == 0 and remote.oldest_pending_seconds() == 0.0


# -- giving up while draining, and the next run ---------------------------------------------------------


async def give_up_on_a_key(rig: Rig) -> tuple[Remote, list]:
    """A drain while the store keeps failing for key "k": a put of it, a move of it to "k2"
    behind the put, and a put of "j" that goes through."""
    remote = await rig.remote(max_attempts=2)
    rig.store.then("put_file", "k", *["fail"] * 100)
    put = rig.put(remote, "k", b"bytes of k")
    move = remote.move("k", "k2")
    other = rig.put(remote, "j", b"bytes of j")
    given_up = await remote.drain()
    rig.store.script.clear()
    return remote, [put, move, other, given_up]


@pytest.mark.allow_logged_errors(r"giving up on 1 operation\(s\) while draining, kept in the journal")
async def test_an_operation_that_used_its_attempts_while_draining_is_given_up_and_kept_in_the_journal(
    rig, autojump_clock
):
    _, (put, move, other, given_up) = await give_up_on_a_key(rig)
    assert given_up == [put, move] and put.given_up and move.given_up
    assert rig.store.count("put_file", "k") == 2 and rig.store.count("move") == 0  # no more attempts
    assert contents(rig.store) == {"j": b"bytes of j"}
    assert rig.journal.pending_ops() == [(put.seq, put.record()), (move.seq, move.record())]
    # the given-up upload keeps its staging file, with its bytes, for the next run
    assert os.path.exists(put.staging.path) and rig.staging.bytes == len(b"bytes of k")
    with open(put.staging.path, "rb") as f:
        assert f.read() == b"bytes of k"
    assert rig.journal.failed_ops() == []


@pytest.mark.allow_logged_errors(r"giving up on 1 operation\(s\) while draining, kept in the journal")
async def test_the_next_run_resumes_what_was_given_up_in_order_with_its_tokens(rig, autojump_clock):
    old, (put, move, _, _) = await give_up_on_a_key(rig)
    rig.stop(old)
    rig.restart()
    remote = await rig.remote()
    resumed = []
    for seq, record in rig.journal.pending_ops():
        staging = rig.staging.adopt(record["path"]) if record["kind"] == "put" else None
        resumed.append(remote.resume(seq, record, staging))
    await done(*resumed)
    assert contents(rig.store) == {"j": b"bytes of j", "k2": b"bytes of k"}
    # the dead run's tokens: whichever run's attempt lands, the other sees its own write there
    assert rig.store.objects["k2"].token == move.token
    assert [op.token for op in resumed] == [put.token, move.token]
    # both may have had a request of the dead run on its way: the put's token is looked for at
    # the key the move emptied, a late window from now; the move's is remembered at its key
    [(_, sweep)] = rig.journal.pending_ops()
    assert (sweep["kind"], sweep["key"], set(sweep["tokens"])) == ("sweep", "k", {put.token})
    assert sweep["not_before"] == pytest.approx(time.time() + LATE_WINDOW, abs=5)
    assert [token for token, _ in rig.journal.late_entries()["k2"]] == [move.token]
    resumed[0].staging.unref()  # the namespace's reference (the core holds one)
    assert rig.staging.bytes == 0 and not os.path.exists(resumed[0].staging.path)


# -- refused for good -------------------------------------------------------------------------------


@pytest.mark.allow_logged_errors(r"the store refused <put bad/x> for good: put_file bad/x: InvalidArgument")
async def test_a_refused_put_is_recorded_as_failed_not_retried_and_holds_back_no_other_key(rig, tmp_path):
    failed = []
    remote = await rig.remote(on_failed=failed.append, max_attempts=6)
    rig.store.then("put_file", "bad/x", "refuse")
    plant(rig.store, tmp_path, "bad/x", b"someone else's")
    bad = rig.put(remote, "bad/x", b"refused")
    good = [rig.put(remote, f"good/{i}", b"fine") for i in range(3)]
    with pytest.raises(StoreError, match="InvalidArgument") as excinfo:
        await remote.wait(bad)
    assert excinfo.value.transient is False
    # a later operation on the refused key still runs
    delete = remote.delete("bad/x")
    await done(*good, delete)
    assert failed == [bad] and remote.failed == [bad] and bad.failed
    assert rig.store.count("put_file", "bad/x") == 1  # never retried
    assert contents(rig.store) == {f"good/{i}": b"fine" for i in range(3)}
    assert rig.journal.pending_ops() == []
    [(seq, record)] = rig.journal.failed_ops()
    assert seq == bad.seq and record["key"] == "bad/x" and "InvalidArgument" in record["error"]
    assert rig.staging.bytes == 0  # the remote let go of the refused upload's file
    assert await remote.drain() == []


@pytest.mark.allow_logged_errors(r"the store refused <delete bad/1> for good")
async def test_a_refused_delete_fails_alone_and_the_rest_of_its_batch_is_deleted(rig, tmp_path):
    keys = ["ok/0", "bad/1", "ok/2"]
    for key in keys:
        plant(rig.store, tmp_path, key, key.encode())
    remote = await rig.remote()
    rig.store.then("delete_many", "bad/1", "refuse")
    ops = [remote.delete(key) for key in keys]
    await done(*ops)
    assert contents(rig.store) == {"bad/1": b"bad/1"}
    assert rig.store.count("delete_many") == 1
    assert [record["key"] for _, record in rig.journal.failed_ops()] == ["bad/1"]
    assert ops[1].failed and ops[1].error is not None and not ops[0].failed
    assert rig.journal.pending_ops() == []


@pytest.mark.allow_logged_errors(r"the store refused <delete b> for good: deleting b: InvalidArgument")
async def test_a_batch_the_store_refuses_as_a_whole_is_split_so_that_only_the_bad_key_fails(rig):
    remote = await rig.remote()
    rig.store.malformed.add("b")
    ops = [remote.delete(key) for key in ("a", "b", "c")]
    await done(*ops)
    batches = [entry[1] for entry in rig.store.log if entry[0] == "delete_many"]
    assert sorted(batches[0]) == ["a", "b", "c"]
    assert sorted(batches[1:]) == [("a",), ("b",), ("c",)]
    assert [op.failed for op in ops] == [False, True, False]
    assert [record["key"] for _, record in rig.journal.failed_ops()] == ["b"]


@pytest.mark.allow_logged_errors(r"the store refused <put k> for good", r"after the failure of <put k>")
async def test_a_failing_callback_of_a_refused_op_does_not_stop_the_scheduler(rig):
    def broken(op):
        raise ValueError("a bug in the caller")

    remote = await rig.remote(on_failed=broken)
    rig.store.then("put_file", "k", "refuse")
    refused = rig.put(remote, "k", b"x")
    await done(refused)
    later = rig.put(remote, "k", b"y")
    await done(later)
    assert contents(rig.store) == {"k": b"y"} and refused.failed


@pytest.mark.allow_logged_errors(r"<move gone -> there>: no object at key 'gone'")
async def test_a_move_whose_source_is_gone_is_reported_and_not_retried(rig):
    remote = await rig.remote()
    op = remote.move("gone", "there")
    await done(op)
    assert rig.store.count("move") == 1
    assert contents(rig.store) == {} and rig.journal.pending_ops() == [] and rig.journal.failed_ops() == []


# -- cancelled puts ---------------------------------------------------------------------------------


async def test_a_put_cancelled_before_it_started_never_reaches_the_store(rig):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "k")
    first = rig.put(remote, "k", b"first")
    second = rig.put(remote, "k", b"second")
    remote.cancel(second)
    assert [seq for seq, _ in rig.journal.pending_ops()] == [first.seq]
    gate.set()
    await done(first, second)
    assert rig.store.count("put_file") == 1 and contents(rig.store) == {"k": b"first"}
    assert rig.journal.pending_ops() == [] and rig.staging.bytes == 0
    await remote.wait(second)  # no error: it was no longer wanted


async def test_a_put_cancelled_in_flight_is_journaled_as_a_sweep_until_its_attempt_ends(rig):
    remote = await rig.remote()
    gate = rig.store.hold("put_file", "k")
    op = rig.put(remote, "k", b"unwanted")
    await until(lambda: rig.store.count("put_file") == 1)
    remote.cancel(op)
    # its request may land after a crash: the next daemon must look for it
    assert rig.journal.pending_ops() == [
        (op.seq, {"kind": "sweep", "key": "k", "tokens": [op.token], "in_flight": True})
    ]
    gate.set()
    await done(op)
    assert contents(rig.store) == {}  # the store saw the abort before storing
    assert rig.journal.pending_ops() == [] and remote.sweeps == set()


async def test_a_put_cancelled_in_flight_on_the_file_store_is_journaled_as_a_discard(rig, tmp_path):
    store = SteeredFileStore(str(tmp_path / "store"))
    rig.stores.append(store)
    remote = await rig.remote(store)
    gate = store.hold("put_file", "a/k")
    op = rig.put(remote, "a/k", b"unwanted")
    await until(lambda: store.count("put_file") == 1)
    remote.cancel(op)
    # no late requests here, but a crash may leave the put's temporary file
    assert rig.journal.pending_ops() == [(op.seq, {"kind": "discard", "key": "a/k", "token": op.token})]
    gate.set()
    await done(op)
    assert not os.path.exists(tmp_path / "store" / "a" / "k")
    assert rig.journal.pending_ops() == []


async def test_a_staging_file_the_file_store_linked_is_never_reused(rig, tmp_path):
    store = SteeredFileStore(str(tmp_path / "store"))
    rig.stores.append(store)
    remote = await rig.remote(store)
    op = rig.put(remote, "a/k", b"stored bytes")
    await done(op)
    assert not os.path.exists(op.staging.path) and rig.staging.free == []
    # a new file written at once must not be the stored object's inode
    other = rig.staged(b"overwritten?")
    other.unref()
    with open(tmp_path / "store" / "a" / "k", "rb") as f:
        assert f.read() == b"stored bytes"


# -- reads ------------------------------------------------------------------------------------------


async def test_a_read_is_retried_after_transient_failures(rig, tmp_path, autojump_clock):
    plant(rig.store, tmp_path, "k", b"abc")
    remote = await rig.remote(request_timeout=math.inf)
    rig.store.fail_next = 2
    start = trio.current_time()
    info = await remote.call(rig.store.head, "k")
    assert info.size == 3 and rig.store.count("head") == 3
    assert trio.current_time() - start == pytest.approx(0.1 + 0.2)
    assert remote.stats["head_requests"] == 1


async def test_a_read_fails_after_its_attempts(rig, autojump_clock):
    remote = await rig.remote(request_timeout=math.inf)
    rig.store.fail_next = 10
    with pytest.raises(StoreError, match="injected failure"):
        await remote.call(rig.store.list_dir, "", attempts=3)
    assert rig.store.calls["list_dir"] == 3  # the memory store's own count: list_dir is not steered


async def test_a_read_that_cannot_succeed_is_not_retried(rig, tmp_path):
    remote = await rig.remote()
    with pytest.raises(ObjectMissing):
        await remote.call(rig.store.get_range, "missing", 0, 10)
    rig.store.then("head", "forbidden", "refuse")
    with pytest.raises(StoreError, match="InvalidArgument"):
        await remote.call(rig.store.head, "forbidden")
    assert rig.store.count("get_range") == 1 and rig.store.count("head") == 1


async def test_a_read_without_an_answer_is_abandoned_after_the_request_timeout(rig, autojump_clock):
    remote = await rig.remote()
    gate = rig.store.hold("head", "k")
    start = trio.current_time()
    with pytest.raises(StoreError, match="listing k: no answer from the store within 10 s"):
        await remote.call(rig.store.head, "k", what="listing k")
    assert trio.current_time() - start == pytest.approx(10.0)
    gate.set()


# -- late requests ----------------------------------------------------------------------------------


async def test_an_attempt_that_landed_though_its_answer_was_lost_counts_as_done(rig, autojump_clock):
    remote = await rig.remote()
    rig.store.then("put_file", "k", "lose")
    op = rig.put(remote, "k", b"landed")
    await remote.wait(op)
    # the second attempt found the key changed, and its own token there
    assert rig.store.count("put_file") == 2 and rig.store.count("head", "k") == 1
    assert rig.store.applied == [("put_file", "k")]
    assert op.version == rig.store.objects["k"].version and rig.store.objects["k"].token == op.token
    # the failed attempt may still reach the store: its token is remembered, across a crash too
    [(token, until_)] = rig.journal.late_entries()["k"]
    assert token == op.token and until_ == pytest.approx(time.time() + LATE_WINDOW, abs=5)


async def test_a_put_replaces_what_another_writer_left_at_its_key(rig, tmp_path):
    plant(rig.store, tmp_path, "k", b"theirs")
    remote = await rig.remote()
    op = rig.put(remote, "k", b"ours")  # as if the key were absent: a wrong guess costs a HEAD
    await remote.wait(op)
    assert contents(rig.store) == {"k": b"ours"} and rig.store.objects["k"].token == op.token
    assert rig.store.count("put_file") == 2 and rig.store.count("head") == 1


async def test_a_delete_leaves_what_another_writer_put_at_the_key_since(rig, tmp_path):
    remote = await rig.remote()
    put = rig.put(remote, "k", b"ours")
    await remote.wait(put)
    plant(rig.store, tmp_path, "k", b"theirs, later")
    delete = remote.delete("k", version=put.version)
    await remote.wait(delete)
    assert contents(rig.store) == {"k": b"theirs, later"}
    assert rig.journal.failed_ops() == [] and rig.journal.pending_ops() == []


async def test_a_delete_removes_a_late_write_of_this_cache_dirs_own(rig, tmp_path):
    remote = await rig.remote()
    plant(rig.store, tmp_path, "k", b"a late put of an earlier run", token=f"{remote.instance}.1.7")
    delete = remote.delete("k", version='"not what is there"')
    await remote.wait(delete)
    assert contents(rig.store) == {}


async def test_a_put_that_lands_after_its_key_was_deleted_is_swept_a_late_window_later(rig, autojump_clock):
    remote = await rig.remote()
    rig.store.then("put_file", "k", "late")  # times out for us, reaches the store later
    put = rig.put(remote, "k", b"stored twice")
    await remote.wait(put)
    delete = remote.delete("k", version=put.version)
    await remote.wait(delete)
    assert contents(rig.store) == {}
    [(_, sweep)] = rig.journal.pending_ops()
    assert (sweep["kind"], sweep["key"], sweep["tokens"]) == ("sweep", "k", [put.token])
    assert "k" not in rig.journal.late_entries()  # the sweep's record took over
    # a drain does not wait for a sweep that is not due: the next run does it
    assert await remote.drain() == [] and len(rig.journal.pending_ops()) == 1
    rig.store.land_late()
    assert contents(rig.store) == {"k": b"stored twice"}  # resurrected by the late request
    await trio.sleep(LATE_WINDOW - 5)
    assert contents(rig.store) == {"k": b"stored twice"} and rig.store.count("head") == 0
    await swept(remote)
    assert contents(rig.store) == {} and remote.stats["swept_keys"] == 1
    assert rig.journal.pending_ops() == []


async def test_a_sweep_leaves_what_another_writer_put_at_the_key(rig, tmp_path, autojump_clock):
    remote = await rig.remote()
    rig.store.then("put_file", "k", "late")
    put = rig.put(remote, "k", b"ours")
    await remote.wait(put)
    await remote.wait(remote.delete("k"))
    assert remote.sweeps
    plant(rig.store, tmp_path, "k", b"theirs")
    await swept(remote)
    assert contents(rig.store) == {"k": b"theirs"} and remote.stats["swept_keys"] == 0
    assert rig.journal.pending_ops() == []


async def test_late_writes_an_earlier_run_left_are_swept_after_the_next_delete_of_their_key(rig):
    now = time.time()
    rig.journal.late_add("k", "abc.1.5", now + 60)
    rig.journal.late_add("k", "abc.1.6", now - 1)  # its window is over: it can no longer land
    rig.journal.late_add("gone", "abc.1.7", now - 1)
    remote = await rig.remote()
    assert rig.journal.late_entries() == {"k": [("abc.1.5", now + 60)]}
    await remote.wait(remote.delete("k"))
    [(_, sweep)] = rig.journal.pending_ops()
    assert (sweep["kind"], sweep["key"], sweep["tokens"]) == ("sweep", "k", ["abc.1.5"])
    assert rig.journal.late_entries() == {}
