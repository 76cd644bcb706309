"""Every deployment of the gateway, defined once: `satset serve` builds them from here and prefect.yaml mirrors them.

Each flow gets exactly one deployment, named "gateway" ("batch4/gateway", "poll-ris/gateway", ...), so the HIS
API, the docs and an operator in the Prefect UI always name the same thing whichever way the flows are run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT_NAME = "gateway"
"""The one deployment name every flow gets (fixed by the project's naming convention)."""

CollisionStrategy = Literal["ENQUEUE", "CANCEL_NEW"]


@dataclass(frozen=True)
class Concurrency:
    """How many runs of one deployment may be active at once, and what a run over the limit does."""

    limit: int
    collision_strategy: CollisionStrategy = "ENQUEUE"

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"concurrency limit must be at least 1, not {self.limit}")


@dataclass(frozen=True)
class GatewayDeployment:
    """One flow's deployment: where the flow is, how the UI describes it, and when and how often it may run.

    `entrypoint` is the file form prefect.yaml uses ("flows/batches.py:batch4"), relative to the project root;
    `flow_name` is the flow's own name, checked against the loaded flow so the two cannot drift apart.
    """

    entrypoint: str
    flow_name: str
    description: str
    tags: tuple[str, ...]
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    interval_s: int | None = None
    """An interval schedule in seconds (None: runs only when someone asks for one)."""
    concurrency: Concurrency | None = None
    enforce_parameter_schema: bool = True
    """The API rejects a run whose parameters do not match the flow's signature (its payload model's schema)."""
    name: str = DEPLOYMENT_NAME

    @property
    def full_name(self) -> str:
        """How Prefect's CLI and API address it: "<flow name>/<deployment name>"."""
        return f"{self.flow_name}/{self.name}"

    @property
    def module(self) -> str:
        """The importable module of the entrypoint ("flows.batches")."""
        path = self.entrypoint.partition(":")[0]
        return path.removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.partition(":")[2]

    def available(self) -> bool:
        """Whether the flow's module exists in this checkout (a flow still being written is skipped, not fatal)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def load_flow(self) -> Flow[..., Any]:
        """Import the entrypoint and check it is the flow this entry says it is."""
        from prefect import Flow

        value = getattr(importlib.import_module(self.module), self.function, None)
        if not isinstance(value, Flow):
            raise LookupError(f"{self.entrypoint} is not a Prefect flow")
        if value.name != self.flow_name:
            raise LookupError(f"{self.entrypoint} is the flow {value.name!r}, not {self.flow_name!r}")
        return value

    def to_runner_deployment(self, interval_s: int | None = None) -> RunnerDeployment:
        """The deployment `prefect.serve` runs; `interval_s` overrides the schedule's period (never adds one).

        The entrypoint is recorded as a module path, so a served run finds its flow from any working directory.
        """
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
        from prefect.deployments.runner import EntrypointType

        interval = self.interval_s if interval_s is None or self.interval_s is None else interval_s
        concurrency = (
            ConcurrencyLimitConfig(
                limit=self.concurrency.limit,
                collision_strategy=ConcurrencyLimitStrategy(self.concurrency.collision_strategy),
            )
            if self.concurrency is not None
            else None
        )
        return self.load_flow().to_deployment(
            name=self.name,
            interval=interval,
            concurrency_limit=concurrency,
            parameters=dict(self.parameters),
            description=self.description,
            tags=list(self.tags),
            enforce_parameter_schema=self.enforce_parameter_schema,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )


POLL_INTERVAL_S = 60
"""How often the RIS poller looks for pending exams, by default."""

DEPLOYMENTS: tuple[GatewayDeployment, ...] = (
    GatewayDeployment(
        entrypoint="flows/batches.py:batch1",
        flow_name="batch1",
        description="Register a visit and its radiology order: Encounter, then the ServiceRequest with the ACSN.",
        tags=("satset", "batch", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/batches.py:batch2",
        flow_name="batch2",
        description="File the reading and the report (Observation, DiagnosticReport) for an order with images.",
        tags=("satset", "batch", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/batches.py:batch3",
        flow_name="batch3",
        description="The whole exam when the modality sent the images to the router itself (study found by ACSN).",
        tags=("satset", "batch", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/batches.py:batch4",
        flow_name="batch4",
        description="The whole exam: order, route the study from the PACS to the DICOM Router, reading, report.",
        tags=("satset", "batch", "fhir", "dicom"),
    ),
    GatewayDeployment(
        entrypoint="flows/dicom.py:dicom_process",
        flow_name="dicom-process",
        description="Send one study from the PACS to the DICOM Router with its AccessionNumber and PatientID set.",
        tags=("satset", "dicom"),
    ),
    GatewayDeployment(
        entrypoint="flows/resources.py:encounter",
        flow_name="encounter",
        description="Create (or adopt) one Encounter.",
        tags=("satset", "resource", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/resources.py:service_request",
        flow_name="service-request",
        description="Create (or adopt) one ServiceRequest, the order carrying the ACSN, for an existing Encounter.",
        tags=("satset", "resource", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/resources.py:observation",
        flow_name="observation",
        description="Create (or adopt) one Observation, the reading, for an existing order and ImagingStudy.",
        tags=("satset", "resource", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/resources.py:conclusion",
        flow_name="conclusion",
        description="Create (or adopt) one DiagnosticReport, the conclusion, for an existing order and reading.",
        tags=("satset", "resource", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/resources.py:imaging_lookup",
        flow_name="imaging-lookup",
        description="Find the ImagingStudy the DICOM Router made for an accession number.",
        tags=("satset", "lookup", "fhir"),
    ),
    GatewayDeployment(
        entrypoint="flows/poll.py:poll_ris",
        flow_name="poll-ris",
        description="Work the RIS order table: claim pending exams and run each one; never two polls at once.",
        tags=("satset", "ris"),
        interval_s=POLL_INTERVAL_S,
        # A poll still running when the next is due makes the new one Cancelled rather than queued behind it.
        concurrency=Concurrency(limit=1, collision_strategy="CANCEL_NEW"),
    ),
)


def available_deployments() -> tuple[list[GatewayDeployment], list[GatewayDeployment]]:
    """The deployments whose flow module exists, and those skipped because it does not (yet)."""
    present = [d for d in DEPLOYMENTS if d.available()]
    missing = [d for d in DEPLOYMENTS if not d.available()]
    return present, missing


def by_full_name() -> dict[str, GatewayDeployment]:
    return {d.full_name: d for d in DEPLOYMENTS}
