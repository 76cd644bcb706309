"""prefect.yaml: only keys Prefect reads (its parser drops unknown ones silently), and the same deployments as
deployments/catalog.py, names, schedules, limits and tags."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from deployments.catalog import DEPLOYMENTS
from deployments.prefect_yaml import (
    CONCURRENCY_KEYS,
    DEPLOYMENT_KEYS,
    PREFECT_YAML,
    SCHEDULE_KEYS,
    TOP_LEVEL_KEYS,
    WORK_POOL,
    WORK_POOL_KEYS,
    differences,
    load,
    problems,
    render,
    unknown_keys,
)


@pytest.fixture
def document() -> dict[str, Any]:
    return load(PREFECT_YAML)


def _entry(document: dict[str, Any], entrypoint: str) -> dict[str, Any]:
    return next(e for e in document["deployments"] if e["entrypoint"] == entrypoint)


def test_prefect_yaml_has_only_known_keys_and_matches_the_catalog(document: dict[str, Any]) -> None:
    assert problems(document) == []


def test_the_generated_file_matches_the_catalog_too() -> None:
    assert problems(yaml.safe_load(render())) == []


def test_every_deployment_uses_the_process_pool_from_one_anchor(document: dict[str, Any]) -> None:
    text = PREFECT_YAML.read_text()
    assert "definitions:\n  work_pool: &satset_pool\n" in text
    assert text.count("work_pool: *satset_pool") == len(document["deployments"]) == len(DEPLOYMENTS)
    assert {e["work_pool"]["name"] for e in document["deployments"]} == {WORK_POOL} == {"satset-process"}


def test_runs_start_in_the_gateway_directory_named_by_an_environment_variable(document: dict[str, Any]) -> None:
    # An empty or missing pull would make `prefect deploy` record the deploying machine's directory instead.
    (step,) = document["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SATSET_HOME }}"}}


def test_the_poller_entry_has_its_schedule_limit_and_tag(document: dict[str, Any]) -> None:
    poller = _entry(document, "flows/poll.py:poll_ris")
    assert poller["name"] == "gateway"
    assert poller["schedules"] == [{"interval": 60}]
    assert poller["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert "ris" in poller["tags"]


@pytest.mark.parametrize(
    ("where", "typo", "expected"),
    [
        ("top", "deployment", "deployment: not a key Prefect reads here"),
        ("deployment", "concurency_limit", "deployments[{i}].concurency_limit: not a key Prefect reads here"),
        ("deployment", "schedule", "deployments[{i}].schedule: not a key Prefect reads here"),
        ("work_pool", "work_queue", "deployments[{i}].work_pool.work_queue: not a key Prefect reads here"),
        ("concurrency", "strategy", "deployments[{i}].concurrency_limit.strategy: not a key Prefect reads here"),
        ("schedule", "intervall", "deployments[{i}].schedules[0].intervall: not a key Prefect reads here"),
        ("pull", "dir", "pull[0].prefect.deployments.steps.set_working_directory.dir: not a key Prefect reads here"),
    ],
)
def test_a_misspelt_key_anywhere_is_reported(document: dict[str, Any], where: str, typo: str, expected: str) -> None:
    broken = copy.deepcopy(document)
    (i,) = [n for n, e in enumerate(broken["deployments"]) if e["entrypoint"] == "flows/poll.py:poll_ris"]
    poller = broken["deployments"][i]
    target = {
        "top": broken,
        "deployment": poller,
        "work_pool": poller["work_pool"],
        "concurrency": poller["concurrency_limit"],
        "schedule": poller["schedules"][0],
        "pull": broken["pull"][0]["prefect.deployments.steps.set_working_directory"],
    }[where]
    target[typo] = "x"
    assert expected.format(i=i) in unknown_keys(broken)


def test_bad_values_are_reported(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    poller = _entry(broken, "flows/poll.py:poll_ris")
    poller["concurrency_limit"]["collision_strategy"] = "CANCEL_OLD"
    broken["pull"].append({"prefect.deployments.steps.no_such_step": {}})
    found = unknown_keys(broken)
    assert any("collision_strategy: 'CANCEL_OLD' is not one of" in p for p in found)
    assert any("no_such_step is not an importable step function" in p for p in found)

    wrong_type = copy.deepcopy(document)
    _entry(wrong_type, "flows/batches.py:batch1")["enforce_parameter_schema"] = "maybe"
    assert any("enforce_parameter_schema" in p for p in unknown_keys(wrong_type)), "Prefect's own type check runs"


def test_any_difference_from_the_catalog_is_reported(document: dict[str, Any]) -> None:
    changed = copy.deepcopy(document)
    poller = _entry(changed, "flows/poll.py:poll_ris")
    poller["schedules"] = [{"interval": 30}]
    poller["concurrency_limit"]["limit"] = 2
    poller["tags"].remove("ris")
    _entry(changed, "flows/batches.py:batch4")["name"] = "default"
    changed["deployments"] = [e for e in changed["deployments"] if e["entrypoint"] != "flows/dicom.py:dicom_process"]
    changed["deployments"].append({**_entry(document, "flows/batches.py:batch1"), "entrypoint": "flows/x.py:y"})
    changed["pull"] = []
    found = "\n".join(differences(changed))
    assert "flows/poll.py:poll_ris: schedules is [{'interval': 30}]" in found
    assert "flows/poll.py:poll_ris: concurrency_limit" in found
    assert "flows/poll.py:poll_ris: tags" in found
    assert "flows/batches.py:batch4: name is 'default'" in found
    assert "flows/dicom.py:dicom_process: in deployments/catalog.py but not in prefect.yaml" in found
    assert "flows/x.py:y: in prefect.yaml but not in deployments/catalog.py" in found
    assert "pull: expected" in found


def test_the_whitelist_holds_only_keys_prefect_itself_reads() -> None:
    from prefect.cli.deploy._models import (
        ConcurrencyLimitSpec,
        DeploymentConfig,
        PrefectYamlModel,
        RawScheduleConfig,
        WorkPoolConfig,
    )

    top = {f.alias or name for name, f in PrefectYamlModel.model_fields.items()}
    assert TOP_LEVEL_KEYS - {"definitions"} <= top  # `definitions` holds YAML anchors; Prefect's docs suggest it
    assert set(DeploymentConfig.model_fields) >= DEPLOYMENT_KEYS
    assert set(WorkPoolConfig.model_fields) >= WORK_POOL_KEYS
    assert set(ConcurrencyLimitSpec.model_fields) >= CONCURRENCY_KEYS
    assert set(RawScheduleConfig.model_fields) >= SCHEDULE_KEYS
