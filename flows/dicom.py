"""dicom_process: one study from the PACS to the SATUSEHAT DICOM Router, tags edited (the old /api/dicom/process)."""

from typing import Any

from prefect import flow

from flows.batches import FLOW_OPTIONS
from flows.steps import StepRecorder
from models.inputs import DicomProcessInput
from tasks.artifacts import publish_summary
from tasks.dicom import check_router, locate_study, route_study


@flow(name="dicom-process", flow_run_name="dicom-process {payload.accesionnum}", **FLOW_OPTIONS)
async def dicom_process(payload: DicomProcessInput) -> dict[str, Any]:
    """Find the study (by UID, else by accession number), set AccessionNumber/PatientID, send it in one association.

    Without `accesionnum` the study keeps the accession number it has in the PACS; the router links it by that.
    """
    run = StepRecorder("dicom-process")
    # As the existing gateway did: a given study UID is used as is; the ACSN is then the new value to write.
    lookup = {"study_instance_uid": payload.study} if payload.study else {"accession_number": payload.accesionnum}
    # Checked first: the study (StudyNotFound, AmbiguousStudy for an ACSN of several, StudyNotRoutable), the router.
    study = await run.step("locate_study", locate_study(**lookup))
    await run.step("router_echo", check_router())
    accession = payload.accesionnum or study["accession_number"]
    routed = await run.step(
        "route_study", route_study(study["study_instance_uid"], accession, payload.patientid, study["times"])
    )
    result = {**routed, "accession_modified": payload.accesionnum is not None}
    result.pop("elapsed_s", None)
    await publish_summary("dicom-process", accession, result, run.durations_s)
    return result
