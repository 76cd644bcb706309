"""Odd FHIR answers from SATUSEHAT (or from what stands in front of it): error bodies that are not JSON, a search
that answers something other than a searchset, a searchset with several matches, and an ImagingStudy that lists
fewer instances than were sent.

The client-level cases run `SatusehatClient` on an httpx.MockTransport; the flow-level ones run batch4 against
the simulator (its router's "lose" fault) and Orthanc. Already covered elsewhere, and not repeated here:
tests/clients/test_satusehat_client.py (plain-text 504, an HTML 200, OperationOutcomes with and without
RuleNumber, adopting the newest of two matches) and tests/flows/test_resume.py (JSON 500s and plain-text 504s
ridden out, a lost response adopted, no ImagingStudy at all: sent once more, then failed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from clients.errors import FhirRejected, ImagingStudyNotReady, Rejected, Retryable, UpstreamUnavailable
from clients.satusehat import CreateResult, SatusehatClient
from flows.batches import batch4
from flows.steps import BatchFailed
from models.fhir import DICOM_UID_SYSTEM, IdentifierKind, build_encounter, identifier_system
from models.inputs import Batch4Input
from tasks import runtime
from tasks.fhir import wait_for_imaging_study
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

AUTH_BASE = "https://ss.test/oauth2/v1"
FHIR_BASE = "https://ss.test/fhir-r4/v1"
ORG_ID = "100025753"
SECRET = "client-secret-value"
TOKEN = "token-value-0001"
ENCOUNTER_SYSTEM = f"http://sys-ids.kemkes.go.id/encounter/{ORG_ID}"
PATIENT = "Patient/P00000000001"
OTHER_PATIENT = "Patient/P00000000002"

NGINX_502 = """<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""
WAF_403 = """<!DOCTYPE html><html><head><style>body { font: 12px sans-serif }</style>
<script>var token = "abc";</script></head><body><h1>Access denied</h1>
<p>Request blocked by the web application firewall &amp; logged.</p></body></html>"""


# --- a SATUSEHAT on a MockTransport ---------------------------------------------------------------------------


class Platform:
    """The token endpoint, and a FHIR handler per test; records every FHIR request."""

    def __init__(self) -> None:
        self.fhir: Callable[[httpx.Request], httpx.Response] = lambda request: httpx.Response(404)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/accesstoken"):
            return httpx.Response(200, json={"access_token": TOKEN, "expires_in": "3599"})
        self.requests.append(request)
        return self.fhir(request)

    @property
    def methods(self) -> list[str]:
        return [request.method for request in self.requests]


@pytest.fixture
def platform() -> Platform:
    return Platform()


@pytest.fixture
def client(platform: Platform) -> Iterator[SatusehatClient]:
    with SatusehatClient(
        auth_base=AUTH_BASE,
        fhir_base=FHIR_BASE,
        org_id=ORG_ID,
        client_id="client-id",
        client_secret=SECRET,
        transport=httpx.MockTransport(platform),
    ) as made:
        yield made


def encounter(id: str | None = None, subject: str = PATIENT, **extra: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Encounter",
        "identifier": [{"system": ENCOUNTER_SYSTEM, "value": "VISIT-0001"}],
        "status": "arrived",
        "subject": {"reference": subject},
        **extra,
    }
    return {**resource, "id": id} if id else resource


def updated(at: str) -> dict[str, Any]:
    return {"meta": {"versionId": "1", "lastUpdated": at}}


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    entries = [
        {"fullUrl": f"{FHIR_BASE}/Encounter/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in resources
    ]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources), "entry": entries}


def holding(platform: Platform, *existing: dict[str, Any]) -> None:
    """Searches find `existing`; a POST creates enc-new."""

    def fhir(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=searchset(*existing))
        return httpx.Response(201, json={**json.loads(request.content), "id": "enc-new"})

    platform.fhir = fhir


# --- error bodies that are not JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "content_type", "error", "detail"),
    [
        pytest.param(502, NGINX_502, "text/html", UpstreamUnavailable, "HTML page: 502 Bad Gateway", id="html-502"),
        pytest.param(
            500, "Internal Server Error\n", "text/plain", UpstreamUnavailable, "Internal Server Error", id="text-500"
        ),
        pytest.param(500, "", "text/plain", UpstreamUnavailable, "empty body", id="empty-500"),
        pytest.param(
            503,
            "<html><body><h1>Maintenance</h1></body></html>",
            None,
            UpstreamUnavailable,
            "HTML page: Maintenance",
            id="untitled-503",
        ),
        pytest.param(
            403,
            WAF_403,
            "text/html",
            FhirRejected,
            "HTML page: Access denied Request blocked by the web application firewall & logged.",
            id="html-403",
        ),
        pytest.param(400, "Bad Request", "application/json", FhirRejected, "Bad Request", id="text-labelled-json"),
    ],
)
def test_an_error_body_that_is_not_json_becomes_a_readable_error_of_the_right_kind(
    client: SatusehatClient,
    platform: Platform,
    status: int,
    body: str,
    content_type: str | None,
    error: type[Exception],
    detail: str,
) -> None:
    """5xx stays retryable and 4xx does not, whatever the body; the message says what the page said, without
    its markup, scripts or styles, and never the token or the secret."""
    headers = {"Content-Type": content_type} if content_type else {}
    platform.fhir = lambda request: httpx.Response(status, text=body, headers=headers)

    with pytest.raises(error) as raised:
        client.create(encounter())

    message = str(raised.value)
    assert message.endswith(f"POST Encounter (HTTP {status}): {detail}"), message
    assert "<" not in message and "font:" not in message and "var token" not in message
    assert TOKEN not in message and SECRET not in message
    assert isinstance(raised.value, Retryable) == (status >= 500)
    assert isinstance(raised.value, Rejected) == (status < 500)


def test_a_long_html_page_is_cut_to_a_line(client: SatusehatClient, platform: Platform) -> None:
    page = "<html><body>" + "<p>Something went wrong upstream.</p>" * 200 + "</body></html>"
    platform.fhir = lambda request: httpx.Response(502, text=page)

    with pytest.raises(UpstreamUnavailable) as raised:
        client.read("Encounter", "enc-1")

    assert len(raised.value.message) < 400 and "\n" not in raised.value.message


# --- a search answered with something that is not a searchset -------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        pytest.param(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "details": {"text": "Search failed"}}],
            },
            "an OperationOutcome, not a searchset Bundle: Search failed",
            id="operation-outcome",
        ),
        pytest.param(
            {"fault": {"faultstring": "Rate limit quota violation", "detail": {"errorcode": "policies.ratelimit"}}},
            "a JSON object without a resourceType, not a searchset Bundle: Rate limit quota violation",
            id="gateway-fault",
        ),
        pytest.param(
            {"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": {"resource": encounter("enc-1")}},
            "a Bundle whose entry is not a list",
            id="entry-not-a-list",
        ),
    ],
)
def test_a_search_answered_without_a_searchset_is_never_read_as_no_match(
    client: SatusehatClient, platform: Platform, answer: dict[str, Any], named: str
) -> None:
    """Read as "nothing matched", such an answer would make create-or-adopt post a second Encounter for a visit
    the platform holds. It is an outage (retried), and nothing is posted."""

    def fhir(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            pytest.fail("nothing may be posted after a search that did not answer")
        return httpx.Response(200, json=answer)

    platform.fhir = fhir

    with pytest.raises(UpstreamUnavailable) as raised:
        client.create_or_adopt(encounter())

    assert named in raised.value.message
    assert raised.value.message.startswith("SATUSEHAT answered the search GET Encounter with ")
    assert platform.methods == ["GET"]


# --- a searchset with several matches -------------------------------------------------------------------------


def test_of_several_matches_for_the_same_patient_the_one_updated_last_is_adopted_and_all_are_named(
    client: SatusehatClient, platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    first = encounter("enc-1", **updated("2025-08-01T06:00:00+07:00"))
    last = encounter("enc-2", **updated("2025-08-01T00:30:00+00:00"))  # 07:30 WIB
    absolute = encounter("enc-3", subject=f"{FHIR_BASE}/{PATIENT}", **updated("2025-08-01T07:00:00+07:00"))
    holding(platform, first, absolute, last)

    with caplog.at_level(logging.WARNING, logger="clients.satusehat"):
        result = client.create_or_adopt(encounter())

    assert result == CreateResult("Encounter", "enc-2", adopted=True, resource=last)
    assert platform.methods == ["GET"]
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "3 Encounter resources carry identifier" in warning and "enc-1, enc-3, enc-2" in warning
    assert warning.endswith("adopting the one updated last, enc-2")


def test_a_match_entered_in_error_is_never_adopted(client: SatusehatClient, platform: Platform) -> None:
    """How a hospital voids a duplicate: the voided one is passed over even though it was updated last."""
    kept = encounter("enc-1", **updated("2025-08-01T06:00:00+07:00"))
    voided = encounter("enc-2", **{**updated("2025-08-02T06:00:00+07:00"), "status": "entered-in-error"})
    holding(platform, voided, kept)

    assert client.create_or_adopt(encounter()).id == "enc-1"


def test_when_every_match_is_entered_in_error_a_new_resource_is_created(
    client: SatusehatClient, platform: Platform
) -> None:
    holding(platform, encounter("enc-1", status="entered-in-error"))

    result = client.create_or_adopt(encounter())

    assert (result.id, result.adopted) == ("enc-new", False)
    assert platform.methods == ["GET", "POST"]


@pytest.mark.parametrize("alongside", [False, True], ids=["alone", "among-matches-for-the-patient"])
def test_a_match_for_another_patient_is_refused_clearly_and_nothing_is_posted(
    client: SatusehatClient, platform: Platform, alongside: bool
) -> None:
    """An identifier (a visit number, an ACSN) already used for another patient: adopting that resource would
    file this patient's exam under the other one (the router links images by the ACSN's ServiceRequest), and a
    second resource with the identifier is a duplicate. Refused (not retried), naming the resources and the rule."""
    other = encounter("enc-9", subject=OTHER_PATIENT, **updated("2025-08-01T06:00:00+07:00"))
    mine = encounter("enc-1", **updated("2025-08-01T07:00:00+07:00"))
    holding(platform, *([mine, other] if alongside else [other]))

    with pytest.raises(FhirRejected) as raised:
        client.create_or_adopt(encounter())

    error = raised.value
    assert error.status_code == 409 and isinstance(error, Rejected) and not isinstance(error, Retryable)
    assert f"Encounter/enc-9 with identifier {ENCOUNTER_SYSTEM}|VISIT-0001 for another patient" in error.message
    assert "enc-1" not in error.message and OTHER_PATIENT not in error.message  # not the other patient's id
    assert error.issues[0].expression == ("Encounter.identifier", "Encounter.subject")
    assert platform.methods == ["GET"]


def test_a_duplicate_answer_whose_match_is_another_patients_is_refused(
    client: SatusehatClient, platform: Platform
) -> None:
    """The same rule when the match is looked for after the POST was refused as a duplicate."""

    def fhir(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(409, text="duplicate")
        return httpx.Response(200, json=searchset(encounter("enc-9", subject=OTHER_PATIENT)))

    platform.fhir = fhir

    with pytest.raises(FhirRejected, match="for another patient") as raised:
        client.create_or_adopt(encounter(), search_first=False)

    assert raised.value.status_code == 409
    assert platform.methods == ["POST", "GET"]


# --- the same, through batch4 against the simulator ---------------------------------------------------------


def _seed(gateway: Gateway, resource: dict[str, Any]) -> dict[str, Any]:
    """A resource put straight into the platform's store, as an earlier system (or a race) left it there: the
    simulator's own API would refuse a second resource with the identifier (rule 20002)."""
    return gateway.simulator.running.platform.store.create(resource)


@pytest.mark.parametrize("lost_in", [1, 2], ids=["first-association", "both-associations"])
@pytest.mark.usefixtures("fast_retries")
@pytest.mark.integration
@pytest.mark.anyio
async def test_an_imaging_study_listing_fewer_instances_than_sent_is_never_reported_done(
    gateway: Gateway, upload_study: UploadStudy, monkeypatch: pytest.MonkeyPatch, lost_in: int
) -> None:
    """The router acknowledges every instance but one never reaches its ImagingStudy. batch4 does not go on to
    the reading and the report with an incomplete study: it sends the study once more; if the ImagingStudy then
    lists every instance the run completes with one of each resource, otherwise it fails at that step saying how
    many instances the ImagingStudy lists, with no Observation and no DiagnosticReport filed."""
    study = upload_study(series=1, instances_per_series=3)
    body = batch4_input(study)
    monkeypatch.setenv("IMAGING_STUDY_DEADLINE_S", "1.5")
    runtime.reset()
    gateway.arm_router(kind="lose", count=lost_in)  # one instance in each of the first `lost_in` associations
    store = gateway.simulator.running.platform.store

    if lost_in == 1:
        result = await batch4(Batch4Input.model_validate(body))
        (imaging,) = gateway.resources("ImagingStudy")
        assert result["imaging_study_id"] == imaging["id"] and imaging["numberOfInstances"] == 3
        assert gateway.counts() == dict.fromkeys(
            ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport"), 1
        )
    else:
        with pytest.raises(BatchFailed) as failed:
            await batch4(Batch4Input.model_validate(body))
        assert failed.value.step == "imaging_study", str(failed.value)
        assert "the ImagingStudy lists 2 of 3 instances sent" in str(failed.value)
        assert set(failed.value.created) == {"encounter_id", "service_request_id", "dicom_process"}
        assert gateway.resources("Observation") == [] and gateway.resources("DiagnosticReport") == []
    assert [event.detail["instances"] for event in store.events(["router.received"])] == [2, 3 if lost_in == 1 else 2]
    assert len(store.events(["router.fault"])) == lost_in


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.integration
@pytest.mark.anyio
async def test_batch4_adopts_one_of_two_encounters_for_the_visit_by_the_rule(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    visit = {
        "system": identifier_system(IdentifierKind.ENCOUNTER, gateway.env["SS_ORG_ID"]),
        "value": body["identifier_value"],
    }
    # Two copies of the very Encounter this order makes (so adopting one needs no correction), as a race left them.
    built = build_encounter(Batch4Input.model_validate(body), gateway.env["SS_ORG_ID"])
    assert built["identifier"][0] == visit
    twins = [_seed(gateway, dict(built)) for _ in range(2)]

    result = await batch4(Batch4Input.model_validate(body))

    assert result["encounter_id"] == twins[1]["id"]  # the one updated last
    assert len(gateway.resources("Encounter")) == 2  # no third
    (order,) = gateway.resources("ServiceRequest")
    assert order["encounter"]["reference"] == f"Encounter/{twins[1]['id']}"


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.integration
@pytest.mark.anyio
async def test_batch4_refuses_an_acsn_ordered_for_another_patient_before_sending_the_study(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    acsn = {"system": identifier_system(IdentifierKind.ACSN, gateway.env["SS_ORG_ID"]), "value": body["noacsn"]}
    elsewhere = _seed(
        gateway,
        {
            "resourceType": "ServiceRequest",
            "identifier": [acsn],
            "status": "active",
            "intent": "original-order",
            "subject": {"reference": "Patient/P99999999999"},
        },
    )

    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(body))

    assert failed.value.step == "service_request" and failed.value.status_code == 409
    assert f"ServiceRequest/{elsewhere['id']}" in str(failed.value) and "another patient" in str(failed.value)
    assert "fix the input" in str(failed.value)
    assert set(failed.value.created) == {"encounter_id"}
    store = gateway.simulator.running.platform.store
    assert store.events(["router.received"]) == [] and gateway.resources("ImagingStudy") == []


def _imaging_study(study_uid: str, instances: int) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": f"is-{study_uid}",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
        "series": [{"uid": f"{study_uid}.1", "instance": [{"uid": f"{study_uid}.1.{n}"} for n in range(instances)]}],
    }


class _Searches:
    """A SATUSEHAT client whose ImagingStudy searches answer from a list of answers, the last one repeated."""

    def __init__(self, *answers: list[dict[str, Any]]) -> None:
        self.answers = list(answers)

    def find_by_identifier(self, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.mark.anyio
async def test_an_imaging_study_of_another_study_under_the_same_acsn_is_not_taken_for_the_one_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ImagingStudy the router built earlier for this ACSN from another study (the modality sent the wrong
    study first) lists enough instances and is the newest match: batch4 waits for the one of the study it sent,
    by its `urn:dicom:uid`, and without it ends "not ready" (then sends once more) instead of reporting done."""
    stale, ours = _imaging_study("1.2.3.4", 2), _imaging_study("1.2.3.5", 2)
    monkeypatch.setattr(runtime, "satusehat", lambda: _Searches([stale], [stale, ours]))
    monkeypatch.setattr(runtime, "settings", lambda: _OrgSettings())

    found = await wait_for_imaging_study.fn("RAD1", 2, 5.0, study_instance_uid="1.2.3.5")
    assert found["id"] == ours["id"]

    monkeypatch.setattr(runtime, "satusehat", lambda: _Searches([stale]))
    with pytest.raises(ImagingStudyNotReady, match=r"of another study, not 1\.2\.3\.5"):
        await wait_for_imaging_study.fn("RAD1", 2, 0.3, study_instance_uid="1.2.3.5")


class _OrgSettings:
    ss_org_id = "org-1"
