"""What the conditional writes of issue 10 cost: `shufflefs bench` on s3:// mounts of the code
before them (a git revision checked out in a scratch worktree) and of this tree, runs
alternating, medians, against one SeaweedFS.

    .venv/bin/python bench/conditional_writes.py --before bbd555a --rounds 3

Workloads: `small-files` (2,000 map outputs x 8 partitions x 1 KiB, write only: map outputs
committed per second, where a per-request cost shows most) and `default` (200 x 100 x 32 KiB).
Not a test: run it on an otherwise idle machine.
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
ROOT = os.path.dirname(HERE)
from shufflefs.testing.mounting import Mount  # noqa: E402
from shufflefs.testing.servers import SeaweedS3  # noqa: E402

WORKLOADS = {
    "small-files": ["--mappers", "2000", "--reducers", "8", "--block-size", "1K", "--write-only"],
    "default": [],
}


def run_once(tree: str, server: SeaweedS3, scratch: str, workload: list[str]) -> dict:
    env = {**server.env(), "PYTHONPATH": tree}
    bucket = server.create_bucket("b" + uuid.uuid4().hex[:12])
    name = uuid.uuid4().hex[:8]
    mount = Mount(
        f"s3://{bucket}",
        os.path.join(scratch, f"mnt-{name}"),
        os.path.join(scratch, f"cache-{name}"),
        "--commit",
        "async",
        "--s3-endpoint-url",
        server.endpoint_url,
        env=env,
    )
    with mount:
        result = subprocess.run(
            [sys.executable, "-m", "shufflefs", "bench", mount.path, "--json", *workload],
            env=mount.env,
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        assert mount.umount().returncode == 0
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="cond-bench-")
    before = os.path.join(scratch, "before")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", before, args.before], check=True)
    try:
        with SeaweedS3() as server:
            for workload, flags in WORKLOADS.items():
                runs = {"before": [], "after": []}
                for _ in range(args.rounds):
                    for label, tree in (("before", before), ("after", ROOT)):
                        runs[label].append(run_once(tree, server, scratch, flags))
                print(f"## {workload}")
                for label, results in runs.items():
                    for phase in results[0]["targets"]["dir"]["phases"]:
                        measured = [r["targets"]["dir"]["phases"][phase] for r in results]
                        median = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]
                        each = ", ".join(f"{m['seconds']:.2f}" for m in measured)
                        print(
                            f"{label:6} {phase:6} {median['seconds']:6.2f} s (runs {each})  "
                            f"files/s {median['files_per_s']:6.0f}  "
                            f"until stored {median['stored_seconds'] or 0:5.2f} s  "
                            f"daemon CPU {median['daemon_cpu_seconds'] or 0:5.2f} s  store {median['store']}"
                        )
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
