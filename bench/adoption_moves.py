"""What an adoption costs today (docs/RECOVERY.md, "Adoption is metadata only"): Spark's recovery
plugin renames each data and index file of a dead executor's directory into its own, one after
the other, in its first map task; on shufflefs each rename of a committed file is a store move
(S3 CopyObject + DeleteObject; file:// a rename). Times those renames on an s3:// mount
(SeaweedFS), a file:// mount and a plain directory, for map outputs of a given size.

    cd / && /work/main/.venv/bin/python /work/main/bench/adoption_moves.py --outputs 100 --size-kib 64 1024 16384

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
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from mounting import Mount, run_cli  # noqa: E402
from servers import SeaweedS3  # noqa: E402

KiB = 1024


def write_dead_executors_outputs(root: str, outputs: int, size: int) -> str:
    """A block manager directory with `outputs` committed map outputs (data, index) as Spark
    commits them (a temporary name, then a rename); returns its path."""
    directory = os.path.join(root, "blockmgr-10000000-0000-4000-8000-000000000000", "0c")
    os.makedirs(directory)
    data = os.urandom(size)
    for map_id in range(outputs):
        for name, body in ((f"shuffle_0_{map_id}_0.data", data), (f"shuffle_0_{map_id}_0.index", bytes(8 * 2))):
            with open(os.path.join(directory, name + ".tmp"), "wb") as f:
                f.write(body)
            os.rename(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
    return directory


def adopt(source: str, target_root: str) -> list[float]:
    """The plugin's moves: every file of `source` renamed into the adopter's directory, one
    after the other; the seconds of each."""
    target = os.path.join(target_root, "blockmgr-20000000-0000-4000-8000-000000000000", "0c")
    os.makedirs(target)
    times = []
    for name in sorted(os.listdir(source)):
        started = time.perf_counter()
        os.rename(os.path.join(source, name), os.path.join(target, name))
        times.append(time.perf_counter() - started)
    return times


def measure(root: str, outputs: int, size: int) -> dict:
    source = write_dead_executors_outputs(os.path.join(root, f"dead-{size}"), outputs, size)
    times = adopt(source, os.path.join(root, f"adopter-{size}"))
    return {"renames": len(times), "total_s": round(sum(times), 4),
            "median_ms": round(statistics.median(times) * 1000, 3), "max_ms": round(max(times) * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", type=int, default=100, help="map outputs of the dead executor (default 100)")
    parser.add_argument("--size-kib", type=int, nargs="+", default=[64, 1024, 16384],
                        help="sizes of a data file to try, KiB (default 64 1024 16384)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="shufflefs-adoption-", dir="/var/tmp")
    results: dict = {}
    try:
        os.makedirs(f"{base}/plain")
        os.makedirs(f"{base}/store")
        with SeaweedS3() as seaweed:
            bucket = seaweed.create_bucket("adoption")
            env = {**os.environ, **seaweed.env()}
            with Mount(f"file://{base}/store", f"{base}/file-mnt", f"{base}/file-cache") as file_mount, \
                    Mount(f"s3://{bucket}/shuffle", f"{base}/s3-mnt", f"{base}/s3-cache", env=env) as s3_mount:
                for size_kib in args.size_kib:
                    for system, root in (("plain", f"{base}/plain"), ("file://", file_mount.path),
                                         ("s3://", s3_mount.path)):
                        results.setdefault(f"{size_kib} KiB", {})[system] = measure(root, args.outputs, size_kib * KiB)
                stats = json.loads(run_cli("stats", s3_mount.path, "--sync").stdout)["store"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["s3_store_requests"] = {k: v for k, v in stats.items() if k.endswith("_requests") or k.endswith("_bytes")}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
