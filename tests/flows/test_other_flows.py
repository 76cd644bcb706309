"""batch1–batch3, dicom-process, the single-resource flows and the ImagingStudy lookup, through the real parts."""

from __future__ import annotations

from typing import Any

import pytest

from clients.errors import ImagingStudyNotReady
from flows.batches import batch1, batch2, batch3
from flows.dicom import dicom_process
from flows.resources import conclusion, encounter, imaging_lookup, observation, service_request
from models.inputs import (
    Batch1Input,
    Batch2Input,
    Batch3Input,
    DiagnosticReportInput,
    DicomProcessInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
)
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


async def test_batch1_then_dicom_process_then_batch2(gateway: Gateway, upload_study: UploadStudy) -> None:
    """The split workflow: order first, images routed separately, reading and report later."""
    study = upload_study(series=2, instances_per_series=2)
    body = batch4_input(study)

    ordered = await batch1(Batch1Input.model_validate(without(body, "study")))
    assert set(ordered) == {"encounter_id", "service_request_id"}

    routed = await dicom_process(
        DicomProcessInput.model_validate({"study": study.study_instance_uid, "accesionnum": body["noacsn"]})
    )
    assert routed["status"] == "success"
    assert (routed["total_instance"], routed["sent_instance"]) == (4, 4)
    assert routed["accession_modified"] is True and routed["patient_modified"] is False

    found = await _wait_for_lookup(body["noacsn"])
    reported = await batch2(
        Batch2Input.model_validate({**without(body, "study"), **ordered, "imaging_study_id": found["imagingStudy_id"]})
    )
    assert set(reported) == {"observation_id", "diagnostic_report_id"}
    assert gateway.counts() == dict.fromkeys(
        ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport"), 1
    )


async def test_dicom_process_finds_the_study_by_accession_number(gateway: Gateway, upload_study: UploadStudy) -> None:
    study = upload_study(series=1, instances_per_series=3)
    body = batch4_input(study, noacsn=study.accession_number)
    await batch1(Batch1Input.model_validate(without(body, "study")))

    routed = await dicom_process(DicomProcessInput.model_validate({"accesionnum": study.accession_number}))

    assert routed["study_uid"] == study.study_instance_uid and routed["sent_instance"] == 3
    assert (await _wait_for_lookup(study.accession_number))["imagingStudy_id"]


async def test_batch3_finds_the_imaging_study_the_router_already_made(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    """batch3 does not send images: a modality sent them to the router; the flow waits for the ImagingStudy."""
    study = upload_study(series=1, instances_per_series=2)
    body = batch4_input(study)
    ordered = await batch1(Batch1Input.model_validate(without(body, "study")))
    await dicom_process(
        DicomProcessInput.model_validate({"study": study.study_instance_uid, "accesionnum": body["noacsn"]})
    )

    result = await batch3(Batch3Input.model_validate(without(body, "study")))

    assert result["encounter_id"] == ordered["encounter_id"]  # adopted, not created again
    # batch3's body names the radiologist (performer_id), batch1's did not: the order is revised to carry it.
    assert [(item["resource"], item["changed"]) for item in result.pop("revised", [])] in (
        [],
        [("service_request", ["performer"])],
    )
    assert set(result) == {
        "encounter_id",
        "service_request_id",
        "imaging_study_id",
        "observation_id",
        "diagnostic_report_id",
    }
    assert gateway.counts()["Encounter"] == 1


async def test_single_resource_flows_return_the_platform_resource(gateway: Gateway, upload_study: UploadStudy) -> None:
    study = upload_study(series=1, instances_per_series=1)
    body = batch4_input(study)

    made_encounter = await encounter(EncounterInput.model_validate(body))
    assert made_encounter["resourceType"] == "Encounter" and made_encounter["meta"]["versionId"]
    made_order = await service_request(
        ServiceRequestInput.model_validate(
            {**body, "encounter_id": made_encounter["id"], "requester_reference": "Practitioner/10016869420"}
        )
    )
    assert made_order["encounter"]["reference"] == f"Encounter/{made_encounter['id']}"
    await dicom_process(
        DicomProcessInput.model_validate({"study": study.study_instance_uid, "accesionnum": body["noacsn"]})
    )
    imaging_id = (await _wait_for_lookup(body["noacsn"]))["imagingStudy_id"]
    links = {
        "encounter_id": made_encounter["id"],
        "service_request_id": made_order["id"],
        "imaging_study_id": imaging_id,
    }

    made_reading = await observation(ObservationInput.model_validate({**body, **links}))
    assert made_reading["derivedFrom"] == [{"reference": f"ImagingStudy/{imaging_id}"}]
    made_report = await conclusion(
        DiagnosticReportInput.model_validate({**body, **links, "observation_id": made_reading["id"]})
    )
    assert made_report["conclusion"] == body["conclusion_text"]
    assert made_report["result"][0]["reference"] == f"Observation/{made_reading['id']}"


async def test_imaging_lookup_of_an_unknown_acsn_fails_with_the_reason(gateway: Gateway) -> None:
    with pytest.raises(ImagingStudyNotReady, match="NOSUCHACSN"):
        await imaging_lookup("NOSUCHACSN")


async def _wait_for_lookup(acsn: str) -> dict[str, Any]:
    """The router works after the association's release: look up until the ImagingStudy is there."""
    import anyio

    with anyio.fail_after(15):
        while True:
            try:
                return await imaging_lookup(acsn)
            except ImagingStudyNotReady:
                await anyio.sleep(0.2)
