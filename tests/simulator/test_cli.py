"""`satset simulator` options: faults armed at start-up parse into the same fault plan the admin endpoint fills."""

from __future__ import annotations

import pytest
import typer

from cli.simulator_cmd import _parse_fault, _parse_router_fault


def test_http_fault_options() -> None:
    assert _parse_fault("429:3").count == 3
    fraction = _parse_fault("500:0.05")
    assert (fraction.kind, fraction.count, fraction.fraction) == ("500", None, 0.05)
    with pytest.raises(typer.BadParameter, match="KIND"):
        _parse_fault("418:1")


def test_router_fault_options() -> None:
    abort = _parse_router_fault("abort:5:2")
    assert (abort.kind, abort.after_instances, abort.count) == ("abort", 5, 2)
    status = _parse_router_fault("status:0xA700")
    assert (status.kind, status.status, status.count) == ("status", 0xA700, 1)
    lose = _parse_router_fault("lose:1")
    assert (lose.kind, lose.after_instances, lose.count) == ("lose", 1, 1)
    with pytest.raises(typer.BadParameter, match="abort:AFTER"):
        _parse_router_fault("explode:1")
