"""Which TCP sockets a process tree listens on, read from /proc (Linux), without psutil.

`listeners(root_pid)` walks the process and its descendants, collects the socket inodes of their open file
descriptors, and matches them with the LISTEN rows of /proc/net/tcp and tcp6. A listener of a child started in a
new session (the demo's `satset serve` and `satset api`) or of a grandchild (the Prefect server under its CLI) is
found as well: what decides is the parent chain, not the process group.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    address: str
    port: int

    def __str__(self) -> str:
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return f"{shown}:{self.port} (pid {self.pid}: {self.command})"


def descendants(root: int) -> set[int]:
    """`root` and every process whose parent chain leads to it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:160]


def _decode(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word in host order
    return str(ipaddress.ip_address(words))


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != LISTEN:
                continue
            address, port = fields[1].rsplit(":", 1)
            found[int(fields[9])] = (_decode(address), int(port, 16))
    return found


def listeners(root: int | None = None) -> list[Listener]:
    """Every TCP listener of `root` (default: this process) and its descendants."""
    listening = _listening_inodes()
    found = []
    for pid in sorted(descendants(os.getpid() if root is None else root)):
        for inode in _socket_inodes(pid):
            if inode in listening:
                address, port = listening[inode]
                found.append(Listener(pid, _command(pid), address, port))
    return found


def exposed(found: list[Listener]) -> list[Listener]:
    """The listeners not bound to a loopback address (0.0.0.0, ::, a LAN address, ::ffff:127.0.0.1 ...)."""
    return [listener for listener in found if not ipaddress.ip_address(listener.address).is_loopback]
