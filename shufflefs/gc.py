"""`shufflefs gc STORE_URL`: what a store keeps that no live mount holds and nothing will read,
and its removal (docs/GC.md).

The unit is a Spark block manager directory (`blockmgr-<uuid>`, one executor's, wherever it
lies): garbage when no live mount's heartbeat holds it (shufflefs.heartbeat) and nothing below
it is younger than `older_than`. Besides: writes begun and never finished (S3 multipart
uploads, the file store's temporary files) older than that, and the records of the store's
registry (`.shufflefs/`) that name nothing live any more. Objects outside block manager
directories are counted, never removed. Blocking calls on the store; a dry run reads only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shufflefs.heartbeat import EVERY, MOUNTS
from shufflefs.inventory import Budget, human_age, human_bytes, walk_store
from shufflefs.naming import is_block_manager_dir
from shufflefs.options import CommandError, add_s3_endpoint_argument, parse_duration
from shufflefs.registry import RESERVED
from shufflefs.stores import ObjectInfo, ObjectMissing, Store, StoreError, Unfinished, open_user_store

DIRECTORY = "block manager directory"
UNFINISHED = "unfinished write"
RECORD = "registry record"
KINDS = (DIRECTORY, UNFINISHED, RECORD)
#: a listing budget no store reaches: gc must see everything before it decides
UNLIMITED = 2**63
#: keys per delete request (S3's limit)
DELETE_BATCH = 1000
#: how old the heartbeats read may get, while deleting, before they are read again
HEARTBEATS_FRESH = 30.0
#: registry records named after a block manager directory, below RESERVED
NAMED_RECORDS = ("dirs", "claims")


class GcError(Exception):
    """A reason not to go on, in one line."""


@dataclass
class Item:
    kind: str
    key: str
    objects: int = 0
    bytes: int = 0
    newest_ns: int = 0
    reason: str = ""
    unfinished: Unfinished | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.key)

    def report(self, now_ns: int) -> dict:
        return {
            "kind": self.kind,
            "key": self.key,
            "objects": self.objects,
            "bytes": self.bytes,
            "age_seconds": round(max(0, now_ns - self.newest_ns) / 1e9, 1),
            "reason": self.reason,
        }


@dataclass
class Plan:
    now_ns: int
    older_than: float
    garbage: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)  # block manager directories, with why
    outside_objects: int = 0
    outside_bytes: int = 0
    live_mounts: int = 0

    @property
    def cutoff_ns(self) -> int:
        return self.now_ns - int(self.older_than * 1e9)


class Holders:
    """Which block manager directories live mounts hold: {directory name: heartbeat}."""

    def __init__(self, store: Store, older_than: float):
        self.store = store
        self.older_than = older_than
        self.read_at = -math.inf
        self.held: dict[str, str] = {}
        self.stale: list[ObjectInfo] = []
        self.live = 0

    def read(self) -> None:
        now = time.time()
        held, stale, live = {}, [], 0
        for obj in self.store.list_dir(MOUNTS).files:
            record = _read_json(self.store, f"{MOUNTS}/{obj.name}", obj.size)
            if record is None:
                continue  # withdrawn while listed
            try:
                renewed, every, holds = float(record["renewed"]), float(record.get("every", EVERY)), record["holds"]
                # a mount renews every `every` s: never judge one by less than three periods
                if now - renewed >= max(self.older_than, 3 * every):
                    stale.append(obj)
                    continue
                live += 1
                for key, released in holds.items():
                    if released is None or now - float(released) < self.older_than:
                        held[os.path.basename(key)] = obj.name
            except (KeyError, TypeError, ValueError, AttributeError):
                raise GcError(
                    f"{MOUNTS}/{obj.name} in {self.store.url} is not a shufflefs heartbeat; "
                    "nothing is collected while it is there (remove it if no shufflefs wrote it)"
                ) from None
        self.held, self.stale, self.live, self.read_at = held, stale, live, time.monotonic()

    def holder(self, name: str) -> str | None:
        if time.monotonic() - self.read_at > HEARTBEATS_FRESH:
            self.read()
        return self.held.get(name)


def plan(store: Store, older_than: float, holders: Holders) -> Plan:
    """What a run would remove, and what it keeps, with reasons."""
    holders.read()
    result = Plan(time.time_ns(), older_than, live_mounts=holders.live)
    directories = _directories(store, result)
    for directory in sorted(directories.values(), key=lambda d: d.key):
        if directory.objects == 0:
            continue  # nothing below it to remove (SeaweedFS lists directories emptied by deletes)
        holder = holders.held.get(directory.name)
        if holder is not None:
            directory.reason = f"held by the live mount {holder}"
        elif directory.newest_ns > result.cutoff_ns:
            directory.reason = "written to within --older-than"
        else:
            directory.reason = "no live mount holds it, nothing written within --older-than"
            result.garbage.append(directory)
            continue
        result.kept.append(directory)
    for write in sorted(store.unfinished_writes(), key=lambda w: w.key):
        if write.started_ns <= result.cutoff_ns:
            result.garbage.append(
                Item(
                    UNFINISHED,
                    write.key,
                    1,
                    write.size,
                    write.started_ns,
                    "begun before --older-than and never finished",
                    write,
                )
            )
    collected = {d.name for d in result.garbage if d.kind == DIRECTORY}
    kept = {d.name for d in result.kept}
    for key, obj in _records(store):
        if obj.mtime_ns > result.cutoff_ns:
            continue
        parts = key.split("/")
        if parts[1] == "mounts":
            if obj.name not in {stale.name for stale in holders.stale}:
                continue
            reason = "heartbeat of a mount not renewed within --older-than"
        elif parts[1] == "nodes":
            reason = "executor lease not renewed within --older-than"
        elif parts[1] in NAMED_RECORDS and obj.name not in kept and obj.name not in holders.held:
            reason = (
                "its block manager directory is collected"
                if obj.name in collected
                else "its block manager directory is gone"
            )
        else:
            continue
        result.garbage.append(Item(RECORD, key, 1, obj.size, obj.mtime_ns, reason))
    return result


def _directories(store: Store, result: Plan) -> dict[str, Item]:
    found: dict[str, Item] = {}
    for relative, _dirs, files in walk_store(store, Budget(UNLIMITED)):
        parts = relative.split("/") if relative else []
        holder = next((i for i, part in enumerate(parts) if is_block_manager_dir(part)), None)
        if holder is None:
            result.outside_objects += len(files)
            result.outside_bytes += sum(size for _name, size, _mtime in files)
            continue
        where = "/".join(parts[: holder + 1])
        item = found.setdefault(where, Item(DIRECTORY, where))
        item.objects += len(files)
        item.bytes += sum(size for _name, size, _mtime in files)
        item.newest_ns = max([item.newest_ns, *(mtime for _name, _size, mtime in files)])
    return found


def _records(store: Store) -> Iterator[tuple[str, ObjectInfo]]:
    """Every object of the registry: `.shufflefs/<kind>/[<app>/]<name>`."""
    for kind in store.list_dir(RESERVED).dirs:
        top = f"{RESERVED}/{kind}"
        listing = store.list_dir(top)
        for obj in listing.files:
            yield f"{top}/{obj.name}", obj
        for app in listing.dirs:
            for obj in store.list_dir(f"{top}/{app}").files:
                yield f"{top}/{app}/{obj.name}", obj


def objects_below(store: Store, prefix: str) -> Iterator[tuple[str, ObjectInfo]]:
    listing = store.list_dir(prefix)
    for obj in listing.files:
        yield f"{prefix}/{obj.name}", obj
    for name in listing.dirs:
        yield from objects_below(store, f"{prefix}/{name}")


@dataclass
class Outcome:
    removed: list[Item] = field(default_factory=list)
    spared: list[Item] = field(default_factory=list)  # found held or written to just before deleting
    failed: list[tuple[Item, str]] = field(default_factory=list)


def delete(store: Store, planned: Plan, holders: Holders, progress: Callable[[int], None]) -> Outcome:
    """Remove the plan's garbage: each block manager directory after checking again, just
    before, that no live mount holds it and nothing below it is young; then the unfinished
    writes; then the registry records (never one whose directory was spared)."""
    outcome = Outcome()
    spared: set[str] = set()
    for item in planned.garbage:
        try:
            if item.kind == DIRECTORY:
                if not _delete_directory(store, item, planned.cutoff_ns, holders, progress):
                    spared.add(item.name)
                    outcome.spared.append(item)
                    continue
            elif item.unfinished is not None:
                store.abort_unfinished(item.unfinished)
                progress(1)
            else:
                if item.name in spared:
                    outcome.spared.append(item)
                    continue
                _delete_keys(store, [item.key])
                progress(1)
        except StoreError as exc:
            outcome.failed.append((item, str(exc)))
            spared.add(item.name)
            continue
        outcome.removed.append(item)
    return outcome


def _delete_directory(
    store: Store, item: Item, cutoff_ns: int, holders: Holders, progress: Callable[[int], None]
) -> bool:
    if holders.holder(item.name) is not None:
        return False
    below = list(objects_below(store, item.key))
    if any(obj.mtime_ns > cutoff_ns for _key, obj in below):
        return False
    keys = [key for key, _obj in below]
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start : start + DELETE_BATCH]
        _delete_keys(store, batch)
        progress(len(batch))
    return True


def _delete_keys(store: Store, keys: list[str]) -> None:
    failed = store.delete_many(keys)
    if failed:
        key, error = next(iter(failed.items()))
        raise StoreError(f"{len(failed)} objects not deleted, e.g. {key}: {error}")


def _read_json(store: Store, key: str, size: int) -> dict | None:
    try:
        return json.loads(store.get_range(key, 0, max(size, 1)))
    except ObjectMissing:
        return None
    except ValueError:
        raise GcError(
            f"{key} in {store.url} is not a shufflefs record; nothing is collected while it is there "
            "(remove it if no shufflefs wrote it)"
        ) from None


#: garbage items a table shows one by one (--json lists all)
SHOWN = 50


def render(planned: Plan, outcome: Outcome | None = None) -> str:
    now_ns = planned.now_ns
    lines = [
        f"Dry run: nothing deleted; `--delete` removes what follows (older than {human_age(planned.older_than)})."
        if outcome is None
        else f"Deleted (older than {human_age(planned.older_than)}):"
    ]
    removed = planned.garbage if outcome is None else outcome.removed
    for item in removed[:SHOWN]:
        lines.append(
            f"  {item.kind:<23}  {item.key}  {_count(item.objects, 'object')}, {human_bytes(item.bytes)}, "
            f"{human_age((now_ns - item.newest_ns) / 1e9)} old: {item.reason}"
        )
    if len(removed) > SHOWN:
        lines.append(f"  ... and {len(removed) - SHOWN} more (--json lists every one)")
    for kind in KINDS:
        items = [item for item in removed if item.kind == kind]
        if items:
            oldest = min(item.newest_ns for item in items)
            lines.append(
                f"{_count(len(items), kind)}: {_count(sum(item.objects for item in items), 'object')}, "
                f"{human_bytes(sum(item.bytes for item in items))}, oldest "
                f"{human_age((now_ns - oldest) / 1e9)}"
            )
    if not removed:
        lines.append("Nothing to collect.")
    if outcome is not None:
        for item in outcome.spared:
            lines.append(f"spared {item.key}: held or written to again just before its deletion")
        for item, error in outcome.failed:
            lines.append(f"failed {item.key}: {error}")
    held = sum(item.reason.startswith("held") for item in planned.kept)
    lines.append(
        f"Kept: {_count(len(planned.kept), DIRECTORY)} ({held} held by "
        f"{_count(planned.live_mounts, 'live mount')}, {len(planned.kept) - held} written to within "
        f"--older-than); {_count(planned.outside_objects, 'object')} outside block manager directories "
        f"({human_bytes(planned.outside_bytes)}), never collected."
    )
    return "\n".join(lines)


def _count(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def report(planned: Plan, outcome: Outcome | None = None) -> dict:
    now_ns = planned.now_ns
    result = {
        "older_than_seconds": planned.older_than,
        "deleted": outcome is not None,
        "garbage": [item.report(now_ns) for item in planned.garbage],
        "kept": [item.report(now_ns) for item in planned.kept],
        "outside": {"objects": planned.outside_objects, "bytes": planned.outside_bytes},
        "live_mounts": planned.live_mounts,
    }
    if outcome is not None:
        result["removed"] = [item.key for item in outcome.removed]
        result["spared"] = [item.key for item in outcome.spared]
        result["failed"] = [{"key": item.key, "error": error} for item, error in outcome.failed]
    return result


# ---------------------------------------------------------------------------- the command
def add_command(commands) -> None:
    parser = commands.add_parser(
        "gc",
        help="remove from a store what crashed or finished applications left and no live mount holds",
        description="Find, in STORE_URL, the Spark block manager directories no live mount holds (each mount "
        "renews a heartbeat in the store naming those it holds) with nothing written below them "
        "for DURATION, writes begun and never finished (S3 multipart uploads) that long ago, and "
        "the registry records that name nothing live. A dry run by default: prints what it would "
        "remove and what it keeps; --delete removes it. Objects outside block manager directories "
        "are never removed. See docs/GC.md.",
    )
    parser.add_argument("store_url", metavar="STORE_URL")
    parser.add_argument(
        "--older-than",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="leave alone whatever was written, renewed or released less than DURATION ago "
        "(90s, 30m, 24h, 7d; default: 24h)",
    )
    parser.add_argument("--delete", action="store_true", help="remove what the dry run lists (default: only list it)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    add_s3_endpoint_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    import tqdm

    try:
        store = open_user_store(args.store_url, args.s3_endpoint_url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        store.check()
        holders = Holders(store, args.older_than)
        planned = plan(store, args.older_than, holders)
        outcome = None
        if args.delete and planned.garbage:
            with tqdm.tqdm(
                total=sum(item.objects for item in planned.garbage),
                unit=" objects",
                desc="deleting",
                disable=not sys.stderr.isatty(),
            ) as bar:
                outcome = delete(store, planned, holders, bar.update)
        elif args.delete:
            outcome = Outcome()
    except StoreError as exc:
        raise CommandError(f"{store.url}: {exc}") from None
    except GcError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    print(json.dumps(report(planned, outcome), indent=1) if args.json else render(planned, outcome))
    return 1 if outcome is not None and outcome.failed else 0
