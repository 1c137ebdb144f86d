"""Shared fixtures: one SeaweedFS server per test session, mounts that always clean up."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from mounting import Mount  # noqa: E402
from servers import SeaweedS3  # noqa: E402


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
            if fields[2] == "fuse.shufflefs" and fields[1].startswith(base + "/"):
                leftover.append(fields[1])
    for path in leftover:
        os.system(f"fusermount3 -u -z '{path}'")
    if leftover:
        print(f"\nERROR: tests left shufflefs mounts behind: {leftover}", file=sys.stderr)
        session.exitstatus = 1
