"""shufflefs.callers: from the thread id of a FUSE request to the Spark executor it belongs to."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shufflefs.callers import Callers, Executor

# a process with an executor's arguments, and a second thread (the FUSE request may come from
# any thread of the JVM); it prints that thread's id
FAKE_EXECUTOR = """
import sys, threading, time
def idle():
    print(threading.get_native_id(), flush=True)
    time.sleep(60)
threading.Thread(target=idle, daemon=True).start()
time.sleep(60)
"""


@pytest.fixture
def executor_process():
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FAKE_EXECUTOR,
            "org.apache.spark.executor.CoarseGrainedExecutorBackend",
            "--driver-url",
            "spark://CoarseGrainedScheduler@127.0.0.1:1",
            "--executor-id",
            "7",
            "--hostname",
            "127.0.0.2",
            "--cores",
            "1",
            "--app-id",
            "app-20261207000000-0003",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        thread_id = int(process.stdout.readline())
        yield process, thread_id
    finally:
        process.kill()
        process.wait()


def test_an_executor_is_known_by_any_of_its_threads(executor_process):
    process, thread_id = executor_process
    callers = Callers()
    assert thread_id != process.pid
    executor = callers.executor_of(thread_id)
    assert (executor.app_id, executor.executor_id, executor.pid) == ("app-20261207000000-0003", "7", process.pid)
    assert callers.executor_of(process.pid) == executor
    assert Executor.from_record(executor.record()) == executor
    assert callers.alive(executor)
    process.kill()
    process.wait()
    assert not callers.alive(executor)
    assert callers.executor_of(thread_id) is None  # gone


def test_other_processes_and_invisible_callers_are_no_executor():
    callers = Callers()
    assert callers.executor_of(os.getpid()) is None  # pytest: no executor arguments
    assert callers.executor_of(0) is None  # a caller outside the daemon's pid namespace
    assert callers.executor_of(2**22 + 12345) is None  # no such process
    with subprocess.Popen(["sleep", "30", "--app-id", "a"]) as half:  # one of the two arguments
        try:
            time.sleep(0.05)
            assert callers.executor_of(half.pid) is None
        finally:
            half.kill()
