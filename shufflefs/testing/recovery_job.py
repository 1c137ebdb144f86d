#!/usr/bin/env python3
"""PySpark driver of the recovery scenarios (tests/test_recovery.py): one shuffle, used twice.

    python shufflefs/testing/recovery_job.py --local-dir DIR --result FILE --master spark://... [--pause]
                                 [--conf KEY=VALUE ...] [--remove-shuffle-from DIR]

Job 0 collects an RDD shuffle (shuffle 0). With ``--pause`` the driver then prints ``SPARK_JOBS_DONE`` and
waits for a line on stdin (sparkrun's pause protocol, here *between* the jobs), so that the
test can take the executors away; it then waits until the driver has seen every executor of
job 0 leave, and job 1 collects the same shuffled RDD again. Whether job 1 re-ran the map
stage is in Spark's event log (spark.eventLog.* given with --conf).

The result FILE holds both jobs' answers, the application id and the executors before and after;
with ``--remove-shuffle-from DIR`` the driver then removes shuffle 0 and reports the files of
it left in DIR.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import time
from operator import add

from shufflefs.testing.spark_job import add_driver_arguments, drive, log
from shufflefs.testing.sparkrun import DONE_MARKER

RECORDS = 20_000
MAP_TASKS = 4
KEYS = 100
EXECUTORS_GONE_TIMEOUT = 60.0
#: how long each warm-up task takes: long enough that every executor gets one
WARM_UP_TASK_SECONDS = 0.5


def executor_ids(sc) -> set[str]:
    """Ids of the executors registered with the driver (SparkContext.getExecutorIds)."""
    listed = sc._jsc.sc().getExecutorIds().mkString(",")
    return set(filter(None, listed.split(",")))


def remove_shuffle(sc, shuffle_id: int, local_dir: str, timeout: float = 30.0) -> list[str]:
    """Have Spark remove a shuffle the way its ContextCleaner does once the RDD is garbage,
    and wait until its files are gone from local_dir (a dead executor's are removed by the
    external shuffle service). Returns the files left."""
    sc._jsc.sc().cleaner().get().doCleanupShuffle(shuffle_id, True)
    prefix = f"shuffle_{shuffle_id}_"
    deadline = time.monotonic() + timeout
    while True:
        left = [name for _, _, names in os.walk(local_dir) for name in names if name.startswith(prefix)]
        if not left or time.monotonic() > deadline:
            return sorted(left)
        time.sleep(0.5)


def shuffle_files(local_dir: str, shuffle_id: int = 0) -> dict[str, dict[str, str]]:
    """{blockmgr dir: {file name: sha256}} of a shuffle's files below local_dir (a standalone
    Worker's SPARK_LOCAL_DIRS), as this process may list them."""
    found: dict[str, dict[str, str]] = {}
    for path in glob.glob(os.path.join(local_dir, "spark-*", "*", "blockmgr-*", "*", f"shuffle_{shuffle_id}_*")):
        with open(path, "rb") as f:
            found.setdefault(path.split(os.sep)[-3], {})[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def wait_for(condition, what: str, timeout: float = EXECUTORS_GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {what} after {timeout:g}s")
        time.sleep(0.2)


def two_jobs_on_one_shuffle(
    spark,
    pause: bool,
    remove_from: str | None,
    executors: int | None,
    warm_up: bool,
    files_under: str | None,
    records: int = RECORDS,
) -> dict:
    sc = spark.sparkContext
    shuffled = sc.parallelize(range(records), MAP_TASKS).map(lambda x: (x % KEYS, 1)).reduceByKey(add)
    job0 = sorted(shuffled.collect())
    before = executor_ids(sc)
    log(f"job 0 done on executors {sorted(before)}")
    if pause:
        sys.stdout.write(DONE_MARKER + "\n")
        sys.stdout.flush()
        sys.stdin.readline()
        # The test saw the executor processes exit; job 1 must not start before the driver
        # has seen it too, or it would plan its fetches from executors that are gone.
        if executors is None:
            wait_for(lambda: not executor_ids(sc) & before, "every executor of job 0 gone")
        else:
            wait_for(lambda: before - executor_ids(sc), "an executor of job 0 gone")
            wait_for(lambda: len(executor_ids(sc)) >= executors, f"{executors} executors registered")
    if warm_up:
        # a shuffle of its own, so that every executor runs a map task (where Spark's recovery
        # plugin runs) before job 1 needs the lost outputs. Each task takes a moment: tasks
        # that take none all go to the executors that are warm already, and the replacement,
        # still starting its Python worker, gets none (seen on a loaded machine)
        width = 4 * len(executor_ids(sc))
        sc.parallelize(range(width), width).map(lambda x: (x, time.sleep(WARM_UP_TASK_SECONDS) or x)).reduceByKey(
            add
        ).count()
        log(f"warm-up done on executors {sorted(executor_ids(sc))}")
    t = time.monotonic()
    job1 = sorted(shuffled.collect())
    log(f"job 1 done in {time.monotonic() - t:.1f}s")
    result = {
        "app_id": sc.applicationId,
        "job0": job0,
        "job1": job1,
        "executors_job0": sorted(before),
        "executors_job1": sorted(executor_ids(sc)),
    }
    if files_under:
        result["files_after_job1"] = shuffle_files(files_under)
    if remove_from:
        result["left_after_removal"] = remove_shuffle(sc, 0, remove_from)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_arguments(ap)
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--remove-shuffle-from", metavar="DIR", help="after job 1, remove the shuffle and wait until its files left DIR"
    )
    ap.add_argument(
        "--executors",
        type=int,
        metavar="N",
        help="after the pause, wait until one executor of job 0 is gone and N are "
        "registered (default: wait until every executor of job 0 is gone)",
    )
    ap.add_argument("--warm-up", action="store_true", help="run a small shuffle job before job 1")
    ap.add_argument(
        "--files-under",
        metavar="DIR",
        help="after job 1, report the shuffle's files below DIR (a Worker's local dir), "
        "before the Worker removes them with the application",
    )
    ap.add_argument(
        "--records",
        type=int,
        default=RECORDS,
        metavar="N",
        help=f"records to count by key (default {RECORDS}): applications that differ in it "
        "write map outputs of the same names and other bytes",
    )
    args = ap.parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.conf)
    # Each standalone worker gives its executors its own SPARK_LOCAL_DIRS (through
    # SPARK_EXECUTOR_DIRS); the driver's local dir must not replace them.
    conf.setdefault("spark.executorEnv.SPARK_LOCAL_DIRS", None)
    # the driver pauses between its jobs itself, not after them
    return drive(
        lambda spark: two_jobs_on_one_shuffle(
            spark, args.pause, args.remove_shuffle_from, args.executors, args.warm_up, args.files_under, args.records
        ),
        args.local_dir,
        args.result,
        args.master,
        False,
        app_name="shufflefs-recovery",
        conf=conf,
    )


if __name__ == "__main__":
    sys.exit(main())
