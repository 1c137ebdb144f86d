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
from recovery_job import KEYS, MAP_TASKS, RECORDS
from sparkrun import LAST_RUN, java_home, run_spark_job, shuffle_files
from standalone import EventLog, StandaloneCluster, decommission, wait_exited

pytestmark = [pytest.mark.spark, pytest.mark.skipif(java_home() is None, reason="no java on PATH")]

RECOVERY_JOB = Path(__file__).resolve().with_name("recovery_job.py")
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

    t0 = time.monotonic()
    with StandaloneCluster(tmp_path / "cluster", worker_local_dirs) as cluster:
        measured["cluster_start_s"] = round(time.monotonic() - t0, 1)

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
                # data and index copies; Hadoop's .crc side files are not shuffle files
                copies = shuffle_files(fallback_dir)
                measured["fallback_shuffle_bytes"] = tree_bytes(copies)
                measured["fallback_other_files"] = len(all_files(fallback_dir)) - len(copies)

        try:
            result = run_spark_job(tmp_path / "driver", tmp_path / "result.json", master=cluster.master_url,
                                   script=RECOVERY_JOB, pause_callback=decommission_every_executor,
                                   timeout=180,
                                   extra_args=[f"--conf={k}={v}" for k, v in conf.items()])
        except AssertionError as e:
            raise AssertionError(f"{e}\n{cluster.executor_logs()}") from None
        t_stop = time.monotonic()
    measured["cluster_stop_s"] = round(time.monotonic() - t_stop, 1)
    measured["driver_s"] = round(LAST_RUN["wall_s"], 1)
    event_log = EventLog.of_app(events, result["app_id"])
    measured["executors_removed"] = event_log.executors_removed()
    return result, event_log.jobs(), measured


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
    assert result["job0"] == EXPECTED_COUNTS
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == MAP_TASKS
    assert jobs[1]["map_tasks"] > 0, f"the map stage was not recomputed: {describe(jobs)}"


def decommission_onto_mounts(tmp_path: Path, store_url: str, env: dict | None = None) -> str:
    """Two mounts of one store (two "nodes"), each worker's local dir on its own mount, the
    fallback path on mount 0. Spark wants the fallback path the same on every node; two mounts
    on one machine are at different paths, but the workers share the machine, so both reach
    mount 0's path. Returns the line of measurements."""
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(Mount(store_url, tmp_path / f"mnt{i}", tmp_path / f"cache{i}", env=env))
                  for i in range(WORKERS)]
        fallback_dir = os.path.join(mounts[0].path, "fallback")
        # trailing "/": Spark appends "{appId}/..." to the path as it is
        conf = {**DECOMMISSION, "spark.storage.decommission.fallbackStorage.path": f"file://{fallback_dir}/"}
        result, jobs, measured = run_decommission_scenario(
            tmp_path, [os.path.join(m.path, "local") for m in mounts], conf, fallback_dir=fallback_dir)
        put_bytes = [store_counters(m).get("put_bytes", 0) for m in mounts]
    assert result["job0"] == EXPECTED_COUNTS
    assert result["job1"] == result["job0"]
    assert len(jobs) == 2 and jobs[0]["map_tasks"] == MAP_TASKS
    assert jobs[1]["map_tasks"] == 0, f"map tasks re-ran: {describe(jobs)}"
    assert jobs[1]["skipped_stages"], describe(jobs)
    # Not asserted yet (issue 13, next step): the fallback copies are uploaded a second time.
    return (f"{describe(jobs)}; store put_bytes per mount {put_bytes} (sum {sum(put_bytes)}) for "
            f"{measured['committed_shuffle_bytes']} committed shuffle bytes; {measured}")


def test_decommission_onto_file_mounts_skips_the_map_stage(tmp_path):
    t0 = time.monotonic()
    store = tmp_path / "store"
    store.mkdir()
    line = decommission_onto_mounts(tmp_path, f"file://{store}")
    print(f"\nshufflefs file://, fallback on mount 0: {line}; test {time.monotonic() - t0:.1f}s")


def test_decommission_onto_s3_mounts_skips_the_map_stage(tmp_path, s3_env, bucket):
    t0 = time.monotonic()
    line = decommission_onto_mounts(tmp_path, f"s3://{bucket}/shuffle", s3_env)
    print(f"\nshufflefs s3://, fallback on mount 0: {line}; test {time.monotonic() - t0:.1f}s")
