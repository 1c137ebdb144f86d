"""The checks the harness adds to every test can fail: an error the code under test logs, and a
traceback in a mounted daemon's log."""

from __future__ import annotations

import os

import pytest

from shufflefs.testing.corefs import BM, DATA, commit, invariant_problems, mkdirs, settle
from shufflefs.testing.mounting import Mount

pytest_plugins = ["pytester"]

INNER = """
import logging
import pytest

def test_logs_an_unexpected_error():
    logging.getLogger("shufflefs.core").error("internal error in read(3)")

@pytest.mark.allow_logged_errors(r"injected failure")
def test_logs_an_allowed_error():
    logging.getLogger("shufflefs.remote").error("put failed: injected failure")

def test_logs_a_warning():
    logging.getLogger("shufflefs.remote").warning("retrying")
"""


def test_an_unexpected_logged_error_fails_the_test_and_an_allowed_one_does_not(pytester):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "shufflefs.testing.logcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*logged 1 unexpected errors*", "*ERROR shufflefs.core: internal error in read(3)*"])


def test_a_traceback_in_a_daemons_log_fails_its_mount(tmp_path):
    mount = Mount("file:///nowhere", tmp_path / "mnt", tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    log = tmp_path / "cache" / "shufflefs.log"
    log.write_text("INFO shufflefs.daemon: mounted\nERROR shufflefs.core: the store refused it\n")
    mount.check_log()  # errors are what tests inject; tracebacks are bugs
    log.write_text(
        log.read_text() + "ERROR shufflefs.core: internal error in read\nTraceback (most recent call last):\n"
    )
    with pytest.raises(AssertionError, match="logged a traceback"):
        mount.check_log()


async def test_the_core_invariants_find_a_miscount_an_evictable_local_file_and_a_stale_handle(env):
    m = env.mount()
    d = await mkdirs(m.fs, BM)
    node = await commit(m.fs, d, DATA, b"x" * 1000)
    await settle(m)
    assert invariant_problems(m.fs) == []
    m.fs.staging.bytes += 1
    node.committed = False  # a local file in the eviction list: its only copy could go
    miscounted = invariant_problems(m.fs)
    m.fs.staging.bytes -= 1
    node.committed = True
    fh = await m.fs.open(node.ino, os.O_RDONLY)
    del m.fs.inodes[node.ino]
    stale = invariant_problems(m.fs)
    m.fs.inodes[node.ino] = node  # as it was: the fixture's own check passes
    await m.fs.release(fh)
    assert [problem.split()[:2] for problem in miscounted] == [["the", "staging"], ["inode", str(node.ino)]]
    # (its staging file is no inode's any more either: counted, but held by nothing)
    assert [problem.split()[:2] for problem in stale] == [["the", "staging"], ["handle", str(fh)]]
