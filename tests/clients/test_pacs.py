"""PacsClient against a real Orthanc (DICOMweb) and, for answers Orthanc never gives, a scripted HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import pytest
from pydicom import dcmread

from clients.errors import (
    AmbiguousStudy,
    AuthenticationRejected,
    ConnectionFailed,
    RateLimited,
    Rejected,
    StudyNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from clients.pacs import InstanceRef, PacsClient, RetrievePer, StudyRef, _PartCutter
from models.settings import Settings
from stack.orthanc import OrthancServer
from stack.ports import LOOPBACK
from stack.studies import StudySpec, iter_instances
from tests.plugins.pacs import ORTHANC_PASSWORD, ORTHANC_USER, UploadStudy, require_orthanc, unique_accession

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def pacs(orthanc: OrthancServer) -> Iterator[PacsClient]:
    """A client on the session's Orthanc, with the default retrieval (one request per series)."""
    with PacsClient(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, timeout=30) as client:
        yield client


@pytest.fixture(params=["series", "instance"])
def retrieving_pacs(request: pytest.FixtureRequest, orthanc: OrthancServer) -> Iterator[PacsClient]:
    """A client on the session's Orthanc, once per retrieval mode."""
    retrieve_per: RetrievePer = request.param
    with PacsClient(
        orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, timeout=30, retrieve_per=retrieve_per
    ) as client:
        yield client


# -- find_study ----------------------------------------------------------------------------------------------------


def test_find_study_by_accession_number(pacs: PacsClient, upload_study: UploadStudy) -> None:
    study = upload_study(series=2, instances_per_series=3, modality="MR")

    found = pacs.find_study(accession_number=study.accession_number)

    assert found == StudyRef(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        number_of_instances=6,
        modalities=("MR",),
    )


def test_find_study_by_study_instance_uid(pacs: PacsClient, upload_study: UploadStudy) -> None:
    study = upload_study()

    found = pacs.find_study(study_instance_uid=study.study_instance_uid)

    assert found.study_instance_uid == study.study_instance_uid
    assert found.accession_number == study.accession_number


def test_find_study_by_both_must_match_both(pacs: PacsClient, upload_study: UploadStudy) -> None:
    study, other = upload_study(), upload_study()

    found = pacs.find_study(accession_number=study.accession_number, study_instance_uid=study.study_instance_uid)
    assert found.study_instance_uid == study.study_instance_uid
    with pytest.raises(StudyNotFound):
        pacs.find_study(accession_number=study.accession_number, study_instance_uid=other.study_instance_uid)


def test_unknown_accession_number_is_study_not_found(pacs: PacsClient, orthanc: OrthancServer) -> None:
    accession = unique_accession()

    with pytest.raises(StudyNotFound, match=accession) as raised:
        pacs.find_study(accession_number=accession)

    assert raised.value.service == "pacs"


def test_unknown_study_instance_uid_is_study_not_found(pacs: PacsClient) -> None:
    with pytest.raises(StudyNotFound, match=r"1\.2\.3\.4\.5"):
        pacs.find_study(study_instance_uid="1.2.3.4.5")


def test_accession_number_shared_by_two_studies_is_rejected(pacs: PacsClient, upload_study: UploadStudy) -> None:
    first = upload_study()
    second = upload_study(accession_number=first.accession_number)

    with pytest.raises(AmbiguousStudy, match="2 studies") as raised:
        pacs.find_study(accession_number=first.accession_number)

    assert not isinstance(raised.value, StudyNotFound)
    assert first.study_instance_uid in raised.value.message
    assert second.study_instance_uid in raised.value.message


def test_accession_numbers_match_exactly(pacs: PacsClient, upload_study: UploadStudy) -> None:
    study = upload_study(accession_number=unique_accession()[:15] + "a")

    # Orthanc matches AccessionNumber case-insensitively; the gateway must not take a study for another order.
    with pytest.raises(StudyNotFound):
        pacs.find_study(accession_number=study.accession_number.upper())


def test_a_malformed_study_instance_uid_is_rejected_before_any_request(pacs: PacsClient) -> None:
    with pytest.raises(Rejected, match="not a DICOM UID"):
        pacs.find_study(study_instance_uid="1.2.3/../../system")


# -- list_instances ------------------------------------------------------------------------------------------------


def test_list_instances(pacs: PacsClient, upload_study: UploadStudy) -> None:
    study = upload_study(series=2, instances_per_series=3)

    instances = pacs.list_instances(study.study_instance_uid)

    expected = {
        InstanceRef(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=CT_IMAGE_STORAGE,
            transfer_syntax_uid=None,  # Orthanc does not report AvailableTransferSyntaxUID
        )
        for ds in study.instances
    }
    assert len(instances) == 6
    assert set(instances) == expected


def test_list_instances_of_an_unknown_study_is_study_not_found(pacs: PacsClient) -> None:
    with pytest.raises(StudyNotFound):
        pacs.list_instances("1.2.3.4.5.6")


# -- iter_instances ------------------------------------------------------------------------------------------------


def test_study_metadata_gives_every_instances_preflight_elements_as_text(
    pacs: PacsClient, orthanc: OrthancServer
) -> None:
    spec = StudySpec(series=1, instances_per_series=3, accession_number=unique_accession())
    instances = list(iter_instances(spec))
    instances[0].InstanceNumber = -3
    del instances[1].InstanceNumber
    instances[2].StudyTime = ""
    answers = orthanc.upload(instances)
    try:
        metadata = {values["SOPInstanceUID"]: values for values in pacs.study_metadata(spec.study_instance_uid)}
    finally:
        orthanc.delete_study(answers[0]["ParentStudy"])

    first, second, third = (metadata[str(ds.SOPInstanceUID)] for ds in instances)
    assert first["InstanceNumber"] == "-3"
    assert "InstanceNumber" not in second, "absent stays absent"
    assert third["StudyTime"] == "", "present without a value is empty"
    assert (first["Modality"], first["SeriesNumber"], first["StudyTime"]) == ("CT", "1", "120000")
    assert first["SOPClassUID"] == CT_IMAGE_STORAGE and first["StudyInstanceUID"] == spec.study_instance_uid


def test_study_metadata_of_an_unknown_study_is_study_not_found(pacs: PacsClient) -> None:
    with pytest.raises(StudyNotFound):
        pacs.study_metadata("1.2.3.4.5.6.7.8.9.10")


def test_iter_instances_yields_every_instance_with_its_pixel_data(
    retrieving_pacs: PacsClient, upload_study: UploadStudy
) -> None:
    study = upload_study(series=3, instances_per_series=4, rows=128, columns=96)
    sent = study.by_sop_uid

    received = list(retrieving_pacs.iter_instances(study.study_instance_uid))

    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(sent)
    for ds in received:
        original = sent[str(ds.SOPInstanceUID)]
        assert ds.PixelData == original.PixelData
        assert (ds.Rows, ds.Columns) == (128, 96)
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
        assert ds.AccessionNumber == study.accession_number
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_iter_instances_of_an_unknown_study_is_study_not_found(retrieving_pacs: PacsClient) -> None:
    with pytest.raises(StudyNotFound):
        next(retrieving_pacs.iter_instances("1.2.3.4.5.6.7"))


def test_abandoning_the_iteration_leaves_the_client_usable(
    retrieving_pacs: PacsClient, upload_study: UploadStudy
) -> None:
    study = upload_study(series=1, instances_per_series=5)
    iterator = retrieving_pacs.iter_instances(study.study_instance_uid)
    next(iterator)

    iterator.close()  # what a failed send does to the stream

    assert len(list(retrieving_pacs.iter_instances(study.study_instance_uid))) == 5


def test_iter_instance_files_yields_the_stored_files(retrieving_pacs: PacsClient, upload_study: UploadStudy) -> None:
    study = upload_study(series=2, instances_per_series=3, rows=128, columns=96)
    sent = study.by_sop_uid

    files = list(retrieving_pacs.iter_instance_files(study.study_instance_uid))

    assert all(isinstance(part10, bytes) and part10[128:132] == b"DICM" for part10 in files)
    received = [dcmread(BytesIO(part10)) for part10 in files]
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(sent)
    for ds in received:
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData


def test_iter_instance_files_takes_the_series_from_the_listing(
    retrieving_pacs: PacsClient, upload_study: UploadStudy
) -> None:
    study = upload_study(series=3, instances_per_series=2)
    listed = retrieving_pacs.list_instances(study.study_instance_uid)
    one_series = [ref for ref in listed if ref.series_instance_uid == listed[0].series_instance_uid]

    files = list(retrieving_pacs.iter_instance_files(study.study_instance_uid, listed=one_series))

    assert sorted(str(dcmread(BytesIO(f)).SOPInstanceUID) for f in files) == sorted(
        r.sop_instance_uid for r in one_series
    )


# -- authentication, connection, settings --------------------------------------------------------------------------


def test_wrong_password_is_rejected_without_leaking_it(orthanc: OrthancServer, upload_study: UploadStudy) -> None:
    study = upload_study()
    client = PacsClient(orthanc.dicomweb_url, username=ORTHANC_USER, password="not-the-password-42")

    with pytest.raises(AuthenticationRejected, match="authentication failed for the PACS") as raised:
        client.find_study(accession_number=study.accession_number)

    assert not isinstance(raised.value, StudyNotFound)
    assert raised.value.service == "pacs"
    assert "not-the-password-42" not in str(raised.value)
    assert "not-the-password-42" not in str(raised.value.__cause__)


def test_credentials_in_the_url_become_basic_auth(orthanc: OrthancServer, upload_study: UploadStudy) -> None:
    study = upload_study()
    root = orthanc.dicomweb_url.replace("http://", f"http://{ORTHANC_USER}:{ORTHANC_PASSWORD}@")
    client = PacsClient(root)

    assert client.find_study(accession_number=study.accession_number).study_instance_uid == study.study_instance_uid
    assert ORTHANC_PASSWORD not in client.root
    with pytest.raises(StudyNotFound) as raised:
        client.find_study(accession_number=unique_accession())
    assert ORTHANC_PASSWORD not in str(raised.value)


def test_stopped_pacs_is_connection_failed() -> None:
    require_orthanc()
    with OrthancServer(users={"u": "p"}) as server:
        client = PacsClient(server.dicomweb_url, username="u", password="p", timeout=5)
        with pytest.raises(StudyNotFound):  # reachable while it runs
            client.find_study(study_instance_uid="1.2.3")
    with pytest.raises(ConnectionFailed) as raised:
        client.find_study(study_instance_uid="1.2.3")

    assert raised.value.service == "pacs"


def test_from_settings(orthanc: OrthancServer, upload_study: UploadStudy) -> None:
    study = upload_study()
    settings = Settings(
        DCM4CHEE_URL=orthanc.dicomweb_url + "/",
        PACS_USERNAME=ORTHANC_USER,
        PACS_PASSWORD=ORTHANC_PASSWORD,
        PACS_TIMEOUT_S=12,
        ROUTER_IP="127.0.0.1",
        SS_AUTH_URL="http://127.0.0.1:9/oauth2/v1",
        SS_BASE_URL="http://127.0.0.1:9/fhir-r4/v1",
        SS_ORG_ID="ORG1",
        SS_CLIENT_ID="client",
        SS_CLIENT_SECRET="secret",
    )

    with PacsClient.from_settings(settings) as client:
        assert client.root == orthanc.dicomweb_url
        assert client.find_study(accession_number=study.accession_number).number_of_instances == 6


# -- answers Orthanc does not give: a scripted DICOMweb server -----------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"[]"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/dicom+json"})
    hang: bool = False  # never answer (until the test ends)


class ScriptedPacs:
    """An HTTP server on 127.0.0.1 that answers each request with the next scripted Reply and records the paths."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[str] = []
        self.release = threading.Event()
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                script.requests.append(self.path)
                reply = script.replies[min(len(script.requests), len(script.replies)) - 1]
                if reply.hang:
                    script.release.wait(10)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.root = f"http://{LOOPBACK}:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[type[ScriptedPacs]]:
    servers: list[ScriptedPacs] = []

    class Factory(ScriptedPacs):
        def __init__(self, replies: list[Reply]) -> None:
            super().__init__(replies)
            servers.append(self)

    yield Factory
    for server in servers:
        server.close()


def _instance_json(series: str, sop: str) -> dict[str, dict[str, object]]:
    return {
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080016": {"vr": "UI", "Value": [CT_IMAGE_STORAGE]},
        "00083002": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.90"]},
    }


def test_503_raises_upstream_unavailable_after_one_request(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(503, b"busy", {"Content-Type": "text/plain"})])

    with pytest.raises(UpstreamUnavailable) as raised:
        PacsClient(server.root).find_study(accession_number="A1")

    assert raised.value.status_code == 503
    assert raised.value.service == "pacs"
    assert len(server.requests) == 1  # dicomweb-client's own retry layer is off


def test_429_raises_rate_limited_with_retry_after(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(429, b"", {"Retry-After": "7"})])

    with pytest.raises(RateLimited) as raised:
        PacsClient(server.root).find_study(accession_number="A1")

    assert raised.value.retry_after == 7.0
    assert len(server.requests) == 1


def test_404_on_the_search_root_names_the_setting(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(404, b"Not Found", {"Content-Type": "text/plain"})])

    with pytest.raises(Rejected, match="DCM4CHEE_URL") as raised:
        PacsClient(server.root).find_study(accession_number="A1")

    assert not isinstance(raised.value, StudyNotFound)


def test_no_answer_within_the_timeout_is_upstream_timeout(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(hang=True)])

    with pytest.raises(UpstreamTimeout):
        PacsClient(server.root, timeout=0.2).find_study(accession_number="A1")


def test_a_body_that_is_not_dicom_json_is_upstream_unavailable(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(200, b"<html>proxy error</html>", {"Content-Type": "text/html"})])

    with pytest.raises(UpstreamUnavailable, match="not valid DICOMweb"):
        PacsClient(server.root).find_study(accession_number="A1")


def test_a_study_returned_for_a_wildcard_is_not_taken(scripted: type[ScriptedPacs]) -> None:
    answer = [{"0020000D": {"vr": "UI", "Value": ["1.2.7"]}, "00080050": {"vr": "SH", "Value": ["A12"]}}]
    server = scripted([Reply(body=json.dumps(answer).encode())])

    with pytest.raises(StudyNotFound, match=r"'A1\*'"):
        PacsClient(server.root).find_study(accession_number="A1*")


def test_list_instances_follows_the_qido_paging_warning(scripted: type[ScriptedPacs]) -> None:
    first = [_instance_json("1.2.9", f"1.2.9.{n}") for n in (1, 2)]
    second = [_instance_json("1.2.9", "1.2.9.3")]
    warning = {"Content-Type": "application/dicom+json", "Warning": "299 pacs: There are 1 additional results"}
    server = scripted(
        [Reply(body=json.dumps(first).encode(), headers=warning), Reply(body=json.dumps(second).encode())]
    )

    instances = PacsClient(server.root).list_instances("1.2.8")

    assert [ref.sop_instance_uid for ref in instances] == ["1.2.9.1", "1.2.9.2", "1.2.9.3"]
    assert {ref.transfer_syntax_uid for ref in instances} == {"1.2.840.10008.1.2.4.90"}
    assert len(server.requests) == 2
    assert "offset=2" in server.requests[1]


def test_a_server_ignoring_offset_does_not_loop_forever(scripted: type[ScriptedPacs]) -> None:
    page = [_instance_json("1.2.9", "1.2.9.1")]
    warning = {"Content-Type": "application/dicom+json", "Warning": "299 pacs: There are more results"}
    server = scripted([Reply(body=json.dumps(page).encode(), headers=warning)])

    instances = PacsClient(server.root).list_instances("1.2.8")

    assert [ref.sop_instance_uid for ref in instances] == ["1.2.9.1"]
    assert len(server.requests) == 2


# -- WADO-RS multipart answers, cut by the client itself ----------------------------------------------------------


def multipart(parts: list[bytes], boundary: str = "b0undary", *, preamble: bytes = b"", close: bool = True) -> Reply:
    body = preamble
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"'}
    return Reply(body=body, headers=headers)


def series_json(series: str) -> bytes:
    return json.dumps([{"0020000E": {"vr": "UI", "Value": [series]}}]).encode()


def test_multipart_parts_are_cut_exactly(scripted: type[ScriptedPacs]) -> None:
    """Bodies containing CRLFs, dashes and the boundary's prefix come back byte for byte."""
    bodies = [b"\r\n--b0undar\r\n\r\n" * 3, b"-" * 5000, b"x", b"\r\n"]
    server = scripted([Reply(body=series_json("1.2.9")), multipart(bodies, preamble=b"ignored preamble\r\n")])

    files = list(PacsClient(server.root).iter_instance_files("1.2.8"))

    assert files == bodies
    assert server.requests[1].startswith("/dicom-web/studies/1.2.8/series/1.2.9")


# Bodies with CRLFs, dashes, the boundary's prefix, an empty one; parts with and without a header block.
TRICKY_BODIES = [b"\r\n--b0undar\r\n\r\n" * 3, b"", b"-" * 40, b"x", b"\r\n", b"b0undary--", b"\r\n\r\n"]
TRICKY_ANSWER = (
    b"preamble\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
    + b"\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n".join(TRICKY_BODIES[:-1])
    + b"\r\n--b0undary\r\n\r\n"  # the last part has no header lines at all
    + TRICKY_BODIES[-1]
    + b"\r\n--b0undary--\r\n"
)


def cut(answer: bytes, chunk: int) -> list[bytes]:
    cutter = _PartCutter(b"b0undary")
    parts = [part for at in range(0, len(answer), chunk) for part in cutter.feed(answer[at : at + chunk])]
    cutter.finish()
    return parts


@pytest.mark.parametrize("chunk", [*range(1, 30), 64, 1 << 20])
def test_parts_are_cut_exactly_wherever_the_chunks_split_the_answer(chunk: int) -> None:
    """Every chunk size up to past the delimiter's length splits delimiters and header blocks at every offset."""
    assert cut(TRICKY_ANSWER, chunk) == TRICKY_BODIES


@pytest.mark.parametrize("chunk", [1, 1000, 1 << 20])
def test_a_long_header_block_is_read_up_to_its_limit(chunk: int) -> None:
    """Header blocks are looked for in the first KB, then up to 64 KB; past that the part is refused."""
    long_header = b"X-Note: " + b"n" * 5000 + b"\r\n"
    answer = b"--b0undary\r\n" + long_header + b"\r\nbody\r\n--b0undary--\r\n"
    assert cut(answer, chunk) == [b"body"]

    endless = b"--b0undary\r\nX-Note: " + b"n" * (70 * 1024) + b"\r\n\r\nbody\r\n--b0undary--\r\n"
    with pytest.raises(ValueError, match="header block"):
        cut(endless, chunk)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_an_answer_cut_anywhere_before_its_closing_boundary_is_refused(chunk: int) -> None:
    closing = TRICKY_ANSWER.rindex(b"--\r\n")
    for end in range(0, closing + 2, 3 if chunk == 1 else 1):
        with pytest.raises(ValueError, match="closing boundary"):
            cut(TRICKY_ANSWER[:end], chunk)


def test_a_multipart_answer_cut_short_is_upstream_unavailable(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(body=series_json("1.2.9")), multipart([b"one", b"two"], close=False)])

    with pytest.raises(UpstreamUnavailable, match="not valid DICOMweb"):
        list(PacsClient(server.root).iter_instance_files("1.2.8"))


def test_a_bare_application_dicom_answer_is_one_instance(scripted: type[ScriptedPacs]) -> None:
    server = scripted(
        [Reply(body=series_json("1.2.9")), Reply(body=b"DICOMBYTES", headers={"Content-Type": "application/dicom"})]
    )
    assert list(PacsClient(server.root).iter_instance_files("1.2.8")) == [b"DICOMBYTES"]


def test_an_html_error_page_instead_of_multipart_is_upstream_unavailable(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(body=series_json("1.2.9")), Reply(body=b"<html/>", headers={"Content-Type": "text/html"})])
    with pytest.raises(UpstreamUnavailable, match="not valid DICOMweb"):
        list(PacsClient(server.root).iter_instance_files("1.2.8"))


def test_a_retrieval_refused_with_404_is_study_not_found(scripted: type[ScriptedPacs]) -> None:
    server = scripted([Reply(body=series_json("1.2.9")), Reply(404, b"gone", {"Content-Type": "text/plain"})])
    with pytest.raises(StudyNotFound):
        list(PacsClient(server.root).iter_instance_files("1.2.8"))
