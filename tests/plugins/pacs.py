"""Pytest fixtures for the real local PACS (Orthanc) and dcmtk's storescp.

Registered by the root conftest (`pytest_plugins = ["tests.plugins.pacs"]`). Missing tools skip the tests that need
them on a developer machine, but fail them when CI=true: a CI image without Orthanc must not pass by skipping.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from stack.dcmtk import StoreSCP, find_tool
from stack.orthanc import OrthancServer, find_dicomweb_plugin, find_orthanc
from stack.studies import StudySpec, iter_instances

ORTHANC_USER = "satset"
ORTHANC_PASSWORD = "satset-test-password"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
    """Skip (developer machine) or fail (CI=true) when a tool the test needs is not installed."""
    if available:
        return
    if _in_ci():
        pytest.fail(f"{what} is required in CI but not installed", pytrace=False)
    pytest.skip(f"{what} not installed")


def require_dcmtk(tool: str) -> Path:
    """The dcmtk executable `tool` (storescp, storescu, ...): skipped without it on a developer machine, failed in
    CI, like Orthanc and the databases."""
    found = find_tool(tool)
    require(found is not None, f"dcmtk {tool} (Debian package 'dcmtk')")
    assert found is not None
    return found


def require_orthanc() -> None:
    require(find_orthanc() is not None, "Orthanc (Debian package 'orthanc')")
    require(find_dicomweb_plugin() is not None, "Orthanc DICOMweb plugin (Debian package 'orthanc-dicomweb')")
    require(find_tool("gcc") is not None, "gcc (builds the loopback bind shim)")


@pytest.fixture(scope="session")
def orthanc(request: pytest.FixtureRequest) -> Iterator[OrthancServer]:
    """One Orthanc for the session, with Basic auth (ORTHANC_USER / ORTHANC_PASSWORD) and the DICOMweb plugin.

    Shared by every test: upload through `upload_study`, which removes what it stored, and search by the unique
    accession number it assigns. Its log is kept (path printed) when a test of the session failed.
    """
    require_orthanc()
    server = OrthancServer(users={ORTHANC_USER: ORTHANC_PASSWORD})
    server.start()
    yield server
    failed = request.session.testsfailed > 0
    server.stop(keep_log=failed)
    if failed:
        print(f"\nOrthanc log kept: {server.log_path}")


@dataclass
class UploadedStudy:
    """A generated study as stored in Orthanc: the spec, every instance as sent, and Orthanc's study id."""

    spec: StudySpec
    instances: list[Dataset]
    orthanc_study_id: str
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def study_instance_uid(self) -> str:
        return self.spec.study_instance_uid

    @property
    def accession_number(self) -> str:
        return self.spec.accession_number

    @property
    def by_sop_uid(self) -> dict[str, Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in self.instances}


UploadStudy = Callable[..., UploadedStudy]


def unique_accession() -> str:
    """An accession number no other test uses (SH: at most 16 characters)."""
    return "T" + uuid.uuid4().hex[:15].upper()


@pytest.fixture
def upload_study(orthanc: OrthancServer) -> Iterator[UploadStudy]:
    """Factory: `upload_study(spec=None, **StudySpec fields)` stores a generated study and returns UploadedStudy.

    Without a spec the accession number is unique to the call. Every study stored is deleted after the test.
    """
    stored: list[str] = []

    def upload(spec: StudySpec | None = None, **fields: Any) -> UploadedStudy:
        if spec is None:
            fields.setdefault("accession_number", unique_accession())
            spec = StudySpec(**fields)
        elif fields:
            raise TypeError("pass either a StudySpec or StudySpec fields, not both")
        instances = list(iter_instances(spec))
        answers = orthanc.upload(instances)
        study_ids = {answer["ParentStudy"] for answer in answers}
        stored.extend(study_ids)
        (study_id,) = study_ids
        return UploadedStudy(spec, instances, study_id, answers)

    yield upload
    for study_id in stored:
        orthanc.delete_study(study_id)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp (AE STORESCP) on a free 127.0.0.1 port, writing to tmp_path/"received"."""
    require_dcmtk("storescp")
    with StoreSCP(tmp_path / "received") as scp:
        yield scp


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket LISTENing on `port`, read from /proc/net/tcp and tcp6 (Linux)."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port and len(address) == width:
                found.add(_decode_address(address))
    return found


def _decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))
