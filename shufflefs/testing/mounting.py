"""Real mounts for tests: `shufflefs mount` in a subprocess, always torn down.

Teardown never leaves a mount or a daemon behind: `shufflefs umount` first (the real path),
then whatever is left is lazily unmounted (`fusermount3 -u -z`) and the daemon killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from shufflefs.fuse.mount import unescape
from shufflefs.places import process_alive as pid_alive
from shufflefs.places import run_file
from shufflefs.registry import RESERVED

SHUFFLEFS = [sys.executable, "-m", "shufflefs"]


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(unescape(line.split()[1]) == path for line in mounts)


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHUFFLEFS, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


class Mount:
    def __init__(self, store_url: str, mountpoint: str, cache_dir: str, *args: str, env: dict | None = None):
        self.store_url = store_url
        self.path = str(mountpoint)
        self.cache_dir = str(cache_dir)
        self.args = list(args)
        if "--fuse" not in self.args and os.environ.get("SHUFFLEFS_TEST_FUSE"):
            self.args += ["--fuse", os.environ["SHUFFLEFS_TEST_FUSE"]]  # .ci/run runs the mount suite on each
        self.env = {**os.environ, **(env or {})}
        self.pid: int | None = None
        os.makedirs(self.path, exist_ok=True)

    def start(self) -> Mount:
        result = run_cli("mount", self.store_url, self.path, "--cache-dir", self.cache_dir, *self.args, env=self.env)
        assert result.returncode == 0, f"mount failed: {result.stderr}\nlog:\n{self.log()}"
        assert is_mounted(self.path)
        with open(run_file(self.path, "json")) as f:
            self.pid = json.load(f)["pid"]
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.cache_dir, "shufflefs.log")) as f:
                return f.read()[-6000:]
        except FileNotFoundError:
            return "(no log)"

    def umount(self, timeout: float = 120) -> subprocess.CompletedProcess:
        result = run_cli("umount", self.path, env=self.env, timeout=timeout)
        self.wait_exit(timeout)
        return result

    def wait_exit(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.pid is not None and pid_alive(self.pid):
            assert time.monotonic() < deadline, f"daemon {self.pid} did not exit\n{self.log()}"
            time.sleep(0.05)

    def status(self) -> dict:
        with open(run_file(self.path, "status")) as f:
            return json.load(f)

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would, and clear the dead mount."""
        self.kill_only()
        subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)

    def kill_only(self) -> None:
        """SIGKILL the daemon and leave its dead mount behind (ENOTCONN), as a crash does."""
        os.kill(self.pid, signal.SIGKILL)
        self.wait_exit()

    def cleanup(self) -> None:
        if self.pid is not None and pid_alive(self.pid) and is_mounted(self.path):
            try:
                self.umount(timeout=60)
            except Exception:
                pass
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        if self.pid is not None and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            self.wait_exit()

    def __enter__(self) -> Mount:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, exc_type, *_) -> None:
        self.cleanup()
        if exc_type is None:
            self.check_log()

    def check_log(self) -> None:
        """A traceback in the daemon's log is a bug (the core answered some request with EIO
        for it, or a task died), whatever the test saw."""
        try:
            with open(os.path.join(self.cache_dir, "shufflefs.log")) as f:
                text = f.read()
        except FileNotFoundError:
            return
        at = text.find("Traceback (most recent call last)")
        assert at < 0, f"the daemon of {self.path} logged a traceback:\n{text[max(0, at - 600) : at + 3000]}"


#: shufflefs' own records in a store (registry, heartbeats): not files of any mount
RECORDS = RESERVED + "/"


def store_objects(root: str, records: bool = False) -> dict[str, bytes]:
    """Every object of a file:// store, by key (shufflefs' own records only with `records`)."""
    objects = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            key = os.path.relpath(path, root)
            if records or not key.startswith(RECORDS):
                with open(path, "rb") as f:
                    objects[key] = f.read()
    return objects


def bucket_objects(client, bucket: str, prefix: str = "", records: bool = False) -> dict[str, bytes]:
    """Every object under `prefix` in an S3 bucket, by key relative to the prefix (shufflefs'
    own records only with `records`)."""
    objects = {}
    start = prefix.strip("/") + "/" if prefix.strip("/") else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/") or (not records and item["Key"][len(start) :].startswith(RECORDS)):
                continue
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            objects[item["Key"][len(start) :]] = body
    return objects


def daos_objects(url: str) -> dict[str, bytes]:
    """Every file of a daos:// store, by key, walked through the store's own listing (not
    shufflefs' own records)."""
    from shufflefs.stores import open_store

    store = open_store(url)
    objects: dict[str, bytes] = {}
    try:
        store.check()
        pending = [""]
        while pending:
            prefix = pending.pop()
            listing = store.list_dir(prefix)
            pending.extend(f"{prefix}/{d}" if prefix else d for d in listing.dirs if prefix or d != RESERVED)
            for info in listing.files:
                key = f"{prefix}/{info.name}" if prefix else info.name
                objects[key] = store.get_range(key, 0, info.size)
    finally:
        store.close()
    return objects


def hadoop_copy(source: str, target: str, data: bytes | None = None) -> None:
    """copyFromLocalFile as Spark's FallbackStorage runs it: read the source, create the
    target (64 KiB writes: Spark's io.file.buffer.size)."""
    with open(source, "rb") as f:
        copied = f.read()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        payload = copied if data is None else data
        for start in range(0, len(payload), 64 * 1024):
            f.write(payload[start : start + 64 * 1024])
