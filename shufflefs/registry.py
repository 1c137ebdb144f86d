"""Which executor a block manager's directory belongs to, and whether it is dead, for every
mount of a store (docs/RECOVERY.md, "Who is who" and after).

Small JSON objects below the store's reserved `.shufflefs/` (never shown in the namespace):
- `.shufflefs/dirs/<app>/<blockmgr name>`: the directory's key, its executor, the node (the
  writer instance of the mount that made it);
- `.shufflefs/nodes/<node>`: the node's lease, renewed every `lease / 3` seconds while it has
  executors;
- `.shufflefs/claims/<app>/<blockmgr name>`: who adopted the directory, written once with a
  conditional write (S3 If-None-Match): of several executors claiming at once, on any nodes,
  exactly one wins.

A directory made on another mount is adoptable once its node told its executor is dead (the
node lives on), or once the node's lease is older than `lease`: the node is lost (its daemon
too). Needs a conditional store; elsewhere nothing is adoptable
across mounts. Blocking functions, run in worker threads by the core (Remote.call).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable

from shufflefs.callers import Executor
from shufflefs.stores import ABSENT, ObjectMissing, PreconditionFailed, Store

log = logging.getLogger(__name__)

#: the store's reserved top-level name
RESERVED = ".shufflefs"
#: how long a node's lease lasts without renewal (--executor-lease)
LEASE = 30.0


class Registry:
    def __init__(self, store: Store, node: str, scratch_dir: str, lease: float = LEASE):
        self.store = store
        self.node = node
        self.scratch_dir = scratch_dir
        self.lease = lease
        self.leased = False  # renewed at least once: this node has executors

    @property
    def works(self) -> bool:
        """Whether claims can be made across mounts (a conditional store)."""
        return self.store.conditional

    # -- writes (worker threads)
    def register(self, key: str, executor: Executor, dead: bool = False) -> None:
        """Record that this node's `executor` made the block manager directory `key` (the
        node's lease first: a directory on a node without one is a lost node's), or that the
        executor died."""
        if not self.leased:
            self.renew_lease()
        self._put(
            _dir_key(executor.app_id, key), {"dir": key, "executor": executor.record(), "node": self.node, "dead": dead}
        )

    def renew_lease(self) -> None:
        self._put(f"{RESERVED}/nodes/{self.node}", {"renewed": time.time(), "lease": self.lease})
        self.leased = True

    def adopt(self, key: str, viewer: Executor) -> bool:
        """Whether `viewer` may take the block manager directory `key`, made on another mount:
        an executor of its application made it, that executor's node told it died or the
        node's lease ran out, and no one else claimed it first. Claims it if so."""
        record = self._get(_dir_key(viewer.app_id, key))
        if record is None or record.get("dir") != key:
            return False  # another application's, or made before the registry
        if record["node"] == self.node:
            return False  # on this node, a directory is judged by its executor's process
        if not record.get("dead") and self._node_alive(record["node"]):
            return False
        if not self.claim(key, viewer):
            return False
        log.info(
            "executor %s of %s adopts %s of %s executor %s of node %s",
            viewer.executor_id,
            viewer.app_id,
            key,
            "dead" if record.get("dead") else "lost",
            record["executor"]["executor"],
            record["node"],
        )
        return True

    def claim(
        self,
        key: str,
        viewer: Executor,
        replaceable: Callable[[Executor, str], bool] = lambda *_: False,
    ) -> bool:
        """Claim the block manager directory `key` for `viewer`, unless another executor has:
        of several claiming at once, on any nodes, exactly one wins. A claim that
        `replaceable(adopter, node)` says is void (its adopter died) is taken over."""
        claim_key = f"{RESERVED}/claims/{viewer.app_id}/{os.path.basename(key)}"
        mine = {"adopter": viewer.record(), "node": self.node}
        try:
            self._put(claim_key, mine, expect=ABSENT)
            return True
        except PreconditionFailed:
            pass
        info = self.store.head(claim_key)
        current = self._get(claim_key)
        if current == mine:
            return True
        if (
            info is None
            or current is None
            or not replaceable(Executor.from_record(current["adopter"]), current["node"])
        ):
            return False
        try:
            self._put(claim_key, mine, expect=info.version)
            return True
        except PreconditionFailed:
            return self._get(claim_key) == mine

    # -- reads
    def _node_alive(self, node: str) -> bool:
        lease = self._get(f"{RESERVED}/nodes/{node}")
        return lease is not None and time.time() - lease["renewed"] < lease.get("lease", self.lease)

    def _get(self, key: str) -> dict | None:
        info = self.store.head(key)
        if info is None:
            return None
        try:
            return json.loads(self.store.get_range(key, 0, info.size))
        except ObjectMissing:
            return None
        except ValueError:
            log.warning("%s in the store is not a registry record; ignored", key)
            return None

    def _put(self, key: str, record: dict, expect: str | None = None) -> None:
        with tempfile.NamedTemporaryFile("w", dir=self.scratch_dir, prefix="registry-") as f:
            json.dump(record, f)
            f.flush()
            self.store.put_file(key, f.name, expect=expect)


def _dir_key(app_id: str, key: str) -> str:
    return f"{RESERVED}/dirs/{app_id}/{os.path.basename(key)}"
