"""How a request handler tells the FUSE session that it is about to wait.

Our own FUSE session answers requests inline, on the task that reads /dev/fuse: most requests
never wait, and a task per request would cost more than the request. A handler that is about
to wait for something slow (the store, another request's listing, an upload, fsync) calls
`about_to_wait()` first; the session then hands reading to another task and this one carries on
with its request alone. Without a session (the pyfuse3 adapter, the tests) it does nothing.
A wait nobody announced is still correct: it only holds up the requests behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

# per task: trio gives each task a copy of the context of the task that started it
_hand_off: ContextVar[Callable[[], None] | None] = ContextVar("hand_off", default=None)


def about_to_wait() -> None:
    hand_off = _hand_off.get()
    if hand_off is not None:
        hand_off()


def on_wait(hand_off: Callable[[], None]) -> None:
    """Make `hand_off` the current task's (and the tasks it starts) answer to `about_to_wait`."""
    _hand_off.set(hand_off)
