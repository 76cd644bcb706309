"""Resuming batch4: a failure at any step, then a re-run, ends with exactly one of each resource.

Faults are injected in the real parts (the simulator's HTTP faults and router faults), never by patching the
gateway. `fast_retries` keeps the production retry policy but skips its waiting.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from flows.batches import batch4
from flows.steps import BatchFailed
from models.inputs import Batch4Input
from simulator.store import Store
from tasks import runtime
from tasks.retry import DICOM_RETRIES, FHIR_RETRIES
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import UploadStudy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

RESOURCES = ("Encounter", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport")
FHIR_ATTEMPTS = FHIR_RETRIES + 1


def exactly_one_of_each(gateway: Gateway) -> None:
    assert gateway.counts() == dict.fromkeys(RESOURCES, 1)


async def run_expecting_failure(body: dict[str, Any], step: str) -> BatchFailed:
    with pytest.raises(BatchFailed) as failed:
        await batch4(Batch4Input.model_validate(body))
    assert failed.value.step == step, str(failed.value)
    return failed.value


def post_fault(resource: str) -> dict[str, Any]:
    return {"kind": "500", "count": FHIR_ATTEMPTS, "path_prefix": f"/fhir-r4/v1/{resource}", "method": "POST"}


@pytest.mark.parametrize(
    ("step", "resource", "created_before"),
    [
        ("encounter", "Encounter", set()),
        ("service_request", "ServiceRequest", {"encounter_id"}),
        ("observation", "Observation", {"encounter_id", "service_request_id", "dicom_process", "imaging_study_id"}),
        (
            "diagnostic_report",
            "DiagnosticReport",
            {"encounter_id", "service_request_id", "dicom_process", "imaging_study_id", "observation_id"},
        ),
    ],
)
async def test_fhir_step_fails_then_rerun_completes_with_one_of_each(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None, step: str, resource: str, created_before: set[str]
) -> None:
    body = batch4_input(upload_study(series=2, instances_per_series=2))
    gateway.arm(**post_fault(resource))

    failed = await run_expecting_failure(body, step)

    assert set(failed.created) == created_before
    assert "run it again to resume" in str(failed)
    result = await batch4(Batch4Input.model_validate(body))
    for key, value in failed.created.items():
        assert result[key] == value, key
    exactly_one_of_each(gateway)


async def test_dicom_step_fails_then_rerun_completes_with_one_of_each(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None
) -> None:
    body = batch4_input(upload_study(series=2, instances_per_series=3))
    gateway.arm_router(kind="abort", count=DICOM_RETRIES + 1, after_instances=2)

    failed = await run_expecting_failure(body, "dicom_process")

    assert set(failed.created) == {"encounter_id", "service_request_id"}
    assert gateway.resources("ImagingStudy") == []  # aborted associations never yield an ImagingStudy
    result = await batch4(Batch4Input.model_validate(body))
    assert result["encounter_id"] == failed.created["encounter_id"]
    exactly_one_of_each(gateway)


async def test_imaging_study_step_fails_then_rerun_completes_with_one_of_each(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = batch4_input(upload_study(series=2, instances_per_series=2))
    monkeypatch.setenv("IMAGING_STUDY_DEADLINE_S", "1.5")
    monkeypatch.setenv("IMAGING_STUDY_RESEND_GRACE_S", "1")  # no search answered: the grace before a re-send
    runtime.reset()
    gateway.arm(kind="500", count=None, path_prefix="/fhir-r4/v1/ImagingStudy", method="GET")

    failed = await run_expecting_failure(body, "imaging_study")

    assert "no complete ImagingStudy" in str(failed)
    received = gateway.simulator.running.platform.store.events(["router.received"])
    assert len(received) == 2  # waited, sent the study once more, waited again
    gateway.simulator.running.platform.faults.clear()
    monkeypatch.setenv("IMAGING_STUDY_DEADLINE_S", "15")
    runtime.reset()
    result = await batch4(Batch4Input.model_validate(body))
    assert result["service_request_id"] == failed.created["service_request_id"]
    assert len(gateway.simulator.running.platform.store.events(["router.received"])) == 2  # not sent a third time
    exactly_one_of_each(gateway)


@pytest.mark.parametrize("resource", ["Encounter", "ServiceRequest", "Observation", "DiagnosticReport"])
async def test_a_lost_response_never_creates_a_second_resource(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None, resource: str
) -> None:
    """The platform commits the POST but the answer is lost: the retry finds the resource and adopts it."""
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    gateway.arm(kind="lost-response", count=1, path_prefix=f"/fhir-r4/v1/{resource}", method="POST")

    await batch4(Batch4Input.model_validate(body))

    assert [e.detail["fault"] for e in gateway.simulator.running.platform.store.events(["fault.http"])] == [
        "lost-response"
    ]
    exactly_one_of_each(gateway)


class RefusedTokens:
    """The simulator's token check, unchanged, recording each token it refused (answered 401)."""

    def __init__(self, store: Store) -> None:
        self._valid = store.token_valid
        self.tokens: list[str] = []

    def __call__(self, token: str) -> bool:
        valid = self._valid(token)
        if not valid:
            self.tokens.append(token)
        return valid


async def test_rate_limits_and_expired_tokens_are_ridden_out(
    gateway: Gateway, upload_study: UploadStudy, fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = batch4_input(upload_study(series=1, instances_per_series=2))
    gateway.arm(kind="429", count=3, retry_after_s=0.2, path_prefix="/fhir-r4/v1/ServiceRequest")
    gateway.arm(kind="504", count=2, path_prefix="/fhir-r4/v1/Observation")
    store = gateway.simulator.running.platform.store
    expired = runtime.satusehat().token()  # a token the platform will forget mid-flow
    store.expire_tokens()
    refused = RefusedTokens(store)
    monkeypatch.setattr(store, "token_valid", refused)

    await batch4(Batch4Input.model_validate(body))

    # Each fault was served, not only armed: an arming that did nothing would leave the same good outcome.
    served = [event.detail["fault"] for event in store.events(["fault.http"])]
    assert Counter(served) == {"429": 3, "504": 2}, served
    assert expired in refused.tokens, "the expired token was never presented, so never refused"
    assert store.token_count() >= 2  # a fresh token was fetched after the refusal
    exactly_one_of_each(gateway)
