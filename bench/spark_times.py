"""Wall time of the test PySpark job (shufflefs/testing/spark_job.py, local-cluster[2,1,1024]) on a plain
directory and on shufflefs mounts, runs interleaved, medians and ratios to the plain directory.

    .venv/bin/python bench/spark_times.py --rounds 3 [--configs plain,file-sync,s3-sync,s3-async]

Starts its own SeaweedFS for the s3 configurations. Reports the daemon's peak RSS (VmHWM) and
its store requests per run. Not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.mounting import Mount  # noqa: E402
from shufflefs.testing.servers import SeaweedS3  # noqa: E402
from shufflefs.testing.sparkrun import run_spark  # noqa: E402

CONFIGS = {
    "plain": None,
    "file-sync": ("file", "sync"),
    "file-async": ("file", "async"),
    "s3-sync": ("s3", "sync"),
    "s3-async": ("s3", "async"),
}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_once(name: str, base: str, seaweed: SeaweedS3 | None) -> dict:
    work = tempfile.mkdtemp(dir=base, prefix=f"{name}-")
    result_path = os.path.join(work, "result.json")
    if CONFIGS[name] is None:
        local = os.path.join(work, "local")
        os.makedirs(local)
        return {"seconds": run_spark(local, result_path).wall_s}
    kind, commit = CONFIGS[name]
    env = None
    if kind == "file":
        store = os.path.join(work, "store")
        os.makedirs(store)
        url = f"file://{store}"
    else:
        bucket = seaweed.create_bucket("b-" + uuid.uuid4().hex[:12])
        url = f"s3://{bucket}/shuffle"
        env = seaweed.env()
    mount = Mount(url, os.path.join(work, "mnt"), os.path.join(work, "cache"), "--commit", commit, env=env)
    with mount:
        peak = {}
        seconds = run_spark(
            mount.path, result_path, pause_callback=lambda: peak.setdefault("rss", peak_rss_mib(mount.pid))
        ).wall_s
        rss = max(peak["rss"], peak_rss_mib(mount.pid))
        started = time.monotonic()
        assert mount.umount().returncode == 0
        drain = time.monotonic() - started
        stats = mount.status()["stats"]
    return {"seconds": seconds, "umount_seconds": drain, "peak_rss_mib": rss, "store": stats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="plain,file-sync,s3-sync,s3-async")
    parser.add_argument("--json", help="write all runs here")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    base = tempfile.mkdtemp(prefix="shufflefs-bench-")
    seaweed = SeaweedS3().start() if any(n.startswith("s3") for n in names) else None
    try:
        for round_number in range(args.rounds):
            for name in names:  # interleaved: A B C A B C ...
                run = run_once(name, base, seaweed)
                runs[name].append(run)
                print(f"round {round_number + 1} {name:10} {run['seconds']:6.1f} s", flush=True)
    finally:
        if seaweed is not None:
            seaweed.stop()
    plain = statistics.median(r["seconds"] for r in runs["plain"]) if "plain" in runs else None
    print(
        f"\n{'config':10} {'median s':>9} {'ratio':>6} {'umount s':>9} {'peak RSS MiB':>13}  store requests (last run)"
    )
    for name, items in runs.items():
        median = statistics.median(r["seconds"] for r in items)
        ratio = f"{median / plain:.2f}" if plain else "-"
        umount = statistics.median(r.get("umount_seconds", 0) for r in items)
        rss = max(r.get("peak_rss_mib", 0) for r in items)
        print(f"{name:10} {median:9.1f} {ratio:>6} {umount:9.1f} {rss:13.0f}  {items[-1].get('store', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
