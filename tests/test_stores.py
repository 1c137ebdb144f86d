"""One conformance suite for every store (memory, file, and S3 against a real SeaweedFS), plus
S3-specific error handling and store-URL parsing. No mocks: each store runs its real code."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

import shufflefs.stores.s3
from shufflefs.stores import ABSENT, ObjectMissing, PreconditionFailed, StoreError, UploadAborted, open_store
from shufflefs.stores.file import FileStore
from shufflefs.stores.memory import MemoryStore
from shufflefs.stores.s3 import S3Store
from shufflefs.testing.servers import SeaweedS3, free_port

MiB = 1024 * 1024
S3_PREFIX = "pfx/sub"
# every environment variable boto3 reads credentials or endpoints from
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


# -- fixtures ----------------------------------------------------------------------------------


def use_s3_env(monkeypatch, tmp_path, server: SeaweedS3 | None, **overrides) -> None:
    """Point boto3 at `server` with its credentials and nothing from the host's AWS setup."""
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if server is not None:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
    for name, value in overrides.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def new_bucket(server: SeaweedS3) -> str:
    return server.create_bucket(f"t{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["memory", "file", "s3", pytest.param("daos", marks=pytest.mark.daos)])
def store(request, tmp_path, monkeypatch):
    if request.param == "memory":
        s = open_store("memory://")
        assert isinstance(s, MemoryStore)
    elif request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        s = open_store(f"file://{root}")
        assert isinstance(s, FileStore)
    elif request.param == "daos":
        s = open_store(request.getfixturevalue("daos").url(S3_PREFIX))
        assert type(s).__name__ == "DAOSStore"
        s.check()
    else:
        server = request.getfixturevalue("seaweed")
        use_s3_env(monkeypatch, tmp_path, server)
        bucket = new_bucket(server)
        s = open_store(f"s3://{bucket}/{S3_PREFIX}/", s3_endpoint_url=server.endpoint_url)
        assert isinstance(s, S3Store)
        assert s.url == f"s3://{bucket}/{S3_PREFIX}"
        s.server = server  # for tests that look at the bucket directly
    yield s
    s.close()


class Local:
    """Writes local files for put_file."""

    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    def file(self, data: bytes) -> str:
        self.count += 1
        path = os.path.join(self.directory, f"local-{self.count}")
        with open(path, "wb") as f:
            f.write(data)
        return path


@pytest.fixture
def local(tmp_path):
    directory = tmp_path / "local"
    directory.mkdir()
    return Local(str(directory))


def put(store, local: Local, key: str, data: bytes, abort=None) -> None:
    store.put_file(key, local.file(data), abort)


def read_all(store, key: str) -> bytes:
    info = store.head(key)
    assert info is not None, key
    return store.get_range(key, 0, info.size + 1)


def assert_dirs(store, prefix: str, expected: list[str]) -> None:
    """list_dir(prefix).dirs is `expected`. SeaweedFS keeps a directory emptied by deletes or
    moves (and lists it as a common prefix) until its empty-folder cleaner runs, ~2 min later;
    AWS does not. So on S3 an extra directory is tolerated only if it is really empty."""
    dirs = store.list_dir(prefix).dirs
    if not isinstance(store, S3Store):
        assert dirs == expected
        return
    assert [d for d in dirs if d in expected] == expected
    for extra in set(dirs) - set(expected):
        listing = store.list_dir(f"{prefix}/{extra}" if prefix else extra)
        assert listing.dirs == [] and listing.files == [], extra


def s3_client(store):
    return store.server.client()


def pending_uploads(store) -> list:
    response = s3_client(store).list_multipart_uploads(Bucket=store.bucket)
    return response.get("Uploads", [])


class AbortAfter(threading.Event):
    """An abort event that another thread "sets" while the upload runs: it becomes set at the
    n-th time the store looks at it, so an abort lands mid-upload deterministically."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls >= self.n:
            self.set()
        return super().is_set()


# -- conformance ---------------------------------------------------------------------------------


def test_roundtrip_head_and_ranges(store, local):
    data = os.urandom(1000)
    before = time.time_ns()
    put(store, local, "app-1/exec-2/0c/shuffle_0_5_0.data", data)
    info = store.head("app-1/exec-2/0c/shuffle_0_5_0.data")
    assert info.name == "shuffle_0_5_0.data"
    assert info.size == 1000
    # S3 keeps whole seconds; allow for that and a little clock skew
    assert before - 2_000_000_000 <= info.mtime_ns <= time.time_ns() + 2_000_000_000

    key = "app-1/exec-2/0c/shuffle_0_5_0.data"
    assert store.get_range(key, 0, 1000) == data
    assert store.get_range(key, 10, 20) == data[10:30]
    assert store.get_range(key, 990, 100) == data[990:]  # fewer bytes at the end
    assert store.get_range(key, 999, 1) == data[999:]
    assert store.get_range(key, 1000, 10) == b""  # at the end
    assert store.get_range(key, 5000, 10) == b""  # past the end
    assert store.get_range(key, 0, 10_000) == data


def test_zero_length_object(store, local):
    put(store, local, "d/empty", b"")
    info = store.head("d/empty")
    assert (info.name, info.size) == ("empty", 0)
    assert store.get_range("d/empty", 0, 10) == b""
    assert store.get_range("d/empty", 3, 10) == b""
    assert [f.name for f in store.list_dir("d").files] == ["empty"]


def test_missing_key(store):
    assert store.head("no/such/key") is None
    with pytest.raises(ObjectMissing):
        store.get_range("no/such/key", 0, 10)


def test_overwrite_replaces(store, local):
    put(store, local, "k", b"x" * 100)
    put(store, local, "k", b"new!" * 10)
    assert store.head("k").size == 40
    assert read_all(store, "k") == b"new!" * 10


def test_overwrite_is_atomic_for_readers(store, local):
    versions = [b"a" * (256 * 1024), b"b" * (200 * 1024)]
    paths = [local.file(v) for v in versions]
    store.put_file("hot", paths[0])
    stop = threading.Event()
    seen, errors = [], []

    def reader():
        while not stop.is_set():
            try:
                seen.append(store.get_range("hot", 0, 1 << 20))
            except StoreError as exc:
                # a read overtaken by replacements may fail, as worth retrying (Remote does);
                # anything else is a failure of the test
                if not exc.transient:
                    errors.append(exc)
            except Exception as exc:  # the thread must not die unseen
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            store.put_file("hot", paths[i % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == [] and seen
    for data in seen:
        assert data in versions  # never a mix or a partial object
    assert read_all(store, "hot") == versions[1]


def test_list_dir_levels(store, local):
    put(store, local, "top.data", b"abc")
    put(store, local, "d1/x", b"12345")
    put(store, local, "d1/y", b"")
    put(store, local, "d1/sub/z", b"1234567")
    put(store, local, "d2/deep/er/w", b"1")

    top = store.list_dir("")
    assert top.dirs == ["d1", "d2"]
    assert [(f.name, f.size) for f in top.files] == [("top.data", 3)]

    d1 = store.list_dir("d1")
    assert d1.dirs == ["sub"]
    assert [(f.name, f.size) for f in d1.files] == [("x", 5), ("y", 0)]
    assert all(f.mtime_ns > 0 for f in d1.files)

    assert store.list_dir("d2").dirs == ["deep"]
    assert store.list_dir("d2").files == []
    assert store.list_dir("d2/deep").dirs == ["er"]
    deepest = store.list_dir("d2/deep/er")
    assert deepest.dirs == [] and [f.name for f in deepest.files] == ["w"]
    assert store.list_dir("d1/sub").files[0].size == 7

    empty = store.list_dir("nothing/here")
    assert empty.dirs == [] and empty.files == []
    # a name that is only a string prefix of a directory is not that directory
    assert store.list_dir("d").dirs == [] and store.list_dir("d").files == []


def test_list_dir_ignores_keys_outside_prefix(store, local):
    if not isinstance(store, S3Store):
        pytest.skip("only S3 stores share a namespace with other keys")
    client = s3_client(store)
    client.put_object(Bucket=store.bucket, Key="outside.txt", Body=b"o")
    client.put_object(Bucket=store.bucket, Key="pfx/subway/x", Body=b"o")  # shares the string 'pfx/sub'
    client.put_object(Bucket=store.bucket, Key="pfx/sibling", Body=b"o")
    put(store, local, "mine", b"m")
    top = store.list_dir("")
    assert top.dirs == [] and [f.name for f in top.files] == ["mine"]
    assert client.head_object(Bucket=store.bucket, Key=f"{S3_PREFIX}/mine")["ContentLength"] == 1
    store.delete_many(["mine"])
    assert client.head_object(Bucket=store.bucket, Key="pfx/subway/x")["ContentLength"] == 1


def test_move(store, local):
    data = os.urandom(3000)
    put(store, local, "a/src", data)
    store.move("a/src", "b/c/dst")
    assert read_all(store, "b/c/dst") == data
    assert store.head("a/src") is None
    assert store.list_dir("a").files == []
    assert_dirs(store, "", ["b"])


def test_move_replaces_existing_destination(store, local):
    put(store, local, "dst", b"old contents")
    put(store, local, "src", b"new")
    store.move("src", "dst")
    assert read_all(store, "dst") == b"new"
    assert store.head("src") is None
    assert [f.name for f in store.list_dir("").files] == ["dst"]


def test_move_over_a_copy_of_itself(store, local):
    """The file store's copy is a hard link, and rename(2) between two links to one file does
    nothing: the source must go all the same (a resurrection otherwise)."""
    if not store.copies:
        pytest.skip("the store cannot copy without the bytes passing through (see RECOVERY.md)")
    put(store, local, "a/src", b"same bytes")
    store.copy("a/src", "a/dst")
    store.move("a/src", "a/dst")
    assert read_all(store, "a/dst") == b"same bytes"
    assert store.head("a/src") is None
    assert [f.name for f in store.list_dir("a").files] == ["dst"]


def test_move_missing_source(store, local):
    put(store, local, "dst", b"keep")
    with pytest.raises(ObjectMissing):
        store.move("no-such-src", "dst")
    assert read_all(store, "dst") == b"keep"


def test_copy(store, local):
    """A copy (issue 13: a decommission's fallback copy) leaves the source as it was, replaces
    the destination, and is independent of the source afterwards; conditions as for move."""
    if not store.copies:
        pytest.skip("the store cannot copy without the bytes passing through (see RECOVERY.md)")
    data = os.urandom(3000)
    put(store, local, "a/src", data)
    put(store, local, "b/dst", b"old")
    store.copy("a/src", "b/dst", token="w.1.1")
    assert read_all(store, "b/dst") == data and read_all(store, "a/src") == data
    store.delete_many(["a/src"])
    assert read_all(store, "b/dst") == data
    with pytest.raises(ObjectMissing):
        store.copy("a/src", "b/other")
    assert store.head("b/other") is None
    if store.conditional:
        version = store.head("b/dst").version
        with pytest.raises(PreconditionFailed):  # a late copy of a version that is gone
            store.copy("b/dst", "c/x", expect_src='"0"', expect_dst=ABSENT)
        with pytest.raises(PreconditionFailed):  # over an object it does not expect
            store.copy("b/dst", "b/dst2", expect_src=version, expect_dst='"0"')
        copied = store.copy("b/dst", "c/x", expect_src=version, expect_dst=ABSENT, token="w.1.2")
        assert store.head("c/x").version == copied and store.head("c/x").token == "w.1.2"
    assert [f.name for f in store.list_dir("").files] == []  # no temporary names listed


def test_delete_many(store, local):
    for key in ("k1", "k2", "dir/k3"):
        put(store, local, key, key.encode())
    store.delete_many(["k1", "dir/k3", "missing", "no/such/dir/key"])
    assert store.head("k1") is None
    assert store.head("dir/k3") is None
    assert read_all(store, "k2") == b"k2"
    assert_dirs(store, "", [])
    store.delete_many([])
    store.delete_many(["k1"])  # already gone
    assert read_all(store, "k2") == b"k2"


def test_delete_many_more_than_a_batch_and_list_pagination(store):
    if not isinstance(store, S3Store):
        pytest.skip("batches of 1000 and listing pages are S3 things")
    client = s3_client(store)
    names = [f"f{i:05d}" for i in range(1001)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=store.bucket, Key=f"{S3_PREFIX}/many/{n}", Body=b""), names))
    listing = store.list_dir("many")
    assert [f.name for f in listing.files] == names  # more than one ListObjectsV2 page
    store.delete_many([f"many/{n}" for n in names] + ["many/missing"])
    assert store.list_dir("many").files == []
    assert client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0) == 0


def test_gc_removes_an_unheld_block_manager_directory_and_nothing_else(store, local):
    """shufflefs.gc through each store's own listing and deletes (tests/test_gc.py has the rules)."""
    from shufflefs import gc

    bm = "blockmgr-10000000-0000-4000-8000-000000000000"
    inside = [f"spark-1/executor-1/{bm}/0c/shuffle_0_0_0.data", f"spark-1/executor-1/{bm}/0d/shuffle_0_0_0.index"]
    for key in [*inside, "spark-1/other/shuffle_0_0_0.data"]:
        put(store, local, key, key.encode())
    holders = gc.Holders(store, 0.0)
    planned = gc.plan(store, 0.0, holders)
    assert [(item.kind, item.key, item.objects) for item in planned.garbage] == [
        (gc.DIRECTORY, f"spark-1/executor-1/{bm}", 2)
    ]
    assert (planned.outside_objects, planned.kept) == (1, [])
    outcome = gc.delete(store, planned, holders, lambda count: None)
    assert outcome.removed == planned.garbage and not outcome.failed and not outcome.spared
    assert all(store.head(key) is None for key in inside)
    assert read_all(store, "spark-1/other/shuffle_0_0_0.data") == b"spark-1/other/shuffle_0_0_0.data"


def test_multipart_roundtrip(store, local):
    store.multipart_threshold = 5 * MiB
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB  # S3's minimum: 11 MiB -> parts of 5, 5 and 1 MiB
    data = os.urandom(11 * MiB)
    put(store, local, "big/file", data)
    assert store.head("big/file").size == len(data)
    assert store.get_range("big/file", 0, len(data)) == data
    assert store.get_range("big/file", 5 * MiB - 10, 20) == data[5 * MiB - 10 : 5 * MiB + 10]
    assert store.get_range("big/file", len(data) - 5, 100) == data[-5:]
    if isinstance(store, S3Store):
        etag = s3_client(store).head_object(Bucket=store.bucket, Key=f"{S3_PREFIX}/big/file")["ETag"]
        assert etag.strip('"').endswith("-3")  # really uploaded in three parts
        assert pending_uploads(store) == []


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["single", "multipart"])
def test_abort_already_set(store, local, size):
    store.multipart_threshold = 5 * MiB
    abort = threading.Event()
    abort.set()
    with pytest.raises(UploadAborted):
        put(store, local, "x/aborted", os.urandom(size), abort)
    assert store.head("x/aborted") is None
    assert store.list_dir("x").files == []
    # an existing object is left as it was
    put(store, local, "x/kept", b"old")
    with pytest.raises(UploadAborted):
        put(store, local, "x/kept", os.urandom(size), abort)
    assert read_all(store, "x/kept") == b"old"
    if isinstance(store, S3Store):
        assert pending_uploads(store) == []


@pytest.mark.parametrize("size", [3 * MiB, 11 * MiB], ids=["single", "multipart"])
def test_abort_mid_upload(store, local, size):
    store.multipart_threshold = 5 * MiB
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB
    data = os.urandom(size)
    # count how often an upload looks at its abort event, then abort it halfway through
    counter = AbortAfter(10**9)
    put(store, local, "mid/counted", data, counter)
    if counter.calls < 2:
        pytest.skip(f"{type(store).__name__} looks at the abort event only {counter.calls} time(s) for this size")
    abort = AbortAfter(counter.calls // 2 + 1)
    with pytest.raises(UploadAborted):
        put(store, local, "mid/aborted", data, abort)
    assert abort.calls == counter.calls // 2 + 1  # stopped right away
    assert store.head("mid/aborted") is None
    assert [f.name for f in store.list_dir("mid").files] == ["counted"]
    if isinstance(store, S3Store):
        assert pending_uploads(store) == []
    # the store still works after an upload was cut off
    put(store, local, "mid/after", data)
    assert store.get_range("mid/after", 0, size) == data


def test_s3_body_an_abort_after_the_last_byte_is_too_late(local):
    """An HTTP client reads a request body until it gets b"": an abort noticed at that last
    read came after the whole body went out, so the write stands; raising then made a
    cancelled upload land unseen, and the file came back after its unlink (crash storm,
    seed 7, through a proxy that holds the request). Before the last byte, it stops the body."""
    data = b"body" * 1000
    with open(local.file(data), "rb") as f:
        abort = threading.Event()
        body = shufflefs.stores.s3._FileSlice(f.fileno(), 0, len(data), abort)
        assert body.read(1000) == data[:1000]
        abort.set()
        with pytest.raises(shufflefs.stores.s3._Aborted):
            body.read(8192)
        body.seek(0)
        abort.clear()
        assert body.read(8192) == data
        abort.set()
        assert body.read(8192) == b""


def test_concurrent_calls_from_threads(store, local):
    payloads = {f"t/{i}/obj": os.urandom(1000 + i) for i in range(24)}
    paths = {key: local.file(data) for key, data in payloads.items()}

    def roundtrip(key):
        store.put_file(key, paths[key])
        return store.get_range(key, 0, 1 << 16)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = dict(zip(payloads, pool.map(roundtrip, payloads)))
    assert results == payloads
    assert store.list_dir("t").dirs == sorted(str(i) for i in range(24))


def test_check_passes(store):
    store.check()


def test_reads_name_the_version_they_read(store, local):
    """Every store tells objects apart (head, listings), and a read that names a version never
    returns bytes of another one: a reader on another node never mixes two versions."""
    put(store, local, "v/k", b"first version")
    first = store.head("v/k").version
    assert first and [o.version for o in store.list_dir("v").files] == [first]
    assert store.get_range("v/k", 6, 7, expect=first) == b"version"
    put(store, local, "v/k", b"second, longer version")
    second = store.head("v/k").version
    assert second != first and [o.version for o in store.list_dir("v").files] == [second]
    with pytest.raises(PreconditionFailed):
        store.get_range("v/k", 6, 7, expect=first)
    assert store.get_range("v/k", 0, 6, expect=second) == b"second"


def test_conditional_writes(store, local):
    """A conditional store changes a key only in the state the writer expects (so a request it
    applies late cannot undo a newer one), and keeps the token naming the write."""
    if not store.conditional:
        pytest.skip("an unconditional store (see DESIGN.md 'Late requests')")
    v1 = store.put_file("c/k", local.file(b"one"), expect=ABSENT, token="w.1.1")
    assert v1 and store.head("c/k").version == v1 and store.head("c/k").token == "w.1.1"
    with pytest.raises(PreconditionFailed):  # a late create
        store.put_file("c/k", local.file(b"late"), expect=ABSENT, token="w.1.0")
    v2 = store.put_file("c/k", local.file(b"two"), expect=v1, token="w.1.2")
    with pytest.raises(PreconditionFailed):  # a late replace of the first version
        store.put_file("c/k", local.file(b"late"), expect=v1, token="w.1.0")
    assert store.get_range("c/k", 0, 10) == b"two"
    # deletes and moves of a version that is gone change nothing
    assert isinstance(store.delete_many(["c/k"], expect={"c/k": v1})["c/k"], PreconditionFailed)
    with pytest.raises(PreconditionFailed):
        store.move("c/k", "c/m", expect_src=v1, expect_dst=ABSENT, token="w.1.3")
    assert store.get_range("c/k", 0, 10) == b"two" and store.head("c/m") is None
    # in the expected versions they happen; the moved object carries the move's token
    store.put_file("c/m", local.file(b"in the way"), expect=ABSENT)
    with pytest.raises(PreconditionFailed):
        store.move("c/k", "c/m", expect_src=v2, expect_dst=ABSENT, token="w.1.3")
    in_the_way = store.head("c/m").version
    v3 = store.move("c/k", "c/m", expect_src=v2, expect_dst=in_the_way, token="w.1.4")
    assert store.head("c/k") is None and store.head("c/m").token == "w.1.4" and store.head("c/m").version == v3
    assert store.get_range("c/m", 0, 10) == b"two"
    assert store.get_range("c/m", 1, 2, expect=v3) == b"wo"
    with pytest.raises(PreconditionFailed):  # a reader never gets bytes of another version
        store.get_range("c/m", 1, 2, expect=v1)
    assert store.delete_many(["c/m", "c/never"], expect={"c/m": v3, "c/never": v3}) == {}
    assert store.head("c/m") is None
    assert {o.name: o.version for o in store.list_dir("c").files} == {}


# -- names and key lengths -----------------------------------------------------------------------

#: path components worth a doubt somewhere (every name here is one a Linux file may have)
DOUBTFUL_NAMES = [
    "a\\b",
    "..\\x",
    "\\",
    "tab\tx",
    "nl\nx",
    "cr\rx",
    "ctl\x01x",
    "del\x7fx",
    "nc\ufffe",
    os.fsdecode(b"latin1-\xe9"),
    "é😀",
    " sp ",
    "a+b%2F?#*:;&<>\"'|",
    "...",
    "~",
    ".shufflefs-tmp-1",
    "n" * 255,
]
#: the ones each store refuses, and why: see docs/SEMANTICS.md "Names"
REFUSED = {
    "memory": set(),
    "file": {".shufflefs-tmp-1"},  # hidden from listings (the temporary files of puts)
    # SeaweedFS turns '\' into '/' and refuses '..\'; XML 1.0 cannot carry control
    # characters (DeleteObjects: MalformedXML) and turns CR into LF; S3 keys are UTF-8
    "s3": {"a\\b", "..\\x", "\\", "tab\tx", "nl\nx", "cr\rx", "ctl\x01x", "nc\ufffe", os.fsdecode(b"latin1-\xe9")},
    "daos": {os.fsdecode(b"latin1-\xe9")},  # keys are listed as str
}


def store_kind(store) -> str:
    return {"MemoryStore": "memory", "FileStore": "file", "S3Store": "s3", "DAOSStore": "daos"}[type(store).__name__]


def test_names_a_store_accepts_are_held_faithfully(store, local):
    """name_error refuses exactly the names the store would reject, alias or hide; every other
    name comes back unchanged as a directory and as a file, and is deleted."""
    refused = {name for name in DOUBTFUL_NAMES if store.name_error(name) is not None}
    assert refused == REFUSED[store_kind(store)]
    assert all(store.name_error(name) == errno.EINVAL for name in refused)
    for i, name in enumerate(n for n in DOUBTFUL_NAMES if n not in refused):
        put(store, local, f"d{i}/{name}/obj", b"in a directory")
        put(store, local, f"f{i}/{name}", b"a file")
        assert store.list_dir(f"d{i}").dirs == [name], name
        assert [f.name for f in store.list_dir(f"d{i}/{name}").files] == ["obj"], name
        assert [f.name for f in store.list_dir(f"f{i}").files] == [name], name
        assert read_all(store, f"d{i}/{name}/obj") == b"in a directory"
        assert read_all(store, f"f{i}/{name}") == b"a file"
        store.delete_many([f"d{i}/{name}/obj", f"f{i}/{name}"])
        assert store.head(f"d{i}/{name}/obj") is None and store.head(f"f{i}/{name}") is None, name


def test_s3_aliases_what_name_error_refuses(store, local):
    """Why the S3 rules are what they are: on SeaweedFS `a\\b/obj` is the object `a/b/obj`, and
    one control character fails a whole DeleteObjects batch."""
    if not isinstance(store, S3Store):
        pytest.skip("S3 only")
    put(store, local, "a\\b/obj", b"x")
    assert store.list_dir("").dirs == ["a"] and read_all(store, "a/b/obj") == b"x"
    put(store, local, "ctl\x01x", b"x")
    with pytest.raises(StoreError, match="MalformedXML"):
        store.delete_many(["ok", "ctl\x01x"])


def key_of_length(length: int) -> str:
    parts = []
    while length > 201:
        parts.append("k" * 200)
        length -= 201
    return "/".join(parts + ["z" * length])


def test_key_of_max_key_bytes_is_stored(store, local):
    """max_key_bytes is a length the store really holds (S3: 1024 bytes with the prefix)."""
    if store.max_key_bytes is None:
        pytest.skip("no limit of its own")
    assert store.max_key_bytes >= 511  # LMDB's limit is the lower one: never this store's
    key = key_of_length(store.max_key_bytes)
    put(store, local, key, b"longest")
    assert read_all(store, key) == b"longest"
    if isinstance(store, S3Store):
        assert store.max_key_bytes == 1024 - len(S3_PREFIX) - 1
        with pytest.raises(StoreError):
            put(store, local, key_of_length(store.max_key_bytes + 1), b"too long")


def test_file_write_cut_short_by_a_crash_is_cleaned_up_by_its_retry(tmp_path, local):
    """A daemon killed mid-put leaves its temporary file in the store directory; the same put
    (same token), resumed by the next daemon, removes it, and so does discarding it (resumed,
    then no longer wanted: its file was deleted). So for a copy: resumed, it may be sent as a
    put of the bytes (tests/test_crash_storm.py found a copy's temporary file left that way).
    A put another node is running in the same directory keeps its temporary file."""
    root = tmp_path / "store"
    root.mkdir()
    store = FileStore(str(root))
    source = local.file(b"mine " * 1000)
    other_source = local.file(b"theirs")

    def write_in_child(call: str, at_replace: str) -> subprocess.Popen:
        code = (
            f"import os, signal, sys\n"
            f"from shufflefs.stores.file import FileStore\n"
            f"replace = os.replace\n"
            f"def stop(src, dst):\n"
            f"    print(src, flush=True)\n"
            f"    {at_replace}\n"
            f"    replace(src, dst)\n"
            f"os.replace = stop\n"
            f"FileStore({str(root)!r}).{call}\n"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            stdin=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )

    def killed_at_replace(call: str) -> str:
        child = write_in_child(call, "os.kill(os.getpid(), signal.SIGKILL)")
        orphan = child.stdout.readline().strip()
        assert child.wait(30) == -signal.SIGKILL and os.path.exists(orphan)
        return orphan

    orphan = killed_at_replace(f"put_file('d/shuffle_0_0_0.data', {source!r}, token='w.1')")
    running = write_in_child(f"put_file('d/shuffle_0_1_0.data', {other_source!r}, token='v.1')", "sys.stdin.readline()")
    theirs = running.stdout.readline().strip()
    try:
        assert sorted(os.listdir(root / "d")) == sorted([os.path.basename(orphan), os.path.basename(theirs)])
        assert store.list_dir("d").files == []  # temporary files are never listed

        store.put_file("d/shuffle_0_0_0.data", source, token="w.1")
        assert read_all(store, "d/shuffle_0_0_0.data") == b"mine " * 1000
        assert not os.path.exists(orphan)

        orphan = killed_at_replace(f"put_file('d/shuffle_0_2_0.data', {source!r}, token='w.2')")
        store.discard_put("d/shuffle_0_2_0.data", "w.2")
        assert not os.path.exists(orphan)

        orphan = killed_at_replace("copy('d/shuffle_0_0_0.data', 'd/shuffle_0_3_0.data', token='w.3')")
        store.put_file("d/shuffle_0_3_0.data", source, token="w.3")
        assert not os.path.exists(orphan)
        orphan = killed_at_replace("copy('d/shuffle_0_0_0.data', 'd/shuffle_0_4_0.data', token='w.4')")
        store.discard_put("d/shuffle_0_4_0.data", "w.4")
        assert not os.path.exists(orphan)
        assert os.path.exists(theirs)
    finally:
        running.communicate("go on\n", timeout=30)
    assert running.returncode == 0
    assert read_all(store, "d/shuffle_0_1_0.data") == b"theirs"
    assert sorted(os.listdir(root / "d")) == ["shuffle_0_0_0.data", "shuffle_0_1_0.data", "shuffle_0_3_0.data"]


def test_file_write_resumed_after_it_landed_leaves_no_temporary_file(tmp_path, local):
    """A daemon killed after its put or copy landed but before it learned so resumes the write:
    its temporary file is then a second link to the object, which rename(2) keeps (the crash
    storm found such files left)."""
    root = tmp_path / "store"
    root.mkdir()
    store = FileStore(str(root))
    source = local.file(b"landed")
    for _ in range(2):
        store.put_file("d/shuffle_0_0_0.data", source, token="w.1")
        store.copy("d/shuffle_0_0_0.data", "d/shuffle_0_1_0.data", token="w.2")
    assert sorted(os.listdir(root / "d")) == ["shuffle_0_0_0.data", "shuffle_0_1_0.data"]
    assert read_all(store, "d/shuffle_0_1_0.data") == b"landed"


# -- S3 specifics ---------------------------------------------------------------------------------


def test_s3_multipart_copy(store, local):
    """Objects above CopyObject's 5 GiB limit are moved with UploadPartCopy; run that path on a
    small object with small parts."""
    if not isinstance(store, S3Store):
        pytest.skip("S3 only")
    data = os.urandom(11 * MiB)
    put(store, local, "c/src", data)
    store.copy_part_size = 5 * MiB
    version = store._copy_in_parts(
        f"{S3_PREFIX}/c/src", f"{S3_PREFIX}/c/dst", len(data), "test copy", expect=ABSENT, token="t-1"
    )
    assert store.get_range("c/dst", 0, len(data)) == data
    head = s3_client(store).head_object(Bucket=store.bucket, Key=f"{S3_PREFIX}/c/dst")
    assert head["ETag"] == version and version.strip('"').endswith("-3")
    assert store.head("c/dst").token == "t-1"
    assert pending_uploads(store) == []


def check_error(url, endpoint, *needles) -> StoreError:
    store = open_store(url, s3_endpoint_url=endpoint)
    try:
        with pytest.raises(StoreError) as info:
            store.check()
    finally:
        store.close()
    error = info.value
    message = str(error)
    assert error.transient is False
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message
    assert "shufflefs-test-secret" not in message
    print(f"check() of {url}: {message}")
    return error


def test_s3_check_missing_bucket(seaweed, monkeypatch, tmp_path):
    use_s3_env(monkeypatch, tmp_path, seaweed)
    check_error(
        "s3://no-such-bucket-here/p",
        seaweed.endpoint_url,
        "bucket 'no-such-bucket-here' does not exist",
        seaweed.endpoint_url,
    )


def test_s3_check_wrong_secret(seaweed, monkeypatch, tmp_path, local):
    bucket = new_bucket(seaweed)
    use_s3_env(monkeypatch, tmp_path, seaweed, AWS_SECRET_ACCESS_KEY="not-the-secret")
    check_error(f"s3://{bucket}", seaweed.endpoint_url, f"access denied to bucket {bucket!r}", "credentials")
    # the operations fail for good, too (no point retrying)
    store = open_store(f"s3://{bucket}", s3_endpoint_url=seaweed.endpoint_url)
    with pytest.raises(StoreError) as info:
        store.put_file("k", local.file(b"data"))
    assert info.value.transient is False
    assert "not-the-secret" not in str(info.value)
    with pytest.raises(StoreError) as info:
        store.list_dir("")
    assert info.value.transient is False
    with pytest.raises(StoreError) as info:
        store.delete_many(["k"])
    assert info.value.transient is False
    store.close()


def test_s3_check_wrong_access_key(seaweed, monkeypatch, tmp_path):
    bucket = new_bucket(seaweed)
    use_s3_env(monkeypatch, tmp_path, seaweed, AWS_ACCESS_KEY_ID="nobody")
    check_error(f"s3://{bucket}", seaweed.endpoint_url, "access denied")


def test_s3_check_no_credentials(seaweed, monkeypatch, tmp_path):
    bucket = new_bucket(seaweed)
    use_s3_env(monkeypatch, tmp_path, None)
    check_error(f"s3://{bucket}", seaweed.endpoint_url, "no AWS credentials found")


def test_s3_unreachable_endpoint(monkeypatch, tmp_path):
    use_s3_env(monkeypatch, tmp_path, None, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    check_error("s3://bucket/p", endpoint, f"cannot reach S3 endpoint {endpoint}", "connection refused")
    # an operation's connection failure is worth retrying
    store = open_store("s3://bucket/p", s3_endpoint_url=endpoint)
    with pytest.raises(StoreError) as info:
        store.head("k")
    assert info.value.transient is True
    assert "connection refused" in str(info.value)
    store.close()
    assert time.monotonic() - started < 10  # botocore did not retry


def test_s3_one_attempt_per_call(monkeypatch, tmp_path, local):
    """botocore must not retry (the caller owns retries): a server that hangs up on every
    request sees exactly one connection per call, and the failure is transient."""
    use_s3_env(monkeypatch, tmp_path, None, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def hang_up():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    store = open_store("s3://bucket/p", s3_endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        for call in (
            lambda: store.head("k"),
            lambda: store.get_range("k", 0, 10),
            lambda: store.put_file("k", local.file(b"x" * 1000)),
            lambda: store.list_dir(""),
        ):
            before = len(connections)
            with pytest.raises(StoreError) as info:
                call()
            assert info.value.transient is True
            assert "\n" not in str(info.value)
            assert len(connections) == before + 1
    finally:
        store.close()
        listener.close()
        thread.join(5)


def test_s3_endpoint_from_environment(seaweed, monkeypatch, tmp_path, local):
    bucket = new_bucket(seaweed)
    use_s3_env(monkeypatch, tmp_path, seaweed)  # sets AWS_ENDPOINT_URL
    store = open_store(f"s3://{bucket}")
    store.check()
    assert store.endpoint == seaweed.endpoint_url
    put(store, local, "top", b"at the bucket's top")
    assert seaweed.client().get_object(Bucket=bucket, Key="top")["Body"].read() == b"at the bucket's top"
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "ftp://x",
        "file://relative",
        "nothing",
        "s3://bucket/p?x=1",
        "s3://user:hunter2@bucket/p",
    ],
)
def test_bad_store_urls(url):
    with pytest.raises(StoreError) as info:
        open_store(url, s3_endpoint_url="http://127.0.0.1:1")
    assert info.value.transient is False
    assert "\n" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_s3_url_and_prefix_parsing(monkeypatch, tmp_path):
    use_s3_env(monkeypatch, tmp_path, None, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    store = open_store("s3://bkt/a/b/", s3_endpoint_url="http://127.0.0.1:1")
    assert (store.bucket, store.prefix, store.url) == ("bkt", "a/b", "s3://bkt/a/b")
    store = open_store("s3://bkt", s3_endpoint_url="http://127.0.0.1:1")
    assert (store.prefix, store.url) == ("", "s3://bkt")


def test_s3_put_file_local_errors(store, tmp_path):
    """A local file that cannot be read is reported as such (not as a network error) and is not
    worth retrying."""
    if not isinstance(store, S3Store):
        pytest.skip("S3 only (the memory store lets the OSError through)")
    for path, needle in ((tmp_path / "does-not-exist", "No such file"), (tmp_path, "not a regular file")):
        with pytest.raises(StoreError) as info:
            store.put_file("k", str(path))
        assert info.value.transient is False
        assert needle in str(info.value) and "cannot reach" not in str(info.value)
    assert store.head("k") is None
