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

from shufflefs import __version__
from shufflefs.options import (
    EXIT_FAILURE,
    CommandError,
    OneLineParser,
    add_mount_arguments,
    add_s3_endpoint_argument,
    parse_duration,
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
    shufflefs_mount_of,
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

    listing = commands.add_parser(
        "ls",
        help="the shuffles a mount, a directory or a store holds",
        description="List the map outputs below PATH (a mount, or any directory) or in STORE_URL (without "
        "mounting it), per block manager directory and shuffle: map outputs, files, bytes, "
        "age; on a mount, how many files still wait for the store; in a store, the "
        "application where Spark's recovery plugin registered it.",
    )
    listing.add_argument("target", metavar="PATH|STORE_URL")
    listing.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    listing.add_argument(
        "--limit",
        type=positive_int,
        default=1_000_000,
        metavar="N",
        help="stop listing a store after N objects (default: %(default)s)",
    )
    add_s3_endpoint_argument(listing)
    listing.set_defaults(run=cmd_ls)

    gc = commands.add_parser(
        "gc",
        help="remove from a store what crashed or finished applications left and no live mount holds",
        description="Find, in STORE_URL, the Spark block manager directories no live mount holds (each mount "
        "renews a heartbeat in the store naming those it holds) with nothing written below them "
        "for DURATION, writes begun and never finished (S3 multipart uploads) that long ago, and "
        "the registry records that name nothing live. A dry run by default: prints what it would "
        "remove and what it keeps; --delete removes it. Objects outside block manager directories "
        "are never removed. See docs/GC.md.",
    )
    gc.add_argument("store_url", metavar="STORE_URL")
    gc.add_argument(
        "--older-than",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="leave alone whatever was written, renewed or released less than DURATION ago "
        "(90s, 30m, 24h, 7d; default: 24h)",
    )
    gc.add_argument("--delete", action="store_true", help="remove what the dry run lists (default: only list it)")
    gc.add_argument("--json", action="store_true", help="one JSON object instead of text")
    add_s3_endpoint_argument(gc)
    gc.set_defaults(run=cmd_gc)

    show = commands.add_parser(
        "show",
        help="decode a map output's index file, and check it against its data and checksum files",
        description="Print the partitions (offset, length) of a map output from its index file "
        "(shuffle_S_M_R.index, on a mount or anywhere), check that its data file holds as "
        "many bytes as the index says, and each partition against Spark's checksum file when "
        "there is one (ADLER32, CRC32; reads the whole data file). Exit status 1 when "
        "something does not match.",
    )
    show.add_argument("index", metavar="FILE.index")
    show.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    show.set_defaults(run=cmd_show)

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

    from shufflefs.bench import add_bench_parser

    add_bench_parser(commands)
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


# ---------------------------------------------------------------------------- ls
def cmd_ls(args) -> int:
    from shufflefs import inventory

    if "://" in args.target:
        found, truncated = _store_shuffles(args)
    else:
        if not os.path.isdir(args.target):
            raise CommandError(
                f"{args.target} {'is not a directory' if os.path.exists(args.target) else 'does not exist'}"
            )
        found, truncated = inventory.shuffles(inventory.walk_directory(args.target), _pending_keys(args.target))
    if args.json:
        now = time.time_ns()
        print(json.dumps({"shuffles": [s.report(now) for s in found], "truncated": truncated}, indent=1))
    else:
        print(inventory.render(found, truncated))
    return 0


def _open_store(url: str, s3_endpoint_url: str | None):
    from shufflefs.stores import StoreError, check_endpoint_url, open_store

    try:
        check_endpoint_url(url, "the store URL")
        if s3_endpoint_url:
            check_endpoint_url(s3_endpoint_url)
        return open_store(url, s3_endpoint_url=s3_endpoint_url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None


def _store_shuffles(args):
    from shufflefs import inventory
    from shufflefs.stores import StoreError

    store = _open_store(args.target, args.s3_endpoint_url)
    try:
        found, truncated = inventory.shuffles(inventory.walk_store(store, inventory.Budget(args.limit)))
        try:
            apps = inventory.registered_apps(store, inventory.Budget(args.limit))
        except inventory.Truncated:
            apps = {}
    except StoreError as exc:
        raise CommandError(f"listing {store.url}: {exc}") from None
    finally:
        store.close()
    for shuffle in found:
        shuffle.app = apps.get(os.path.basename(shuffle.where))
    return found, truncated


def _pending_keys(path: str) -> set[str] | None:
    """On a shufflefs mount, the files below `path` its journal still owes the store (their
    paths relative to `path`); None elsewhere."""
    from shufflefs.journal import CacheDirBusy, open_journal

    mountpoint = shufflefs_mount_of(path)
    if mountpoint is None:
        return None
    try:
        with open(run_file(mountpoint, "json")) as f:
            cache_dir = json.load(f)["cache_dir"]
        with open_journal(cache_dir, exclusive=False) as journal:
            keys = {
                record.get("dst", record["key"])
                for _, record in journal.pending_ops()
                if record["kind"] in ("put", "move")
            }
    except (OSError, ValueError, KeyError, CacheDirBusy):
        return None  # not ours to read: pending counts unknown
    below = os.path.relpath(os.path.realpath(path), mountpoint)
    if below == ".":
        return keys
    return {key[len(below) + 1 :] for key in keys if key.startswith(below + "/")}


# ---------------------------------------------------------------------------- gc
def cmd_gc(args) -> int:
    import tqdm

    from shufflefs import gc
    from shufflefs.stores import StoreError

    store = _open_store(args.store_url, args.s3_endpoint_url)
    try:
        store.check()
        holders = gc.Holders(store, args.older_than)
        planned = gc.plan(store, args.older_than, holders)
        outcome = None
        if args.delete and planned.garbage:
            with tqdm.tqdm(
                total=sum(item.objects for item in planned.garbage),
                unit=" objects",
                desc="deleting",
                disable=not sys.stderr.isatty(),
            ) as bar:
                outcome = gc.delete(store, planned, holders, bar.update)
        elif args.delete:
            outcome = gc.Outcome()
    except StoreError as exc:
        raise CommandError(f"{store.url}: {exc}") from None
    except gc.GcError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    print(json.dumps(gc.report(planned, outcome), indent=1) if args.json else gc.render(planned, outcome))
    return 1 if outcome is not None and outcome.failed else 0


# ---------------------------------------------------------------------------- show
def cmd_show(args) -> int:
    from shufflefs.show import ShowError, inspect, render

    try:
        output = inspect(args.index)
    except ShowError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(output.report(), indent=1) if args.json else render(output))
    return 1 if output.problems else 0


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
