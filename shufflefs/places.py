"""Where a mount's files are, and what the mount table says: the run directory and its files
(pid file, status file, control socket), the default cache dir, mounts and stale mounts.
Standard library only: the commands that only look (`stats`, `umount`, `ls`, `bench`) need
none of the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Callable

log = logging.getLogger(__name__)


class SetupError(Exception):
    """A reason not to mount, for the user, in one line."""


def default_cache_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/lib/shufflefs"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "shufflefs")
    name = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(base, name)


def run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/shufflefs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/shufflefs-{os.getuid()}", "shufflefs")


def private_dir(path: str, what: str, ours: Callable[[str], bool] = lambda path: True) -> str:
    """Create `path` (mode 0700) if missing and make sure nobody else controls it: a directory,
    not a symlink, owned by this user, writable by nobody else; one that others may read (an
    earlier version made them 0755) is made 0700 when `ours(path)`. Otherwise SetupError: the
    run directory's default place without XDG_RUNTIME_DIR is a predictable name in /tmp, where
    another user may have put a directory or symlink of their own first, to have this daemon
    write its files where they want."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SetupError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise SetupError(f"cannot use {what} {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        raise SetupError(f"{what} {path} is not a directory (a symlink?); remove it or use another")
    if info.st_uid != os.geteuid():
        raise SetupError(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}); remove it or use another"
        )
    if mode & 0o022:
        raise SetupError(f"{what} {path} is writable by other users (mode {mode:04o}); remove it or use another")
    if mode != 0o700:
        if not ours(path):
            raise SetupError(
                f"{what} {path} is readable by other users (mode {mode:04o}) and holds "
                f"more than shufflefs' files; use a directory of its own"
            )
        os.chmod(path, 0o700)
    return path


def private_run_dir() -> str:
    """The run directory, created and checked (and its parent in /tmp, without XDG_RUNTIME_DIR)."""
    path = run_dir()
    if os.geteuid() != 0 and not os.environ.get("XDG_RUNTIME_DIR"):
        private_dir(os.path.dirname(path), "run directory")
    return private_dir(path, "run directory")


def run_file(mountpoint: str, suffix: str) -> str:
    digest = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(run_dir(), f"{digest}.{suffix}")


def mounted_filesystems() -> dict[str, str]:
    """mountpoint -> filesystem type, from /proc/self/mounts."""
    result = {}
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3:
                result[unescape(fields[1])] = fields[2]
    return result


def shufflefs_mount_of(path: str) -> str | None:
    """The mountpoint of the shufflefs mount that holds `path`, if any."""
    mounts = mounted_filesystems()
    path = os.path.realpath(path)
    while True:
        if path in mounts:
            return path if mounts[path] == "fuse.shufflefs" else None
        if path == "/":
            return None
        path = os.path.dirname(path)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie does not (our daemons are not reaped where PID 1 does not
    reap, e.g. in some containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def daemon_pid(mountpoint: str) -> int | None:
    """The pid of the live daemon serving `mountpoint`, from its pid file; None when the file is
    missing or stale (a killed daemon leaves it, and its pid may belong to another process now)."""
    try:
        with open(run_file(mountpoint, "json")) as f:
            pid = int(json.load(f)["pid"])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # this very process can be named in a stale file: PID 1 of a restarted container
    return pid if pid != os.getpid() and b"shufflefs" in command and process_alive(pid) else None


#: what a FUSE mount answers once its daemon is gone (ECONNABORTED first, on recent kernels)
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def is_stale_mount(mountpoint: str) -> bool:
    """Whether the topmost mount on `mountpoint` is a shufflefs mount whose daemon is gone: it
    answers ENOTCONN. (A live mount served by a daemon this process cannot see, in another
    container, is not stale.)"""
    if mounted_filesystems().get(mountpoint) != "fuse.shufflefs" or daemon_pid(mountpoint) is not None:
        return False
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in DEAD_MOUNT_ERRNOS
    return False


def clear_stale_mount(mountpoint: str, *, quiet: bool = False) -> bool:
    """If `mountpoint` holds a shufflefs mount whose daemon is gone, detach it lazily (processes
    still inside it keep it until they leave; copies of it in mount namespaces below a shared
    parent go too, but bind mounts of the mountpoint itself keep it) and return True. `quiet`:
    the caller reports it."""
    if not is_stale_mount(mountpoint):
        return False
    # umount -i: not through umount.fuse.shufflefs, which would come back here
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-i", "-l", mountpoint]):
        try:
            if subprocess.run(command, capture_output=True, check=False).returncode == 0:
                if not quiet:
                    log.warning("%s was a stale mount left by a dead daemon; detached it", mountpoint)
                return True
        except FileNotFoundError:
            continue
    raise SetupError(f"{mountpoint} is a stale shufflefs mount and could not be detached; try: umount -l {mountpoint}")


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo or /proc/self/mounts as it is: the kernel writes
    some characters (space, tab, newline, backslash, ...) as a backslash and three octal
    digits; a backslash is itself escaped (\\134), so one pass decodes them all."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def write_run_file(path: str, content: dict) -> None:
    """Write `path` in the (checked) run directory atomically: a fresh temporary file of our own
    (mkstemp: O_EXCL, mode 0600, an unpredictable name) renamed into place, so no file planted
    there by somebody else is ever followed or written to."""
    private_run_dir()
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
