"""Getting a /dev/fuse descriptor: mount(2) as root, fusermount3's descriptor passing otherwise.

Each mount is served by a minimal FUSE server answering INIT and the few requests a stat and a
listing of the root make: unanswered, the kernel would block every access to the mount.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading

import pytest

from shufflefs.fuse.mount import (
    FUSERMOUNT,
    FusermountError,
    mount_with_fusermount,
    open_session_fd,
    top_mount,
    unescape,
    unmount,
    unmount_with_fusermount,
)

FSTYPE = "fuse.shufflefs-test"
SOURCE = "shufflefs-test"
NOBODY = 65534
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_pythonpath(base: str) -> str:
    """A PYTHONPATH under `base` (which uid NOBODY can read) holding copies of shufflefs and of
    this module: the checkout may be in a directory private to root. Skips the test when
    NOBODY cannot run this interpreter with its packages (a virtualenv under /root)."""
    path = os.path.join(base, "pythonpath")
    shutil.copytree(
        os.path.join(REPO, "shufflefs"), os.path.join(path, "shufflefs"), ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(os.path.abspath(__file__), path)
    os.chmod(path, 0o755)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import trio, lmdb, shufflefs.daemon, test_fuse_mount",
        ],
        env={**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=base,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"uid {NOBODY} cannot run {sys.executable} with shufflefs's packages here: "
            f"{probe.stderr.strip().splitlines()[-1:]}"
        )
    return path


# ------------------------------------------------------------ a minimal server (include/uapi/linux/fuse.h)
IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QIi")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
LOOKUP, FORGET, GETATTR, INIT, OPENDIR, READDIR, RELEASEDIR, DESTROY, BATCH_FORGET, READDIRPLUS = (
    1,
    2,
    3,
    26,
    27,
    28,
    29,
    38,
    42,
    44,
)
ROOT = 1
#: the kernel refuses reads smaller than a request carrying max_write bytes
READ_SIZE = (1 << 20) + 4096


class MinimalServer:
    """Serves an empty root directory on `fd` in a thread until the mount goes (ENODEV)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.opcodes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the FUSE server thread did not end"

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            try:
                request = os.read(self.fd, READ_SIZE)
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # unmounted: the connection is gone
                    return
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: an interrupted request
                    continue
                raise
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            self.opcodes.append(opcode)
            if opcode == INIT:
                major, minor, readahead, flags = struct.unpack_from("<IIII", request, IN_HEADER.size)
                self._reply(unique, INIT_OUT.pack(7, 31, readahead, 0, 16, 12, 1 << 17, 1, 32, 0, 0, 0))
            elif opcode == GETATTR and node == ROOT:
                root = ATTR.pack(
                    ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0, 4096, 0
                )
                self._reply(unique, ATTR_OUT.pack(1, 0, 0) + root)
            elif opcode == OPENDIR:
                self._reply(unique, OPEN_OUT.pack(1, 0, 0))
            elif opcode in (READDIR, READDIRPLUS, RELEASEDIR, DESTROY):
                self._reply(unique)  # an empty body: no (more) entries
            elif opcode in (FORGET, BATCH_FORGET):
                pass  # never answered
            elif opcode == LOOKUP:
                self._reply(unique, error=errno.ENOENT)
            else:
                self._reply(unique, error=errno.ENOSYS)


def mount_entry(mountpoint: str) -> dict | None:
    """The topmost mount on `mountpoint` in /proc/self/mountinfo: fstype, source, options."""
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fields = before.split()
            if unescape(fields[4]) == mountpoint:
                fstype, source, options = after.split()
                found = {"id": int(fields[0]), "fstype": fstype, "source": unescape(source), "options": options}
    return found


def is_dev_fuse(fd: int) -> bool:
    info = os.fstat(fd)
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == os.stat("/dev/fuse").st_rdev


def lazy_unmount(mountpoint: str) -> None:
    while mount_entry(mountpoint) is not None:
        if subprocess.run([FUSERMOUNT, "-u", "-z", "--", mountpoint], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=True)


@pytest.fixture
def mountpoint(tmp_path):
    path = str(tmp_path / "mnt")
    os.mkdir(path)
    yield path
    lazy_unmount(path)


def has_fusermount() -> str | None:
    """Why fusermount3 cannot mount for other users here, or None."""
    path = shutil.which(FUSERMOUNT)
    if path is None:
        return f"{FUSERMOUNT} is not installed"
    info = os.stat(path)
    if info.st_uid != 0 or not info.st_mode & stat.S_ISUID:
        return f"{path} is not setuid root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    return None


# ------------------------------------------------------------ as root: mount(2)
@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) of a FUSE filesystem needs root")
def test_root_mounts_with_mount2_and_serves_the_descriptor(mountpoint):
    fd, made = open_session_fd(mountpoint, SOURCE, FSTYPE, ["default_permissions"])
    server = None
    try:
        assert is_dev_fuse(fd)
        assert not os.get_inheritable(fd)
        assert made is not None and made == top_mount(mountpoint)
        entry = mount_entry(mountpoint)
        assert (entry["id"], entry["fstype"], entry["source"]) == (made[0], FSTYPE, SOURCE)
        assert "default_permissions" in entry["options"]
        server = MinimalServer(fd)
        assert stat.S_ISDIR(os.stat(mountpoint).st_mode)
        assert os.listdir(mountpoint) == []
        assert server.opcodes[0] == INIT
    finally:
        unmount(mountpoint, made)
        if server is not None:
            server.stop()
        os.close(fd)
    assert mount_entry(mountpoint) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) of a FUSE filesystem needs root")
def test_root_unmount_leaves_a_mount_made_over_ours(mountpoint):
    """A restarted daemon mounts over ours; unmounting ours must not detach the new one."""
    fd, made = open_session_fd(mountpoint, SOURCE, FSTYPE, [])
    newer_fd, newer = open_session_fd(mountpoint, SOURCE, FSTYPE, [])
    try:
        assert newer != made
        unmount(mountpoint, made)
        assert top_mount(mountpoint) == newer
        unmount(mountpoint, newer)
        assert top_mount(mountpoint) == made
        unmount(mountpoint, made)
        assert top_mount(mountpoint) is None
    finally:
        os.close(newer_fd)
        os.close(fd)


# ------------------------------------------------------------ fusermount3's descriptor passing
@pytest.mark.skipif(has_fusermount() is not None, reason=str(has_fusermount()))
def test_fusermount_passes_the_descriptor(mountpoint):
    """The descriptor passing alone, as whoever runs the tests (fusermount3 also serves root)."""
    fd = mount_with_fusermount(mountpoint, [f"fsname={SOURCE},with a comma", "subtype=shufflefs-test"])
    server = None
    try:
        assert is_dev_fuse(fd)
        assert not os.get_inheritable(fd)
        entry = mount_entry(mountpoint)
        assert (entry["fstype"], entry["source"]) == (FSTYPE, f"{SOURCE},with a comma")
        server = MinimalServer(fd)
        assert os.listdir(mountpoint) == []
    finally:
        unmount_with_fusermount(mountpoint)
        if server is not None:
            server.stop()
        os.close(fd)
    assert mount_entry(mountpoint) is None


@pytest.mark.skipif(has_fusermount() is not None, reason=str(has_fusermount()))
def test_fusermount_failures_are_one_line(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FusermountError) as mounting:
        mount_with_fusermount(missing, ["fsname=x"])
    assert mounting.value.strerror == str(mounting.value)
    assert "\n" not in str(mounting.value)
    assert str(mounting.value).startswith(f"{FUSERMOUNT} could not mount {missing}: ")
    assert "No such file or directory" in str(mounting.value)
    with pytest.raises(FusermountError, match=f"^{FUSERMOUNT} could not unmount {tmp_path}: [^\n]+$"):
        unmount_with_fusermount(str(tmp_path))


def serve_as_user(mountpoint: str) -> dict:
    """Run in the unprivileged child: mount through open_session_fd, serve, look, unmount."""
    fd, made = open_session_fd(mountpoint, SOURCE, FSTYPE, [])
    server = MinimalServer(fd)
    try:
        info = os.stat(mountpoint)
        report = {
            "made": made,
            "dev_fuse": is_dev_fuse(fd),
            "inheritable": os.get_inheritable(fd),
            "entry": mount_entry(mountpoint),
            "is_dir": stat.S_ISDIR(info.st_mode),
            "owner": info.st_uid,
            "listing": os.listdir(mountpoint),
        }
    finally:
        unmount(mountpoint, made)
        server.stop()
        os.close(fd)
    report["unmounted"] = mount_entry(mountpoint) is None
    report["opcodes"] = server.opcodes
    return report


#: unshare(1) script: the child gets a private mount namespace in which /dev/fuse is a node it
#: may open (fusermount3 opens the device as the user); the host's /dev/fuse stays as it is
PRIVATE_DEV_FUSE = """set -e
mount -t tmpfs -o mode=0755,size=64k shufflefs-test-dev "$1"
mknod -m 0666 "$1/fuse" c 10 229
mount --bind "$1/fuse" /dev/fuse
umount -l "$1"
shift
exec "$@"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
@pytest.mark.skipif(has_fusermount() is not None, reason=str(has_fusermount()))
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_unprivileged_user_mounts_through_fusermount():
    # tmp_path is private to root; fusermount3 needs a mountpoint the user owns on a path it can reach
    base = tempfile.mkdtemp(prefix="shufflefs-fusermount-")
    mountpoint = os.path.join(base, "mnt")
    try:
        os.chmod(base, 0o755)
        os.mkdir(mountpoint)
        os.chown(mountpoint, NOBODY, NOBODY)
        child = [
            sys.executable,
            "-c",
            "import json, sys, test_fuse_mount; print(json.dumps(test_fuse_mount.serve_as_user(sys.argv[1])))",
            mountpoint,
        ]
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *child]
        device = os.stat("/dev/fuse")
        if not device.st_mode & stat.S_IROTH or not device.st_mode & stat.S_IWOTH:
            if shutil.which("unshare") is None:
                pytest.skip(
                    f"/dev/fuse (mode {stat.filemode(device.st_mode)}) is not open to uid {NOBODY}, "
                    "and unshare(1) is missing to give it a private one"
                )
            device_dir = os.path.join(base, "dev")
            os.mkdir(device_dir)
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                PRIVATE_DEV_FUSE,
                "sh",
                device_dir,
                *command,
            ]
        env = {**os.environ, "PYTHONPATH": user_pythonpath(base), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(
            command, env=env, cwd=base, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["made"] is None
        assert report["dev_fuse"] and not report["inheritable"]
        assert report["entry"]["fstype"] == FSTYPE and report["entry"]["source"] == SOURCE
        assert f"user_id={NOBODY}" in report["entry"]["options"]
        assert report["is_dir"] and report["owner"] == NOBODY
        assert report["listing"] == []
        assert report["unmounted"]
        assert report["opcodes"][0] == INIT
    finally:
        lazy_unmount(mountpoint)
        shutil.rmtree(base, ignore_errors=True)
