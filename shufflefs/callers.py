"""Which Spark executor a FUSE request comes from (docs/RECOVERY.md, "Who is who").

Every request carries the id of the calling thread, in this daemon's pid namespace (0 when the
caller is not visible from it). An executor is a JVM whose command line names its application
and itself: `--executor-id E ... --app-id A`, in standalone mode (CoarseGrainedExecutorBackend)
and on Kubernetes (KubernetesExecutorBackend) alike. Anything else (a shell, a Worker, the
shuffle service, a PySpark worker) is not an executor.

Standard library only: reads /proc.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Executor:
    """One executor process: a pid, and its start time (a pid that is reused is another
    process)."""

    app_id: str
    executor_id: str
    pid: int
    start_time: int

    def record(self) -> dict:
        return {"app": self.app_id, "executor": self.executor_id, "pid": self.pid, "start": self.start_time}

    @classmethod
    def from_record(cls, record: dict) -> Executor:
        return cls(record["app"], record["executor"], record["pid"], record["start"])


class Callers:
    """Resolves thread ids to executors, caching per process (its pid and start time: a pid
    that is reused is another process)."""

    def __init__(self, proc: str = "/proc", limit: int = 4096):
        self.proc = proc
        self.limit = limit
        self._known: dict[tuple[int, int], Executor | None] = {}

    def executor_of(self, tid: int) -> Executor | None:
        if tid <= 0:
            return None
        process = self._process_of(tid)
        if process is None:
            return None
        if process not in self._known:
            if len(self._known) >= self.limit:
                self._known.pop(next(iter(self._known)))
            self._known[process] = self._read_executor(*process)
        return self._known[process]

    def alive(self, executor: Executor) -> bool:
        """Whether the executor's process still runs (seen from this daemon: on this node)."""
        return self._start_time(executor.pid) == executor.start_time

    def _process_of(self, tid: int) -> tuple[int, int] | None:
        try:
            with open(f"{self.proc}/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        except (OSError, StopIteration, ValueError):
            return None
        start = self._start_time(tgid)
        return None if start is None else (tgid, start)

    def _start_time(self, pid: int) -> int | None:
        try:
            with open(f"{self.proc}/{pid}/stat") as f:
                # after the command name, which may hold spaces and parentheses
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[19])  # field 22 of stat(5): starttime

    def _read_executor(self, pid: int, start_time: int) -> Executor | None:
        try:
            with open(f"{self.proc}/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            return None
        app_id = _value_of(args, "--app-id")
        executor_id = _value_of(args, "--executor-id")
        if app_id is None or executor_id is None:
            return None
        return Executor(app_id, executor_id, pid, start_time)


def _value_of(args: list[str], flag: str) -> str | None:
    try:
        value = args[args.index(flag) + 1]
    except (ValueError, IndexError):
        return None
    return value or None
