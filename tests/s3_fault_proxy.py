"""A fault-injecting HTTP proxy for tests: sits in front of an S3 server (moto) on loopback.

Clients (boto3, pyarrow) talk to `proxy.url` instead of the server. Every request is
forwarded unchanged, unless a rule set by the test matches it; a rule can

- answer an S3 error itself (`503` SlowDown, `500` InternalError, or any status/code,
  e.g. 403 AccessDenied) without forwarding,
- `reset` the connection (close it with an RST) before forwarding anything,
- `reset_request`: read part of the request body, then reset (a write failing mid-body;
  nothing reaches the server),
- `reset_upload`: forward the headers and part of the body to the server, then reset
  both sides (the server sees a client vanish mid-body),
- `reset_response`: forward the request, then send the client only part of the server's
  answer and reset (mid-response; the server *did* apply the request),
- `delay`: wait, then forward normally.

Rules match on method and a substring of the (decoded) request target, and are tried in
order; the first that is due acts. A rule lets `after` matching requests through, then acts
on every `every`-th matching request (1: each one), `count` times in all (None: forever).
The proxy records every request it saw and what it did with it.

Standard library only; one thread per client connection; plain sockets (no makefile) so
that a reset really is a reset.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

ACTIONS = ("error", "reset", "reset_request", "reset_upload", "reset_response", "delay")

# Hop-by-hop headers are the proxy's own business on each side; never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
        "expect"}


@dataclass
class Rule:
    action: str
    method: str | None = None  # None: any method
    key: str | None = None  # substring of the decoded target ("/bucket/key?query")
    count: int | None = 1  # times to fire; None: every matching request
    after: int = 0  # matching requests to let through before firing
    every: int = 1  # act on the 1st, (1 + every)th, ... matching request after `after`
    status: int = 503  # for "error"
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    seconds: float = 0.0  # for "delay"
    fraction: float = 0.5  # how much of the body/response goes out before a reset
    seen: int = 0  # matching requests so far
    fired: int = 0  # times this rule acted

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {ACTIONS}")

    def matches(self, method: str, target: str) -> bool:
        return ((self.method is None or self.method.upper() == method)
                and (self.key is None or self.key in target))

    def due(self) -> bool:
        """Whether the matching request just counted in `seen` is one to act on."""
        index = self.seen - self.after  # 1 for the first request past `after`
        return (index >= 1 and (index - 1) % max(1, self.every) == 0
                and (self.count is None or self.fired < self.count))


@dataclass(frozen=True)
class Hit:
    method: str
    target: str
    action: str  # "forward" or the rule's action


@dataclass
class FaultProxy:
    """`FaultProxy(upstream).start()`; point clients at `.url`; `.stop()` when done."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        parsed = urlparse(self.upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self.url = ""

    # ---- the test's side -------------------------------------------------------------
    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="s3-fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                _close(conn)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, action: str, **options) -> Rule:
        """Append a rule (see Rule); returns it so the test can read `fired` later."""
        rule = Rule(action, **options)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule and forget the recorded requests."""
        with self._lock:
            self.rules.clear()
            self.hits.clear()

    def count(self, method: str | None = None, key: str | None = None,
              action: str | None = None) -> int:
        """Requests seen that match method / target substring / what was done."""
        with self._lock:
            return sum(1 for hit in self.hits
                       if (method is None or hit.method == method.upper())
                       and (key is None or key in hit.target)
                       and (action is None or hit.action == action))

    # ---- serving ------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _pick(self, method: str, target: str) -> Rule | None:
        with self._lock:
            chosen = None
            for rule in self.rules:
                if not rule.matches(method, target):
                    continue
                rule.seen += 1
                if chosen is None and rule.due():
                    rule.fired += 1
                    chosen = rule
            self.hits.append(Hit(method, target, chosen.action if chosen else "forward"))
            return chosen

    def _serve(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        try:
            while not self._stopping.is_set():
                if not self._one_request(conn, reader):
                    break
        except (OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            _close(conn)

    def _one_request(self, conn: socket.socket, reader: _Reader) -> bool:
        """Serve one request; False when the connection is finished."""
        line = reader.readline()
        if not line.strip():
            return False
        method, target, _version = line.decode("latin-1").strip().split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            raw = reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {name.lower(): value for name, value in headers}
        keep_alive = lower.get("connection", "").lower() != "close"
        rule = self._pick(method, unquote(target))

        if lower.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        length = int(lower.get("content-length", "0") or 0)
        action = rule.action if rule else "forward"

        if action == "reset_request":
            reader.read(int(length * rule.fraction) if not chunked else 1)
            _reset(conn)
            return False
        body = reader.read_chunked() if chunked else reader.read(length)
        if action == "reset":
            _reset(conn)
            return False
        if action == "error":
            conn.sendall(_error_response(rule, method, target))
            return False  # the error response says Connection: close
        if action == "delay":
            time.sleep(rule.seconds)

        upstream = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP:
                    upstream.putheader(name, value)
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            if action == "reset_upload":
                upstream.endheaders()
                upstream.send(body[: int(len(body) * rule.fraction)])
                upstream.close()
                _reset(conn)
                return False
            upstream.endheaders(body if body else None)
            reply = upstream.getresponse()
            payload = reply.read()
            status, reason, reply_headers = reply.status, reply.reason, reply.getheaders()
        except OSError:
            conn.sendall(_plain_response(502, "Bad Gateway"))
            return False
        finally:
            upstream.close()

        out = [f"HTTP/1.1 {status} {reason}"]
        bodiless = method == "HEAD" or status in (204, 304)
        for name, value in reply_headers:
            low = name.lower()
            if low in _HOP or (low == "content-length" and not bodiless):
                continue
            out.append(f"{name}: {value}")
        if not bodiless:
            out.append(f"Content-Length: {len(payload)}")
        if not keep_alive:
            out.append("Connection: close")
        response = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (
            b"" if bodiless else payload)
        if action == "reset_response":
            conn.sendall(response[: max(1, int(len(response) * rule.fraction))])
            _reset(conn)
            return False
        conn.sendall(response)
        return keep_alive


def _error_response(rule: Rule, method: str, target: str) -> bytes:
    resource = target.split("?", 1)[0]
    body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            f"<Error><Code>{rule.code}</Code><Message>{rule.message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>FAULTPROXY</RequestId></Error>")
    payload = b"" if method == "HEAD" else body.encode()
    reason = http.client.responses.get(rule.status, "Error")
    head = (f"HTTP/1.1 {rule.status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + payload


def _plain_response(status: int, reason: str) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n").encode("latin-1")


def _reset(conn: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not an orderly FIN."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(conn)


def _close(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass


class _Reader:
    """Buffered reads straight from the socket (a makefile() would keep the fd open)."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.conn.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > 65536 or not self._fill():
                line, self.buffer = self.buffer, b""
                return line
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ValueError("client closed the connection mid-body")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_chunked(self) -> bytes:
        """A chunked body, raw (chunk framing and trailers included), to forward as is."""
        raw = b""
        while True:
            size_line = self.readline()
            raw += size_line
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = self.readline()
                    raw += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return raw
            raw += self.read(size + 2)
