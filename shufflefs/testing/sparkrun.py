"""Run shufflefs/testing/spark_job.py (a real PySpark workload) from tests.

Plain helpers, no pytest fixtures:

* ``run_spark_job(local_dir, result_path, ...)`` runs the job in its own session
  with ``spark.local.dir=local_dir`` and returns the parsed ``{job: summary}``
  result; with ``pause_callback`` the callback runs while Spark is still alive
  (all jobs done, shuffle files still under ``local_dir``).
* ``shuffle_files(local_dir)`` lists the committed shuffle files under a dir.

Every process of a run (the Python driver, the driver JVM, the local-cluster
executor JVMs and their PySpark daemons/workers) lives in one session whose id
is the driver's pid.  On success the helper waits until all of them have
exited (Spark deletes its dirs after the Python driver returns, so only then
may a test unmount); on failure or timeout it SIGKILLs the whole session and
raises ``AssertionError`` with the tail of the job's stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shufflefs.naming import is_durable

SPARK_JOB = Path(__file__).resolve().with_name("spark_job.py")
RECOVERY_JOB = Path(__file__).resolve().with_name("recovery_job.py")
DONE_MARKER = "SPARK_JOBS_DONE"


@dataclass
class SparkRun:
    """What a run of a driver script found and took."""

    result: dict  # what the script wrote to its result file
    command: list[str]
    stderr_path: str  # the driver's stderr (Spark's log)
    wall_s: float  # driver start to the exit of every Spark process, the pause callback excluded
    callback_s: float  # in the pause callback
    jobs_done_s: float | None  # driver start to the script's DONE_MARKER (with a pause callback)


def stderr_path_of(result_path) -> str:
    """Where a run keeps its driver's stderr (also when it failed)."""
    return os.path.abspath(os.fspath(result_path)) + ".stderr"


_STDERR_TAIL_LINES = 60
_STDERR_TAIL_CHARS = 8000
_EXIT_GRACE = 60.0  # seconds for Spark's JVMs to go away after the driver exited


def java_home() -> str | None:
    """JAVA_HOME derived from the java on PATH (``readlink -f /usr/bin/java``)."""
    java = shutil.which("java") or "/usr/bin/java"
    if not os.path.exists(java):
        return None
    real = os.path.realpath(java)  # .../jvm/java-17-openjdk-amd64/bin/java
    bindir = os.path.dirname(real)
    if os.path.basename(bindir) != "bin":
        return None
    return os.path.dirname(bindir)


def shuffle_files(local_dir) -> list[str]:
    """Committed shuffle files (``shuffle_S_M_R.data|index|checksum.ALG``) under
    local_dir, sorted.  Temp files (``….<uuid>``, ``temp_shuffle_*``) are not
    included.  Files vanishing during the walk are ignored."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(os.fspath(local_dir), onerror=lambda e: None):
        for name in filenames:
            if is_durable(name):
                found.append(os.path.join(dirpath, name))
    found.sort()
    return found


def run_spark_job(*args, **kwargs) -> dict:
    """The result of run_spark (for tests, which need nothing else)."""
    return run_spark(*args, **kwargs).result


def run_spark(
    local_dir,
    result_path,
    *,
    env: Mapping[str, str | None] | None = None,
    pause_callback: Callable[[], None] | None = None,
    timeout: float = 600,
    master: str | None = None,
    extra_args: Iterable[str] = (),
    script=SPARK_JOB,
    wrapper: Iterable[str] = (),
) -> SparkRun:
    """Run shufflefs/testing/spark_job.py with ``spark.local.dir=local_dir``; return its result
    and timings.

    env: overrides applied to a copy of os.environ (a value of None removes the
        variable).  JAVA_HOME is derived from /usr/bin/java if missing and
        PYSPARK_PYTHON is forced to sys.executable.
    pause_callback: called while Spark is alive, after all jobs ran and before
        spark.stop() (the job runs with --pause).  If it raises, Spark is still
        stopped (or killed) and the exception propagates.
    timeout: seconds for the whole run, not counting the time spent in
        pause_callback.
    master: Spark master (default: spark_job.py's, local-cluster[2,1,1024]).
    extra_args: more arguments for the script.
    script: another driver program with spark_job.py's command line and pause
        protocol (e.g. bench/spark_workloads.py, built on spark_job.drive()).
    wrapper: a command prefix the driver runs under (e.g. standalone.in_node_namespace).

    The job's stderr is kept in ``<result_path>.stderr``.
    """
    local_dir = os.path.abspath(os.fspath(local_dir))
    result_path = os.path.abspath(os.fspath(result_path))
    stderr_path = stderr_path_of(result_path)
    try:
        os.unlink(result_path)
    except FileNotFoundError:
        pass

    run_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = value
    if not run_env.get("JAVA_HOME"):
        jh = java_home()
        if jh:
            run_env["JAVA_HOME"] = jh
    run_env["PYSPARK_PYTHON"] = sys.executable
    run_env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    run_env["PYTHONUNBUFFERED"] = "1"

    script_name = os.path.basename(os.fspath(script))
    cmd = [*wrapper, sys.executable, os.fspath(script), "--local-dir", local_dir, "--result", result_path]
    if master:
        cmd += ["--master", master]
    if pause_callback is not None:
        cmd.append("--pause")
    cmd += list(extra_args)

    t0 = time.monotonic()
    jobs_done_s = None
    deadline = t0 + timeout

    with open(stderr_path, "wb") as err_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err_file,
            env=run_env,
            cwd=os.path.dirname(result_path),  # stray files (if any) land next to the result
            start_new_session=True,  # sid == pgid == proc.pid: covers all Spark processes
        )
    sid = proc.pid

    done = threading.Event()
    stdout_lines: list[str] = []

    def read_stdout() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.decode(errors="replace").rstrip("\n")
            stdout_lines.append(line)
            if line.strip() == DONE_MARKER:
                done.set()
        done.set()  # EOF: process gone (or closed stdout)

    reader = threading.Thread(target=read_stdout, name="spark-job-stdout", daemon=True)
    reader.start()

    def fail(what: str) -> AssertionError:
        _kill_session(sid, proc)
        rc = proc.poll()
        msg = (
            f"{script_name} {what} (exit status {rc}, {time.monotonic() - t0:.1f}s, "
            f"local_dir={local_dir})\n"
            f"command: {' '.join(cmd)}\n"
            f"--- stdout tail ---\n" + "\n".join(stdout_lines[-10:]) + "\n"
            f"--- stderr tail ({stderr_path}) ---\n{_tail(stderr_path)}"
        )
        if rc is None or rc < 0:  # killed: the script could not show the executors' logs
            msg += _executor_log_tails(stderr_path)
        return AssertionError(msg)

    callback_time = 0.0
    callback_error: BaseException | None = None
    try:
        if pause_callback is not None:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise fail(f"did not reach {DONE_MARKER} within {timeout}s")
            if DONE_MARKER not in stdout_lines:
                try:
                    proc.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                raise fail(f"closed stdout before printing {DONE_MARKER}")
            jobs_done_s = time.monotonic() - t0
            tc = time.monotonic()
            try:
                pause_callback()
            except BaseException as e:  # stop Spark first, re-raise below
                callback_error = e
            callback_time = time.monotonic() - tc
            deadline += callback_time
            _release(proc)
        else:
            proc.stdin.close()  # type: ignore[union-attr]

        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise fail(f"timed out after {timeout}s") from None
        if proc.returncode != 0 and callback_error is None:
            raise fail("failed")
        # The driver JVM and the executors exit (and Spark removes its dirs)
        # after the Python driver returned: wait for them.
        leftovers = _wait_session_gone(sid, min(_EXIT_GRACE, max(5.0, deadline - time.monotonic())))
        if leftovers and callback_error is None:
            raise fail(f"exited but left processes behind: {leftovers}")
    finally:
        _kill_session(sid, proc)  # no-op unless something is left
        reader.join(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
    if callback_error is not None:
        raise callback_error

    wall_s = time.monotonic() - t0 - callback_time
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise AssertionError(
            f"{script_name} exited 0 but {result_path} is unreadable: {e}\n--- stderr tail ---\n{_tail(stderr_path)}"
        ) from None
    return SparkRun(result, cmd, stderr_path, wall_s, callback_time, jobs_done_s)


# ---------------------------------------------------------------------------


def _release(proc: subprocess.Popen) -> None:
    """Let a paused job continue (stop Spark and exit)."""
    try:
        proc.stdin.write(b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    except (OSError, ValueError):
        pass
    try:
        proc.stdin.close()  # type: ignore[union-attr]
    except (OSError, ValueError):
        pass


def _session_pids(sid: int) -> list[tuple[int, str]]:
    """(pid, comm) of live (non-zombie) processes in session sid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        lpar, rpar = data.find("("), data.rfind(")")
        fields = data[rpar + 2 :].split()
        # fields: state ppid pgrp session ...
        if len(fields) < 4 or fields[0] in ("Z", "X"):
            continue
        if int(fields[3]) == sid:
            out.append((int(entry), data[lpar + 1 : rpar]))
    return out


def _wait_session_gone(sid: int, timeout: float) -> list[tuple[int, str]]:
    end = time.monotonic() + timeout
    while True:
        left = _session_pids(sid)
        if not left or time.monotonic() >= end:
            return left
        time.sleep(0.1)


def _kill_session(sid: int, proc: subprocess.Popen) -> None:
    """SIGKILL every process of the run's session (the pyspark daemon makes
    its own process group, so killpg alone is not enough) and reap the driver."""
    for _ in range(50):
        pids = _session_pids(sid)
        if proc.poll() is None:
            pids.append((proc.pid, "driver"))
        if not pids:
            break
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, _comm in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(0.1)
        except subprocess.TimeoutExpired:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _executor_log_tails(stderr_path: str, lines: int = 15) -> str:
    """Tails of the local-cluster executors' logs ($SPARK_HOME/work/<app>/<n>/stderr)
    of the application named in the job's stderr."""
    try:
        with open(stderr_path, errors="replace") as f:
            m = re.search(r"\bapp=(app-[\w-]+)", f.read())
        if not m:
            return ""
        from pyspark.find_spark_home import _find_spark_home

        work = os.path.join(os.environ.get("SPARK_HOME") or _find_spark_home(), "work", m.group(1))
        out = []
        for name in sorted(os.listdir(work)):
            path = os.path.join(work, name, "stderr")
            with open(path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
            out.append(f"\n--- executor {name} log tail ({path}) ---\n" + "\n".join(tail))
        return "".join(out)
    except Exception:  # noqa: BLE001 - best effort
        return ""


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    lines = text.splitlines()[-_STDERR_TAIL_LINES:]
    return "\n".join(lines)[-_STDERR_TAIL_CHARS:]
