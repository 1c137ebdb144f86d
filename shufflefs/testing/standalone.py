"""A real Spark standalone cluster for tests, started from the pyspark package.

Plain helpers, no pytest fixtures:

* ``StandaloneCluster(base, worker_local_dirs)`` starts a Master and one Worker per entry of
  ``worker_local_dirs`` (1 core, 1 GB each), every Worker with its own ``SPARK_LOCAL_DIRS``
  and ``SPARK_WORKER_DIR``, and stops all of them (and the executors they launched) on exit.
* ``cluster.executor_pids(app_id)`` finds the executor JVMs of an application;
  ``decommission(pid)`` sends SIGPWR (a graceful decommission in standalone mode).
* ``EventLog(path).tasks_per_job()`` reads from Spark's event log what each job ran: how many
  map tasks, and which of its stages were skipped.

Drivers run against the cluster with ``sparkrun.run_spark_job(master=cluster.master_url)``.

Every daemon runs in its own session, so the executors a Worker forks (and their PySpark
workers) share that session and die with it: teardown SIGTERMs each session, then SIGKILLs
what is left, the way sparkrun kills a driver's session.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from shufflefs.testing.servers import free_port
from shufflefs.testing.sparkrun import _session_pids, _tail, java_home

EXECUTOR_MAIN = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
# C1 only + serial GC: short-lived JVMs on 2 cores spend most of their CPU in C2 and parallel
# GC threads otherwise (the same choice as shufflefs/testing/spark_job.py).
DAEMON_JAVA_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
_STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL of a daemon's session


def spark_home() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return _find_spark_home()


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.load(answer)


class StandaloneCluster:
    """One Master and len(worker_local_dirs) Workers on 127.0.0.1, 1 core and 1 GB each (or
    `worker_cores` and `worker_memory`)."""

    def __init__(
        self,
        base,
        worker_local_dirs,
        *,
        worker_env: list[dict] | None = None,
        node_path: str | None = None,
        node_mounts: list[str] | None = None,
        worker_hosts: list[str] | None = None,
        start_timeout: float = 90,
        worker_cores: int = 1,
        worker_memory: str = "1G",
    ):
        """With `node_path` and `node_mounts`, every Worker (and every executor it starts) runs
        in a mount namespace of its own where node_mounts[i] is bound at node_path: each "node"
        sees its own shufflefs mount at the same path, as Spark expects of a fallback path.
        worker_local_dirs are then paths below node_path. `worker_hosts`: the address each
        Worker and its executors use (distinct loopback addresses, 127.0.0.2, ..., are distinct
        hosts to Spark; default 127.0.0.1 for all)."""
        self.base = Path(base)
        self.worker_local_dirs = [os.fspath(d) for d in worker_local_dirs]
        self.worker_env = worker_env or [{} for _ in self.worker_local_dirs]
        self.node_path = node_path
        self.node_mounts = node_mounts
        self.worker_hosts = worker_hosts or ["127.0.0.1"] * len(self.worker_local_dirs)
        self.killed_workers: set[int] = set()
        self.start_timeout = start_timeout
        self.worker_cores, self.worker_memory = worker_cores, worker_memory
        self.master_port = free_port()
        self.master_ui_port = free_port()
        self.master_url = f"spark://127.0.0.1:{self.master_port}"
        self.worker_dirs: list[str] = []
        self.processes: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------------ life cycle
    def start(self) -> StandaloneCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.master_port),
                "--webui-port",
                str(self.master_ui_port),
            ],
            {},
        )
        # A Worker that finds no Master waits 5-15 s before it retries: start them once it answers.
        self._wait_until(lambda: self.master_state() is not None, "the master answered")
        for i in range(len(self.worker_local_dirs)):
            self._start_worker(i)
        self._wait_workers_alive()
        return self

    def _start_worker(self, i: int) -> None:
        local_dir, host = self.worker_local_dirs[i], self.worker_hosts[i]
        work_dir = self.base / f"worker{i}-work"
        work_dir.mkdir(exist_ok=True)
        os.makedirs(self.host_path(i, local_dir), exist_ok=True)
        self.worker_dirs.append(str(work_dir))
        env = {
            "SPARK_LOCAL_DIRS": local_dir,
            "SPARK_WORKER_DIR": str(work_dir),
            "SPARK_LOCAL_IP": host,
            **self.worker_env[i],
        }
        wrapper = []
        if self.node_path is not None:
            wrapper = in_node_namespace(self.node_mounts[i], self.node_path)
        self._spawn(
            f"worker{i}",
            [
                "org.apache.spark.deploy.worker.Worker",
                self.master_url,
                "--cores",
                str(self.worker_cores),
                "--memory",
                self.worker_memory,
                "--host",
                host,
                "--port",
                str(free_port()),
                "--webui-port",
                str(free_port()),
                "--work-dir",
                str(work_dir),
            ],
            env,
            wrapper,
        )

    def add_worker(
        self, local_dir: str, host: str = "127.0.0.1", env: dict | None = None, node_mount: str | None = None
    ) -> int:
        """Start one more Worker (a new node joining); returns its index."""
        self.worker_local_dirs.append(os.fspath(local_dir))
        self.worker_hosts.append(host)
        self.worker_env.append(env or {})
        if self.node_mounts is not None:
            self.node_mounts.append(node_mount)
        self._start_worker(len(self.worker_local_dirs) - 1)
        self._wait_workers_alive()
        return len(self.worker_local_dirs) - 1

    def kill_worker(self, i: int) -> None:
        """kill -9 of a Worker and every executor it started (they share its session): a node
        that is lost."""
        name, process = self.processes[i + 1]  # after the master
        assert name == f"worker{i}"
        for pid, _comm in _session_pids(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(10)
        self.killed_workers.add(i)

    def host_path(self, worker: int, path: str) -> str:
        """Where this process finds a path as worker `worker` sees it."""
        if self.node_path is None or os.path.commonpath([path, self.node_path]) != self.node_path:
            return path
        return os.path.join(self.node_mounts[worker], os.path.relpath(path, self.node_path))

    def _spawn(self, name: str, args: list[str], extra_env: dict, wrapper: list[str] = ()) -> None:
        home = spark_home()
        env = dict(os.environ)
        # a user's configuration must not change the cluster
        for var in ("SPARK_CONF_DIR", "PYSPARK_SUBMIT_ARGS", "SPARK_EXECUTOR_DIRS", "SPARK_LOCAL_DIRS"):
            env.pop(var, None)
        env.update(
            SPARK_HOME=home, SPARK_LOCAL_IP="127.0.0.1", SPARK_DAEMON_JAVA_OPTS=DAEMON_JAVA_OPTS, SPARK_NO_DAEMONIZE="1"
        )
        if java_home():
            env.setdefault("JAVA_HOME", java_home())
        env.update(extra_env)
        log = open(self.base / f"{name}.log", "wb")
        with log:
            process = subprocess.Popen(
                [*wrapper, os.path.join(home, "bin", "spark-class"), *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
            )
        self.processes.append((name, process))

    def master_state(self) -> dict:
        return _get_json(f"http://127.0.0.1:{self.master_ui_port}/json/")

    def _wait_workers_alive(self) -> None:
        def all_alive() -> bool:
            workers = self.master_state()["workers"]
            return sum(w["state"] == "ALIVE" for w in workers) == self.live_workers

        self._wait_until(all_alive, f"{self.live_workers} workers ALIVE")

    @property
    def live_workers(self) -> int:
        return len(self.worker_local_dirs) - len(self.killed_workers)

    def _wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None and name not in {f"worker{i}" for i in self.killed_workers}:
                    raise AssertionError(
                        f"{name} exited with {process.returncode}\n{_tail(str(self.base / f'{name}.log'))}"
                    )
            try:
                if condition():
                    return
            except (OSError, ValueError, KeyError):
                pass  # not up yet
            time.sleep(0.2)
        raise AssertionError(f"not {what} after {self.start_timeout}s\n{_tail(str(self.base / 'master.log'))}")

    def stop(self) -> None:
        """SIGTERM every daemon's session (executors included), then SIGKILL what is left."""
        for sig, grace in ((signal.SIGTERM, _STOP_GRACE), (signal.SIGKILL, 5.0)):
            for _name, process in self.processes:
                for pid, _comm in _session_pids(process.pid):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_session_pids(p.pid) for _n, p in self.processes):
                for _name, process in self.processes:
                    process.poll()  # reap the daemons we started
                time.sleep(0.1)
        for _name, process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> StandaloneCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ executors
    def executor_pids(self, app_id: str, worker: int | None = None) -> dict[str, int]:
        """{executor id: pid} of the application's live executor JVMs on this cluster's workers
        (or on one). An executor's cwd is <worker dir>/<app id>/<executor id>: that ties it to
        a worker."""
        found = {}
        app_dirs = {os.path.join(d, app_id) for i, d in enumerate(self.worker_dirs) if worker in (None, i)}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if EXECUTOR_MAIN.encode() not in f.read():
                        continue
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if os.path.dirname(cwd) in app_dirs:
                found[os.path.basename(cwd)] = int(entry)
        return found

    def executor_logs(self, app_id: str = "*") -> str:
        """Tails of the executor logs of one application (default: all), for failure messages."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.base, "worker*-work", app_id, "*", "stderr"))):
            out.append(f"--- {path} ---\n{_tail(path)[-3000:]}")
        return "\n".join(out)


def in_node_namespace(mount: str, node_path: str) -> list[str]:
    """The command prefix that runs a command in a mount namespace of its own where `mount` is
    bound at `node_path`: a "node" seeing its own shufflefs mount at the path all nodes share."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$1" "$2" && shift 2 && exec "$@"',
        "node",
        mount,
        node_path,
    ]


def decommission(pid: int) -> None:
    """SIGPWR: a standalone executor with spark.decommission.enabled migrates its blocks, then exits."""
    os.kill(pid, signal.SIGPWR)


def wait_exited(pids, timeout: float = 60) -> float:
    """Wait until none of pids is alive (zombies count as gone); returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"executors {alive} still alive {timeout}s after the signal")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class EventLog:
    """Spark's event log of one application (JSON lines; spark.eventLog.compress=false)."""

    def __init__(self, paths):
        self.events = []
        for path in paths:
            with open(path) as f:
                self.events += [json.loads(line) for line in f if line.strip()]

    @classmethod
    def of_app(cls, log_dir, app_id: str) -> EventLog:
        """The log as one file <dir>/<app id>, or (rolling logs, Spark 4's default) the files
        <dir>/eventlog_v2_<app id>/events_<n>_<app id> in order of n."""
        single = os.path.join(log_dir, app_id)
        if os.path.exists(single):
            return cls([single])
        parts = glob.glob(os.path.join(log_dir, f"eventlog_v2_{app_id}", f"events_*_{app_id}"))
        if not parts:
            raise FileNotFoundError(f"no event log of {app_id} in {log_dir}: {os.listdir(log_dir)}")
        return cls(sorted(parts, key=lambda p: int(os.path.basename(p).split("_")[1])))

    def jobs(self) -> list[dict]:
        """Per job in order: its id, the map tasks and result tasks that ran while it ran, the
        stages it named and the ones it skipped (a skipped stage has no StageSubmitted event).
        Jobs run one after the other here, so a task belongs to the job running when it ended."""
        jobs: list[dict] = []
        current = None
        submitted: set[int] = set()  # during the current job (a map stage keeps its id across jobs)
        for event in self.events:
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                current = {
                    "job": event["Job ID"],
                    "stages": sorted(event["Stage IDs"]),
                    "map_tasks": 0,
                    "result_tasks": 0,
                    "failed_tasks": 0,
                }
                jobs.append(current)
                submitted = set()
            elif kind == "SparkListenerStageSubmitted":
                submitted.add(event["Stage Info"]["Stage ID"])
            elif kind == "SparkListenerTaskEnd" and current is not None:
                if event["Task End Reason"]["Reason"] != "Success":
                    current["failed_tasks"] += 1
                elif event["Task Type"] == "ShuffleMapTask":
                    current["map_tasks"] += 1
                else:
                    current["result_tasks"] += 1
            elif kind == "SparkListenerJobEnd" and current is not None:
                current["result"] = event["Job Result"]["Result"]
                current["skipped_stages"] = [s for s in current["stages"] if s not in submitted]
                current = None
        return jobs

    def map_tasks_by_executor(self, job: int) -> dict[str, int]:
        """{executor id: successful map tasks} of one job (jobs run one after the other)."""
        counts: dict[str, int] = {}
        current = None
        for event in self.events:
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                current = event["Job ID"]
            elif kind == "SparkListenerJobEnd":
                current = None
            elif (
                kind == "SparkListenerTaskEnd"
                and current == job
                and event["Task Type"] == "ShuffleMapTask"
                and event["Task End Reason"]["Reason"] == "Success"
            ):
                executor = event["Task Info"]["Executor ID"]
                counts[executor] = counts.get(executor, 0) + 1
        return counts

    def executors_removed(self) -> list[dict]:
        return [
            {"id": e["Executor ID"], "reason": e.get("Removed Reason")}
            for e in self.events
            if e["Event"] == "SparkListenerExecutorRemoved"
        ]
