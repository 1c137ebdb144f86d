"""The command line: every way a mount can be refused gives one clear line, a non-zero exit, no
traceback, and leaves nothing mounted; umount drains; python -m shufflefs works."""

from __future__ import annotations

import errno
import os

import pytest

from shufflefs.testing.mounting import Mount, is_mounted, run_cli
from shufflefs.testing.servers import free_port


def assert_refused(result, mountpoint, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shufflefs: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not is_mounted(str(mountpoint))


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(str(path)):
        os.system(f"fusermount3 -u -z {path}")
        pytest.fail("a refused mount left a mount behind")


def mount_cli(store_url, mountpoint, cache_dir, *extra, env=None):
    return run_cli("mount", store_url, str(mountpoint), "--cache-dir", str(cache_dir), *extra, env=env)


@pytest.mark.parametrize(
    "url, needle",
    [
        ("ftp://host/x", "unsupported store URL scheme 'ftp'"),
        ("just-a-path", "has no scheme"),
        ("just-a-path", "daos://"),
        ("file://relative/dir", "file:///absolute/path"),
        ("s3://", "bucket"),
        ("s3://[bad", "malformed store URL"),
    ],
)
def test_bad_store_url(tmp_path, mnt, url, needle):
    assert_refused(mount_cli(url, mnt, tmp_path / "cache"), mnt, needle)


def test_missing_store_directory(tmp_path, mnt):
    assert_refused(mount_cli(f"file://{tmp_path}/nope", mnt, tmp_path / "cache"), mnt, "does not exist")


def test_unreachable_endpoint(tmp_path, mnt, s3_env):
    port = free_port()
    env = {**os.environ, **s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    assert_refused(mount_cli("s3://somebucket", mnt, tmp_path / "cache", env=env), mnt, "cannot reach")


def test_missing_bucket(tmp_path, mnt, s3_env):
    env = {**os.environ, **s3_env}
    assert_refused(
        mount_cli("s3://no-such-bucket-here", mnt, tmp_path / "cache", env=env),
        mnt,
        "no-such-bucket-here",
        "does not exist",
    )


def test_bad_credentials(tmp_path, mnt, s3_env, bucket):
    env = {**os.environ, **s3_env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = mount_cli(f"s3://{bucket}", mnt, tmp_path / "cache", env=env)
    assert_refused(result, mnt, "access denied")
    assert "wrong-secret" not in result.stderr


def test_mountpoint_missing(tmp_path, file_store):
    missing = tmp_path / "missing"
    assert_refused(mount_cli(f"file://{file_store}", missing, tmp_path / "cache"), missing, "does not exist")


def test_mountpoint_not_a_directory(tmp_path, file_store):
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    assert_refused(mount_cli(f"file://{file_store}", path, tmp_path / "cache"), path, "not a directory")


def test_mountpoint_not_empty(tmp_path, mnt, file_store):
    (mnt / "something").write_bytes(b"")
    assert_refused(mount_cli(f"file://{file_store}", mnt, tmp_path / "cache"), mnt, "not empty")


def test_mountpoint_already_mounted(tmp_path, file_mount, file_store):
    result = mount_cli(f"file://{file_store}", file_mount.path, tmp_path / "cache2")
    assert result.returncode == 1 and "already a mount point" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_next_mount_covers_a_stale_mount_and_umount_clears_them(tmp_path, file_store):
    mount = Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache")
    with mount:
        os.makedirs(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00")
        with open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index", "wb") as f:
            f.write(b"\0" * 16)
        mount.kill_only()
        assert is_mounted(mount.path)  # the kernel keeps the dead mount: ENOTCONN
        with pytest.raises(OSError) as raised:
            os.statvfs(mount.path)  # (stat may still be answered from the kernel's cache)
        assert raised.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        mount.start()  # the same command as before: it mounts over the stale mount
        with open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index", "rb") as f:
            assert f.read() == b"\0" * 16
        assert "mounted over the stale mount a dead daemon left" in mount.log()
        assert mount.umount().returncode == 0  # a clean unmount also clears what it covered
        assert not is_mounted(mount.path)
        mount.start()
        mount.kill_only()
        mount.start()
        mount.kill_only()  # two dead mounts stacked
        result = run_cli("umount", mount.path)
        assert result.returncode == 0  # umount clears them all, and says so once
        assert result.stderr.strip().splitlines() == [
            f"shufflefs: {mount.path} was a stale mount (no daemon); unmounted it"
        ], result.stderr
        assert not is_mounted(mount.path)


def test_cache_dir_in_use(tmp_path, file_mount, file_store):
    other = tmp_path / "other"
    other.mkdir()
    assert_refused(
        mount_cli(f"file://{file_store}", other, file_mount.cache_dir), other, "in use by another shufflefs daemon"
    )


def test_cache_dir_of_another_store(tmp_path, mnt, file_store):
    other_store = tmp_path / "other-store"
    other_store.mkdir()
    with Mount(f"file://{file_store}", tmp_path / "first", tmp_path / "cache"):
        pass
    assert_refused(mount_cli(f"file://{other_store}", mnt, tmp_path / "cache"), mnt, "belongs to store")


def test_cache_dir_or_store_inside_the_mountpoint(tmp_path, mnt, file_store):
    assert_refused(mount_cli(f"file://{file_store}", mnt, mnt / "cache"), mnt, "inside the mountpoint")
    assert_refused(mount_cli(f"file://{mnt}/store", mnt, tmp_path / "cache"), mnt, "does not exist")
    assert not os.path.exists(mnt / "cache")


@pytest.mark.parametrize("layout", ["same", "store-holds-cache", "cache-holds-store", "symlink"])
def test_store_directory_and_cache_dir_apart(tmp_path, mnt, layout):
    """A store directory holding the cache dir would serve the daemon's own LMDB, lock, log and
    staging files through the mount."""
    store = tmp_path / "cache" / "store" if layout == "cache-holds-store" else tmp_path / "store"
    store.mkdir(parents=True)
    cache = {
        "same": store,
        "store-holds-cache": store / "cache",
        "cache-holds-store": tmp_path / "cache",
        "symlink": tmp_path / "link-to-store",
    }[layout]
    if layout == "symlink":  # real paths are compared
        cache.symlink_to(store)
    assert_refused(mount_cli(f"file://{store}", mnt, cache), mnt, "overlap")
    assert not os.path.exists(store / "lmdb") and not os.path.exists(store / "cache" / "lmdb")
    if layout == "store-holds-cache":  # refused before the log, and the cache dir with it, is made
        assert os.listdir(store) == []


def test_log_file_inside_the_store_is_refused(tmp_path, mnt, file_store):
    """The mount would show the daemon's log, deletable through it."""
    log = file_store / "shufflefs.log"
    assert_refused(
        mount_cli(f"file://{file_store}", mnt, tmp_path / "cache", "--log-file", str(log)),
        mnt,
        "inside the store directory",
    )
    assert os.listdir(file_store) == []


def test_credentials_in_the_store_url_never_reach_the_daemon(tmp_path, mnt):
    result = mount_cli("s3://user:s3cr3t-pw@bucket/prefix", mnt, tmp_path / "cache")
    assert result.returncode == 1 and "s3cr3t" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "must not contain credentials" in result.stderr
    assert not os.path.exists(tmp_path / "cache")  # refused before the daemon (and its log) was started


def test_mountpoint_inside_the_store_or_cache_dir(tmp_path, file_store):
    inside_store = file_store / "mnt"
    inside_store.mkdir()
    assert_refused(
        mount_cli(f"file://{file_store}", inside_store, tmp_path / "cache"), inside_store, "inside the store directory"
    )
    cache = tmp_path / "cache"
    inside_cache = cache / "mnt"
    inside_cache.mkdir(parents=True)
    assert_refused(mount_cli(f"file://{file_store}", inside_cache, cache), inside_cache, "inside the cache dir")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://user:s3cr3t-pw@127.0.0.1:9",
        "http://s3cr3t-pw@127.0.0.1:9",
        "user:s3cr3t-pw@127.0.0.1:9",
        "http://user:s3cr3t-pw@[bad",
    ],
)
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_credentials_in_the_endpoint_url_are_refused(tmp_path, mnt, bucket, s3_env, endpoint, how):
    """They would be on the daemon's command line, for every user's `ps`."""
    env = {**os.environ, **s3_env}
    if how == "flag":
        result = mount_cli(f"s3://{bucket}", mnt, tmp_path / "cache", "--s3-endpoint-url", endpoint, env=env)
    else:
        env["AWS_ENDPOINT_URL"] = endpoint
        result = mount_cli(f"s3://{bucket}", mnt, tmp_path / "cache", env=env)
    assert_refused(result, mnt, "must not contain credentials")
    assert "s3cr3t" not in result.stderr


def test_daemon_command_line_has_no_endpoint_credentials(tmp_path, s3_env, bucket):
    with Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", env=s3_env) as mount:
        with open(f"/proc/{mount.pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        endpoint = argv[argv.index("--s3-endpoint-url") + 1]
        assert endpoint == s3_env["AWS_ENDPOINT_URL"] and "@" not in endpoint


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--cache-size", "99999999999999999T"], "too big"),
        (["--cache-size", "9" * 400], "too big"),
        (["--cache-size", "0"], "must be positive"),
        (["--cache-size", "0.1"], "must be positive"),
        (["--owner", "4294967296"], "at most 4294967294"),
        (["--owner", "4294967295"], "at most 4294967294"),
        (["--owner", "185:4294967295"], "at most 4294967294"),
        (["--owner", "-1"], "use a number"),
        (["--upload-workers", "100000000"], "at most 1024"),
        (["--store-timeout", "1e300"], "at most 86400"),
        (["--store-timeout", "nan"], "above 0"),
        (["--late-window", "inf"], "above 0"),
        (["--late-window", "0"], "above 0"),
    ],
)
def test_absurd_values_are_refused(tmp_path, mnt, file_store, args, needle):
    result = mount_cli(f"file://{file_store}", mnt, tmp_path / "cache", *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert not is_mounted(str(mnt))


@pytest.mark.parametrize(
    "args",
    [
        ["umount", "/nowhere", "--timeout", "nan"],
        ["umount", "/nowhere", "--timeout", "-1"],
        ["stats", "/nowhere", "--timeout", "0"],
    ],
)
def test_absurd_timeouts_are_refused(args):
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--timeout" in result.stderr


def test_largest_values_mount(tmp_path, file_store):
    """The bounds themselves are fine: statfs answers, the root belongs to the owner."""
    with Mount(
        f"file://{file_store}",
        tmp_path / "mnt",
        tmp_path / "cache",
        "--cache-size",
        str(2**63 - 1),
        "--owner",
        "4294967294:4294967294",
        "--upload-workers",
        "1024",
    ) as mount:
        vfs = os.statvfs(mount.path)
        assert vfs.f_blocks * vfs.f_frsize == (2**63 - 1) // 4096 * 4096
        assert os.stat(mount.path).st_uid == 4294967294


@pytest.mark.parametrize("name", ["tab\there", "new\nline", "back\\slash", "all \t\n\\ 4"])
def test_mountpoints_with_escaped_characters(tmp_path, file_store, name):
    """/proc/self/mounts writes these as octal escapes (\\011, \\012, \\134): stats, umount and
    mounting over a stale mount must still find the mount."""
    mount = Mount(f"file://{file_store}", tmp_path / name, tmp_path / "cache")
    with mount:
        assert run_cli("stats", mount.path).returncode == 0
        mount.kill_only()
        mount.start()  # over the stale mount
        assert "mounted over the stale mount a dead daemon left" in mount.log()
        result = mount.umount()
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mount.path)
        mount.start()
        mount.kill_only()
        assert run_cli("umount", mount.path).returncode == 0  # clears the stale mount
        assert not is_mounted(mount.path)


def test_umount_of_something_else(tmp_path, mnt):
    result = run_cli("umount", str(mnt))
    assert result.returncode == 1 and "is not a shufflefs mount" in result.stderr


@pytest.mark.parametrize("command", ["umount", "stats"])
def test_a_path_that_does_not_exist(tmp_path, command):
    result = run_cli(command, str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"shufflefs: error: {tmp_path / 'nowhere'} does not exist"], result.stderr


def test_install_mount_helper_names_every_helper_it_installs(tmp_path):
    from shufflefs.mount_helper import HELPER_NAMES

    described = run_cli("install-mount-helper", "--help").stdout
    assert run_cli("install-mount-helper", "--dir", str(tmp_path)).returncode == 0
    assert sorted(os.listdir(tmp_path)) == sorted(HELPER_NAMES)
    assert all(name in " ".join(described.split()) for name in HELPER_NAMES), described


@pytest.mark.parametrize("args", [["--cache-size", "lots"], ["--commit", "later"], ["--upload-workers", "0"]])
def test_bad_options(tmp_path, mnt, file_store, args):
    result = mount_cli(f"file://{file_store}", mnt, tmp_path / "cache", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert not is_mounted(str(mnt))


def test_help_and_version():
    result = run_cli("mount", "--help")
    assert result.returncode == 0 and "--cache-size" in result.stdout and "s3://" in result.stdout
    assert run_cli("--version").stdout.startswith("shufflefs ")


def test_umount_waits_and_reports(tmp_path, file_store):
    mount = Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async")
    with mount:
        os.makedirs(f"{mount.path}/d")
        with open(f"{mount.path}/d/shuffle_0_0_0.data", "wb") as f:
            f.write(os.urandom(1 << 20))
        result = mount.umount()
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mount.path)
        assert os.path.getsize(file_store / "d" / "shuffle_0_0_0.data") == 1 << 20
        assert mount.status()["given_up"] == 0


def test_no_credentials_anywhere(tmp_path, mnt, s3_env, bucket):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"],
        AWS_CONFIG_FILE=s3_env["AWS_CONFIG_FILE"],
        AWS_SHARED_CREDENTIALS_FILE=s3_env["AWS_SHARED_CREDENTIALS_FILE"],
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    assert_refused(mount_cli(f"s3://{bucket}", mnt, tmp_path / "cache", env=env), mnt, "credentials")


def test_journal_lists_and_drops_operations(tmp_path, file_store):
    """`shufflefs journal` shows what a cache dir owes the store and what the store refused for
    good, also while a daemon runs; dropping needs the daemon gone."""
    from shufflefs.journal import Journal

    cache = tmp_path / "cache"
    with Mount(f"file://{file_store}", tmp_path / "mnt", cache) as mount:
        journal = Journal(str(cache / "lmdb"))  # what the daemon's remote would record
        pending = journal.add_op({"kind": "put", "key": "a/shuffle_0_1_0.data", "path": "s1", "size": 7})
        refused = journal.add_op({"kind": "put", "key": "b\\c/shuffle_0_2_0.data", "path": "s2", "size": 3})
        journal.fail_op(refused, {"kind": "put", "key": "b\\c/shuffle_0_2_0.data"}, "InvalidArgument")
        journal.close()
        listed = run_cli("journal", str(cache))
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == [
            f"{pending}\tpending\tput\ta/shuffle_0_1_0.data (7 bytes)",
            f"{refused}\tfailed\tput\tb\\c/shuffle_0_2_0.data: InvalidArgument",
        ]
        busy = run_cli("journal", str(cache), "--drop", str(refused))
        assert busy.returncode == 1 and f"pid {mount.pid}" in busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
    assert run_cli("journal", str(cache), "--drop", str(refused)).returncode == 0
    assert str(refused) not in run_cli("journal", str(cache)).stdout
    missing = run_cli("journal", str(cache), "--drop", "999")
    assert missing.returncode == 1 and "no operation 999" in missing.stderr
    nothing = run_cli("journal", str(tmp_path / "nowhere"))
    assert nothing.returncode == 1 and "not a shufflefs cache dir" in nothing.stderr
