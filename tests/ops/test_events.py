"""tasks/events.py without a server: the halfway alarm's arithmetic, and that an alert never fails its caller."""

from __future__ import annotations

from typing import Any

import pytest

import tasks.events as events


def test_the_halfway_alarm_fires_once_past_half_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(events, "imaging_study_wait_slow", lambda *args: sent.append(args) or True)
    now = [100.0]
    alarm = events.HalfwayAlarm("ACSN1", 300.0, clock=lambda: now[0])

    now[0] = 249.0  # 149 s of 300
    assert not alarm.check("no ImagingStudy yet") and sent == []
    now[0] = 250.0  # 150 s: half
    assert alarm.check("the ImagingStudy lists 1 of 2 instances sent")
    now[0] = 390.0
    assert not alarm.check("still 1 of 2")
    assert sent == [("ACSN1", 150.0, 300.0, "the ImagingStudy lists 1 of 2 instances sent")]


def test_an_event_that_cannot_be_emitted_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**_: Any) -> None:
        raise RuntimeError("events worker gone")

    monkeypatch.setattr("prefect.events.emit_event", broken)
    assert events.order_dead("ACSN2", 4, "refused") is False
    assert "satset.order.dead" in caplog.text and "ACSN2" in caplog.text


def test_a_long_reason_is_cut_to_keep_the_event_small(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def capture(**kwargs: Any) -> object:
        seen.update(kwargs)
        return object()

    monkeypatch.setattr("prefect.events.emit_event", capture)
    assert events.order_dead("ACSN3", 1, "x" * 5000, attempts=5)
    assert len(seen["payload"]["reason"]) == events.MAX_REASON_CHARS
    assert seen["resource"] == {"prefect.resource.id": "satset.order.ACSN3", "prefect.resource.name": "ACSN3"}
    assert seen["payload"]["attempts"] == 5 and seen["payload"]["run_url"] == ""
