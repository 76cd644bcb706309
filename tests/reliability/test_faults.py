"""The fault matrix: batch4 orders through the RIS poller while SATUSEHAT, the DICOM Router or the PACS misbehave.

Each test queues two batch4 orders (each with its own generated study in Orthanc) in a SQLite RIS table, arms
one fault in the real parts (the simulator's admin endpoints or its token check, Orthanc stopped, or a small proxy
in front of the PACS or the router for what they cannot do themselves), and drives the real `poll-ris` flow as its
schedule would until every order is done or dead. The verdict comes from the simulator's own store and the RIS
table, never from what the gateway says about itself: every order done with exactly one of each resource, or
failed/dead with the reason recorded; nothing lost, nothing created twice. Each test publishes its row of
docs/reliability.md (tests/reliability/table.py).

Retries are the production policy without its waiting (`fast_retries`); a failed order is claimed again after 0.5 s
and dies after its second attempt, so a permanent fault plays out its whole course (failed, then dead) in seconds.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clients.ris import RisStore
from models.orders import DEAD, DONE
from models.settings import RisSettings, load_settings
from simulator.store import Store
from stack.orthanc import OrthancServer
from stack.ports import free_port
from stack.studies import StudySpec, iter_instances
from tasks import runtime
from tasks.retry import DICOM_RETRIES, FHIR_RETRIES
from tasks.ris import reset_stores
from tests.plugins.gateway import Gateway, batch4_input
from tests.plugins.pacs import ORTHANC_PASSWORD, ORTHANC_USER, UploadedStudy, UploadStudy, unique_accession
from tests.reliability.fault_harness import (
    AfterPoll,
    Drive,
    Verdict,
    check_totals,
    drive,
    judge,
    table_row,
)
from tests.reliability.proxies import PacsProxy, TcpGate
from tests.reliability.table import FAULTS, append_row

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ORDERS = 2
INSTANCES = 2
MAX_ATTEMPTS = 2
BURST = FHIR_RETRIES
"""A burst of FHIR faults the size of one task's retry budget: even if one order's task meets all of it, that
task's last attempt succeeds. (Larger bursts end the same way, one order-level retry later.)"""
SS_TIMEOUT_S = 2.0
TOKEN_USES = 5
"""Requests a token lasts in the expiry test: a batch4 order makes about ten, so each order meets expired tokens."""
FHIR = "/fhir-r4/v1"


@dataclass
class Order:
    """A queued batch4 order: the body the RIS holds and the SOP Instance UIDs of its study."""

    body: dict[str, Any]
    instances: set[str]

    @property
    def accession(self) -> str:
        return str(self.body["noacsn"])


@dataclass
class Matrix:
    """The wired gateway with the RIS table, the PACS proxy and the router gate of one test."""

    gateway: Gateway
    ris: RisStore
    pacs: PacsProxy
    router: TcpGate
    upload_study: UploadStudy

    def queue(self, count: int = ORDERS) -> list[Order]:
        """`count` pending batch4 orders, each for a study of its own in Orthanc."""
        orders = []
        for _ in range(count):
            study = self.upload_study(series=1, instances_per_series=INSTANCES)
            orders.append(self.add(batch4_input(study), study))
        return orders

    def add(self, body: dict[str, Any], study: UploadedStudy) -> Order:
        self.ris.add_order(4, body)
        return Order(body, set(study.by_sop_uid))

    async def run(
        self, fault: str, orders: list[Order], *, after_poll: AfterPoll | None = None, max_polls: int = 8
    ) -> tuple[Drive, list[Verdict]]:
        """Drive the poller, judge every order, check nothing unaccounted for exists, publish the row."""
        driven = await drive(self.ris, [o.accession for o in orders], after_poll=after_poll, max_polls=max_polls)
        store = self.gateway.simulator.running.platform.store
        verdicts = [judge(self.ris, store, order.body, order.instances) for order in orders]
        row = table_row(fault, verdicts)
        append_row(FAULTS, row)
        print(f"\n{row}\n  polls: {driven.summaries}\n  " + "\n  ".join(v.describe() for v in verdicts))
        assert check_totals(store, verdicts) == []
        assert not any(verdict.lost for verdict in verdicts), [v.describe() for v in verdicts]
        assert not any(verdict.duplicated for verdict in verdicts), [v.describe() for v in verdicts]
        return driven, verdicts


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def pacs_proxy(orthanc: OrthancServer) -> Iterator[PacsProxy]:
    proxy = PacsProxy(orthanc.http_url)
    yield proxy
    proxy.close()


@pytest.fixture
def router_gate(gateway: Gateway) -> Iterator[TcpGate]:
    running = gateway.simulator.running
    assert running.dicom_port is not None
    gate = TcpGate(running.config.host, running.dicom_port)
    gate.open()
    yield gate
    gate.close()


@pytest.fixture
def matrix(
    gateway: Gateway,
    pacs_proxy: PacsProxy,
    router_gate: TcpGate,
    upload_study: UploadStudy,
    fast_retries: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Matrix]:
    """The gateway's environment as a host would have it, with the PACS and the router behind the test's stand-ins,
    a short FHIR timeout (for hangs) and a RIS table whose retries come quickly."""
    settings = {
        "DCM4CHEE_URL": f"{pacs_proxy.url}/dicom-web",
        "ROUTER_PORT": str(router_gate.port),
        "SS_TIMEOUT_S": str(SS_TIMEOUT_S),
        "IMAGING_STUDY_DEADLINE_S": "10",
        "RIS_DATABASE_URL": f"sqlite:///{tmp_path / 'ris.db'}",
        "ORDER_RETRY_BACKOFF_S": "0.5",
        "ORDER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "ORDER_LEASE_S": "60",
        "POLL_BATCH_SIZE": "20",
        "POLL_CONCURRENCY": str(ORDERS),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    reset_stores()
    ris = RisStore.from_settings(load_settings(RisSettings))
    ris.create_schema()
    yield Matrix(gateway, ris, pacs_proxy, router_gate, upload_study)
    ris.close()
    reset_stores()
    runtime.reset()


def statuses(verdicts: list[Verdict]) -> list[str]:
    return [verdict.status for verdict in verdicts]


def all_done_first_time(driven: Drive, verdicts: list[Verdict]) -> None:
    """Ridden out inside the first claim: the fault never even reached the RIS table."""
    assert statuses(verdicts) == [DONE] * len(verdicts), [v.describe() for v in verdicts]
    assert all(verdict.done for verdict in verdicts)
    assert [verdict.attempts for verdict in verdicts] == [1] * len(verdicts)
    assert driven.summaries[0]["done"] == len(verdicts)


def fault_events(gateway: Gateway) -> list[str]:
    return [event.detail["fault"] for event in gateway.simulator.running.platform.store.events(["fault.http"])]


# --- SATUSEHAT ---------------------------------------------------------------------------------------------


async def test_429_bursts_with_retry_after_are_waited_out(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm(kind="429", count=1, retry_after_s=1, path_prefix="/oauth2")
    matrix.gateway.arm(kind="429", count=BURST - 1, retry_after_s=1, path_prefix=FHIR)

    driven, verdicts = await matrix.run(
        f"SATUSEHAT answers 429 with Retry-After: 1 ({BURST} requests: 1 token, {BURST - 1} FHIR)", orders
    )

    assert fault_events(matrix.gateway).count("429") == BURST
    all_done_first_time(driven, verdicts)


async def test_a_500_outage_of_one_endpoint_ends_dead_with_the_step_and_status(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm(kind="500", count=None, path_prefix=f"{FHIR}/Observation", method="POST")

    _driven, verdicts = await matrix.run("every POST /Observation answers HTTP 500 (an outage of one endpoint)", orders)

    assert statuses(verdicts) == [DEAD] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [MAX_ATTEMPTS] * ORDERS  # failed, then dead
    for verdict in verdicts:
        assert "stopped at observation" in (verdict.last_error or "") and "HTTP 500" in (verdict.last_error or "")
        # Each attempt resumed: what the earlier steps made exists once, nothing after the failing step.
        assert verdict.found == {
            "Encounter": 1,
            "ServiceRequest": 1,
            "ImagingStudy": 1,
            "Observation": 0,
            "DiagnosticReport": 0,
        }


async def test_plain_text_504s_are_retried(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm(kind="504", count=BURST, path_prefix=FHIR)

    driven, verdicts = await matrix.run(
        f"SATUSEHAT answers a plain-text 504 Gateway Timeout ({BURST} requests)", orders
    )

    assert fault_events(matrix.gateway).count("504") == BURST
    all_done_first_time(driven, verdicts)


async def test_a_504_after_the_platform_committed_creates_nothing_twice(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm(kind="lost-response", count=6, path_prefix=FHIR, method="POST")

    driven, verdicts = await matrix.run(
        "SATUSEHAT commits a POST, then answers a plain-text 504 (6 responses lost)", orders
    )

    assert fault_events(matrix.gateway).count("lost-response") == 6
    all_done_first_time(driven, verdicts)


async def test_requests_hanging_past_the_timeout_are_retried(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm(kind="hang", count=BURST, hang_s=SS_TIMEOUT_S + 3, path_prefix=FHIR)

    driven, verdicts = await matrix.run(
        f"SATUSEHAT requests hang past the gateway's {SS_TIMEOUT_S:g} s timeout ({BURST} requests)", orders
    )

    assert fault_events(matrix.gateway).count("hang") == BURST
    all_done_first_time(driven, verdicts)


class ShortLivedTokens:
    """The simulator's token check, with every token it issued expiring after `uses` FHIR requests: tokens expire
    mid-flow, in the middle of each batch, however fast or slow the machine. (Expiring them all on a timer, through
    the admin endpoint, could also expire a token between its fetch and the request it was fetched for: a second
    401 in a row, which the gateway rightly reports as a refusal.)"""

    def __init__(self, store: Store, uses: int) -> None:
        self._valid = store.token_valid
        self.uses = uses
        self.used: Counter[str] = Counter()
        self.expired = 0
        self._lock = threading.Lock()

    def __call__(self, token: str) -> bool:
        if not self._valid(token):
            return False
        with self._lock:
            self.used[token] += 1
            if self.used[token] <= self.uses:
                return True
            self.expired += 1
            return False


async def test_tokens_expiring_mid_flow_are_refreshed(matrix: Matrix, monkeypatch: pytest.MonkeyPatch) -> None:
    orders = matrix.queue()
    store = matrix.gateway.simulator.running.platform.store
    tokens = ShortLivedTokens(store, uses=TOKEN_USES)
    monkeypatch.setattr(store, "token_valid", tokens)

    driven, verdicts = await matrix.run(
        f"every SATUSEHAT token expires after {TOKEN_USES} requests, mid-flow (answered 401)", orders
    )

    assert tokens.expired >= 2, "the platform refused expired tokens mid-flow"
    assert store.token_count() >= 3  # the gateway fetched a fresh token after each
    all_done_first_time(driven, verdicts)


async def test_401_from_the_token_endpoint_ends_dead_at_once_naming_the_credentials(
    matrix: Matrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = matrix.queue()
    monkeypatch.setenv("SS_CLIENT_SECRET", "a-secret-the-platform-no-longer-accepts")
    runtime.reset()

    driven, verdicts = await matrix.run(
        "the token endpoint answers 401 to every request (client secret rotated at the platform)", orders
    )

    assert statuses(verdicts) == [DEAD] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [1] * ORDERS  # a refusal: retrying cannot help
    for verdict in verdicts:
        assert "HTTP 401" in (verdict.last_error or "") and "client credentials" in (verdict.last_error or "")
        assert sum(verdict.found.values()) == 0
    assert driven.polls == 1


# --- the DICOM Router --------------------------------------------------------------------------------------


async def test_associations_aborted_mid_study_are_sent_again(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm_router(kind="abort", count=DICOM_RETRIES, after_instances=1)

    driven, verdicts = await matrix.run(
        f"the router aborts the association after 1 of {INSTANCES} instances ({DICOM_RETRIES} associations)", orders
    )

    aborted = matrix.gateway.simulator.running.platform.store.events(["router.discarded"])
    assert len(aborted) == DICOM_RETRIES
    all_done_first_time(driven, verdicts)


async def test_a_router_that_aborts_every_association_ends_dead_with_the_reason(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm_router(kind="abort", count=None, after_instances=1)

    _driven, verdicts = await matrix.run("the router aborts every association mid-study", orders)

    assert statuses(verdicts) == [DEAD] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [MAX_ATTEMPTS] * ORDERS
    for verdict in verdicts:
        assert "stopped at dicom_process" in (verdict.last_error or "")
        assert verdict.found["ImagingStudy"] == 0  # an aborted association yields nothing


async def test_a_transient_failure_status_is_sent_again(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm_router(kind="status", count=2, status=0xA700)

    driven, verdicts = await matrix.run("the router answers C-STORE 0xA700 Out of Resources (2 instances)", orders)

    served = matrix.gateway.simulator.running.platform.store.events(["router.fault"])
    assert [(e.detail["fault"], e.detail["status"]) for e in served] == [("status", "0xA700")] * 2
    all_done_first_time(driven, verdicts)


async def test_a_refusing_failure_status_ends_dead_with_the_status_named(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.gateway.arm_router(kind="status", count=None, status=0xC000)

    _driven, verdicts = await matrix.run(
        "the router answers C-STORE 0xC000 Cannot Understand to every instance", orders
    )

    assert statuses(verdicts) == [DEAD] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [1] * ORDERS  # a refusal: retrying cannot help
    for verdict in verdicts:
        assert "stopped at dicom_process" in (verdict.last_error or "") and "0xC000" in (verdict.last_error or "")
        assert verdict.found["Observation"] == verdict.found["DiagnosticReport"] == 0


async def test_a_router_down_for_a_while_delays_the_orders(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.router.close()

    def router_back(poll: int, summary: dict[str, int]) -> None:
        matrix.router.open()

    driven, verdicts = await matrix.run(
        "the router is down (connection refused) for the first poll, then back (done at the second claim)",
        orders,
        after_poll=router_back,
    )

    assert driven.summaries[0]["failed"] == ORDERS  # every attempt in the first poll met the closed port
    assert statuses(verdicts) == [DONE] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [2] * ORDERS


# --- the PACS ----------------------------------------------------------------------------------------------


async def test_pacs_503s_are_retried(matrix: Matrix) -> None:
    orders = matrix.queue()
    matrix.pacs.fail_next(DICOM_RETRIES)

    driven, verdicts = await matrix.run(f"the PACS answers 503 Service Unavailable ({DICOM_RETRIES} requests)", orders)

    assert matrix.pacs.answered_503 == DICOM_RETRIES
    all_done_first_time(driven, verdicts)


async def test_an_instance_the_pacs_cannot_deliver_ends_dead_naming_it_and_reports_no_study(matrix: Matrix) -> None:
    orders = matrix.queue()
    missing = sorted(orders[0].instances)[0]
    matrix.pacs.withhold(missing)

    _driven, verdicts = await matrix.run(
        f"the PACS lists {INSTANCES} instances of one study but cannot deliver 1 (WADO-RS 206)", orders
    )

    first, *others = verdicts
    assert first.status == DEAD and first.attempts == MAX_ATTEMPTS, first.describe()
    assert missing in (first.last_error or ""), first.describe()
    assert first.found["ImagingStudy"] == 0, "no ImagingStudy may be built from a study missing an instance"
    assert first.found["Observation"] == first.found["DiagnosticReport"] == 0
    assert all(verdict.done for verdict in others), [v.describe() for v in others]


@pytest.fixture
def own_orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """An Orthanc of this test's own (the session's is shared), on fixed ports and storage, so it can be stopped
    and started again where the gateway expects it."""
    server = OrthancServer(
        users={ORTHANC_USER: ORTHANC_PASSWORD},
        storage_dir=tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
    )
    server.start()
    yield server
    server.stop()


async def test_a_pacs_down_for_a_while_delays_the_orders(
    matrix: Matrix, own_orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM4CHEE_URL", own_orthanc.dicomweb_url)
    runtime.reset()
    orders = []
    for _ in range(ORDERS):
        spec = StudySpec(accession_number=unique_accession(), series=1, instances_per_series=INSTANCES)
        instances = list(iter_instances(spec))
        own_orthanc.upload(instances)
        body = batch4_input(_Study(spec.study_instance_uid))  # type: ignore[arg-type]
        matrix.ris.add_order(4, body)
        orders.append(Order(body, {str(ds.SOPInstanceUID) for ds in instances}))
    own_orthanc.stop()

    def pacs_back(poll: int, summary: dict[str, int]) -> None:
        if not own_orthanc.running:
            own_orthanc.start()

    driven, verdicts = await matrix.run(
        "the PACS is down (Orthanc stopped) for the first poll, then restarted (done at the second claim)",
        orders,
        after_poll=pacs_back,
    )

    assert driven.summaries[0]["failed"] == ORDERS
    assert statuses(verdicts) == [DONE] * ORDERS
    assert [verdict.attempts for verdict in verdicts] == [2] * ORDERS


@dataclass
class _Study:
    """What batch4_input reads of a study."""

    study_instance_uid: str
