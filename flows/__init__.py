"""The gateway's Prefect flows, by the name users and deployments know them."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from flows.batches import batch1, batch2, batch3, batch4
from flows.dicom import dicom_process
from flows.resources import conclusion, encounter, imaging_lookup, observation, service_request
from models.inputs import (
    Batch1Input,
    Batch2Input,
    Batch3Input,
    Batch4Input,
    DiagnosticReportInput,
    DicomProcessInput,
    EncounterInput,
    ObservationInput,
    ServiceRequestInput,
)


@dataclass(frozen=True)
class FlowEntry:
    """A flow and the input model of its one `payload` parameter (None: its parameters are plain values)."""

    flow: Callable[..., Any]
    payload: type[BaseModel] | None


FLOWS: dict[str, FlowEntry] = {
    "batch1": FlowEntry(batch1, Batch1Input),
    "batch2": FlowEntry(batch2, Batch2Input),
    "batch3": FlowEntry(batch3, Batch3Input),
    "batch4": FlowEntry(batch4, Batch4Input),
    "dicom-process": FlowEntry(dicom_process, DicomProcessInput),
    "encounter": FlowEntry(encounter, EncounterInput),
    "service-request": FlowEntry(service_request, ServiceRequestInput),
    "observation": FlowEntry(observation, ObservationInput),
    "conclusion": FlowEntry(conclusion, DiagnosticReportInput),
    "imaging-lookup": FlowEntry(imaging_lookup, None),
}
