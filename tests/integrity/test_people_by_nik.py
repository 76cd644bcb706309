"""A HIS that knows its patients and doctors by NIK: batch1 resolves each NIK with the platform's Patient /
Practitioner search (the simulator's registry answers as SATUSEHAT does) and files the resources under the IHS ids;
an unknown NIK stops the run before anything exists, naming the field and never the NIK."""

from __future__ import annotations

import pytest

from flows.batches import batch1
from flows.steps import BatchFailed
from models.inputs import Batch1Input
from tests.integrity.test_wrong_patient import batch1_body
from tests.plugins.gateway import Gateway
from tests.plugins.simulator import TEST_REGISTRY

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.usefixtures("fast_retries")]

PATIENT = TEST_REGISTRY["Patient"][0]
DOCTOR = TEST_REGISTRY["Practitioner"][0]


async def test_batch1_by_nik_files_the_resources_under_the_ihs_ids(gateway: Gateway) -> None:
    body = batch1_body(subject_nik=PATIENT["nik"], individual_nik=DOCTOR["nik"])
    del body["subject_id"], body["individual_id"]

    result = await batch1(Batch1Input.model_validate(body))

    store = gateway.simulator.running.platform.store
    encounter = store.read("Encounter", result["encounter_id"])
    order = store.read("ServiceRequest", result["service_request_id"])
    assert encounter["subject"]["reference"] == order["subject"]["reference"] == f"Patient/{PATIENT['id']}"
    assert encounter["participant"][0]["individual"]["reference"] == f"Practitioner/{DOCTOR['id']}"
    assert PATIENT["nik"] not in str(result)


async def test_an_unknown_nik_stops_the_run_before_anything_exists(gateway: Gateway) -> None:
    unknown = "9900000000009999"
    body = batch1_body(subject_nik=unknown)
    del body["subject_id"]

    with pytest.raises(BatchFailed) as failed:
        await batch1(Batch1Input.model_validate(body))

    assert failed.value.step == "people" and "subject_nik" in str(failed.value)
    assert unknown not in str(failed.value)
    assert gateway.counts() == {}
