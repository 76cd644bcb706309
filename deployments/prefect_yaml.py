"""prefect.yaml, generated from the deployment catalog and checked against it.

Prefect's own parser ignores keys it does not know, so a misspelt `concurency_limit` would deploy a poller
without its limit and nobody would notice. `problems()` therefore checks every key against an explicit list
(each entry one that Prefect 3.9 reads) and compares every deployment with `deployments.catalog`.

    python -m deployments.prefect_yaml            print the file the catalog implies
    python -m deployments.prefect_yaml --write    write it to ./prefect.yaml (the project root)
    python -m deployments.prefect_yaml --check    exit 1 listing every difference and unknown key
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from deployments.catalog import DEPLOYMENTS, GatewayDeployment
from deployments.zombies import HEARTBEAT_S, SILENT_AFTER_S

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"

WORK_POOL = "satset-process"
"""The process work pool the workers of a scaled-out gateway share."""

HOME_VARIABLE = "SATSET_HOME"
"""Where the gateway's code is on a worker host; the pull step makes it each run's working directory."""

PULL_STEPS: list[dict[str, Any]] = [
    {"prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ ${HOME_VARIABLE} }}}}"}}
]
"""Never empty: an omitted pull makes `prefect deploy` record the deploying machine's directory instead."""

# --- the keys Prefect reads (everything else is a typo that Prefect would silently drop) ---------------------

TOP_LEVEL_KEYS = frozenset({"prefect-version", "name", "build", "push", "pull", "deployments", "definitions"})
DEPLOYMENT_KEYS = frozenset(
    {
        "name",
        "version",
        "description",
        "tags",
        "entrypoint",
        "parameters",
        "enforce_parameter_schema",
        "schedules",
        "paused",
        "concurrency_limit",
        "work_pool",
        "triggers",
        "build",
        "push",
        "pull",
    }
)
JOB_VARIABLES: Final = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}}
"""What each worker-run flow run gets: heartbeats as often as `satset serve`'s runs (deployments/zombies.py), so
the automation that crashes a silent run never crashes a live one started by a worker."""
WORK_POOL_KEYS = frozenset({"name", "work_queue_name", "job_variables"})
CONCURRENCY_KEYS = frozenset({"limit", "collision_strategy", "grace_period_seconds"})
COLLISION_STRATEGIES = frozenset({"ENQUEUE", "CANCEL_NEW"})
SCHEDULE_KEYS = frozenset({"interval", "cron", "rrule", "timezone", "anchor_date", "active", "parameters", "day_or"})
STEP_RESERVED_KEYS = frozenset({"id", "requires"})
"""Keys every deployment step may carry besides its function's own arguments."""


def render(deployments: Iterable[GatewayDeployment] = DEPLOYMENTS) -> str:
    """The prefect.yaml text for `deployments`: one shared pull step, one work pool anchor, one entry each."""
    from prefect import __version__ as prefect_version

    header = f"""\
# The gateway's deployments for a Prefect work pool. Generated from deployments/catalog.py by
#   python -m deployments.prefect_yaml --write
# Edit the catalog, not this file: tests/deployments checks that the two agree and that every key is one
# Prefect reads (it silently ignores unknown ones). docs/deployment.md explains the setup:
#   prefect work-pool create {WORK_POOL} --type process
#   prefect --no-prompt deploy --all
#   {HOME_VARIABLE}=/path/to/this/checkout prefect worker start --pool {WORK_POOL}
name: satset-gateway
prefect-version: {prefect_version}

# Each run starts in the gateway's directory on the worker host (${HOME_VARIABLE}, read when the run starts),
# so the relative entrypoints resolve and a .env file there supplies the gateway's settings.
pull:
- prefect.deployments.steps.set_working_directory:
    directory: '{{{{ ${HOME_VARIABLE} }}}}'

definitions:
  work_pool: &satset_pool
    name: {WORK_POOL}
    work_queue_name: default
    # Runs beat every {HEARTBEAT_S} s; `satset serve`'s automation crashes one silent for {SILENT_AFTER_S} s.
    job_variables:
      env:
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: '{HEARTBEAT_S}'

deployments:
"""
    return header + "\n".join(_render_deployment(d) for d in deployments)


def _render_deployment(deployment: GatewayDeployment) -> str:
    entry = _expected_entry(deployment)
    entry.pop("work_pool")
    text = yaml.safe_dump(entry, sort_keys=False, default_flow_style=None, allow_unicode=True, width=118)
    lines = text.rstrip("\n").splitlines()
    body = [f"- {lines[0]}", *(f"  {line}" for line in lines[1:]), "  work_pool: *satset_pool"]
    return "\n".join(body) + "\n"


def _expected_entry(deployment: GatewayDeployment) -> dict[str, Any]:
    """The prefect.yaml mapping one catalog entry stands for (the same keys Prefect's deploy command reads)."""
    entry: dict[str, Any] = {
        "name": deployment.name,
        "entrypoint": deployment.entrypoint,
        "description": deployment.description,
        "tags": list(deployment.tags),
        "parameters": dict(deployment.parameters),
        "enforce_parameter_schema": deployment.enforce_parameter_schema,
    }
    if deployment.interval_s is not None:
        entry["schedules"] = [{"interval": deployment.interval_s}]
    if deployment.concurrency is not None:
        entry["concurrency_limit"] = {
            "limit": deployment.concurrency.limit,
            "collision_strategy": deployment.concurrency.collision_strategy,
        }
    entry["work_pool"] = {"name": WORK_POOL, "work_queue_name": "default", "job_variables": JOB_VARIABLES}
    return entry


def load(path: Path = PREFECT_YAML) -> dict[str, Any]:
    """The file as Prefect's CLI reads it (YAML anchors resolved)."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return document


def problems(document: Mapping[str, Any], deployments: Iterable[GatewayDeployment] = DEPLOYMENTS) -> list[str]:
    """Everything wrong with a loaded prefect.yaml: unknown keys, then every difference from the catalog."""
    return unknown_keys(document) + differences(document, deployments)


def unknown_keys(document: Mapping[str, Any]) -> list[str]:
    """Keys Prefect would ignore, and values it would reject later, each with its path in the file."""
    found = _unknown(document, TOP_LEVEL_KEYS, "")
    for action in ("build", "push", "pull"):
        found += _check_steps(document.get(action), action)
    entries = document.get("deployments")
    if not isinstance(entries, list):
        return [*found, "deployments: expected a list"]
    for index, entry in enumerate(entries):
        where = f"deployments[{index}]"
        if not isinstance(entry, dict):
            found.append(f"{where}: expected a mapping")
            continue
        found += _unknown(entry, DEPLOYMENT_KEYS, where)
        for action in ("build", "push", "pull"):
            found += _check_steps(entry.get(action), f"{where}.{action}")
        work_pool = entry.get("work_pool")
        if isinstance(work_pool, dict):
            found += _unknown(work_pool, WORK_POOL_KEYS, f"{where}.work_pool")
        elif work_pool is not None:
            found.append(f"{where}.work_pool: expected a mapping")
        found += _check_concurrency(entry.get("concurrency_limit"), f"{where}.concurrency_limit")
        for number, schedule in enumerate(entry.get("schedules") or []):
            if isinstance(schedule, dict):
                found += _unknown(schedule, SCHEDULE_KEYS, f"{where}.schedules[{number}]")
            else:
                found.append(f"{where}.schedules[{number}]: expected a mapping")
    if not found:
        found += _prefect_rejects(document)
    return found


def differences(document: Mapping[str, Any], deployments: Iterable[GatewayDeployment] = DEPLOYMENTS) -> list[str]:
    """Where the file's deployments differ from the catalog: missing, extra, or any field not the same."""
    found: list[str] = []
    if document.get("pull") != PULL_STEPS:
        found.append(f"pull: expected {PULL_STEPS}, found {document.get('pull')}")
    declared: dict[str, dict[str, Any]] = {}
    for entry in document.get("deployments") or []:
        if isinstance(entry, dict):
            key = str(entry.get("entrypoint"))
            if key in declared:
                found.append(f"{key}: declared twice")
            declared[key] = entry
    expected = {d.entrypoint: d for d in deployments}
    for entrypoint in sorted(declared.keys() - expected.keys()):
        found.append(f"{entrypoint}: in prefect.yaml but not in deployments/catalog.py")
    for entrypoint in sorted(expected.keys() - declared.keys()):
        found.append(f"{entrypoint}: in deployments/catalog.py but not in prefect.yaml")
    for entrypoint in sorted(expected.keys() & declared.keys()):
        want = _expected_entry(expected[entrypoint])
        have = declared[entrypoint]
        for key in sorted(want.keys() | have.keys()):
            if _normalised(key, have.get(key)) != _normalised(key, want.get(key)):
                found.append(
                    f"{entrypoint}: {key} is {have.get(key)!r} in prefect.yaml, {want.get(key)!r} in the catalog"
                )
    return found


def _normalised(key: str, value: Any) -> Any:
    """Compare what Prefect would deploy: omitted and empty parameters are the same, tag order is not meaningful."""
    if key == "parameters":
        return value or {}
    if key == "tags" and isinstance(value, list):
        return sorted(map(str, value))
    return value


def _unknown(mapping: Mapping[str, Any], allowed: frozenset[str], where: str) -> list[str]:
    prefix = f"{where}." if where else ""
    return [f"{prefix}{key}: not a key Prefect reads here" for key in mapping if key not in allowed]


def _check_concurrency(value: Any, where: str) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return []
    if not isinstance(value, dict):
        return [f"{where}: expected an integer or a mapping"]
    found = _unknown(value, CONCURRENCY_KEYS, where)
    strategy = value.get("collision_strategy")
    if strategy is not None and strategy not in COLLISION_STRATEGIES:
        found.append(f"{where}.collision_strategy: {strategy!r} is not one of {sorted(COLLISION_STRATEGIES)}")
    return found


def _check_steps(steps: Any, where: str) -> list[str]:
    """Each step is one mapping {importable.function: {its arguments}}; arguments must be the function's own."""
    if steps is None:
        return []
    if not isinstance(steps, list):
        return [f"{where}: expected a list of steps"]
    found: list[str] = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            found.append(f"{where}[{index}]: expected one mapping {{step.function: {{arguments}}}}")
            continue
        ((name, arguments),) = step.items()
        function = _step_function(name)
        if function is None:
            found.append(f"{where}[{index}]: {name} is not an importable step function")
            continue
        parameters = inspect.signature(function).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        allowed = frozenset(parameters) | STEP_RESERVED_KEYS
        found += _unknown(arguments or {}, allowed, f"{where}[{index}].{name}")
    return found


def _step_function(name: str) -> Callable[..., Any] | None:
    module, _, attribute = name.rpartition(".")
    try:
        value = getattr(importlib.import_module(module), attribute, None)
    except ImportError:
        return None
    return value if callable(value) else None


def _prefect_rejects(document: Mapping[str, Any]) -> list[str]:
    """Types and values as Prefect's own parser of prefect.yaml checks them (it is lenient only about keys)."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from pydantic import ValidationError

    try:
        PrefectYamlModel.model_validate(dict(document))
    except ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.prefect_yaml", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {PREFECT_YAML}")
    action.add_argument("--check", action="store_true", help=f"compare {PREFECT_YAML} with the catalog")
    options = parser.parse_args(argv)
    if options.write:
        PREFECT_YAML.write_text(render(), encoding="utf-8")
        print(f"wrote {PREFECT_YAML}")
        return 0
    if options.check:
        found = problems(load())
        for problem in found:
            print(problem, file=sys.stderr)
        print(f"{PREFECT_YAML}: {'OK' if not found else f'{len(found)} problem(s)'}")
        return 1 if found else 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
