"""No order is ever linked to another patient's (or another visit's) resources, whether the id comes from Prefect's
task cache (warm: the same process already posted the first order) or from the platform (cold: another system
did). Every path a HIS or an operator uses: the flows, the poller in both modes, the HIS API.

Each test first files an order for one patient, then sends a second order that reuses an identifier (the visit
number, the ACSN) for another patient or another visit, and checks that it is refused with a 409 naming the
identifier, that nothing of the first patient's is returned, and that nothing was linked or re-sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from clients.ris import RisStore
from flows.batches import batch1, batch4
from flows.poll import poll_ris
from flows.steps import BatchFailed
from models import fhir
from models.inputs import Batch1Input, Batch4Input
from models.orders import DEAD
from models.settings import RisSettings, load_settings
from tasks import runtime
from tasks.ris import reset_stores
from tests.api.conftest import API_KEY, api_settings
from tests.integrity.links import record
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy, unique_accession
from tests.plugins.simulator import ORG_ID

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.usefixtures("fast_retries")]

FIRST_PATIENT = "P10443013727"
SECOND_PATIENT = "P00000000002"
FIRST_READING = "Reading of the first patient: nodul paru kanan"


def batch1_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "identifier_value": "RG" + uuid.uuid4().hex[:12].upper(),
        "subject_id": FIRST_PATIENT,
        "individual_id": "10016869420",
        "period_start": "2025-08-01T05:57:41+00:00",
        "location_id": "ef011065-38c9-46f8-9c35-d1fe68966a3e",
        "noacsn": unique_accession(),
    }
    return {**body, **overrides}


async def _first_order(gateway: Gateway, warm: bool, body: dict[str, Any]) -> dict[str, Any]:
    """The first patient's visit and order: filed through the flow (warm: its ids are now in this process's task
    cache), or put straight on the platform as another system would have (cold: nothing cached here)."""
    if warm:
        return await batch1(Batch1Input.model_validate(body))
    order = Batch1Input.model_validate(body)
    store = gateway.simulator.running.platform.store
    site = fhir.SiteDefaults.from_settings(runtime.settings())  # the hospital's exam code, as the flow uses it
    encounter = store.create(fhir.build_encounter(order, ORG_ID, site=site))
    service_request = store.create(fhir.build_service_request(order, ORG_ID, encounter_id=encounter["id"], site=site))
    return {"encounter_id": encounter["id"], "service_request_id": service_request["id"]}


@pytest.fixture
def ris(gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RisStore]:
    """The poller's RIS table on a SQLite file, as tests/orders does."""
    monkeypatch.setenv("RIS_DATABASE_URL", f"sqlite:///{tmp_path / 'ris.db'}")
    reset_stores()
    store = RisStore.from_settings(load_settings(RisSettings))
    store.create_schema()
    yield store
    store.close()
    reset_stores()


@pytest.mark.parametrize("warm", [True, False], ids=["cache-warm", "cache-cold"])
async def test_batch1_with_a_reused_visit_number_for_another_patient_is_refused(gateway: Gateway, warm: bool) -> None:
    first = batch1_body()
    created = await _first_order(gateway, warm, first)

    second = batch1_body(identifier_value=first["identifier_value"], subject_id=SECOND_PATIENT)
    with pytest.raises(BatchFailed) as failed:
        await batch1(Batch1Input.model_validate(second))

    error = failed.value
    assert (error.step, error.status_code) == ("encounter", 409)
    assert f"Encounter/{created['encounter_id']}" in str(error) and "another patient" in str(error)
    assert first["identifier_value"] in str(error) and FIRST_PATIENT not in str(error)
    assert error.created == {}  # nothing of the first patient's handed back as the second's
    (order,) = gateway.resources("ServiceRequest")  # the second order's was never made
    assert order["subject"]["reference"] == f"Patient/{FIRST_PATIENT}"
    assert len(gateway.resources("Encounter")) == 1
    record(
        gateway.simulator.running.platform.store,
        f"batch1 reusing another patient's visit number (task cache {'warm' if warm else 'cold'})",
        orders=2,
        done=1,
        failed="1 refused: encounter: 409, the identifier belongs to another patient's Encounter",
    )


@pytest.mark.parametrize("warm", [True, False], ids=["cache-warm", "cache-cold"])
async def test_batch1_with_a_reused_acsn_for_another_patient_is_refused(gateway: Gateway, warm: bool) -> None:
    first = batch1_body()
    await _first_order(gateway, warm, first)

    second = batch1_body(noacsn=first["noacsn"], subject_id=SECOND_PATIENT)
    with pytest.raises(BatchFailed) as failed:
        await batch1(Batch1Input.model_validate(second))

    assert (failed.value.step, failed.value.status_code) == ("service_request", 409)
    assert "another patient" in str(failed.value) and first["noacsn"] in str(failed.value)
    assert set(failed.value.created) == {"encounter_id"}  # the second patient's own visit, nothing else
    (order,) = gateway.resources("ServiceRequest")
    assert order["subject"]["reference"] == f"Patient/{FIRST_PATIENT}"
    record(
        gateway.simulator.running.platform.store,
        f"batch1 reusing another patient's ACSN (task cache {'warm' if warm else 'cold'})",
        orders=2,
        done=1,
        failed="1 refused: service_request: 409, the identifier belongs to another patient's ServiceRequest",
    )


@pytest.mark.parametrize("warm", [True, False], ids=["cache-warm", "cache-cold"])
async def test_an_acsn_of_another_visit_of_the_same_patient_is_not_adopted(gateway: Gateway, warm: bool) -> None:
    """batch3's case: a new visit with a reused ACSN used to return the new Encounter with the old visit's order."""
    first = batch1_body()
    created = await _first_order(gateway, warm, first)

    second = batch1_body(noacsn=first["noacsn"])  # same patient, new visit number
    with pytest.raises(BatchFailed) as failed:
        await batch1(Batch1Input.model_validate(second))

    assert (failed.value.step, failed.value.status_code) == ("service_request", 409)
    assert "another visit" in str(failed.value) and f"ServiceRequest/{created['service_request_id']}" in str(
        failed.value
    )
    (order,) = gateway.resources("ServiceRequest")
    assert order["encounter"]["reference"] == f"Encounter/{created['encounter_id']}"
    record(
        gateway.simulator.running.platform.store,
        f"batch1 of a new visit reusing the same patient's ACSN (task cache {'warm' if warm else 'cold'})",
        orders=2,
        done=1,
        failed="1 refused: service_request: 409, the identifier belongs to another visit's ServiceRequest",
    )


async def test_batch4_with_an_acsn_reused_for_another_patient_sends_nothing_and_files_nothing(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    """The issue's case: the second patient's images used to replace the first patient's ImagingStudy, still under
    the first patient, and the second reading was never filed."""
    study = upload_study(series=1, instances_per_series=2)
    first = batch4_input(study, performer_value=FIRST_READING)
    done = await batch4(Batch4Input.model_validate(first))
    store = gateway.simulator.running.platform.store
    sent_before = len(store.events(["router.received"]))
    imaging_before = store.read("ImagingStudy", done["imaging_study_id"])

    other_study = upload_study(series=1, instances_per_series=3)
    second = batch4_input(other_study, noacsn=first["noacsn"], subject_id=SECOND_PATIENT, performer_value="second")
    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(second))

    assert (failed.value.step, failed.value.status_code) == ("service_request", 409)
    assert done["service_request_id"] not in failed.value.created.values()
    assert FIRST_READING not in str(failed.value)
    assert len(store.events(["router.received"])) == sent_before  # the second study never went to the router
    assert store.read("ImagingStudy", done["imaging_study_id"]) == imaging_before
    assert len(gateway.resources("Observation")) == 1 and len(gateway.resources("DiagnosticReport")) == 1
    record(
        store,
        "batch4 reusing another patient's ACSN with another study",
        orders=2,
        done=1,
        failed="1 refused: service_request: 409 before the study is sent; the first ImagingStudy unchanged",
    )


@pytest.mark.parametrize("light", [False, True], ids=["flow-mode", "light-mode"])
async def test_the_poller_makes_an_order_reusing_another_patients_acsn_dead_with_the_reason(
    gateway: Gateway, ris: RisStore, monkeypatch: pytest.MonkeyPatch, light: bool
) -> None:
    first = batch1_body()
    await batch1(Batch1Input.model_validate(first))  # the cache is warm with the first patient's order
    if light:
        monkeypatch.setenv("POLL_ORDER_RUNS", "task")
    second = batch1_body(noacsn=first["noacsn"], subject_id=SECOND_PATIENT)
    ris.add_order(1, second)

    summary = await poll_ris()

    assert (summary["claimed"], summary["dead"]) == (1, 1)
    order = ris.get(first["noacsn"])
    assert order.status == DEAD and order.last_error is not None
    assert "stopped at service_request" in order.last_error and "another patient" in order.last_error
    (service_request,) = gateway.resources("ServiceRequest")
    assert service_request["subject"]["reference"] == f"Patient/{FIRST_PATIENT}"
    record(
        gateway.simulator.running.platform.store,
        f"RIS order reusing another patient's ACSN ({'light' if light else 'flow'} mode)",
        orders=2,
        done=1,
        failed="1 dead: service_request: 409, the identifier belongs to another patient's ServiceRequest",
    )


async def test_the_api_never_answers_with_another_patients_observation(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    """The issue's case: POST /observation for an existing ACSN with another subject_id answered 201 with the first
    patient's Observation, reading text included (its id came from the task cache)."""
    first = batch4_input(upload_study(series=1, instances_per_series=1), performer_value=FIRST_READING)
    done = await batch4(Batch4Input.model_validate(first))
    links = {key: done[key] for key in ("encounter_id", "service_request_id", "imaging_study_id")}
    app = create_app(api_settings())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
    ) as his:
        again = await his.post("/api/satset/observation", json={**first, **links})
        assert again.status_code == 201 and again.json()["id"] == done["observation_id"]  # the same order: adopted

        other = await his.post(
            "/api/satset/observation", json={**first, **links, "subject_id": SECOND_PATIENT, "performer_value": "x"}
        )

    assert other.status_code == 409, other.text
    assert FIRST_READING not in other.text and done["observation_id"] not in other.text
    assert first["noacsn"] in other.text  # the identifier is named
    (reading,) = gateway.resources("Observation")
    assert reading["valueString"] == FIRST_READING
    record(
        gateway.simulator.running.platform.store,
        "HIS API /observation for another patient under an existing ACSN",
        orders=2,
        done=1,
        failed="1 refused: 409 naming the identifier; the other patient's reading not in the answer",
    )
