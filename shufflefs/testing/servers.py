"""Real S3 servers for tests: SeaweedFS (`weed mini`) and moto's server, as context managers.

Plain code, no pytest fixtures: test files build their own fixtures on top, e.g.

    with SeaweedS3() as s3:
        s3.create_bucket("data")
        store = open_store("s3://data/pfx", s3_endpoint_url=s3.endpoint_url)  # with s3.env() applied

Both servers run with SigV4 authentication and fixed test credentials; `env()` gives the
environment a subprocess (or `os.environ`) needs to talk to them. A server that fails to start
is killed and its temporary directory removed before the error propagates, so nothing is left
behind.

SeaweedFS facts (measured on the 2-core test machine, see /work/shared/TEST_SERVERS.md):
`weed mini` answers ListBuckets about 0.8-1 s after it is started (`SeaweedS3.startup_seconds`
records it for each instance) and needs 2-3 s to stop after SIGTERM. It also listens on
port+10000 of every port for gRPC (hence `free_port`), and by default drops unix sockets and
glog files into /tmp: we log to stderr (captured in DATA/server.log), put the S3 and filer
sockets in the data directory, and remove the gRPC sockets, whose /tmp paths are fixed, after
it stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import boto3
import botocore.config

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()

GRPC_OFFSET = 10000


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 whose port+10000 (SeaweedFS's gRPC port) is free too. Ports
    handed out before by this process (and their +10000 partners) are never handed out again, so
    the several ports of one server cannot collide with each other."""
    with _ports_lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            partner = port + GRPC_OFFSET
            if partner > 65535:
                continue
            taken = {port, partner, port - GRPC_OFFSET, partner + GRPC_OFFSET} & _ports_handed_out
            if taken or not _can_bind(partner):
                continue
            _ports_handed_out.update((port, partner))
            return port
    raise RuntimeError("could not find a free port pair (port, port+10000) on 127.0.0.1")


def _venv_binary(name: str) -> str:
    """The console script `name` installed next to this Python, else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class _S3Server:
    """Common part: a server process, its log, credentials, a readiness poll and a clean stop."""

    name = "S3 server"
    access_key = "shufflefs-test"
    secret_key = "shufflefs-test-secret"
    region = "us-east-1"
    startup_timeout = 60.0
    stop_timeout = 20.0

    def __init__(self):
        self.port = 0
        self.endpoint_url = ""
        self.data_dir = ""
        self.log_path = ""
        self.process: subprocess.Popen | None = None
        self._log_file = None
        #: seconds from starting the process until it answered ListBuckets
        self.startup_seconds: float | None = None

    # -- to implement ---------------------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _process_env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- public ---------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment variables for a client (subprocess or os.environ) of this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, **config):
        """A boto3 S3 client for this server (path-style, no retries unless `config` says so)."""
        options = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 60,
        }
        options.update(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(**options),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> _S3Server:
        self.data_dir = tempfile.mkdtemp(prefix=f"shufflefs-{self.name.split()[0].lower()}-")
        try:
            self.port = free_port()
            self.endpoint_url = f"http://127.0.0.1:{self.port}"
            self.log_path = os.path.join(self.data_dir, "server.log")
            self._log_file = open(self.log_path, "ab")
            started = time.monotonic()
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=self._process_env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, started: float) -> None:
        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = started + self.startup_timeout
        last_error: Exception | None = None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode} while starting; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            try:
                client.list_buckets()
                break
            except Exception as exc:  # not up yet
                last_error = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not answer ListBuckets within {self.startup_timeout:.0f} s "
                    f"(last error: {last_error}); log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)
        client.close()
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL; always remove the data directory."""
        try:
            process, self.process = self.process, None
            if process is not None and process.poll() is None:
                self._signal(process, signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._signal(process, signal.SIGKILL)
                    process.wait()
            elif process is not None:
                process.wait()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self.data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    @staticmethod
    def _signal(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)  # its own group: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        return False


class SeaweedS3(_S3Server):
    """`weed mini` (master, volume, filer and S3 gateway in one process) with SigV4 auth on."""

    name = "SeaweedFS"

    def __init__(self):
        super().__init__()
        self.binary = _venv_binary("weed")

    def _command(self) -> list[str]:
        ports = {"s3.port": self.port}
        for name in ("master.port", "volume.port", "filer.port", "admin.port"):
            ports[name] = free_port()
        self.ports = ports
        # global options (-logtostderr: no glog files in /tmp) must come before the command name
        return [
            self.binary,
            "-logtostderr",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={os.path.join(self.data_dir, 's3.sock')}",
            f"-filer.localSocket={os.path.join(self.data_dir, 'filer.sock')}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            # the gRPC unix sockets have fixed paths /tmp/seaweedfs-<server>-grpc-<port>.sock that
            # weed does not always remove; they carry our (unique) ports, so they are ours
            for name, port in getattr(self, "ports", {}).items():
                server = name.split(".")[0]
                for path in (
                    f"/tmp/seaweedfs-{server}-grpc-{port + GRPC_OFFSET}.sock",
                    f"/tmp/seaweedfs-{server}-{port}.sock",
                ):
                    try:
                        if stat.S_ISSOCK(os.lstat(path).st_mode):
                            os.unlink(path)
                    except OSError:
                        pass

    def _process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            env.pop(name, None)
        # credentials in the environment turn on SigV4 auth with this one identity
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key, TMPDIR=self.data_dir
        )  # its unix sockets and any log files go in the data dir
        return env


class MotoS3(_S3Server):
    """moto's S3 emulation (`moto_server`): quick to start, in memory; for functional tests only
    (ranged GETs cost O(object size)). moto accepts any credentials."""

    name = "moto"

    def __init__(self):
        super().__init__()
        self.binary = _venv_binary("moto_server")

    def _command(self) -> list[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def _process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            TMPDIR=self.data_dir,
        )
        env.pop("AWS_ENDPOINT_URL", None)
        return env
