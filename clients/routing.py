"""A study from the PACS to the SATUSEHAT DICOM Router: stream, edit, send in one association. No Prefect.

This is the gateway's DICOM path, kept in one plain function so it can be called from a notebook or a test
without any orchestration: each instance is retrieved, edited (AccessionNumber = ACSN, PatientID = IHS number)
and sent before the next one is retrieved, so memory does not grow with the study.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from pydicom.dataset import Dataset

from clients.errors import StoreIncomplete, StudyNotFound
from clients.pacs import InstanceRef, PacsClient
from clients.router import RouterClient, SopClassAndSyntax, StudyOutcome, raise_for_outcome
from models.dicom import edit_for_satusehat


@dataclass(frozen=True)
class RoutingReport:
    """What one routing did: the counts the existing gateway reported, and the router's own outcome."""

    study_instance_uid: str
    accession_number: str
    total_instance: int
    sent_instance: int
    patient_modified: bool
    accession_modified: bool
    router: str
    elapsed_s: float
    outcome: StudyOutcome

    def as_response(self) -> dict[str, Any]:
        """The existing gateway's /api/dicom/process success body."""
        return {
            "status": "success",
            "study_uid": self.study_instance_uid,
            "total_instance": self.total_instance,
            "sent_instance": self.sent_instance,
            "patient_modified": self.patient_modified,
            "accession_modified": self.accession_modified,
            "router": self.router,
        }


def route_study(
    pacs: PacsClient,
    router: RouterClient,
    *,
    study_instance_uid: str,
    accession_number: str,
    patient_id: str | None = None,
) -> RoutingReport:
    """Send every instance of the study to the router in one association, edited; raise unless all arrived.

    Raises StudyNotFound when the PACS lists no instance, the router client's errors (`raise_for_outcome`) when
    the router did not confirm every instance, and StoreIncomplete when the PACS delivered fewer instances than
    it listed (an instance missing from the PACS must not yield an ImagingStudy reported as complete).
    """
    started = time.monotonic()
    listed = pacs.list_instances(study_instance_uid)
    if not listed:
        raise StudyNotFound(f"the PACS lists no instance for study {study_instance_uid}", service="pacs")
    edited = (
        edit_for_satusehat(ds, accession_number=accession_number, patient_id=patient_id)
        for ds in pacs.iter_instances(study_instance_uid)
    )
    first = next(edited, None)
    if first is None:
        raise StoreIncomplete(
            f"the PACS listed {len(listed)} instances of study {study_instance_uid} but delivered none", service="pacs"
        )
    outcome = router.send_study(chain([first], edited), sop_classes_and_syntaxes=_contexts_for(listed, first))
    raise_for_outcome(outcome)
    if outcome.confirmed < len(listed):
        raise StoreIncomplete(
            f"the PACS listed {len(listed)} instances of study {study_instance_uid} but delivered "
            f"{outcome.confirmed}; the router got an incomplete study",
            service="pacs",
        )
    return RoutingReport(
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        total_instance=len(listed),
        sent_instance=outcome.confirmed,
        patient_modified=patient_id is not None,
        accession_modified=True,
        router=outcome.router,
        elapsed_s=time.monotonic() - started,
        outcome=outcome,
    )


def _contexts_for(listed: list[InstanceRef], first: Dataset) -> Iterator[SopClassAndSyntax]:
    """One (SOP class, transfer syntax) pair per kind of instance in the study.

    dcm4chee reports each instance's transfer syntax; Orthanc does not, and there the syntax of the first instance
    retrieved stands for the study's (modalities store a study in one syntax). An instance in another syntax is
    then reported as a failure by the router client, never silently dropped.
    """
    first_syntax = str(first.file_meta.TransferSyntaxUID)
    yield str(first.SOPClassUID), first_syntax
    for ref in listed:
        yield ref.sop_class_uid, ref.transfer_syntax_uid or first_syntax
