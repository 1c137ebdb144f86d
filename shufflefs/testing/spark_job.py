#!/usr/bin/env python3
"""Deterministic PySpark workload whose local directory is DIR.

    python shufflefs/testing/spark_job.py --local-dir DIR --result FILE
                              [--master local-cluster[2,1,1024]] [--pause]

Runs several RDD and DataFrame shuffles (8 and 256 shuffle partitions) with
``spark.local.dir=DIR`` (driver and, in local / local-cluster mode, the
executors: DIR/spark-*/executor-*/blockmgr-*), reduces every job's result to a
small JSON-able summary and writes ``{job_name: summary}`` to FILE.  Two runs
give identical FILEs whatever the filesystem under DIR, as long as it is correct.

With ``--pause``, after all jobs ran and before ``spark.stop()`` (shuffle files
still exist under DIR) the script prints ``SPARK_JOBS_DONE`` on stdout and waits
for one line on stdin.

Exit status: 0 on success, 1 if Spark or a check failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback

# Sizes of the workload.  On a 2-core machine with a plain directory this writes
# ~90 MB of committed shuffle files (960 files in 16 shuffles) into DIR and
# takes about 55 s with local-cluster[2,1,1024] (35 s with local[2]).
N_RDD = 200_000  # records per RDD job
N_DF = 300_000  # rows of the main DataFrame
N_RIGHT = 60_000  # rows of the DataFrame joined to it
N_KEYS = 5_000  # distinct keys of the aggregations
MAP_SLICES = 4  # input partitions = map tasks per shuffle (bigger side)
PARTITION_COUNTS = (8, 256)
# JVM sorters (ExternalSorter, ShuffleExternalSorter, UnsafeExternalSorter)
# spill after this many records, so map tasks with > 256 partitions and the
# bigger reduce-side sorts write spill files and merge them.
FORCE_SPILL_RECORDS = 32_768

# Three short-lived JVMs share two cores: most of their CPU time went to the
# C2 JIT and parallel GC threads.  C1 only + serial GC cut the run time a lot
# and change nothing in what Spark does in DIR.
JVM_OPTS = os.environ.get("SPARK_JOB_JAVA_OPTS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

# Every RDD / DataFrame whose shuffle ran is kept referenced until the end, so
# that Spark's ContextCleaner does not delete shuffle files depending on when
# the JVMs happen to collect garbage: at --pause, all shuffles' files exist.
KEEP_ALIVE: list = []

MASK64 = (1 << 64) - 1
POLY_MOD = (1 << 61) - 1  # Mersenne prime for an order-sensitive, combinable hash
POLY_BASE = 1_000_003


def log(msg: str) -> None:
    print(f"{os.path.basename(sys.argv[0]) or 'spark_job.py'}: {msg}", file=sys.stderr, flush=True)


_last_mark = [time.monotonic()]


def mark(name: str) -> None:
    now = time.monotonic()
    log(f"  {name}: {now - _last_mark[0]:.1f}s")
    _last_mark[0] = now


# --------------------------------------------------------------------------
# Helpers shipped to the executors (cloudpickle pickles them by value).
# --------------------------------------------------------------------------


def mix64(x: int) -> int:
    """splitmix64 finaliser: deterministic pseudo-random 64-bit value of x."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def payload(i: int, n: int) -> str:
    """n hex characters derived from i (hex: lz4 barely compresses it)."""
    out = []
    x = i
    while len(out) * 16 < n:
        x = mix64(x)
        out.append(f"{x:016x}")
    return "".join(out)[:n]


def row_hash(row) -> int:
    return int.from_bytes(hashlib.blake2b(repr(row).encode(), digest_size=8).digest(), "big")


def partition_summary(index, rows):
    """(index, count, first, last, sorted_ok, polyhash) of one sorted partition
    of (key, row) pairs; polyhash = sum(row_hash(row_j) * BASE**j) mod POLY_MOD."""
    count = 0
    first = last = None
    sorted_ok = True
    h = 0
    weight = 1
    prev_key = None
    for key, row in rows:
        if prev_key is not None and key < prev_key:
            sorted_ok = False
        prev_key = key
        if first is None:
            first = row
        last = row
        h = (h + row_hash(row) * weight) % POLY_MOD
        weight = (weight * POLY_BASE) % POLY_MOD
        count += 1
    yield (index, count, first, last, sorted_ok, h)


def combine_sorted(parts) -> dict:
    """Combine partition_summary() results into the summary of the whole
    sorted sequence; independent of how the sequence was partitioned."""
    parts = sorted(parts, key=lambda p: p[0])
    total = 0
    h = 0
    first = last = None
    sorted_ok = True
    prev_last_key = None
    non_empty = 0
    for _idx, count, pfirst, plast, pok, ph in parts:
        sorted_ok = sorted_ok and pok
        if count == 0:
            continue
        non_empty += 1
        # rows start with their sort key: (key, i, ...) or (h, id, ...)
        if prev_last_key is not None and tuple(pfirst[:2]) < prev_last_key:
            sorted_ok = False
        prev_last_key = tuple(plast[:2])
        h = (h + ph * pow(POLY_BASE, total, POLY_MOD)) % POLY_MOD
        total += count
        if first is None:
            first = pfirst
        last = plast
    return {
        "count": total,
        "sorted": sorted_ok,
        "ordered_hash": f"{h:016x}",
        "first": _jsonable(first),
        "last": _jsonable(last),
        "partitions": len(parts),
        "non_empty_partitions": non_empty,
    }


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def summarize_collected(rows) -> dict:
    """Summary of a small, collected result (order of `rows` irrelevant)."""
    rows = sorted(_jsonable(list(r)) for r in rows)
    blob = json.dumps(rows, separators=(",", ":")).encode()
    numeric_sums = []
    if rows:
        for col in range(len(rows[0])):
            if all(isinstance(r[col], int) for r in rows):
                numeric_sums.append(sum(r[col] for r in rows))
            else:
                numeric_sums.append(None)
    return {
        "count": len(rows),
        "column_sums": numeric_sums,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "first": rows[0] if rows else None,
        "last": rows[-1] if rows else None,
    }


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------


def keep(x):
    KEEP_ALIVE.append(x)
    return x


def rdd_jobs(sc, nparts: int) -> dict:
    n_keys = N_KEYS
    base = sc.range(0, N_RDD, numSlices=MAP_SLICES).map(lambda i: (mix64(i) % n_keys, i))
    res = {}

    # reduceByKey: map-side combine, small shuffle.
    rdd = (
        base.mapValues(lambda v: (1, v, v % 977))
        .reduceByKey(lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), nparts)
        .map(lambda kv: (kv[0], kv[1][0], kv[1][1], kv[1][2]))
    )
    rows = keep(rdd).collect()
    res[f"rdd_reduceByKey_{nparts}"] = summarize_collected(rows)
    mark(f"rdd_reduceByKey_{nparts}")

    # groupByKey: every record crosses the shuffle, with a 24-char payload.
    rdd = (
        base.map(lambda kv: (kv[0], (kv[1], payload(kv[1], 24))))
        .groupByKey(nparts)
        .mapValues(
            lambda vs: (
                len(vs),
                sum(v[0] for v in vs),
                min(v[0] for v in vs),
                max(v[0] for v in vs),
                sum(row_hash(v) for v in vs) & MASK64,
            )
        )
        .map(lambda kv: (kv[0],) + tuple(kv[1]))
    )
    rows = keep(rdd).collect()
    res[f"rdd_groupByKey_{nparts}"] = summarize_collected(rows)
    mark(f"rdd_groupByKey_{nparts}")

    # sortByKey: total order over unique 64-bit keys with a 24-char payload.
    rdd = (
        sc.range(0, N_RDD, numSlices=MAP_SLICES)
        .map(lambda i: (mix64(i), (i, payload(i ^ 0x5A5A, 24))))
        .sortByKey(True, nparts)
        .map(lambda kv: (kv[0], (kv[0], kv[1][0], kv[1][1])))
        .mapPartitionsWithIndex(partition_summary)
    )
    parts = keep(rdd).collect()
    res[f"rdd_sortByKey_{nparts}"] = combine_sorted(parts)
    mark(f"rdd_sortByKey_{nparts}")
    return res


def df_jobs(spark, nparts: int) -> dict:
    from pyspark.sql import functions as F

    spark.conf.set("spark.sql.shuffle.partitions", str(nparts))
    res = {}
    mask31 = 0x7FFFFFFF
    df = spark.range(0, N_DF, numPartitions=MAP_SLICES).select(
        F.col("id"),
        F.xxhash64("id").bitwiseAND(mask31).alias("h"),
        F.substring(F.sha2(F.col("id").cast("string"), 256), 1, 48).alias("pay"),
    )

    # groupBy + agg (partial aggregation, small shuffle).
    agg_df = df.groupBy((F.col("h") % N_KEYS).alias("g")).agg(
        F.count(F.lit(1)).alias("n"),
        F.sum("id").alias("sum_id"),
        F.min("id").alias("min_id"),
        F.max("id").alias("max_id"),
        F.sum(F.xxhash64("pay").bitwiseAND(mask31)).alias("sum_pay_hash"),
    )
    rows = keep(agg_df).collect()
    res[f"df_groupBy_{nparts}"] = summarize_collected(rows)
    mark(f"df_groupBy_{nparts}")

    # Sort-merge join of two DataFrames (broadcast disabled in the conf).
    right = spark.range(0, N_RIGHT).select(
        F.col("id").alias("rk"),
        F.substring(F.sha2(F.col("id").cast("string"), 224), 1, 16).alias("rpay"),
    )
    left = df.select("id", "h", F.substring("pay", 1, 16).alias("pay"))
    joined = left.join(right, (left["h"] % (N_RIGHT + 10_000)) == right["rk"], "inner")
    cols = ["id", "h", "pay", "rk", "rpay"]
    row = F.struct(*cols)
    stats = keep(
        joined.agg(
            F.count(F.lit(1)).alias("n"),
            F.sum("id").alias("sum_id"),
            F.sum("rk").alias("sum_rk"),
            F.sum(F.xxhash64(*cols).bitwiseAND(mask31)).alias("sum_row_hash"),
            F.min(row).alias("first"),  # id is unique in the join output
            F.max(row).alias("last"),
        )
    ).collect()[0]
    res[f"df_join_{nparts}"] = {
        "count": stats["n"],
        "sum_id": stats["sum_id"],
        "sum_rk": stats["sum_rk"],
        "sum_row_hash": stats["sum_row_hash"],
        "first": _jsonable(list(stats["first"])) if stats["first"] else None,
        "last": _jsonable(list(stats["last"])) if stats["last"] else None,
    }
    mark(f"df_join_{nparts}")

    # orderBy: range-partitioned total sort carrying the 48-char payload
    # (the biggest shuffle), checked and hashed in partition order.
    rdd = (
        df.orderBy("h", "id")
        .rdd.map(lambda r: ((r[1], r[0]), (r[1], r[0], r[2])))
        .mapPartitionsWithIndex(partition_summary)
    )
    parts = keep(rdd).collect()
    res[f"df_orderBy_{nparts}"] = combine_sorted(parts)
    mark(f"df_orderBy_{nparts}")
    return res


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _ensure_java_home(env) -> None:
    if env.get("JAVA_HOME"):
        return
    java = shutil.which("java", path=env.get("PATH")) or "/usr/bin/java"
    real = os.path.realpath(java)
    if os.path.basename(os.path.dirname(real)) == "bin":
        env["JAVA_HOME"] = os.path.dirname(os.path.dirname(real))


def build_session(local_dir: str, master: str, *, app_name: str = "shufflefs-spark-job", conf: dict | None = None):
    """A SparkSession whose local dirs (driver and executors) are all local_dir.

    conf: settings that replace this job's defaults below (a value of None drops
    the default and leaves Spark's own)."""
    # The driver JVM (spark-submit, started by py4j) inherits this environment,
    # and local-cluster Workers hand it on to the executor JVMs.
    env = os.environ
    _ensure_java_home(env)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    # Utils.getOrCreateLocalRootDirs prefers SPARK_EXECUTOR_DIRS / SPARK_LOCAL_DIRS /
    # LOCAL_DIRS (YARN) over spark.local.dir: pin them all to DIR.
    env["SPARK_LOCAL_DIRS"] = local_dir
    for var in ("SPARK_EXECUTOR_DIRS", "LOCAL_DIRS", "CONTAINER_ID"):
        env.pop(var, None)
    # Stay on loopback; avoids hostname lookups and stray interfaces.
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # A user's spark-defaults.conf must not change the workload.
    env.pop("SPARK_CONF_DIR", None)
    env.pop("PYSPARK_SUBMIT_ARGS", None)

    from pyspark.sql import SparkSession

    settings = {
        "spark.local.dir": local_dir,
        "spark.driver.memory": "1g",
        "spark.driver.extraJavaOptions": JVM_OPTS,
        "spark.executor.extraJavaOptions": JVM_OPTS,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.executorEnv.SPARK_LOCAL_DIRS": local_dir,
        "spark.log.level": "WARN",
        # JVM <-> Python worker traffic over Unix sockets (in java.io.tmpdir, not
        # in DIR): over TCP every Python task pays ~40 ms of delayed-ACK latency,
        # which doubles the run time of the 256-partition jobs.
        "spark.python.unix.domain.socket.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.default.parallelism": str(MAP_SLICES),
        # 256 partitions must really happen: no AQE coalescing, no broadcast.
        "spark.sql.adaptive.enabled": "false",
        "spark.sql.adaptive.coalescePartitions.enabled": "false",
        "spark.sql.autoBroadcastJoinThreshold": "-1",
        "spark.sql.shuffle.partitions": "8",
        "spark.shuffle.spill.numElementsForceSpillThreshold": str(FORCE_SPILL_RECORDS),
        # Fail fast instead of retrying on a broken filesystem.
        "spark.task.maxFailures": "1",
        "spark.stage.maxConsecutiveAttempts": "1",
    }
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        if value is not None:
            builder = builder.config(key, value)
    return builder.getOrCreate()


def all_jobs(spark) -> dict:
    """This job: the RDD and DataFrame shuffles with 8 and 256 partitions."""
    sc = spark.sparkContext
    results: dict = {}
    _last_mark[0] = time.monotonic()
    for nparts in PARTITION_COUNTS:
        t = time.monotonic()
        results.update(rdd_jobs(sc, nparts))
        log(f"RDD jobs with {nparts} partitions: {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        results.update(df_jobs(spark, nparts))
        log(f"DataFrame jobs with {nparts} partitions: {time.monotonic() - t:.1f}s")

    bad = [k for k, v in results.items() if v.get("sorted") is False]
    if bad:
        raise RuntimeError(f"output not sorted: {bad}")
    # Same data through a different number of partitions: same answer.
    _cross_check(results)
    return results


def add_driver_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line options every driver built on drive() takes."""
    ap.add_argument("--local-dir", required=True, help="spark.local.dir (must exist or be creatable)")
    ap.add_argument("--result", required=True, help="write the result JSON here")
    ap.add_argument("--master", default="local-cluster[2,1,1024]")
    ap.add_argument(
        "--pause", action="store_true", help="print SPARK_JOBS_DONE and wait for a stdin line before spark.stop()"
    )


def drive(
    jobs,
    local_dir: str,
    result_path: str,
    master: str,
    pause: bool,
    *,
    app_name: str = "shufflefs-spark-job",
    conf: dict | None = None,
) -> int:
    """Run `jobs(spark) -> dict` in a session on local_dir, write its dict as JSON to
    result_path, optionally pause (see --pause), then stop Spark and reap every process
    it started.  Returns the exit status: 0, or 1 if Spark or a check failed."""
    local_dir = os.path.abspath(local_dir)
    result_path = os.path.abspath(result_path)
    os.makedirs(local_dir, exist_ok=True)
    _become_subreaper()

    t0 = time.monotonic()
    spark = None
    app_id = None
    spark_home = None
    try:
        spark = build_session(local_dir, master, app_name=app_name, conf=conf)
        sc = spark.sparkContext
        sc.setLogLevel("WARN")
        app_id = sc.applicationId
        spark_home = _spark_home()
        log(f"session up in {time.monotonic() - t0:.1f}s: master={sc.master} app={app_id} local_dir={local_dir}")

        results = jobs(spark)

        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, result_path)
        log(f"all jobs done in {time.monotonic() - t0:.1f}s, results in {result_path}")

        if pause:
            sys.stdout.write("SPARK_JOBS_DONE\n")
            sys.stdout.flush()
            sys.stdin.readline()
    except BaseException as e:  # noqa: BLE001 - report anything, incl. KeyboardInterrupt
        log(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        _stop(spark)
        if app_id and spark_home:
            _show_executor_logs(os.path.join(spark_home, "work", app_id))
        return 1

    _stop(spark)
    # local-cluster Workers keep executor stdout/stderr in $SPARK_HOME/work/<app>;
    # drop them after a successful run so the venv does not fill up.
    if app_id and spark_home and master.startswith("local-cluster"):
        shutil.rmtree(os.path.join(spark_home, "work", app_id), ignore_errors=True)
    log(f"stopped, total {time.monotonic() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_arguments(ap)
    args = ap.parse_args(argv)
    return drive(all_jobs, args.local_dir, args.result, args.master, args.pause)


def _spark_home():
    try:
        from pyspark.find_spark_home import _find_spark_home

        return os.environ.get("SPARK_HOME") or _find_spark_home()
    except Exception:  # noqa: BLE001
        return None


def _show_executor_logs(work_dir: str, lines: int = 25) -> None:
    """Print the tails of the local-cluster executors' stderr (they live in
    $SPARK_HOME/work/<app>/<executor>/stderr and are kept after a failure)."""
    if not os.path.isdir(work_dir):
        return
    for name in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, name, "stderr")
        try:
            with open(path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            continue
        log(f"--- tail of executor {name} log {path} ---")
        for line in tail:
            print(line, file=sys.stderr)
    sys.stderr.flush()


def _cross_check(results: dict) -> None:
    """The 8- and 256-partition variants of a job must agree."""
    a, b = PARTITION_COUNTS
    problems = []
    for name in list(results):
        if not name.endswith(f"_{a}"):
            continue
        base = name[: -len(str(a))]
        ra, rb = results[name], results.get(f"{base}{b}")
        if rb is None:
            problems.append(f"{base}{b} missing")
            continue
        strip = ("partitions", "non_empty_partitions")
        if {k: v for k, v in ra.items() if k not in strip} != {k: v for k, v in rb.items() if k not in strip}:
            problems.append(f"{base}{a} != {base}{b}")
    if problems:
        raise RuntimeError("results differ between partition counts: " + ", ".join(problems))


def _stop(spark) -> None:
    """Stop Spark, then make the driver JVM exit and reap every process Spark
    started, so that no JVM or PySpark daemon outlives this script."""
    if spark is not None:
        try:
            spark.stop()
        except Exception as e:  # noqa: BLE001
            log(f"spark.stop() failed: {e}")
    try:
        from pyspark import SparkContext

        gateway = SparkContext._gateway
    except Exception:  # noqa: BLE001
        gateway = None
    proc = getattr(gateway, "proc", None)
    if proc is not None:
        # PythonGatewayServer exits when its stdin reaches EOF.
        try:
            proc.stdin.close()
        except (OSError, AttributeError):
            pass
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001
            log("driver JVM did not exit within 60s")
    _reap_children(30.0)


def _become_subreaper() -> None:
    """Executors (children of the driver JVM) and PySpark daemons (children of
    the executors) are orphaned at shutdown; as a child subreaper this process
    adopts and reaps them instead of leaving zombies to init."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort (non-Linux)
        pass


def _reap_children(timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() >= end:
                log("some child processes did not exit")
                return
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
