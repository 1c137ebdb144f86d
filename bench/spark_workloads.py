#!/usr/bin/env python3
"""The PySpark workloads of bench/spark_bench.py: a driver program run as a subprocess.

    .venv/bin/python bench/spark_workloads.py --workload shuffle-heavy|mixed|defaults --local-dir DIR \\
        --result FILE [--scale 1.0] [--master local-cluster[2,1,1024]] [--pause]

Same session setup, command line and --pause protocol as shufflefs/testing/spark_job.py (whose
`drive()` and `build_session()` it uses): every local dir of the driver and the executors
is DIR, JVM <-> Python traffic goes over unix sockets, no UI. Writes to FILE:

    {"workload": NAME, "scale": F,
     "result":  {...},   # depends only on the data: equal on every correct filesystem
     "timings": {"jobs_s": ..., "<step>_s": ...},   # jobs_s: first action start to last action end
     "metrics": {"shuffle_write_bytes": ..., "spill_bytes": ..., ...}}   # Spark's own task metrics

Workloads (calibrated at --scale 1 on the 2-core machine, plain dir, local-cluster[2,1,1024]):
  shuffle-heavy  DataFrame only (no Python UDFs): a sort-merge join of two tables of random
                 64-bit columns with a groupBy of the joined rows, then a total sort of one
                 table; 64 shuffle partitions. 3.18 GB of shuffle writes through DIR;
                 jobs ~32 s.
  mixed          3M records made in Python and cached DISK_ONLY (rdd_* blocks in DIR): RDD
                 reduceByKey and groupByKey, then DataFrames of the same records (a groupBy
                 joined to a users table; every record joined to it, grouped by item),
                 cross-checked against the RDD results. 0.23 GB of shuffle writes; jobs ~39 s.
  defaults       Spark's default shuffle settings: spark.sql.shuffle.partitions is left at 200
                 (unset explicitly), so every DataFrame shuffle takes the bypass-merge-sort
                 writer: one temp file per reduce partition per map task. A groupBy of 2M rows
                 (16 random 64-bit columns) by a key of 500k values, then a sort-merge join of
                 the rows to a table of the keys; each summarized by a global aggregate.
                 0.36 GB of shuffle writes, 474 tasks; jobs ~17 s.

The other settings are CONF below for all three (AQE and broadcast joins off: results must
not depend on plan choices).
"""

from __future__ import annotations

import argparse
import sys
import time

from pyspark import cloudpickle  # noqa: E402

from shufflefs.testing import spark_job  # noqa: E402
from shufflefs.testing.spark_job import (  # noqa: E402
    KEEP_ALIVE,
    MASK64,
    add_driver_arguments,
    drive,
    log,
    mix64,
    row_hash,
    summarize_collected,
)

# The executors' Python workers cannot import shufflefs/testing/spark_job.py: ship its helpers
# (mix64, row_hash) by value, as functions of this __main__ module are.
cloudpickle.register_pickle_by_value(spark_job)

MASK31 = 0x7FFFFFFF

# --- shuffle-heavy --------------------------------------------------------------------------
# Rows of each of the two tables at scale 1. A row is a 64-bit key and HEAVY_COLUMNS random
# 64-bit values (xxhash64): 8 + 8*33 = 272 bytes as an UnsafeRow (+4 bytes framing) that lz4
# cannot compress. The join shuffles both tables and the sort one of them again: 3 tables'
# worth: 3.18 GB of shuffle writes (Spark's metric) at scale 1.
HEAVY_ROWS = 4_000_000
HEAVY_COLUMNS = 32
HEAVY_MAP_PARTITIONS = 32  # map tasks per table scan
HEAVY_SHUFFLE_PARTITIONS = 64  # <= 200: the bypass-merge-sort writer, as with the default 200

# --- defaults -------------------------------------------------------------------------------
# Spark's default shuffle settings: spark.sql.shuffle.partitions is not set (200), so every
# DataFrame shuffle uses the bypass-merge-sort writer (<= 200 partitions, no map-side
# combine in the shuffle): each map task writes one temp file per reduce partition (200)
# and concatenates them into its .data file. A fact table of DEFAULTS_ROWS rows (a key of
# DEFAULTS_KEYS values, DEFAULTS_COLUMNS random 64-bit columns) grouped by key, and joined
# (sort-merge) to a dimension table of those keys.
DEFAULTS_ROWS = 2_000_000
DEFAULTS_KEYS_DIVISOR = 4  # keys = rows / 4: little reduction by the partial aggregation
DEFAULTS_COLUMNS = 16
DEFAULTS_MAP_PARTITIONS = 32
DEFAULT_SHUFFLE_PARTITIONS = "200"  # Spark's default, checked at run time

# --- mixed ----------------------------------------------------------------------------------
MIXED_RECORDS = 3_000_000
MIXED_SLICES = 16  # partitions of the generated records
MIXED_PARTITIONS = 64  # reduce partitions of the RDD and DataFrame shuffles
MIXED_SEGMENTS = 17


# Spark settings common to all workloads (on top of spark_job.build_session's defaults).
CONF = {
    # Spark's defaults rather than the functional test's forced spills and 8 shuffle
    # partitions (shuffle-heavy and mixed set their own partition count).
    "spark.shuffle.spill.numElementsForceSpillThreshold": None,
    "spark.sql.shuffle.partitions": None,
    "spark.default.parallelism": str(MIXED_PARTITIONS),
    # Results must not depend on plan choices: no AQE re-planning, no broadcast joins.
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.autoBroadcastJoinThreshold": "-1",
}


class Steps:
    """Times the named steps of a workload; `jobs_s` spans all of them."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.timings[f"{name}_s"] = round(now - self._last, 3)
        log(f"  {name}: {now - self._last:.1f}s")
        self._last = now

    def total(self) -> dict:
        return {"jobs_s": round(self._last - self._start, 3), **self.timings}


def row_stats(df, columns, *group_by):
    """count, sum of 31-bit row hashes and xor of 64-bit row hashes of `columns` (per group)."""
    from pyspark.sql import functions as F

    h = F.xxhash64(*columns)
    aggs = [F.count(F.lit(1)).alias("n"), F.sum(h.bitwiseAND(MASK31)).alias("sum_h"), F.bit_xor(h).alias("xor_h")]
    return df.groupBy(*group_by).agg(*aggs) if group_by else df.agg(*aggs)


def shuffle_heavy(spark, scale: float) -> tuple[dict, dict]:
    from pyspark.sql import functions as F

    rows = max(1000, int(HEAVY_ROWS * scale))
    spark.conf.set("spark.sql.shuffle.partitions", str(HEAVY_SHUFFLE_PARTITIONS))

    def table(prefix: str, seed: int):
        values = [F.xxhash64("id", F.lit(seed * 1000 + i)).alias(f"{prefix}{i}") for i in range(HEAVY_COLUMNS)]
        return spark.range(0, rows, numPartitions=HEAVY_MAP_PARTITIONS).select(F.col("id").alias("k"), *values)

    left, right = table("a", 1), table("b", 2)
    steps = Steps()
    result = {}

    # 1. sort-merge join on a unique key (both tables shuffled and sorted), then a groupBy of
    #    the joined rows (partial aggregation: a small shuffle).
    joined = left.join(right, "k")
    by_group = keep(row_stats(joined, joined.columns, (F.col("k") % 1000).alias("g")))
    result["join_groupBy"] = summarize_collected(by_group.collect())
    steps.done("join_groupBy")

    # 2. total sort of one table (range partitioning: a sampling job, then the full shuffle).
    #    monotonically_increasing_id() (partition index, row position) makes the hash depend on
    #    the order, and as a non-deterministic expression it keeps the optimizer from dropping
    #    the sort under the aggregate.
    ordered = left.orderBy("a0", "k").select(F.monotonically_increasing_id().alias("pos"), *left.columns)
    stats = keep(row_stats(ordered, ordered.columns)).collect()[0]
    result["orderBy"] = {"count": stats["n"], "sum_h": stats["sum_h"], "xor_h": stats["xor_h"]}
    steps.done("orderBy")

    if result["join_groupBy"]["column_sums"][1] != rows or stats["n"] != rows:
        raise RuntimeError(f"row counts differ from {rows}: {result}")
    return result, steps.total()


def mixed(spark, scale: float) -> tuple[dict, dict]:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    sc = spark.sparkContext
    spark.conf.set("spark.sql.shuffle.partitions", str(MIXED_PARTITIONS))
    n = max(1000, int(MIXED_RECORDS * scale))
    n_users = max(100, n // 30)
    n_items = max(10, n // 300)

    def event(i):
        x = mix64(i)
        return (x % n_users, (x >> 24) % n_items, (x >> 44) % 1000, "%016x" % (x ^ 0x5DEECE66D))

    steps = Steps()
    result = {}
    # Records made in Python and cached on disk: rdd_* blocks written into (and read back from) DIR.
    events = keep(sc.range(0, n, numSlices=MIXED_SLICES).map(event).persist(StorageLevel.DISK_ONLY))
    result["events"] = events.count()
    steps.done("generate")

    # RDD: per-user totals (map-side combine) and per-item groups (every record shuffled).
    per_user = keep(
        events.map(lambda e: (e[0], (1, e[2]))).reduceByKey(lambda a, b: (a[0] + b[0], a[1] + b[1]), MIXED_PARTITIONS)
    )
    users_sum = per_user.map(lambda kv: (1, kv[1][0], kv[1][1], row_hash((kv[0], kv[1][0], kv[1][1])))).reduce(
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2], (a[3] + b[3]) & MASK64)
    )
    result["rdd_reduceByKey"] = list(users_sum)
    steps.done("rdd_reduceByKey")

    per_item = keep(
        events.map(lambda e: (e[1], (e[0], e[2], e[3])))
        .groupByKey(MIXED_PARTITIONS)
        .mapValues(lambda vs: (len(vs), len({v[0] for v in vs}), max(v[1] for v in vs), min(v[2] for v in vs)))
    )
    result["rdd_groupByKey"] = summarize_collected(per_item.map(lambda kv: (kv[0],) + kv[1]).collect())
    steps.done("rdd_groupByKey")

    # DataFrame over the same records (Python -> JVM), with a users dimension from the JVM.
    schema = StructType(
        [
            StructField("user", LongType()),
            StructField("item", LongType()),
            StructField("amount", LongType()),
            StructField("tag", StringType()),
        ]
    )
    events_df = spark.createDataFrame(events, schema, verifySchema=False)
    users = spark.range(0, n_users, numPartitions=4).select(
        F.col("id").alias("user"),
        (F.xxhash64("id").bitwiseAND(MASK31) % MIXED_SEGMENTS).alias("segment"),
        F.sha2(F.col("id").cast("string"), 256).alias("name"),
    )

    user_totals = events_df.groupBy("user").agg(F.count(F.lit(1)).alias("n"), F.sum("amount").alias("amount"))
    by_segment = keep(
        user_totals.join(users, "user")
        .groupBy("segment")
        .agg(
            F.count(F.lit(1)).alias("users"),
            F.sum("n").alias("n"),
            F.sum("amount").alias("amount"),
            F.sum(F.xxhash64("user", "n", "amount", "name").bitwiseAND(MASK31)).alias("sum_h"),
        )
    )
    result["df_groupBy_join"] = summarize_collected(by_segment.collect())
    steps.done("df_groupBy_join")

    # Every event joined to its user (sort-merge join of the 3M records), grouped by item.
    enriched = events_df.join(users, "user")
    by_item = keep(row_stats(enriched, ["user", "item", "amount", "tag", "segment", "name"], "item"))
    result["df_join_groupBy"] = summarize_collected(by_item.collect())
    steps.done("df_join_groupBy")

    # The RDD and DataFrame paths saw the same records.
    n_rdd_users, n_rdd, amount_rdd = users_sum[0], users_sum[1], users_sum[2]
    _, seg_users, seg_n, seg_amount, _ = result["df_groupBy_join"]["column_sums"]
    checks = {
        "events": result["events"] == n,
        "rdd_total": n_rdd == n,
        "df_users": seg_users == n_rdd_users,
        "df_total": seg_n == n,
        "df_amount": seg_amount == amount_rdd,
        "df_join_total": result["df_join_groupBy"]["column_sums"][1] == n,
    }
    if not all(checks.values()):
        raise RuntimeError(f"cross-checks failed: {checks}; {result}")
    return result, steps.total()


def defaults(spark, scale: float) -> tuple[dict, dict]:
    from pyspark.sql import functions as F

    # Spark's default partition count, even if an earlier workload set its own in this session.
    spark.conf.unset("spark.sql.shuffle.partitions")
    partitions = spark.conf.get("spark.sql.shuffle.partitions")
    if partitions != DEFAULT_SHUFFLE_PARTITIONS:
        raise RuntimeError(
            f"spark.sql.shuffle.partitions is {partitions}, not Spark's default {DEFAULT_SHUFFLE_PARTITIONS}"
        )
    rows = max(1000, int(DEFAULTS_ROWS * scale))
    n_keys = max(100, rows // DEFAULTS_KEYS_DIVISOR)

    facts = spark.range(0, rows, numPartitions=DEFAULTS_MAP_PARTITIONS).select(
        F.col("id"),
        (F.xxhash64("id", F.lit(-1)).bitwiseAND(MASK31) % n_keys).alias("k"),
        *[F.xxhash64("id", F.lit(3000 + i)).alias(f"v{i}") for i in range(DEFAULTS_COLUMNS)],
    )
    dims = spark.range(0, n_keys, numPartitions=DEFAULTS_MAP_PARTITIONS // 4).select(
        F.col("id").alias("k"), F.sha2(F.col("id").cast("string"), 256).alias("name")
    )
    steps = Steps()
    result = {"shuffle_partitions": int(partitions)}

    # Each step's rows are summarized by one global aggregate (a single reduce partition):
    # the 200-partition shuffles are the step's own, not its summary's.
    # 1. groupBy of the facts by key: partial aggregation in the map tasks, 200 reduce partitions.
    per_key = facts.groupBy("k").agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.col("v0").bitwiseAND(MASK31)).alias("v0_sum"),
        F.bit_xor(F.xxhash64(*[f"v{i}" for i in range(DEFAULTS_COLUMNS)])).alias("v_xor"),
    )
    h = F.xxhash64(*per_key.columns)
    stats = keep(
        per_key.agg(
            F.count(F.lit(1)).alias("keys"),
            F.sum("n").alias("n"),
            F.sum(h.bitwiseAND(MASK31)).alias("sum_h"),
            F.bit_xor(h).alias("xor_h"),
        )
    ).collect()[0]
    result["groupBy"] = stats.asDict()
    steps.done("groupBy")

    # 2. sort-merge join of every fact row (all its columns shuffled) to its key's dimension
    #    row (both sides shuffled into 200 partitions and sorted).
    joined = facts.join(dims, "k")
    stats = keep(row_stats(joined, joined.columns)).collect()[0]
    result["join"] = stats.asDict()
    steps.done("join")

    if result["groupBy"]["n"] != rows or result["join"]["n"] != rows:
        raise RuntimeError(f"row counts differ from {rows}: {result}")
    return result, steps.total()


WORKLOADS = {"shuffle-heavy": shuffle_heavy, "mixed": mixed, "defaults": defaults}


def keep(x):
    """Keep x referenced until the end, so that Spark's ContextCleaner does not delete its
    shuffle files early: at --pause, every shuffle's files still exist."""
    KEEP_ALIVE.append(x)
    return x


def spark_metrics(spark) -> dict:
    """Totals of Spark's task metrics over all stages of this application (status store)."""
    jsc = spark.sparkContext._jsc.sc()
    jvm = spark.sparkContext._jvm
    try:
        jsc.listenerBus().waitUntilEmpty()  # the last tasks' metrics are in the store
    except Exception as e:  # noqa: BLE001
        log(f"listener bus not drained: {e}")
    store = jsc.statusStore()
    totals = {
        "stages": 0,
        "tasks": 0,
        "shuffle_write_bytes": 0,
        "shuffle_write_records": 0,
        "shuffle_read_bytes": 0,
        "spill_bytes": 0,
        "memory_spill_bytes": 0,
    }
    try:
        empty = jvm.java.util.ArrayList()
        no_quantiles = spark.sparkContext._gateway.new_array(jvm.double, 0)
        stages = store.stageList(empty, False, False, no_quantiles, empty)
    except Exception as e:  # noqa: BLE001 - the signature changes between Spark versions
        log(f"no stage metrics: {e}")
        return {}
    for i in range(stages.size()):
        stage = stages.apply(i)
        totals["stages"] += 1
        totals["tasks"] += stage.numCompleteTasks()
        totals["shuffle_write_bytes"] += stage.shuffleWriteBytes()
        totals["shuffle_write_records"] += stage.shuffleWriteRecords()
        totals["shuffle_read_bytes"] += stage.shuffleLocalBytesRead() + stage.shuffleRemoteBytesRead()
        totals["spill_bytes"] += stage.diskBytesSpilled()
        totals["memory_spill_bytes"] += stage.memoryBytesSpilled()
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    add_driver_arguments(ap)
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0, help="data size multiplier (default 1)")
    args = ap.parse_args(argv)

    def jobs(spark) -> dict:
        result, timings = WORKLOADS[args.workload](spark, args.scale)
        return {
            "workload": args.workload,
            "scale": args.scale,
            "result": result,
            "timings": timings,
            "metrics": spark_metrics(spark),
        }

    return drive(
        jobs,
        args.local_dir,
        args.result,
        args.master,
        args.pause,
        app_name=f"shufflefs-bench-{args.workload}",
        conf=CONF,
    )


if __name__ == "__main__":
    sys.exit(main())
