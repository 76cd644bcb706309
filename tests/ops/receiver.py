"""A local HTTP receiver on 127.0.0.1 for the alert tests: records every POST to /hook (the notification webhook)
and answers anything else with a 401 OperationOutcome (a SATUSEHAT that refuses the client's credentials)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stack.ports import LOOPBACK

REFUSED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "security", "details": {"text": "invalid client credentials"}}],
}


@dataclass
class Receiver:
    base_url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hook_url(self) -> str:
        return f"{self.base_url}/hook"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.posts)

    def first(self, subject_part: str) -> dict[str, Any] | None:
        """The first notification whose subject contains `subject_part`, or None yet."""
        return next((p for p in self.received() if subject_part in str(p.get("subject", ""))), None)


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/hook":
                try:
                    data = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    data = {"raw": body.decode(errors="replace")}
                with holder[0].lock:
                    holder[0].posts.append(data)
                self._answer(200, {"ok": True})
            else:
                self._answer(401, REFUSED)

        def do_GET(self) -> None:
            self._answer(401, REFUSED)

        def _answer(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    holder.append(Receiver(f"http://{LOOPBACK}:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
