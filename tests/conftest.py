"""Shared fixtures: one SeaweedFS server per test session, mounts that always clean up."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import trio

#: the pydaos stand-in; a real pydaos is used instead when SHUFFLEFS_DAOS_POOL names a real pool
FAKE_PYDAOS = os.path.join(os.path.dirname(__file__), "fake_pydaos")
REAL_DAOS_POOL = os.environ.get("SHUFFLEFS_DAOS_POOL")
if not REAL_DAOS_POOL:
    sys.path.insert(0, FAKE_PYDAOS)

from shufflefs.fuse.mount import unescape  # noqa: E402
from shufflefs.testing.corefs import Env, invariant_problems  # noqa: E402
from shufflefs.testing.logcheck import fail_on_logged_errors, pytest_configure  # noqa: E402,F401 (an autouse fixture, its marker)
from shufflefs.testing.mounting import Mount  # noqa: E402
from shufflefs.testing.servers import SeaweedS3  # noqa: E402


@pytest.fixture
async def env(tmp_path):
    """Filesystem cores as the daemon builds them, one per simulated node (shufflefs.testing.corefs)."""
    async with trio.open_nursery() as nursery:
        environment = Env(tmp_path, nursery)
        try:
            yield environment
            problems = [
                f"{mount.cache_dir}: {problem}"
                for mount in environment.mounts
                if not mount.closed
                for problem in invariant_problems(mount.fs)
            ]
            assert not problems, "the core's bookkeeping is inconsistent after the test:\n" + "\n".join(problems)
        finally:
            environment.release()
            nursery.cancel_scope.cancel()
    environment.close()


@pytest.fixture(scope="session")
def seaweed():
    with SeaweedS3() as server:
        print(f"SeaweedFS answered after {server.startup_seconds:.2f} s")
        yield server


@pytest.fixture
def s3_env(seaweed, monkeypatch, tmp_path):
    """Environment of a shufflefs daemon talking to the test server, nothing from the host."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = seaweed.env()
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-config")
    return env


@pytest.fixture
def bucket(seaweed):
    return seaweed.create_bucket("t-" + uuid.uuid4().hex[:12])


@pytest.fixture
def file_store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def file_mount(tmp_path, file_store):
    """A live mount of a file:// store (sync commit)."""
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache") as mount:
        mount.store_root = str(file_store)
        yield mount


class DaosTarget:
    """Where daos:// tests run: a container of the stand-in, or of a real DAOS system."""

    def __init__(self, pool: str, container: str, env: dict, fake=None):
        self.pool, self.container, self.env, self.fake = pool, container, env, fake

    def url(self, prefix: str = "") -> str:
        """A store URL of its own for one test (under a fresh prefix)."""
        return f"daos://{self.pool}/{self.container}/t-{uuid.uuid4().hex[:12]}" + (f"/{prefix}" if prefix else "")

    def require_fake(self):
        if self.fake is None:
            pytest.skip("needs the DAOS stand-in (fault injection, counters)")
        return self.fake


@pytest.fixture(scope="session")
def daos(tmp_path_factory):
    """The DAOS stand-in (tests/fake_pydaos, state in a session directory), or the real pool
    $SHUFFLEFS_DAOS_POOL and PYTHON container $SHUFFLEFS_DAOS_CONT when set."""
    if REAL_DAOS_POOL:
        container = os.environ.get("SHUFFLEFS_DAOS_CONT")
        if not container:
            pytest.fail("SHUFFLEFS_DAOS_POOL is set: also set SHUFFLEFS_DAOS_CONT to a PYTHON container")
        yield DaosTarget(REAL_DAOS_POOL, container, {})
        return
    from pydaos import _fake

    directory = str(tmp_path_factory.mktemp("daos-system"))
    _fake.create_system(directory)
    previous = os.environ.get("FAKE_PYDAOS_DIR")
    os.environ["FAKE_PYDAOS_DIR"] = directory
    try:
        _fake.create_pool("tank")
        _fake.create_container("tank", "shuffle")
        env = {
            "FAKE_PYDAOS_DIR": directory,
            "PYTHONPATH": os.pathsep.join(filter(None, [FAKE_PYDAOS, os.environ.get("PYTHONPATH")])),
        }
        yield DaosTarget("tank", "shuffle", env, _fake)
    finally:
        if previous is None:
            os.environ.pop("FAKE_PYDAOS_DIR", None)
        else:
            os.environ["FAKE_PYDAOS_DIR"] = previous


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test left a mount under this session's temporary directory."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = str(factory.getbasetemp())
    leftover = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            path = unescape(fields[1])
            if fields[2] == "fuse.shufflefs" and path.startswith(base + "/"):
                leftover.append(path)
    for path in leftover:
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    if leftover:
        print(f"\nERROR: tests left shufflefs mounts behind: {leftover}", file=sys.stderr)
        session.exitstatus = 1
