"""Free TCP ports on 127.0.0.1 for the local PACS, dcmtk and test servers.

The kernel picks the port (bind to port 0), so two test sessions on one machine rarely collide; the process also
remembers what it handed out, because the kernel may offer a just-closed port again before anyone has bound it.
"""

from __future__ import annotations

import socket
import threading

LOOPBACK = "127.0.0.1"

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` now and was not returned before in this process."""
    with _lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no new free TCP port on {host} after 1000 tries")
