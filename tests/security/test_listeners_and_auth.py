"""Who may call and where anyone can connect.

* The HIS API answers 401 on every operation of its own OpenAPI document (and on paths and methods it does not
  have) unless the call carries a valid credential; only the documented open paths answer without one.
  tests/api/test_auth.py checks the answer's shape on a handful of paths; here the list comes from the document, so
  an endpoint added later is covered without anyone remembering to add it.
* Credentials are compared in constant time: every comparison goes through `hmac.compare_digest`, on SHA-256
  digests of equal length, user and password both compared whatever the first gave (shown by recording the calls,
  not by timing anything).
* The simulator's admin endpoint (fault injection, inspection, reset) exists only when enabled: every admin route
  of an enabled simulator is 404 on one that is not, including the `satset simulator` default.
* Every listener binds 127.0.0.1 unless configured otherwise: the simulator's HTTP and DICOM Router, `satset api`,
  `satset simulator`, dcmtk's storescp, and the whole demo stack (Orthanc, the Prefect server, `satset serve`,
  `satset api`), read from /proc for the process tree; a configured address (127.0.0.2) is honoured.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import api.auth
from api.app import OPEN_PATHS, create_app
from simulator.app import create_app as create_simulator_app
from simulator.config import SimulatorConfig
from simulator.faults import Faults
from simulator.platform import Platform
from simulator.server import start_simulator
from simulator.store import Store
from stack.dcmtk import StoreSCP
from tests.api.conftest import API_KEY, BASIC_PASSWORD, BASIC_USER, api_settings, basic
from tests.security.leaks import LeakScanner
from tests.security.sockets import descendants, exposed, listeners

pytestmark = pytest.mark.anyio

DOCUMENTED_OPEN = {"/api/satset/halo", "/api/docs", "/api/docs/oauth2-redirect", "/api/openapi.json"}
"""docs/his-integration.md §1: the health check and the documentation (Swagger UI, its OAuth2 redirect page)."""

WRONG_CREDENTIALS = {
    "no credentials": {},
    "wrong key": {"X-API-Key": API_KEY[:-1] + ("X" if API_KEY[-1] != "X" else "Y")},
    "wrong Basic password": basic(BASIC_USER, BASIC_PASSWORD + "x"),
    "wrong Basic user": basic(BASIC_USER + "x", BASIC_PASSWORD),
    "key sent as Bearer": {"Authorization": f"Bearer {API_KEY}"},
}


class UntouchableBackend:
    """A flow backend that records any use: a refused call must never reach a flow run."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(name)
        raise AssertionError(f"the flow backend was used ({name}) by a call that should have been refused")


# --- the HIS API: 401 everywhere but the open paths ---------------------------------------------------------


def operations(document: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(METHOD, concrete path, declared open) for every operation of an OpenAPI document."""
    found = []
    for template, item in document["paths"].items():
        path = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", template)
        for method, operation in item.items():
            if method in {"get", "put", "post", "delete", "patch", "head", "options"}:
                found.append((method.upper(), path, operation.get("security") == []))
    return found


async def test_every_operation_of_the_openapi_document_refuses_calls_without_a_valid_credential() -> None:
    backend = UntouchableBackend()
    app = create_app(api_settings(), flows=backend)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        document = (await client.get("/api/openapi.json")).json()
        listed = operations(document)
        declared_open = {path for _method, path, open_ in listed if open_}
        # The document declares open exactly what the middleware lets through, and both are what the docs say.
        assert set(OPEN_PATHS) == DOCUMENTED_OPEN
        assert declared_open == {"/api/satset/halo"}
        protected = [(method, path) for method, path, open_ in listed if not open_]
        known = {f"/api/satset/{name}" for name in ("token", "encounter", "service-req", "observation")}
        known |= {f"/api/satset/batch{n}" for n in range(1, 5)} | {"/api/satset/conclusion", "/api/dicom/process"}
        # The old gateway's endpoints but the health check, and /api/runs/{id}, at least.
        assert known | {"/api/satset/imageid/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12} <= {p for _m, p in protected}
        assert len(protected) >= 12 and any(p.startswith("/api/runs/") for _m, p in protected), protected

        refused = []
        for method, path in protected:
            for why, headers in WRONG_CREDENTIALS.items():
                answer = await client.request(method, path, json={"noacsn": "ACC1"}, headers=headers)
                if answer.status_code != 401 or "WWW-Authenticate" not in answer.headers:
                    refused.append(f"{method} {path} ({why}): {answer.status_code}")
                assert API_KEY not in answer.text and BASIC_PASSWORD not in answer.text
        assert refused == []

        # Methods and paths the document does not have are refused too: nothing can be enumerated anonymously.
        for method, path in [
            ("DELETE", "/api/satset/batch4"),
            ("OPTIONS", "/api/satset/batch4"),
            ("HEAD", "/api/satset/token"),
            ("GET", "/api/satset/halo/"),
            ("GET", "/API/satset/halo"),
            ("POST", "/api/satset/halo"),  # an open path is open to everything, but routes only GET
            ("GET", "/api/docs/../satset/token"),
            ("GET", "/api/satset/imageid/%2e%2e%2ftoken"),
            ("GET", "/admin/state"),
        ]:
            answer = await client.request(method, path)
            expected = {405} if path == "/api/satset/halo" else {401}
            assert answer.status_code in expected, (method, path, answer.status_code)

        # The open ones answer without credentials.
        for path in sorted(DOCUMENTED_OPEN - {"/api/docs/oauth2-redirect"}):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/api/docs/oauth2-redirect")).status_code == 200
    assert backend.touched == []


# --- constant-time comparison -----------------------------------------------------------------------------


class Recorder:
    """hmac.compare_digest, recording its arguments."""

    def __init__(self) -> None:
        import hmac

        self.real = hmac.compare_digest
        self.calls: list[tuple[bytes, bytes]] = []

    def compare_digest(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self.real(a, b)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recording = Recorder()
    monkeypatch.setattr(api.auth, "hmac", SimpleNamespace(compare_digest=recording.compare_digest))
    return recording


@pytest.mark.parametrize(
    ("headers", "accepted", "comparisons"),
    [
        pytest.param({"X-API-Key": API_KEY}, True, 1, id="right-key"),
        pytest.param({"X-API-Key": "x"}, False, 1, id="one-character-key"),
        pytest.param({"X-API-Key": API_KEY + "x" * 500}, False, 1, id="long-key"),
        pytest.param({"X-API-Key": API_KEY[:-1] + "?"}, False, 1, id="last-character-wrong"),
        pytest.param(basic(BASIC_USER, BASIC_PASSWORD), True, 2, id="right-basic"),
        pytest.param(basic("someone-else", BASIC_PASSWORD), False, 2, id="wrong-user-password-still-compared"),
        pytest.param(basic(BASIC_USER, "guess"), False, 2, id="wrong-password"),
    ],
)
async def test_every_credential_comparison_is_compare_digest_on_equal_length_digests(
    recorder: Recorder, headers: dict[str, str], accepted: bool, comparisons: int
) -> None:
    guard = api.auth.Guard.from_settings(api_settings(), OPEN_PATHS)
    assert guard is not None
    configured = {guard.api_key, guard.basic_user, guard.basic_password}
    # Only digests are kept: the secrets themselves are nowhere in the guard.
    assert all(isinstance(d, bytes) and len(d) == 32 for d in configured)
    assert not any(secret.encode() in repr(guard).encode() for secret in (API_KEY, BASIC_PASSWORD))

    app = create_app(api_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        recorder.calls.clear()
        answer = await client.post("/api/satset/batch1", json={}, headers=headers)

    assert (answer.status_code != 401) is accepted
    assert len(recorder.calls) == comparisons, recorder.calls
    for given, expected in recorder.calls:
        assert isinstance(given, bytes) and isinstance(expected, bytes)
        assert len(given) == len(expected) == 32  # SHA-256: the guess's length is not what is compared
        assert expected in configured


def test_api_auth_compares_credentials_only_through_compare_digest() -> None:
    """The source says the same as the recording: in the code that judges a credential, no ==, !=, in or
    ordering touches a value (only `is None` checks), and `_same` is compare_digest of digests."""
    source = inspect.getsource(api.auth)
    tree = ast.parse(source)
    judged = {"_same", "refusal"}
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in judged]
    assert {f.name for f in functions} == judged
    for function in functions:
        for node in ast.walk(function):
            if isinstance(node, ast.Compare):
                assert all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops), ast.unparse(node)
            if isinstance(node, ast.BoolOp) and function.name == "refusal":
                # `and` chains may only guard on presence; the user/password verdicts are combined with `&`.
                assert "_same(basic[1]" not in ast.unparse(node), ast.unparse(node)
    same = next(f for f in functions if f.name == "_same")
    assert "hmac.compare_digest(_digest(given), expected_digest)" in ast.unparse(same)


# --- the simulator's admin endpoint -----------------------------------------------------------------------


def simulator_app(admin: bool) -> Any:
    config = SimulatorConfig(client_id="c", client_secret="s", router_enabled=False, admin_enabled=admin)
    return create_simulator_app(Platform(config, Store(None), Faults()))


def admin_routes(app: Any) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/admin"):
            for method in sorted(getattr(route, "methods", None) or ()):
                found.append((method, re.sub(r"\{[^}]+\}", "Encounter", path)))
    return found


async def test_every_admin_route_is_absent_unless_enabled_and_works_when_enabled() -> None:
    enabled, disabled = simulator_app(admin=True), simulator_app(admin=False)
    routes = admin_routes(enabled)
    assert {path for _method, path in routes} >= {
        "/admin/state",
        "/admin/faults/http",
        "/admin/faults/router",
        "/admin/latency",
        "/admin/faults",
        "/admin/expire-tokens",
        "/admin/reset",
        "/admin/events",
    }
    assert admin_routes(disabled) == []

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=disabled), base_url="http://sim.test") as off:
        for method, path in routes:
            answer = await off.request(method, path, params={"seconds": "1"}, json={"kind": "500"})
            assert answer.status_code in (403, 404), (method, path, answer.status_code)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=enabled), base_url="http://sim.test") as on:
        assert (await on.get("/admin/state")).status_code == 200
        armed = await on.post("/admin/faults/http", json={"kind": "500", "count": 1, "path_prefix": "/fhir-r4"})
        assert armed.status_code == 200 and armed.json()["http"][0]["kind"] == "500"
        fired = await on.get("/fhir-r4/v1/Encounter", headers={"Authorization": "Bearer x"})
        assert fired.status_code == 500  # the armed fault answered before the token check
        assert (await on.get("/fhir-r4/v1/Encounter", headers={"Authorization": "Bearer x"})).status_code == 401


# --- where the listeners bind -----------------------------------------------------------------------------


def ports_on(address: str, ports: set[int]) -> set[int]:
    return {listener.port for listener in listeners() if listener.address == address and listener.port in ports}


@pytest.mark.parametrize("host", ["default", "127.0.0.2"])
def test_the_simulator_http_and_router_bind_loopback_unless_configured(host: str) -> None:
    config = SimulatorConfig(client_id="c", client_secret="s")
    if host != "default":
        config = SimulatorConfig(client_id="c", client_secret="s", host=host)
    expected = "127.0.0.1" if host == "default" else host
    with start_simulator(config) as running:
        assert running.dicom_port is not None
        ports = {running.http_port, running.dicom_port}
        mine = [listener for listener in listeners() if listener.port in ports]
        assert {(listener.address, listener.port) for listener in mine} == {(expected, port) for port in ports}


def test_dcmtk_storescp_binds_loopback(storescp: StoreSCP) -> None:
    found = [listener for listener in listeners() if listener.port == storescp.port]
    assert [listener.address for listener in found] == ["127.0.0.1"], found


GATEWAY_SETTINGS = {
    "DCM4CHEE_URL": "http://127.0.0.1:9/dicom-web",
    "ROUTER_IP": "127.0.0.1",
    "SS_AUTH_URL": "http://127.0.0.1:9/oauth2/v1",
    "SS_BASE_URL": "http://127.0.0.1:9/fhir-r4/v1",
    "SS_ORG_ID": "100012345",
    "SS_CLIENT_ID": "client",
    "SS_CLIENT_SECRET": "secret-not-used-here",
}


@contextmanager
def started(arguments: list[str], env: dict[str, str], ready: str, cwd: Path) -> Iterator[tuple[int, list[str]]]:
    """A `satset ...` child process, until it prints a line starting with `ready`; yields (pid, output lines)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *arguments],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if ready in line:
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout=120) and process.poll() is None, "".join(lines)
        yield process.pid, lines
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)


def child_environment(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "SS_", "PREFECT_API_"))}
    return {**inherited, "PYTHONPATH": root, **extra}


UNUSED_PREFECT = "http://127.0.0.1:9/api"


@pytest.mark.integration
def test_satset_api_binds_loopback_unless_configured(tmp_path: Path) -> None:
    """Three `satset api` at once: no setting (127.0.0.1), API_HOST, --host (a loopback address of its own)."""
    ways = {
        "default": ({}, [], "127.0.0.1"),
        "API_HOST": ({"API_HOST": "127.0.0.2"}, [], "127.0.0.2"),
        "--host": ({}, ["--host", "127.0.0.3"], "127.0.0.3"),
    }
    with ExitStack() as stack:
        running = {
            how: stack.enter_context(
                started(
                    ["api", "--port", "0", *arguments],
                    # satset api refuses to start without PREFECT_API_URL; nothing here runs a flow, so none answers
                    child_environment(**GATEWAY_SETTINGS, API_KEY=API_KEY, PREFECT_API_URL=UNUSED_PREFECT, **extra),
                    "HIS API on ",
                    tmp_path,
                )
            )
            for how, (extra, arguments, _expected) in ways.items()
        }
        for how, (pid, lines) in running.items():
            expected = ways[how][2]
            found = listeners(pid)
            assert [listener.address for listener in found] == [expected], (how, found, lines)
            assert f"HIS API on http://{expected}:{found[0].port}/" in "".join(lines), how


@pytest.mark.integration
def test_satset_simulator_binds_loopback_and_has_no_admin_by_default(tmp_path: Path) -> None:
    env = child_environment()
    with started(["simulator", "--port", "0", "--dicom-port", "0"], env, "DICOM Router:", tmp_path) as (pid, lines):
        found = listeners(pid)
        assert len(found) == 2 and exposed(found) == [] and {f.address for f in found} == {"127.0.0.1"}, found
        output = "".join(lines)
        assert "Admin" not in output
        base = re.search(r"SS_AUTH_URL=(http://\S+)/oauth2/v1", output)
        assert base is not None, output
        assert httpx.get(f"{base[1]}/admin/state", timeout=10).status_code == 404


@pytest.mark.integration
def test_every_listener_of_the_demo_stack_is_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`satset demo`'s parts as the demo starts them: the simulator (HTTP and router), Orthanc (HTTP and DICOM),
    the Prefect server, `satset serve` and `satset api`; every socket any of them listens on is loopback."""
    from stack.demo import Demo

    for name in [n for n in os.environ if n.startswith(("PREFECT_API_", "SS_", "API_"))]:
        monkeypatch.delenv(name)
    before = {(listener.pid, listener.port) for listener in listeners()}
    demo = Demo(tmp_path / "demo", say=lambda line: None)
    try:
        demo.start()
        found = [listener for listener in listeners() if (listener.pid, listener.port) not in before]
        pids = descendants(os.getpid())
        assert demo.simulator is not None and demo.orthanc is not None and demo.prefect is not None
        expected = {
            demo.simulator.http_port,
            demo.simulator.dicom_port,
            demo.orthanc.http_port,
            demo.orthanc.dicom_port,
            demo.prefect.port,
            int(demo.api_url.rsplit(":", 1)[1]),
        }
        secrets_of_the_demo = {
            "demo API key": demo.api_key,
            "simulator client secret": demo.simulator.config.client_secret,
            "PACS password": (demo.orthanc.auth or ("", "x" * 8))[1],
        }
    finally:
        demo.stop()

    # The demo's own log files (satset serve, satset api, the Prefect server) hold none of its secrets.
    scanner = LeakScanner(secrets_of_the_demo, [])
    logs = sorted((tmp_path / "demo").rglob("*.log"))
    for log in logs:
        scanner.scan_files(log, kind="log file")
    assert len(logs) >= 2 and scanner.findings == [], "\n".join(map(str, scanner.findings))
    assert expected <= {listener.port for listener in found}, (expected, found)
    assert exposed(found) == [], "\n".join(map(str, exposed(found)))
    commands = " ".join(listener.command for listener in found if listener.pid in pids)
    for part in ("Orthanc", "prefect server start", "-m cli serve", "-m cli api"):
        assert part in commands, (part, found)
