"""Store requests that land late, and keys the store refuses for good (issue 10, findings 1, 3).

A *late* request is one the store received but applied after its sender gave up on it (a read
timeout, a connection reset after the body was sent, a daemon killed mid-request). `LateStore`
reproduces one deterministically: the held call fails at once with a transient error, as a
timeout would, and is applied to the store only when the test releases it. The store is the
memory store, which is conditional the way S3 is (`tests/test_s3_late.py` does the same against
SeaweedFS through a proxy).
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
import trio

from shufflefs.core import FsError
from shufflefs.stores import StoreError
from shufflefs.testing.corefs import (
    BM,
    DATA,
    INDEX,
    close,
    commit,
    create,
    errno_of,
    forget,
    key,
    mkdirs,
    read_all,
    resolve,
    settle,
    until,
    write_file,
)
from shufflefs.testing.stores import RecordingMemoryStore, contents

NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class LateStore(RecordingMemoryStore):
    """A memory store whose held calls time out for their caller and happen later."""

    def __init__(self):
        super().__init__()
        self._holds: dict[tuple[str, str], int] = {}
        self.held: list = []  # calls received but not applied yet
        self._hold_lock = threading.Lock()

    def hold(self, method: str, key: str, times: int = 1) -> None:
        self._holds[(method, key)] = times

    def _held(self, method: str, key: str, call) -> None:
        with self._hold_lock:
            left = self._holds.get((method, key), 0)
            if not left:
                return
            self._holds[(method, key)] = left - 1
            self.held.append(call)
        raise StoreError(f"{method} {key}: read timed out (held by the test)", transient=True)

    def release(self) -> list:
        """Apply every held call now; what each returned or raised."""
        outcomes = []
        for call in self.held:
            try:
                outcomes.append(call())
            except StoreError as exc:
                outcomes.append(exc)
        self.held.clear()
        return outcomes

    def put_file(self, key, path, abort=None, **conditions):
        data = open(path, "rb").read()  # the body was sent: later changes to the file don't count
        late_path = f"{path}.late-{len(self.held)}"
        self._held("put_file", key, lambda: self._late_put(key, late_path, data, conditions))
        return super().put_file(key, path, abort, **conditions)

    def _late_put(self, key, path, data, conditions):
        with open(path, "wb") as f:
            f.write(data)
        try:
            return RecordingMemoryStore.put_file(self, key, path, **conditions)
        finally:
            os.unlink(path)

    def delete_many(self, keys, **conditions):
        for k in keys:
            self._held("delete_many", k, lambda: RecordingMemoryStore.delete_many(self, list(keys), **conditions))
        return super().delete_many(keys, **conditions)


@pytest.fixture
def late(env):
    store = LateStore()
    env.stores.append(store)
    return store


async def test_a_late_put_cannot_replace_newer_bytes(env, late):
    m = env.mount(late)
    d = await mkdirs(m.fs, BM)
    late.hold("put_file", key(DATA))
    await commit(m.fs, d, DATA, b"old" * 100)  # the first attempt "times out", the retry lands
    assert late.held and contents(late) == {key(DATA): b"old" * 100}
    # the file is replaced (Spark's retried task renames its output over the old one)
    await write_file(m.fs, d, DATA + ".tmp", b"new" * 100)
    await m.fs.rename(d, DATA + ".tmp", d, DATA)
    assert contents(late) == {key(DATA): b"new" * 100}

    outcomes = late.release()  # the first attempt of the old put reaches the store now
    assert isinstance(outcomes[0], StoreError)
    assert contents(late) == {key(DATA): b"new" * 100}


async def test_a_late_delete_cannot_remove_a_file_committed_again(env, late):
    m = env.mount(late)
    d = await mkdirs(m.fs, BM)
    node = await commit(m.fs, d, DATA, b"first" * 100)
    late.hold("delete_many", key(DATA))
    await m.fs.unlink(d, DATA)
    forget(m.fs, node)
    await settle(m)  # the delete's retry went through
    assert contents(late) == {}
    await commit(m.fs, d, DATA, b"second" * 100)

    late.release()  # the first delete request is applied now
    assert contents(late) == {key(DATA): b"second" * 100}


async def unlink_after_a_timed_out_put(m, late: LateStore, d: int, name: str, data: bytes) -> None:
    """Commit `name` (its first upload attempt times out, held by the store) and unlink it."""
    late.hold("put_file", key(name))
    node = await commit(m.fs, d, name, data)
    await m.fs.unlink(d, name)
    forget(m.fs, node)
    await settle(m)


async def test_a_put_that_lands_after_the_delete_is_swept(env, late):
    m = env.mount(late)
    m.remote.late_window = 0.3
    d = await mkdirs(m.fs, BM)
    await unlink_after_a_timed_out_put(m, late, d, DATA, b"gone" * 100)
    assert contents(late) == {}
    late.release()  # the put's first attempt lands after the delete: the file is back...
    assert contents(late) == {key(DATA): b"gone" * 100}
    await until(lambda: not contents(late) and m.journal.pending_ops() == [], timeout=5)  # ...until swept
    # a file committed again under that name afterwards is not the sweep's business
    await unlink_after_a_timed_out_put(m, late, d, INDEX, b"i" * 64)
    await commit(m.fs, d, INDEX, b"j" * 64)
    late.release()
    await trio.sleep(0.6)
    assert contents(late) == {key(INDEX): b"j" * 64}


async def test_a_pending_sweep_survives_a_restart(env, late):
    async with trio.open_nursery() as crashed:
        m1 = env.mount(late, nursery=crashed)
        m1.remote.late_window = 1.0
        d = await mkdirs(m1.fs, BM)
        await unlink_after_a_timed_out_put(m1, late, d, DATA, b"x" * 10)
        assert [r["kind"] for _, r in m1.journal.pending_ops()] == ["sweep"]
        crashed.cancel_scope.cancel()
    m1.close_journal()
    late.release()
    assert contents(late) == {key(DATA): b"x" * 10}

    m2 = env.mount(late)  # same cache dir
    m2.fs.resume_journal()
    await trio.sleep(0.5)
    assert contents(late) == {key(DATA): b"x" * 10}  # not due yet: the window counts from the delete
    await until(lambda: not contents(late) and m2.journal.pending_ops() == [], timeout=5)


# -- keys the store refuses for good ------------------------------------------------------------


class RefusingStore(RecordingMemoryStore):
    """Refuses every write to keys containing `refused` for good (like SeaweedFS and `..\\`)."""

    refused = "bad"

    def put_file(self, key, path, abort=None, **conditions):
        if self.refused in key:
            self.log.append(("put_file", key))
            raise StoreError(f"uploading {key}: InvalidArgument", transient=False)
        return super().put_file(key, path, abort, **conditions)

    def delete_many(self, keys, **conditions):
        failed = super().delete_many([k for k in keys if self.refused not in k], **conditions)
        self.log.append(("delete_many", tuple(keys)))
        failed.update(
            {k: StoreError(f"deleting {k}: InvalidArgument", transient=False) for k in keys if self.refused in k}
        )
        return failed


@pytest.mark.allow_logged_errors(r"the store refused <put .* for good", r"could not be stored: .*InvalidArgument")
async def test_a_refused_key_fails_at_once_and_holds_back_nothing(env):
    store = RefusingStore()
    env.stores.append(store)
    m = env.mount(store, commit_mode="async", max_attempts=6)
    d = await mkdirs(m.fs, BM)
    bad = await mkdirs(m.fs, "bad")
    await commit(m.fs, bad, DATA, b"refused")
    for i in range(3):
        await commit(m.fs, d, f"shuffle_1_{i}_0.data", b"fine")
    await settle(m)
    assert len(store.calls_of("put_file", f"bad/{DATA}")) == 1  # not retried
    assert sorted(contents(store)) == [key(f"shuffle_1_{i}_0.data") for i in range(3)]
    [(seq, record)] = m.journal.failed_ops()
    assert record["key"] == f"bad/{DATA}" and "InvalidArgument" in record["error"]
    assert m.journal.pending_ops() == []
    # the file is still there and readable here: a local file again, never evicted
    node = await m.fs.lookup(bad, DATA)
    assert not node.committed and node.ino not in m.fs.evictable
    fh = await m.fs.open(node.ino, os.O_RDONLY)
    assert await m.fs.read(fh, 0, 100) == b"refused"
    await m.fs.release(fh)
    assert await m.remote.drain() == [] and [op.key for op in m.remote.failed] == [f"bad/{DATA}"]


@pytest.mark.allow_logged_errors(r"the store refused <delete .* for good")
async def test_a_refused_delete_holds_back_no_other_delete(env):
    store = RefusingStore()
    env.stores.append(store)
    store.refused = "nothing yet"
    env.plant(store, "bad/x.data", b"")  # written by something else
    env.plant(store, "bad/shuffle_0_0_0.data", b"")
    store.refused = "bad"
    m = env.mount(store, commit_mode="async")
    d = await mkdirs(m.fs, BM)
    nodes = [await commit(m.fs, d, f"shuffle_1_{i}_0.data", b"fine") for i in range(3)]
    foreign = await resolve(m.fs, "bad/shuffle_0_0_0.data")
    await m.fs.unlink(foreign.parent.ino, foreign.name)
    with trio.fail_after(5):
        for node in nodes:
            await m.fs.unlink(d, node.name)
            await settle(m)
    assert sorted(contents(store)) == ["bad/shuffle_0_0_0.data", "bad/x.data"]
    assert [r["key"] for _, r in m.journal.failed_ops()] == ["bad/shuffle_0_0_0.data"]
    assert m.journal.pending_ops() == []


@pytest.mark.allow_logged_errors(r"the store refused <put .* for good", r"could not be stored: .*InvalidArgument")
async def test_a_sync_commit_of_a_refused_key_fails_without_retrying(env):
    store = RefusingStore()
    env.stores.append(store)
    m = env.mount(store, commit_mode="sync", max_attempts=6)
    bad = await mkdirs(m.fs, "bad")
    fh, _ = await create(m.fs, bad, DATA, NEW)
    await m.fs.write(fh, 0, b"x")
    with pytest.raises(FsError) as exc:
        with trio.fail_after(2):
            await close(m.fs, fh)
    assert errno_of(exc) == errno.EIO
    # one attempt at close(2) (FLUSH), and one more at RELEASE, where a file written under its
    # final name commits when FLUSH did not: no retries
    assert len(store.calls_of("put_file")) <= 2


# -- a store that does not answer ---------------------------------------------------------------


@pytest.mark.allow_logged_errors(r"no answer from the store within")
async def test_a_hung_store_bounds_sync_commits_and_lookups(env):
    """Every wait for the store on a file operation is bounded by the request timeout; what
    was listed before is still answered."""
    store = env.store()
    env.plant(store, "shared/shuffle_0_0_0.data", b"from another node")
    m = env.mount(store, remote_ttl=0.05)
    m.remote.request_timeout = 0.5
    known = await resolve(m.fs, "shared/shuffle_0_0_0.data")
    shared = known.parent
    d = await mkdirs(m.fs, BM)
    await write_file(m.fs, d, DATA + ".tmp", b"x" * 100)
    store.gate.clear()  # uploads hang
    started = trio.current_time()
    with pytest.raises(FsError) as exc:
        await m.fs.rename(d, DATA + ".tmp", d, DATA)
    assert errno_of(exc) == errno.EIO and trio.current_time() - started < 2
    assert await m.fs.lookup(d, DATA + ".tmp") is not None  # the rename changed nothing

    store.hang_listings.set()
    await trio.sleep(0.1)
    started = trio.current_time()
    assert await m.fs.lookup(shared.ino, known.name) is known  # answered from the last listing
    fh = await m.fs.opendir(shared.ino)
    assert [name for name, _ in m.fs.readdir_entries(fh)[1]] == [known.name]
    m.fs.releasedir(fh)
    with pytest.raises(StoreError):  # whether it exists is unknown
        await m.fs.lookup(shared.ino, "shuffle_0_1_0.data")
    assert trio.current_time() - started < 4
    store.hang_listings.clear()
    store.gate.set()


# -- late requests across a crash (tests/test_crash_storm.py found these against SeaweedFS) -------


async def test_a_put_cancelled_with_its_request_on_the_way_is_swept_after_a_crash(env, late):
    """An unlink cancels an upload whose request is on its way; the daemon dies before that
    request settles, and the store applies it after the next daemon deleted the key."""
    async with trio.open_nursery() as crashed:
        m1 = env.mount(late, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, BM)
        late.hold("put_file", key(DATA))  # the first attempt "times out" and lands later
        late.gate.clear()  # the second one hangs
        node = await commit(m1.fs, d, DATA, b"unlinked" * 10)
        await until(lambda: late.calls_of("put_file"))
        await m1.fs.unlink(d, DATA)
        forget(m1.fs, node)
        crashed.cancel_scope.cancel()  # SIGKILL, before the cancelled put finished
        late.gate.set()
    m1.close_journal()

    m2 = env.mount(late, commit_mode="async")  # same cache dir
    m2.remote.late_window = 1.0
    m2.fs.resume_journal()
    await settle(m2)  # the delete, resumed
    assert contents(late) == {}
    late.release()  # the dead daemon's first PUT lands now: the file is back...
    assert contents(late) == {key(DATA): b"unlinked" * 10}
    await until(lambda: not contents(late) and m2.journal.pending_ops() == [], timeout=5)  # ...until swept


async def test_a_put_replaced_with_its_request_on_the_way_then_unlinked_is_swept_after_a_crash(env, late):
    """The same, when the file was replaced (its upload cancelled, another one issued) before
    the crash, and unlinked by the next daemon."""
    async with trio.open_nursery() as crashed:
        m1 = env.mount(late, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, BM)
        late.hold("put_file", key(DATA))
        late.gate.clear()
        await commit(m1.fs, d, DATA, b"first" * 10)
        await until(lambda: late.calls_of("put_file"))
        await write_file(m1.fs, d, DATA + ".tmp", b"second" * 10)
        await m1.fs.rename(d, DATA + ".tmp", d, DATA)
        crashed.cancel_scope.cancel()
        late.gate.set()
    m1.close_journal()

    m2 = env.mount(late, commit_mode="async")
    m2.remote.late_window = 1.0
    m2.fs.resume_journal()
    await settle(m2)
    assert contents(late) == {key(DATA): b"second" * 10}
    d = await resolve(m2.fs, BM)
    node = await m2.fs.lookup(d.ino, DATA)
    await m2.fs.unlink(d.ino, DATA)
    forget(m2.fs, node)
    await settle(m2)
    assert contents(late) == {}
    late.release()  # the first upload's first PUT lands after the delete
    assert contents(late) == {key(DATA): b"first" * 10}
    await until(lambda: not contents(late) and m2.journal.pending_ops() == [], timeout=5)


async def test_a_delete_pending_at_a_crash_remembers_the_late_puts_of_its_key(env, late):
    """A put whose first attempt may still land succeeded on a retry; the file is unlinked and
    the daemon dies before its delete finished: the next daemon sweeps after the delete."""
    async with trio.open_nursery() as crashed:
        m1 = env.mount(late, nursery=crashed, commit_mode="async")
        d = await mkdirs(m1.fs, BM)
        late.hold("put_file", key(DATA))
        node = await commit(m1.fs, d, DATA, b"retried" * 10)
        await settle(m1)  # stored by the second attempt; the first one is still on its way
        assert late.held and contents(late) == {key(DATA): b"retried" * 10}
        late.fail_next = 10**9  # the delete does not get through before the crash
        await m1.fs.unlink(d, DATA)
        forget(m1.fs, node)
        await until(lambda: late.calls.get("delete_many"))
        crashed.cancel_scope.cancel()
    m1.close_journal()
    late.fail_next = 0

    m2 = env.mount(late, commit_mode="async")
    m2.remote.late_window = 1.0
    m2.fs.resume_journal()
    await settle(m2)
    assert contents(late) == {}
    late.release()
    assert contents(late) == {key(DATA): b"retried" * 10}
    await until(lambda: not contents(late) and m2.journal.pending_ops() == [], timeout=5)


async def test_a_resumed_sweep_leaves_the_file_committed_again_at_its_key(env, late):
    """The journal holds, in this order, the upload of a file committed again under a name
    and the sweep of a late write of the file it had before: resuming the sweep must not take
    the new file out of the namespace."""
    async with trio.open_nursery() as crashed:
        m1 = env.mount(late, nursery=crashed, commit_mode="async")
        m1.remote.late_window = 60
        d = await mkdirs(m1.fs, BM)
        late.hold("put_file", key(DATA))
        node = await commit(m1.fs, d, DATA, b"old" * 10)
        await settle(m1)  # a retry stored it; the first attempt may still land
        late.delete_gate.clear()
        await m1.fs.unlink(d, DATA)
        forget(m1.fs, node)
        late.hold("put_file", key(DATA), times=10**6)  # the new upload never gets through
        await commit(m1.fs, d, DATA, b"new" * 10)
        late.delete_gate.set()
        await until(lambda: [r["kind"] for _, r in m1.journal.pending_ops()] == ["put", "sweep"])
        crashed.cancel_scope.cancel()
    m1.close_journal()

    m2 = env.mount(late, commit_mode="async")
    m2.fs.resume_journal()
    d = await resolve(m2.fs, BM)
    node = await m2.fs.lookup(d.ino, DATA)
    assert node is not None and node.committed
    assert await read_all(m2.fs, node.ino) == b"new" * 10
    late.hold("put_file", key(DATA), times=0)
    late.held.clear()  # those requests never reach the store
    await settle(m2)
    assert contents(late) == {key(DATA): b"new" * 10}
