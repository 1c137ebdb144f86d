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
requests and FUSE session (own / pyfuse3, passthrough or not, request counts), and for S3 systems the bucket's objects at the end of the jobs.

Writes OUT/results.json (all runs, the summary, the reference results) after every run, and
at the end OUT/spark_bench.png (matplotlib, from the `bench` extra). Not a test: run it on an
otherwise idle machine. Needs root (FUSE mounts), like the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from mounting import Mount, is_mounted  # noqa: E402
from servers import SeaweedS3  # noqa: E402
from sparkrun import LAST_RUN, run_spark_job, shuffle_files  # noqa: E402

from shufflefs.places import run_file  # noqa: E402

WORKLOAD_SCRIPT = os.path.join(HERE, "spark_workloads.py")
WORKLOADS = ["shuffle-heavy", "mixed", "defaults"]
CONFIGS = ["plain", "shufflefs-file", "shufflefs-s3", "s3fs", "rclone"]  # the default --configs
# shufflefs configs by name: (store, FUSE session options on top of SHUFFLEFS_OPTIONS).
# The plain names are shufflefs's default session (--fuse own).
SHUFFLEFS_CONFIGS = {
    "shufflefs-file": ("file", []),
    "shufflefs-s3": ("s3", []),
    "shufflefs-file-pyfuse3": ("file", ["--fuse", "pyfuse3"]),
    "shufflefs-s3-pyfuse3": ("s3", ["--fuse", "pyfuse3"]),
}
ALL_CONFIGS = CONFIGS + [name for name in SHUFFLEFS_CONFIGS if name not in CONFIGS]

SHUFFLEFS_OPTIONS = ["--commit", "async"]
# s3fs 1.90 options (on top of url, use_path_request_style, passwd_file, endpoint):
#   use_cache=DIR          keep written files on local disk: Spark's many reads of .index/.data
#                          files are served from there instead of ranged GETs
#   enable_noobj_cache     cache "no such object": Spark makes thousands of existence checks
#   notsup_compat_dir      only "dir/" objects are directories: fewer requests per lookup
#   parallel_count=8       parallel parts for multipart uploads of big .data files (default 5)
# The stat cache defaults (max_stat_cache_size=100000 entries, stat_cache_expire=900 s) are
# already larger than one run needs.
S3FS_OPTIONS = ["enable_noobj_cache", "notsup_compat_dir", "parallel_count=8"]  # + use_cache=<run dir>
# rclone 1.60 options (on top of the remote from the environment and --config /dev/null):
#   --vfs-cache-mode writes  Spark appends to and renames open files, which needs the write cache
#   --no-modtime             no modification-time metadata updates (each one a copy request on S3)
#   --s3-no-check-bucket     the bucket exists: no check before each upload
RCLONE_OPTIONS = ["--vfs-cache-mode", "writes", "--no-modtime", "--s3-no-check-bucket"]

MIN_TIMEOUT = 600.0
TIMEOUT_FACTOR = 5.0
RSS_INTERVAL = 0.5


# ============================================================================ helpers

def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of `pid` in MiB, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    """Samples a process's VmHWM every RSS_INTERVAL s (its high-water mark, so the last sample
    before it exits is its peak; sampling just keeps that value once the process is gone)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        if pid is not None:
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(RSS_INTERVAL):
                return

    def sample(self) -> None:
        value = peak_rss_mib(self.pid) if self.pid is not None else None
        if value is not None:
            self.peak = max(self.peak or 0.0, value)

    def stop(self) -> float | None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        return self.peak


def tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def bucket_usage(seaweed: SeaweedS3, bucket: str) -> dict:
    client = seaweed.client()
    objects = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects += 1
            size += item["Size"]
    client.close()
    return {"objects": objects, "bytes": size}


def file_sizes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass  # deleted since the walk
    return total


def canonical_sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def command_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else None


# ============================================================================ systems

class System:
    """One way to provide Spark's local dir. Per run: start() -> local dir, the job runs,
    stop() unmounts and returns its measurements; cleanup() always runs afterwards and must
    leave no mount and no process behind (idempotent)."""

    name = ""
    needs_s3 = False

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def start(self, run_dir: str, seaweed: SeaweedS3 | None) -> str:
        raise NotImplementedError

    def pid(self) -> int | None:
        """The process whose peak RSS is reported."""
        return None

    def stop(self) -> dict:
        return {}

    def cleanup(self) -> None:
        pass


class PlainDir(System):
    name = "plain"

    def start(self, run_dir, seaweed):
        path = os.path.join(run_dir, "local")
        os.makedirs(path)
        return path


class Shufflefs(System):
    def __init__(self, name: str, store: str, options: list[str] = ()):
        """store: "file" or "s3"; options: mount options on top of SHUFFLEFS_OPTIONS."""
        self.name = name
        self.store = store
        self.options = list(options)
        self.needs_s3 = store == "s3"
        self.mount: Mount | None = None

    def start(self, run_dir, seaweed):
        env = None
        if self.store == "file":
            os.makedirs(os.path.join(run_dir, "store"))
            url = f"file://{run_dir}/store"
        else:
            url = f"s3://{seaweed.create_bucket('spark-bench')}/shuffle"
            env = seaweed.env()
        self.mount = Mount(url, os.path.join(run_dir, "mnt"), os.path.join(run_dir, "cache"),
                           *SHUFFLEFS_OPTIONS, *self.options, env=env)
        self.mount.start()
        return self.mount.path

    def pid(self):
        return self.mount.pid if self.mount else None

    def stop(self):
        started = time.monotonic()
        result = self.mount.umount(timeout=MIN_TIMEOUT)
        umount_s = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"shufflefs umount failed ({result.returncode}): {result.stderr.strip()}")
        status = self.mount.status()
        # fuse: the session that ran (own / pyfuse3), passthrough or not, its request counts
        return {"umount_s": round(umount_s, 3), "store": status.get("stats", {}), "fuse": status.get("fuse")}

    def cleanup(self):
        if self.mount is None:
            return
        self.mount.cleanup()
        for suffix in ("status", "json"):  # the daemon's run files in /run/shufflefs
            try:
                os.unlink(run_file(self.mount.path, suffix))
            except OSError:
                pass
        self.mount = None


class FusePeer(System):
    """A FUSE filesystem run in the foreground as our child, on a SeaweedFS bucket."""

    needs_s3 = True
    binary = ""
    package = ""
    mount_timeout = 30.0

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.mountpoint = ""
        self.log_path = ""

    def missing(self):
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found: install it with `apt-get install -y {self.package}`"
        return None

    def command(self, bucket: str, run_dir: str, seaweed: SeaweedS3) -> tuple[list[str], dict]:
        raise NotImplementedError

    def start(self, run_dir, seaweed):
        bucket = seaweed.create_bucket("spark-bench")
        self.mountpoint = os.path.join(run_dir, "mnt")
        os.makedirs(self.mountpoint)
        argv, env = self.command(bucket, run_dir, seaweed)
        self.log_path = os.path.join(run_dir, f"{self.name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before mounting:\n"
                                   f"{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount within {self.mount_timeout:.0f} s:\n"
                                   f"{tail(self.log_path)}")
            time.sleep(0.05)
        return self.mountpoint

    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        started = time.monotonic()
        self._unmount()
        try:
            self.proc.wait(MIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name} did not exit within {MIN_TIMEOUT:.0f} s of the unmount") from None
        return {"umount_s": round(time.monotonic() - started, 3), "exit_status": self.proc.returncode}

    def _unmount(self) -> None:
        if self.mountpoint and is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)

    def cleanup(self):
        self._unmount()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class S3fs(FusePeer):
    name = "s3fs"
    binary = package = "s3fs"

    def command(self, bucket, run_dir, seaweed):
        passwd = os.path.join(run_dir, "passwd-s3fs")
        with open(os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"{seaweed.access_key}:{seaweed.secret_key}\n")
        cache = os.path.join(run_dir, "s3fs-cache")
        os.makedirs(cache)
        options = [f"url={seaweed.endpoint_url}", "use_path_request_style", f"passwd_file={passwd}",
                   f"endpoint={seaweed.region}", f"use_cache={cache}", *S3FS_OPTIONS]
        argv = [self.binary, bucket, self.mountpoint, "-f"]
        for option in options:
            argv += ["-o", option]
        return argv, dict(os.environ)


class Rclone(FusePeer):
    name = "rclone"
    binary = package = "rclone"

    def command(self, bucket, run_dir, seaweed):
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)  # rclone fails while it is set
        env.update(RCLONE_CONFIG_LOC_TYPE="s3", RCLONE_CONFIG_LOC_PROVIDER="Other",
                   RCLONE_CONFIG_LOC_ENDPOINT=seaweed.endpoint_url,
                   RCLONE_CONFIG_LOC_ACCESS_KEY_ID=seaweed.access_key,
                   RCLONE_CONFIG_LOC_SECRET_ACCESS_KEY=seaweed.secret_key,
                   RCLONE_CONFIG_LOC_FORCE_PATH_STYLE="true", RCLONE_CONFIG_LOC_REGION=seaweed.region)
        argv = [self.binary, "mount", f"loc:{bucket}", self.mountpoint, "--config", "/dev/null",
                "--cache-dir", os.path.join(run_dir, "rclone-cache"), *RCLONE_OPTIONS]
        return argv, env


def make_system(name: str) -> System:
    if name in SHUFFLEFS_CONFIGS:
        return Shufflefs(name, *SHUFFLEFS_CONFIGS[name])
    return {"plain": PlainDir, "s3fs": S3fs, "rclone": Rclone}[name]()


# ============================================================================ one run

def failure_reason(error: BaseException) -> str:
    """One line: the first line of the error plus the line that names the cause, if any."""
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    reason = re.sub(r",? local_dir=\S+\)", ")", lines[0])  # run_spark_job's long path
    reason = re.sub(r"did not reach SPARK_JOBS_DONE within (\S+)s", r"timed out after \1 s", reason)
    for line in lines[1:]:  # e.g. "...SparkException: Job aborted due to stage failure: ... IOException: ..."
        if re.search(r"Exception:|Error:|error:", line) and "An error occurred while calling" not in line:
            reason += " | " + line.strip()
            break
    return reason[:500]


def spark_app_work_dir(stderr_path: str) -> str | None:
    """$SPARK_HOME/work/<app>: local-cluster executor logs, kept by Spark after a failure."""
    m = re.search(r"\bapp=(app-[\w-]+)", tail(stderr_path, 1 << 20))
    if not m:
        return None
    from pyspark.find_spark_home import _find_spark_home

    return os.path.join(os.environ.get("SPARK_HOME") or _find_spark_home(), "work", m.group(1))


def run_once(workload: str, system: System, round_number: int, args, base: str, timeout: float) -> dict:
    record = {"workload": workload, "config": system.name, "round": round_number, "status": "ok"}
    if not os.path.isdir(base):
        print(f"(work dir {base} vanished, recreated) ", end="", flush=True)
        os.makedirs(base)
    run_dir = tempfile.mkdtemp(dir=base, prefix=f"{workload}-{system.name}-r{round_number}-")
    result_path = os.path.join(run_dir, "result.json")
    seaweed = None
    sampler = RssSampler(None)
    try:
        if system.needs_s3:
            seaweed = SeaweedS3().start()
        local_dir = system.start(run_dir, seaweed)
        sampler = RssSampler(system.pid())
        at_pause: dict = {}

        def while_spark_runs() -> None:  # all jobs done, shuffle files still in place
            files = shuffle_files(local_dir)
            at_pause["shuffle_files"] = len(files)
            at_pause["shuffle_file_bytes"] = file_sizes(files)
            if seaweed is not None:
                at_pause["bucket"] = bucket_usage(seaweed, "spark-bench")

        output = run_spark_job(local_dir, result_path, pause_callback=while_spark_runs, timeout=timeout,
                               script=WORKLOAD_SCRIPT, master=args.master,
                               extra_args=["--workload", workload, "--scale", str(args.scale)])
        record.update(job_s=output["timings"]["jobs_s"], wall_s=round(LAST_RUN["wall_s"], 3),
                      steps=output["timings"], spark=output["metrics"], **at_pause)
        record["result"] = output["result"]
        record.update(system.stop())
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        record["status"] = f"failed: {failure_reason(e)}"
        record["error"] = f"{e}\n{traceback.format_exc()}"
        peer_log = getattr(system, "log_path", "")
        if peer_log:
            record["error"] += f"\n--- {system.name} log tail ---\n{tail(peer_log)}"
        if LAST_RUN.get("stderr_path", "").startswith(run_dir):
            record["error"] += f"\n--- Spark driver stderr tail ---\n{tail(LAST_RUN['stderr_path'], 20000)}"
    finally:
        # A failed or interrupted job leaves its executors' logs in $SPARK_HOME/work/<app>
        # (they are in the error above); a successful one has removed them already.
        if LAST_RUN.get("stderr_path", "").startswith(run_dir):
            work = spark_app_work_dir(LAST_RUN["stderr_path"])
            if work:
                shutil.rmtree(work, ignore_errors=True)
        try:
            system.cleanup()
        finally:
            record["peak_rss_mib"] = sampler.stop()
            if seaweed is not None:
                seaweed.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
            os.sync()  # the next run does not pay for this one's dirty pages
    return record


# ============================================================================ reporting

def ok_runs(runs: list[dict], workload: str, config: str) -> list[dict]:
    return [r for r in runs if r["workload"] == workload and r["config"] == config and r["status"] == "ok"]


def median_of(runs: list[dict], key) -> float | None:
    values = [v for v in (key(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], workloads: list[str], configs: list[str], skipped: dict) -> list[dict]:
    rows = []
    for workload in workloads:
        plain_runs = ok_runs(runs, workload, "plain")
        plain = median_of(plain_runs, lambda r: r["job_s"])
        for config in configs:
            mine = [r for r in runs if r["workload"] == workload and r["config"] == config]
            good = [r for r in mine if r["status"] == "ok"]
            job = median_of(good, lambda r: r["job_s"])
            rss = [r["peak_rss_mib"] for r in good if r.get("peak_rss_mib") is not None]
            rows.append({
                "workload": workload, "config": config,
                "runs": len(mine), "ok": len(good),
                "job_s_median": job,
                "ratio_to_plain": job / plain if job is not None and plain else None,
                "wall_s_median": median_of(good, lambda r: r.get("wall_s")),
                "umount_s_median": median_of(good, lambda r: r.get("umount_s")),
                "peak_rss_mib_max": max(rss) if rss else None,
                "shuffle_write_bytes_median": median_of(good, lambda r: r.get("spark", {}).get("shuffle_write_bytes")),
                "shuffle_file_bytes_median": median_of(good, lambda r: r.get("shuffle_file_bytes")),
                "store_put_requests_median": median_of(good, lambda r: r.get("store", {}).get("put_requests")),
                "store_put_bytes_median": median_of(good, lambda r: r.get("store", {}).get("put_bytes")),
                "store_delete_requests_median": median_of(good, lambda r: r.get("store", {}).get("delete_requests")),
                "store_deleted_keys_median": median_of(good, lambda r: r.get("store", {}).get("deleted_keys")),
                "store_failed_requests_max": max((r.get("store", {}).get("failed_requests", 0) for r in good), default=None),
                "bucket_objects_at_end_median": median_of(good, lambda r: r.get("bucket", {}).get("objects")),
                "bucket_bytes_at_end_median": median_of(good, lambda r: r.get("bucket", {}).get("bytes")),
                "failures": [r["status"] for r in mine if r["status"] != "ok"],
                "skipped": skipped.get(config),
            })
    return rows


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0))
    return format(value / scale, spec)


def print_summary(rows: list[dict]) -> None:
    header = (f"{'workload':14} {'config':22} {'runs':>5} {'job s':>7} {'ratio':>6} {'wall s':>7} "
              f"{'umount s':>8} {'RSS MiB':>8} {'shuffle GB':>10} {'files GB':>8}  store / bucket")
    print("\n" + header)
    print("-" * len(header))
    for row in rows:
        if row["skipped"] or row["runs"] == 0:
            print(f"{row['workload']:14} {row['config']:22} " + (f"skipped: {row['skipped']}" if row["skipped"] else "not run"))
            continue
        store = ""
        if row["store_put_requests_median"] is not None:
            store = (f"{row['store_put_requests_median']:.0f} PUT {fmt(row['store_put_bytes_median'], '.2f', 1e9)} GB, "
                     f"{fmt(row['store_delete_requests_median'], '.0f')} DELETE req "
                     f"({fmt(row['store_deleted_keys_median'], '.0f')} keys)")
            if row["store_failed_requests_max"]:
                store += f", {row['store_failed_requests_max']} failed"
        if row["bucket_objects_at_end_median"] is not None:
            store += ("; " if store else "") + (f"bucket at end of jobs: {row['bucket_objects_at_end_median']:.0f} obj "
                                                f"{fmt(row['bucket_bytes_at_end_median'], '.2f', 1e9)} GB")
        print(f"{row['workload']:14} {row['config']:22} {row['ok']:>2}/{row['runs']:<2} "
              f"{fmt(row['job_s_median'], '7.1f')} {fmt(row['ratio_to_plain'], '6.2f')} "
              f"{fmt(row['wall_s_median'], '7.1f')} {fmt(row['umount_s_median'], '8.1f')} "
              f"{fmt(row['peak_rss_mib_max'], '8.0f')} {fmt(row['shuffle_write_bytes_median'], '10.2f', 1e9)} "
              f"{fmt(row['shuffle_file_bytes_median'], '8.2f', 1e9)}  {store}")
        for failure in sorted(set(row["failures"])):
            print(f"{'':38} {row['failures'].count(failure)}x {failure}")
    print("job s: median job time (first Spark action to last); ratio: to plain's median; wall s: driver start "
          "to exit of all Spark processes;\nRSS: peak of the filesystem process; shuffle GB: Spark's shuffle write "
          "bytes; files GB: committed shuffle files at the end of the jobs")


def plot(runs: list[dict], rows: list[dict], workloads: list[str], configs: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(workloads), figsize=(max(7.0, 5.5 * len(workloads)), 5.0), squeeze=False)
    by_key = {(r["workload"], r["config"]): r for r in rows}
    for ax, workload in zip(axes[0], workloads):
        medians = [by_key[(workload, c)]["job_s_median"] for c in configs]
        top = max([m for m in medians if m is not None] + [1.0])
        bars = ax.bar(range(len(configs)), [m or 0 for m in medians], color="#9ecae1", edgecolor="#3182bd", zorder=2)
        for i, config in enumerate(configs):
            times = [r["job_s"] for r in ok_runs(runs, workload, config)]
            if times:
                jitter = [(j - (len(times) - 1) / 2) * 0.08 for j in range(len(times))]
                ax.scatter([i + dx for dx in jitter], times, color="#08519c", s=14, zorder=3)
            row = by_key[(workload, config)]
            if row["skipped"]:
                label = "skipped"
            elif row["runs"] == 0:
                label = "not run"
            elif row["job_s_median"] is None:
                label = "failed"
            else:
                label = f"{row['job_s_median']:.1f} s"
                if row["ratio_to_plain"] is not None and config != "plain":
                    label += f"\n×{row['ratio_to_plain']:.2f}"
                if row["failures"]:
                    label += f"\n{len(row['failures'])} failed"
            ax.annotate(label, (i, medians[i] or 0), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
            if row["job_s_median"] is None:
                bars[i].set_hatch("//")
        plain = by_key.get((workload, "plain"), {}).get("job_s_median")
        if plain:
            ax.axhline(plain, color="#de2d26", linestyle="--", linewidth=1, zorder=1, label=f"plain dir {plain:.1f} s")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(workload)
        ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right", fontsize=9)
        ax.set_ylabel("job time, s (bar: median, dots: runs)")
        ax.set_ylim(0, top * 1.3)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main

def environment_info(args) -> dict:
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "shufflefs"],
                           capture_output=True, text=True).stdout.strip()
    import pyspark

    return {
        "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "git_commit": commit + ("+dirty" if dirty else ""), "pyspark": pyspark.__version__,
        "java": command_version(["java", "-version"]), "s3fs": command_version(["s3fs", "--version"]),
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every workload on every system (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"default {','.join(CONFIGS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="data size multiplier (default 1; 0.05 for a quick check)")
    parser.add_argument("--out", required=True, help="directory for results.json, spark_bench.png, failures/")
    parser.add_argument("--timeout", type=float,
                        help=f"seconds per run (default: max({MIN_TIMEOUT:.0f}, {TIMEOUT_FACTOR:.0f} x the plain median))")
    parser.add_argument("--master", default="local-cluster[2,1,1024]", help="Spark master (default %(default)s)")
    parser.add_argument("--work-dir", default="/var/tmp",
                        help="where each run's local dir, mounts, caches and stores live (default %(default)s)")
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
                        print(f"job {record['job_s']:6.1f} s  wall {record['wall_s']:6.1f} s"
                              + (f"  umount {record['umount_s']:5.1f} s" if "umount_s" in record else "")
                              + (f"  RSS {record['peak_rss_mib']:.0f} MiB" if record.get("peak_rss_mib") else ""),
                              flush=True)
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
        title = (f"Spark job time with the local dir on each system\n{args.master}, scale {args.scale:g}, "
                 f"{max(r['round'] for r in runs)} round(s), {meta['cpus']} CPUs, {meta['started']}")
        try:
            plot(runs, rows, workloads, configs, png, title)
            print(f"plot: {png}")
        except ImportError:
            print("no plot: matplotlib missing (pip install -e '.[bench]')")
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
