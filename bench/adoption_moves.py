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
import subprocess
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.mounting import Mount, run_cli  # noqa: E402
from shufflefs.testing.servers import SeaweedS3  # noqa: E402

KiB = 1024


APP = "app-20261207000000-0000"
#: runs as a Spark executor would, as far as shufflefs can tell (its command line names its
#: application and itself: shufflefs.callers)
AS_EXECUTOR = [sys.executable, "-c"]
MAKE_BLOCK_MANAGER = "import os, sys; os.makedirs(os.path.join(sys.argv[1], '0c'))"
ADOPT = """
import json, os, sys, time
parent, dead, own = sys.argv[1:4]
os.makedirs(os.path.join(parent, own, '0c'))
assert dead in os.listdir(parent), 'not adopted'  # the plugin's scan: the dead one is adopted
times = []
for name in sorted(os.listdir(os.path.join(parent, dead, '0c'))):
    if '.checksum.' in name:
        continue
    started = time.perf_counter()
    os.rename(os.path.join(parent, dead, '0c', name), os.path.join(parent, own, '0c', name))
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def as_executor(code: str, executor_id: int, *args: str) -> str:
    return subprocess.run(
        [*AS_EXECUTOR, code, *args, "--executor-id", str(executor_id), "--app-id", APP],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout


def measure(root: str, outputs: int, size: int) -> dict:
    """A dead executor's block manager directory with `outputs` committed map outputs (data,
    index, checksum, committed as Spark does: a temporary name, then a rename); another
    executor lists it (adopts it) and renames its data and index files into its own, one
    after the other, as Spark's recovery plugin does."""
    parent = os.path.join(root, f"spark-{uuid.uuid4()}", "executor-1")
    dead, own = (f"blockmgr-{uuid.uuid4()}" for _ in range(2))
    as_executor(MAKE_BLOCK_MANAGER, 1, os.path.join(parent, dead))
    data = os.urandom(size)
    for map_id in range(outputs):
        for suffix, body in (("data", data), ("index", bytes(16)), ("checksum.ADLER32", bytes(4))):
            path = os.path.join(parent, dead, "0c", f"shuffle_0_{map_id}_0.{suffix}")
            with open(path + ".tmp", "wb") as f:
                f.write(body)
            os.rename(path + ".tmp", path)
    times = json.loads(as_executor(ADOPT, 2, parent, dead, own))
    return {
        "renames": len(times),
        "total_s": round(sum(times), 4),
        "median_ms": round(statistics.median(times) * 1000, 3),
        "max_ms": round(max(times) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", type=int, default=100, help="map outputs of the dead executor (default 100)")
    parser.add_argument(
        "--size-kib",
        type=int,
        nargs="+",
        default=[64, 1024, 16384],
        help="sizes of a data file to try, KiB (default 64 1024 16384)",
    )
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="shufflefs-adoption-", dir="/var/tmp")
    results: dict = {}
    try:
        os.makedirs(f"{base}/plain")
        os.makedirs(f"{base}/store")
        with SeaweedS3() as seaweed:
            bucket = seaweed.create_bucket("adoption")
            env = {**os.environ, **seaweed.env()}
            with (
                Mount(f"file://{base}/store", f"{base}/file-mnt", f"{base}/file-cache") as file_mount,
                Mount(f"s3://{bucket}/shuffle", f"{base}/s3-mnt", f"{base}/s3-cache", env=env) as s3_mount,
            ):
                for size_kib in args.size_kib:
                    for system, root in (
                        ("plain", f"{base}/plain"),
                        ("file://", file_mount.path),
                        ("s3://", s3_mount.path),
                    ):
                        results.setdefault(f"{size_kib} KiB", {})[system] = measure(root, args.outputs, size_kib * KiB)
                stats = json.loads(run_cli("stats", s3_mount.path, "--sync").stdout)["store"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["s3_store_requests"] = {k: v for k, v in stats.items() if k.endswith("_requests") or k.endswith("_bytes")}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
