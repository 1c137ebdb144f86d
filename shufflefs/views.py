"""What a Spark executor sees when it lists the shared local dir (docs/RECOVERY.md, "Views").

Spark's recovery plugin (KubernetesLocalDiskShuffleDataIO) lists every `blockmgr-*` directory
below the parent of its local dirs and takes the map outputs it finds there. On a mount that
several executors share, that would take live executors' files, and other applications'. So a
listing made by an executor shows, of the `blockmgr-*` directories, only its own and those of
dead executors of its application that it adopts: the first executor of that application to
list a dead one's directory adopts it, and no other executor sees it while the adopter lives.
Inside a directory of another executor, the checksum files are left out: the plugin would read
each data file whole to check it, bytes the store already keeps safe.

Kernel-free: the core asks; liveness and identity come from Callers (/proc).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from shufflefs.callers import Callers, Executor
from shufflefs.naming import is_block_manager_dir, is_checksum, is_durable
from shufflefs.registry import Registry
from shufflefs.stores import StoreError

log = logging.getLogger(__name__)


class Dir(Protocol):
    name: str
    linked: bool
    registered: bool
    parent: Dir | None
    children: dict | None
    subdirs: int
    created_here: bool
    executor: Executor | None
    adopter: Executor | None


#: executors remembered as not having listed yet, above which the dead ones are forgotten
UNTOLD_PRUNE_AT = 1024
#: runs a blocking store call in a worker thread (Remote.call)
Caller = Callable[..., Awaitable]


class Views:
    def __init__(self, callers: Callers, registry: Registry | None = None, call: Caller | None = None):
        """Without a registry (or on a store without conditional writes), a directory made
        on another mount is never shown to an executor."""
        self.callers = callers
        self.registry = registry if registry is not None and registry.works else None
        self.call: Caller = call or _no_store
        self._has_executors = trio.Event()
        #: block manager directories made here by executors that have not listed the shared
        #: local dir yet: Spark's recovery plugin does, before an executor's first map output,
        #: and only then are they told to other mounts (a job without the plugin costs nothing)
        self._untold: dict[Executor, list[Dir]] = {}
        #: block manager directories of this mount's executors whose death is not yet told
        self._watched: dict[str, Executor] = {}

    def creator(self, directory: Dir, caller: int) -> Executor | None:
        """The executor a new directory belongs to: a block manager's directory made by one."""
        if not is_block_manager_dir(directory.name):
            return None
        executor = self.callers.executor_of(caller)
        if executor is not None:
            if len(self._untold) >= UNTOLD_PRUNE_AT:  # executors that never scanned, and are gone
                self._untold = {e: dirs for e, dirs in self._untold.items() if self.callers.alive(e)}
            self._untold.setdefault(executor, []).append(directory)
        return executor

    def resumed(self, directory: Dir, key: str) -> None:
        """A restarted daemon found an executor's directory of its earlier run. Told before:
        the executor may live on, so the node's lease must not run out, and its death is still
        to tell."""
        executor = directory.executor
        if executor is None:
            return
        if directory.registered:
            self._watched[key] = executor
            self._has_executors.set()
        else:
            self._untold.setdefault(executor, []).append(directory)

    async def _tell(self, executor: Executor, key_of: Callable[[Dir], str]) -> list[Dir]:
        """The executor lists the shared local dir: tell every mount whose block manager
        directories it made (a failure only means other mounts cannot adopt them). Returns
        the directories told, whose record must be kept."""
        directories = self._untold.pop(executor, [])
        if self.registry is None:
            return []
        told = []
        for directory in directories:
            if not directory.linked:
                continue
            key = key_of(directory)
            try:
                await self.call(self.registry.register, key, executor, what=f"registering {key}")
            except StoreError as exc:
                log.warning("%s cannot be adopted by executors on other nodes: %s", key, exc)
                continue
            directory.registered = True
            told.append(directory)
            self._watched[key] = executor
            self._has_executors.set()
        return told

    async def keep_lease(self) -> None:
        """Renew this node's lease while it has executors (from the first one on)."""
        if self.registry is None:
            return
        await self._has_executors.wait()
        while True:
            try:
                await self.call(self.registry.renew_lease, what="renewing the node's lease")
            except StoreError as exc:
                log.warning(
                    "could not renew this node's lease (%s): if it runs out, executors "
                    "elsewhere may adopt this node's map outputs",
                    exc,
                )
            await self._tell_deaths()
            await trio.sleep(self.registry.lease / 3)

    async def _tell_deaths(self) -> None:
        """Executors of this node that died (while the node lives on): their directories
        become adoptable on other nodes too."""
        if self.registry is None:
            return
        for key, executor in list(self._watched.items()):
            if self.callers.alive(executor):
                continue
            try:
                await self.call(self.registry.register, key, executor, dead=True, what=f"telling {key} is dead")
            except StoreError as exc:
                log.warning("could not tell other nodes that executor %s is dead: %s", executor.executor_id, exc)
                continue
            del self._watched[key]

    async def entries(
        self, directory: Dir, entries: list[tuple[str, Dir]], caller: int, key_of: Callable[[Dir], str]
    ) -> tuple[list, list[Dir]]:
        """The entries of `directory` the caller may list, and the directories of this mount
        whose record changed (adopted, or told to other mounts) by listing them."""
        holder = _block_manager_dir_of(directory)
        if holder is None and (directory.subdirs == 0 or not any(is_block_manager_dir(name) for name, _ in entries)):
            return entries, []  # nothing to decide: whoever asks sees it all
        viewer = self.callers.executor_of(caller)
        if viewer is None:
            return entries, []  # not an executor: a person, the Worker, the shuffle service
        told = await self._tell(viewer, key_of) if viewer in self._untold else []
        if holder is not None:
            if holder.executor == viewer:
                return entries, told
            return [(name, node) for name, node in entries if not is_checksum(name)], told
        shown, adopted = [], told
        for name, node in entries:
            if node.children is None or not is_block_manager_dir(name):
                shown.append((name, node))
            elif node.executor is None and not node.created_here:
                if await self._may_adopt(node, viewer, key_of(node)):
                    shown.append((name, node))
            elif await self._may_see(node, viewer, adopted, key_of(node)):
                shown.append((name, node))
        return shown, adopted

    async def _may_adopt(self, directory: Dir, viewer: Executor, key: str) -> bool:
        """A directory made on another mount: the registry tells."""
        if directory.adopter == viewer:
            return True
        if self.registry is None:
            return False
        try:
            adopted = await self.call(self.registry.adopt, key, viewer, what=f"asking whose {key} is")
        except StoreError as exc:
            log.warning("not listing %s: %s", key, exc)
            return False
        if adopted:
            directory.adopter = viewer
        return adopted

    async def _may_see(self, directory: Dir, viewer: Executor, adopted: list[Dir], key: str) -> bool:
        """A directory made here: judged by its executor's process (and its adopter's)."""
        owner = directory.executor
        if owner is None:
            return False  # made here by no executor
        if owner == viewer:
            return True
        if owner.app_id != viewer.app_id or self.callers.alive(owner):
            return False
        adopter = directory.adopter
        if adopter == viewer:
            return True
        if adopter is not None and self.callers.alive(adopter):
            return False
        if self.registry is not None:
            # executors elsewhere may claim it too, once this node told it is dead
            try:
                claimed = await self.call(self.registry.claim, key, viewer, self._died_here, what=f"claiming {key}")
            except StoreError as exc:
                log.warning("not listing %s: %s", key, exc)
                return False
            if not claimed:
                return False
        directory.adopter = viewer
        adopted.append(directory)
        log.info(
            "executor %s of %s adopts %s of dead executor %s",
            viewer.executor_id,
            viewer.app_id,
            directory.name,
            owner.executor_id,
        )
        return True

    @staticmethod
    def left_behind(directory: Dir, moved: str, destination: Dir) -> tuple[Dir | None, list[tuple[Dir, str]]]:
        """Spark's recovery plugin moved the file `moved` out of `directory` into `destination`:
        the adopted block manager directory it came from (None if it is none, or if the file
        stayed inside it) and what the plugin leaves of that map output there, its checksum
        files (hidden from the adopter, see entries) with their directories: Spark puts each
        file in the subdirectory its name hashes to."""
        holder = _block_manager_dir_of(directory)
        if holder is None or holder.adopter is None or _block_manager_dir_of(destination) is holder:
            return None, []
        if not (moved.endswith(".data") and is_durable(moved)):
            return holder, []
        checksums = moved.removesuffix(".data") + ".checksum."
        return holder, [
            (sub, name)
            for sub in [holder, *(holder.children or {}).values()]
            if sub.children
            for name in sub.children
            if name.startswith(checksums)
        ]

    def _died_here(self, adopter: Executor, node: str) -> bool:
        """(worker thread) Whether a claim's adopter is a dead executor of this node."""
        return self.registry is not None and node == self.registry.node and not self.callers.alive(adopter)


async def _no_store(*_args, **_kwargs):
    raise RuntimeError("Views without a registry asks no store")


def _block_manager_dir_of(directory: Dir) -> Dir | None:
    node: Dir | None = directory
    while node is not None:
        if is_block_manager_dir(node.name):
            return node
        node = node.parent
    return None
