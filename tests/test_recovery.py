"""Issue 13 on a real Spark standalone cluster (tests/standalone.py): executors leave, map
outputs stay. Each scenario runs on shufflefs mounts and, as the control, on plain
directories, where Spark must show the recompute that shufflefs removes.

What each run measured (map tasks per job, store PUT bytes, committed shuffle bytes) is
printed; only what holds today is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from mounting import Mount, run_cli
from sparkrun import LAST_RUN, java_home, run_spark_job, shuffle_files
from standalone import EventLog, StandaloneCluster, decommission, wait_exited

pytestmark = [pytest.mark.spark, pytest.mark.skipif(java_home() is None, reason="no java on PATH")]

RECOVERY_JOB = Path(__file__).resolve().with_name("recovery_job.py")
WORKERS = 2

# Graceful decommission with shuffle-block migration. maxDiskSize=0 makes every peer refuse
# the blocks, so a map output either goes to the fallback path or is lost.
DECOMMISSION = {
    "spark.decommission.enabled": "true",
    "spark.storage.decommission.enabled": "true",
    "spark.storage.decommission.shuffleBlocks.enabled": "true",
    "spark.storage.decommission.shuffleBlocks.maxDiskSize": "0",
}


def tree_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def all_files(root) -> list[str]:
    return [os.path.join(d, name) for d, _, names in os.walk(root) for name in names]


def run_decommission_scenario(tmp_path: Path, worker_local_dirs: list[str], conf: dict,
                              fallback_dir: str | None = None) -> tuple[dict, list[dict], dict]:
    """Job 0 shuffles; every executor of the app gets SIGPWR and exits; job 1 reuses the shuffle.
    Returns the driver's result, the jobs read from the event log, and what was measured
    while the executors left."""
    events = tmp_path / "events"
    events.mkdir()
    conf = {**conf, "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{events}",
            # the JSON lines are read back by EventLog
            "spark.eventLog.compress": "false"}
    measured: dict = {}

    with StandaloneCluster(tmp_path / "cluster", worker_local_dirs) as cluster:
        def decommission_every_executor() -> None:
            app_id = cluster.master_state()["activeapps"][0]["id"]
            pids = cluster.executor_pids(app_id)
            assert pids, f"no executor of {app_id} found\n{cluster.executor_logs(app_id)}"
            measured["committed_shuffle_bytes"] = tree_bytes(
                [f for d in worker_local_dirs for f in shuffle_files(d)])
            # every executor: which of them hold map outputs depends on scheduling
            for pid in pids.values():
                decommission(pid)
            try:
                measured["decommission_s"] = round(wait_exited(pids.values()), 1)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{cluster.executor_logs(app_id)}") from None
            measured["decommissioned_executors"] = sorted(pids)
            if fallback_dir:
                measured["fallback_bytes"] = tree_bytes(all_files(fallback_dir))
                measured["fallback_files"] = sorted(os.path.relpath(f, fallback_dir) for f in all_files(fallback_dir))

        try:
            result = run_spark_job(tmp_path / "driver", tmp_path / "result.json", master=cluster.master_url,
                                   script=RECOVERY_JOB, pause_callback=decommission_every_executor,
                                   timeout=180,
                                   extra_args=[f"--conf={k}={v}" for k, v in conf.items()])
        except AssertionError as e:
            apps = glob_apps(cluster)
            raise AssertionError(f"{e}\n" + "\n".join(cluster.executor_logs(a) for a in apps)) from None
    measured["driver_s"] = round(LAST_RUN["wall_s"], 1)
    jobs = EventLog.of_app(events, result["app_id"]).jobs()
    return result, jobs, measured


def glob_apps(cluster: StandaloneCluster) -> list[str]:
    return sorted({name for d in cluster.worker_dirs for name in os.listdir(d)})


def describe(jobs: list[dict]) -> str:
    return "; ".join(f"job {j['job']}: {j['map_tasks']} map tasks, {j['result_tasks']} result tasks, "
                     f"skipped stages {j['skipped_stages']}" for j in jobs)


def store_counters(mount: Mount) -> dict:
    answer = run_cli("stats", mount.path, "--sync")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["store"]


def test_decommission_on_plain_dirs_recomputes(tmp_path):
    """Control: without a fallback path, a decommissioned executor's map outputs are lost."""
    t0 = time.monotonic()
    local_dirs = [str(tmp_path / f"node{i}" / "local") for i in range(WORKERS)]
    result, jobs, measured = run_decommission_scenario(tmp_path, local_dirs, DECOMMISSION)
    print(f"\nplain dirs, no fallback: {describe(jobs)}; {measured}; test {time.monotonic() - t0:.1f}s")
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == 4
    assert jobs[1]["map_tasks"] > 0, f"the map stage was not recomputed: {describe(jobs)}"


def test_decommission_onto_file_mount_skips_the_map_stage(tmp_path):
    """Two mounts of one file:// store (two "nodes"), each worker's local dir on its own mount,
    the fallback path on mount 0 (one machine: both workers see it at the same path)."""
    t0 = time.monotonic()
    store = tmp_path / "store"
    store.mkdir()
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(Mount(f"file://{store}", tmp_path / f"mnt{i}", tmp_path / f"cache{i}"))
                  for i in range(WORKERS)]
        fallback_dir = os.path.join(mounts[0].path, "fallback")
        # trailing "/": Spark appends "{appId}/..." to the path as it is
        conf = {**DECOMMISSION, "spark.storage.decommission.fallbackStorage.path": f"file://{fallback_dir}/"}
        result, jobs, measured = run_decommission_scenario(
            tmp_path, [os.path.join(m.path, "local") for m in mounts], conf, fallback_dir=fallback_dir)
        put_bytes = [store_counters(m).get("put_bytes", 0) for m in mounts]
    print(f"\nshufflefs file://, fallback on mount 0: {describe(jobs)}; "
          f"store put_bytes per mount {put_bytes} (sum {sum(put_bytes)}); {measured}; "
          f"test {time.monotonic() - t0:.1f}s")
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == 4
    assert jobs[1]["map_tasks"] == 0, f"map tasks re-ran: {describe(jobs)}"
    assert jobs[1]["skipped_stages"], describe(jobs)
