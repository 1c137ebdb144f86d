"""What a mount holds, told to the store so that `shufflefs gc` leaves it alone (docs/GC.md,
"How a mount marks what it holds").

A mount's heartbeat is one small JSON object, `.shufflefs/mounts/<instance>` (the cache dir's
instance id, kept across runs):
`{"renewed": wall-clock time, "every": seconds, "holds": {key: null | released}}`, where each
key is a block manager directory (`blockmgr-<uuid>`) made on this mount that still exists here,
and `released` is when its executor (and the executor that adopted it, if any) was first seen
dead: null while one lives, or when no executor made it (a directory made by a person, a
Worker, or an executor invisible from this daemon's pid namespace is held while it exists).

It is renewed every `every` seconds while the mount holds anything, deleted when it holds
nothing more, and at a clean unmount (whose journal forgets the directories). A mount that
never holds a block manager directory never writes one: no request.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable

import trio

from shufflefs.callers import Executor
from shufflefs.naming import is_block_manager_dir
from shufflefs.registry import RESERVED
from shufflefs.stores import Store, StoreError

log = logging.getLogger(__name__)

#: where the heartbeats are, below the store's prefix
MOUNTS = f"{RESERVED}/mounts"
#: seconds between renewals (--heartbeat)
EVERY = 60.0

#: block manager directory key -> None (in use) or when it was first seen released (wall clock)
Holds = dict[str, "float | None"]


def held(
    dirs: Iterable[tuple[str, dict]], alive: Callable[[Executor], bool], released: dict[str, float], now: float
) -> Holds:
    """What the directories recorded in a mount's journal hold. `released` remembers when each
    was first seen released (updated: kept for the directories still held, others dropped)."""
    holds: Holds = {}
    for key, record in dirs:
        if not is_block_manager_dir(os.path.basename(key)):
            continue
        users = [Executor.from_record(record[role]) for role in ("executor", "adopter") if role in record]
        if not users or any(alive(user) for user in users):
            holds[key] = None
        else:
            holds[key] = released.setdefault(key, now)
    for key in list(released):
        if holds.get(key) is None:
            del released[key]
    return holds


class Heartbeat:
    """Blocking writes of one mount's heartbeat (worker threads, Remote.call)."""

    def __init__(self, store: Store, instance: str, scratch_dir: str, every: float = EVERY):
        self.store = store
        self.key = f"{MOUNTS}/{instance}"
        self.scratch_dir = scratch_dir
        self.every = every
        self.written = False  # a heartbeat of this run may be in the store

    def renew(self, holds: Holds) -> None:
        with tempfile.NamedTemporaryFile("w", dir=self.scratch_dir, prefix="heartbeat-") as f:
            json.dump({"renewed": time.time(), "every": self.every, "holds": holds}, f)
            f.flush()
            self.written = True  # before the put: a failed attempt may still land
            self.store.put_file(self.key, f.name)

    def withdraw(self) -> None:
        failed = self.store.delete_many([self.key])
        if failed:
            raise failed[self.key]
        self.written = False


async def keep(
    heartbeat: Heartbeat,
    dirs: Callable[[], list[tuple[str, dict]]],
    alive: Callable[[Executor], bool],
    call: Callable[..., Awaitable],
) -> None:
    """Renew the heartbeat every `heartbeat.every` seconds while the mount holds anything
    (`dirs`: the journal's directory records, read on this, the loop thread)."""
    released: dict[str, float] = {}
    told: Holds = {}
    while True:
        holds = held(dirs(), alive, released, time.time())
        if holds or told:
            try:
                if holds:
                    await call(heartbeat.renew, holds, what=f"renewing {heartbeat.key}")
                else:
                    await call(heartbeat.withdraw, what=f"deleting {heartbeat.key}")
                told = holds
            except StoreError as exc:
                log.warning(
                    "could not renew this mount's heartbeat (%s): `shufflefs gc` leaves its map outputs "
                    "alone only for --older-than after the last renewal",
                    exc,
                )
        await trio.sleep(heartbeat.every)
