"""batch4 end to end through the real parts: Orthanc (PACS), the simulator (FHIR + DICOM Router), Prefect."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client

from flows.batches import batch4
from models.fhir import IdentifierKind, identifier_system
from models.inputs import Batch4Input
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy
from tests.plugins.simulator import ORG_ID

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_batch4_files_every_resource_and_the_imaging_study_lists_every_instance(
    gateway: Gateway, upload_study: UploadStudy
) -> None:
    study = upload_study(series=3, instances_per_series=4, accession_number="PACS-OWN-1")
    body = batch4_input(study)

    result = await batch4(Batch4Input.model_validate(body))

    assert set(result) == {
        "encounter_id",
        "service_request_id",
        "dicom_process",
        "imaging_study_id",
        "observation_id",
        "diagnostic_report_id",
    }
    assert result["dicom_process"]["status"] == "success"
    assert result["dicom_process"]["study_uid"] == study.study_instance_uid
    platform = gateway.simulator.running.platform
    for key, kind in [
        ("encounter_id", "Encounter"),
        ("service_request_id", "ServiceRequest"),
        ("imaging_study_id", "ImagingStudy"),
        ("observation_id", "Observation"),
        ("diagnostic_report_id", "DiagnosticReport"),
    ]:
        assert platform.store.read(kind, result[key]) is not None, kind

    imaging = platform.store.read("ImagingStudy", result["imaging_study_id"])
    listed = {i["uid"] for s in imaging["series"] for i in s["instance"]}
    assert listed == {str(ds.SOPInstanceUID) for ds in study.instances}
    assert len(imaging["series"]) == 3
    acsn_system = identifier_system(IdentifierKind.ACSN, ORG_ID)
    assert {"system": acsn_system, "value": body["noacsn"]} in [
        {k: i[k] for k in ("system", "value")} for i in imaging["identifier"]
    ]
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{result['service_request_id']}"}]

    report = platform.store.read("DiagnosticReport", result["diagnostic_report_id"])
    assert report["result"][0]["reference"] == f"Observation/{result['observation_id']}"
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{result['imaging_study_id']}"}]
    assert gateway.counts() == {
        k: 1 for k in ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")
    }


async def test_batch4_publishes_an_artifact_without_patient_data(gateway: Gateway, upload_study: UploadStudy) -> None:
    study = upload_study(series=1, instances_per_series=2)
    body = batch4_input(study, subject_display="Budi Santoso")
    result = await batch4(Batch4Input.model_validate(body))

    async with get_client() as client:
        artifacts = await client.read_latest_artifacts()
        mine = [a for a in artifacts if a.key and body["noacsn"].lower() in a.key]
        assert len(mine) == 1
        markdown = str(mine[0].data)
        flow_runs = await client.read_flow_runs()
        parameters = json.dumps([run.parameters for run in flow_runs], default=str)
    assert result["imaging_study_id"] in markdown and "instances_sent | `2`" in markdown
    assert "Budi" not in markdown and "Budi" not in parameters
    assert "SYNTHETIC" not in markdown  # the DICOM PatientName of the generated study
