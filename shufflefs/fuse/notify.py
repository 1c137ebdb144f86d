"""Telling the kernel to forget what the core names (`Filesystem.invalidations`): the same
for every session, which only supplies how a notification is sent."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from shufflefs.core import Filesystem

log = logging.getLogger(__name__)


async def forward_invalidations(
    fs: Filesystem, invalidate_inode: Callable[[int], None], invalidate_entry: Callable[[int, str], None]
) -> None:
    """For the life of the mount. Each notification goes from a worker thread: the kernel
    first waits for the inode's writeback, i.e. for WRITE requests that the session must still
    be free to answer, or for the reply of the request that queued it."""
    async for kind, *what in fs.invalidations:
        call = invalidate_inode if kind == "inode" else invalidate_entry
        try:
            # abandoned on cancel: one the kernel holds up must not hold up the daemon's exit
            await trio.to_thread.run_sync(call, *what, abandon_on_cancel=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has forgotten it already
                log.warning("cannot invalidate %s %r in the kernel: %s", kind, what, exc.strerror)
