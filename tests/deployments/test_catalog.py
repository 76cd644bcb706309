"""The deployment catalog: one "gateway" deployment per flow, each entrypoint a real flow, and what `satset serve`
builds from it (schedule, concurrency limit, the payload model's schema for the UI's run form)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.serve_cmd import serve
from deployments.catalog import DEPLOYMENT_NAME, DEPLOYMENTS, Concurrency, GatewayDeployment, by_full_name
from deployments.serve import ServeError, describe, serve_gateway
from flows import FLOWS
from tests.plugins.pacs import require

POLLER = by_full_name()["poll-ris/gateway"]


def test_every_flow_has_exactly_one_deployment_named_gateway() -> None:
    assert {d.name for d in DEPLOYMENTS} == {DEPLOYMENT_NAME} == {"gateway"}
    flow_names = [d.flow_name for d in DEPLOYMENTS]
    assert len(flow_names) == len(set(flow_names))
    assert set(FLOWS) <= set(flow_names), "a flow in flows.FLOWS has no deployment"
    assert len({d.entrypoint for d in DEPLOYMENTS}) == len(DEPLOYMENTS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.full_name)
def test_entrypoint_imports_and_names_the_flow(deployment: GatewayDeployment) -> None:
    # A flow still being written (the RIS poller) is skipped on a developer machine, never in CI.
    require(deployment.available(), f"{deployment.entrypoint} (being written)")
    flow = deployment.load_flow()
    assert flow.name == deployment.flow_name
    assert deployment.entrypoint == f"{deployment.module.replace('.', '/')}.py:{deployment.function}"
    if deployment.flow_name in FLOWS:
        assert FLOWS[deployment.flow_name].flow is flow


def test_an_entrypoint_naming_another_flow_is_refused() -> None:
    wrong = replace(by_full_name()["batch1/gateway"], entrypoint="flows/batches.py:batch2")
    with pytest.raises(LookupError, match="is the flow 'batch2', not 'batch1'"):
        wrong.load_flow()
    missing = replace(wrong, entrypoint="flows/nowhere.py:nothing")
    assert not missing.available()


def test_the_poller_runs_every_minute_and_never_twice_at_once() -> None:
    assert POLLER.entrypoint == "flows/poll.py:poll_ris"
    assert POLLER.interval_s == 60
    assert POLLER.concurrency == Concurrency(limit=1, collision_strategy="CANCEL_NEW")
    assert "ris" in POLLER.tags
    others = [d for d in DEPLOYMENTS if d is not POLLER]
    assert all(d.interval_s is None and d.concurrency is None for d in others), "only the poller is scheduled"


def test_a_served_deployment_carries_schedule_limit_and_tags() -> None:
    # The poller's settings on a flow that exists today, so this holds whether or not flows/poll.py is there yet.
    scheduled = replace(POLLER, entrypoint="flows/resources.py:imaging_lookup", flow_name="imaging-lookup")
    served = scheduled.to_runner_deployment()
    assert served.name == "gateway"
    assert served.entrypoint == "flows.resources.imaging_lookup"
    assert [s.schedule.interval.total_seconds() for s in served.schedules] == [60]
    assert served.concurrency_limit == 1
    assert served.concurrency_options is not None
    assert served.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert served.tags == list(POLLER.tags)
    assert served.enforce_parameter_schema is True

    faster = scheduled.to_runner_deployment(interval_s=15)
    assert [s.schedule.interval.total_seconds() for s in faster.schedules] == [15]
    unscheduled = by_full_name()["batch1/gateway"].to_runner_deployment(interval_s=15)
    assert unscheduled.schedules == [], "an interval override never schedules an on-request flow"


@pytest.mark.parametrize("name", [n for n, e in FLOWS.items() if e.payload is not None])
def test_a_payload_flow_publishes_its_input_model_as_the_run_form(name: str) -> None:
    entry = FLOWS[name]
    assert entry.payload is not None
    served = next(d for d in DEPLOYMENTS if d.flow_name == name).to_runner_deployment()
    schema: dict[str, Any] = served._parameter_openapi_schema.model_dump()
    assert schema["required"] == ["payload"]
    reference = schema["properties"]["payload"]["$ref"]
    model_schema = schema["definitions"][reference.rsplit("/", 1)[-1]]
    expected = entry.payload.model_json_schema(by_alias=True)
    assert set(model_schema["properties"]) == set(expected["properties"])
    assert set(model_schema.get("required", [])) == set(expected.get("required", []))
    # The UI's run form renders fields only from plain properties; `allOf`/`anyOf` at the top of a model's schema
    # turns it into a raw JSON box (the one-of-two rules are stated in the HIS API's OpenAPI document instead).
    assert not {"allOf", "anyOf", "oneOf"} & set(model_schema), sorted(model_schema)


def test_describe_lists_every_deployment_and_the_ui() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    poller = replace(POLLER, entrypoint="flows/resources.py:imaging_lookup")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4321/api"}):
        lines = describe([by_full_name()["batch4/gateway"], poller], [POLLER], limit=3, poll_interval_s=30)
    text = "\n".join(lines)
    assert "at most 3 flow runs at once" in text
    assert "batch4/gateway" in text and "on request" in text
    assert "every 30 s; at most 1 at once (CANCEL_NEW)" in text
    assert f"skipped poll-ris/gateway: {POLLER.entrypoint} is not in this checkout" in text
    assert "Prefect UI: http://127.0.0.1:4321/deployments" in text


def test_serve_refuses_to_run_without_a_prefect_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(ServeError, match="PREFECT_API_URL"):
        serve_gateway(limit=2)
    with pytest.raises(ServeError, match="--limit"):
        serve_gateway(limit=0)


def test_satset_serve_stops_on_missing_settings_naming_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in ("DCM4CHEE_URL", "ROUTER_IP", "SS_AUTH_URL", "SS_BASE_URL", "SS_ORG_ID", "SS_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SS_CLIENT_SECRET", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, ["--limit", "2"])
    assert result.exit_code == 1
    assert "DCM4CHEE_URL: is required but not set" in result.output
