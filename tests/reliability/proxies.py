"""Small network stand-ins for faults the real parts cannot produce on demand, put between the gateway and them.

* `PacsProxy`: an HTTP reverse proxy in front of Orthanc. Orthanc never answers 503 by itself, and it cannot list
  an instance it then fails to deliver; the proxy can do both: `fail_next(n)` answers the next n requests 503,
  `withhold(uid)` drops that SOP instance from every WADO-RS answer (206 Partial Content, as PS3.18 has a PACS
  answer when some instances of a retrieval are unavailable) while QIDO-RS still lists it.
* `TcpGate`: a TCP forwarder in front of the DICOM Router that can be closed (connection refused, as a router that
  is down) and opened again on the same port, so the gateway's settings never change during the test.

Both are threads in the test process, on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import http.client
import socket
import threading
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from stack.ports import free_port

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


class PacsProxy:
    """Reverse proxy to `upstream` (Orthanc's HTTP root) with injectable 503s and withheld instances."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._fail_next = 0
        self._withheld: set[bytes] = set()
        self.answered_503 = 0
        self.withheld_parts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet: the test prints what matters
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._take_503():
                    self._answer(503, [("Content-Type", "text/plain")], b"Service Unavailable")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    status = response.status
                    out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                finally:
                    connection.close()
                content_type = response.getheader("Content-Type", "")
                if status == 200 and content_type.startswith("multipart/related"):
                    data, dropped = proxy._without_withheld(data, content_type)
                    if dropped:
                        status = 206
                        out.append(("Warning", f'299 satset-test-pacs "{dropped} instance(s) could not be retrieved"'))
                self._answer(status, out, data)

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="pacs-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, count: int) -> None:
        """Answer the next `count` requests with a plain-text 503, whatever they ask."""
        with self._lock:
            self._fail_next = count

    def withhold(self, sop_instance_uid: str) -> None:
        """Leave this instance out of every retrieval from now on (the PACS lists it but cannot deliver it)."""
        with self._lock:
            self._withheld.add(sop_instance_uid.encode("ascii"))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _take_503(self) -> bool:
        with self._lock:
            if self._fail_next <= 0:
                return False
            self._fail_next -= 1
            self.answered_503 += 1
            return True

    def _without_withheld(self, body: bytes, content_type: str) -> tuple[bytes, int]:
        """The multipart body without the parts holding a withheld instance, and how many were dropped."""
        with self._lock:
            withheld = set(self._withheld)
        boundary = next(
            (
                p.split("=", 1)[1].strip().strip('"')
                for p in content_type.split(";")
                if p.strip().startswith("boundary")
            ),
            "",
        )
        if not withheld or not boundary:
            return body, 0
        delimiter = b"\r\n--" + boundary.encode("ascii")
        preamble, *parts = (b"\r\n" + body).split(delimiter)
        kept = [part for part in parts if not any(uid in part for uid in withheld)]
        dropped = len(parts) - len(kept)
        with self._lock:
            self.withheld_parts += dropped
        return (preamble + b"".join(delimiter + part for part in kept))[2:], dropped


class TcpGate:
    """A TCP forwarder to (host, port) on a port of its own, closed (refusing connections) or open."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._accepting: threading.Thread | None = None

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def open(self) -> None:
        """Listen on the gate's port again and forward every connection to the target."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(16)
            self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), name="tcp-gate", daemon=True)
        self._accepting.start()

    def close(self) -> None:
        """Stop listening and cut every forwarded connection: the service is down."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        if self._accepting is not None:
            self._accepting.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), name="tcp-gate-pump", daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes one way until either side closes, then close both."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
