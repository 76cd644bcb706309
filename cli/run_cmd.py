"""`satset run FLOW --params FILE.json`: run one flow here and now, print its result as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from models.settings import SettingsError, load_settings


def run(
    flow_name: Annotated[str, typer.Argument(metavar="FLOW", help="batch1-4, dicom-process, encounter, ...")],
    params: Annotated[
        Path | None, typer.Option("--params", help="JSON file with the flow's input ('-' reads stdin).")
    ] = None,
) -> None:
    """Run a gateway flow locally with the input in a JSON file; exit non-zero with a clear message on failure."""
    from flows import FLOWS

    entry = FLOWS.get(flow_name)
    if entry is None:
        _fail(f"unknown flow {flow_name!r}; one of: {', '.join(FLOWS)}")
    try:
        load_settings()
    except SettingsError as error:
        _fail(str(error))
    data = _read_params(params)
    try:
        arguments: dict[str, Any] = (
            {"payload": entry.payload.model_validate(data)} if entry.payload is not None else dict(data)
        )
    except ValidationError as error:
        _fail(_describe_invalid(error))
    except (ValueError, OverflowError) as error:  # a value no validator foresaw: one line, not a traceback
        _fail(f"invalid input: {type(error).__name__}: {error}")
    try:
        result = asyncio.run(entry.flow(**arguments))
    except Exception as error:
        _fail(str(error) or type(error).__name__)
    typer.echo(json.dumps(result, indent=2, default=str))


def _read_params(params: Path | None) -> dict[str, Any]:
    if params is None:
        return {}
    try:
        text = sys.stdin.read() if str(params) == "-" else params.read_text()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as error:
        _fail(f"--params {params}: {error}")
    if not isinstance(data, dict):
        _fail(f"--params {params}: expected a JSON object")
    return data


def _describe_invalid(error: ValidationError) -> str:
    lines = [f"{'.'.join(str(p) for p in item['loc']) or 'input'}: {item['msg']}" for item in error.errors()]
    return "invalid input:\n  " + "\n  ".join(lines)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
