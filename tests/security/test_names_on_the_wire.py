"""The patient's name never reaches SATUSEHAT (README, "Patient names stay in the HIS": `subject_display` is
accepted for compatibility and dropped).

The HIS calls every endpoint that sends something to the platform, batch1 to batch4 and each single resource, each
call naming the patient with a name of its own (`subject_display`), through the HIS API against the real parts
(Orthanc, the simulator with its router, the Prefect server). The gateway reaches the simulator through a proxy
that records every request (tests/reliability/platform_proxy.py): request line, query string, headers and body are
scanned for each name in every spelling (tests/security/leaks.py), and so is every resource the platform holds
afterwards. Controls (the orders' accession numbers, which belong in those requests) show the scan read them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from api.app import create_app
from tasks import runtime
from tests.api.conftest import API_KEY, api_settings
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy
from tests.reliability.platform_proxy import PlatformProxy
from tests.security.leaks import LeakScanner

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CALLS = [
    "batch1",
    "batch3",
    "batch2",
    "batch4",
    "encounter",
    "service-req",
    "observation",
    "conclusion",
]
NAMES = dict(
    zip(
        CALLS,
        [
            "Ratnasari Wulandewi",
            "Hendrawan Sulistyoputro",
            "Kusumaningrum Prameswari",
            "Cahyaningtyas Larasati",
            "Purbonegoro Wicaksono",
            "Anggraeni Kusumawardhani",
            "Sekarwangi Pitalokasari",
            "Danuwirjo Prabuningrat",
        ],
        strict=True,
    )
)
"""One name per HIS call, so a finding ('patient name N') names the call that leaked: N is the call's place."""
RESOURCES = ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")


def without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


async def wait_for_imageid(his: httpx.AsyncClient, acsn: str) -> str:
    """The router makes the ImagingStudy after the association ends: ask until it is there (404 until then)."""
    with anyio.fail_after(60):
        while True:
            answer = await his.get(f"/api/satset/imageid/{acsn}")
            if answer.status_code == 200:
                return str(answer.json()["imagingStudy_id"])
            assert answer.status_code == 404, answer.text
            await anyio.sleep(0.2)


@pytest.fixture
def wire(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[PlatformProxy]:
    """The gateway's SATUSEHAT URLs (token and FHIR) through a recording proxy in front of the simulator."""
    with PlatformProxy(gateway.simulator.running.base_url, "platform") as proxy:
        monkeypatch.setenv("SS_AUTH_URL", proxy.auth_url)
        monkeypatch.setenv("SS_BASE_URL", proxy.fhir_url)
        runtime.reset()
        yield proxy
    runtime.reset()


@pytest.fixture
async def his() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
    ) as client:
        yield client


async def test_no_name_the_his_sends_reaches_the_platform_from_any_endpoint(
    gateway: Gateway, wire: PlatformProxy, upload_study: UploadStudy, his: httpx.AsyncClient
) -> None:
    answers: dict[str, httpx.Response] = {}

    async def call(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await his.post(f"/api/satset/{endpoint}", json={**body, "subject_display": NAMES[endpoint]})
        answers[endpoint] = answer
        assert answer.status_code in (200, 201), (endpoint, answer.text)
        return dict(answer.json())

    async def route(study: Any, acsn: str) -> str:
        routed = await his.post("/api/dicom/process", json={"study": study.study_instance_uid, "accesionnum": acsn})
        assert routed.status_code == 200, routed.text
        return await wait_for_imageid(his, acsn)

    # The split workflow: batch1, the images, batch3 (adopts the order), batch2 (adopts the reading and report).
    study = upload_study(series=1, instances_per_series=2)
    split = without(batch4_input(study), "study")
    ordered = await call("batch1", split)
    imaging_study_id = await route(study, split["noacsn"])
    await call("batch3", split)
    await call("batch2", {**split, **ordered, "imaging_study_id": imaging_study_id})

    # The whole workflow in one call.
    whole = batch4_input(upload_study(series=1, instances_per_series=2))
    await call("batch4", whole)

    # Each resource on its own.
    study = upload_study(series=1, instances_per_series=1)
    single = batch4_input(study)
    encounter = await call("encounter", single)
    order = await call(
        "service-req", {**single, "encounter_id": encounter["id"], "requester_reference": "Practitioner/10016869420"}
    )
    links = {
        "encounter_id": encounter["id"],
        "service_request_id": order["id"],
        "imaging_study_id": await route(study, single["noacsn"]),
    }
    reading = await call("observation", {**single, **links})
    await call("conclusion", {**single, **links, "observation_id": reading["id"]})

    assert list(answers) == CALLS
    assert gateway.counts() == dict.fromkeys(RESOURCES, 3)

    # --- what reached the platform --------------------------------------------------------------------------
    accessions = [split["noacsn"], whole["noacsn"], single["noacsn"]]
    controls = {f"control: ACSN of order {n}": acsn for n, acsn in enumerate(accessions, 1)}
    scanner = LeakScanner(controls, list(NAMES.values()))
    for number, request in enumerate(wire.received):
        scanner.scan_text(f"request {number}: {request.method} {request.path}", request.text(), kind="request")
    store = gateway.simulator.running.platform.store
    for resource_type in RESOURCES:
        for resource in store.all(resource_type):
            scanner.scan_text(f"stored {resource_type}/{resource['id']}", json.dumps(resource), kind="stored")

    posts = Counter(request.path.rsplit("/", 1)[-1] for request in wire.received if request.method == "POST")
    print(f"\nscanned: {scanner.scanned}; POSTs through the proxy: {dict(posts)}")
    assert all(posts[kind] >= 3 for kind in ("Encounter", "ServiceRequest", "Observation", "DiagnosticReport")), posts
    leaks = [str(finding) for finding in scanner.findings if not finding.needle.startswith("control")]
    assert leaks == [], "\n".join(leaks) + f"\n(patient name N is the N-th of {CALLS})"
    read = {(finding.kind, finding.needle) for finding in scanner.findings if finding.needle.startswith("control")}
    assert read >= {(kind, label) for kind in ("request", "stored") for label in controls}, read
