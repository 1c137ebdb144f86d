"""The fault-injecting proxy (shufflefs/testing/faultproxy.py) between boto3 and a real SeaweedFS."""

from __future__ import annotations

import http.client
import io
import os
import random
import threading
import time
import uuid

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.exceptions
import pytest

from shufflefs.testing.faultproxy import FaultProxy, delay, drop_after, drop_before, fail, hang, hold

MiB = 1024 * 1024


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy")]


@pytest.fixture
def bucket(seaweed):
    return seaweed.create_bucket(f"fp{uuid.uuid4().hex[:12]}")


def client_of(seaweed, proxy, read_timeout: float = 10, **config):
    """A boto3 client that talks to SeaweedFS through the proxy, with short timeouts and no
    retries by botocore."""
    options = dict(
        s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=read_timeout
    )
    options.update(config)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.url,
        region_name=seaweed.region,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        config=botocore.config.Config(**options),
    )


def stored(seaweed, bucket, key) -> bytes | None:
    """The object as SeaweedFS has it (asked directly, not through the proxy)."""
    try:
        return seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def test_forwards_every_kind_of_request(seaweed, proxy, bucket):
    """Signatures stay valid for bodies with Content-Length and Expect: 100-continue,
    multipart uploads, listings, ranged reads and batch deletes; keep-alive
    connections are reused."""
    s3 = client_of(seaweed, proxy)
    small = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="a/small", Body=small)
    s3.put_object(Bucket=bucket, Key="a/file", Body=io.BytesIO(small))
    big = os.urandom(11 * MiB)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="a/big")["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(big), 5 * MiB), start=1):
        response = s3.upload_part(
            Bucket=bucket,
            Key="a/big",
            UploadId=upload,
            PartNumber=number,
            Body=io.BytesIO(big[start : start + 5 * MiB]),
        )
        parts.append({"ETag": response["ETag"], "PartNumber": number})
    s3.complete_multipart_upload(Bucket=bucket, Key="a/big", UploadId=upload, MultipartUpload={"Parts": parts})

    assert s3.get_object(Bucket=bucket, Key="a/big")["Body"].read() == big
    assert s3.get_object(Bucket=bucket, Key="a/big", Range="bytes=10-19")["Body"].read() == big[10:20]
    assert s3.head_object(Bucket=bucket, Key="a/small")["ContentLength"] == 1000
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/big", "a/file", "a/small"]
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a/small"}, {"Key": "a/file"}]})
    assert stored(seaweed, bucket, "a/small") is None and stored(seaweed, bucket, "a/big") == big

    ops = [r.op for r in proxy.requests]
    assert ops == [
        "PutObject",
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
        "GetObject",
        "GetObject",
        "HeadObject",
        "ListObjectsV2",
        "DeleteObjects",
    ]
    assert all(r.action == "forward" for r in proxy.requests)
    assert {r.status for r in proxy.requests} == {200, 206}
    puts = proxy.select("PutObject")
    assert all(put.headers["expect"] == "100-continue" for put in puts)  # the proxy answered the 100
    assert sum(r.body_bytes for r in proxy.select("UploadPart")) == len(big)
    assert proxy.select("UploadPart")[1].params["partNumber"] == "2"
    assert proxy.connections == 1  # one keep-alive connection for everything
    s3.close()


def test_forwards_chunked_bodies(seaweed, proxy, bucket):
    """A `Transfer-Encoding: chunked` body is forwarded with its framing."""
    request = botocore.awsrequest.AWSRequest(method="PUT", url=f"{proxy.url}/{bucket}/chunked")
    request.context["client_config"] = botocore.config.Config(s3={"payload_signing_enabled": False})
    credentials = botocore.credentials.Credentials(seaweed.access_key, seaweed.secret_key)
    botocore.auth.S3SigV4Auth(credentials, "s3", seaweed.region).add_auth(request)
    pieces = [os.urandom(size) for size in (1, 70000, 5, 300000)]
    connection = http.client.HTTPConnection(*proxy.url[len("http://") :].split(":"), timeout=10)
    try:
        connection.request(
            "PUT", f"/{bucket}/chunked", body=iter(pieces), headers=dict(request.headers.items()), encode_chunked=True
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
    finally:
        connection.close()
    assert stored(seaweed, bucket, "chunked") == b"".join(pieces)
    [put] = proxy.select("PutObject")
    assert put.headers["transfer-encoding"] == "chunked"
    assert put.body_bytes > sum(map(len, pieces))  # chunk sizes and CRLFs included


def test_fail_answers_without_forwarding(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    rule = proxy.add_rule(fail(503, "SlowDown"), op="PutObject", times=2)
    proxy.add_rule(fail(400, "InvalidArgument"), method="GET", path=r"/k$")
    proxy.add_rule(fail(500, "InternalError"), op="DeleteObjects", query=r"(^|&)delete\b")
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            s3.put_object(Bucket=bucket, Key="k", Body=b"one")
        assert info.value.response["Error"]["Code"] == "SlowDown"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert stored(seaweed, bucket, "k") is None
    s3.put_object(Bucket=bucket, Key="k", Body=b"two")  # the rule used its two matches
    assert stored(seaweed, bucket, "k") == b"two"
    assert rule.hits == 2

    with pytest.raises(botocore.exceptions.ClientError) as info:
        s3.get_object(Bucket=bucket, Key="k")
    assert info.value.response["Error"]["Code"] == "InvalidArgument"
    assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == 3  # the method did not match
    with pytest.raises(botocore.exceptions.ClientError) as info:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "k"}]})
    assert info.value.response["Error"]["Code"] == "InternalError"
    assert stored(seaweed, bucket, "k") == b"two"

    assert [(r.op, r.action, r.status) for r in proxy.requests] == [
        ("PutObject", "fail", 503),
        ("PutObject", "fail", 503),
        ("PutObject", "forward", 200),
        ("GetObject", "fail", 400),
        ("HeadObject", "forward", 200),
        ("DeleteObjects", "fail", 500),
    ]
    assert proxy.connections == 1  # an injected error keeps the connection alive
    s3.close()


def test_probability_is_seeded(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    rule = proxy.add_rule(fail(500, "InternalError"), op="HeadObject", probability=0.3, seed=42)
    outcomes = []
    for _ in range(60):
        try:
            s3.head_object(Bucket=bucket, Key="k")
            outcomes.append(True)
        except botocore.exceptions.ClientError:
            outcomes.append(False)
    coin = random.Random(42)
    assert outcomes == [coin.random() >= 0.3 for _ in range(60)]
    assert rule.hits == outcomes.count(False) == proxy.count("HeadObject", status=500) > 0
    s3.close()


def test_drop_before_is_not_applied(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    proxy.add_rule(drop_before(), op="PutObject", times=1)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"lost"))
    assert stored(seaweed, bucket, "k") is None
    s3.put_object(Bucket=bucket, Key="k", Body=b"kept")  # on a new connection
    assert stored(seaweed, bucket, "k") == b"kept"
    assert [(r.action, r.status) for r in proxy.select("PutObject")] == [("drop_before", None), ("forward", 200)]
    assert proxy.connections == 2
    s3.close()


def test_drop_after_is_applied(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    proxy.add_rule(drop_after(), op="PutObject", times=1)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="k", Body=b"applied")
    assert stored(seaweed, bucket, "k") == b"applied"  # the client cannot know
    [put] = proxy.select("PutObject")
    assert (put.action, put.status) == ("drop_after", 200)
    s3.close()


def test_hang_times_out_and_is_never_applied(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy, read_timeout=0.5)
    proxy.add_rule(hang(), op="PutObject", times=1)
    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        s3.put_object(Bucket=bucket, Key="k", Body=b"never")
    assert time.monotonic() - started < 5
    time.sleep(0.3)
    assert stored(seaweed, bucket, "k") is None
    assert [(r.action, r.status) for r in proxy.requests] == [("hang", None)]
    s3.close()


def test_hold_applies_a_request_after_its_sender_gave_up(seaweed, proxy, bucket):
    """The late write overwrites a newer one: what a store does with a request it received
    fully but applied after the client timed out and moved on."""
    s3 = client_of(seaweed, proxy, read_timeout=0.5)
    proxy.add_rule(hold(), op="PutObject", times=1)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        s3.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"old"))
    held = proxy.wait_held(timeout=1)
    assert held.request.status is None and stored(seaweed, bucket, "k") is None
    s3.put_object(Bucket=bucket, Key="k", Body=b"new")
    assert stored(seaweed, bucket, "k") == b"new"
    assert proxy.release(held) == 200  # the signature is still good (within SigV4's 15 minutes)
    assert stored(seaweed, bucket, "k") == b"old"
    assert [(r.action, r.status) for r in proxy.select("PutObject")] == [("hold", 200), ("forward", 200)]
    with pytest.raises(RuntimeError):
        proxy.release(held)
    s3.close()


def test_released_answer_reaches_a_waiting_client(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    proxy.add_rule(hold(), op="PutObject")
    done = []
    thread = threading.Thread(target=lambda: done.append(s3.put_object(Bucket=bucket, Key="k", Body=b"v")))
    thread.start()
    held = proxy.wait_held()
    assert proxy.release(held) == 200
    thread.join(10)
    assert done and done[0]["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert stored(seaweed, bucket, "k") == b"v"
    s3.close()


def test_delay(seaweed, proxy, bucket):
    s3 = client_of(seaweed, proxy)
    proxy.add_rule(delay(0.5), op="PutObject", times=1)
    started = time.monotonic()
    s3.put_object(Bucket=bucket, Key="k", Body=b"late")
    assert time.monotonic() - started >= 0.5
    assert stored(seaweed, bucket, "k") == b"late"
    assert proxy.select("PutObject")[0].action == "delay"
    s3.close()


def test_stop_ends_hanging_and_held_requests(seaweed, bucket):
    with FaultProxy(seaweed.endpoint_url) as proxy:
        s3 = client_of(seaweed, proxy, read_timeout=30)
        proxy.add_rule(hang(), op="PutObject", times=1)
        proxy.add_rule(hold(), op="PutObject", times=1)
        errors = []

        def put(key):
            try:
                s3.put_object(Bucket=bucket, Key=key, Body=b"x")
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(k,)) for k in ("a", "b")]
        for thread in threads:
            thread.start()
            while proxy.count() < len(errors) + threads.index(thread) + 1:
                time.sleep(0.01)
        proxy.wait_held()
        started = time.monotonic()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 5
    assert len(errors) == 2 and all(isinstance(e, botocore.exceptions.ConnectionClosedError) for e in errors)
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy")]
    assert stored(seaweed, bucket, "a") is None and stored(seaweed, bucket, "b") is None
    s3.close()
