"""The local side of a decommission's fallback copy (docs/RECOVERY.md): a committed map output
read and written again under the same name in another directory, as Hadoop's
copyFromLocalFile does for Spark's FallbackStorage (64 KiB writes), on a file:// mount and on a
plain directory; seconds per GB, the daemon's CPU and requests, and what the store received.

    cd / && /work/main/.venv/bin/python /work/main/bench/fallback_copy.py --size 512 --rounds 3

Not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.mounting import (  # noqa: E402
    Mount,
    hadoop_copy,  # noqa: E402
    run_cli,
)

MiB = 1024 * 1024


def one_copy(directory: str, data: bytes, round_: int) -> float:
    source = f"{directory}/blockmgr-{round_}/0c/shuffle_0_{round_}_0.data"
    os.makedirs(os.path.dirname(source))
    with open(source + ".tmp", "wb") as f:
        f.write(data)
    os.rename(source + ".tmp", source)
    started = time.perf_counter()
    hadoop_copy(source, f"{directory}/fallback/app/0/{round_}/shuffle_0_{round_}_0.data")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="MiB per map output (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = os.urandom(args.size * MiB)
    base = tempfile.mkdtemp(prefix="shufflefs-fallback-copy-", dir="/var/tmp")
    times: dict[str, list[float]] = {"plain": [], "shufflefs": []}
    try:
        plain = os.path.join(base, "plain")
        os.makedirs(plain)
        os.makedirs(f"{base}/store")
        with Mount(f"file://{base}/store", f"{base}/mnt", f"{base}/cache") as mount:
            before = json.loads(run_cli("stats", mount.path).stdout)
            for round_ in range(args.rounds):
                times["plain"].append(one_copy(plain, data, round_))
                times["shufflefs"].append(one_copy(mount.path, data, round_))
            after = json.loads(run_cli("stats", mount.path, "--sync").stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    gb = args.size * MiB / 1e9
    requests = {
        k: v - before["fuse"]["requests"].get(k, 0)
        for k, v in after["fuse"]["requests"].items()
        if v != before["fuse"]["requests"].get(k, 0)
    }
    print(
        json.dumps(
            {
                "seconds_per_gb": {k: round(statistics.median(v) / gb, 2) for k, v in times.items()},
                "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
                "daemon_cpu_s": round(after["cpu_seconds"] - before["cpu_seconds"], 2),
                "requests": requests,
                "store": {
                    k: after["store"].get(k, 0) - before["store"].get(k, 0)
                    for k in ("put_bytes", "put_requests", "copy_requests", "copied_bytes")
                },
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
