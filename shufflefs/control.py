"""The daemon's control socket: `shufflefs stats` and `shufflefs bench` ask a running mount for
its counters, and may wait until everything committed so far is in the store.

One request per connection: the client sends one JSON line ({"command": "stats"} or
{"command": "sync"}) and reads one JSON line back. The socket lives next to the pid file,
in the run directory, never inside the mountpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import socket
from collections.abc import Callable

import trio

from shufflefs.options import CommandError
from shufflefs.places import run_file, shufflefs_mount_of

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
#: connections served at once, and seconds a connection may take to send its request
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 5.0
ACCEPT_CAPACITY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)


class ControlError(CommandError):
    pass


def process_memory() -> dict:
    """Resident and peak resident memory of this process, in bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kib = lambda name: int(fields[name].split()[0]) * 1024  # noqa: E731
    return {
        "rss_bytes": kib("VmRSS"),
        "peak_rss_bytes": kib("VmHWM"),
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
    }


async def serve(
    path: str, stats: Callable[[], dict], settle: Callable, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Answer control requests on a unix socket at `path` until cancelled. `settle()` waits
    until every remote operation issued so far has finished."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)  # connecting needs write access: this user's only
        sock.listen()
    except OSError as exc:  # the mount works without it; only stats and bench need it
        log.warning("no control socket at %s: %s", path, exc)
        sock.close()
        task_status.started()
        return
    task_status.started()
    try:
        await _serve(sock, stats, settle)
    finally:
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _serve(sock, stats: Callable[[], dict], settle: Callable) -> None:
    """Every descriptor a connection holds is one the mount cannot open files with: at most
    MAX_CONNECTIONS at once, and one that has not sent its request within IDLE_TIMEOUT is
    closed. At the cap, a new connection takes the place of the oldest one still waiting for
    its request (a client that means it sends it at once), or is closed at once when all are
    busy (waiting for `sync`)."""
    waiting: dict[trio.SocketStream, trio.CancelScope] = {}  # oldest first
    connections = 0

    async def handle(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        nonlocal connections
        try:
            async with stream:
                try:
                    with scope:
                        request = await _read_line(stream)
                    waiting.pop(stream, None)  # being served: no longer one to close for a newer one
                    if scope.cancelled_caught:
                        return  # idle too long, or its place was taken
                    command = json.loads(request).get("command")
                    if command == "sync":
                        await settle()
                    elif command != "stats":
                        raise ValueError(f"unknown command {command!r}")
                    reply = {"ok": True, **stats()}
                except (ValueError, AttributeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except trio.BrokenResourceError:
                    pass  # the client went away (e.g. timed out waiting for sync)
        finally:
            waiting.pop(stream, None)
            connections -= 1

    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                await trio.sleep(0.1)  # out of descriptors (the mount is busy): try again soon
                continue
            stream = trio.SocketStream(conn)
            if connections >= MAX_CONNECTIONS:
                if not waiting:
                    await stream.aclose()
                    continue
                oldest = next(iter(waiting))
                waiting.pop(oldest).cancel()
            connections += 1
            scope = waiting[stream] = trio.CancelScope(deadline=trio.current_time() + IDLE_TIMEOUT)
            nursery.start_soon(handle, stream, scope)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


def request(path: str, command: str, timeout: float | None = 30.0) -> dict:
    """Send one command to the control socket at `path`; ControlError when there is no
    daemon behind it, or it fails or does not answer in time."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise ControlError(f"no answer to {command!r} within {timeout:g}s") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError("no shufflefs daemon is serving it") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the daemon closed the control connection without an answer") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply


def mount_stats(path: str, *, sync: bool = False, timeout: float | None = 600) -> dict:
    """The counters of the daemon serving the mount that holds `path` (with `sync`, once
    everything committed so far is stored); ControlError in one line otherwise."""
    mountpoint = shufflefs_mount_of(path)
    if mountpoint is None:
        raise ControlError(f"{path} is not on a shufflefs mount")
    try:
        return request(run_file(mountpoint, "sock"), "sync" if sync else "stats", timeout)
    except ControlError as exc:
        raise ControlError(f"{mountpoint}: {exc}") from None
