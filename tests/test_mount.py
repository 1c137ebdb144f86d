"""Layer 3: real mounts, real syscalls. Each test names the docs/SEMANTICS.md row it checks."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from shufflefs.testing.mounting import Mount, bucket_objects, is_mounted, run_cli, store_objects

DATA = os.urandom(3 * 1024 * 1024 + 17)


def spark_commit(directory: str, shuffle: int, map_id: int, partitions: list[bytes]) -> dict[str, bytes]:
    """Write one map output the way Spark's IndexShuffleBlockResolver does (temp files with
    O_APPEND / O_TRUNC, then renames into the final names). Returns name -> bytes."""
    base = os.path.join(directory, f"shuffle_{shuffle}_{map_id}_0")
    data = b"".join(partitions)
    offsets = [0]
    for part in partitions:
        offsets.append(offsets[-1] + len(part))
    index = b"".join(o.to_bytes(8, "big") for o in offsets)
    checksum = b"".join(len(p).to_bytes(8, "big") for p in partitions)
    files = {".data": data, ".index": index, ".checksum.ADLER32": checksum}
    for suffix, content in files.items():
        temp = f"{base}{suffix}.{uuid.uuid4()}"
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if suffix == ".data" else os.O_TRUNC)
        fd = os.open(temp, flags, 0o644)
        for start in range(0, len(content), 32 * 1024):
            os.write(fd, content[start : start + 32 * 1024])
            os.fstat(fd)  # FileChannel.position() on an append channel
        os.close(fd)
        assert not os.path.exists(base + suffix)
        os.rename(temp, base + suffix)
    return {os.path.basename(base) + suffix: content for suffix, content in files.items()}


def rel(mount: Mount, path: str) -> str:
    return os.path.relpath(path, mount.path)


def test_write_read_roundtrip(file_mount):
    path = os.path.join(file_mount.path, "temp_local_1")
    with open(path, "wb") as f:
        f.write(DATA)
    with open(path, "rb") as f:
        assert f.read() == DATA
    with pytest.raises(FileExistsError):
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert os.stat(path).st_size == len(DATA)
    assert store_objects(file_mount.store_root) == {}  # scratch never leaves the node


def test_append_writes(file_mount):
    path = os.path.join(file_mount.path, "temp_shuffle_x")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(100):
        os.write(fd, bytes([i]) * 1000)
        assert os.fstat(fd).st_size == (i + 1) * 1000
    os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"".join(bytes([i]) * 1000 for i in range(100))


def test_rename_commits_and_sizes_are_exact(file_mount):
    bucket_dir = os.path.join(file_mount.path, "blockmgr-10000000-0000-4000-8000-000000000000", "0c")
    os.makedirs(bucket_dir)
    parts = [os.urandom(n) for n in (1000, 0, 70000, 5)]
    written = spark_commit(bucket_dir, 0, 5, parts)
    for name, content in written.items():
        assert os.stat(os.path.join(bucket_dir, name)).st_size == len(content)
    objects = store_objects(file_mount.store_root)
    # sync commit: the objects are there when rename returns, and nothing else is
    assert objects == {
        f"blockmgr-10000000-0000-4000-8000-000000000000/0c/{name}": content for name, content in written.items()
    }


def test_rename_semantics(file_mount):
    m = file_mount.path
    os.makedirs(f"{m}/a")
    os.makedirs(f"{m}/b")
    with open(f"{m}/a/one", "wb") as f:
        f.write(b"one")
    with open(f"{m}/b/two", "wb") as f:
        f.write(b"two")
    os.rename(f"{m}/a/one", f"{m}/b/two")  # across directories, replacing
    assert open(f"{m}/b/two", "rb").read() == b"one"
    assert not os.path.exists(f"{m}/a/one")
    # a committed file moved across blockmgr dirs (Spark's recovery): server-side move
    written = spark_commit(f"{m}/a", 1, 2, [b"x" * 100])
    os.rename(f"{m}/a/shuffle_1_2_0.data", f"{m}/b/shuffle_1_2_0.data")
    assert open(f"{m}/b/shuffle_1_2_0.data", "rb").read() == written["shuffle_1_2_0.data"]
    objects = store_objects(file_mount.store_root)
    assert objects["b/shuffle_1_2_0.data"] == written["shuffle_1_2_0.data"]
    assert "a/shuffle_1_2_0.data" not in objects


def test_committed_file_is_immutable(file_mount):
    written = spark_commit(file_mount.path, 3, 1, [b"abc"])
    path = os.path.join(file_mount.path, "shuffle_3_1_0.data")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(PermissionError):
            os.open(path, flags)
    with pytest.raises(PermissionError):
        os.truncate(path, 1)
    assert open(path, "rb").read() == written["shuffle_3_1_0.data"]


def test_mmap_and_sendfile(file_mount):
    path = os.path.join(file_mount.path, "temp_shuffle_m")
    with open(path, "wb") as f:
        f.write(DATA)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
        assert mapped[:] == DATA
    target = os.path.join(os.path.dirname(file_mount.path), "sendfile-out")
    with open(path, "rb") as src, open(target, "wb") as dst:
        sent = 0
        while sent < len(DATA):
            n = os.sendfile(dst.fileno(), src.fileno(), sent, len(DATA) - sent)
            assert n > 0
            sent += n
    assert open(target, "rb").read() == DATA


def test_directories(file_mount):
    m = file_mount.path
    os.makedirs(f"{m}/d/e/f")
    with pytest.raises(FileExistsError):
        os.mkdir(f"{m}/d")
    open(f"{m}/d/e/file", "wb").close()
    assert sorted(os.listdir(f"{m}/d/e")) == ["f", "file"]
    with pytest.raises(OSError) as raised:
        os.rmdir(f"{m}/d/e")
    assert raised.value.errno == errno.ENOTEMPTY
    os.rmdir(f"{m}/d/e/f")
    os.unlink(f"{m}/d/e/file")
    os.rmdir(f"{m}/d/e")
    assert os.listdir(f"{m}/d") == []
    assert not os.path.exists(f"{m}/d/e")
    # a directory's link count is 2 + its subdirectories (`find` relies on it to skip leaves)
    os.mkdir(f"{m}/d/sub1")
    os.mkdir(f"{m}/d/sub2")
    open(f"{m}/d/file", "wb").close()
    assert os.stat(f"{m}/d").st_nlink == 4 and os.stat(f"{m}/d/sub1").st_nlink == 2
    os.rename(f"{m}/d/sub2", f"{m}/d/sub1/sub2")
    assert os.stat(f"{m}/d").st_nlink == 3 and os.stat(f"{m}/d/sub1").st_nlink == 3
    assert os.stat(m).st_nlink == 3


def test_names_and_paths(file_mount):
    m = file_mount.path
    os.mkdir(f"{m}/d")
    open(f"{m}/d/f", "wb").close()
    long = f"{m}/d/" + "n" * 256
    for call in (
        os.stat,
        os.mkdir,
        os.unlink,
        os.rmdir,
        lambda path: open(path, "wb"),
        lambda path: os.rename(f"{m}/d/f", path),
        lambda path: os.rename(path, f"{m}/d/g"),
    ):
        with pytest.raises(OSError) as raised:
            call(long)
        assert raised.value.errno == errno.ENAMETOOLONG, call
    # a directory is recorded (LMDB) by its path: 511 bytes at most, refused beyond, never half made
    deep = f"{m}/" + "/".join(["p" * 255, "q" * 255])
    os.makedirs(deep)
    for call in (os.mkdir, lambda path: os.rename(f"{m}/d", path)):
        with pytest.raises(OSError) as raised:
            call(f"{deep}/x")
        assert raised.value.errno == errno.ENAMETOOLONG
    assert os.listdir(deep) == []
    # the file store hides names starting with its temporary prefix
    with pytest.raises(OSError) as raised:
        os.mkdir(f"{m}/d/.shufflefs-tmp-1")
    assert raised.value.errno == errno.EINVAL
    assert sorted(os.listdir(f"{m}/d")) == ["f"]


def test_concurrent_rm_rf(file_mount):
    m = file_mount.path
    for b in range(8):
        directory = f"{m}/blockmgr-a0000000-0000-4000-8000-000000000000/{b:02x}"
        os.makedirs(directory)
        for i in range(30):
            with open(f"{directory}/temp_shuffle_{i}", "wb") as f:
                f.write(b"t" * 100)
        spark_commit(directory, 0, b, [b"d" * 50])
    assert len(store_objects(file_mount.store_root)) == 8 * 3
    removers = [
        subprocess.Popen(["rm", "-rf", f"{m}/blockmgr-a0000000-0000-4000-8000-000000000000"], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in removers]
    assert not os.path.exists(f"{m}/blockmgr-a0000000-0000-4000-8000-000000000000")
    assert any(code == 0 for code, _ in results), results
    assert file_mount.umount().returncode == 0  # deletes are drained at unmount
    assert store_objects(file_mount.store_root) == {}


def test_chmod_and_utimes(file_mount):
    m = file_mount.path
    os.mkdir(f"{m}/dir")
    for mode in (0o700, 0o750, 0o755):  # Spark's chmod sequence on directories
        os.chmod(f"{m}/dir", mode)
        assert os.stat(f"{m}/dir").st_mode & 0o777 == mode
    open(f"{m}/dir/f", "wb").close()
    os.utime(f"{m}/dir/f", ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(f"{m}/dir/f").st_mtime_ns == 2_000_000_000


def test_statfs(tmp_path, file_store):
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--cache-size", "64M") as mount:
        before = os.statvfs(mount.path)
        assert before.f_blocks * before.f_frsize == 64 * 1024 * 1024
        with open(f"{mount.path}/temp_local", "wb") as f:
            f.write(b"x" * 8 * 1024 * 1024)
        after = os.statvfs(mount.path)
        assert (before.f_bavail - after.f_bavail) * after.f_frsize == 8 * 1024 * 1024
        # a hole takes no space: extending a file beyond --cache-size is not refused
        with open(f"{mount.path}/temp_sparse", "wb") as f:
            f.truncate(1024 * 1024 * 1024)
        assert os.stat(f"{mount.path}/temp_sparse").st_size == 1024 * 1024 * 1024
        assert os.statvfs(mount.path).f_bavail == after.f_bavail


def test_fsync_and_locks(file_mount):
    path = f"{file_mount.path}/addfile.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    os.fsync(fd)
    os.fdatasync(fd)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    probe = (
        "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe, path]).returncode == 3  # held by us
    fcntl.lockf(fd, fcntl.LOCK_UN)
    assert subprocess.run([sys.executable, "-c", probe, path]).returncode == 0
    os.close(fd)


def test_unsupported_operations(file_mount):
    m = file_mount.path
    open(f"{m}/f", "wb").close()
    with pytest.raises(PermissionError):
        os.link(f"{m}/f", f"{m}/g")
    with pytest.raises(PermissionError):
        os.symlink("f", f"{m}/s")
    with pytest.raises(PermissionError):
        os.mkfifo(f"{m}/fifo")
    with pytest.raises(OSError) as raised:
        os.setxattr(f"{m}/f", "user.x", b"1")
    assert raised.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as raised:
        os.getxattr(f"{m}/f", "user.x")
    assert raised.value.errno == errno.EOPNOTSUPP


def commit_and_read_from_second_mount(
    first: Mount, second: Mount, directory: str, partitions: list[bytes]
) -> dict[str, bytes]:
    """Commit one map output (and a scratch file) in `directory` of the first mount; the second
    mount, of the same store, lists and reads exactly the committed files, also the way a
    reducer reads an index (seek, two 8-byte reads). Returns key -> bytes."""
    os.makedirs(f"{first.path}/{directory}")
    written = spark_commit(f"{first.path}/{directory}", 0, 7, partitions)
    with open(f"{first.path}/{directory}/temp_shuffle_local", "wb") as f:
        f.write(b"scratch")
    other = f"{second.path}/{directory}"
    assert sorted(os.listdir(other)) == sorted(written)
    for name, content in written.items():
        with open(f"{other}/{name}", "rb") as f:
            assert f.read() == content
    with open(f"{other}/shuffle_0_7_0.index", "rb") as f:
        f.seek(8)
        assert int.from_bytes(f.read(8), "big") == len(partitions[0])
    return {f"{directory}/{name}": content for name, content in written.items()}


def test_second_mount_sees_committed_files(tmp_path, s3_env, bucket, seaweed):
    url = f"s3://{bucket}/jobs"
    with (
        Mount(url, tmp_path / "a", tmp_path / "cache-a", env=s3_env) as first,
        Mount(url, tmp_path / "b", tmp_path / "cache-b", env=s3_env) as second,
    ):
        written = commit_and_read_from_second_mount(
            first,
            second,
            "spark-1/executor-0/blockmgr-20000000-0000-4000-8000-000000000000/0c",
            [os.urandom(5000), os.urandom(300)],
        )
        assert sorted(os.listdir(second.path)) == ["spark-1"]
        assert bucket_objects(seaweed.client(), bucket, "jobs") == written


def test_sigkill_recovery_completes_pending_uploads(tmp_path, s3_env, bucket, seaweed):
    url = f"s3://{bucket}"
    mount = Mount(url, tmp_path / "mnt", tmp_path / "cache", "--commit", "async", env=s3_env)
    with mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        os.kill(seaweed.process.pid, signal.SIGSTOP)  # the store stops answering
        try:
            started = time.monotonic()
            written = spark_commit(
                f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00", 0, 1, [os.urandom(20000)]
            )
            assert time.monotonic() - started < 5, "async commit must not wait for the store"
            mount.kill()
        finally:
            os.kill(seaweed.process.pid, signal.SIGCONT)
        assert not is_mounted(mount.path)
        assert bucket_objects(seaweed.client(), bucket) == {}
    with Mount(url, tmp_path / "mnt", tmp_path / "cache", "--commit", "async", env=s3_env) as again:
        assert sorted(os.listdir(f"{again.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")) == sorted(written)
        assert again.umount().returncode == 0
    assert bucket_objects(seaweed.client(), bucket) == {
        f"blockmgr-10000000-0000-4000-8000-000000000000/00/{n}": c for n, c in written.items()
    }


def test_sigterm_drains_pending_uploads(tmp_path, s3_env, bucket, seaweed):
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async", env=s3_env) as mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        os.kill(seaweed.process.pid, signal.SIGSTOP)
        try:
            written = spark_commit(
                f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00", 2, 3, [os.urandom(100000)]
            )
            os.kill(mount.pid, signal.SIGTERM)
            time.sleep(1)
            assert is_mounted(mount.path), "the mount must stay until the uploads are drained"
        finally:
            os.kill(seaweed.process.pid, signal.SIGCONT)
        mount.wait_exit(120)
        assert not is_mounted(mount.path)
        assert mount.status()["given_up"] == 0
    assert bucket_objects(seaweed.client(), bucket) == {
        f"blockmgr-10000000-0000-4000-8000-000000000000/00/{n}": c for n, c in written.items()
    }


def test_small_cache_reads_back_evicted_files(tmp_path, file_store):
    """--cache-size bounds local bytes: uploaded files are evicted and read back remotely."""
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--cache-size", "10M") as mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        blobs = {}
        for map_id in range(6):
            blobs.update(
                spark_commit(
                    f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00",
                    0,
                    map_id,
                    [os.urandom(3 * 1024 * 1024)],
                )
            )
        staged = sum(e.stat().st_size for e in os.scandir(f"{mount.cache_dir}/staging"))
        assert staged <= 10 * 1024 * 1024 < sum(map(len, blobs.values()))
        for name, content in blobs.items():
            with open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/{name}", "rb") as f:
                assert f.read() == content
        with open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data", "rb") as f:
            f.seek(1024 * 1024)
            assert f.read(100) == blobs["shuffle_0_0_0.data"][1024 * 1024 : 1024 * 1024 + 100]


def test_large_file_uses_multipart_upload(tmp_path, s3_env, bucket, seaweed):
    big = os.urandom(40 * 1024 * 1024 + 123)
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", env=s3_env) as mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        spark_commit(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00", 4, 4, [big])
        head = seaweed.client().head_object(
            Bucket=bucket, Key="blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_4_4_0.data"
        )
        assert head["ContentLength"] == len(big)
        assert "-" in head["ETag"], "a 40 MiB file must go up in parts"
        body = (
            seaweed.client()
            .get_object(Bucket=bucket, Key="blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_4_4_0.data")[
                "Body"
            ]
            .read()
        )
        assert body == big


def test_store_failure_reaches_the_writer_and_umount_reports_it(tmp_path, s3_env):
    """Sync commit against a store that went away: the committing rename fails with EIO after
    the retries (and changes nothing); the close that commits a file written under its final
    name fails the same way, and that upload stays: umount cannot drain it, says so, exits 1,
    and it stays in the journal."""
    from shufflefs.testing.servers import SeaweedS3

    server = SeaweedS3().start()
    try:
        bucket = server.create_bucket("gone")
        env = {**s3_env, **server.env()}
        with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", env=env) as mount:
            os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
            server.stop()
            temp = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index.tmp"
            with open(temp, "wb") as f:
                f.write(b"\0" * 16)
            started = time.monotonic()
            with pytest.raises(OSError) as raised:
                os.rename(temp, f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index")
            assert raised.value.errno == errno.EIO
            assert time.monotonic() - started < 60
            assert os.listdir(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00") == [
                "shuffle_0_0_0.index.tmp"
            ]
            fd = os.open(
                f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index",
                os.O_WRONLY | os.O_CREAT,
                0o644,
            )
            os.write(fd, b"\0" * 16)
            with pytest.raises(OSError) as raised:
                os.close(fd)
            assert raised.value.errno == errno.EIO
            result = mount.umount()
            assert result.returncode == 1
            assert "could not be completed" in result.stderr and "same --cache-dir" in result.stderr
            assert not is_mounted(mount.path)
    finally:
        server.stop()
    from shufflefs.journal import Journal

    journal = Journal(str(tmp_path / "cache" / "lmdb"))
    try:
        # the upload; and a look, later, for what the cancelled upload of the rename may leave
        assert sorted((r["kind"], r["key"]) for _, r in journal.pending_ops()) == [
            ("put", "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index"),
            ("sweep", "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index"),
        ]
    finally:
        journal.close()


def test_page_cache_kept_across_opens_and_coherent(file_mount):
    """Every open keeps the kernel's cached pages (no READ reaches the daemon for bytes
    written through the mount), and what is read is always what was last written."""

    def fuse_reads() -> int:
        result = run_cli("stats", file_mount.path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["fuse"]["requests"].get("read", 0)

    path = f"{file_mount.path}/temp_shuffle_cached"
    data = os.urandom(300_000)
    with open(path, "wb") as f:
        f.write(data)
    before = fuse_reads()
    for _ in range(3):
        with open(path, "rb") as f:
            assert f.read() == data
    assert fuse_reads() == before
    with open(path, "r+b") as f:  # rewritten in place, then truncated by an O_TRUNC open
        f.write(b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new" + data[3:]
    with open(path, "wb") as f:
        f.write(b"short")
    with open(path, "rb") as f:
        assert f.read() == b"short"


def test_shell_redirection_into_a_durable_name(file_mount):
    """`cmd > shuffle_..index` (the shell dups the descriptor and closes the original before
    cmd writes: an early commit) ends with the whole file stored."""
    path = f"{file_mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index"
    os.makedirs(os.path.dirname(path))
    result = subprocess.run(["sh", "-c", f"head -c 24 /dev/urandom > {path}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(path, "rb") as f:
        content = f.read()
    assert len(content) == 24
    assert store_objects(file_mount.store_root) == {
        "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index": content
    }


def test_sigterm_waits_for_open_shuffle_files(tmp_path, file_store):
    """A shuffle file still open for writing when SIGTERM comes (async mode commits it at the
    RELEASE after its close) gets a few seconds to be closed, and is then stored, not lost."""
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async") as mount:
        path = f"{mount.path}/shuffle_0_0_0.index"
        with open(path, "wb") as f:
            f.write(b"\1" * 8)
            os.kill(mount.pid, signal.SIGTERM)
            time.sleep(1)
            f.write(b"\2" * 8)
        mount.wait_exit(60)
        assert mount.status()["given_up"] == 0
    assert store_objects(str(file_store)) == {"shuffle_0_0_0.index": b"\1" * 8 + b"\2" * 8}


def half_full_directory(mount: Mount) -> str:
    """A new directory on a mount with --cache-size 8M, of which 4 MiB are taken by local data
    (never evicted)."""
    directory = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
    os.makedirs(directory)
    with open(f"{directory}/temp_local_blocker", "wb") as f:
        f.write(b"b" * 4 * 1024 * 1024)
    return directory


@pytest.mark.parametrize("commit", ["sync", "async"])
def test_failed_write_is_never_committed(tmp_path, file_store, commit):
    """With the writeback cache write() always succeeds; the WRITE that fails (a full
    --cache-size) comes at close. Such a file is never committed, under its durable name nor
    by a rename into one; fsync reports the error every time (and in sync mode every close of
    a writer), the mount shows what is held, and a rewrite from empty makes it whole again."""
    # with passthrough there is no writeback cache: test_failed_write_fails_at_write_with_passthrough
    passthrough_off = [] if os.environ.get("SHUFFLEFS_TEST_FUSE") == "pyfuse3" else ["--no-passthrough"]
    with Mount(
        f"file://{file_store}",
        tmp_path / "mnt",
        tmp_path / "cache",
        "--cache-size",
        "8M",
        "--commit",
        commit,
        *passthrough_off,
    ) as mount:
        directory = half_full_directory(mount)
        data = os.urandom(16 * 1024 * 1024)
        path = f"{directory}/shuffle_0_0_0.data"
        temp = f"{directory}/shuffle_0_1_0.data.{uuid.uuid4()}"
        for name in (path, temp):  # written under its final name; written for a rename
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for start in range(0, len(data), 32 * 1024):
                assert os.write(fd, data[start : start + 32 * 1024]) == 32 * 1024
            with pytest.raises(OSError) as raised:
                os.close(fd)
            assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as raised:
            os.rename(temp, f"{directory}/shuffle_0_1_0.data")
        assert raised.value.errno == errno.EIO
        assert sorted(os.listdir(directory)) == sorted(
            ["temp_local_blocker", "shuffle_0_0_0.data", os.path.basename(temp)]
        )
        for name in (path, temp):
            # what the mount shows is what is held (once the kernel has let go of its own size)
            deadline = time.monotonic() + 10
            while os.stat(name).st_size == len(data) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(name, "rb") as f:
                held = f.read()
            assert len(held) == os.stat(name).st_size < len(data) and held == data[: len(held)]
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)
            for _ in range(2):
                with pytest.raises(OSError) as raised:
                    os.fsync(fd)
                assert raised.value.errno == errno.ENOSPC
            if commit == "sync":  # async mode commits at RELEASE and never hears of close
                with pytest.raises(OSError) as raised:
                    os.close(fd)
                assert raised.value.errno == errno.ENOSPC
            else:
                os.close(fd)
        assert mount.log().count("failed (No space left on device)") == 2  # once per file
        assert store_objects(str(file_store)) == {}

        os.unlink(f"{directory}/temp_local_blocker")
        with open(path, "wb") as f:  # O_TRUNC: rewritten from empty
            f.write(b"whole")
        assert mount.umount().returncode == 0
    assert store_objects(str(file_store)) == {
        "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data": b"whole"
    }


@pytest.mark.parametrize("commit", ["sync", "async"])
def test_failed_write_fails_at_write_with_passthrough(tmp_path, file_store, commit):
    """Passthrough mounts have no writeback cache: a durable name written directly is served
    by the daemon, so the WRITE that finds --cache-size full fails write(2) itself. The file is
    never committed, fsync keeps reporting the error, and what the mount shows is what is held."""
    if os.environ.get("SHUFFLEFS_TEST_FUSE") == "pyfuse3":
        pytest.skip("pyfuse3 cannot pass files through")
    with Mount(
        f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--cache-size", "8M", "--commit", commit
    ) as mount:
        assert json.loads(run_cli("stats", mount.path).stdout)["fuse"]["passthrough"]
        directory = half_full_directory(mount)
        data = os.urandom(16 * 1024 * 1024)
        path = f"{directory}/shuffle_0_0_0.data"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        written = 0
        with pytest.raises(OSError) as raised:
            while True:
                written += os.write(fd, data[written : written + 32 * 1024])
        assert raised.value.errno == errno.ENOSPC
        assert written == 4 * 1024 * 1024
        with pytest.raises(OSError) as raised:
            os.fsync(fd)
        assert raised.value.errno == errno.ENOSPC
        if commit == "sync":
            with pytest.raises(OSError) as raised:
                os.close(fd)
            assert raised.value.errno == errno.ENOSPC
        else:
            os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == data[:written]
        assert os.stat(path).st_size == written
        run_cli("stats", mount.path, "--sync")
    assert store_objects(str(file_store)) == {}


def test_failed_sync_rename_changes_nothing(tmp_path, file_store):
    """A sync rename the store keeps failing returns EIO after the retries and changes nothing,
    in the kernel's view and the daemon's alike: the old name still opens, the new name does
    not exist and is not listed, and Spark's retry renames once the store is back. Both kinds:
    a commit (over a committed file) and a server-side move of a committed file."""
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache") as mount:
        directory = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        written = spark_commit(directory, 0, 0, [b"old"])
        temp = f"{directory}/shuffle_0_0_0.data.{uuid.uuid4()}"
        with open(temp, "wb") as f:
            f.write(b"new")
        final, moved = f"{directory}/shuffle_0_0_0.data", f"{directory}/shuffle_0_9_0.data"
        assert not os.path.exists(moved)  # the kernel caches the absence
        stored = f"{file_store}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        # the store fails, also for root (who ignores modes)
        if subprocess.run(["chattr", "+i", stored], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        try:
            for source, target in ((temp, final), (final, moved)):
                with pytest.raises(OSError) as raised:
                    os.rename(source, target)
                assert raised.value.errno == errno.EIO
            assert sorted(os.listdir(directory)) == sorted([*written, os.path.basename(temp)])
            assert open(temp, "rb").read() == b"new" and open(final, "rb").read() == b"old"
            assert not os.path.exists(moved)
        finally:
            subprocess.run(["chattr", "-i", stored], check=True)
        os.rename(temp, final)  # Spark's retry
        os.rename(final, moved)
        assert open(moved, "rb").read() == b"new" and not os.path.exists(final)
        assert sorted(os.listdir(directory)) == sorted(
            ["shuffle_0_0_0.index", "shuffle_0_0_0.checksum.ADLER32", "shuffle_0_9_0.data"]
        )
        assert mount.umount().returncode == 0
    objects = store_objects(str(file_store))
    assert objects["blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_9_0.data"] == b"new"
    assert "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data" not in objects


def test_a_stopped_store_bounds_file_operations(tmp_path, s3_env, bucket, seaweed):
    """--store-timeout bounds what waits for the store: `ls` answers from the last listing and
    a sync commit fails with EIO, both within the bound, while the store does not answer."""
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", "--store-timeout", "2", env=s3_env) as mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        spark_commit(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00", 0, 1, [b"before"])
        assert os.listdir(mount.path) == ["blockmgr-10000000-0000-4000-8000-000000000000"]
        temp = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_2_0.data.tmp"
        with open(temp, "wb") as f:
            f.write(b"during the outage")
        os.kill(seaweed.process.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # the root's listing is older than remote_ttl
            started = time.monotonic()
            listed = subprocess.run(["ls", mount.path], capture_output=True, text=True, timeout=30)
            assert (
                listed.stdout.split() == ["blockmgr-10000000-0000-4000-8000-000000000000"]
                and time.monotonic() - started < 5
            )
            started = time.monotonic()
            with pytest.raises(OSError) as raised:
                os.rename(temp, temp[: -len(".tmp")])
            assert raised.value.errno == errno.EIO and time.monotonic() - started < 5
        finally:
            os.kill(seaweed.process.pid, signal.SIGCONT)
        assert os.path.exists(temp)  # the rename changed nothing
        os.rename(temp, temp[: -len(".tmp")])
        assert mount.umount().returncode == 0
