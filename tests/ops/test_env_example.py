""".env.example and the README's tables name every setting the gateway reads, each explained; the example loads.

The settings are found by walking every pydantic-settings class in models/settings.py, so a setting added there
without a line in .env.example or the README fails here, naming it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

import models.settings
from models.settings import ApiSettings, RisSettings, Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
ASSIGNMENT = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$")


def gateway_settings() -> dict[str, str]:
    """Every environment name read by a settings class of models/settings.py, with the class that reads it."""
    names: dict[str, str] = {}
    for class_name, cls in inspect.getmembers(models.settings, inspect.isclass):
        if not issubclass(cls, BaseSettings) or cls.__module__ != models.settings.__name__:
            continue
        for field_name, field in cls.model_fields.items():
            for alias in _aliases(field_name, field.alias, field.validation_alias):
                names.setdefault(alias, class_name)
    return names


def _aliases(field_name: str, alias: str | None, validation_alias: object) -> list[str]:
    if isinstance(validation_alias, AliasChoices):
        return [choice for choice in validation_alias.choices if isinstance(choice, str)]
    if isinstance(validation_alias, str):
        return [validation_alias]
    return [alias or field_name.upper()]


def example_lines() -> dict[str, tuple[str, str]]:
    """NAME -> (its comment line, its value) for each `NAME=value` or `# NAME=value` line of .env.example."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    found: dict[str, tuple[str, str]] = {}
    for index, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if match:
            comment = lines[index - 1] if index else ""
            found[match.group(1)] = (comment, match.group(2))
    return found


def test_the_walk_finds_the_known_settings() -> None:
    names = gateway_settings()
    assert {"DCM4CHEE_URL", "PACS_TIMEOUT_S", "RIS_DATABASE_URL", "API_KEY", "LOG_FILE"} <= set(names)


@pytest.mark.parametrize("name", sorted(gateway_settings()))
def test_every_setting_is_in_env_example_with_a_comment(name: str) -> None:
    found = example_lines()
    assert name in found, f"{name} ({gateway_settings()[name]}) is missing from .env.example"
    comment, _ = found[name]
    assert comment.startswith("# ") and not ASSIGNMENT.match(comment), f"{name}: no one-line comment above it"


@pytest.mark.parametrize("name", sorted(gateway_settings()))
def test_every_setting_is_in_the_readme(name: str) -> None:
    assert f"`{name}`" in README.read_text(), f"{name} ({gateway_settings()[name]}) is missing from README.md"


def test_the_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filled in as shipped, .env.example passes validation: the shapes it shows are the shapes accepted."""
    for name in gateway_settings():
        monkeypatch.delenv(name, raising=False)
    for model in (Settings, RisSettings, ApiSettings):
        model(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]


def test_the_example_holds_no_real_secret() -> None:
    values = {name: value for name, (_, value) in example_lines().items()}
    for name in ("SS_CLIENT_SECRET", "SS_CLIENT_ID", "API_KEY"):
        assert values[name].startswith("change-me"), name
