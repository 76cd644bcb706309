"""Response shapes, for the OpenAPI document only: the routes answer the flows' results as they are.

They restate the existing gateway's bodies (observed_contracts.md, "The existing gateway's HTTP interface") so a
HIS developer reading /api/docs sees what the old Swagger page promised, field names unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Doc(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="allow")


class Halo(_Doc):
    message: str = "Halo dari Satu Sehat!"


class Token(_Doc):
    access_token: str
    """A SATUSEHAT bearer token of this gateway's client, shared with its flows (fetched again before expiry)."""


class Error(_Doc):
    error: str
    """What failed, in words (for a batch, the old gateway's sentence, e.g. 'Failed to create Encounter')."""
    detail: Any = None
    """SATUSEHAT's OperationOutcome when the platform refused a resource, the search Bundle for imageid, else a
    message."""


class Batch1Result(_Doc):
    encounter_id: str
    service_request_id: str


class Batch2Result(_Doc):
    observation_id: str
    diagnostic_report_id: str


class Batch3Result(Batch1Result, Batch2Result):
    imaging_study_id: str


class DicomSummary(_Doc):
    status: str = "success"
    study_uid: str
    total_instance: int
    sent_instance: int
    patient_modified: bool
    accession_modified: bool
    router: str
    """host:port and AE title of the SATUSEHAT DICOM Router the study went to."""


class Batch4Result(Batch3Result):
    dicom_process: DicomSummary


class BatchFailure(_Doc):
    """The step that failed, every id created before it (a resend with the same body resumes from there), and
    the upstream detail. The HTTP status is the platform's own 4xx, or 502 when it or the PACS/router failed."""

    error: str
    """The old gateway's sentence: 'Failed to create Encounter', 'Encounter created but ServiceRequest failed',
    'ServiceRequest created but ImagingStudy lookup failed', ..."""
    step: str
    """The step that failed: 'encounter', 'service_request', 'dicom_process', 'imaging_study', 'observation',
    'diagnostic_report' (new: the old gateway had only the sentence)."""
    detail: Any = None


class ImageId(_Doc):
    imagingStudy_id: str


class DicomProcessResult(_Doc):
    status: str = "success"
    study_uid: str
    total_instance: int
    sent_instance: int
    patient_modified: bool
    accession_modified: bool
    router: str


class DicomProcessError(_Doc):
    status: str = "error"
    message: str


class FhirResource(_Doc):
    """The resource as SATUSEHAT holds it (id, meta.versionId, meta.lastUpdated, ...)."""

    resourceType: str
    id: str


class OperationOutcome(_Doc):
    """SATUSEHAT's refusal, passed through with its status: `details.text` carries the RuleNumber,
    `expression` names the element."""

    resourceType: str = "OperationOutcome"
    issue: list[dict[str, Any]]
