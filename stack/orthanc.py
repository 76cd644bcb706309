"""A real Orthanc PACS as a plain child process, for tests, the demo and the benchmarks.

Orthanc 1.10 with the DICOMweb plugin answers QIDO-RS, WADO-RS and STOW-RS like dcm4chee does, starts in about
0.1 s and needs no container. Each server gets its own temp storage, free ports, the loopback shim (it cannot be told
to listen on 127.0.0.1 only) and TCP_NODELAY=1 (Debian's dcmtk otherwise stalls every C-STORE on Nagle).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from stack.loopback import loopback_env
from stack.ports import LOOPBACK, free_port

DEFAULT_BINARY = "/usr/sbin/Orthanc"
DEFAULT_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

Modality = tuple[str, str, int] | Mapping[str, Any]
"""A DicomModalities entry: (AET, host, port) or Orthanc's own object form ({"AET": .., "Host": .., "Port": ..})."""


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered a management request with an error."""


def find_orthanc() -> Path | None:
    """The Orthanc binary: $SATSET_ORTHANC_BIN, `Orthanc` on PATH, or Debian's /usr/sbin/Orthanc."""
    for candidate in (os.environ.get("SATSET_ORTHANC_BIN"), shutil.which("Orthanc"), DEFAULT_BINARY):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin: $SATSET_ORTHANC_DICOMWEB_PLUGIN or Debian's orthanc-dicomweb path."""
    candidate = os.environ.get("SATSET_ORTHANC_DICOMWEB_PLUGIN") or DEFAULT_DICOMWEB_PLUGIN
    return Path(candidate) if Path(candidate).exists() else None


class OrthancServer:
    """Start Orthanc on free 127.0.0.1 ports; stop it (and remove its temp storage) on exit.

    `users` turns HTTP Basic auth on (the first user is `auth`); `modalities` fills DicomModalities so Orthanc can
    C-STORE to a receiver; `storage_dir` keeps the database somewhere chosen by the caller (not removed on stop).
    The log is kept when the server fails to start or the `with` block raised, and its path is in the error.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        modalities: Mapping[str, Modality] | None = None,
        aet: str = "ORTHANC",
        storage_dir: Path | None = None,
        http_port: int | None = None,
        dicom_port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        binary: Path | None = None,
        plugin: Path | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self._users = dict(users or {})
        self._modalities = dict(modalities or {})
        self._aet = aet
        self._given_storage = storage_dir
        self._fixed_http_port = http_port
        self._fixed_dicom_port = dicom_port
        self._extra_config = dict(extra_config or {})
        self._binary = binary
        self._plugin = plugin
        self._start_timeout_s = start_timeout_s
        self._http_port = 0
        self._dicom_port = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(keep_log=exc_type is not None)

    def start(self) -> None:
        """Start Orthanc and return once GET /system answers; retried on fresh ports if a port was taken meanwhile."""
        if self._process is not None:
            raise OrthancError("Orthanc is already running")
        binary = self._binary or find_orthanc()
        if binary is None:
            raise OrthancError(
                "Orthanc binary not found (install the Debian package 'orthanc' or set SATSET_ORTHANC_BIN)"
            )
        plugin = self._plugin or find_dicomweb_plugin()
        if plugin is None:
            raise OrthancError(
                "Orthanc DICOMweb plugin not found (install 'orthanc-dicomweb' or set SATSET_ORTHANC_DICOMWEB_PLUGIN)"
            )
        self._workdir = Path(tempfile.mkdtemp(prefix="satset-orthanc-"))
        fixed_ports = self._fixed_http_port is not None and self._fixed_dicom_port is not None
        attempts = 1 if fixed_ports else 3
        for attempt in range(1, attempts + 1):
            self._http_port = self._fixed_http_port or free_port()
            self._dicom_port = self._fixed_dicom_port or free_port()
            config_path = self._workdir / "orthanc.json"
            config_path.write_text(json.dumps(self._config(plugin), indent=2))
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [str(binary), str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=loopback_env(),
                    start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which then stops Orthanc
                )
            try:
                self._wait_ready()
                return
            except OrthancError:
                exited = self._process.poll() is not None
                self._kill()
                if not exited or attempt == attempts:
                    raise

    def stop(self, *, keep_log: bool = False, graceful: bool | None = None) -> int | None:
        """Stop Orthanc and return its exit code (-9 when killed); remove the temp storage, and the log unless
        `keep_log` or Orthanc exited abnormally.

        A graceful stop (SIGTERM) takes Orthanc 1.10 about 3.5 s, spent in its server loops. It is the default only
        for a caller's `storage_dir`; a temp database is thrown away, so it is SIGKILLed at once.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        if graceful is None:
            graceful = self._given_storage is not None
        returncode = self._kill(graceful=graceful)
        if self._workdir is not None:
            expected = (None, 0) if graceful else (None, 0, -signal.SIGKILL)
            if keep_log or returncode not in expected:
                shutil.rmtree(self._workdir / "db", ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
        return returncode

    def _kill(self, *, graceful: bool = False) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            if graceful:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
            else:
                process.kill()
            process.wait()
        return process.returncode

    def _config(self, plugin: Path) -> dict[str, Any]:
        storage = str(self._given_storage or (self._workdir / "db"))  # type: ignore[operator]
        config: dict[str, Any] = {
            "Name": "SATSET-TEST-PACS",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "Plugins": [str(plugin)],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self._http_port,
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self._users),
            "RegisteredUsers": self._users,
            "DicomServerEnabled": True,
            "DicomAet": self._aet,
            "DicomPort": self._dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "OverwriteInstances": True,
            "DicomModalities": {name: _modality(entry) for name, entry in self._modalities.items()},
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"{LOOPBACK}:{self._http_port}",
                "Ssl": False,
            },
        }
        config.update(self._extra_config)
        return config

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        with httpx.Client(auth=self.auth, timeout=2.0) as probe:
            while True:
                if self._process.poll() is not None:
                    raise OrthancError(
                        f"Orthanc exited with code {self._process.returncode} before answering; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if probe.get(f"{self.http_url}/system").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise OrthancError(
                        f"Orthanc did not answer GET /system within {self._start_timeout_s} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.02)

    # -- where it is -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self._http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, what DCM4CHEE_URL points at for an Orthanc PACS."""
        return f"{self.http_url}/dicom-web"

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def aet(self) -> str:
        return self._aet

    @property
    def auth(self) -> tuple[str, str] | None:
        """(user, password) of the first registered user, or None when auth is off."""
        return next(iter(self._users.items()), None)

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise OrthancError("Orthanc has not been started")
        return self._workdir / "orthanc.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- REST helpers ------------------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        """One keep-alive httpx client on the REST API, authenticated as the first user."""
        if self._client is None:
            if not self.running:
                raise OrthancError("Orthanc is not running")
            # Orthanc closes a keep-alive connection after 1 s idle; reusing one that old races that close and
            # fails with "Server disconnected without sending a response". Drop idle connections well before.
            limits = httpx.Limits(keepalive_expiry=0.5)
            self._client = httpx.Client(base_url=self.http_url, auth=self.auth, timeout=60.0, limits=limits)
        return self._client

    def upload(self, items: Iterable[Path | str | Dataset]) -> list[dict[str, Any]]:
        """Store Part-10 files (directories are walked) or datasets via REST POST /instances; return Orthanc's
        answers ({"ID", "ParentStudy", "Status", ...}), one per instance. About 330 CT slices/s on one client."""
        answers = []
        for body in _bodies(items):
            response = self.client.post("/instances", content=body, headers={"Content-Type": "application/dicom"})
            if response.status_code != 200:
                raise OrthancError(f"POST /instances answered {response.status_code}: {response.text[:200]}")
            answers.append(response.json())
        return answers

    def study_ids(self) -> list[str]:
        """Orthanc's own study identifiers (not Study Instance UIDs)."""
        response = self.client.get("/studies")
        response.raise_for_status()
        return list(response.json())

    def study_count(self) -> int:
        return len(self.study_ids())

    def delete_study(self, orthanc_study_id: str) -> None:
        response = self.client.delete(f"/studies/{orthanc_study_id}")
        if response.status_code not in (200, 404):
            raise OrthancError(f"DELETE /studies/{orthanc_study_id} answered {response.status_code}")

    def delete_all(self) -> None:
        for study_id in self.study_ids():
            self.delete_study(study_id)


def _modality(entry: Modality) -> Any:
    if isinstance(entry, tuple):
        aet, host, port = entry
        return {"AET": aet, "Host": host, "Port": port}
    return dict(entry)


def _bodies(items: Iterable[Path | str | Dataset]) -> Iterable[bytes]:
    for item in items:
        if isinstance(item, Dataset):
            buffer = BytesIO()
            dcmwrite(buffer, item, enforce_file_format=True)
            yield buffer.getvalue()
            continue
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield child.read_bytes()
        else:
            yield path.read_bytes()
