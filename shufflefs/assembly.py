"""The kernel-free part of a mount, put together in one place for the daemon, the tests and the
benchmarks: the store's operations (Remote), the filesystem core (Filesystem) and what Spark's
executors see (Views); and every tunable of them, with its default (Tunables)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shufflefs.core import OWNED_TTL, READAHEAD, TOMBSTONE_TTL, Filesystem
from shufflefs.journal import Journal
from shufflefs.registry import LEASE
from shufflefs.remote import BACKOFF_FIRST, BACKOFF_MAX, LATE_WINDOW, REQUEST_TIMEOUT, Remote
from shufflefs.staging import StagingArea
from shufflefs.stores import Store
from shufflefs.views import Views


@dataclass
class Tunables:
    #: "sync": a commit returns once stored; "async": at once, uploads drain at unmount
    commit: str = "sync"
    #: local bytes at most (staging files and cached copies)
    cache_size: int = 1024**3
    #: store requests in flight
    upload_workers: int = 8
    #: attempts at a store request before a waiting sync commit is told EIO
    max_attempts: int = 6
    #: seconds a listing of what other mounts put in the store stays fresh
    listing_ttl: float = 1.0
    #: seconds a store request may still land after its sender gave up on it
    late_window: float = LATE_WINDOW
    #: seconds a file operation waits for the store
    store_timeout: float = REQUEST_TIMEOUT
    #: seconds without renewal after which a node's executors count as lost (docs/RECOVERY.md)
    executor_lease: float = LEASE
    #: the wait before the first retry of a failed store request, doubling up to backoff_max
    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    #: (uid, gid) of the root and of what is learned from the store; None: the daemon's
    owner: tuple[int, int] | None = None
    #: bytes at least that a read of what only the store has fetches at once
    readahead: int = READAHEAD
    #: seconds the kernel may keep entries and attributes of directories this mount owns
    owned_ttl: float = OWNED_TTL
    #: seconds a name removed from a directory this mount does not own stays hidden from
    #: store listings (deletes are asynchronous; SeaweedFS lists emptied prefixes a while)
    tombstone_ttl: float = TOMBSTONE_TTL
    #: seconds a drain waits for open shuffle files to be closed (and committed) first
    release_wait: float = 5.0


def assemble(
    store: Store,
    journal: Journal,
    staging: StagingArea,
    tunables: Tunables,
    views: Callable[[Remote], Views] | None = None,
) -> Filesystem:
    """The core over `store`, with its journal and staging area (a cache dir's), its Remote
    (`fs.remote`, started by the caller: `fs.remote.start(nursery)`) and, from `views`, what
    executors see (`fs.views`; None: every caller sees everything)."""
    remote = Remote(
        store,
        journal,
        workers=tunables.upload_workers,
        max_attempts=tunables.max_attempts,
        late_window=tunables.late_window,
        request_timeout=tunables.store_timeout,
        backoff_first=tunables.backoff_first,
        backoff_max=tunables.backoff_max,
    )
    return Filesystem(
        store,
        remote,
        journal,
        staging,
        commit_mode=tunables.commit,
        cache_size=tunables.cache_size,
        remote_ttl=tunables.listing_ttl,
        owner=tunables.owner,
        views=views(remote) if views is not None else None,
        readahead=tunables.readahead,
        owned_ttl=tunables.owned_ttl,
        tombstone_ttl=tunables.tombstone_ttl,
    )
