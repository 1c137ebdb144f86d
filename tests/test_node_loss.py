"""Issue 14, on a real Spark standalone cluster: a node is lost (its Worker, its executors and
its shufflefs daemon killed with SIGKILL) after job 0, a new node joins, and job 1 reuses job
0's shuffle. Spark's recovery plugin (KubernetesLocalDiskShuffleDataIO, which runs in
standalone mode too) is on. Nodes are Workers on distinct loopback addresses, which Spark
takes for distinct hosts, each with its own mount of one S3 store.

On plain directories the lost node's map outputs are recomputed (the control). On shufflefs
they are all in the store, and the replacement's plugin adopts them through the views and the
registry of docs/RECOVERY.md: the dead executor's only, of its own application only. Without
a warm-up shuffle the replacement's first map task is itself the recompute: measured, printed.

An executor that crashes on a live node is recovered too: the last test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shufflefs.testing.mounting import Mount
from shufflefs.testing.recovery_job import KEYS, MAP_TASKS, RECORDS, shuffle_files
from shufflefs.testing.sparkrun import RECOVERY_JOB, java_home, run_spark_job
from shufflefs.testing.standalone import EventLog, StandaloneCluster, wait_exited

pytestmark = [pytest.mark.spark, pytest.mark.skipif(java_home() is None, reason="no java on PATH")]

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
#: --executor-lease of the mounts: a lost node's outputs are adoptable this long after its death
LEASE = 3.0  # node 0, node 1 (lost), node 2 (joins)
RECOVERY_PLUGIN = {
    "spark.shuffle.sort.io.plugin.class": "org.apache.spark.shuffle.KubernetesLocalDiskShuffleDataIO",
    # read raw, with default false: recovery is skipped unless set explicitly
    "spark.kubernetes.driver.reusePersistentVolumeClaim": "true",
}


def node_mounts(stack: contextlib.ExitStack, tmp_path: Path, bucket: str, s3_env: dict):
    """mount(i): node i's mount of the test's S3 store (lease LEASE), unmounted by `stack`."""

    def mount(i: int) -> Mount:
        return stack.enter_context(
            Mount(
                f"s3://{bucket}/shuffle",
                tmp_path / f"mnt{i}",
                tmp_path / f"cache{i}",
                "--executor-lease",
                str(LEASE),
                env=s3_env,
            )
        )

    return mount


def expected_counts(records: int = RECORDS) -> list[list[int]]:
    return [[key, records // KEYS] for key in range(KEYS)]


def job0_outputs(local_dir: str, applications: int = 1, timeout: float = 20.0) -> dict[str, dict[str, str]]:
    """shuffle_files() once every map task's data, index and checksum files are listed below
    local_dir: another mount's files show up in a listing made after they landed in the store,
    and a mount lists a directory again at most once per listing TTL (1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        found = shuffle_files(local_dir)
        names = [name for files in found.values() for name in files]
        kinds = [
            sum(1 for name in names if name.endswith(suffix) or f"{suffix}." in name)
            for suffix in (".data", ".index", ".checksum")
        ]
        if kinds == [MAP_TASKS * applications] * 3 or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def run_node_loss(
    tmp_path: Path,
    local_dirs: list[str],
    *,
    warm_up: bool,
    lose_node=lambda: None,
    add_node=lambda: None,
    shared_store: bool = True,
    applications: tuple[int, ...] = (RECORDS,),
) -> list[tuple[dict, list[dict], dict]]:
    """Nodes 0 and 1 run job 0 of each application (one per entry of `applications`: the
    records it counts), at once; once all of them are done, node 1 is lost (its Worker and
    executors killed, then `lose_node()`), `add_node()`, then node 2 joins; job 1. Returns per
    application the driver's result (with the shuffle's files after job 1, as node 0 lists
    them), the jobs from the event log, and what was measured (with the files after job 0)."""
    events = tmp_path / "events"
    events.mkdir()
    conf = {
        **RECOVERY_PLUGIN,
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": f"file://{events}",
        "spark.eventLog.compress": "false",
    }
    if len(applications) > 1:  # each application gets one executor on every node
        conf.update({"spark.cores.max": "2", "spark.executor.cores": "1", "spark.executor.memory": "512m"})
    shared: dict = {}
    lost: dict[str, list[str]] = {}
    with StandaloneCluster(
        tmp_path / "cluster",
        local_dirs[:2],
        worker_hosts=HOSTS[:2],
        worker_cores=len(applications),
        worker_memory=f"{len(applications)}G",
    ) as cluster:

        def lose_a_node_and_add_one() -> None:
            app_ids = [app["id"] for app in cluster.master_state()["activeapps"]]
            before = {app_id: cluster.executor_pids(app_id) for app_id in app_ids}
            # a plain local dir holds its node's files only
            shared["files_job0"] = (
                job0_outputs(local_dirs[0], len(applications)) if shared_store else shuffle_files(local_dirs[0])
            )
            t0 = time.monotonic()
            cluster.kill_worker(1)
            lose_node()
            lost.update(
                {app_id: sorted(set(pids) - set(cluster.executor_pids(app_id))) for app_id, pids in before.items()}
            )
            add_node()
            cluster.add_worker(local_dirs[2], HOSTS[2])
            shared["node_replaced_s"] = round(time.monotonic() - t0, 1)

        # the node is lost once every application has run its job 0
        all_paused = threading.Barrier(len(applications), action=lose_a_node_and_add_one, timeout=300)

        def run(i: int, records: int) -> dict:
            try:
                return run_spark_job(
                    tmp_path / f"driver{i}",
                    tmp_path / f"result{i}.json",
                    master=cluster.master_url,
                    script=RECOVERY_JOB,
                    pause_callback=all_paused.wait,
                    timeout=240,
                    extra_args=[
                        "--executors",
                        "2",
                        *(["--warm-up"] if warm_up else []),
                        "--files-under",
                        local_dirs[0],
                        "--records",
                        str(records),
                        *(f"--conf={k}={v}" for k, v in conf.items()),
                    ],
                )
            except BaseException:
                all_paused.abort()  # no application waits for one that failed
                raise

        with ThreadPoolExecutor(len(applications)) as pool:
            results = [
                future.result() for future in [pool.submit(run, i, records) for i, records in enumerate(applications)]
            ]
    runs = []
    for result in results:
        log = EventLog.of_app(events, result["app_id"])
        jobs = log.jobs()
        by_executor = log.map_tasks_by_executor(0)
        measured = {**shared, "lost_executors": lost[result["app_id"]]}
        measured["lost_map_outputs"] = sum(by_executor.get(e, 0) for e in measured["lost_executors"])
        measured["job0_map_tasks_by_executor"] = by_executor
        measured["rerun_map_tasks"] = jobs[-1]["map_tasks"]
        runs.append((result, jobs, measured))
    return runs


def assert_only_the_dead_executors_outputs_moved(before: dict, after: dict) -> str:
    """Of the two block manager directories of job 0, the live executor's is as it was; the
    dead one's data and index files (not its checksum files: hidden from the adopter) are in
    one new directory, the replacement's, with the same bytes. Returns the dead one's name."""
    assert len(before) == 2, before.keys()
    untouched = [d for d, files in before.items() if after.get(d) == files]
    assert len(untouched) == 1, "the live executor's files stay where they are, and only its"
    (dead_dir,) = set(before) - set(untouched)
    outputs = {name: digest for name, digest in before[dead_dir].items() if ".checksum." not in name}
    assert outputs and not set(outputs) & set(after.get(dead_dir, {})), "the dead executor's outputs were adopted"
    new_dirs = set(after) - set(before)
    assert len(new_dirs) == 1, (before, after)
    assert {n: d for n, d in after[new_dirs.pop()].items() if n in outputs} == outputs
    return dead_dir


def assert_nothing_left_of(client, bucket: str, directory: str, timeout: float = 10.0) -> None:
    """Once its outputs were adopted, nothing of a dead executor's directory stays in the store:
    its checksum files go with the adoption (docs/RECOVERY.md, "Leftovers"). The removals are
    queued on the adopter's mount: they land soon after."""
    deadline = time.monotonic() + timeout
    while left := [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
        if f"/{directory}/" in o["Key"]
    ]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def describe(jobs: list[dict]) -> str:
    return "; ".join(f"job {j['job']}: {j['map_tasks']} map tasks, skipped stages {j['skipped_stages']}" for j in jobs)


def test_node_loss_on_plain_dirs_recomputes(tmp_path):
    """Control: the lost node's map outputs went with its disk."""
    t0 = time.monotonic()
    local_dirs = [str(tmp_path / f"node{i}" / "local") for i in range(3)]
    ((result, jobs, measured),) = run_node_loss(tmp_path, local_dirs, warm_up=True, shared_store=False)
    print(
        f"\nplain dirs, node lost, warm-up: {describe(jobs)}; "
        f"{ {k: v for k, v in measured.items() if k != 'files_job0'} }; test {time.monotonic() - t0:.1f}s"
    )
    assert result["job0"] == result["job1"] == expected_counts()
    assert jobs[0]["map_tasks"] == MAP_TASKS
    assert measured["lost_map_outputs"] > 0, measured
    assert measured["rerun_map_tasks"] == measured["lost_map_outputs"], measured


@pytest.mark.parametrize(
    "warm_up,daemon_lost",
    [(True, True), (False, True), (True, False)],
    ids=["warm-up", "no-warm-up", "warm-up-daemon-lives"],
)
def test_node_loss_on_s3_mounts(tmp_path, s3_env, bucket, seaweed, warm_up, daemon_lost):
    """A lost node's map outputs are all in the store. With a warm-up shuffle on the new node,
    its executor runs Spark's recovery plugin before job 1, adopts them once the lost node's
    lease ran out, and job 1 skips its map stage; the live node's are never moved. Without a
    warm-up, job 1's first map task is itself the recompute: measured (docs/RECOVERY.md).
    When the node's shufflefs daemon lives on (only its Spark pods were lost: its lease stays
    fresh), it tells the store that its executor died, and the outputs are adopted all the same."""
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        mount = node_mounts(stack, tmp_path, bucket, s3_env)
        mounts = [mount(0), mount(1)]
        local_dirs = [os.path.join(tmp_path / f"mnt{i}", "local") for i in range(3)]
        ((result, jobs, measured),) = run_node_loss(
            tmp_path,
            local_dirs,
            warm_up=warm_up,
            lose_node=mounts[1].kill if daemon_lost else lambda: None,
            add_node=lambda: mount(2),
        )
    print(
        f"\nshufflefs s3://, node lost{'' if daemon_lost else ' (its daemon lives)'}, "
        f"{'warm-up' if warm_up else 'no warm-up'}: {describe(jobs)}; "
        f"{ {k: v for k, v in measured.items() if k != 'files_job0'} }; test {time.monotonic() - t0:.1f}s"
    )
    assert result["job0"] == result["job1"] == expected_counts()
    if warm_up:
        assert measured["rerun_map_tasks"] == 0, "job 1 skipped the map stage"
        dead_dir = assert_only_the_dead_executors_outputs_moved(measured["files_job0"], result["files_after_job1"])
        assert_nothing_left_of(seaweed.client(), bucket, dead_dir)


def registered_owners(client, bucket: str, prefix: str) -> dict[str, str]:
    """{block manager directory name: application} as the registry in the store has them."""
    start = f"{prefix}/.shufflefs/dirs/"
    owners = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            app_id, name = item["Key"][len(start) :].split("/")
            owners[name] = app_id
    return owners


def test_two_applications_on_a_lost_node_each_adopt_their_own_outputs_only(tmp_path, s3_env, bucket, seaweed):
    """Two applications run at once on the same two nodes (one executor each on each node),
    counting different records: their map outputs have the same names and other bytes. Node 1
    is lost; on node 2 each application's replacement adopts its own dead executor's outputs,
    never the other application's, nor a live executor's; both skip their map stage and both
    answers are right (an output adopted by the wrong application would make one wrong)."""
    applications = (RECORDS, 2 * RECORDS)
    with contextlib.ExitStack() as stack:
        mount = node_mounts(stack, tmp_path, bucket, s3_env)
        mounts = [mount(0), mount(1)]
        local_dirs = [os.path.join(tmp_path / f"mnt{i}", "local") for i in range(3)]
        runs = run_node_loss(
            tmp_path,
            local_dirs,
            warm_up=True,
            lose_node=mounts[1].kill,
            add_node=lambda: mount(2),
            applications=applications,
        )
    owners = registered_owners(seaweed.client(), bucket, "shuffle")
    files_job0 = runs[0][2]["files_job0"]
    assert len(files_job0) == 4 and set(files_job0) <= set(owners), (files_job0.keys(), owners)
    for (result, jobs, measured), records in zip(runs, applications):
        print(
            f"\n{result['app_id']} ({records} records): {describe(jobs)}; lost executors {measured['lost_executors']}"
        )
        assert result["job0"] == result["job1"] == expected_counts(records)
        assert measured["lost_map_outputs"] > 0 and measured["rerun_map_tasks"] == 0, "job 1 skipped the map stage"

        def its_own(files: dict, app_id: str = result["app_id"]) -> dict:
            return {d: names for d, names in files.items() if owners.get(d) == app_id}

        dead_dir = assert_only_the_dead_executors_outputs_moved(
            its_own(files_job0), its_own(result["files_after_job1"])
        )
        assert_nothing_left_of(seaweed.client(), bucket, dead_dir)


# ---------------------------------------------------------------------------------- a crash


def test_an_executor_crash_beside_a_live_executor_is_recovered_from_the_dead_one_only(tmp_path, s3_env, bucket):
    """Two executors share one node's mount (a DaemonSet: two executor pods on one node); after
    job 0 one of them is killed with SIGKILL, and its Worker starts a replacement on the same
    mount. Spark's recovery plugin in the replacement adopts the dead executor's map outputs
    and not one file of the live executor's (the views of docs/RECOVERY.md); job 1 skips its
    map stage. Without the views the plugin took every executor's files it found."""
    events = tmp_path / "events"
    events.mkdir()
    conf = {
        **RECOVERY_PLUGIN,
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": f"file://{events}",
        "spark.eventLog.compress": "false",
    }
    seen: dict = {}
    with Mount(f"s3://{bucket}/shuffle", tmp_path / "mnt", tmp_path / "cache", env=s3_env) as mount:
        local_dir = os.path.join(mount.path, "local")
        with StandaloneCluster(tmp_path / "cluster", [local_dir, local_dir], worker_hosts=HOSTS[:2]) as cluster:

            def kill_one_executor() -> None:
                seen["job0"] = job0_outputs(local_dir)
                app_id = cluster.master_state()["activeapps"][0]["id"]
                ((seen["killed"], pid),) = cluster.executor_pids(app_id, worker=1).items()
                os.kill(pid, signal.SIGKILL)
                wait_exited([pid])

            result = run_spark_job(
                tmp_path / "driver",
                tmp_path / "result.json",
                master=cluster.master_url,
                script=RECOVERY_JOB,
                pause_callback=kill_one_executor,
                timeout=240,
                extra_args=[
                    "--executors",
                    "2",
                    "--warm-up",
                    "--files-under",
                    local_dir,
                    *(f"--conf={k}={v}" for k, v in conf.items()),
                ],
            )
            after = result["files_after_job1"]
        adoptions = [line for line in mount.log().splitlines() if " adopts " in line]
    jobs = EventLog.of_app(events, result["app_id"]).jobs()
    print(f"\nexecutor crash beside a live one: {describe(jobs)}; adoptions: {adoptions}")
    assert result["job0"] == result["job1"] == expected_counts()
    dead_dir = assert_only_the_dead_executors_outputs_moved(seen["job0"], after)
    assert dead_dir not in after, "its checksum files went with the adoption, and its emptied directories"
    assert len(adoptions) == 1 and f"dead executor {seen['killed']}" in adoptions[0]
    assert jobs[-1]["map_tasks"] == 0, "job 1 skipped the map stage: nothing was recomputed"
