"""Issue 13 on a real Spark standalone cluster (shufflefs/testing/standalone.py): executors leave, map
outputs stay. Each scenario runs on shufflefs mounts and, as the control, on plain
directories, where Spark must show the recompute that shufflefs removes.

What each run measured (map tasks per job, store PUT bytes, committed shuffle bytes) is
printed; only what holds today is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from shufflefs.testing.mounting import Mount, run_cli
from shufflefs.testing.recovery_job import KEYS, MAP_TASKS, RECORDS
from shufflefs.testing.servers import free_port
from shufflefs.testing.sparkrun import RECOVERY_JOB, java_home, run_spark, shuffle_files
from shufflefs.testing.standalone import EventLog, StandaloneCluster, decommission, in_node_namespace, wait_exited

pytestmark = [pytest.mark.spark, pytest.mark.skipif(java_home() is None, reason="no java on PATH")]

WORKERS = 2
#: what both jobs of recovery_job.py must answer: (key, count) of x % KEYS over range(RECORDS)
EXPECTED_COUNTS = [[key, RECORDS // KEYS] for key in range(KEYS)]

# Graceful decommission with shuffle-block migration. maxDiskSize=0 makes every peer refuse
# the blocks, so a map output either goes to the fallback path or is lost.
DECOMMISSION = {
    "spark.decommission.enabled": "true",
    "spark.storage.decommission.enabled": "true",
    "spark.storage.decommission.shuffleBlocks.enabled": "true",
    "spark.storage.decommission.shuffleBlocks.maxDiskSize": "0",
    # An executor exits only after a second look at its shuffle files finds them all migrated;
    # the default 30 s between looks would make each decommission take 30 s.
    "spark.storage.decommission.replicationReattemptInterval": "1s",
}


def tree_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def committed_bytes(local_dirs) -> int:
    """Bytes of the shuffle files in local_dirs, each relative path counted once: mounts of one
    store all show every node's committed files."""
    sizes = {}
    for local_dir in local_dirs:
        for path in shuffle_files(local_dir):
            sizes[os.path.relpath(path, local_dir)] = os.path.getsize(path)
    return sum(sizes.values())


def all_files(root) -> list[str]:
    return [os.path.join(d, name) for d, _, names in os.walk(root) for name in names]


def sigpwr(pids) -> None:
    """A graceful decommission (standalone): each executor migrates its blocks, then exits."""
    for pid in pids:
        decommission(pid)


def sigkill(pids) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def idle(pids) -> None:
    """Dynamic allocation releases idle executors by itself."""


def run_scenario(
    tmp_path: Path,
    worker_local_dirs: list[str],
    conf: dict,
    take_away=sigpwr,
    *,
    fallback_dir: str | None = None,
    worker_env: list[dict] | None = None,
    driver_args: list[str] = (),
    driver_wrapper: list[str] = (),
    **nodes,
) -> tuple[dict, list[dict], dict]:
    """Job 0 shuffles; every executor of the app is taken away (`take_away(pids)`) and exits;
    job 1 reuses the shuffle. Returns the driver's result, the jobs read from the event log,
    and what was measured while the executors left. `nodes`: StandaloneCluster's node_path
    and node_mounts; `fallback_dir` is where this process sees the fallback path."""
    events = tmp_path / "events"
    events.mkdir()
    conf = {
        **conf,
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": f"file://{events}",
        # the JSON lines are read back by EventLog
        "spark.eventLog.compress": "false",
    }
    measured: dict = {}

    t0 = time.monotonic()
    with StandaloneCluster(tmp_path / "cluster", worker_local_dirs, worker_env=worker_env, **nodes) as cluster:
        measured["cluster_start_s"] = round(time.monotonic() - t0, 1)

        def take_every_executor_away() -> None:
            app_id = cluster.master_state()["activeapps"][0]["id"]
            pids = cluster.executor_pids(app_id)
            assert pids, f"no executor of {app_id} found\n{cluster.executor_logs(app_id)}"
            measured["committed_shuffle_bytes"] = committed_bytes(
                [cluster.host_path(i, d) for i, d in enumerate(worker_local_dirs)]
            )
            # every executor: which of them hold map outputs depends on scheduling
            take_away(pids.values())
            try:
                measured["executors_gone_s"] = round(wait_exited(pids.values()), 1)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{cluster.executor_logs(app_id)}") from None
            measured["executors_taken_away"] = sorted(pids)
            if fallback_dir:
                # data and index copies; Hadoop's .crc side files are not shuffle files
                copies = shuffle_files(fallback_dir)
                measured["fallback_shuffle_bytes"] = tree_bytes(copies)
                measured["fallback_other_files"] = len(all_files(fallback_dir)) - len(copies)

        try:
            run = run_spark(
                tmp_path / "driver",
                tmp_path / "result.json",
                master=cluster.master_url,
                script=RECOVERY_JOB,
                pause_callback=take_every_executor_away,
                wrapper=driver_wrapper,
                timeout=180,
                extra_args=[*driver_args, *(f"--conf={k}={v}" for k, v in conf.items())],
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{cluster.executor_logs()}") from None
        t_stop = time.monotonic()
    measured["cluster_stop_s"] = round(time.monotonic() - t_stop, 1)
    result = run.result
    measured["driver_s"] = round(run.wall_s, 1)
    event_log = EventLog.of_app(events, result["app_id"])
    measured["executors_removed"] = event_log.executors_removed()
    return result, event_log.jobs(), measured


def describe(jobs: list[dict]) -> str:
    return "; ".join(
        f"job {j['job']}: {j['map_tasks']} map tasks, {j['result_tasks']} result tasks, "
        f"skipped stages {j['skipped_stages']}"
        for j in jobs
    )


def store_counters(mount: Mount) -> dict:
    answer = run_cli("stats", mount.path, "--sync")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["store"]


def test_decommission_on_plain_dirs_recomputes(tmp_path):
    """Control: without a fallback path, a decommissioned executor's map outputs are lost."""
    t0 = time.monotonic()
    local_dirs = [str(tmp_path / f"node{i}" / "local") for i in range(WORKERS)]
    result, jobs, measured = run_scenario(tmp_path, local_dirs, DECOMMISSION)
    print(f"\nplain dirs, no fallback: {describe(jobs)}; {measured}; test {time.monotonic() - t0:.1f}s")
    assert result["job0"] == EXPECTED_COUNTS
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == MAP_TASKS
    assert jobs[1]["map_tasks"] > 0, f"the map stage was not recomputed: {describe(jobs)}"


def leave_onto_mounts(
    tmp_path: Path, store_url: str, conf: dict, take_away, env: dict | None = None, clean_up: bool = False
) -> str:
    """Two mounts of one store, two "nodes": each worker runs in a mount namespace where its own
    mount is at the same path (as on separate machines), with its local dir and the fallback
    path on it. With `clean_up`, the driver runs on node 0 too, and removes the application's
    fallback copies when it ends (Spark's fallbackStorage.cleanUp). Returns the line of
    measurements."""
    node_path = str(tmp_path / "node")
    os.mkdir(node_path)
    with contextlib.ExitStack() as stack:
        mounts = [
            stack.enter_context(Mount(store_url, tmp_path / f"mnt{i}", tmp_path / f"cache{i}", env=env))
            for i in range(WORKERS)
        ]
        conf = {
            **conf,
            # trailing "/": Spark appends "{appId}/..." to the path as it is
            "spark.storage.decommission.fallbackStorage.path": f"file://{node_path}/fallback/",
            # both "nodes" are 127.0.0.1: Spark would read the other's files by path
            "spark.shuffle.readHostLocalDisk": "false",
            "spark.storage.decommission.fallbackStorage.cleanUp": str(clean_up).lower(),
        }
        fallback_dir = os.path.join(mounts[0].path, "fallback")
        result, jobs, measured = run_scenario(
            tmp_path,
            [os.path.join(node_path, "local")] * WORKERS,
            conf,
            take_away,
            fallback_dir=fallback_dir,
            node_path=node_path,
            node_mounts=[m.path for m in mounts],
            driver_wrapper=in_node_namespace(mounts[0].path, node_path) if clean_up else [],
        )
        counters = [store_counters(m) for m in mounts]
        time.sleep(1.1)  # the next listing of fallback/ asks the store again (remote_ttl)
        fallback_left = os.listdir(fallback_dir)
        # what node 1 copied there itself, and Hadoop's .crc files beside its copies
        left_on_node1 = all_files(os.path.join(mounts[1].path, "fallback"))
    put_bytes = [c.get("put_bytes", 0) for c in counters]
    copies = [c.get("copy_requests", 0) for c in counters]
    read_back = [c.get("get_range_bytes", 0) for c in counters]
    line = (
        f"{describe(jobs)}; store put_bytes per mount {put_bytes} (sum {sum(put_bytes)}) for "
        f"{measured['committed_shuffle_bytes']} committed shuffle bytes, copies per mount {copies}, "
        f"bytes read from the store per mount {read_back}, fallback/ at the end {fallback_left}, "
        f"files left on node 1 {left_on_node1}; {measured}"
    )
    assert result["job0"] == EXPECTED_COUNTS
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == MAP_TASKS, line
    assert jobs[1]["map_tasks"] == 0, f"map tasks re-ran: {line}"
    assert jobs[1]["skipped_stages"], line
    # every map output (data, index, checksum) went to the store once; its fallback copies
    # (data and index) were copies in the store, not uploads
    assert sum(put_bytes) == measured["committed_shuffle_bytes"], line
    assert measured["fallback_shuffle_bytes"] > 0 and sum(copies) > 0, line
    # job 1's reducers read the copies the other node made from the store
    assert sum(read_back) > 0, line
    if clean_up:
        assert result["app_id"] not in fallback_left, line
        assert left_on_node1 == [], line
    return line


def test_decommission_onto_file_mounts_skips_the_map_stage(tmp_path):
    t0 = time.monotonic()
    store = tmp_path / "store"
    store.mkdir()
    line = leave_onto_mounts(tmp_path, f"file://{store}", DECOMMISSION, sigpwr)
    print(f"\nshufflefs file://, decommission: {line}; test {time.monotonic() - t0:.1f}s")


def test_decommission_onto_s3_mounts_skips_the_map_stage(tmp_path, s3_env, bucket):
    t0 = time.monotonic()
    line = leave_onto_mounts(tmp_path, f"s3://{bucket}/shuffle", DECOMMISSION, sigpwr, s3_env, clean_up=True)
    print(f"\nshufflefs s3://, decommission: {line}; test {time.monotonic() - t0:.1f}s")


# Idle executors are released (decommissioned, their outputs migrated) instead of being kept
# for as long as their shuffles live.
DYNAMIC_ALLOCATION = {
    **DECOMMISSION,
    "spark.dynamicAllocation.enabled": "true",
    "spark.dynamicAllocation.shuffleTracking.enabled": "false",
    "spark.dynamicAllocation.minExecutors": "0",
    "spark.dynamicAllocation.executorIdleTimeout": "3s",
}


def test_dynamic_allocation_on_plain_dirs_recomputes(tmp_path):
    t0 = time.monotonic()
    local_dirs = [str(tmp_path / f"node{i}" / "local") for i in range(WORKERS)]
    result, jobs, measured = run_scenario(tmp_path, local_dirs, DYNAMIC_ALLOCATION, idle)
    print(f"\nplain dirs, dynamic allocation: {describe(jobs)}; {measured}; test {time.monotonic() - t0:.1f}s")
    assert result["job1"] == result["job0"] == EXPECTED_COUNTS
    assert jobs[1]["map_tasks"] > 0, f"the map stage was not recomputed: {describe(jobs)}"


def test_dynamic_allocation_onto_s3_mounts_skips_the_map_stage(tmp_path, s3_env, bucket):
    t0 = time.monotonic()
    line = leave_onto_mounts(tmp_path, f"s3://{bucket}/shuffle", DYNAMIC_ALLOCATION, idle, s3_env)
    print(f"\nshufflefs s3://, dynamic allocation: {line}; test {time.monotonic() - t0:.1f}s")


def external_shuffle_service(port: int) -> tuple[dict, list[dict]]:
    """(the application's settings, the worker's environment) for the worker's shuffle service."""
    settings = {"spark.shuffle.service.enabled": "true", "spark.shuffle.service.port": str(port)}
    worker_opts = " ".join(f"-D{k}={v}" for k, v in settings.items())
    return settings, [{"SPARK_WORKER_OPTS": worker_opts}]


def test_killed_executor_on_plain_dirs_recomputes(tmp_path):
    """Control: without the external shuffle service, a killed executor's map outputs are lost."""
    t0 = time.monotonic()
    result, jobs, measured = run_scenario(tmp_path, [str(tmp_path / "local")], {}, sigkill)
    print(f"\nplain dir, no shuffle service, kill -9: {describe(jobs)}; {measured}; test {time.monotonic() - t0:.1f}s")
    assert result["job1"] == result["job0"] == EXPECTED_COUNTS
    assert jobs[1]["map_tasks"] > 0, f"the map stage was not recomputed: {describe(jobs)}"


def test_external_shuffle_service_on_an_s3_mount(tmp_path, s3_env, bucket):
    """One worker (one shuffle service port per host) whose local dir is a mount: after kill -9
    of the executor, its shuffle service serves the map outputs to the next executor, and
    removes them from the store when Spark removes the shuffle."""
    t0 = time.monotonic()
    with Mount(f"s3://{bucket}/shuffle", tmp_path / "mnt", tmp_path / "cache", env=s3_env) as mount:
        local_dir = os.path.join(mount.path, "local")
        conf, worker_env = external_shuffle_service(free_port())
        result, jobs, measured = run_scenario(
            tmp_path,
            [local_dir],
            conf,
            sigkill,
            worker_env=worker_env,
            driver_args=["--remove-shuffle-from", local_dir],
        )
        counters = store_counters(mount)
    with Mount(f"s3://{bucket}/shuffle", tmp_path / "mnt2", tmp_path / "cache2", env=s3_env) as fresh:
        stored = shuffle_files(fresh.path)
    line = (
        f"{describe(jobs)}; left after removal {result['left_after_removal']}; stored at the end "
        f"{stored}; store {counters}; {measured}"
    )
    print(f"\nshufflefs s3://, shuffle service, kill -9: {line}; test {time.monotonic() - t0:.1f}s")
    assert result["job1"] == result["job0"] == EXPECTED_COUNTS
    assert jobs[1]["map_tasks"] == 0, f"map tasks re-ran: {line}"
    assert result["left_after_removal"] == [], line
    assert counters["put_bytes"] == measured["committed_shuffle_bytes"], line
    assert stored == [], line
