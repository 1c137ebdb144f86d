"""Setting up and running one mount: checks, cache directory, FUSE session, signals, drain.

Every check that can fail for a user's reason happens before anything is mounted and raises
SetupError with one line of explanation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import lmdb
import trio

from shufflefs import control
from shufflefs.callers import Callers
from shufflefs.control import process_memory
from shufflefs.core import Filesystem
from shufflefs.fuse import mount as fuse_mount
from shufflefs.fuse.pyfuse3_adapter import Operations
from shufflefs.fuse.session import Session
from shufflefs.heartbeat import EVERY as HEARTBEAT_EVERY, Heartbeat, keep as keep_heartbeat
from shufflefs.journal import Journal
from shufflefs.metrics import MountCollector, serve as serve_metrics
from shufflefs.registry import LEASE as EXECUTOR_LEASE, Registry
from shufflefs.remote import LATE_WINDOW, REQUEST_TIMEOUT, Remote
from shufflefs.staging import StagingArea
from shufflefs.stores import Store, StoreError, open_store
from shufflefs.views import Views

log = logging.getLogger(__name__)


class SetupError(Exception):
    """A reason not to mount, for the user, in one line."""


@dataclass
class MountConfig:
    store_url: str
    mountpoint: str
    cache_dir: str
    cache_size: int
    commit: str = "sync"
    s3_endpoint_url: str | None = None
    upload_workers: int = 8
    listing_ttl: float = 1.0
    max_attempts: int = 6
    owner: tuple[int, int] | None = None
    #: on SIGTERM/SIGINT, drain and exit but leave the (then dead) mount for the next daemon
    leave_mount: bool = False
    #: seconds a store request may still be applied after its sender gave up on it
    late_window: float = LATE_WINDOW
    #: seconds a FUSE request waits for the store (a read, a listing, a sync commit's upload)
    store_timeout: float = REQUEST_TIMEOUT
    #: seconds after its node's last renewal that a node's executors count as lost, and their
    #: map outputs may be adopted by executors elsewhere (docs/RECOVERY.md)
    executor_lease: float = EXECUTOR_LEASE
    #: which FUSE session serves the mount (cli.FUSE_SESSIONS)
    fuse: str = "own"
    #: whether our session may pass reads and writes of local files through to them
    passthrough: bool = True
    #: (host, port) to serve Prometheus metrics on (shufflefs.metrics), None: not served
    metrics_addr: tuple[str, int] | None = None
    #: seconds between renewals of what this mount holds, for `shufflefs gc` (shufflefs.heartbeat)
    heartbeat: float = HEARTBEAT_EVERY


# ---------------------------------------------------------------------------- places
def default_cache_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/lib/shufflefs"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
                            "shufflefs")
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
        raise SetupError(f"{what} {path} belongs to uid {info.st_uid}, not to this user "
                         f"({os.geteuid()}); remove it or use another")
    if mode & 0o022:
        raise SetupError(f"{what} {path} is writable by other users (mode {mode:04o}); "
                         f"remove it or use another")
    if mode != 0o700:
        if not ours(path):
            raise SetupError(f"{what} {path} is readable by other users (mode {mode:04o}) and holds "
                             f"more than shufflefs' files; use a directory of its own")
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
                result[fuse_mount.unescape(fields[1])] = fields[2]
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
    raise SetupError(f"{mountpoint} is a stale shufflefs mount and could not be detached; "
                     f"try: umount -l {mountpoint}")


def notify_service_manager(state: str) -> None:
    """Tell systemd how the mount is doing (a Type=notify unit: READY=1 once it is live,
    STOPPING=1 while draining); nothing when not run by one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror)


# ---------------------------------------------------------------------------- checks
def check_mountpoint(mountpoint: str) -> tuple[str, bool]:
    """The mountpoint's real path, and whether it holds a stale shufflefs mount to mount over."""
    path = os.path.abspath(mountpoint)
    try:
        os.stat(path)
        os.statvfs(path)  # unlike stat, never answered from the kernel's attribute cache
    except FileNotFoundError:
        raise SetupError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno in DEAD_MOUNT_ERRNOS and is_stale_mount(path):
            if os.geteuid() == 0:
                return path, True  # see shufflefs.fuse.mount: mounting over it reaches its consumers
            clear_stale_mount(path)  # a user mount goes through fusermount3, which cannot
            return check_mountpoint(path)
        if exc.errno in DEAD_MOUNT_ERRNOS:
            raise SetupError(f"{path} is a stale FUSE mount (transport endpoint is not connected) that is not "
                             f"shufflefs'; clear it with: fusermount3 -u -z {path}") from None
        raise SetupError(f"cannot use mountpoint {path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise SetupError(f"mountpoint {path} is not a directory")
    path = os.path.realpath(path)
    fstype = mounted_filesystems().get(path)
    # an empty bind mount or volume (a container's emptyDir) is a fine mountpoint; a FUSE
    # filesystem there is somebody's live mount
    if fstype is not None and fstype.startswith("fuse") and os.path.ismount(path):
        raise SetupError(f"{path} is already a mount point ({fstype})")
    try:
        if os.listdir(path):
            raise SetupError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise SetupError(f"cannot read mountpoint {path}: permission denied") from None
    return path, False


def open_checked_store(config: MountConfig) -> Store:
    try:
        store = open_store(config.store_url, s3_endpoint_url=config.s3_endpoint_url)
        store.check()
    except StoreError as exc:
        raise SetupError(str(exc)) from None
    return store


def _within(path: str, directory: str) -> bool:
    """Whether real path `path` is `directory` or under it."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_outside(mountpoint: str, what: str, path: str) -> None:
    """The daemon would deadlock writing through its own mount."""
    if _within(os.path.realpath(path), mountpoint):
        raise SetupError(f"{what} {path} is inside the mountpoint {mountpoint}; put it elsewhere")


def check_cache_dir(mountpoint: str, cache_dir: str) -> None:
    """Neither may hold the other: the daemon would write through its own mount, or its
    staging files would be mixed with the mount (and a mount on them kept busy)."""
    check_outside(mountpoint, "--cache-dir", cache_dir)
    if _within(mountpoint, os.path.realpath(cache_dir)):
        raise SetupError(f"the mountpoint {mountpoint} is inside the cache dir {cache_dir}; put it elsewhere")


def check_store_apart(mountpoint: str, cache_dir: str, store_dir: str) -> None:
    """A store directory that holds the cache dir would show the daemon's LMDB, lock, log and
    staging files as store files (readable, deletable through the mount); one inside the cache
    dir would be mixed with them. A mountpoint inside the store directory would be listed as a
    store directory, and listing it would go back through the mount. (The mountpoint
    inside the cache dir: check_cache_dir.)"""
    store, cache = os.path.realpath(store_dir), os.path.realpath(cache_dir)
    if _within(cache, store) or _within(store, cache):
        raise SetupError(f"the store directory {store_dir} and the cache dir {cache_dir} overlap "
                         "(one is, or holds, the other); keep them apart")
    if _within(mountpoint, store):
        raise SetupError(f"the mountpoint {mountpoint} is inside the store directory {store_dir}; "
                         "put it elsewhere")


def check_log_file(log_file: str, store_dir: str) -> None:
    """A log inside a file:// store would be shown, and deletable, through the mount."""
    if _within(os.path.realpath(log_file), os.path.realpath(store_dir)):
        raise SetupError(f"--log-file {log_file} is inside the store directory {store_dir}; put it elsewhere")


class CacheDirBusy(SetupError):
    pass


@contextlib.contextmanager
def open_journal(path: str, *, exclusive: bool):
    """The journal of an existing cache dir, for `shufflefs journal`; with `exclusive`, only
    while no daemon uses the cache dir (its journal would not see the change)."""
    if not os.path.isdir(os.path.join(path, "lmdb")):
        raise CacheDirBusy(f"{path} is not a shufflefs cache dir (no lmdb/ in it)")
    with open(os.path.join(path, "lock"), "a+") as lock:
        if exclusive:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise CacheDirBusy(f"cache dir {path} is in use by a shufflefs daemon (pid "
                                   f"{lock.read().strip() or '?'}): unmount it first") from None
        try:
            journal = Journal(os.path.join(path, "lmdb"))
        except lmdb.Error as exc:
            raise CacheDirBusy(f"cannot read the journal in {path}: {exc}") from None
        try:
            yield journal
        finally:
            journal.close()


#: what a cache dir holds (the log unless --log-file puts it elsewhere)
CACHE_DIR_ENTRIES = {"lock", "lmdb", "staging", "shufflefs.log"}


def is_cache_dir_only(path: str) -> bool:
    """Whether `path` holds nothing but a cache dir's files: its modes are ours to change."""
    return set(os.listdir(path)) <= CACHE_DIR_ENTRIES


def make_private(path: str) -> None:
    """Take group and other access off the files and directories an earlier version left in
    the cache dir with the default modes (LMDB 0644 holds `.index` contents; the log names
    every file). The staging files were always created 0600, so their directory is not walked."""
    entries = [os.path.join(path, name) for name in CACHE_DIR_ENTRIES]
    with contextlib.suppress(FileNotFoundError):
        entries += [entry.path for entry in os.scandir(os.path.join(path, "lmdb"))]
    for entry in entries:
        try:
            info = os.lstat(entry)
        except FileNotFoundError:
            continue
        wanted = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
        if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) != wanted:
            os.chmod(entry, wanted)


class CacheDir:
    """The cache directory: LMDB, staging files, a lock that keeps a second daemon out. All
    private to the daemon's user: directories 0700, files 0600."""

    def __init__(self, path: str, store_url: str):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            private_dir(path, "cache dir", is_cache_dir_only)
            make_private(path)
            self._lock = os.fdopen(os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_APPEND
                                           | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "a+")
        except OSError as exc:
            raise SetupError(f"cannot use cache dir {path}: {exc.strerror}") from None
        try:
            self._open(path, store_url)
        except (OSError, lmdb.Error) as exc:
            self._lock.close()
            raise SetupError(f"cannot use cache dir {path}: {exc}") from None

    def _open(self, path: str, store_url: str) -> None:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            raise SetupError(f"cache dir {path} is in use by another shufflefs daemon (pid {holder})") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.journal = Journal(os.path.join(path, "lmdb"))
        recorded = self.journal.meta_get("store_url")
        if recorded is None:
            self.journal.meta_set("store_url", store_url)
        elif recorded != store_url:
            pending = len(self.journal.pending_ops())
            self.journal.close()
            raise SetupError(f"cache dir {path} belongs to store {recorded} ({pending} pending uploads); "
                             f"use another --cache-dir for {store_url}")
        self.staging = StagingArea(os.path.join(path, "staging"))

    def close(self) -> None:
        self.journal.close()
        self._lock.close()


# ---------------------------------------------------------------------------- running
#: seconds a drain waits for open shuffle files to be closed (and committed) first
RELEASE_WAIT = 5.0
FSTYPE = "fuse.shufflefs"


def start_session(config: MountConfig, fs: Filesystem, mountpoint: str, store_url: str) -> Session | Operations:
    """Mount `mountpoint` and return the session that will serve it. Root mounts with mount(2)
    itself (which can mount over a dead mount, see shufflefs.fuse.mount), other users through
    fusermount3; pyfuse3 is handed the descriptor (as root) or mounts through libfuse."""
    source = store_url if "," not in store_url else "shufflefs"
    # the kernel's options: Spark runs as another user than root in most deployments
    options = ["default_permissions", *(["allow_other"] if os.geteuid() == 0 else [])]
    if config.fuse == "pyfuse3":
        operations = Operations(fs)
        operations.mount(mountpoint, source, FSTYPE, options)
        return operations
    fd, made = fuse_mount.open_session_fd(mountpoint, source, FSTYPE, options)
    return Session(fs, fd, mountpoint, made, passthrough=config.passthrough)


#: a store operation waiting longer than this means the store does not keep up
BEHIND_AFTER = 60.0
BACKLOG_CHECK_EVERY = 10.0


def backlog_warning(oldest_seconds: float, pending_ops: int, pending_bytes: int, cache_size: int) -> str | None:
    """What to warn about the uploads, if they fall behind: the oldest waits over BEHIND_AFTER,
    or over half the cache waits for upload (where async commits start to wait)."""
    if oldest_seconds <= BEHIND_AFTER and pending_bytes <= cache_size // 2:
        return None
    return (f"uploads are falling behind: {pending_ops} store operations pending, the oldest for "
            f"{oldest_seconds:.0f} s, {pending_bytes} bytes waiting for upload (--cache-size {cache_size}); "
            "is the store slow or failing?")


async def watch_backlog(remote: Remote, cache_size: int) -> None:
    """Warn once when uploads fall behind, and say when they caught up."""
    behind = False
    while True:
        await trio.sleep(BACKLOG_CHECK_EVERY)
        warning = backlog_warning(remote.oldest_pending_seconds(), len(remote.pending), remote.pending_put_bytes,
                                  cache_size)
        if warning is not None and not behind:
            log.warning("%s", warning)
        elif warning is None and behind:
            log.info("uploads caught up: %d store operations pending", len(remote.pending))
        behind = warning is not None


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


def run(config: MountConfig, ready: Callable[[], None]) -> int:
    """Mount, serve until unmounted or signalled, drain, unmount. Raises SetupError before
    anything is mounted; afterwards returns the exit status (1 if uploads were left over)."""
    mountpoint, over_stale = check_mountpoint(config.mountpoint)
    private_run_dir()
    check_cache_dir(mountpoint, config.cache_dir)
    store = open_checked_store(config)
    for path in store.local_paths():
        check_outside(mountpoint, "the store directory", path)
        check_store_apart(mountpoint, config.cache_dir, path)
    cache = CacheDir(config.cache_dir, store.url)
    remote = Remote(store, cache.journal, workers=config.upload_workers, max_attempts=config.max_attempts,
                    late_window=config.late_window, request_timeout=config.store_timeout)
    fs = Filesystem(store, remote, cache.journal, cache.staging, commit_mode=config.commit,
                    cache_size=config.cache_size, remote_ttl=config.listing_ttl, owner=config.owner,
                    views=Views(Callers(), Registry(store, remote.instance, config.cache_dir,
                                                    config.executor_lease), remote.call))
    beat = Heartbeat(store, remote.instance, config.cache_dir, config.heartbeat)
    # computed before mounting: resolving the path afterwards would ask this very daemon
    pid_file = run_file(mountpoint, "json")
    status_file = run_file(mountpoint, "status")
    control_socket = run_file(mountpoint, "sock")

    def stats() -> dict:
        process = process_memory()
        requests = session.request_counts() if session else {}
        count = max(1, sum(requests.values()))
        return {"store": dict(remote.stats), "fs": dict(fs.stats),
                "fuse": {"session": config.fuse, "passthrough": session.passthrough if session else False,
                         "requests": requests,
                         # all of the daemon's CPU (uploads, staging housekeeping) per request
                         "cpu_us_per_request": round(process["cpu_seconds"] * 1e6 / count, 1),
                         # the trio thread's: requests, commits, journal (stats runs on it)
                         "loop_cpu_us_per_request": round(time.thread_time() * 1e6 / count, 1)},
                "pending_ops": len(remote.pending),
                "oldest_pending_seconds": round(remote.oldest_pending_seconds(), 3),
                "refused_ops": len(remote.failed), "pending_sweeps": len(remote.sweeps),
                "pending_put_bytes": remote.pending_put_bytes, "cached_bytes": fs.staging.bytes,
                "cache_size": fs.cache_size, "commit": config.commit, "store_url": store.url,
                **process}
    def metrics_snapshot() -> dict:
        snapshot = stats()
        snapshot["fuse"]["latency"] = session.times.snapshot() if session else {}
        return snapshot

    metrics_server, collector = None, MountCollector()
    if config.metrics_addr is not None:
        host, port = config.metrics_addr
        try:
            metrics_server = serve_metrics(host, port, collector)
        except OSError as exc:
            cache.close()
            raise SetupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    if os.path.exists(status_file):
        os.unlink(status_file)
    # before mounting: from now on nobody takes the mount for a dead daemon's
    write_run_file(pid_file, {"pid": os.getpid(), "mountpoint": mountpoint,
                              "store": store.url, "cache_dir": config.cache_dir})
    session = None
    try:
        session = start_session(config, fs, mountpoint, store.url)
    except (RuntimeError, OSError) as exc:
        os.unlink(pid_file)
        cache.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        raise SetupError(f"mounting {mountpoint} failed: {getattr(exc, 'strerror', None) or exc}") from None
    if over_stale:
        log.warning("mounted over the stale mount a dead daemon left on %s: whoever still saw that one "
                    "(other mount namespaces, bind mounts of it) now sees this one", mountpoint)

    left_mount = False  # set when a signal ends the daemon with config.leave_mount

    async def main() -> None:
        collector.attach(metrics_snapshot, trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals)  # before the journal is resumed, which can take a while
            remote.start(nursery)
            nursery.start_soon(cache.staging.housekeep)
            nursery.start_soon(fs.views.keep_lease)
            nursery.start_soon(keep_heartbeat, beat, cache.journal.dirs, fs.views.callers.alive, remote.call)
            nursery.start_soon(watch_backlog, remote, fs.cache_size)
            resumed = fs.resume_journal()
            if resumed:
                log.info("resumed %d remote operations from the journal", resumed)
            await nursery.start(control.serve, control_socket, stats, remote.settle)
            log.info("mounted %s on %s (commit=%s, cache %s, %d bytes, fuse=%s, %d upload workers, store "
                     "timeout %gs, executor lease %gs, heartbeat %gs)", store.url, mountpoint, config.commit,
                     config.cache_dir, config.cache_size, config.fuse, config.upload_workers, config.store_timeout,
                     config.executor_lease, config.heartbeat)
            ready()
            notify_service_manager(f"READY=1\nSTATUS=serving {store.url} on {mountpoint}")
            await session.serve()
            # unmounted (by a signal below, or from outside): finish what was committed
            await drain()
            nursery.cancel_scope.cancel()

    async def drain() -> None:
        notify_service_manager(f"STOPPING=1\nSTATUS=draining {len(remote.pending)} remote operations")
        fs.draining = True
        # a file closed just before the signal commits at its RELEASE, which may still be on its
        # way; give writers of shuffle files a moment to close
        with trio.move_on_after(RELEASE_WAIT):
            while fs.uncommitted_writers():
                await trio.sleep(0.05)
        await remote.drain()

    async def watch_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal left_mount
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("%s: draining %d pending remote operations, then %s", signal.Signals(signum).name,
                         len(remote.pending), "leaving the mount for the next daemon" if config.leave_mount
                         else "unmounting")
                await drain()
                left_mount = config.leave_mount
                session.terminate()
                return

    try:
        trio.run(main)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        try:
            session.close(unmount=not left_mount)
        except OSError as exc:
            log.error("cannot unmount %s: %s", mountpoint, exc.strerror)
        if not left_mount:
            cache.journal.dirs_clear()  # their users went with the mount
            if beat.written:
                try:  # what this mount held is now `shufflefs gc`'s, once --older-than passed
                    beat.withdraw()
                except StoreError as exc:
                    log.warning("could not delete this mount's heartbeat %s (it goes stale): %s", beat.key, exc)
        cache.close()
        store.close()
        final = stats()
        write_run_file(status_file, {"given_up": len(remote.given_up),
                                     "refused": sum(not op.reported for op in remote.failed),
                                     "stats": final["store"],
                                     "fs": final["fs"], "fuse": final["fuse"], "peak_rss_bytes": final["peak_rss_bytes"]})
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass
        try:  # the dead mounts this one covered; their last consumers just lost this mount anyway
            while not left_mount and clear_stale_mount(mountpoint):
                pass
        except SetupError as exc:
            log.warning("%s", exc)
    log.info("%s %s; store requests: %s", "left the mount (dead until the next daemon mounts over it) on"
             if left_mount else "unmounted", mountpoint, final["store"])
    if remote.given_up:
        log.error("%d remote operations could not be completed; they stay in the journal of %s "
                  "and resume on the next mount with that cache dir", len(remote.given_up), config.cache_dir)
    # a refusal a sync commit reported to its caller was dealt with there
    unreported = [op for op in remote.failed if not op.reported]
    if unreported:
        log.error("the store refused %d operations for good; `shufflefs journal %s` lists them",
                  len(unreported), config.cache_dir)
    return 1 if remote.given_up or unreported else 0
