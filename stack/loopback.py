"""An LD_PRELOAD shim that makes servers listen on loopback only.

Orthanc 1.10 and dcmtk 3.6.7's storescp have no bind-address option: they listen on 0.0.0.0, which would expose a
test PACS (with its test password) to the network. The shim wraps bind(): a listening address of 0.0.0.0 becomes
127.0.0.1 and :: becomes ::1. Binds to port 0 (outgoing sockets that bind before connect) are left alone, so the
process can still reach other hosts. The shared object is built once per source version and cached per user.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    }
    if (addr != NULL && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY) && in4.sin_port != 0) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, (socklen_t)sizeof in4);
        }
    } else if (addr != NULL && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr) && in6.sin6_port != 0) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, (socklen_t)sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
"""

_GCC_FLAGS = ("-shared", "-fPIC", "-O2", "-Wall")
_lock = threading.Lock()


class ShimBuildError(RuntimeError):
    """The loopback shim could not be built (gcc missing or failing)."""


def cache_dir() -> Path:
    """Per-user cache directory: $XDG_CACHE_HOME/satset or ~/.cache/satset, else a per-uid temp directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    candidate = Path(base) / "satset"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"satset-cache-{os.getuid()}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    return fallback


def shim_path() -> Path:
    """Path of the built shim, building it first if this source version is not cached yet."""
    key = hashlib.sha256("\0".join((SHIM_SOURCE, *_GCC_FLAGS, platform.machine())).encode()).hexdigest()[:16]
    target = cache_dir() / f"bind_loopback-{key}.so"
    with _lock:
        if not target.exists():
            _build(target)
    return target


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) with the shim prepended to LD_PRELOAD and TCP_NODELAY=1.

    TCP_NODELAY=1 turns Nagle off in Debian's dcmtk (storescu, storescp and Orthanc's DICOM side); without it each
    C-STORE stalls about 45 ms on delayed ACKs (see bench/RESULTS.md §5.1).
    """
    result = dict(os.environ if env is None else env)
    preload = result.get("LD_PRELOAD", "")
    result["LD_PRELOAD"] = f"{shim_path()} {preload}".strip()
    result["TCP_NODELAY"] = "1"
    return result


def _build(target: Path) -> None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise ShimBuildError(
            "gcc is required to build the loopback bind shim for Orthanc/storescp; install gcc "
            "(Debian/Ubuntu: apt-get install gcc)"
        )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        source = Path(work) / "bind_loopback.c"
        source.write_text(SHIM_SOURCE)
        built = Path(work) / target.name
        result = subprocess.run(
            [gcc, *_GCC_FLAGS, "-o", str(built), str(source), "-ldl"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ShimBuildError(f"building the loopback bind shim failed ({gcc}):\n{result.stderr.strip()}")
        os.replace(built, target)  # atomic: a concurrent builder sees either no file or a complete one
