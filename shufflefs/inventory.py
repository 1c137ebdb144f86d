"""`shufflefs ls TARGET`: what a mount (or any directory) or a store holds, as Spark's shuffles:
per block manager directory (`blockmgr-*`, one per executor and local dir) and shuffle, its map
outputs (index files), files, bytes and age; on a mount, how many of its files still wait for
the store (the mount's journal); in a store, the application of a block manager where the
registry of Spark's recovery plugin knows it (`.shufflefs/dirs/`, shufflefs.registry). Store
listings go page by page through the store's own listing and stop after `limit` objects."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from shufflefs.naming import DURABLE_PATTERN, is_block_manager_dir
from shufflefs.options import CommandError, add_s3_endpoint_argument, positive_int
from shufflefs.places import run_file, shufflefs_mount_of
from shufflefs.registry import RESERVED
from shufflefs.stores import Store, StoreError, open_user_store

#: levels below the target searched for block manager directories (Spark: <local dir>/spark-*/
#: executor-*/blockmgr-*, or <local dir>/blockmgr-*)
SEARCH_DEPTH = 4


@dataclass
class Shuffle:
    where: str  # the block manager directory, relative to the target
    shuffle: int
    map_outputs: int = 0
    files: int = 0
    bytes: int = 0
    newest_ns: int = 0
    pending: int | None = None  # files not yet in the store (on a mount), None: unknown
    app: str | None = None

    def report(self, now_ns: int) -> dict:
        return {
            "block_manager": self.where,
            "app": self.app,
            "shuffle": self.shuffle,
            "map_outputs": self.map_outputs,
            "files": self.files,
            "bytes": self.bytes,
            "pending_files": self.pending,
            "age_seconds": round(max(0, now_ns - self.newest_ns) / 1e9, 1),
        }


class Truncated(Exception):
    """More objects than the limit: what was counted so far is shown, and says so."""


class Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise Truncated


# (relative directory, subdirectory names, files as (name, size, mtime_ns))
Walk = Iterator[tuple[str, list[str], list[tuple[str, int, int]]]]


def walk_directory(root: str, relative: str = "", depth: int = 0) -> Walk:
    path = os.path.join(root, relative)
    dirs, files = [], []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        files.append((entry.name, st.st_size, st.st_mtime_ns))
                except OSError:
                    continue  # gone while listed
    except OSError:
        return
    yield relative, sorted(dirs), files
    descend = is_block_manager_dir(os.path.basename(relative)) or depth < SEARCH_DEPTH
    if descend:
        for name in sorted(dirs):
            yield from walk_directory(root, os.path.join(relative, name), depth + 1)


def walk_store(store: Store, budget: Budget, relative: str = "", depth: int = 0) -> Walk:
    listing = store.list_dir(relative)
    budget.spend(len(listing.files) + len(listing.dirs))
    dirs = sorted(name for name in listing.dirs if relative or name != RESERVED)
    yield relative, dirs, [(obj.name, obj.size, obj.mtime_ns) for obj in listing.files]
    if is_block_manager_dir(os.path.basename(relative)) or depth < SEARCH_DEPTH:
        for name in dirs:
            yield from walk_store(store, budget, f"{relative}/{name}" if relative else name, depth + 1)


def shuffles(walk: Walk, pending_keys: set[str] | None = None) -> tuple[list[Shuffle], bool]:
    """The shuffles of every block manager directory the walk reaches (files in it and in its
    subdirectories, Spark's hash directories), and whether the walk stopped at its limit."""
    found: dict[tuple[str, int], Shuffle] = {}
    try:
        _count(walk, found, pending_keys)
        truncated = False
    except Truncated:
        truncated = True
    return sorted(found.values(), key=lambda s: (s.where, s.shuffle)), truncated


def _count(walk: Walk, found: dict[tuple[str, int], Shuffle], pending_keys: set[str] | None) -> None:
    for relative, _dirs, files in walk:
        parts = relative.split("/") if relative else []
        holder = next((i for i, part in enumerate(parts) if is_block_manager_dir(part)), None)
        if holder is None:
            continue
        where = "/".join(parts[: holder + 1])
        for name, size, mtime_ns in files:
            if DURABLE_PATTERN.fullmatch(name) is None:
                continue
            shuffle_id = int(name.split("_")[1])
            entry = found.setdefault(
                (where, shuffle_id), Shuffle(where, shuffle_id, pending=0 if pending_keys is not None else None)
            )
            entry.files += 1
            entry.bytes += size
            entry.map_outputs += name.endswith(".index")
            entry.newest_ns = max(entry.newest_ns, mtime_ns)
            if entry.pending is not None and pending_keys is not None and f"{relative}/{name}" in pending_keys:
                entry.pending += 1


def registered_apps(store: Store, budget: Budget) -> dict[str, str]:
    """{block manager directory name: application} from the recovery registry in the store."""
    apps: dict[str, str] = {}
    top = store.list_dir(f"{RESERVED}/dirs")
    budget.spend(len(top.dirs))
    for app in top.dirs:
        listing = store.list_dir(f"{RESERVED}/dirs/{app}")
        budget.spend(len(listing.files))
        apps.update((obj.name, app) for obj in listing.files)
    return apps


def render(found: list[Shuffle], truncated: bool, now_ns: int | None = None) -> str:
    now_ns = now_ns or time.time_ns()
    header = ("BLOCK MANAGER", "APP", "SHUFFLE", "MAP OUTPUTS", "FILES", "BYTES", "PENDING", "AGE")
    rows = [header] + [
        (
            s.where,
            s.app or "-",
            str(s.shuffle),
            str(s.map_outputs),
            str(s.files),
            human_bytes(s.bytes),
            "-" if s.pending is None else str(s.pending),
            human_age((now_ns - s.newest_ns) / 1e9),
        )
        for s in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    total = sum(s.bytes for s in found)
    lines.append(
        f"{len(found)} shuffles in {len({s.where for s in found})} block manager directories, "
        f"{sum(s.map_outputs for s in found)} map outputs, {human_bytes(total)}"
        + (" (listing stopped at --limit: there is more)" if truncated else "")
    )
    return "\n".join(lines)


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


# ---------------------------------------------------------------------------- the command
def add_command(commands) -> None:
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
    listing.set_defaults(run=run)


def run(args) -> int:
    if "://" in args.target:
        found, truncated = _store_shuffles(args)
    else:
        if not os.path.isdir(args.target):
            raise CommandError(
                f"{args.target} {'is not a directory' if os.path.exists(args.target) else 'does not exist'}"
            )
        found, truncated = shuffles(walk_directory(args.target), _pending_keys(args.target))
    if args.json:
        now = time.time_ns()
        print(json.dumps({"shuffles": [s.report(now) for s in found], "truncated": truncated}, indent=1))
    else:
        print(render(found, truncated))
    return 0


def _store_shuffles(args):
    try:
        store = open_user_store(args.target, args.s3_endpoint_url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        found, truncated = shuffles(walk_store(store, Budget(args.limit)))
        try:
            apps = registered_apps(store, Budget(args.limit))
        except Truncated:
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
