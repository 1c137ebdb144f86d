"""The S3 store against a real SeaweedFS behind the fault-injecting proxy (shufflefs/testing/faultproxy.py):
what a flaky link or server does to its uploads."""

from __future__ import annotations

import os
import threading
import time
import uuid

import boto3
import botocore.config
import pytest
from test_stores import use_s3_env

from shufflefs.stores import StoreError, UploadAborted
from shufflefs.stores.s3 import S3Store
from shufflefs.testing.faultproxy import FaultProxy, delay, drop_after, drop_before, fail, hold
from shufflefs.testing.mounting import Mount

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


@pytest.fixture
def store(seaweed, proxy, monkeypatch, tmp_path):
    """An S3 store talking to SeaweedFS through the proxy, uploading in 5 MiB parts."""
    use_s3_env(monkeypatch, tmp_path, seaweed)
    bucket = seaweed.create_bucket(f"f{uuid.uuid4().hex[:16]}")
    s = S3Store(bucket, "pfx", endpoint_url=proxy.url)
    s.multipart_threshold = s.part_size = PART
    s.part_retry_delay = 0.01
    yield s
    s.close()


def local_file(tmp_path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "local"
    path.write_bytes(data)
    return str(path), data


def stored(seaweed, store, key) -> bytes:
    return seaweed.client().get_object(Bucket=store.bucket, Key=f"pfx/{key}")["Body"].read()


def pending_uploads(seaweed, store) -> list:
    return seaweed.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


def test_failed_parts_are_sent_again_within_the_upload(seaweed, proxy, store, tmp_path):
    """About 20% of the part uploads fail in different ways (an error answer, a connection
    reset before the server saw the part, one after it stored it): each failed part is sent
    again, within one multipart upload, and the object is whole."""
    path, data = local_file(tmp_path, 64 * MiB)
    # seeds picked so that, with the parts sent in order, each rule fires at least once
    rules = [
        proxy.add_rule(fail(500, "InternalError"), op="UploadPart", probability=0.08, seed=260),
        proxy.add_rule(fail(503, "SlowDown"), op="UploadPart", probability=0.06, seed=261),
        proxy.add_rule(drop_before(), op="UploadPart", probability=0.04, seed=262),
        proxy.add_rule(drop_after(), op="UploadPart", probability=0.04, seed=263),
    ]
    store.put_file("big", path)
    assert stored(seaweed, store, "big") == data

    assert all(rule.hits for rule in rules), [rule.hits for rule in rules]  # every kind of failure happened
    parts = proxy.select("UploadPart")
    failed = [r for r in parts if r.action != "forward"]
    assert len(failed) == sum(rule.hits for rule in rules)
    assert sorted(int(r.params["partNumber"]) for r in parts if r.action == "forward") == list(range(1, 14))
    # only the failed parts were sent twice, not the whole file again
    assert sum(r.body_bytes for r in parts) == len(data) + sum(r.body_bytes for r in failed) < 1.5 * len(data)
    assert proxy.count("CreateMultipartUpload") == proxy.count("CompleteMultipartUpload") == 1
    assert proxy.count("AbortMultipartUpload") == 0
    assert pending_uploads(seaweed, store) == []


def test_a_part_applied_after_it_was_sent_again(seaweed, proxy, store, tmp_path):
    """The server receives part 2 but applies it only after the store timed out and sent it
    again: the same bytes land twice, and the object is whole."""
    path, data = local_file(tmp_path, 12 * MiB)
    # the store's client with a short read timeout (S3Store waits 60 s for an answer)
    store._client = boto3.session.Session().client(
        "s3", endpoint_url=proxy.url, config=store._client.meta.config.merge(botocore.config.Config(read_timeout=2))
    )
    # SeaweedFS's first write to a bucket takes about a second (it creates volumes): not in the upload
    seaweed.client().put_object(Bucket=store.bucket, Key="warm-up", Body=b"x")
    proxy.add_rule(hold(), op="UploadPart", query=r"partNumber=2(&|$)", times=1)
    proxy.add_rule(delay(1), op="CompleteMultipartUpload")  # time to apply the held part first
    failures = []

    def put():
        try:
            store.put_file("big", path)
        except Exception as exc:
            failures.append(exc)

    upload = threading.Thread(target=put)
    upload.start()
    try:
        held = proxy.wait_held()
        deadline = time.monotonic() + 10
        while not proxy.select("UploadPart", action="forward", status=200, query=r"partNumber=2(&|$)"):
            assert time.monotonic() < deadline, "part 2 was not sent again"
            time.sleep(0.05)
        assert proxy.release(held) == 200
        assert all(r.status is None for r in proxy.select("CompleteMultipartUpload"))  # not forwarded yet
    finally:
        upload.join(30)
    assert failures == []
    assert stored(seaweed, store, "big") == data
    assert proxy.count("CreateMultipartUpload") == proxy.count("CompleteMultipartUpload") == 1


def test_a_part_that_keeps_failing_gives_up_the_upload(seaweed, proxy, store, tmp_path):
    path, _data = local_file(tmp_path, 12 * MiB)
    proxy.add_rule(fail(503, "SlowDown"), op="UploadPart", query=r"partNumber=2(&|$)")
    with pytest.raises(StoreError) as info:
        store.put_file("big", path)
    assert info.value.transient  # the caller may try the whole upload again later
    assert "part 2" in str(info.value) and "SlowDown" in str(info.value)
    assert [r.params["partNumber"] for r in proxy.select("UploadPart")] == ["1"] + ["2"] * store.part_attempts
    assert proxy.count("AbortMultipartUpload") == 1
    assert pending_uploads(seaweed, store) == []
    assert store.head("big") is None


def test_a_permanent_part_error_is_not_retried(seaweed, proxy, store, tmp_path):
    path, _data = local_file(tmp_path, 12 * MiB)
    proxy.add_rule(fail(400, "InvalidArgument"), op="UploadPart", query=r"partNumber=2(&|$)")
    with pytest.raises(StoreError) as info:
        store.put_file("big", path)
    assert not info.value.transient
    assert [r.params["partNumber"] for r in proxy.select("UploadPart")] == ["1", "2"]
    assert proxy.count("AbortMultipartUpload") == 1
    assert pending_uploads(seaweed, store) == []


def test_abort_while_waiting_to_resend_a_part(seaweed, proxy, store, tmp_path):
    path, _data = local_file(tmp_path, 12 * MiB)
    store.part_retry_delay = 60
    proxy.add_rule(fail(500, "InternalError"), op="UploadPart", query=r"partNumber=1(&|$)")
    abort = threading.Event()
    timer = threading.Timer(0.5, abort.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(UploadAborted):
            store.put_file("big", path, abort)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5
    assert proxy.count("UploadPart") == 1
    assert proxy.count("AbortMultipartUpload") == 1
    assert pending_uploads(seaweed, store) == []


def test_daemon_sends_failed_parts_again(seaweed, proxy, s3_env, tmp_path):
    """A mount (a daemon subprocess) whose store endpoint is the proxy: a 40 MiB file goes up
    in 8 MiB parts, two of which fail, in one multipart upload, before the committing rename
    returns (sync commit)."""
    bucket = seaweed.create_bucket(f"f{uuid.uuid4().hex[:16]}")
    data = os.urandom(40 * MiB)
    proxy.add_rule(fail(503, "SlowDown"), op="UploadPart", query=r"partNumber=2(&|$)", times=2)
    proxy.add_rule(drop_before(), op="UploadPart", query=r"partNumber=4(&|$)", times=1)
    with Mount(
        f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", "--s3-endpoint-url", proxy.url, env=s3_env
    ) as mount:
        directory = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        with open(f"{directory}/shuffle_0_0_0.data.tmp", "wb") as f:
            f.write(data)
        os.rename(f"{directory}/shuffle_0_0_0.data.tmp", f"{directory}/shuffle_0_0_0.data")
        assert (
            seaweed.client()
            .get_object(Bucket=bucket, Key="blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data")[
                "Body"
            ]
            .read()
            == data
        )
        assert [r.params["partNumber"] for r in proxy.select("UploadPart")] == ["1", "2", "2", "2", "3", "4", "4", "5"]
        assert proxy.count("CreateMultipartUpload") == proxy.count("CompleteMultipartUpload") == 1
        assert mount.umount().returncode == 0
    stats = mount.status()["stats"]
    assert stats["put_requests"] == 1 and stats.get("failed_requests", 0) == 0  # the put succeeded at once
