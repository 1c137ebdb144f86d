"""`shufflefs.journal`: a cache dir's LMDB state on its own, without a remote or a filesystem.

Covers the pending operations (order, rewrite, removal, sequence numbers across reopening), the
operations the store refused (`failed`), the index cache, the records of directories, the
metadata and the writer id, the late-write entries, what survives a process killed without
closing its journal, and `open_journal` (`shufflefs journal`) beside a daemon.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from shufflefs.journal import CacheDirBusy, Journal, open_journal
from shufflefs.places import SetupError

UID, GID = os.getuid(), os.getgid()


class CacheDir:
    def __init__(self, path: str):
        self.path = path
        self.journal = Journal(path)

    def reopen(self) -> Journal:
        """The journal as the next daemon with this cache dir finds it."""
        self.journal.close()
        self.journal = Journal(self.path)
        return self.journal


@pytest.fixture
def cache(tmp_path):
    cache = CacheDir(str(tmp_path / "lmdb"))
    yield cache
    cache.journal.close()


@pytest.fixture
def journal(cache):
    return cache.journal


# -- pending operations --------------------------------------------------------------------------


def test_pending_operations_come_back_in_the_order_they_were_issued(journal):
    # past 255: the sequence numbers must sort as numbers, not as their first byte
    seqs = []
    for i in range(300):
        expected = journal.peek_seq()
        seqs.append(journal.add_op({"kind": "put", "key": f"k{i}"}))
        assert seqs[-1] == expected
    assert seqs == list(range(1, 301))
    assert journal.pending_ops() == [(seq, {"kind": "put", "key": f"k{i}"}) for i, seq in enumerate(seqs)]


def test_a_rewritten_operation_keeps_its_place_and_a_removed_one_is_gone(journal):
    first = journal.add_op({"kind": "put", "key": "a"})
    second = journal.add_op({"kind": "put", "key": "b"})
    third = journal.add_op({"kind": "delete", "key": "c"})
    journal.rewrite_op(second, {"kind": "sweep", "key": "b", "tokens": ["t"], "in_flight": True})
    journal.remove_op(first)
    assert journal.pending_ops() == [
        (second, {"kind": "sweep", "key": "b", "tokens": ["t"], "in_flight": True}),
        (third, {"kind": "delete", "key": "c"}),
    ]


def test_a_refused_operation_moves_to_the_failed_table_with_its_error(journal):
    keep = journal.add_op({"kind": "put", "key": "fine"})
    seq = journal.add_op({"kind": "put", "key": "bad/x", "path": "abc", "size": 3})
    before = time.time()
    journal.fail_op(seq, {"kind": "put", "key": "bad/x", "path": "abc", "size": 3}, "InvalidArgument")
    after = time.time()
    assert journal.pending_ops() == [(keep, {"kind": "put", "key": "fine"})]
    [(failed_seq, record)] = journal.failed_ops()
    assert failed_seq == seq
    assert before <= record.pop("failed_at") <= after
    assert record == {"kind": "put", "key": "bad/x", "path": "abc", "size": 3, "error": "InvalidArgument"}


def test_drop_op_removes_a_pending_or_a_failed_operation_and_says_whether_there_was_one(journal):
    pending = journal.add_op({"kind": "put", "key": "a"})
    failed = journal.add_op({"kind": "put", "key": "b"})
    journal.fail_op(failed, {"kind": "put", "key": "b"}, "refused")
    assert journal.drop_op(pending) is True
    assert journal.drop_op(failed) is True
    assert journal.drop_op(failed) is False
    assert journal.drop_op(12345) is False
    assert journal.pending_ops() == [] and journal.failed_ops() == []


def test_a_reopened_journal_never_hands_out_the_number_of_a_failed_operation_again(cache, journal):
    # an operator drops failed operations by number (`shufflefs journal --drop SEQ`)
    seqs = [journal.add_op({"kind": "put", "key": f"k{i}"}) for i in range(3)]
    journal.fail_op(seqs[2], {"kind": "put", "key": "k2"}, "refused")
    journal.remove_op(seqs[0])
    journal.remove_op(seqs[1])
    journal = cache.reopen()
    assert journal.peek_seq() == seqs[2] + 1
    assert journal.add_op({"kind": "delete", "key": "k3"}) == seqs[2] + 1
    assert [seq for seq, _ in journal.failed_ops()] == [seqs[2]]


def test_a_reopened_journal_numbers_new_operations_after_the_pending_ones(cache, journal):
    seqs = [journal.add_op({"kind": "put", "key": f"k{i}"}) for i in range(5)]
    journal.remove_op(seqs[0])
    journal = cache.reopen()
    new = journal.add_op({"kind": "delete", "key": "k0"})
    assert new > seqs[-1]
    assert [seq for seq, _ in journal.pending_ops()] == seqs[1:] + [new]


KILLED_WRITER = r"""
import os, signal, sys
from shufflefs.journal import Journal
j = Journal(sys.argv[1])
j.writer_id()
j.add_op({"kind": "put", "key": "a/x.data", "path": "f1", "size": 5, "token": "i.1.1"})
refused = j.add_op({"kind": "put", "key": "bad/y.data", "path": "f2", "size": 1, "token": "i.1.2"})
j.add_op({"kind": "move", "key": "a/x.data", "dst": "a/z.data", "token": "i.1.3"})
j.fail_op(refused, {"kind": "put", "key": "bad/y.data"}, "InvalidArgument")
j.index_put("a/x.index", b"\0" * 16)
j.dir_set("a", 0o755, 1, 2)
j.late_add("a/old.data", "i.0.9", 4e9)
sys.stdout.write("written\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)  # no close, no sync: as a daemon killed mid-run
"""


def test_everything_recorded_survives_a_process_killed_without_closing_its_journal(tmp_path):
    path = str(tmp_path / "lmdb")
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, path], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout == "written\n"
    journal = Journal(path)
    try:
        assert journal.pending_ops() == [
            (1, {"kind": "put", "key": "a/x.data", "path": "f1", "size": 5, "token": "i.1.1"}),
            (3, {"kind": "move", "key": "a/x.data", "dst": "a/z.data", "token": "i.1.3"}),
        ]
        assert [(seq, record["key"], record["error"]) for seq, record in journal.failed_ops()] == [
            (2, "bad/y.data", "InvalidArgument")
        ]
        assert journal.index_get("a/x.index") == b"\0" * 16
        assert journal.dirs() == [("a", {"mode": 0o755, "uid": 1, "gid": 2})]
        assert journal.late_entries() == {"a/old.data": [("i.0.9", 4e9)]}
        assert journal.meta_get("runs") == "1"
        assert journal.peek_seq() == 4
    finally:
        journal.close()


# -- writer id and metadata -----------------------------------------------------------------------


def test_the_writer_id_counts_runs_and_keeps_the_instance_across_reopening(cache, journal):
    first = journal.writer_id()
    second = journal.writer_id()
    third = cache.reopen().writer_id()
    instances = {w.split(".")[0] for w in (first, second, third)}
    assert len(instances) == 1
    [instance] = instances
    assert len(instance) == 16 and int(instance, 16) >= 0
    assert [w.split(".")[1] for w in (first, second, third)] == ["1", "2", "3"]


def test_another_cache_dir_has_another_instance(journal, tmp_path):
    other = Journal(str(tmp_path / "other-lmdb"))
    try:
        assert other.writer_id().split(".")[0] != journal.writer_id().split(".")[0]
    finally:
        other.close()


def test_metadata_is_kept_by_name(cache, journal):
    assert journal.meta_get("store") is None
    journal.meta_set("store", "s3://bucket/prefix")
    journal.meta_set("note", "naïve ✓")
    journal.meta_set("store", "file:///srv/shuffle")
    journal = cache.reopen()
    assert journal.meta_get("store") == "file:///srv/shuffle"
    assert journal.meta_get("note") == "naïve ✓"


# -- index cache ----------------------------------------------------------------------------------


def test_the_index_cache_puts_gets_moves_and_deletes_whole_files(journal):
    journal.index_put("bm/0c/shuffle_0_1_0.index", b"one")
    journal.index_put("bm/0c/shuffle_0_1_0.index", b"two")  # replaced, not appended
    assert journal.index_get("bm/0c/shuffle_0_1_0.index") == b"two"
    assert journal.index_get("bm/0c/shuffle_0_2_0.index") is None
    journal.index_move("bm/0c/shuffle_0_1_0.index", "bm/0d/shuffle_0_1_0.index")
    assert journal.index_get("bm/0c/shuffle_0_1_0.index") is None
    assert journal.index_get("bm/0d/shuffle_0_1_0.index") == b"two"
    # a move of what is not cached must not make an entry appear
    journal.index_move("bm/0c/nothing.index", "bm/0c/elsewhere.index")
    assert journal.index_get("bm/0c/elsewhere.index") is None
    journal.index_delete("bm/0d/shuffle_0_1_0.index")
    assert journal.index_get("bm/0d/shuffle_0_1_0.index") is None
    journal.index_delete("bm/0d/shuffle_0_1_0.index")  # twice: no error


def test_index_retain_keeps_exactly_the_given_keys_and_counts_the_others(journal):
    for i in range(5):
        journal.index_put(f"d/{i}.index", bytes([i]))
    assert journal.index_retain({"d/1.index", "d/3.index", "d/not-cached.index"}) == 3
    assert [journal.index_get(f"d/{i}.index") for i in range(5)] == [None, b"\x01", None, b"\x03", None]
    assert journal.index_retain({"d/1.index", "d/3.index"}) == 0


def test_an_index_key_longer_than_lmdb_holds_is_read_but_not_cached(journal):
    fits = "d/" + "x" * (journal.max_key_size - 2)
    journal.index_put(fits, b"kept")
    assert journal.index_get(fits) == b"kept"
    # bytes count, not characters: 256 é are 512 bytes
    for too_long in (fits + "x", "d/" + "é" * 256):
        journal.index_put(too_long, b"dropped")
        assert journal.index_get(too_long) is None


def test_keys_that_are_not_utf8_keep_their_bytes(journal):
    name = os.fsdecode(b"bm/\xff\xfe.index")
    twin = os.fsdecode(b"bm/\xff\xfd.index")
    journal.index_put(name, b"ours")
    assert journal.index_get(name) == b"ours"
    assert journal.index_get(twin) is None
    assert journal.index_retain({name}) == 0
    directory = os.fsdecode(b"spark-\xe9")
    journal.dir_set(directory, 0o700, UID, GID)
    assert journal.dirs() == [(directory, {"mode": 0o700, "uid": UID, "gid": GID})]
    assert os.fsencode(journal.dirs()[0][0]) == b"spark-\xe9"


# -- directories ----------------------------------------------------------------------------------


def test_a_directory_record_keeps_its_owner_mode_and_executors(journal):
    executor = {"app": "app-1", "executor": "3", "pid": 42, "start": 7}
    journal.dir_set("spark-1/blockmgr-1", 0o755, UID, GID, executor=executor)
    journal.dir_set("spark-1", 0o700, UID, GID)
    journal.dir_set("spark-1", 0o750, 0, 0)  # replaced, not merged
    assert journal.dirs() == [
        ("spark-1", {"mode": 0o750, "uid": 0, "gid": 0}),
        ("spark-1/blockmgr-1", {"mode": 0o755, "uid": UID, "gid": GID, "executor": executor}),
    ]


def test_directories_come_back_parents_before_children(journal):
    # '-' and '.' sort before '/': siblings named like a parent with a suffix go in between
    for key in ("a/b/c", "a.b", "a-b/c", "a/b", "a-b", "a", "a/b-c", "b"):
        journal.dir_set(key, 0o755, UID, GID)
    order = [key for key, _ in journal.dirs()]
    assert sorted(order) == sorted(["a/b/c", "a.b", "a-b/c", "a/b", "a-b", "a", "a/b-c", "b"])
    for position, key in enumerate(order):
        parts = key.split("/")
        for depth in range(1, len(parts)):
            assert order.index("/".join(parts[:depth])) < position, (key, order)


def test_moving_a_directory_moves_its_records_and_those_below_it_only(journal):
    records = {"a": 0o700, "a/b": 0o710, "a/b/c": 0o750, "ab": 0o755, "a-x": 0o744, "z": 0o777}
    for key, mode in records.items():
        journal.dir_set(key, mode, UID, GID)
    journal.dir_move("a", "z/a")
    assert {key: record["mode"] for key, record in journal.dirs()} == {
        "z/a": 0o700,
        "z/a/b": 0o710,
        "z/a/b/c": 0o750,
        "ab": 0o755,
        "a-x": 0o744,
        "z": 0o777,
    }


def test_directory_records_are_removed_one_by_one_or_all_at_once(cache, journal):
    for key in ("a", "a/b", "c"):
        journal.dir_set(key, 0o755, UID, GID)
    journal.dir_remove("a/b")
    journal.dir_remove("never-recorded")
    assert [key for key, _ in journal.dirs()] == ["a", "c"]
    journal.dirs_clear()
    assert journal.dirs() == []
    journal.dir_set("d", 0o755, UID, GID)  # the table is emptied, not gone
    assert [key for key, _ in cache.reopen().dirs()] == ["d"]


# -- late writes ----------------------------------------------------------------------------------


def test_late_entries_accumulate_per_key_until_taken(journal):
    journal.late_add("k", "inst.1.5", 1000.0)
    journal.late_add("k", "inst.1.9", 2000.0)
    journal.late_add("j", "inst.2.1", 3000.0)
    assert journal.late_entries() == {"k": [("inst.1.5", 1000.0), ("inst.1.9", 2000.0)], "j": [("inst.2.1", 3000.0)]}
    journal.late_take("k")
    journal.late_take("never-added")
    assert journal.late_entries() == {"j": [("inst.2.1", 3000.0)]}


def test_late_expire_forgets_only_the_writes_whose_window_is_over(journal):
    journal.late_add("k", "t1", 100.0)
    journal.late_add("k", "t2", 300.0)
    journal.late_add("j", "t3", 150.0)
    journal.late_add("i", "t4", 250.5)
    journal.late_expire(200.0)
    assert journal.late_entries() == {"k": [("t2", 300.0)], "i": [("t4", 250.5)]}
    journal.late_expire(1e12)
    assert journal.late_entries() == {}


# -- the cache dir --------------------------------------------------------------------------------


def test_the_journal_is_private_to_its_owner(journal, tmp_path):
    # it holds .index contents of every map output written here
    for path in [tmp_path / "lmdb", *(tmp_path / "lmdb").iterdir()]:
        assert os.stat(path).st_mode & 0o077 == 0, path


def make_cache_dir(path) -> None:
    os.makedirs(path)
    journal = Journal(os.path.join(path, "lmdb"))
    journal.add_op({"kind": "put", "key": "a", "path": "f", "size": 1})
    journal.close()


def hold_lock(path, pid: str):
    """What a running daemon holds: the cache dir's lock, with its pid in it."""
    lock = open(os.path.join(path, "lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(pid)
    lock.flush()
    return lock


def test_open_journal_refuses_a_directory_that_is_no_cache_dir(tmp_path):
    with pytest.raises(CacheDirBusy, match="not a shufflefs cache dir") as excinfo:
        with open_journal(str(tmp_path), exclusive=False):
            pass
    assert isinstance(excinfo.value, SetupError)  # the command shows it as a one-line error
    assert not os.path.exists(tmp_path / "lmdb")


def test_open_journal_exclusive_refuses_a_cache_dir_a_daemon_holds_and_names_the_daemon(tmp_path):
    cache = str(tmp_path / "cache")
    make_cache_dir(cache)
    lock = hold_lock(cache, "4242")
    try:
        with pytest.raises(CacheDirBusy, match=r"in use by a shufflefs daemon \(pid 4242\)"):
            with open_journal(cache, exclusive=True):
                pass
        # looking is allowed while it runs
        with open_journal(cache, exclusive=False) as journal:
            assert [record["key"] for _, record in journal.pending_ops()] == ["a"]
    finally:
        lock.close()


def test_open_journal_exclusive_changes_what_the_next_daemon_finds_and_lets_go_of_the_lock(tmp_path):
    cache = str(tmp_path / "cache")
    make_cache_dir(cache)
    with open_journal(cache, exclusive=True) as journal:
        [(seq, _)] = journal.pending_ops()
        assert journal.drop_op(seq)
    lock = hold_lock(cache, "1")  # would raise BlockingIOError if open_journal kept it
    lock.close()
    journal = Journal(os.path.join(cache, "lmdb"))
    try:
        assert journal.pending_ops() == []
    finally:
        journal.close()


def test_open_journal_reports_a_journal_it_cannot_read(tmp_path):
    cache = tmp_path / "cache"
    (cache / "lmdb").mkdir(parents=True)
    (cache / "lmdb" / "data.mdb").write_bytes(b"not an LMDB file, " * 1000)
    with pytest.raises(CacheDirBusy, match="cannot read the journal"):
        with open_journal(str(cache), exclusive=True):
            pass
