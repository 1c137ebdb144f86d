"""`shufflefs bench` on shufflefs mounts (file:// and s3:// on a SeaweedFS it starts), each
workload compared with a plain directory in the same run, runs alternating, medians.

    .venv/bin/python bench/fs_bench.py --rounds 3 --out bench-results/fs
    .venv/bin/python bench/fs_bench.py --sessions own,pyfuse3 --out bench-results/fs   # before/after

`--sessions` picks the FUSE sessions (`--fuse`) mounted in turn on each store (default: own).

Workloads: `default` (the command's defaults: 200 map outputs x 100 partitions x 32 KiB),
`large-blocks` (40 x 50 x 512 KiB: ~1 GB in bigger blocks), and `small-files` (2,000 map outputs
x 8 partitions x 1 KiB, write only: map outputs committed per second). Writes OUT/results.json
and prints one table per mount. Not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.mounting import Mount  # noqa: E402
from shufflefs.testing.servers import SeaweedS3  # noqa: E402

WORKLOADS = {
    "default": [],
    "large-blocks": ["--mappers", "40", "--reducers", "50", "--block-size", "512K"],
    "small-files": ["--mappers", "2000", "--reducers", "8", "--block-size", "1K", "--write-only"],
}


def bench(mountpoint: str, plain: str, workload: list[str], rounds: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "shufflefs",
        "bench",
        mountpoint,
        "--compare",
        plain,
        "--rounds",
        str(rounds),
        "--json",
        *workload,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return {"command": command[2:], **json.loads(result.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stores", default="file,s3")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--sessions", default="own", help="FUSE sessions to mount with (--fuse), e.g. own,pyfuse3")
    parser.add_argument("--out", required=True, help="directory for results.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = tempfile.mkdtemp(prefix="shufflefs-fs-bench-", dir="/var/tmp")
    results: dict = {}
    seaweed = None
    try:
        plain = os.path.join(base, "plain")
        os.makedirs(plain)
        for store in args.stores.split(","):
            env = None
            if store == "file":
                url = f"file://{base}/store"
                os.makedirs(f"{base}/store")
            else:
                seaweed = SeaweedS3().start()
                url = f"s3://{seaweed.create_bucket('b-' + uuid.uuid4().hex[:8])}/shuffle"
                env = seaweed.env()
            for session in args.sessions.split(","):
                with Mount(
                    url,
                    f"{base}/mnt-{store}-{session}",
                    f"{base}/cache-{store}-{session}",
                    "--commit",
                    "async",
                    "--fuse",
                    session,
                    env=env,
                ) as mount:
                    run_workloads(args, mount.path, plain, f"{store}/{session}", results)
            if seaweed is not None:
                seaweed.stop()
                seaweed = None
    finally:
        if seaweed is not None:
            seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def run_workloads(args, mountpoint: str, plain: str, label: str, results: dict) -> None:
    for name in args.workloads.split(","):
        report = bench(mountpoint, plain, WORKLOADS[name], args.rounds)
        results[f"{label}/{name}"] = report
        print(f"\n== {label} {name}: shufflefs bench {' '.join(WORKLOADS[name])}")
        for phase, ratio in report["ratios"].items():
            dir_phase = report["targets"]["dir"]["phases"][phase]
            plain_phase = report["targets"]["plain"]["phases"][phase]
            print(
                f"{phase:7} ratio {ratio:5.2f}  shufflefs {dir_phase['mb_per_s']:8.1f} MB/s "
                f"{dir_phase['files_per_s']:8.0f} files/s  plain {plain_phase['mb_per_s']:8.1f} MB/s "
                f"{plain_phase['files_per_s']:8.0f} files/s  daemon CPU {dir_phase['daemon_cpu_seconds']}s "
                f"FUSE requests {dir_phase['fuse_requests']}  store {dir_phase['store']}",
                flush=True,
            )
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
