"""The systems bench/spark_bench.py puts Spark's local dir on (a plain directory, shufflefs on
file:// and s3://, s3fs, rclone), their options, and what is measured of them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time

from shufflefs.places import run_file
from shufflefs.testing.mounting import Mount, is_mounted
from shufflefs.testing.servers import SeaweedS3

HERE = os.path.dirname(os.path.abspath(__file__))

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
        self.mount = Mount(
            url,
            os.path.join(run_dir, "mnt"),
            os.path.join(run_dir, "cache"),
            *SHUFFLEFS_OPTIONS,
            *self.options,
            env=env,
        )
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
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} before mounting:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not mount within {self.mount_timeout:.0f} s:\n{tail(self.log_path)}"
                )
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
        options = [
            f"url={seaweed.endpoint_url}",
            "use_path_request_style",
            f"passwd_file={passwd}",
            f"endpoint={seaweed.region}",
            f"use_cache={cache}",
            *S3FS_OPTIONS,
        ]
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
        env.update(
            RCLONE_CONFIG_LOC_TYPE="s3",
            RCLONE_CONFIG_LOC_PROVIDER="Other",
            RCLONE_CONFIG_LOC_ENDPOINT=seaweed.endpoint_url,
            RCLONE_CONFIG_LOC_ACCESS_KEY_ID=seaweed.access_key,
            RCLONE_CONFIG_LOC_SECRET_ACCESS_KEY=seaweed.secret_key,
            RCLONE_CONFIG_LOC_FORCE_PATH_STYLE="true",
            RCLONE_CONFIG_LOC_REGION=seaweed.region,
        )
        argv = [
            self.binary,
            "mount",
            f"loc:{bucket}",
            self.mountpoint,
            "--config",
            "/dev/null",
            "--cache-dir",
            os.path.join(run_dir, "rclone-cache"),
            *RCLONE_OPTIONS,
        ]
        return argv, env


def make_system(name: str) -> System:
    if name in SHUFFLEFS_CONFIGS:
        return Shufflefs(name, *SHUFFLEFS_CONFIGS[name])
    return {"plain": PlainDir, "s3fs": S3fs, "rclone": Rclone}[name]()
