"""Other local users (issue 11): they cannot make a daemon write where they want, read what the
cache dir or the mount holds privately, or starve a mount of descriptors through its control
socket."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
import uuid

import pytest

from shufflefs import control
from shufflefs.places import run_file
from shufflefs.testing.mounting import Mount, run_cli


def as_user(uid: int, gid: int, function) -> str:
    """Run `function()` in a child process as uid:gid, without XDG_RUNTIME_DIR (the run directory
    is then the predictable /tmp/shufflefs-<uid>/shufflefs); return what it returned, or the
    class and message of what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.environ.pop("XDG_RUNTIME_DIR", None)
            try:
                result = f"ok {function()}"
            except Exception as exc:
                result = f"{type(exc).__name__} {exc}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


@pytest.fixture
def local_user():
    """A throwaway local user (removed with its home)."""
    name = "sfs" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-m", "-s", "/bin/false", name], check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    try:
        yield entry
    finally:
        shutil.rmtree(f"/tmp/shufflefs-{entry.pw_uid}", ignore_errors=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)


def write_pid_file(mountpoint: str):
    from shufflefs.places import write_run_file

    path = run_file(mountpoint, "json")
    write_run_file(path, {"pid": 1})
    info = os.lstat(os.path.dirname(path))
    return oct(stat.S_IMODE(info.st_mode)), oct(stat.S_IMODE(os.stat(path).st_mode))


def test_run_files_are_never_written_where_another_user_wants(local_user):
    uid, gid = local_user.pw_uid, local_user.pw_gid
    mountpoint = "/srv/spark-local"
    victim = os.path.join(local_user.pw_dir, "precious")
    with open(victim, "w") as f:
        f.write("mine")
    os.chown(victim, uid, gid)
    # another user (root here) got to the predictable run directory first and planted a symlink
    # at the pid file's temporary name
    base = f"/tmp/shufflefs-{uid}"
    os.makedirs(f"{base}/shufflefs")
    os.chmod(base, 0o777)
    os.chmod(f"{base}/shufflefs", 0o777)
    pid_file = as_user(uid, gid, lambda: run_file(mountpoint, "json")).removeprefix("ok ")
    os.symlink(victim, pid_file + ".tmp")
    result = as_user(uid, gid, lambda: write_pid_file(mountpoint))
    with open(victim) as f:
        assert f.read() == "mine"
    assert result.startswith("SetupError ") and "belongs to uid 0" in result, result
    # a symlink in its place is refused as well
    shutil.rmtree(base)
    os.symlink(local_user.pw_dir, base)
    result = as_user(uid, gid, lambda: write_pid_file(mountpoint))
    assert result.startswith("SetupError ") and "not a directory" in result, result
    assert not os.path.exists(os.path.join(local_user.pw_dir, "shufflefs"))
    # where nobody interfered: the user's own private directory
    os.unlink(base)
    assert as_user(uid, gid, lambda: write_pid_file(mountpoint)) == "ok ('0o700', '0o600')"
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700 and os.lstat(base).st_uid == uid


def modes_under(path: str) -> dict[str, int]:
    modes = {}
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            modes[os.path.relpath(full, path)] = stat.S_IMODE(os.lstat(full).st_mode)
    return modes


def test_cache_dir_and_what_is_learned_from_the_store_are_private(tmp_path, file_store):
    cache = tmp_path / "cache"
    nobody = pwd.getpwnam("nobody")
    with Mount(f"file://{file_store}", tmp_path / "mnt", cache) as mount:
        os.mkdir(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000", 0o700)
        os.chmod(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000", 0o700)
        for name in ("shuffle_0_0_0.index", "shuffle_0_0_0.data"):
            fd = os.open(
                f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/{name}", os.O_WRONLY | os.O_CREAT, 0o600
            )
            os.write(fd, b"private")
            os.close(fd)
        assert mount.umount().returncode == 0
    # as an earlier version left it
    os.chmod(cache, 0o755)
    for name in ("lmdb/data.mdb", "lmdb/lock.mdb", "lock", "shufflefs.log"):
        os.chmod(cache / name, 0o644)
    os.chmod(cache / "lmdb", 0o755)
    os.chmod(cache / "staging", 0o755)
    with Mount(f"file://{file_store}", tmp_path / "mnt", cache) as mount:
        modes = modes_under(str(cache))
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
        assert {
            name: mode for name, mode in modes.items() if mode != (0o700 if os.path.isdir(cache / name) else 0o600)
        } == {}
        assert "lmdb/data.mdb" in modes and "shufflefs.log" in modes
        assert as_user(nobody.pw_uid, nobody.pw_gid, lambda: open(cache / "lmdb/data.mdb").close()).startswith(
            "PermissionError"
        )
        # the store keeps no modes: what the new daemon learns from it is the owner's
        learned = os.stat(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000")
        index = os.stat(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/shuffle_0_0_0.index")
        assert (stat.S_IMODE(learned.st_mode), learned.st_uid) == (0o750, os.getuid())
        assert (stat.S_IMODE(index.st_mode), index.st_uid) == (0o640, os.getuid())
        assert as_user(
            nobody.pw_uid,
            nobody.pw_gid,
            lambda: open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/shuffle_0_0_0.index").read(),
        ).startswith("PermissionError")
        with open(f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/shuffle_0_0_0.index") as f:
            assert f.read() == "private"


@pytest.mark.parametrize(
    "mode, other, needle",
    [
        (0o777, False, "is writable by other users (mode 0777)"),
        (0o755, True, "holds more than shufflefs' files"),
    ],
)
def test_a_cache_dir_others_can_reach_is_refused(tmp_path, file_store, mode, other, needle):
    cache = tmp_path / "shared"
    cache.mkdir()
    if other:
        (cache / "somebody-elses").write_text("x")
    os.chmod(cache, mode)
    mount = Mount(f"file://{file_store}", tmp_path / "mnt", cache)
    try:
        result = run_cli("mount", f"file://{file_store}", mount.path, "--cache-dir", str(cache))
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert stat.S_IMODE(os.stat(cache).st_mode) == mode  # not ours to change
    finally:
        if os.path.ismount(mount.path):
            run_cli("umount", mount.path)
    assert not os.path.ismount(mount.path)


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_control_connections_cannot_starve_the_mount(file_mount):
    path = run_file(file_mount.path, "sock")
    baseline = daemon_fds(file_mount.pid)
    idle = []
    try:
        for _ in range(4 * control.MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # its backlog is full until the daemon accepts more
                    time.sleep(0.01)
        time.sleep(0.5)  # the daemon accepts them all
        assert daemon_fds(file_mount.pid) <= baseline + control.MAX_CONNECTIONS + 1
        # the mount and its control socket still work
        with open(f"{file_mount.path}/shuffle_0_0_0.data", "wb") as f:
            f.write(b"x" * 1000)
        with open(f"{file_mount.path}/shuffle_0_0_0.data", "rb") as f:
            assert f.read() == b"x" * 1000
        result = run_cli("stats", file_mount.path)
        assert result.returncode == 0, result.stderr
        # connections that never send a request are closed
        deadline = time.monotonic() + control.IDLE_TIMEOUT + 5
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert daemon_fds(file_mount.pid) <= baseline + 1
    finally:
        for sock in idle:
            sock.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # connecting takes write access


def test_log_file_is_private_and_never_followed(tmp_path, file_store):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = tmp_path / "planted.log"
    planted.symlink_to(victim)
    result = run_cli(
        "mount",
        f"file://{file_store}",
        str(tmp_path / "mnt"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--log-file",
        str(planted),
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot open log file" in result.stderr and victim.read_text() == "precious\n"
    log = tmp_path / "own.log"
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--log-file", str(log)):
        assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
