"""batch4's wait for the router's ImagingStudy and its re-send policy, on scripted steps (no platform, no router):
which answers at the deadline lead to a re-send, and which ImagingStudy of several is linked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from clients.errors import ImagingStudyNotReady
from flows import batches
from flows.batches import Steps, _imaging_study
from tasks.fhir import ImagingStudyAbsent, choose_imaging_study

EXPECTED = 3


class Script:
    """Scripted `wait_for_imaging_study` answers, in order, and a record of every call and re-send."""

    def __init__(self, *answers: dict[str, Any] | type[Exception]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, Any]] = []

    async def wait(
        self, acsn: str, expected: int, deadline_s: float, study_instance_uid: str | None = None, **options: Any
    ) -> dict[str, Any]:
        self.calls.append(("wait", (deadline_s, options.get("accept_incomplete", False))))
        answer = self.answers.pop(0)
        if isinstance(answer, type):
            raise answer("scripted")
        return answer

    async def route_again(self, *args: Any) -> dict[str, Any]:
        self.calls.append(("resend", args))
        return {}

    def steps(self) -> Steps:
        async def unused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("not part of the wait")

        return Steps(
            post_encounter=unused,
            post_service_request=unused,
            post_observation=unused,
            post_diagnostic_report=unused,
            wait_for_imaging_study=self.wait,
            locate_study=unused,
            check_router=unused,
            resolve_people=unused,
            route_study=unused,
            route_study_again=self.route_again,
        )

    def run(self) -> dict[str, Any]:
        return asyncio.run(_imaging_study(self.steps(), "1.2.3", "ACC1", "P1", EXPECTED, {"study_time": "101500"}))


@pytest.fixture(autouse=True)
def settings(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    values = SimpleNamespace(
        imaging_study_deadline_s=10.0, imaging_study_resend=True, imaging_study_resend_grace_s=60.0
    )
    monkeypatch.setattr(batches.runtime, "settings", lambda: values)
    return values


def study(instances: int, id_: str = "IS1") -> dict[str, Any]:
    return {"id": id_, "series": 1, "instances": instances, "duplicates": []}


def test_complete_in_time_is_taken_without_a_resend() -> None:
    script = Script(study(EXPECTED))
    assert script.run()["id"] == "IS1"
    assert script.calls == [("wait", (10.0, False))]


def test_none_at_the_deadline_then_complete_within_the_grace_is_taken_without_a_resend() -> None:
    script = Script(ImagingStudyAbsent, study(EXPECTED))
    assert script.run()["instances"] == EXPECTED
    assert script.calls == [("wait", (10.0, False)), ("wait", (60.0, True))]


def test_none_at_the_deadline_then_an_incomplete_one_is_sent_again_at_once() -> None:
    script = Script(ImagingStudyAbsent, study(1), study(EXPECTED))
    assert script.run()["instances"] == EXPECTED
    assert [kind for kind, _ in script.calls] == ["wait", "wait", "resend", "wait"]
    assert script.calls[2] == ("resend", ("1.2.3", "ACC1", "P1", {"study_time": "101500"}))


def test_none_even_after_the_grace_is_sent_again() -> None:
    script = Script(ImagingStudyAbsent, ImagingStudyAbsent, study(EXPECTED))
    script.run()
    assert [kind for kind, _ in script.calls] == ["wait", "wait", "resend", "wait"]


def test_an_incomplete_one_at_the_deadline_is_sent_again_without_the_grace() -> None:
    script = Script(ImagingStudyNotReady, study(EXPECTED))
    script.run()
    assert [kind for kind, _ in script.calls] == ["wait", "resend", "wait"]


def test_without_a_grace_none_at_the_deadline_is_sent_again_at_once(settings: SimpleNamespace) -> None:
    settings.imaging_study_resend_grace_s = 0.0
    script = Script(ImagingStudyAbsent, study(EXPECTED))
    script.run()
    assert [kind for kind, _ in script.calls] == ["wait", "resend", "wait"]


@pytest.mark.parametrize("late", [ImagingStudyAbsent, ImagingStudyNotReady])
def test_resend_switched_off_fails_instead(settings: SimpleNamespace, late: type[Exception]) -> None:
    settings.imaging_study_resend = False
    script = Script(late)
    with pytest.raises(late):
        script.run()
    assert [kind for kind, _ in script.calls] == ["wait"]


def test_of_several_the_complete_one_is_chosen_and_the_others_reported() -> None:
    newest_first = [study(1, "NEW"), study(EXPECTED, "OLD")]
    assert choose_imaging_study(newest_first, EXPECTED) == {**study(EXPECTED, "OLD"), "duplicates": ["NEW"]}


def test_of_equally_complete_ones_the_oldest_is_chosen() -> None:
    newest_first = [study(EXPECTED, "C"), study(EXPECTED, "B"), study(1, "A")]
    chosen = choose_imaging_study(newest_first, EXPECTED)
    assert chosen["id"] == "B" and chosen["duplicates"] == ["C", "A"]


def test_one_alone_has_no_duplicates() -> None:
    assert choose_imaging_study([study(2)], EXPECTED)["duplicates"] == []
