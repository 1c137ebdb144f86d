"""The daemon's warning when uploads fall behind (issue 15, "logs that help"): once when the
oldest store operation waits over a minute or half the cache waits for upload, and a line when
they caught up. On trio's autojumping clock: minutes of checks pass at once."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import trio

from shufflefs.daemon import BEHIND_AFTER, backlog_warning, watch_backlog
from shufflefs.remote import Remote

GiB = 1 << 30


def test_what_counts_as_falling_behind():
    assert backlog_warning(BEHIND_AFTER, 3, 0, 10 * GiB) is None
    assert backlog_warning(0.0, 0, 5 * GiB, 10 * GiB) is None
    assert "the oldest for 61 s" in backlog_warning(BEHIND_AFTER + 1, 3, 0, 10 * GiB)
    assert "5368709121 bytes waiting" in backlog_warning(0.0, 1, 5 * GiB + 1, 10 * GiB)


class Op:
    def __init__(self, created: float) -> None:
        self.created = created


async def test_the_warning_comes_once_and_the_recovery_is_said(autojump_clock, caplog):
    remote = SimpleNamespace(pending=set(), pending_put_bytes=0)
    remote.oldest_pending_seconds = lambda: Remote.oldest_pending_seconds(remote)  # the real rule
    caplog.set_level(logging.INFO, logger="shufflefs.daemon")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_backlog, remote, 10 * GiB)
        await trio.sleep(60)
        remote.pending.add(Op(time.monotonic() - 3600))  # waiting for an hour
        await trio.sleep(5 * 60)  # checked 30 times: one warning
        remote.pending.clear()
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("uploads are falling behind: 1 store operations pending")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "uploads caught up: 0 store operations pending"
    ]
