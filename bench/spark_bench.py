"""Spark end-to-end benchmark: PySpark workloads with their local dir on several systems.

    .venv/bin/python bench/spark_bench.py --out bench-results/spark
    .venv/bin/python bench/spark_bench.py --rounds 1 --scale 0.05 --out /tmp/spark-quick   # quick check

Runs the workloads of bench/spark_workloads.py (local-cluster[2,1,1024]: real executor JVMs)
with every Spark local dir on each system, interleaved (round 1: every workload on every
system, round 2: ...), and reports per workload and system the median job time and its ratio
to the plain directory. Systems (--configs):

  plain                   a directory on the local disk
  shufflefs-file          shufflefs on a file:// store (local disk), --commit async, with its
                          default FUSE session (--fuse own: passthrough of local files as root)
  shufflefs-s3            shufflefs on s3:// (SeaweedFS), --commit async, --fuse own
  s3fs                    s3fs-fuse on a SeaweedFS bucket (options: S3FS_OPTIONS below)
  rclone                  rclone mount --vfs-cache-mode writes on a SeaweedFS bucket (RCLONE_OPTIONS)
  shufflefs-file-pyfuse3  shufflefs-file with the old session (--fuse pyfuse3)   } only if named
  shufflefs-s3-pyfuse3    shufflefs-s3 with the old session (--fuse pyfuse3)     } in --configs

Default --configs: the first five. Name e.g. --configs plain,shufflefs-file,shufflefs-file-pyfuse3
to measure the two FUSE sessions in one interleaved run.

Every run that needs S3 gets a fresh SeaweedFS (started by this script, stopped after the
run). A system whose binary is missing is skipped with a message (Debian packages `s3fs`,
`rclone`). A run that fails or times out (default: max(600 s, 5x the plain median)) is
recorded as "failed: <reason>" (full error in OUT/failures/) and the benchmark goes on; a run
whose result differs from the plain dir's counts as failed too.

Measured per run: the job time (first Spark action to the last one, JVM start and stop
excluded), the wall time (driver start to the exit of every Spark process, including
Spark's cleanup of its dirs), the unmount time (shufflefs --commit async: drains uploads),
the peak RSS (VmHWM) of the shufflefs / s3fs / rclone process, Spark's shuffle write and
spill bytes, the committed shuffle files present at the end of the jobs, shufflefs's store
requests and FUSE session (own / pyfuse3, passthrough or not, request counts), and for S3
systems the bucket's objects at the end of the jobs.

Writes OUT/results.json (all runs, the summary, the reference results) after every run, and
at the end OUT/spark_bench.png (matplotlib, from the `bench` extra). Not a test: run it on an
otherwise idle machine. Needs root (FUSE mounts), like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from spark_bench_report import median_of, ok_runs, plot, print_summary, summarize
from spark_bench_runs import run_once
from spark_bench_systems import (
    ALL_CONFIGS,
    CONFIGS,
    MIN_TIMEOUT,
    RCLONE_OPTIONS,
    S3FS_OPTIONS,
    SHUFFLEFS_CONFIGS,
    SHUFFLEFS_OPTIONS,
    TIMEOUT_FACTOR,
    WORKLOADS,
    canonical_sha,
    command_version,
    make_system,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ main


def environment_info(args) -> dict:
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--", "shufflefs"], capture_output=True, text=True
    ).stdout.strip()
    import pyspark

    return {
        "args": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "git_commit": commit + ("+dirty" if dirty else ""),
        "pyspark": pyspark.__version__,
        "java": command_version(["java", "-version"]),
        "s3fs": command_version(["s3fs", "--version"]),
        "rclone": command_version(["rclone", "version"]),
        "shufflefs_options": SHUFFLEFS_OPTIONS,
        "shufflefs_config_options": {name: options for name, (_, options) in SHUFFLEFS_CONFIGS.items()},
        "s3fs_options": S3FS_OPTIONS + ["use_cache=<run dir>"],
        "rclone_options": RCLONE_OPTIONS,
    }


def parse_list(text: str, choices: list[str], what: str, parser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of every workload on every system (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"default {','.join(CONFIGS)}")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="data size multiplier (default 1; 0.05 for a quick check)"
    )
    parser.add_argument("--out", required=True, help="directory for results.json, spark_bench.png, failures/")
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds per run (default: max({MIN_TIMEOUT:.0f}, {TIMEOUT_FACTOR:.0f} x the plain median))",
    )
    parser.add_argument("--master", default="local-cluster[2,1,1024]", help="Spark master (default %(default)s)")
    parser.add_argument(
        "--work-dir",
        default="/var/tmp",
        help="where each run's local dir, mounts, caches and stores live (default %(default)s)",
    )
    args = parser.parse_args(argv)
    workloads = parse_list(args.workloads, WORKLOADS, "workloads", parser)
    configs = parse_list(args.configs, ALL_CONFIGS, "configs", parser)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    systems = {name: make_system(name) for name in configs}
    skipped = {}
    for name, system in systems.items():
        reason = system.missing()
        if reason:
            skipped[name] = reason
            print(f"SKIPPING {name}: {reason}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    meta = environment_info(args)
    meta["skipped"] = skipped
    meta["reference_runs"] = {}
    runs: list[dict] = []
    reference: dict[str, dict] = {}  # workload -> result of its first good run (plain's if plain runs)

    def save() -> list[dict]:
        rows = summarize(runs, workloads, configs, skipped)
        public = [{k: v for k, v in r.items() if k not in ("result", "error")} for r in runs]
        with open(results_path + ".tmp", "w") as f:
            json.dump({"meta": meta, "summary": rows, "runs": public, "reference_results": reference}, f, indent=1)
        os.replace(results_path + ".tmp", results_path)
        return rows

    # SIGTERM as Ctrl-C: the run in progress is cleaned up (Spark killed, unmounted, servers
    # stopped) and the runs so far are reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = tempfile.mkdtemp(dir=args.work_dir, prefix="shufflefs-spark-bench-")
    order = [n for n in ["plain"] + configs if n in configs and n not in skipped]
    order = list(dict.fromkeys(order))  # plain first in every round: it sets the timeout
    try:
        for round_number in range(1, args.rounds + 1):
            for workload in workloads:
                for name in order:
                    plain = median_of(ok_runs(runs, workload, "plain"), lambda r: r["wall_s"])
                    timeout = args.timeout or max(MIN_TIMEOUT, TIMEOUT_FACTOR * (plain or 0))
                    print(f"round {round_number}/{args.rounds} {workload:14} {name:22} ...", end=" ", flush=True)
                    record = run_once(workload, systems[name], round_number, args, base, timeout)
                    if record["status"] == "ok":
                        record["result_sha256"] = canonical_sha(record["result"])
                        if workload not in reference:
                            reference[workload] = record["result"]
                            meta["reference_runs"][workload] = f"{name} round {round_number}"
                        expected = reference[workload]
                        if record["result"] != expected:
                            record["status"] = "failed: result differs from the reference run's"
                            record["error"] = json.dumps({"got": record["result"], "expected": expected}, indent=1)
                    if "error" in record:
                        failures = os.path.join(args.out, "failures")
                        os.makedirs(failures, exist_ok=True)
                        record["error_file"] = os.path.join(failures, f"{workload}-{name}-r{round_number}.txt")
                        with open(record["error_file"], "w") as f:
                            f.write(record["error"])
                    runs.append(record)
                    if record["status"] == "ok":
                        print(
                            f"job {record['job_s']:6.1f} s  wall {record['wall_s']:6.1f} s"
                            + (f"  umount {record['umount_s']:5.1f} s" if "umount_s" in record else "")
                            + (f"  RSS {record['peak_rss_mib']:.0f} MiB" if record.get("peak_rss_mib") else ""),
                            flush=True,
                        )
                    else:
                        print(record["status"], flush=True)
                    save()
    except KeyboardInterrupt:
        print("\ninterrupted: the run in progress is not counted; reporting the runs so far", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = save()
    print_summary(rows)
    if runs:
        png = os.path.join(args.out, "spark_bench.png")
        title = (
            f"Spark job time with the local dir on each system\n{args.master}, scale {args.scale:g}, "
            f"{max(r['round'] for r in runs)} round(s), {meta['cpus']} CPUs, {meta['started']}"
        )
        try:
            plot(runs, rows, workloads, configs, png, title)
            print(f"plot: {png}")
        except ImportError:
            print("no plot: matplotlib missing (pip install -e '.[bench]')")
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
