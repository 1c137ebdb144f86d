"""Setting up and running one mount: checks, cache directory, FUSE session, signals, drain.

Every check that can fail for a user's reason happens before anything is mounted and raises
SetupError with one line of explanation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import lmdb
import trio

from shufflefs import control
from shufflefs.assembly import Tunables, assemble
from shufflefs.callers import Callers
from shufflefs.control import process_memory
from shufflefs.core import Filesystem
from shufflefs.fuse import mount as fuse_mount
from shufflefs.fuse.pyfuse3_adapter import Operations
from shufflefs.fuse.session import Session
from shufflefs.heartbeat import EVERY as HEARTBEAT_EVERY
from shufflefs.heartbeat import Heartbeat
from shufflefs.heartbeat import keep as keep_heartbeat
from shufflefs.journal import Journal
from shufflefs.metrics import MountCollector
from shufflefs.metrics import serve as serve_metrics
from shufflefs.places import (
    DEAD_MOUNT_ERRNOS,
    SetupError,
    clear_stale_mount,
    is_stale_mount,
    mounted_filesystems,
    private_dir,
    private_run_dir,
    run_file,
    write_run_file,
)
from shufflefs.registry import Registry
from shufflefs.remote import Remote
from shufflefs.staging import StagingArea
from shufflefs.stores import Store, StoreError, open_store
from shufflefs.views import Views

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    store_url: str
    mountpoint: str
    cache_dir: str
    #: the core's (commit mode, cache size, store requests, timeouts, leases, owner)
    tunables: Tunables
    s3_endpoint_url: str | None = None
    #: on SIGTERM/SIGINT, drain and exit but leave the (then dead) mount for the next daemon
    leave_mount: bool = False
    #: which FUSE session serves the mount (cli.FUSE_SESSIONS)
    fuse: str = "own"
    #: whether our session may pass reads and writes of local files through to them
    passthrough: bool = True
    #: (host, port) to serve Prometheus metrics on (shufflefs.metrics), None: not served
    metrics_addr: tuple[str, int] | None = None
    #: seconds between renewals of what this mount holds, for `shufflefs gc` (shufflefs.heartbeat)
    heartbeat: float = HEARTBEAT_EVERY


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
            raise SetupError(
                f"{path} is a stale FUSE mount (transport endpoint is not connected) that is not "
                f"shufflefs'; clear it with: fusermount3 -u -z {path}"
            ) from None
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
        raise SetupError(
            f"the store directory {store_dir} and the cache dir {cache_dir} overlap "
            "(one is, or holds, the other); keep them apart"
        )
    if _within(mountpoint, store):
        raise SetupError(f"the mountpoint {mountpoint} is inside the store directory {store_dir}; put it elsewhere")


def check_log_file(log_file: str, store_dir: str) -> None:
    """A log inside a file:// store would be shown, and deletable, through the mount."""
    if _within(os.path.realpath(log_file), os.path.realpath(store_dir)):
        raise SetupError(f"--log-file {log_file} is inside the store directory {store_dir}; put it elsewhere")


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
            self._lock = os.fdopen(
                os.open(
                    os.path.join(path, "lock"),
                    os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                ),
                "a+",
            )
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
            raise SetupError(
                f"cache dir {path} belongs to store {recorded} ({pending} pending uploads); "
                f"use another --cache-dir for {store_url}"
            )
        self.staging = StagingArea(os.path.join(path, "staging"))

    def close(self) -> None:
        self.journal.close()
        self._lock.close()


# ---------------------------------------------------------------------------- running
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
    return (
        f"uploads are falling behind: {pending_ops} store operations pending, the oldest for "
        f"{oldest_seconds:.0f} s, {pending_bytes} bytes waiting for upload (--cache-size {cache_size}); "
        "is the store slow or failing?"
    )


async def watch_backlog(remote: Remote, cache_size: int) -> None:
    """Warn once when uploads fall behind, and say when they caught up."""
    behind = False
    while True:
        await trio.sleep(BACKLOG_CHECK_EVERY)
        warning = backlog_warning(
            remote.oldest_pending_seconds(), len(remote.pending), remote.pending_put_bytes, cache_size
        )
        if warning is not None and not behind:
            log.warning("%s", warning)
        elif warning is None and behind:
            log.info("uploads caught up: %d store operations pending", len(remote.pending))
        behind = warning is not None


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
    tunables = config.tunables
    fs = assemble(
        store,
        cache.journal,
        cache.staging,
        tunables,
        lambda remote: Views(
            Callers(), Registry(store, remote.instance, config.cache_dir, tunables.executor_lease), remote.call
        ),
    )
    remote, views = fs.remote, fs.views
    assert views is not None
    beat = Heartbeat(store, remote.instance, config.cache_dir, config.heartbeat)
    # computed before mounting: resolving the path afterwards would ask this very daemon
    pid_file = run_file(mountpoint, "json")
    status_file = run_file(mountpoint, "status")
    control_socket = run_file(mountpoint, "sock")

    def stats() -> dict:
        process = process_memory()
        requests = session.request_counts() if session else {}
        count = max(1, sum(requests.values()))
        return {
            "store": dict(remote.stats),
            "fs": dict(fs.stats),
            "fuse": {
                "session": config.fuse,
                "passthrough": session.passthrough if session else False,
                "requests": requests,
                # all of the daemon's CPU (uploads, staging housekeeping) per request
                "cpu_us_per_request": round(process["cpu_seconds"] * 1e6 / count, 1),
                # the trio thread's: requests, commits, journal (stats runs on it)
                "loop_cpu_us_per_request": round(time.thread_time() * 1e6 / count, 1),
            },
            "pending_ops": len(remote.pending),
            "oldest_pending_seconds": round(remote.oldest_pending_seconds(), 3),
            "refused_ops": len(remote.failed),
            "pending_sweeps": len(remote.sweeps),
            "pending_put_bytes": remote.pending_put_bytes,
            "cached_bytes": fs.staging.bytes,
            "cache_size": fs.cache_size,
            "commit": tunables.commit,
            "store_url": store.url,
            **process,
        }

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
    write_run_file(
        pid_file, {"pid": os.getpid(), "mountpoint": mountpoint, "store": store.url, "cache_dir": config.cache_dir}
    )
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
        log.warning(
            "mounted over the stale mount a dead daemon left on %s: whoever still saw that one "
            "(other mount namespaces, bind mounts of it) now sees this one",
            mountpoint,
        )

    left_mount = False  # set when a signal ends the daemon with config.leave_mount

    async def main() -> None:
        collector.attach(metrics_snapshot, trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals)  # before the journal is resumed, which can take a while
            remote.start(nursery)
            nursery.start_soon(cache.staging.housekeep)
            nursery.start_soon(views.keep_lease)
            nursery.start_soon(keep_heartbeat, beat, cache.journal.dirs, views.callers.alive, remote.call)
            nursery.start_soon(watch_backlog, remote, fs.cache_size)
            resumed = fs.resume_journal()
            if resumed:
                log.info("resumed %d remote operations from the journal", resumed)
            await nursery.start(control.serve, control_socket, stats, remote.settle)
            log.info(
                "mounted %s on %s (commit=%s, cache %s, %d bytes, fuse=%s, %d upload workers, store "
                "timeout %gs, executor lease %gs, heartbeat %gs)",
                store.url,
                mountpoint,
                tunables.commit,
                config.cache_dir,
                tunables.cache_size,
                config.fuse,
                tunables.upload_workers,
                tunables.store_timeout,
                tunables.executor_lease,
                config.heartbeat,
            )
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
        with trio.move_on_after(tunables.release_wait):
            while fs.uncommitted_writers():
                await trio.sleep(0.05)
        await remote.drain()

    async def watch_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal left_mount
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info(
                    "%s: draining %d pending remote operations, then %s",
                    signal.Signals(signum).name,
                    len(remote.pending),
                    "leaving the mount for the next daemon" if config.leave_mount else "unmounting",
                )
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
        write_run_file(
            status_file,
            {
                "given_up": len(remote.given_up),
                "refused": sum(not op.reported for op in remote.failed),
                "stats": final["store"],
                "fs": final["fs"],
                "fuse": final["fuse"],
                "peak_rss_bytes": final["peak_rss_bytes"],
            },
        )
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass
        try:  # the dead mounts this one covered; their last consumers just lost this mount anyway
            while not left_mount and clear_stale_mount(mountpoint):
                pass
        except SetupError as exc:
            log.warning("%s", exc)
    log.info(
        "%s %s; store requests: %s",
        "left the mount (dead until the next daemon mounts over it) on" if left_mount else "unmounted",
        mountpoint,
        final["store"],
    )
    if remote.given_up:
        log.error(
            "%d remote operations could not be completed; they stay in the journal of %s "
            "and resume on the next mount with that cache dir",
            len(remote.given_up),
            config.cache_dir,
        )
    # a refusal a sync commit reported to its caller was dealt with there
    unreported = [op for op in remote.failed if not op.reported]
    if unreported:
        log.error(
            "the store refused %d operations for good; `shufflefs journal %s` lists them",
            len(unreported),
            config.cache_dir,
        )
    return 1 if remote.given_up or unreported else 0
