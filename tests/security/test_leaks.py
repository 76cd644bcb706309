"""Secrets and patient names never appear in logs, Prefect's records, persisted results, the RIS table or the API's
error messages, even when everything goes wrong.

The first tests plant a secret or a name, in the forms a leak takes, and see the scanner (tests/security/leaks.py)
catch it: a scanner that finds nothing proves nothing unless it is shown to find. The last test runs a compact
fault suite, batch4 orders through the real RIS poller on the test Prefect server (the harness of
tests/reliability/fault_harness.py), each patient's name in the order (`subject_display`) and in the DICOM
(PatientName), with: a plain-text 504 burst, a router abort mid-study and PACS 503s (ridden out), a 500 outage of
one endpoint (dead after retries), a resource the platform rejects (dead at once), and a 401 from the token
endpoint (dead at once). It calls the HIS API for the failed runs and with the failing credential, then scans
everything: every log record of the process, the Prefect server's logs, artifacts, flow and task runs, the result
storage folder, log files, the RIS rows and every API answer. A control needle (an accession number, which
belongs in those places) shows each place was really read.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import pickle
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest

from tests.security.leaks import LeakScanner, capture_logs

NAMES = ["Ratnasari Wulandewi", "Hendrawan Sulistyoputro", "Kusumaningrum Prameswari"]
SECRETS = {
    "client secret": "test-secret-&+=value",
    "API key": "his-test-key-0123456789abcdef",
    "Basic password": "his-test-password:with colon",
}


@pytest.fixture
def scanner() -> LeakScanner:
    return LeakScanner(SECRETS, NAMES)


# --- the scanner finds what is planted ---------------------------------------------------------------------


def test_a_secret_verbatim_in_a_log_file_is_found_and_masked(scanner: LeakScanner, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "gateway.log"
    log.parent.mkdir()
    log.write_text("INFO token request\nDEBUG client_secret=test-secret-&+=value sent\n")
    (tmp_path / "logs" / "clean.log").write_text("INFO order T0A1B2C3D4E5F6A7 done, Encounter 7c9e6679\n")

    found = scanner.scan_files(tmp_path)

    assert [(f.needle, f.form, Path(f.where).name) for f in found] == [("client secret", "verbatim", "gateway.log")]
    assert "test-secret" not in str(found[0]) and "<client secret>" in str(found[0])
    assert scanner.scanned["file"] == 2


@pytest.mark.parametrize(
    ("planted", "needle", "form"),
    [
        pytest.param(
            "Authorization: Basic " + base64.b64encode(b"his:his-test-password:with colon").decode(),
            "Basic password",
            "base64",
            id="basic-auth-header",
        ),
        pytest.param(
            "X-Forwarded: " + base64.urlsafe_b64encode(b"key=his-test-key-0123456789abcdef;").decode(),
            "API key",
            "base64",
            id="base64url-in-the-middle",
        ),
        pytest.param(
            "POST /oauth2/v1/accesstoken body: client_id=test-client&client_secret="
            + quote_plus("test-secret-&+=value"),
            "client secret",
            "URL-encoded",
            id="form-body",
        ),
        pytest.param(
            "GET /fhir?secret=test-secret-%26%2B%3Dvalue", "client secret", "URL-encoded", id="url-encoded-query"
        ),
        pytest.param("<td>test-secret-&amp;+=value</td>", "client secret", "HTML-escaped", id="html-escaped"),
        pytest.param("PatientName: WULANDEWI^RATNASARI", "patient name 1", "DICOM PN", id="dicom-pn"),
        pytest.param("patient hendrawan sulistyoputro", "patient name 2", "verbatim", id="lower-case-name"),
        pytest.param("family name: PRAMESWARI", "patient name 3", "name part", id="one-name-part"),
        pytest.param(
            "patient=" + quote_plus("Ratnasari Wulandewi"), "patient name 1", "URL-encoded", id="url-encoded-name"
        ),
    ],
)
def test_encoded_forms_of_a_leak_are_found(scanner: LeakScanner, planted: str, needle: str, form: str) -> None:
    found = scanner.scan_text("planted", f"2026-12-06 15:00:00 INFO something happened; {planted}; more text")
    assert [f.needle for f in found] == [needle] and found[0].form.startswith(form), found


def test_a_name_inside_a_pickled_result_stored_base64_is_found(scanner: LeakScanner, tmp_path: Path) -> None:
    """Prefect persists a task's return value pickled, base64-encoded, in a JSON file of its result storage."""
    result = {"encounter_id": "7c9e6679", "display": "Kusumaningrum Prameswari"}
    stored = {
        "metadata": {"storage_key": "abc", "serializer": {"type": "pickle"}},
        "result": base64.b64encode(pickle.dumps(result)).decode(),
    }
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "3f2a9b").write_text(json.dumps(stored))

    found = scanner.scan_files(tmp_path / "storage")

    assert [f.needle for f in found] == ["patient name 3"], found


def test_a_name_in_another_casing_inside_base64_is_found_by_decoding(scanner: LeakScanner) -> None:
    encoded = base64.b64encode(b'{"name": "rAtNaSaRi wUlAnDeWi"}').decode()
    found = scanner.scan_text("artifact", f"data: {encoded}")
    assert [(f.needle, f.where) for f in found] == [("patient name 1", "artifact (decoded base64)")]


def test_log_records_rows_and_api_answers_are_scanned(scanner: LeakScanner) -> None:
    quiet = logging.getLogger("tests.security.quiet")
    quiet.propagate = False  # as Prefect's run loggers: records never reach the root logger
    with capture_logs(debug_loggers=["clients.satusehat"]) as captured:
        answer = {"access_token": "abc", "k": SECRETS["API key"]}
        logging.getLogger("clients.satusehat").debug("token answer %s", answer)
        quiet.warning("order failed")
        try:
            raise RuntimeError("Budi said: Hendrawan Sulistyoputro")
        except RuntimeError:
            logging.getLogger("tasks.fhir").exception("failed")
    assert logging.getLogger("clients.satusehat").level == logging.NOTSET  # restored
    assert any("order failed" in text for text in captured.texts)

    found = scanner.scan_records(captured)
    found += scanner.scan_rows("radiology_order", [{"id": 1, "last_error": "ok", "result": {"x": NAMES[0]}}])
    body = '{"message": "his-test-key-0123456789abcdef"}'
    found += scanner.scan_response("GET /api/runs/1", 200, {"x-flow-run-id": "1"}, body)

    assert sorted((f.kind, f.needle) for f in found) == [
        ("API answer", "API key"),
        ("log record", "API key"),
        ("log record", "patient name 2"),
        ("row value", "patient name 1"),
    ]


def test_clean_text_is_not_a_finding(scanner: LeakScanner) -> None:
    clean = (
        "batch4 stopped at observation: HTTP 500 from POST Observation. Created so far: encounter_id="
        "7c9e6679-7425-40de-944b-e07fc1f90ae7, study 1.2.826.0.1.3680043.8.498.1234567890; ACSN T0A1B2C3D4E5F6A7; "
        "token sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08; "
        + base64.b64encode(secrets.token_bytes(48)).decode()
    )
    assert scanner.scan_text("clean", clean) == []


def test_secrets_too_short_to_search_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 8"):
        LeakScanner({"API key": "abc"}, [])


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_scanner_reads_a_prefect_servers_artifacts_and_logs(prefect_server: None) -> None:
    from prefect import flow, get_run_logger
    from prefect.artifacts import acreate_markdown_artifact
    from prefect.client.orchestration import get_client

    canary = "canary-" + secrets.token_hex(8)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    @flow(name="security-canary")
    async def plant() -> None:
        get_run_logger().info("logged %s", base64.b64encode(f"user:{canary}".encode()).decode())
        await acreate_markdown_artifact(markdown=f"| x | `{canary}` |", key="security-canary")

    await plant()
    scanner = LeakScanner({"canary": canary}, [])
    async with get_client() as client:
        found = await scanner.scan_prefect(client, since=since)
    assert {f.kind for f in found} >= {"artifact", "log"}, found


# --- the fault suite, scanned ------------------------------------------------------------------------------


@pytest.fixture
def issued_tokens(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every access token the simulated platform issues during the test."""
    store = gateway.simulator.running.platform.store
    issued: list[str] = []
    issue = store.issue_token

    def recording(client_id: str, ttl_s: float) -> tuple[str, float]:
        token, at = issue(client_id, ttl_s)
        issued.append(token)
        return token, at

    monkeypatch.setattr(store, "issue_token", recording)
    return issued


@pytest.fixture
def pacs_proxy(orthanc: Any) -> Iterator[Any]:
    from tests.reliability.proxies import PacsProxy

    proxy = PacsProxy(orthanc.http_url)
    yield proxy
    proxy.close()


@pytest.mark.integration
@pytest.mark.anyio
async def test_nothing_secret_or_identifying_leaks_from_a_fault_suite(
    gateway: Any,
    upload_study: Any,
    pacs_proxy: Any,
    issued_tokens: list[str],
    fast_retries: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime
    from prefect.settings import PREFECT_HOME, get_current_settings

    from api.app import create_app
    from clients.ris import RisStore
    from models.orders import DEAD, DONE
    from models.settings import RisSettings, load_settings
    from tasks import runtime
    from tasks.retry import FHIR_RETRIES
    from tasks.ris import reset_stores
    from tests.api.conftest import API_KEY, BASIC_PASSWORD, BASIC_USER, api_settings, basic
    from tests.plugins.gateway import batch4_input
    from tests.plugins.pacs import ORTHANC_PASSWORD
    from tests.plugins.simulator import CLIENT_SECRET
    from tests.reliability.fault_harness import drive

    rotated = "rotated-secret-" + secrets.token_urlsafe(12)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    for name, value in {
        "DCM4CHEE_URL": f"{pacs_proxy.url}/dicom-web",
        "SS_TIMEOUT_S": "5",
        "IMAGING_STUDY_DEADLINE_S": "10",
        "RIS_DATABASE_URL": f"sqlite:///{tmp_path / 'ris.db'}",
        "ORDER_RETRY_BACKOFF_S": "0.5",
        "ORDER_MAX_ATTEMPTS": "2",
        "ORDER_LEASE_S": "60",
        "POLL_CONCURRENCY": "3",
        "TEMP_DIR": str(tmp_path / "scratch"),
        "LOG_FILE": str(tmp_path / "gateway.log"),
    }.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "scratch").mkdir()
    runtime.reset()
    reset_stores()
    ris = RisStore.from_settings(load_settings(RisSettings))
    ris.create_schema()
    names = iter(NAMES * 3)
    answers: list[tuple[str, httpx.Response]] = []

    def order() -> str:
        name = next(names)
        given, family = name.split(" ", 1)
        study = upload_study(series=1, instances_per_series=2, patient_name=f"{family.upper()}^{given.upper()}")
        body = batch4_input(study, subject_display=name)
        ris.add_order(4, body)
        return str(body["noacsn"])

    async def run(accessions: list[str]) -> None:
        await drive(ris, accessions, max_polls=4, bound_s=90)

    try:
        with capture_logs(debug_loggers=["clients", "tasks", "flows", "api", "satset", "models"]) as captured:
            # 1. Ridden out: plain-text 504s, the router aborting mid-study, the PACS answering 503.
            transient = [order(), order(), order()]
            gateway.arm(kind="504", count=FHIR_RETRIES, path_prefix="/fhir-r4/v1")
            gateway.arm_router(kind="abort", count=1, after_instances=1)
            pacs_proxy.fail_next(2)
            await run(transient)
            assert [ris.get(a).status for a in transient] == [DONE] * 3, [ris.get(a).last_error for a in transient]

            # 2. A 500 outage of one endpoint: dead after its retries.
            outage = [order()]
            gateway.arm(kind="500", count=None, path_prefix="/fhir-r4/v1/Observation", method="POST")
            await run(outage)
            httpx.delete(f"{gateway.simulator.running.base_url}/admin/faults", timeout=10).raise_for_status()

            # 3. A resource the platform rejects (rule 10117: an org id that is not the client's): dead at once.
            monkeypatch.setenv("SS_ORG_ID", "999999")
            runtime.reset()
            rejected = [order()]
            await run(rejected)
            monkeypatch.setenv("SS_ORG_ID", gateway.env["SS_ORG_ID"])

            # 4. 401 from the token endpoint (the secret was rotated at the platform): dead at once; the HIS API
            #    asked for a token and for a batch while the credential is refused.
            monkeypatch.setenv("SS_CLIENT_SECRET", rotated)
            runtime.reset()
            refused = [order()]
            await run(refused)
            app = create_app(api_settings())
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
            ) as his:
                body = batch4_input(SimpleNamespace(study_instance_uid="1.2.3"), subject_display=NAMES[0])
                answers.append(("GET /api/satset/token", await his.get("/api/satset/token")))
                batch1 = {k: v for k, v in body.items() if k != "study"}
                answers.append(("POST /api/satset/batch1", await his.post("/api/satset/batch1", json=batch1)))
                invalid = {**batch1, "period_start": "yesterday"}
                answers.append(("POST invalid", await his.post("/api/satset/batch1", json=invalid)))
                wrong = {**basic(BASIC_USER, BASIC_PASSWORD + "x"), "X-API-Key": "not-the-key-" + secrets.token_hex(8)}
                answers.append(("wrong Basic", await his.post("/api/satset/batch1", json=batch1, headers=wrong)))
                monkeypatch.setenv("SS_CLIENT_SECRET", CLIENT_SECRET)
                runtime.reset()
                # The state of every gateway run of the suite, as a HIS following it reads it.
                async with get_client() as prefect:
                    started = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
                    runs = await prefect.read_flow_runs(flow_run_filter=started, limit=200)
                for flow_run in runs:
                    answers.append((f"GET /api/runs/{flow_run.name}", await his.get(f"/api/runs/{flow_run.id}")))

        for accession in outage + rejected + refused:
            assert ris.get(accession).status == DEAD, ris.get(accession).last_error
        statuses = [response.status_code for _, response in answers[:4]]
        assert statuses[0] >= 400 and statuses[1] >= 400 and statuses[2:] == [422, 401], statuses
        assert len(answers) > 4 + 6, [where for where, _ in answers]  # the runs of the suite were read back

        # --- scan everything ----------------------------------------------------------------------------------
        secrets_of_the_run = {
            "client secret": CLIENT_SECRET,
            "rotated client secret": rotated,
            "HIS API key": API_KEY,
            "HIS Basic password": BASIC_PASSWORD,
            "PACS password": ORTHANC_PASSWORD,
        }
        secrets_of_the_run |= {f"access token {n}": token for n, token in enumerate(issued_tokens, 1)}
        assert len(issued_tokens) >= 2
        # Controls: accession numbers, which belong in logs, artifacts, rows and answers, show each place was read.
        controls = {
            "control: done ACSN": transient[0],
            "control: dead ACSN": outage[0],
            "control: an Encounter id": str(ris.get(transient[0]).result["encounter_id"]),  # persisted task results
        }
        scanner = LeakScanner({**secrets_of_the_run, **controls}, NAMES)

        scanner.scan_records(captured)
        async with get_client() as prefect:
            await scanner.scan_prefect(prefect, since=since)
        storage = Path(get_current_settings().results.local_storage_path)
        assert storage.is_dir() and any(storage.iterdir()), storage
        scanner.scan_files(storage, kind="result file")
        home = Path(str(PREFECT_HOME.value()))
        for log_file in [*home.rglob("*.log"), *tmp_path.rglob("*.log")]:  # LOG_FILE among them, once written
            scanner.scan_files(log_file, kind="log file")
        scanner.scan_files(tmp_path / "scratch", kind="scratch file")  # TEMP_DIR: nothing of a study may stay
        rows = [ris.get(accession).model_dump() for accession in transient + outage + rejected + refused]
        scanner.scan_rows("radiology_order", rows)
        for where, response in answers:
            scanner.scan_response(where, response.status_code, response.headers, response.text)
    finally:
        ris.close()
        reset_stores()
        runtime.reset()

    print(f"\nscanned: {scanner.scanned}")
    leaks = [finding for finding in scanner.findings if not finding.needle.startswith("control")]
    assert leaks == [], "\n".join(map(str, leaks))
    controlled = {finding.kind for finding in scanner.findings if finding.needle.startswith("control")}
    assert {"log record", "log", "artifact", "flow run", "result file", "row value", "API answer"} <= controlled, (
        controlled
    )
    for kind in ("log record", "log", "artifact", "flow run", "task run", "result file", "row value", "API answer"):
        assert scanner.scanned.get(kind, 0) > 0, (kind, scanner.scanned)
