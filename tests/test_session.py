"""Our FUSE session (DESIGN.md "Our FUSE session"), through real mounts: which files the kernel
passes through to their staging files and which the daemon serves (seen in the request counts
of `shufflefs stats`), the cache budget's admission of writers, sizes of passed-through files,
and requests that wait handing reading off so that others are answered meanwhile."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
import uuid

import pytest

from shufflefs.testing.faultproxy import FaultProxy, hold
from shufflefs.testing.mounting import Mount, bucket_objects, run_cli, store_objects

MiB = 1024 * 1024
CHUNK = 32 * 1024  # Spark's buffered writes


def stats(mount: Mount) -> dict:
    result = run_cli("stats", mount.path, env=mount.env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def requests(mount: Mount) -> dict[str, int]:
    return stats(mount)["fuse"]["requests"]


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def write_chunks(fd: int, data: bytes, check_size: bool = False) -> None:
    for start in range(0, len(data), CHUNK):
        assert os.write(fd, data[start : start + CHUNK]) == min(CHUNK, len(data) - start)
        if check_size:
            assert os.fstat(fd).st_size == min(start + CHUNK, len(data))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def own_mount(tmp_path, file_store):
    """A file:// mount served by our session (whatever SHUFFLEFS_TEST_FUSE says)."""
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--fuse", "own") as mount:
        mount.store_root = str(file_store)
        fuse = stats(mount)["fuse"]
        assert fuse["session"] == "own" and fuse["passthrough"] is True
        yield mount


def test_local_files_pass_through(own_mount):
    """A temporary name is written and read by the kernel in its staging file: no READ or WRITE
    reaches the daemon, fstat follows the writes, and the rename still commits the bytes."""
    directory = f"{own_mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
    os.makedirs(directory)
    data = os.urandom(8 * MiB)
    temp = f"{directory}/temp_shuffle_{uuid.uuid4()}"
    before = requests(own_mount)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT, 0o644)
    write_chunks(fd, data, check_size=True)
    os.close(fd)
    assert os.stat(temp).st_size == len(data)
    assert read(temp) == data
    os.rename(temp, f"{directory}/shuffle_0_0_0.data")
    assert read(f"{directory}/shuffle_0_0_0.data") == data  # committed, still local: passed through
    assert store_objects(own_mount.store_root) == {
        "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data": data
    }
    after = stats(own_mount)
    assert after["fuse"]["passthrough"] is True
    assert delta(before, after["fuse"]["requests"], "write") == 0
    assert delta(before, after["fuse"]["requests"], "read") == 0
    assert delta(before, after["fuse"]["requests"], "create") == 1


def test_durable_name_written_directly_is_daemon_served(own_mount):
    """`> shuffle_...data`: every write reaches the daemon (a failed one must stop the commit)."""
    data = os.urandom(MiB + 5)
    before = requests(own_mount)
    with open(f"{own_mount.path}/shuffle_0_0_0.data", "wb") as f:
        f.write(data)
    assert delta(before, requests(own_mount), "write") > 0
    assert store_objects(own_mount.store_root) == {"shuffle_0_0_0.data": data}
    assert read(f"{own_mount.path}/shuffle_0_0_0.data") == data


def test_evicted_committed_file_is_daemon_served(tmp_path, file_store):
    with Mount(
        f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--fuse", "own", "--cache-size", "10M"
    ) as mount:
        directory = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        blobs = {}
        for map_id in range(6):
            name = f"shuffle_0_{map_id}_0.data"
            blobs[name] = os.urandom(3 * MiB)
            with open(f"{directory}/{name}.{uuid.uuid4()}", "wb") as f:
                f.write(blobs[name])
                temp = f.name
            os.rename(temp, f"{directory}/{name}")
        assert stats(mount)["fs"].get("evictions", 0) > 0
        assert sum(e.stat().st_size for e in os.scandir(f"{mount.cache_dir}/staging")) <= 10 * MiB
        before = requests(mount)
        assert read(f"{directory}/shuffle_0_0_0.data") == blobs["shuffle_0_0_0.data"]  # evicted first (LRU)
        assert delta(before, requests(mount), "read") > 0
        for name, content in blobs.items():
            assert read(f"{directory}/{name}") == content


def test_no_passthrough_serves_every_write(tmp_path, file_store):
    with Mount(
        f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--fuse", "own", "--no-passthrough"
    ) as mount:
        assert stats(mount)["fuse"]["passthrough"] is False
        data = os.urandom(2 * MiB)
        before = requests(mount)
        fd = os.open(f"{mount.path}/temp_shuffle_np", os.O_WRONLY | os.O_CREAT, 0o644)
        write_chunks(fd, data, check_size=True)
        os.close(fd)
        assert delta(before, requests(mount), "write") > 0
        assert read(f"{mount.path}/temp_shuffle_np") == data


def test_budget_admission_refuses_passthrough_when_nearly_full(tmp_path, file_store):
    """Less than a tenth of --cache-size free: a writer is daemon-served and its writes are
    charged one by one (exact ENOSPC). Writers passed through before cannot be refused: the
    budget is exceeded by at most what they wrote; what an open writer wrote counts before
    the next writer is admitted."""
    budget = 8 * MiB
    with Mount(
        f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--fuse", "own", "--cache-size", str(budget)
    ) as mount:
        fill = int(7.5 * MiB)
        before = requests(mount)
        with open(f"{mount.path}/temp_fill", "wb") as f:  # scratch: never evictable
            f.write(b"f" * fill)
        assert delta(before, requests(mount), "write") == 0  # admitted: passed through
        assert stats(mount)["cached_bytes"] == fill

        before = requests(mount)
        fd = os.open(f"{mount.path}/temp_late", os.O_WRONLY | os.O_CREAT, 0o644)
        written = 0
        with pytest.raises(OSError) as raised:
            while written <= budget:
                written += os.write(fd, b"l" * CHUNK)
        assert raised.value.errno == errno.ENOSPC  # no writeback cache with passthrough: write() fails
        assert written == budget - fill
        with pytest.raises(OSError) as raised:  # sync commit mode: close reports it too
            os.close(fd)
        assert raised.value.errno == errno.ENOSPC
        after = stats(mount)
        assert delta(before, after["fuse"]["requests"], "write") > 0
        assert after["cached_bytes"] <= budget
        assert os.stat(f"{mount.path}/temp_late").st_size == written

        # two writers opened while the budget was free pass through and cannot be refused
        os.unlink(f"{mount.path}/temp_fill")
        os.unlink(f"{mount.path}/temp_late")
        assert stats(mount)["cached_bytes"] == 0
        first = open(f"{mount.path}/temp_a", "wb")
        second = open(f"{mount.path}/temp_b", "wb")
        with first, second:
            first.write(b"a" * 5 * MiB)
            second.write(b"b" * 5 * MiB)
        assert stats(mount)["cached_bytes"] == 10 * MiB  # over budget by what they wrote, no more
        fd = os.open(f"{mount.path}/temp_c", os.O_WRONLY | os.O_CREAT, 0o644)
        with pytest.raises(OSError) as raised:
            os.write(fd, b"c")
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            os.close(fd)
        assert stats(mount)["cached_bytes"] == 10 * MiB

        # what a writer still open has written is counted before the next writer is admitted
        for name in ("temp_a", "temp_b", "temp_c"):
            os.unlink(f"{mount.path}/{name}")
        with open(f"{mount.path}/temp_open", "wb", buffering=0) as writer:
            writer.write(b"w" * fill)  # passed through: the daemon has not seen its size
            time.sleep(0.3)  # WRITERS_SYNC_INTERVAL
            fd = os.open(f"{mount.path}/temp_next", os.O_WRONLY | os.O_CREAT, 0o644)
            written = 0
            with pytest.raises(OSError) as raised:
                while written <= budget:
                    written += os.write(fd, b"n" * CHUNK)
            assert raised.value.errno == errno.ENOSPC and written == budget - fill
            with pytest.raises(OSError):
                os.close(fd)


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


def timed(what: str, call, bound: float = 1.0):
    start = time.monotonic()
    result = call()
    took = time.monotonic() - start
    assert took < bound, f"{what} took {took:.2f} s while a commit waited for the store"
    return result


def test_a_waiting_commit_does_not_hold_up_other_requests(tmp_path, s3_env, bucket, seaweed, proxy):
    with Mount(
        f"s3://{bucket}",
        tmp_path / "mnt",
        tmp_path / "cache",
        "--fuse",
        "own",
        "--s3-endpoint-url",
        proxy.url,
        "--store-timeout",
        "60",
        env=s3_env,
    ) as mount:
        directory = f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00"
        os.makedirs(directory)
        key = "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index"
        proxy.add_rule(hold(), op="PutObject", path=key, times=1)
        outcome: list = []

        def commit() -> None:
            try:
                with open(f"{mount.path}/{key}", "wb") as f:
                    f.write(b"\0" * 16)
                outcome.append("closed")
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                outcome.append(exc)

        closer = threading.Thread(target=commit, daemon=True)
        closer.start()
        held = proxy.wait_held(timeout=30)
        time.sleep(0.3)
        assert closer.is_alive() and not outcome, "close() returned before its upload was stored"

        temp = f"{directory}/temp_shuffle_{uuid.uuid4()}"
        data = os.urandom(256 * 1024)
        fd = timed("create", lambda: os.open(temp, os.O_RDWR | os.O_CREAT, 0o644))
        timed("write", lambda: os.write(fd, data))
        timed("fstat", lambda: os.fstat(fd))
        assert timed("read", lambda: os.pread(fd, len(data), 0)) == data
        timed("close", lambda: os.close(fd))
        assert timed("stat", lambda: os.stat(temp)).st_size == len(data)
        assert sorted(timed("listdir", lambda: os.listdir(directory))) == sorted(
            ["shuffle_0_0_0.index", os.path.basename(temp)]
        )
        assert timed("stats", lambda: stats(mount), bound=5)["fuse"]["session"] == "own"
        assert closer.is_alive(), "close() returned before its upload was stored"

        assert proxy.release(held) == 200
        closer.join(30)
        assert outcome == ["closed"]
        assert bucket_objects(seaweed.client(), bucket) == {key: b"\0" * 16}
        assert mount.umount().returncode == 0


def test_pyfuse3_session(tmp_path, file_store):
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--fuse", "pyfuse3") as mount:
        fuse = stats(mount)["fuse"]
        assert fuse["session"] == "pyfuse3" and fuse["passthrough"] is False
        data = os.urandom(MiB + 3)
        with open(f"{mount.path}/temp_shuffle_py", "wb") as f:
            f.write(data)
        assert read(f"{mount.path}/temp_shuffle_py") == data
        os.rename(f"{mount.path}/temp_shuffle_py", f"{mount.path}/shuffle_1_0_0.data")
        assert store_objects(str(file_store)) == {"shuffle_1_0_0.data": data}


def test_sizes_of_a_passed_through_file_with_two_handles(own_mount):
    """The daemon never sees the writes of a passed-through file: what it answers (GETATTR,
    LOOKUP, READDIRPLUS entries) must come from the staging file, or the kernel's size shrinks."""
    directory = f"{own_mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/0a"
    os.makedirs(directory)
    path = f"{directory}/temp_shuffle_{uuid.uuid4()}"
    before = requests(own_mount)
    writer = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    reader = os.open(path, os.O_RDONLY)
    try:
        size = 0
        for step in (100_000, 1, 3 * MiB):
            data = os.urandom(step)
            os.write(writer, data)
            size += step
            # first, so that no GETATTR taught the daemon the size before the READDIRPLUS
            entries = {e.name: e.stat().st_size for e in os.scandir(directory)}
            assert entries == {os.path.basename(path): size}
            assert os.fstat(reader).st_size == size
            assert os.stat(path).st_size == size
            assert os.pread(reader, step, size - step) == data
    finally:
        os.close(reader)
        os.close(writer)
    assert os.stat(path).st_size == size
    after = requests(own_mount)
    assert delta(before, after, "write") == 0 and delta(before, after, "read") == 0


def test_truncating_a_passed_through_writer_keeps_the_budget_exact(own_mount):
    """ftruncate(2) through a writer passed through: the daemon's count of the file's bytes
    (its cache budget) must not be taken from before the writes it never saw."""
    path = f"{own_mount.path}/temp_shuffle_trunc"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"t" * 5 * MiB)  # no fstat: the daemon has not learned the size yet
        os.ftruncate(fd, MiB)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == MiB
    assert stats(own_mount)["cached_bytes"] == MiB
    os.unlink(path)
    assert stats(own_mount)["cached_bytes"] == 0


def test_passthrough_is_given_up_when_the_kernel_refuses_staging_files(tmp_path, file_store):
    """A cache dir on a stacked file system (overlayfs, as a container's root file system)
    cannot back passed-through files (the kernel answers ELOOP): the mount warns once and
    serves every read and write itself from then on; nothing is lost."""
    layers = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for layer in layers.values():
        layer.mkdir()
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    if (
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount overlayfs here")
    try:
        with Mount(f"file://{file_store}", tmp_path / "mnt", layers["merged"] / "cache", "--fuse", "own") as mount:
            data = os.urandom(MiB)
            temp = f"{mount.path}/temp_shuffle_{uuid.uuid4()}"
            before = requests(mount)
            for _ in range(2):  # the second open finds passthrough given up
                with open(temp, "wb") as f:
                    f.write(data)
                assert read(temp) == data
            after = requests(mount)
            assert delta(before, after, "write") > 0 and delta(before, after, "read") > 0
            assert stats(mount)["fuse"]["passthrough"] is False
            os.rename(temp, f"{mount.path}/shuffle_0_0_0.data")
            assert read(f"{mount.path}/shuffle_0_0_0.data") == data
            assert mount.log().count("passthrough given up") == 1
        assert store_objects(str(file_store)) == {"shuffle_0_0_0.data": data}
    finally:
        subprocess.run(["umount", "-l", str(layers["merged"])], check=False)


#: run as an unprivileged user, in its own mount namespace (see test_fuse_mount), with the
#: interpreter exec'd directly by setpriv (a child process of it may not reach the venv): a
#: round trip through the mount, its stats, then SIGTERM unmounts
AS_USER = """
import json, os, sys, time
from shufflefs.control import mount_stats
mnt = sys.argv[1] + "/mnt"
deadline = time.monotonic() + 60
while not os.path.ismount(mnt) and time.monotonic() < deadline:
    time.sleep(0.1)
data = os.urandom(1 << 20)
with open(mnt + "/temp_shuffle_1", "wb") as f:
    f.write(data)
os.rename(mnt + "/temp_shuffle_1", mnt + "/shuffle_0_0_0.data")
with open(mnt + "/shuffle_0_0_0.data", "rb") as f:
    same = f.read() == data
print(json.dumps({"same": same, "fuse": mount_stats(mnt)["fuse"]}))
"""
#: after the private /dev/fuse: the daemon in the background, the user's program, SIGTERM
SESSION = """set -e
as_user="setpriv --reuid=$1 --regid=$1 --clear-groups"
$as_user "$2" -m shufflefs mount "file://$3/store" "$3/mnt" --cache-dir "$3/cache" --fuse own --foreground \
    2> "$3/daemon.log" &
daemon=$!
$as_user "$2" -c "$4" "$3"
kill -TERM $daemon
wait $daemon
"""


def test_an_unprivileged_daemon_runs_our_session_through_fusermount():
    """Not root: the daemon mounts through fusermount3's descriptor passing, serves with the
    writeback cache (registering backing files needs CAP_SYS_ADMIN), and unmounts."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from test_fuse_mount import NOBODY, PRIVATE_DEV_FUSE, has_fusermount, user_pythonpath

    if os.geteuid() != 0 or has_fusermount() is not None or not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("needs root (to switch users), a setuid fusermount3, setpriv and unshare")
    base = tempfile.mkdtemp(prefix="shufflefs-user-session-")
    try:
        os.chmod(base, 0o755)
        for name in ("mnt", "store", "cache", "dev", "run"):
            os.mkdir(os.path.join(base, name), 0o700)
            if name != "dev":
                os.chown(os.path.join(base, name), NOBODY, NOBODY)
        os.chmod(os.path.join(base, "mnt"), 0o755)
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            PRIVATE_DEV_FUSE,
            "sh",
            os.path.join(base, "dev"),
            "sh",
            "-c",
            SESSION,
            "sh",
            str(NOBODY),
            sys.executable,
            base,
            AS_USER,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": user_pythonpath(base),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": base,
            "XDG_RUNTIME_DIR": os.path.join(base, "run"),
        }
        done = subprocess.run(
            command, env=env, cwd=base, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        with open(os.path.join(base, "daemon.log")) as f:
            log = f.read()
        assert done.returncode == 0, f"{done.stderr}\ndaemon log:\n{log}"
        report = json.loads(done.stdout)
        assert report["same"]
        assert report["fuse"]["session"] == "own" and report["fuse"]["passthrough"] is False
        assert report["fuse"]["requests"].get("write", 0) > 0  # served by the daemon
        assert "passthrough needs root" in log and "unmounted" in log
        with open(os.path.join(base, "store", "shuffle_0_0_0.data"), "rb") as f:
            assert len(f.read()) == 1 << 20
    finally:
        subprocess.run(["fusermount3", "-u", "-z", os.path.join(base, "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_a_child_closing_an_inherited_descriptor_does_not_freeze_the_size(own_mount):
    """Every process a JVM starts closes the descriptors it inherited, and each close sends a
    FLUSH while the JVM goes on appending through passthrough: the size the mount reports (Java
    takes an append channel's position from it) must follow the writes after that."""
    path = f"{own_mount.path}/temp_shuffle_{uuid.uuid4()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"a" * 1000)
        assert os.fstat(fd).st_size == 1000
        subprocess.run(["true"], pass_fds=(fd,), check=True)  # inherits it, closes it: FLUSH
        for written in range(2000, 6000, 1000):
            os.write(fd, b"b" * 1000)
            assert os.fstat(fd).st_size == written
            assert os.stat(path).st_size == written
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 5000
    # committed by a rename: all of it (the close after the child's FLUSH sent no news)
    os.rename(path, f"{own_mount.path}/shuffle_0_0_0.data")
    assert store_objects(own_mount.store_root) == {"shuffle_0_0_0.data": b"a" * 1000 + b"b" * 4000}
