"""A decommission's fallback copy through a real mount on S3 (docs/RECOVERY.md): a durable file
written with the bytes of a committed file of the same name, read just before, is copied by the
store (CopyObject), never uploaded again; a file of other bytes is uploaded as usual, or refused
when its writes passed the daemon by (SEMANTICS.md, "a copy of a committed file")."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from shufflefs.testing.faultproxy import FaultProxy
from shufflefs.testing.mounting import Mount, bucket_objects, hadoop_copy, run_cli

MiB = 1024 * 1024


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


def fsync_error(path: str, timeout: float = 5.0) -> int:
    """The errno fsync of `path` fails with, once the kernel's RELEASE of its last writer (sent
    after close() returned) has been handled; 0 if it never fails."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            return exc.errno
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.05)


def test_a_fallback_copy_is_a_copy_in_the_store(tmp_path, s3_env, bucket, seaweed, proxy):
    with Mount(
        f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", "--s3-endpoint-url", proxy.url, env=s3_env
    ) as mount:
        blockmgr = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/0c"
        os.makedirs(blockmgr)
        data = os.urandom(3 * MiB)
        temp = f"{blockmgr}/shuffle_3_7_0.data.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, f"{blockmgr}/shuffle_3_7_0.data")
        index = os.urandom(64)
        with open(f"{blockmgr}/shuffle_3_7_0.index.tmp", "wb") as f:
            f.write(index)
        os.rename(f"{blockmgr}/shuffle_3_7_0.index.tmp", f"{blockmgr}/shuffle_3_7_0.index")

        fallback = f"{mount.path}/fallback/app-1/3/77"
        hadoop_copy(f"{blockmgr}/shuffle_3_7_0.index", f"{fallback}/shuffle_3_7_0.index")
        hadoop_copy(f"{blockmgr}/shuffle_3_7_0.data", f"{fallback}/shuffle_3_7_0.data")
        # same name and size, other bytes: uploaded, unless its writes passed the daemon by
        # (a predicted copy): then a failed write could have gone unseen, and it is refused
        # at its last release, after close() returned
        other = os.urandom(64)
        passthrough = json.loads(run_cli("stats", mount.path, env=mount.env).stdout)["fuse"]["passthrough"]
        refused = f"{mount.path}/fallback/app-1/3/78/shuffle_3_7_0.index"
        hadoop_copy(f"{blockmgr}/shuffle_3_7_0.index", refused, other)
        if passthrough:
            assert fsync_error(refused) == errno.EIO
        store = json.loads(run_cli("stats", mount.path, "--sync", env=mount.env).stdout)["store"]
        assert store["copy_requests"] == 2 and store["copied_bytes"] == len(data) + len(index)
        assert store["put_bytes"] == len(data) + (1 if passthrough else 2) * len(index)
    assert proxy.count(op="CopyObject") == 2
    expected = {
        "blockmgr-10000000-0000-4000-8000-000000000000/0c/shuffle_3_7_0.data": data,
        "blockmgr-10000000-0000-4000-8000-000000000000/0c/shuffle_3_7_0.index": index,
        "fallback/app-1/3/77/shuffle_3_7_0.data": data,
        "fallback/app-1/3/77/shuffle_3_7_0.index": index,
    }
    if not passthrough:
        expected["fallback/app-1/3/78/shuffle_3_7_0.index"] = other
    assert bucket_objects(seaweed.client(), bucket) == expected
