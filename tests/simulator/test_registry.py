"""The registries: people looked up by NIK as the platform answers it, entries loaded from a file, the admin
endpoint and the CLI, and the id formats (simulator/registry.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli import simulator_cmd
from cli.app import app as cli_app
from simulator.config import SimulatorConfig
from simulator.registry import NIK_SYSTEM, Registry, RegistryError
from simulator.server import start_simulator
from tests.plugins.simulator import SimulatorSession


@pytest.mark.parametrize(
    ("kind", "nik", "ihs"),
    [("Patient", "9900000000000001", "P10443013727"), ("Practitioner", "9900000000000101", "10016869420")],
)
def test_nik_search_answers_a_searchset_with_the_ihs_id(
    simulator: SimulatorSession, kind: str, nik: str, ihs: str
) -> None:
    for query in (f"identifier={NIK_SYSTEM}|{nik}", f"identifier={NIK_SYSTEM}%7C{nik}"):
        response = simulator.fhir("GET", f"{kind}?{query}")
        assert response.status_code == 200
        bundle = response.json()
        assert (bundle["resourceType"], bundle["type"], bundle["total"]) == ("Bundle", "searchset", 1)
        [entry] = bundle["entry"]
        assert entry["resource"]["resourceType"] == kind and entry["resource"]["id"] == ihs
        assert entry["fullUrl"].endswith(f"/{kind}/{ihs}")
        assert entry["resource"]["identifier"][0] == {"use": "official", "system": NIK_SYSTEM, "value": nik}
        assert entry["resource"]["name"][0]["text"]
    read = simulator.fhir("GET", f"{kind}/{ihs}")
    assert read.status_code == 200 and read.json()["id"] == ihs


@pytest.mark.parametrize("kind", ["Patient", "Practitioner"])
def test_unknown_nik_is_an_empty_searchset(simulator: SimulatorSession, kind: str) -> None:
    response = simulator.fhir("GET", f"{kind}?identifier={NIK_SYSTEM}|9900000000009999")
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["total"] == 0 and "entry" not in bundle and bundle["type"] == "searchset"
    unknown = simulator.fhir("GET", f"{kind}/P99999999999")
    assert unknown.status_code == 404 and "RuleNumber: 20007" in unknown.json()["issue"][0]["details"]["text"]


def test_nik_search_needs_a_token(simulator: SimulatorSession) -> None:
    response = simulator.http.get(f"{simulator.running.fhir_url}/Patient?identifier={NIK_SYSTEM}|9900000000000001")
    assert response.status_code == 401


def test_admin_endpoint_registers_and_a_reference_to_it_then_resolves(simulator: SimulatorSession) -> None:
    admin = f"{simulator.running.base_url}/admin/registry"
    patient = {"id": "P12345678901", "nik": "9900000000000777", "name": "Pasien Baru"}
    assert simulator.http.post(admin, json={"Patient": [patient]}).json() == {"added": 1}
    found = simulator.fhir("GET", f"Patient?identifier={NIK_SYSTEM}|9900000000000777").json()
    assert found["entry"][0]["resource"]["id"] == "P12345678901"
    assert any(p["id"] == "P12345678901" for p in simulator.http.get(admin).json()["Patient"])
    bad = simulator.http.post(admin, json={"Patient": [{"id": "abc-123"}]})
    assert bad.status_code == 400 and "format" in bad.json()["issue"][0]["details"]["text"]


@pytest.mark.parametrize(
    ("data", "wrong"),
    [
        ({"Patient": [{"id": "P123"}]}, "format"),
        ({"Patient": [{"id": "abc-123"}]}, "format"),
        ({"Practitioner": [{"id": "xyz"}]}, "format"),
        ({"Location": [{"id": "None"}]}, "format"),
        ({"Organization": [{"id": "org"}]}, "format"),
        ({"Patient": [{"id": "P12345678901", "nik": "123"}]}, "16 digits"),
        ({"Device": []}, "keys"),
    ],
)
def test_entries_without_the_platform_id_format_are_refused(data: dict[str, object], wrong: str) -> None:
    with pytest.raises(RegistryError, match=wrong):
        Registry("100012345").add(data)


@pytest.mark.parametrize(
    ("kind", "ident"),
    [
        ("Patient", "P02478375538"),
        ("Patient", "100000030009"),
        ("Practitioner", "10016869420"),
        ("Practitioner", "N10000001"),
        ("Location", "ef011065-38c9-46f8-9c35-d1fe68966a3e"),
        ("Organization", "10000004"),
        ("Organization", "100012345"),
    ],
)
def test_the_seed_has_the_public_example_and_project_ids(kind: str, ident: str) -> None:
    assert Registry.seeded("100012345").has(kind, ident)


def test_a_registry_file_is_loaded_at_start(tmp_path: Path) -> None:
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"Location": [{"id": "0f0e0d0c-0b0a-4909-8807-060504030201"}]}))
    config = SimulatorConfig(router_enabled=False, registry_files=(registry_file,))
    with start_simulator(config) as running:
        assert running.platform.registry.has("Location", "0f0e0d0c-0b0a-4909-8807-060504030201")
        assert running.platform.registry.has("Patient", "P10443013727")  # the seed stays


def test_the_cli_refuses_a_bad_registry_file(tmp_path: Path) -> None:
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"Patient": [{"id": "abc-123"}]}))
    result = CliRunner().invoke(cli_app, ["simulator", "--registry", str(registry_file), "--port", "0"])
    assert result.exit_code != 0
    assert "abc-123" in result.output and "--registry" in result.output


def test_the_cli_passes_registry_files_and_strict_undocumented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SimulatorConfig] = []

    def capture(config: SimulatorConfig) -> None:
        seen.append(config)
        raise RegistryError("stop here")

    monkeypatch.setattr(simulator_cmd, "start_simulator", capture)
    registry_file = tmp_path / "registry.json"
    CliRunner().invoke(cli_app, ["simulator", "--registry", str(registry_file), "--strict-undocumented"])
    CliRunner().invoke(cli_app, ["simulator"])
    assert seen[0].registry_files == (registry_file,) and seen[0].strict_undocumented is True
    assert seen[1].registry_files == () and seen[1].strict_undocumented is False


def test_person_routes_do_not_hide_the_generic_search(simulator: SimulatorSession) -> None:
    response = simulator.fhir("GET", "Encounter?identifier=x|y")
    assert response.status_code == 200 and response.json()["total"] == 0
    assert isinstance(simulator.http, httpx.Client)
