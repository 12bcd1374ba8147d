"""A fault-injecting reverse proxy for S3 tests: sits between the client and a real S3 server (moto).

Every request is read whole (Content-Length or chunked body), then, depending on `mode`:
- "pass":   relayed to the upstream server, its response relayed back;
- "faults": a seeded random share `fault_rate` of requests is faulted, the kinds taken in turn
            from `kinds` (so that a few faults already cover every kind): "503" SlowDown, "500"
            InternalError, "reset": the connection is reset without a response, alternately
            before the request reaches the server and after it ran there (the client cannot know
            whether it took effect); the rest relayed;
- "deny":   every request answered 403 AccessDenied.
`mode` and `fault_rate` are plain attributes, read per request: set up cleanly, then turn faults on.
`counts` counts what happened per kind ("forwarded", "503", "500", "reset", "reset-after" (those of
the resets that came after the server ran the request), "403").
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not relayed. The request's
# Expect is answered by this proxy itself (BaseHTTPRequestHandler sends 100 Continue).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "expect"}
ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, kinds: tuple[str, ...] = ("503", "500", "reset")):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.mode = "pass"
        self.fault_rate = 0.0
        self.kinds = kinds
        self.counts: Counter = Counter()
        self.log: list[tuple[float, str, str, str]] = []  # (time, method, path, what happened), for debugging
        self._random = random.Random(seed)
        self._faults = 0  # faults injected so far: picks the next kind
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def decide(self) -> str:
        """What to do with the next request: 'forward' or a fault kind ('reset' split into before/after)."""
        with self._lock:
            if self.mode == "deny":
                return "403"
            if self.mode == "faults" and self._random.random() < self.fault_rate:
                kind = self.kinds[self._faults % len(self.kinds)]
                turn = self._faults // len(self.kinds)
                self._faults += 1
                if kind == "reset":
                    return ("reset-before", "reset-after")[turn % 2]
                return kind
            return "forward"

    def count(self, kind: str, method: str = "", path: str = "") -> None:
        with self._lock:
            self.counts[kind] += 1
            self.log.append((time.time(), method, path, kind))


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect

        def log_message(self, *args) -> None:  # quiet: tests read counts, not access logs
            pass

        def do_request(self) -> None:
            body = self._read_body()
            action = proxy.decide()
            if action in ERRORS:
                proxy.count(action, self.command, self.path)
                return self._error(*ERRORS[action])
            if action == "reset-before":
                proxy.count("reset", self.command, self.path)
                return self._reset()
            status, reason, headers, payload = self._forward(body)
            if action == "reset-after":  # the server did the work; the client never hears of it
                proxy.count("reset", self.command, self.path)
                proxy.count("reset-after", self.command, self.path)
                return self._reset()
            proxy.count("forwarded", self.command, self.path)
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length" and payload is not None):
                    self.send_header(name, value)
            if payload is not None:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload:
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes):
            """-> (status, reason, headers, payload); payload None where the response has no body
            (HEAD, 204, 304), so its Content-Length header (the object's size for HEAD) is kept."""
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                # The body is relayed de-chunked (an aws-chunked payload stays as it is, inside it).
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                payload = resp.read()
                no_body = self.command == "HEAD" or resp.status in (204, 304)
                return resp.status, resp.reason, resp.getheaders(), None if no_body else payload
            finally:
                conn.close()

        def _error(self, status: int, code: str, message: str) -> None:
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _reset(self) -> None:
            """Close with a TCP RST (linger 0), as a crashed server or a load balancer would."""
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:  # the socket was reset on purpose
                pass

    return Handler
