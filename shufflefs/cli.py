"""Command line: `shufflefs mount` and `shufflefs umount`.

Errors a user can cause print one line `shufflefs: error: ...` and exit 1 (one line
`shufflefs COMMAND: error: ...` and 2 for a malformed or out-of-range option); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from shufflefs import __version__, bench, gc, inventory, show
from shufflefs.options import (
    EXIT_FAILURE,
    CommandError,
    OneLineParser,
    add_mount_arguments,
    positive_int,
    positive_seconds,
    wait_seconds,
)
from shufflefs.places import (
    SetupError,
    clear_stale_mount,
    daemon_pid,
    default_cache_dir,
    is_stale_mount,
    mounted_filesystems,
    process_alive,
    run_file,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="shufflefs",
        description="Spark's local directory on FUSE: committed shuffle files are written through "
        "to a store, scratch files stay on this node.",
    )
    parser.add_argument("--version", action="version", version=f"shufflefs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount a store on a directory",
        description="Mount STORE_URL on MOUNTPOINT. Without --foreground, returns once the mount "
        "is live (exit 0) or failed (non-zero, with the reason).",
        epilog="Store URLs: file:///abs/dir (any POSIX directory, e.g. NFS), "
        "s3://bucket[/prefix] (AWS credential chain; endpoint from --s3-endpoint-url or "
        "AWS_ENDPOINT_URL), daos://pool/container[/prefix] (needs pydaos), memory:// (tests).",
    )
    add_mount_arguments(mount)
    mount.set_defaults(run=cmd_mount)

    umount = commands.add_parser(
        "umount",
        help="drain pending uploads, then unmount",
        description="Ask the daemon serving MOUNTPOINT to finish its pending uploads and unmount; "
        "wait for it. Clears a stale mount left by a dead daemon.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument(
        "--timeout",
        type=wait_seconds,
        default=0,
        help="give up waiting after this many seconds (default: wait until drained)",
    )
    umount.add_argument(
        "--lazy", action="store_true", help="do not wait: the daemon drains and unmounts in the background"
    )
    umount.set_defaults(run=cmd_umount)

    stats = commands.add_parser(
        "stats",
        help="counters of a running mount (JSON)",
        description="Print the counters of the daemon serving the mount that holds PATH as JSON: "
        "store requests and bytes, pending uploads, cache use, memory.",
    )
    stats.add_argument("path", metavar="PATH")
    stats.add_argument(
        "--sync", action="store_true", help="first wait until every file committed so far is in the store"
    )
    stats.add_argument(
        "--timeout",
        type=positive_seconds,
        default=600,
        help="give up waiting for an answer after this many seconds (default: %(default)s)",
    )
    stats.set_defaults(run=cmd_stats)

    helper = commands.add_parser(
        "install-mount-helper",
        help="let mount(8) and /etc/fstab mount shufflefs (-t fuse.shufflefs)",
        description="Write the mount(8) helper mount.fuse.shufflefs into DIR, running this Python, with "
        "mount.shufflefs, umount.fuse.shufflefs and umount.shufflefs (umount(8) drains through them) "
        "linking to it. Then `mount -t fuse.shufflefs STORE_URL MOUNTPOINT -o "
        "cache_size=20G,commit=async` and fstab lines of type fuse.shufflefs work.",
    )
    helper.add_argument("--dir", default="/sbin", help="where mount(8) looks for helpers (default: %(default)s)")
    helper.set_defaults(run=cmd_install_mount_helper)

    journal = commands.add_parser(
        "journal",
        help="list (or drop) the store operations a cache dir owes or the store refused",
        description="List the remote operations recorded in CACHE_DIR: pending ones (retried by the "
        "daemon, and by the next mount with this cache dir) and failed ones (refused by "
        "the store for good, kept here for inspection, never retried). Works while a "
        "daemon uses the cache dir; --drop needs it stopped.",
    )
    journal.add_argument("cache_dir", metavar="CACHE_DIR")
    journal.add_argument(
        "--drop",
        type=positive_int,
        nargs="+",
        metavar="SEQ",
        help="forget these operations (a dropped upload's file is then not stored)",
    )
    journal.set_defaults(run=cmd_journal)

    for command in (inventory, show, gc, bench):
        command.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:
        print(f"shufflefs: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- mount
def _mount_config(args):
    from shufflefs.assembly import Tunables
    from shufflefs.daemon import MountConfig
    from shufflefs.stores import StoreError, check_endpoint_url

    try:  # before they reach the daemon's command line
        check_endpoint_url(args.store_url, "the store URL")
        if args.s3_endpoint_url:
            check_endpoint_url(args.s3_endpoint_url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir(args.mountpoint))
    cache_size = args.cache_size
    if cache_size is None:
        probe = cache_dir
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        cache_size = int(shutil.disk_usage(probe).free * 0.8)
    tunables = Tunables(
        commit=args.commit,
        cache_size=cache_size,
        upload_workers=args.upload_workers,
        late_window=args.late_window,
        store_timeout=args.store_timeout,
        executor_lease=args.executor_lease,
        owner=args.owner,
    )
    return MountConfig(
        store_url=args.store_url,
        mountpoint=os.path.abspath(args.mountpoint),
        cache_dir=cache_dir,
        tunables=tunables,
        s3_endpoint_url=args.s3_endpoint_url,
        leave_mount=args.leave_mount,
        fuse=args.fuse,
        heartbeat=args.heartbeat,
        metrics_addr=args.metrics_addr,
        passthrough=args.passthrough,
    )


def _setup_logging(level: str, stream) -> None:
    logging.basicConfig(stream=stream, level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_mount(args) -> int:
    config = _mount_config(args)
    if args.foreground or args.ready_fd is not None:
        return _run_foreground(args, config)
    return _spawn_daemon(args, config)


def _stop_during_setup(signum, _frame):
    raise SystemExit(128 + signum)


def _run_foreground(args, config) -> int:
    # as PID 1 of a container a signal without a handler is dropped: until the daemon listens
    # for SIGTERM itself (once mounted), it ends the setup
    signal.signal(signal.SIGTERM, _stop_during_setup)
    from shufflefs.daemon import run

    _setup_logging(args.log_level, sys.stderr)
    ready_pipe = None
    if args.ready_fd is not None:
        ready_pipe = os.fdopen(args.ready_fd, "w")
        os.chdir("/")  # a daemon must not keep the directory it was started from busy

    def ready() -> None:
        if ready_pipe is not None:
            ready_pipe.write("OK\n")
            ready_pipe.close()

    try:
        return run(config, ready)
    except SetupError as exc:
        if ready_pipe is not None:
            ready_pipe.write(f"ERR {exc}\n")
            ready_pipe.close()
        raise CommandError(str(exc)) from None


def _spawn_daemon(args, config) -> int:
    """Start `shufflefs mount --ready-fd` in a new session and wait for its verdict."""
    from shufflefs.daemon import check_cache_dir, check_log_file, check_outside, check_store_apart
    from shufflefs.stores import StoreError, local_store_dirs

    log_file = os.path.abspath(args.log_file or os.path.join(config.cache_dir, "shufflefs.log"))
    mountpoint = os.path.realpath(config.mountpoint)
    try:  # before the log file is created, which could make the mountpoint (or a store dir) non-empty
        check_cache_dir(mountpoint, config.cache_dir)
        check_outside(mountpoint, "--log-file", log_file)
        for store_dir in local_store_dirs(config.store_url):
            check_store_apart(mountpoint, config.cache_dir, store_dir)
            check_log_file(log_file, store_dir)
    except (SetupError, StoreError) as exc:
        raise CommandError(str(exc)) from None
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        # private (it names every file), and never through a symlink another user planted
        log = os.fdopen(
            os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "a"
        )
    except OSError as exc:
        raise CommandError(f"cannot open log file {log_file}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    command = [
        sys.executable,
        "-m",
        "shufflefs",
        "mount",
        config.store_url,
        config.mountpoint,
        "--cache-dir",
        config.cache_dir,
        "--cache-size",
        str(config.tunables.cache_size),
        "--commit",
        config.tunables.commit,
        "--upload-workers",
        str(config.tunables.upload_workers),
        "--late-window",
        repr(config.tunables.late_window),
        "--store-timeout",
        repr(config.tunables.store_timeout),
        "--executor-lease",
        repr(config.tunables.executor_lease),
        "--heartbeat",
        repr(config.heartbeat),
        "--fuse",
        config.fuse,
        "--log-level",
        args.log_level,
        "--ready-fd",
        str(write_end),
    ]
    if config.s3_endpoint_url:
        command += ["--s3-endpoint-url", config.s3_endpoint_url]
    if config.tunables.owner is not None:
        command += ["--owner", "{}:{}".format(*config.tunables.owner)]
    if config.leave_mount:
        command.append("--leave-mount")
    if config.metrics_addr is not None:
        command += ["--metrics-addr", "[{}]:{}".format(*config.metrics_addr)]
    if not config.passthrough:
        command.append("--no-passthrough")
    with log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,), start_new_session=True
        )
    os.close(write_end)
    with os.fdopen(read_end) as verdict_pipe:
        verdict = verdict_pipe.readline().strip()
    if verdict == "OK":
        return 0
    if verdict.startswith("ERR "):
        process.wait()
        raise CommandError(verdict[4:])
    status = process.wait()
    raise CommandError(f"the daemon exited (status {status}) before the mount was live; see {log_file}")


# ---------------------------------------------------------------------------- stats
def cmd_stats(args) -> int:
    from shufflefs.control import mount_stats

    if not os.path.lexists(args.path):
        raise CommandError(f"{args.path} does not exist")
    print(json.dumps(mount_stats(args.path, sync=args.sync, timeout=args.timeout), indent=1, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------- journal
def cmd_journal(args) -> int:
    from shufflefs.journal import CacheDirBusy, open_journal

    try:
        with open_journal(args.cache_dir, exclusive=bool(args.drop)) as journal:
            if args.drop:
                missing = [seq for seq in args.drop if not journal.drop_op(seq)]
                if missing:
                    raise CommandError(
                        f"no operation {', '.join(map(str, missing))} in {args.cache_dir} (the others were dropped)"
                    )
                return 0
            for state, ops in (("pending", journal.pending_ops()), ("failed", journal.failed_ops())):
                for seq, record in ops:
                    target = f"{record['key']} -> {record['dst']}" if "dst" in record else record["key"]
                    size = f" ({record['size']} bytes)" if "size" in record else ""
                    error = f": {record['error']}" if "error" in record else ""
                    print(f"{seq}\t{state}\t{record['kind']}\t{target}{size}{error}")
    except CacheDirBusy as exc:
        raise CommandError(str(exc)) from None
    return 0


def cmd_install_mount_helper(args) -> int:
    from shufflefs.mount_helper import install

    try:
        paths = install(args.dir, sys.executable)
    except OSError as exc:
        raise CommandError(f"cannot install the mount helper in {args.dir}: {exc.strerror}") from None
    for path in paths:
        print(f"installed {path}")
    return 0


# ---------------------------------------------------------------------------- umount
def cmd_umount(args) -> int:

    mountpoint = os.path.realpath(args.mountpoint)
    pid = daemon_pid(mountpoint)
    if pid is None and not os.path.lexists(args.mountpoint) and not is_stale_mount(mountpoint):
        raise CommandError(f"{args.mountpoint} does not exist")
    if pid is None:
        if mounted_filesystems().get(mountpoint) != "fuse.shufflefs":
            raise CommandError(f"{mountpoint} is not a shufflefs mount")
        if not is_stale_mount(mountpoint):
            raise CommandError(
                f"{mountpoint} is served by a shufflefs daemon not visible from here (another "
                "container or PID namespace): stop that one (e.g. kubectl delete pod, systemctl "
                "stop); `umount -i -l` would detach it without draining"
            )
    else:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as exc:
            raise CommandError(f"cannot signal the daemon (pid {pid}) of {mountpoint}: {exc.strerror}") from None
        if args.lazy:
            print(f"shufflefs: {mountpoint}: the daemon drains and unmounts in the background", file=sys.stderr)
            return 0
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while process_alive(pid):
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(f"daemon {pid} still draining after {args.timeout:g}s; it goes on in the background")
            time.sleep(0.1)
    cleared = 0
    try:  # daemons that died without unmounting (killed, crashed) left these, maybe stacked
        while clear_stale_mount(mountpoint, quiet=True):
            cleared += 1
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    if cleared:
        print(f"shufflefs: {mountpoint} was a stale mount (no daemon); unmounted it", file=sys.stderr)
        return 0
    try:
        with open(run_file(mountpoint, "status")) as f:
            status = json.load(f)
    except (FileNotFoundError, ValueError):
        status = {}
    if status.get("given_up"):
        raise CommandError(
            f"unmounted {mountpoint}, but {status['given_up']} uploads could not be completed; "
            "they resume on the next mount with the same --cache-dir"
        )
    if status.get("refused"):
        raise CommandError(
            f"unmounted {mountpoint}, but the store refused {status['refused']} operations for good; "
            "`shufflefs journal CACHE_DIR` lists them"
        )
    return 0
