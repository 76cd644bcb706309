"""The local PACS: a real Orthanc on 127.0.0.1 with DICOMweb and Basic auth, started and stopped per need."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from stack import loopback
from stack.dcmtk import find_tool
from stack.loopback import loopback_env, shim_path
from stack.orthanc import OrthancError, OrthancServer
from stack.ports import LOOPBACK, free_port
from stack.studies import StudySpec, write_study
from tests.plugins.pacs import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    UploadStudy,
    listening_addresses,
    require,
    require_orthanc,
)

pytestmark = pytest.mark.integration


def test_answers_system_with_credentials(orthanc: OrthancServer) -> None:
    response = httpx.get(f"{orthanc.http_url}/system", auth=(ORTHANC_USER, ORTHANC_PASSWORD))

    assert response.status_code == 200
    assert response.json()["DicomAet"] == orthanc.aet
    assert response.json()["DicomPort"] == orthanc.dicom_port
    assert orthanc.dicomweb_url == f"{orthanc.http_url}/dicom-web"


def test_listens_on_loopback_only(orthanc: OrthancServer) -> None:
    assert listening_addresses(orthanc.http_port) == {LOOPBACK}
    assert listening_addresses(orthanc.dicom_port) == {LOOPBACK}


@pytest.mark.parametrize("auth", [None, (ORTHANC_USER, "wrong"), ("nobody", ORTHANC_PASSWORD)])
def test_refuses_requests_without_valid_credentials(orthanc: OrthancServer, auth: tuple[str, str] | None) -> None:
    assert httpx.get(f"{orthanc.http_url}/system", auth=auth).status_code == 401
    assert httpx.get(f"{orthanc.dicomweb_url}/studies", auth=auth).status_code == 401


def test_stores_a_generated_study_found_by_qido(orthanc: OrthancServer, upload_study: UploadStudy) -> None:
    study = upload_study(series=2, instances_per_series=3)

    response = httpx.get(
        f"{orthanc.dicomweb_url}/studies",
        params={"AccessionNumber": study.accession_number},
        auth=orthanc.auth,
    )

    assert response.status_code == 200
    (found,) = response.json()
    assert found["0020000D"]["Value"] == [study.study_instance_uid]
    assert found["00201208"]["Value"] == [6]  # NumberOfStudyRelatedInstances


def test_upload_cleanup_leaves_no_study_behind(orthanc: OrthancServer, upload_study: UploadStudy) -> None:
    before = set(orthanc.study_ids())
    study = upload_study()

    assert set(orthanc.study_ids()) == before | {study.orthanc_study_id}
    orthanc.delete_study(study.orthanc_study_id)
    assert set(orthanc.study_ids()) == before


def test_own_server_uploads_files_deletes_all_and_stops_gracefully(tmp_path: Path) -> None:
    require_orthanc()
    paths = write_study(StudySpec(series=1, instances_per_series=4), tmp_path / "study")
    server = OrthancServer()  # no users: authentication off
    server.start()
    try:
        workdir = server.log_path.parent
        answers = server.upload([tmp_path / "study"])
        assert len(answers) == len(paths)
        assert {answer["Status"] for answer in answers} == {"Success"}
        assert server.study_count() == 1
        server.delete_all()
        assert server.study_count() == 0
        http_port, process_id = server.http_port, server.pid
    finally:
        returncode = server.stop(graceful=True)

    assert returncode == 0
    assert not server.running
    assert process_id is not None and not _process_exists(process_id)
    assert listening_addresses(http_port) == set()
    assert not workdir.exists()


def test_exit_before_ready_reports_the_log_tail() -> None:
    require_orthanc()
    with socket.socket() as occupied:
        occupied.bind((LOOPBACK, 0))
        occupied.listen()
        taken = occupied.getsockname()[1]
        server = OrthancServer(http_port=taken, dicom_port=free_port())

        with pytest.raises(OrthancError, match=r"exited with code") as raised:
            server.start()

    assert str(taken) in str(raised.value)  # Orthanc's own log line naming the port it could not bind
    assert server.log_path.exists()  # kept for debugging
    server.stop()


def test_default_stop_kills_a_throwaway_server_and_removes_its_files() -> None:
    require_orthanc()
    server = OrthancServer()
    server.start()
    workdir, http_port, dicom_port = server.log_path.parent, server.http_port, server.dicom_port

    server.stop()

    assert not server.running
    assert listening_addresses(http_port) == listening_addresses(dicom_port) == set()
    assert not workdir.exists()


def test_log_is_kept_when_the_with_block_fails() -> None:
    require_orthanc()
    with pytest.raises(RuntimeError, match="boom"), OrthancServer() as server:
        raise RuntimeError("boom")

    assert "Orthanc has started" in server.log_path.read_text()
    assert not (server.log_path.parent / "db").exists()
    shutil.rmtree(server.log_path.parent)


def _process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


# -- the pieces every local server uses: free ports and the loopback shim ----------------------------------------


def test_free_port_never_repeats_within_the_process() -> None:
    ports = [free_port() for _ in range(200)]

    assert len(set(ports)) == len(ports)


_BIND_PROBE = """
import socket, sys
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    with socket.socket(family) as listener:
        listener.bind((host, int(sys.argv[1]) if family == socket.AF_INET else int(sys.argv[2])))
        print(listener.getsockname()[0])
with socket.socket() as outgoing:
    outgoing.bind(("0.0.0.0", 0))
    print(outgoing.getsockname()[0])
"""


def test_loopback_shim_rewrites_wildcard_listening_addresses() -> None:
    require(find_tool("gcc") is not None, "gcc (builds the loopback bind shim)")
    args = [sys.executable, "-c", _BIND_PROBE, str(free_port()), str(free_port())]

    with_shim = subprocess.run(args, env=loopback_env(), capture_output=True, text=True, check=True).stdout.split()
    without = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()

    assert with_shim == ["127.0.0.1", "::1", "0.0.0.0"]  # port 0 (an outgoing socket) is left alone
    assert without == ["0.0.0.0", "::", "0.0.0.0"]


def test_loopback_shim_is_built_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require(find_tool("gcc") is not None, "gcc (builds the loopback bind shim)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    first = shim_path()
    built_at = first.stat().st_mtime_ns
    second = shim_path()

    assert first == second
    assert first.parent == tmp_path / "satset"
    assert second.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no build leftovers


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(loopback.shutil, "which", lambda name: None)

    with pytest.raises(loopback.ShimBuildError, match="install gcc"):
        shim_path()
