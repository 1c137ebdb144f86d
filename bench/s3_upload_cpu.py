"""CPU per uploaded byte on s3://: how many bytes the S3 store uploads per CPU-second of the
client (the daemon's side: boto3's signing, checksums, HTTP) and of the server (SeaweedFS, which
shares this machine's cores with Spark in the benchmarks), with botocore's request checksums
on (`AWS_REQUEST_CHECKSUM_CALCULATION=when_supported`, what shufflefs uses) and off
(`when_required`).

    cd / && /work/main/.venv/bin/python /work/main/bench/s3_upload_cpu.py \
        --out /work/main/bench/results/s3-upload-cpu.json

Each variant runs in its own process (botocore reads the setting once) against one SeaweedFS,
uploading the same files; variants alternate, medians of --rounds. Not a test: run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
from shufflefs.testing.servers import SeaweedS3  # noqa: E402

VARIANTS = {"checksums on (shufflefs)": "when_supported", "checksums off": "when_required"}
MiB = 1024 * 1024


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def upload(endpoint: str, bucket: str, paths: list[str]) -> None:
    """(child process) Upload every file once with S3Store.put_file; print CPU seconds used."""
    from shufflefs.stores import open_store

    store = open_store(f"s3://{bucket}/cpu", s3_endpoint_url=endpoint)
    started = resource.getrusage(resource.RUSAGE_SELF)
    for path in paths:
        store.put_file(f"{uuid.uuid4().hex}/{os.path.basename(path)}", path)
    ended = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_seconds": ended.ru_utime + ended.ru_stime - started.ru_utime - started.ru_stime}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--file-size", type=int, default=32, help="MiB per file (default 32: multipart)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        upload(args.child[0], args.child[1], args.child[2:])
        return 0
    work = tempfile.mkdtemp(prefix="s3-upload-cpu-", dir="/var/tmp")
    paths = []
    for index in range(args.files):
        path = os.path.join(work, f"shuffle_0_{index}_0.data")
        with open(path, "wb") as f:
            f.write(os.urandom(args.file_size * MiB))
        paths.append(path)
    total = args.files * args.file_size * MiB
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with SeaweedS3() as seaweed:
        bucket = seaweed.create_bucket("cpu-" + uuid.uuid4().hex[:8])
        for _ in range(args.rounds):
            for name, setting in VARIANTS.items():
                env = {**os.environ, **seaweed.env(), "AWS_REQUEST_CHECKSUM_CALCULATION": setting}
                server_before = process_cpu(seaweed.process.pid)
                started = time.perf_counter()
                child = subprocess.run(
                    [sys.executable, __file__, "--out", args.out, "--child", seaweed.endpoint_url, bucket, *paths],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds = time.perf_counter() - started
                client = json.loads(child.stdout)["cpu_seconds"]
                server = process_cpu(seaweed.process.pid) - server_before
                results[name].append({"seconds": seconds, "client_cpu": client, "server_cpu": server})
                print(
                    f"{name:26} {total / MiB / seconds:7.0f} MiB/s  client {total / MiB / client:6.0f} MiB per "
                    f"CPU-s  server {total / MiB / server:6.0f} MiB per CPU-s",
                    flush=True,
                )
    for path in paths:
        os.unlink(path)
    os.rmdir(work)
    summary = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in results.items()
    }
    for median in summary.values():
        median["client_mib_per_cpu_second"] = round(total / MiB / median["client_cpu"])
        median["server_mib_per_cpu_second"] = round(total / MiB / median["server_cpu"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"bytes": total, "runs": results, "medians": summary}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
