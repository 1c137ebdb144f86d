"""A fault-injecting HTTP/1.1 proxy between an S3 client (boto3, in this process or in a daemon
given `--s3-endpoint-url proxy.url`) and a real S3 server, for tests.

Requests are forwarded byte-exact (request line, headers including Host, and body with its
framing), so SigV4 signatures stay valid. Rules pick requests by S3 operation, method, path
and query, and do something else with them:

    with FaultProxy(seaweed.endpoint_url) as proxy:
        rule = proxy.add_rule(fail(503, "SlowDown"), op="UploadPart", probability=0.2, seed=7)
        proxy.add_rule(drop_after(), op="CompleteMultipartUpload", times=1)
        store = S3Store(bucket, endpoint_url=proxy.url)
        ...
        assert proxy.count(op="CreateMultipartUpload") == 1
        assert rule.hits == proxy.count(op="UploadPart", status=503)

The first rule (in the order added) that matches a request and fires (it has matches left and
its seeded coin says yes) decides what happens; otherwise the request is forwarded. Every
request is recorded (`proxy.requests`) once it was read completely.

Actions: `fail(status, code)` answers an S3 XML error without forwarding; `drop_before()`
resets the connection without forwarding; `drop_after()` forwards, lets the server answer and
resets the client connection instead of answering (the request happened); `hang()` never
answers and never forwards; `hold()` never forwards until the test calls
`proxy.release(held)`, which forwards it right then (typically after the client gave up:
a request received by the store but applied late); `delay(seconds)` forwards after a pause.

The proxy answers `Expect: 100-continue` itself and reads the whole request before deciding,
so a client never waits for the server's 100. Plain HTTP only (no TLS), path-style
addressing (the operation names come from `/bucket/key?query`).
"""

from __future__ import annotations

import io
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

#: how long the proxy waits for the server (a test that hangs on it should fail, not hang)
UPSTREAM_TIMEOUT = 120.0
_MAX_LINE = 65536
_COPY_CHUNK = 256 * 1024


# -- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    kind: str
    status: int = 0
    code: str = ""
    message: str = ""
    seconds: float = 0.0


def fail(status: int, code: str, message: str = "injected by faultproxy") -> Action:
    """Answer with an S3 error document; the server never sees the request."""
    return Action("fail", status=status, code=code, message=message)


def drop_before() -> Action:
    """Reset the client connection after reading the request; the server never sees it."""
    return Action("drop_before")


def drop_after() -> Action:
    """Forward, wait for the server's answer, then reset the client connection without it."""
    return Action("drop_after")


def hang() -> Action:
    """Never answer and never forward (the client times out)."""
    return Action("hang")


def hold() -> Action:
    """Keep the request without forwarding it until `FaultProxy.release`."""
    return Action("hold")


def delay(seconds: float) -> Action:
    """Forward after `seconds`."""
    return Action("delay", seconds=seconds)


# -- records ---------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the proxy read it, and what became of it."""

    method: str
    path: str  # percent-decoded, without the query
    query: str  # raw query string, without '?'
    op: str  # S3 operation name, e.g. "UploadPart" (path-style addressing)
    headers: dict[str, str]  # lower-case names
    body_bytes: int  # bytes of the body as sent, framing included
    #: what the proxy did: "forward", or the kind of the action of the rule that fired
    action: str = "forward"
    #: the server's status (also for drop_after, whose client never saw it), or the injected
    #: one; None while held, and when the server never answered
    status: int | None = None
    started: float = 0.0  # time.monotonic() when the request was read
    params: dict[str, str] = field(default_factory=dict)  # parsed query


@dataclass(eq=False)
class Rule:
    action: Action
    op: str | tuple[str, ...] | None = None
    method: str | None = None
    path: str | None = None  # regex searched in Request.path
    query: str | None = None  # regex searched in Request.query
    times: int | None = None  # fire at most this often (None: no limit)
    probability: float = 1.0
    seed: int = 0
    #: how often it fired
    hits: int = 0

    def __post_init__(self):
        self._random = random.Random(self.seed)
        self._path = re.compile(self.path) if self.path is not None else None
        self._query = re.compile(self.query) if self.query is not None else None

    def matches(self, request: Request) -> bool:
        if self.op is not None and request.op not in ((self.op,) if isinstance(self.op, str) else self.op):
            return False
        if self.method is not None and request.method != self.method.upper():
            return False
        if self._path is not None and not self._path.search(request.path):
            return False
        return self._query is None or bool(self._query.search(request.query))

    def fires(self) -> bool:
        """Called for a matching request (under the proxy's lock, so rolls are in order)."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.probability < 1.0 and self._random.random() >= self.probability:
            return False
        self.hits += 1
        return True


class Held:
    """A request kept by a `hold()` rule."""

    def __init__(self, request: Request, raw: bytes):
        self.request = request
        self.raw = raw
        self.response: bytes | None = None
        self.done = threading.Event()


# -- the proxy -----------------------------------------------------------------------------------


class FaultProxy:
    def __init__(self, upstream_url: str):
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"faultproxy forwards plain http only, not {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.url = ""
        #: client connections accepted so far (keep-alive keeps this low)
        self.connections = 0
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._requests: list[Request] = []
        self._held: list[Held] = []
        self._held_changed = threading.Condition(self._lock)
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    # -- life cycle

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close everything: hanging and held requests end with a closed connection."""
        self._stopping.set()
        with self._lock:
            for held in self._held:
                held.done.set()
            sockets = list(self._sockets)
        if self._listener is not None:
            _shutdown(self._listener)  # wakes accept()
            self._listener.close()
        for sock in sockets:
            _shutdown(sock)  # wakes threads blocked reading from a client or the server
        if self._accept_thread is not None:
            self._accept_thread.join(10)  # after this, no connection thread is started
        for thread in list(self._threads):
            thread.join(10)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"faultproxy threads still running after stop: {alive}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> bool:
        self.stop()
        return False

    # -- rules and records

    def add_rule(
        self,
        action: Action,
        *,
        op: str | tuple[str, ...] | None = None,
        method: str | None = None,
        path: str | None = None,
        query: str | None = None,
        times: int | None = None,
        probability: float = 1.0,
        seed: int = 0,
    ) -> Rule:
        """Apply `action` to matching requests: all of them, the first `times`, or each with
        `probability` (a coin seeded with `seed`, so a run is repeatable when requests come
        in a repeatable order)."""
        rule = Rule(action, op, method, path, query, times, probability, seed)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def select(
        self,
        op: str | None = None,
        method: str | None = None,
        *,
        action: str | None = None,
        status: int | None = None,
        query: str | None = None,
    ) -> list[Request]:
        """The recorded requests that match every given filter (`query` is a regex)."""
        pattern = re.compile(query) if query is not None else None
        return [
            r
            for r in self.requests
            if (op is None or r.op == op)
            and (method is None or r.method == method.upper())
            and (action is None or r.action == action)
            and (status is None or r.status == status)
            and (pattern is None or pattern.search(r.query))
        ]

    def count(self, op: str | None = None, method: str | None = None, **filters) -> int:
        return len(self.select(op, method, **filters))

    def wait_held(self, timeout: float = 10.0) -> Held:
        """The oldest held request not released yet, waiting for one to arrive."""
        deadline = time.monotonic() + timeout
        with self._held_changed:
            while True:
                pending = [h for h in self._held if not h.done.is_set()]
                if pending:
                    return pending[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no request was held")
                self._held_changed.wait(remaining)

    def held(self) -> list[Held]:
        """The held requests not released yet, oldest first (without waiting)."""
        with self._lock:
            return [h for h in self._held if not h.done.is_set()]

    def release(self, held: Held) -> int:
        """Forward a held request to the server now, over a connection of its own; return the
        server's status. If its client is still waiting, it gets the answer."""
        if held.done.is_set():
            raise RuntimeError("this request was already released (or the proxy stopped)")
        upstream = self._connect_upstream()
        try:
            upstream.sendall(held.raw)
            response = bytearray()
            status, _close = _relay_response(_reader(upstream), held.request.method, response.extend)
        finally:
            self._close(upstream)
        held.request.status = status
        held.response = bytes(response)
        held.done.set()
        return status

    # -- internals

    def _spawn_server(self, conn: socket.socket) -> None:
        thread = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-connection", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
            if self._stopping.is_set():  # raced with stop(): it will not see this socket
                _shutdown(sock)
        return sock

    def _close(self, sock: socket.socket | None, reset: bool = False) -> None:
        if sock is None or sock.fileno() < 0:  # none, or closed already
            return
        with self._lock:
            self._sockets.discard(sock)
        if reset:  # RST instead of FIN: the client sees "connection reset by peer"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _connect_upstream(self) -> socket.socket:
        sock = self._track(socket.create_connection(self.upstream, timeout=UPSTREAM_TIMEOUT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            self._spawn_server(self._track(conn))

    def _serve(self, client: socket.socket) -> None:
        """One client connection: requests one after the other (keep-alive)."""
        reader = _reader(client)
        upstream: socket.socket | None = None
        try:
            while not self._stopping.is_set():
                incoming = _read_request(reader, client)
                if incoming is None:
                    return  # the client closed the connection
                request, raw = incoming
                with self._lock:
                    self._requests.append(request)
                    rule = next((r for r in self._rules if r.matches(request) and r.fires()), None)
                action = rule.action if rule is not None else None
                request.action = action.kind if action is not None else "forward"

                if request.action == "fail":
                    request.status = action.status
                    client.sendall(_error_response(request, action))
                elif request.action == "drop_before":
                    self._close(client, reset=True)
                    return
                elif request.action == "hang":
                    _wait_for_eof(reader)  # until the client gives up or the proxy stops
                    return
                elif request.action == "hold":
                    held = Held(request, raw)
                    with self._held_changed:
                        self._held.append(held)
                        self._held_changed.notify_all()
                    held.done.wait()
                    if held.response is None:  # the proxy stopped
                        return
                    client.sendall(held.response)  # the client may still be waiting
                else:
                    if request.action == "delay" and self._stopping.wait(action.seconds):
                        return
                    if upstream is not None and _dropped(upstream):  # the server closed an idle connection
                        self._close(upstream)
                        upstream = None
                    if upstream is None:
                        upstream = self._connect_upstream()
                        upstream_reader = _reader(upstream)
                    upstream.sendall(raw)
                    sink = _discard if request.action == "drop_after" else client.sendall
                    request.status, close = _relay_response(upstream_reader, request.method, sink)
                    if request.action == "drop_after":
                        self._close(client, reset=True)
                        return
                    if close:
                        return
                if _wants_close(request.headers):
                    return
        except (OSError, ValueError):
            # the server is unreachable or hung up, or the client spoke garbage: the client
            # sees its connection reset, as it would without the proxy
            self._close(client, reset=True)
        finally:
            self._close(upstream)
            self._close(client)


# -- HTTP/1.1 framing ----------------------------------------------------------------------------


def _read_line(reader) -> bytes:
    line = reader.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise ValueError("line too long")
    return line


def _read_head(reader) -> tuple[bytes, list[bytes]] | None:
    """The start line and header lines (raw, with their CRLF); None at a clean EOF."""
    first = _read_line(reader)
    while first in (b"\r\n", b"\n"):  # tolerated between requests (RFC 9112 2.2)
        first = _read_line(reader)
    if not first:
        return None
    if not first.endswith(b"\n"):
        raise ValueError("connection closed inside a message head")
    lines = []
    while True:
        line = _read_line(reader)
        if not line.endswith(b"\n"):
            raise ValueError("connection closed inside a message head")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return first, lines


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _read_exactly(reader, n: int, sink) -> None:
    while n > 0:
        data = reader.read(min(n, _COPY_CHUNK))
        if not data:
            raise OSError("connection closed inside a message body")
        sink(data)
        n -= len(data)


def _copy_body(reader, headers: dict[str, str], sink, *, until_eof: bool) -> None:
    """Pass a message body to `sink`, framing included (chunk sizes, extensions, trailers)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = _read_line(reader)
            if not line.endswith(b"\n"):
                raise OSError("connection closed inside a chunked body")
            sink(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            _read_exactly(reader, size + 2, sink)  # data and its CRLF
        while True:  # trailer section
            line = _read_line(reader)
            if not line.endswith(b"\n"):
                raise OSError("connection closed inside a chunked trailer")
            sink(line)
            if line in (b"\r\n", b"\n"):
                return
    if "content-length" in headers:
        _read_exactly(reader, int(headers["content-length"]), sink)
    elif until_eof:
        while data := reader.read1(_COPY_CHUNK):
            sink(data)


def _read_request(reader, client: socket.socket) -> tuple[Request, bytes] | None:
    head = _read_head(reader)
    if head is None:
        return None
    first, lines = head
    method, target, _version = first.decode("latin-1").split(" ", 2)
    headers = _headers(lines)
    if headers.get("expect", "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    raw = bytearray(first)
    for line in lines:
        raw += line
    head_size = len(raw)
    _copy_body(reader, headers, raw.extend, until_eof=False)
    raw_path, _, query = target.partition("?")
    path = urllib.parse.unquote(raw_path)
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    request = Request(
        method=method.upper(),
        path=path,
        query=query,
        op=s3_operation(method.upper(), path, params, headers),
        headers=headers,
        body_bytes=len(raw) - head_size,
        started=time.monotonic(),
        params=params,
    )
    return request, bytes(raw)


def _relay_response(reader, method: str, sink) -> tuple[int, bool]:
    """Pass the server's final response to `sink` (interim 1xx answers are dropped: the proxy
    already told the client to continue); return its status and whether the connection ends."""
    while True:
        head = _read_head(reader)
        if head is None:
            raise OSError("the server closed the connection without an answer")
        first, lines = head
        status = int(first.split(b" ", 2)[1])
        headers = _headers(lines)
        if 100 <= status < 200:
            continue
        sink(first)
        sink(b"".join(lines))
        bodyless = method == "HEAD" or status in (204, 304)
        delimited = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        if not bodyless:
            _copy_body(reader, headers, sink, until_eof=True)
        close = _wants_close(headers) or first.startswith(b"HTTP/1.0") or (not bodyless and not delimited)
        return status, close


def _wants_close(headers: dict[str, str]) -> bool:
    return "close" in headers.get("connection", "").lower()


def _error_response(request: Request, action: Action) -> bytes:
    request_id = f"faultproxy-{id(request):x}"
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{action.code}</Code>'
        f"<Message>{action.message}</Message><Resource>{_xml_escape(request.path)}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    reason = {
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        409: "Conflict",
        412: "Precondition Failed",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }.get(action.status, "Error")
    head = (
        f"HTTP/1.1 {action.status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nx-amz-request-id: {request_id}\r\n\r\n"
    ).encode()
    return head if request.method == "HEAD" else head + body


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _wait_for_eof(reader) -> None:
    try:
        while reader.read1(_COPY_CHUNK):
            pass
    except OSError:
        pass


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle connection was closed by the other side (readable with nothing sent)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _reader(sock: socket.socket) -> io.BufferedReader:
    """A buffered reader of `sock` that, unlike sock.makefile(), does not keep the socket open
    once sock.close() is called (a reset must reach the client right away)."""
    return io.BufferedReader(socket.SocketIO(sock, "rb"), _COPY_CHUNK)


def _discard(_data: bytes) -> None:
    pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def s3_operation(method: str, path: str, params: dict[str, str], headers: dict[str, str]) -> str:
    """The S3 operation of a path-style request, e.g. "UploadPart" for PUT /b/k?partNumber=1&uploadId=x."""
    bucket, _, key = path.lstrip("/").partition("/")
    copy = "x-amz-copy-source" in headers
    if not bucket:
        return "ListBuckets" if method == "GET" else method
    if not key:
        if method == "POST" and "delete" in params:
            return "DeleteObjects"
        if method == "GET":
            if "uploads" in params:
                return "ListMultipartUploads"
            return "ListObjectsV2" if params.get("list-type") == "2" else "ListObjects"
        return {"PUT": "CreateBucket", "DELETE": "DeleteBucket", "HEAD": "HeadBucket"}.get(method, method)
    if method == "PUT":
        if "partNumber" in params and "uploadId" in params:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in params else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return method
