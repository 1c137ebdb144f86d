"""Command-line values and the parser every command's options go through: sizes, durations,
counts, seconds, owners, addresses, the choices of modes; errors in one line; the flags of
`shufflefs mount`, which the mount(8) helper's `-o` options are checked against too.
Standard library only.
"""

from __future__ import annotations

import argparse
import fractions
import os
import re
from collections.abc import Callable

_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
#: above this a byte count overflows the signed 64 bits of off_t, and what statfs reports of the
#: cache (64-bit block counts) would be wrong in whatever multiplies them out (statfs answered
#: EIO for a bigger one)
MAX_SIZE = 2**63 - 1
#: store requests in flight: each is a thread; more than this is a mistake, not a tuning
MAX_WORKERS = 1024
#: longest --store-timeout and --late-window: a day (a store request does not linger longer)
MAX_SECONDS = 86400.0
#: the kernel's "no id" ((uid_t) -1): no file can be owned by it
NO_ID = 2**32 - 1


def parse_size(text: str) -> int:
    """'512M', '10G', '1.5GiB', '4096' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512M, 10G, 1.5GiB)")
    # exact: a float would round big numbers and turn very big ones into inf
    size = int(fractions.Fraction(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    if size > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too big (at most 2**63-1 bytes, 8 EiB)")
    return size


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (a number and a unit: 90s, 30m, 24h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def worker_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORKERS}, got {value}")
    return value


COMMIT_MODES = ("sync", "async")
#: our own FUSE session (the default) and the portable pyfuse3 one
FUSE_SESSIONS = ("own", "pyfuse3")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _seconds(text: str, valid: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not valid(value):  # comparisons with nan are false: refused too
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds {rule}")
    return value


def positive_seconds(text: str) -> float:
    return _seconds(text, lambda v: 0 < v <= MAX_SECONDS, f"above 0 and at most {MAX_SECONDS:g} (a day)")


def wait_seconds(text: str) -> float:
    """umount's --timeout: 0 or more seconds (0: no limit)."""
    return _seconds(text, lambda v: 0 <= v < float("inf"), "0 or more, finite")


def parse_id(text: str) -> int:
    """A uid or gid: a number below 4294967295, the kernel's "no id"."""
    if not text.isdigit():  # int() would take '+1', ' 1', '1_0' and '-1'
        raise argparse.ArgumentTypeError("use a number")
    value = int(text)
    if value >= NO_ID:
        raise argparse.ArgumentTypeError(f'ids are at most {NO_ID - 1} ({NO_ID} is the kernel\'s "no id")')
    return value


def parse_owner(text: str) -> tuple[int, int]:
    """'185' or '185:185' -> (uid, gid); the gid defaults to the uid."""
    uid, _, gid = text.partition(":")
    try:
        return parse_id(uid), parse_id(gid or uid)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"invalid owner {text!r} (UID or UID:GID): {exc}") from None


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """'9464', ':9464', 'HOST:9464' or '[::1]:9464' -> (host, port); no host: every address."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid metrics address {text!r} ([HOST]:PORT, PORT from 1 to 65535)")
    return host, int(port)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (a malformed or out-of-range option) in one line, like every other error,
    with argparse's status 2; not the usage text, which hides the line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandError(Exception):
    """A command failed for a reason the user can act on: one line, exit status 1."""


EXIT_FAILURE = 1

S3_ENDPOINT_HELP = "S3 endpoint, without user:password@ (default: $AWS_ENDPOINT_URL, else AWS)"


def add_s3_endpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help=S3_ENDPOINT_HELP)


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `shufflefs mount` (and of the mount(8) helper's -o options)."""
    parser.add_argument("store_url", metavar="STORE_URL")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument(
        "--cache-dir",
        help="staging files, cache and LMDB (default: "
        "/var/lib/shufflefs/<mountpoint> as root, else $XDG_STATE_HOME/shufflefs/<mountpoint>)",
    )
    parser.add_argument(
        "--cache-size",
        type=parse_size,
        help="bound on local bytes (staging + cache), e.g. 20G (default: 80%% of the free space where --cache-dir is)",
    )
    parser.add_argument(
        "--commit",
        choices=COMMIT_MODES,
        default="sync",
        help="sync: the rename/close that commits a shuffle file returns once it is "
        "stored; async: returns at once, uploads continue and are drained at "
        "unmount (default: %(default)s)",
    )
    add_s3_endpoint_argument(parser)
    parser.add_argument(
        "--upload-workers",
        type=worker_count,
        default=8,
        help=f"store requests in flight at once, at most {MAX_WORKERS} (default: %(default)s)",
    )
    parser.add_argument(
        "--owner",
        type=parse_owner,
        metavar="UID[:GID]",
        help="owner of the mount's root and of what is learned from the store, e.g. 185:185 "
        "for the user of Spark's container images (default: the daemon's user)",
    )
    parser.add_argument(
        "--leave-mount",
        action="store_true",
        help="on SIGTERM/SIGINT, drain and exit but leave the mount, dead, for the next "
        "`shufflefs mount` here to mount over: containers that bound the mountpoint "
        "keep working across a restart (the Kubernetes DaemonSet uses it); "
        "`shufflefs umount` still removes it",
    )
    parser.add_argument(
        "--late-window",
        type=positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="how long after a store request failed (timed out, or its daemon died) the "
        "store may still apply it; a put that may land after its file was deleted is "
        "looked for and removed this long after the delete (default: %(default)g)",
    )
    parser.add_argument(
        "--executor-lease",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long after this node's daemon last renewed its lease in the store its Spark "
        "executors count as lost, and their map outputs may be adopted by executors on "
        "other nodes (Spark's recovery plugin; docs/RECOVERY.md) (default: %(default)g)",
    )
    parser.add_argument(
        "--heartbeat",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how often this mount renews its record in the store of the Spark block manager "
        "directories it holds; `shufflefs gc` never removes what a mount renewed lately "
        "(docs/GC.md) (default: %(default)g)",
    )
    parser.add_argument(
        "--store-timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="longest a file operation waits for the store: a read or listing of what only "
        "the store has, and a sync commit's upload, then fail with EIO (the upload goes "
        "on in the background) (default: %(default)g)",
    )
    parser.add_argument(
        "--metrics-addr",
        type=parse_metrics_addr,
        metavar="[HOST]:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST: default all addresses; default: not served)",
    )
    parser.add_argument(
        "--fuse",
        choices=FUSE_SESSIONS,
        default="own",
        help="the FUSE session: 'own' speaks the kernel protocol itself (fast); 'pyfuse3' is "
        "the portable one through libfuse (default: %(default)s)",
    )
    parser.add_argument(
        "--no-passthrough",
        dest="passthrough",
        action="store_false",
        help="with --fuse own: serve every read and write in the daemon, even where the kernel "
        "could pass them through to local files (FUSE passthrough, Linux 6.9+, as root)",
    )
    parser.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, log to stderr")
    parser.add_argument("--log-file", help="log file of the background daemon (default: <cache-dir>/shufflefs.log)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
