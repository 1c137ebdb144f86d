"""Requests that reach SeaweedFS after their sender gave up (issue 10, finding 1), through the
fault proxy: a daemon killed with its PUT in flight, restarted, the file then deleted, and the
dead daemon's PUT applied afterwards."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from shufflefs.testing.faultproxy import FaultProxy, hold
from shufflefs.testing.mounting import Mount, bucket_objects, run_cli

KEY = "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_1_0.data"


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


def settle(mount: Mount) -> None:
    result = run_cli("stats", mount.path, "--sync", env=mount.env)
    assert result.returncode == 0, result.stderr


def test_a_dead_daemons_put_that_lands_after_the_delete_is_swept(seaweed, proxy, s3_env, tmp_path):
    bucket = seaweed.create_bucket(f"l{uuid.uuid4().hex[:16]}")
    args = ("--s3-endpoint-url", proxy.url, "--commit", "async", "--late-window", "3")
    first = Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env)
    with first:
        directory = f"{first.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        proxy.add_rule(hold(), op="PutObject", path=KEY, times=1)
        with open(f"{directory}/shuffle_0_1_0.data.tmp", "wb") as f:
            f.write(b"committed, then deleted")
        os.rename(f"{directory}/shuffle_0_1_0.data.tmp", f"{directory}/shuffle_0_1_0.data")
        held = proxy.wait_held()  # the store has the whole request; it will apply it later
        first.kill()
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env) as second:
        settle(second)  # the journal's put, resumed
        assert bucket_objects(seaweed.client(), bucket) == {KEY: b"committed, then deleted"}
        os.unlink(f"{second.path}/{KEY}")
        settle(second)
        assert bucket_objects(seaweed.client(), bucket) == {}

        assert proxy.release(held) == 200  # the dead daemon's PUT: the file is back...
        assert bucket_objects(seaweed.client(), bucket) == {KEY: b"committed, then deleted"}
        deadline = time.monotonic() + 15
        while bucket_objects(seaweed.client(), bucket) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert bucket_objects(seaweed.client(), bucket) == {}  # ...until the sweep removes it
        assert "removing " + KEY in second.log()
        assert second.umount().returncode == 0


def test_a_late_put_cannot_replace_newer_bytes_on_s3(seaweed, proxy, s3_env, tmp_path):
    """The dead daemon's PUT of a file that was replaced since is refused by the store."""
    bucket = seaweed.create_bucket(f"l{uuid.uuid4().hex[:16]}")
    args = ("--s3-endpoint-url", proxy.url, "--commit", "async")
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env) as first:
        directory = f"{first.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        proxy.add_rule(hold(), op="PutObject", path=KEY, times=1)
        with open(f"{directory}/shuffle_0_1_0.data", "wb") as f:
            f.write(b"old")
        held = proxy.wait_held()
        first.kill()
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env) as second:
        settle(second)
        directory = f"{second.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        with open(f"{directory}/shuffle_0_1_0.data.tmp", "wb") as f:
            f.write(b"new bytes")
        os.rename(f"{directory}/shuffle_0_1_0.data.tmp", f"{directory}/shuffle_0_1_0.data")
        settle(second)
        assert proxy.release(held) == 412  # conditional: the key is not what it expected
        assert bucket_objects(seaweed.client(), bucket) == {KEY: b"new bytes"}
        assert second.umount().returncode == 0


def test_a_move_resumed_after_a_crash_moves_the_file(seaweed, proxy, s3_env, tmp_path):
    """A committed file renamed to another durable name; the daemon dies with the CopyObject on
    its way. The next daemon never saw the source's version: it moves the version there, and
    deletes only that one (found by tests/test_crash_storm.py: the resumed move sent a
    DeleteObject with If-None-Match, which boto3 refuses, and the move was failed for good)."""
    bucket = seaweed.create_bucket(f"l{uuid.uuid4().hex[:16]}")
    moved = KEY.replace("shuffle_0_1_0", "shuffle_0_2_0")
    args = ("--s3-endpoint-url", proxy.url, "--commit", "async")
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env) as first:
        directory = f"{first.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        with open(f"{directory}/shuffle_0_1_0.data.tmp", "wb") as f:
            f.write(b"moved once")
        os.rename(f"{directory}/shuffle_0_1_0.data.tmp", f"{first.path}/{KEY}")
        settle(first)
        proxy.add_rule(hold(), op="CopyObject", times=1)
        os.rename(f"{first.path}/{KEY}", f"{first.path}/{moved}")
        held = proxy.wait_held()
        first.kill()
    proxy.clear_rules()
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env) as second:
        settle(second)
        assert bucket_objects(seaweed.client(), bucket) == {moved: b"moved once"}
        with open(f"{second.path}/{moved}", "rb") as f:
            assert f.read() == b"moved once"
        assert not os.path.exists(f"{second.path}/{KEY}")
        assert proxy.release(held) in (404, 412)  # the dead daemon's copy: its source is gone
        assert bucket_objects(seaweed.client(), bucket) == {moved: b"moved once"}
        result = second.umount()
        assert result.returncode == 0, result.stderr
