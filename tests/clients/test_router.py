"""RouterClient against real C-STORE SCPs on 127.0.0.1: in-process pynetdicom SCPs and dcmtk's storescp.

The pynetdicom SCP stands in for the official router (pynetdicom with require_called_aet = DCMROUTER) and can be
told to answer other statuses or to abort. The response race of pynetdicom 3.0.4 is provoked deterministically by
RaceProvoker, which reproduces the interleaving that a loaded CPU produces by chance.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as pynetdicom_encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from clients.errors import (
    AssociationRejected,
    ConnectionFailed,
    InstanceRejected,
    StoreIncomplete,
    is_retryable,
)
from clients.router import (
    MAX_PRESENTATION_CONTEXTS,
    ResponseKeepingDIMSE,
    RouterClient,
    StudyOutcome,
    WireChannel,
    WireReply,
    c_store_command,
    classify_store_status,
    guard_response_race,
    is_for_sender,
    p_data_buffers,
    parse_store_response,
    presentation_contexts,
    raise_for_outcome,
    router_slots,
)
from models.dicom import EncodedInstance, edit_encoded_for_satusehat, edit_for_satusehat
from models.settings import Settings
from stack import dcmtk
from stack.ports import LOOPBACK, free_port
from stack.studies import StudySpec, iter_instances
from tests.plugins.pacs import require_dcmtk

ROUTER_AET = "DCMROUTER"
DEADLINE_S = 10.0


def wait_until(condition: Callable[[], bool], timeout_s: float = DEADLINE_S) -> bool:
    """Poll `condition` until it holds or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.001)
    return True


# --------------------------------------------------------------------------------------------------------------
# An in-process router stand-in


@dataclass
class RecordingSCP:
    """pynetdicom Storage SCP that requires its called AE title and records every dataset and association event.

    `status_for(n)` gives the status for the n-th C-STORE (1-based); `abort_at` aborts the association on that
    C-STORE instead of answering; `on_store(n)` runs first (e.g. to block).
    """

    ae_title: str = ROUTER_AET
    status_for: Callable[[int], int] = lambda _n: 0x0000
    abort_at: int | None = None
    on_store: Callable[[int], None] | None = None
    maximum_associations: int = 10
    contexts: list[PresentationContext] | None = None
    maximum_pdu_size: int = 16382  # pynetdicom's default, the official router's
    port: int = 0
    received: list[Dataset] = field(default_factory=list)
    store_assocs: list[int] = field(default_factory=list)
    established: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ae: AE | None = None

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = self.maximum_associations
        ae.maximum_pdu_size = self.maximum_pdu_size
        if self.contexts is None:
            ae.supported_contexts = AllStoragePresentationContexts
            ae.add_supported_context(Verification)
        else:
            ae.supported_contexts = self.contexts
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, lambda event: self.established.append(id(event.assoc))),
            (evt.EVT_RELEASED, lambda event: self.released.append(id(event.assoc))),
            (evt.EVT_ABORTED, lambda event: self.aborted.append(id(event.assoc))),
        ]
        self.port = free_port()
        ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=handlers)
        self._ae = ae
        return self

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self.store_assocs.append(id(event.assoc))
            number = len(self.received)
        if self.on_store is not None:
            self.on_store(number)
        if self.abort_at == number:
            event.assoc.abort()
            return 0x0000
        return self.status_for(number)

    def client(self, **kwargs: object) -> RouterClient:
        kwargs.setdefault("called_aet", ROUTER_AET)
        return RouterClient(LOOPBACK, self.port, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stoppers() -> Iterator[list[threading.Thread]]:
    """SCP shutdowns run in the background (pynetdicom's server loop polls every 0.5 s); all joined here."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(DEADLINE_S)
    assert not any(thread.is_alive() for thread in threads), "an SCP did not shut down"


@pytest.fixture
def start_scp(stoppers: list[threading.Thread]) -> Iterator[Callable[..., RecordingSCP]]:
    started: list[RecordingSCP] = []

    def start(**kwargs: object) -> RecordingSCP:
        scp = RecordingSCP(**kwargs).start()  # type: ignore[arg-type]
        started.append(scp)
        return scp

    yield start
    for scp in started:
        thread = threading.Thread(target=scp.stop, name=f"stop-scp-{scp.port}")
        thread.start()
        stoppers.append(thread)


def study(spec: StudySpec) -> list[Dataset]:
    return list(iter_instances(spec))


def edited(instances: list[Dataset], accession: str = "RAD2024000123", patient: str = "P02478375538"):
    return (edit_for_satusehat(ds, accession_number=accession, patient_id=patient) for ds in instances)


# --------------------------------------------------------------------------------------------------------------
# Delivery


def test_study_arrives_once_per_instance_edited_in_one_association(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    instances = study(StudySpec(series=3, instances_per_series=4, accession_number="OLD", patient_id="MRN1"))
    originals = {ds.SOPInstanceUID: copy.deepcopy(ds) for ds in instances}

    outcome = scp.client().send_study(edited(instances))

    assert outcome.complete, outcome.describe()
    assert raise_for_outcome(outcome) is outcome
    assert (outcome.sent, outcome.confirmed, outcome.failures) == (12, 12, ())
    assert outcome.association_ok and outcome.problem is None
    assert outcome.accession_number == "RAD2024000123"
    assert outcome.study_instance_uid == instances[0].StudyInstanceUID
    received_uids = [ds.SOPInstanceUID for ds in scp.received]
    assert sorted(received_uids) == sorted(originals), "every instance exactly once"
    for ds in scp.received:
        original = originals[ds.SOPInstanceUID]
        assert ds.AccessionNumber == "RAD2024000123"
        assert ds.PatientID == "P02478375538"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SeriesNumber", "InstanceNumber"):
            assert ds[keyword].value == original[keyword].value, keyword
        assert ds.PixelData == original.PixelData
    assert len(set(scp.store_assocs)) == 1, "one association for the whole study"
    assert wait_until(lambda: len(scp.released) == 1)
    assert scp.established == scp.released


def test_instances_are_pulled_one_at_a_time(start_scp: Callable[..., RecordingSCP]) -> None:
    """Streaming: when the SCP holds instance n, the client has taken at most n from the iterator."""
    pulled = 0
    pulled_at_receipt: list[int] = []

    def counting() -> Iterator[Dataset]:
        nonlocal pulled
        for ds in iter_instances(StudySpec(series=2, instances_per_series=4)):
            pulled += 1
            yield ds

    scp = start_scp(on_store=lambda _n: pulled_at_receipt.append(pulled))
    outcome = scp.client().send_study(counting())

    assert outcome.complete
    assert pulled_at_receipt == list(range(1, 9))


def test_tcp_nodelay_is_set_on_the_association_socket(start_scp: Callable[..., RecordingSCP]) -> None:
    seen: list[int] = []

    class Watching(RouterClient):
        def _prepare(self, assoc: Association) -> None:
            super()._prepare(assoc)
            seen.append(assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    scp = start_scp()
    outcome = Watching(LOOPBACK, scp.port, ROUTER_AET).send_study(iter_instances(StudySpec(series=1)))

    assert outcome.complete
    assert len(seen) == 1 and seen[0] != 0


def test_dcmtk_storescp_receives_the_study_as_files(tmp_path: Path) -> None:
    require_dcmtk("storescp")
    instances = study(StudySpec(series=2, instances_per_series=5))
    expected = {ds.SOPInstanceUID for ds in instances}

    with dcmtk.StoreSCP(tmp_path / "recv", aet=ROUTER_AET) as storescp:
        client = RouterClient(storescp.host, storescp.port, ROUTER_AET)
        outcome = client.send_study(edited(instances, accession="ACSN-DCMTK-1"))
        files = storescp.wait_for_files(len(instances))

    assert outcome.complete, outcome.describe()
    assert len(files) == len(instances)
    read = [dcmread(path) for path in files]
    assert {ds.SOPInstanceUID for ds in read} == expected
    assert {ds.AccessionNumber for ds in read} == {"ACSN-DCMTK-1"}


# --------------------------------------------------------------------------------------------------------------
# Association failures


def test_wrong_called_ae_is_rejected_by_name(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    outcome = scp.client(called_aet="ORTHANC").send_study(iter_instances(StudySpec(series=1)))

    assert not outcome.association_ok and outcome.sent == 0
    assert outcome.problem is not None and outcome.problem.kind == "rejected"
    assert scp.received == []
    with pytest.raises(AssociationRejected) as raised:
        raise_for_outcome(outcome)
    assert "'ORTHANC'" in raised.value.message
    assert "Called AE title not recognised" in raised.value.message
    assert raised.value.service == "router"
    assert not is_retryable(raised.value)


def test_transient_reject_is_retryable_connection_failure(start_scp: Callable[..., RecordingSCP]) -> None:
    """The router's association limit answers A-ASSOCIATE-RJ transient: try again later, not a wrong request."""
    scp = start_scp(maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    held = holder.associate(LOOPBACK, scp.port, contexts=[build_context(Verification)], ae_title=ROUTER_AET)
    try:
        assert held.is_established
        outcome = scp.client().send_study(iter_instances(StudySpec(series=1)))
    finally:
        held.release()

    assert outcome.problem is not None and outcome.problem.kind == "rejected_transient"
    with pytest.raises(ConnectionFailed) as raised:
        raise_for_outcome(outcome)
    assert raised.value.service == "router"
    assert "Local limit exceeded" in raised.value.message


def test_nothing_listening_is_connection_failed() -> None:
    client = RouterClient(LOOPBACK, free_port(), ROUTER_AET, connect_timeout=5)
    outcome = client.send_study(iter_instances(StudySpec(series=1)))

    assert outcome.problem is not None and outcome.problem.kind == "connect"
    with pytest.raises(ConnectionFailed) as raised:
        raise_for_outcome(outcome)
    assert raised.value.service == "router" and is_retryable(raised.value)


def test_listener_that_never_answers_is_connection_failed() -> None:
    """TCP connects (the kernel completes it from the backlog) but no A-ASSOCIATE-AC ever comes."""
    port = free_port()
    with socket.create_server((LOOPBACK, port)):
        client = RouterClient(LOOPBACK, port, ROUTER_AET, acse_timeout=0.5)
        outcome = client.send_study(iter_instances(StudySpec(series=1)))

    assert outcome.problem is not None and outcome.problem.kind == "connect"
    assert "no association response" in outcome.problem.reason
    with pytest.raises(ConnectionFailed):
        raise_for_outcome(outcome)


def test_router_accepting_no_context_is_association_rejected(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(contexts=[build_context(Verification)])
    outcome = scp.client().send_study(iter_instances(StudySpec(series=1)))

    assert outcome.problem is not None and outcome.problem.kind == "no_context"
    with pytest.raises(AssociationRejected):
        raise_for_outcome(outcome)


def test_too_many_presentation_contexts_is_refused_before_connecting() -> None:
    pairs = [(f"1.2.826.0.1.3680043.8.498.{n}", JPEGLosslessSV1) for n in range(MAX_PRESENTATION_CONTEXTS + 1)]
    client = RouterClient(LOOPBACK, free_port(), ROUTER_AET)
    outcome = client.send_study(iter_instances(StudySpec(series=1)), sop_classes_and_syntaxes=pairs)

    assert outcome.problem is not None and outcome.problem.kind == "no_context"
    assert "129 presentation contexts" in outcome.problem.reason


def test_empty_stream_is_incomplete() -> None:
    outcome = RouterClient(LOOPBACK, free_port(), ROUTER_AET).send_study(iter([]))

    assert not outcome.complete and outcome.problem is not None and outcome.problem.kind == "empty"
    with pytest.raises(StoreIncomplete):
        raise_for_outcome(outcome)


# --------------------------------------------------------------------------------------------------------------
# Instance statuses


def test_out_of_resources_is_store_incomplete(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(status_for=lambda n: 0xA700 if n == 2 else 0x0000)
    instances = study(StudySpec(series=1, instances_per_series=4))
    outcome = scp.client().send_study(iter(instances))

    assert (outcome.sent, outcome.confirmed) == (4, 3)
    assert not outcome.complete and outcome.retryable
    assert outcome.problem is not None and outcome.problem.kind == "aborted", "no release of a partial study"
    assert wait_until(lambda: len(scp.aborted) == 1) and scp.released == []
    assert [(f.sop_instance_uid, f.status, f.retryable) for f in outcome.failures] == [
        (instances[1].SOPInstanceUID, 0xA700, True)
    ]
    with pytest.raises(StoreIncomplete) as raised:
        raise_for_outcome(outcome)
    assert is_retryable(raised.value) and raised.value.service == "router"
    assert "0xA700" in raised.value.message


def test_cannot_understand_is_recorded_and_rejected(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(status_for=lambda n: 0xC000 if n == 3 else 0x0000)
    instances = study(StudySpec(series=1, instances_per_series=5))
    outcome = scp.client().send_study(iter(instances))

    assert (outcome.sent, outcome.confirmed) == (5, 4), "the rest of the study is still sent"
    assert outcome.failures[0].sop_instance_uid == instances[2].SOPInstanceUID
    assert outcome.failures[0].status == 0xC000 and not outcome.failures[0].retryable
    assert not outcome.retryable
    with pytest.raises(InstanceRejected) as raised:
        raise_for_outcome(outcome)
    assert instances[2].SOPInstanceUID in raised.value.message
    assert not is_retryable(raised.value)


def test_permanent_refusal_wins_over_retryable_trouble(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(status_for=lambda n: {1: 0xA700, 2: 0xA900}.get(n, 0x0000))
    outcome = scp.client().send_study(iter_instances(StudySpec(series=1, instances_per_series=3)))

    with pytest.raises(InstanceRejected):
        raise_for_outcome(outcome)


def test_warning_statuses_count_as_stored(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(status_for=lambda n: {1: 0xB000, 2: 0xB006, 3: 0xB007}.get(n, 0x0000))
    outcome = scp.client().send_study(iter_instances(StudySpec(series=1, instances_per_series=4)))

    assert outcome.complete
    assert (outcome.confirmed, outcome.warnings) == (4, 3)


def test_abort_mid_study_is_store_incomplete_with_confirmed_count(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp(abort_at=3)
    outcome = scp.client().send_study(iter_instances(StudySpec(series=2, instances_per_series=3)))

    assert outcome.sent == 3 and outcome.confirmed == 2
    assert outcome.confirmed < outcome.sent
    assert not outcome.association_ok
    assert outcome.problem is not None and outcome.problem.kind == "aborted"
    assert [f.retryable for f in outcome.failures] == [True]
    with pytest.raises(StoreIncomplete) as raised:
        raise_for_outcome(outcome)
    assert "2 of 3" in raised.value.message


def test_empty_status_ends_the_study_even_before_pynetdicom_notices(start_scp: Callable[..., RecordingSCP]) -> None:
    """An empty status while the association still looks established (the reactor has not processed the A-ABORT
    yet) must stop the study: a further send would wait dimse_timeout. Simulated at the send_c_store seam."""

    class LosingSecond(RouterClient):
        def _prepare(self, assoc: Association) -> None:
            super()._prepare(assoc)
            real_send = assoc.send_c_store
            calls = 0

            def send_c_store(ds: Dataset, *args: object, **kwargs: object) -> Dataset:
                nonlocal calls
                calls += 1
                status = real_send(ds, *args, **kwargs)  # type: ignore[arg-type]
                return Dataset() if calls == 2 else status

            assoc.send_c_store = send_c_store  # type: ignore[method-assign]

    scp = start_scp()
    client = LosingSecond(LOOPBACK, scp.port, ROUTER_AET)
    outcome = client.send_study(iter_instances(StudySpec(series=2, instances_per_series=3)))

    assert (outcome.sent, outcome.confirmed) == (2, 1)
    assert outcome.problem is not None and outcome.problem.kind == "aborted"
    assert len(scp.received) == 2
    assert wait_until(lambda: len(scp.aborted) == 1), "the client aborts rather than releasing a partial study"
    assert scp.released == []


def test_failing_stream_aborts_the_association_and_propagates(start_scp: Callable[..., RecordingSCP]) -> None:
    """If the PACS stream breaks, the router must not see a release (it would build a partial ImagingStudy)."""

    class PacsBroke(Exception):
        pass

    def breaking() -> Iterator[Dataset]:
        instances = iter_instances(StudySpec(series=1, instances_per_series=4))
        yield next(instances)
        yield next(instances)
        raise PacsBroke("stream ended early")

    scp = start_scp()
    with pytest.raises(PacsBroke):
        scp.client().send_study(breaking())

    assert wait_until(lambda: len(scp.aborted) == 1)
    assert scp.released == []
    assert len(scp.received) == 2


# --------------------------------------------------------------------------------------------------------------
# Pre-flight and presentation contexts


def test_unroutable_and_foreign_instances_are_not_sent(start_scp: Callable[..., RecordingSCP]) -> None:
    instances = study(StudySpec(series=1, instances_per_series=4))
    del instances[1].Modality
    instances[2].StudyInstanceUID = generate_uid()
    scp = start_scp()
    outcome = scp.client().send_study(iter(instances))

    assert (outcome.sent, outcome.confirmed) == (2, 2)
    reasons = {f.sop_instance_uid: f.reason for f in outcome.failures}
    assert "Modality is missing" in reasons[instances[1].SOPInstanceUID]
    assert "one association carries one study" in reasons[instances[2].SOPInstanceUID]
    assert {ds.SOPInstanceUID for ds in scp.received} == {instances[0].SOPInstanceUID, instances[3].SOPInstanceUID}
    with pytest.raises(InstanceRejected):
        raise_for_outcome(outcome)


def mixed_study() -> list[Dataset]:
    uid = generate_uid()
    ct = study(StudySpec(modality="CT", series=1, instances_per_series=2, study_instance_uid=uid))
    mr = study(StudySpec(modality="MR", series=1, instances_per_series=2, study_instance_uid=uid))
    for ds in mr:
        ds.SeriesNumber = 2
    return ct + mr


def test_without_the_context_list_only_the_first_instances_kind_is_proposed(
    start_scp: Callable[..., RecordingSCP],
) -> None:
    scp = start_scp()
    outcome = scp.client().send_study(iter(mixed_study()))

    assert (outcome.sent, outcome.confirmed) == (2, 2)
    assert len(outcome.failures) == 2
    assert all("No presentation context" in f.reason and not f.retryable for f in outcome.failures)
    assert {ds.SOPClassUID for ds in scp.received} == {CTImageStorage}


def test_with_the_context_list_a_mixed_study_goes_in_one_association(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    pairs = [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)]
    outcome = scp.client().send_study(iter(mixed_study()), sop_classes_and_syntaxes=pairs)

    assert outcome.complete, outcome.describe()
    assert {ds.SOPClassUID for ds in scp.received} == {CTImageStorage, MRImageStorage}
    assert len(set(scp.store_assocs)) == 1


def test_presentation_contexts_merge_uncompressed_and_separate_compressed() -> None:
    contexts = presentation_contexts(
        [
            (CTImageStorage, ImplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, JPEGLosslessSV1),
            (CTImageStorage, JPEGLosslessSV1),
            (MRImageStorage, JPEG2000Lossless),
        ]
    )
    assert [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in contexts] == [
        (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        (CTImageStorage, [JPEGLosslessSV1]),
        (MRImageStorage, [JPEG2000Lossless]),
    ]


def test_presentation_contexts_offer_both_uncompressed_syntaxes() -> None:
    [context] = presentation_contexts([(CTImageStorage, ExplicitVRLittleEndian)])
    assert list(context.transfer_syntax) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (0x0000, "success"),
        (0xB000, "warning"),
        (0xB006, "warning"),
        (0xB007, "warning"),
        (0x0001, "warning"),
        (0xA700, "retryable"),
        (0xA7FF, "retryable"),
        (0x0213, "retryable"),
        (0xA900, "rejected"),
        (0xC000, "rejected"),
        (0xCFFF, "rejected"),
        (0x0122, "rejected"),
        (0x1234, "rejected"),
    ],
)
def test_classify_store_status(code: int, kind: str) -> None:
    assert classify_store_status(code)[0] == kind


# --------------------------------------------------------------------------------------------------------------
# Echo, settings, concurrency cap


def test_echo_succeeds(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    outcome = scp.client().echo()
    assert outcome.ok and outcome.status == 0x0000 and outcome.problem is None


def test_echo_reports_rejection_and_no_listener(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    rejected = scp.client(called_aet="WRONGAE").echo()
    assert not rejected.ok and rejected.problem is not None and rejected.problem.kind == "rejected"
    nobody = RouterClient(LOOPBACK, free_port(), ROUTER_AET).echo()
    assert not nobody.ok and nobody.problem is not None and nobody.problem.kind == "connect"


def test_from_settings_uses_the_router_settings() -> None:
    settings = Settings(
        DCM4CHEE_URL="http://pacs.test/rs",
        ROUTER_IP="10.0.0.9",
        ROUTER_PORT=11119,
        ROUTER_AET="DCMROUTER",
        GATEWAY_AET="RSUD-GW",
        ROUTER_MAX_ASSOCIATIONS=2,
        SS_AUTH_URL="https://auth.test/oauth2/v1",
        SS_BASE_URL="https://fhir.test/fhir-r4/v1",
        SS_ORG_ID="100012345",
        SS_CLIENT_ID="id",
        SS_CLIENT_SECRET="secret",
    )
    client = RouterClient.from_settings(settings)
    assert (client.host, client.port, client.called_aet, client.calling_aet) == (
        "10.0.0.9",
        11119,
        "DCMROUTER",
        "RSUD-GW",
    )
    assert client.slots is router_slots("10.0.0.9", 11119, 2)


def test_clients_of_one_router_share_the_association_cap() -> None:
    port = free_port()
    first = RouterClient(LOOPBACK, port, ROUTER_AET, max_associations=3)
    second = RouterClient(LOOPBACK, port, ROUTER_AET, max_associations=3)
    other = RouterClient(LOOPBACK, free_port(), ROUTER_AET, max_associations=3)
    assert first.slots is second.slots
    assert other.slots is not first.slots


def test_a_send_holds_a_slot_until_it_ends(start_scp: Callable[..., RecordingSCP]) -> None:
    entered = threading.Event()
    go_on = threading.Event()

    def block_first(number: int) -> None:
        if number == 1:
            entered.set()
            go_on.wait(DEADLINE_S)

    scp = start_scp(on_store=block_first)
    client = scp.client(max_associations=1)
    outcomes: list[StudyOutcome] = []
    sender = threading.Thread(target=lambda: outcomes.append(client.send_study(iter_instances(StudySpec(series=1)))))
    sender.start()
    try:
        assert entered.wait(DEADLINE_S)
        assert not client.slots.acquire(blocking=False), "the only slot is held while the association runs"
    finally:
        go_on.set()
        sender.join(DEADLINE_S)
    assert outcomes and outcomes[0].complete
    assert client.slots.acquire(blocking=False), "the slot is given back"
    client.slots.release()


# --------------------------------------------------------------------------------------------------------------
# The response race (bench/RESULTS.md §5.3)


def store_response(message_id: int = 1) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = generate_uid()
    rsp.Status = 0x0000
    return rsp


def store_request() -> C_STORE:
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = generate_uid()
    req.Priority = 2
    return req


class _FakeAssoc:
    dimse_timeout = 0.01


def test_plain_dimse_hands_a_response_to_a_non_blocking_read() -> None:
    """The control: pynetdicom's own provider gives the reactor's poll whatever is queued, responses included."""
    plain = DIMSEServiceProvider(_FakeAssoc())  # type: ignore[arg-type]
    rsp = store_response()
    plain.msg_queue.put((1, rsp))
    assert plain.get_msg(block=False) == (1, rsp)


def test_guarded_dimse_keeps_responses_and_close_markers_for_the_sender() -> None:
    guarded = ResponseKeepingDIMSE(_FakeAssoc())  # type: ignore[arg-type]
    rsp = store_response()
    guarded.msg_queue.put((1, rsp))
    assert guarded.get_msg(block=False) == (None, None)
    assert guarded.msg_queue.qsize() == 1
    assert guarded.get_msg(block=True) == (1, rsp)

    guarded.msg_queue.put((None, None))
    assert guarded.get_msg(block=False) == (None, None)
    assert guarded.msg_queue.qsize() == 1, "the connection-closed marker stays for a blocked send"


def test_guarded_dimse_still_serves_requests_to_the_reactor() -> None:
    guarded = ResponseKeepingDIMSE(_FakeAssoc())  # type: ignore[arg-type]
    req = store_request()
    guarded.msg_queue.put((3, req))
    assert guarded.get_msg(block=False) == (3, req)
    assert guarded.get_msg(block=False) == (None, None)
    assert not is_for_sender(req) and is_for_sender(store_response()) and is_for_sender(None)


class RaceProvoker:
    """Forces pynetdicom 3.0.4's send_c_store response race on every send of one association.

    The race needs the reactor thread to have been woken by the previous send's `_reactor_checkpoint.set()`
    (leaving `_is_paused` True) but to run only after the next send's C-STORE-RSP is queued: what a starved
    thread on a loaded CPU does. The provoker makes that timing certain:
    - the checkpoint, once the reactor is woken, holds it until a response is at the head of the DIMSE queue;
    - the sender's blocking read waits until the reactor has polled the queue with that response at its head,
      and returns only once the reactor is parked in the checkpoint again, so the next set() wakes it.
    Unguarded, the reactor's poll takes the response and the send returns an empty status after dimse_timeout.
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.polls_with_response = 0
        self._polled = threading.Event()
        self._parked = threading.Event()
        self._stalling = threading.Event()

    def install(self) -> RaceProvoker:
        dimse = self.assoc.dimse
        real_get = dimse.get_msg
        provoker = self

        def get_msg(block: bool = False) -> tuple[object, object]:
            if block:
                provoker._polled.wait(DEADLINE_S)
                provoker._polled.clear()
                item = real_get(block=True)
                wait_until(lambda: provoker._parked.is_set() or provoker.assoc._kill)
                return item
            response_at_head = provoker._response_at_head()
            item = real_get(block=False)
            if response_at_head:
                provoker.polls_with_response += 1
                provoker._polled.set()
            return item

        class LateWakingCheckpoint(threading.Event):
            def wait(self, timeout: float | None = None) -> bool:
                provoker._parked.set()
                signaled = super().wait(timeout)
                provoker._parked.clear()
                if signaled:
                    provoker._stalling.set()
                    wait_until(lambda: provoker._response_at_head() or provoker.assoc._kill)
                return signaled

        checkpoint = LateWakingCheckpoint()
        checkpoint.set()
        dimse.get_msg = get_msg  # type: ignore[method-assign]
        self.assoc._reactor_checkpoint = checkpoint
        assert self._stalling.wait(DEADLINE_S), "the reactor never reached the checkpoint"
        return self

    def _response_at_head(self) -> bool:
        queue = self.assoc.dimse.msg_queue
        with queue.mutex:
            return bool(queue.queue) and queue.queue[0][1] is not None and is_for_sender(queue.queue[0][1])


def open_association(port: int, dimse_timeout: float) -> Association:
    ae = AE(ae_title="SATSET")
    ae.dimse_timeout = dimse_timeout
    assoc = ae.associate(LOOPBACK, port, contexts=[build_context(CTImageStorage)], ae_title=ROUTER_AET)
    assert assoc.is_established
    return assoc


def test_race_provoker_breaks_unguarded_pynetdicom(
    start_scp: Callable[..., RecordingSCP], caplog: pytest.LogCaptureFixture
) -> None:
    """The control: without the guard the provoked race loses the response, as seen under load in the bench."""
    scp = start_scp()
    assoc = open_association(scp.port, dimse_timeout=1.0)
    provoker = RaceProvoker(assoc).install()
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        status = assoc.send_c_store(study(StudySpec(series=1, instances_per_series=1))[0])

    assert provoker.polls_with_response == 1
    assert "Status" not in status, "the stolen response leaves an empty status"
    assert "Received unexpected C-STORE service message" in caplog.text
    assert wait_until(lambda: not assoc.is_established)
    assert len(scp.received) == 1, "the SCP had stored it: only the response was lost"


def test_guard_hands_every_stolen_response_to_the_sender(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    assoc = open_association(scp.port, dimse_timeout=DEADLINE_S)
    guard_response_race(assoc)
    provoker = RaceProvoker(assoc).install()
    instances = study(StudySpec(series=2, instances_per_series=4))
    statuses = [assoc.send_c_store(ds, msg_id=n).get("Status") for n, ds in enumerate(instances, start=1)]
    assoc.release()

    assert provoker.polls_with_response == len(instances), "the race happened on every send"
    assert statuses == [0x0000] * len(instances)
    assert assoc.is_released


def test_router_client_sends_through_the_provoked_race(start_scp: Callable[..., RecordingSCP]) -> None:
    provokers: list[RaceProvoker] = []

    class Racing(RouterClient):
        def _prepare(self, assoc: Association) -> None:
            super()._prepare(assoc)
            provokers.append(RaceProvoker(assoc).install())

    scp = start_scp()
    client = Racing(LOOPBACK, scp.port, ROUTER_AET, dimse_timeout=DEADLINE_S)
    outcome = client.send_study(iter_instances(StudySpec(series=2, instances_per_series=3)))

    assert outcome.complete, outcome.describe()
    assert provokers[0].polls_with_response == 6
    assert isinstance(provokers[0].assoc.dimse, ResponseKeepingDIMSE)


# --------------------------------------------------------------------------------------------------------------
# The wire path: encoded instances written and answered on the socket by the sending thread (WireChannel)


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encoded(
    instances: list[Dataset], accession: str = "RAD2024000123", patient: str | None = "P02478375538"
) -> Iterator[EncodedInstance]:
    return (edit_encoded_for_satusehat(part10(ds), accession_number=accession, patient_id=patient) for ds in instances)


def test_encoded_study_arrives_edited_and_otherwise_identical(start_scp: Callable[..., RecordingSCP]) -> None:
    scp = start_scp()
    instances = study(StudySpec(series=3, instances_per_series=4, accession_number="OLD", patient_id="MRN1"))
    originals = {ds.SOPInstanceUID: ds for ds in instances}

    outcome = scp.client().send_study(encoded(instances))

    assert outcome.complete, outcome.describe()
    assert (outcome.sent, outcome.confirmed, outcome.failures) == (12, 12, ())
    assert sorted(ds.SOPInstanceUID for ds in scp.received) == sorted(originals), "every instance exactly once"
    for ds in scp.received:
        original = originals[ds.SOPInstanceUID]
        assert (ds.AccessionNumber, ds.PatientID) == ("RAD2024000123", "P02478375538")
        assert {elem.tag for elem in ds} == {elem.tag for elem in original}
        for elem in original:
            if elem.keyword not in ("AccessionNumber", "PatientID"):
                assert ds[elem.tag].value == elem.value, elem.keyword
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(set(scp.store_assocs)) == 1, "one association for the whole study"
    assert wait_until(lambda: len(scp.released) == 1)
    assert scp.aborted == []


@pytest.mark.parametrize("maximum_pdu", [4096, 16382, 0])
def test_wire_fragments_at_the_routers_maximum_pdu(start_scp: Callable[..., RecordingSCP], maximum_pdu: int) -> None:
    """A 64 KB data set in 4 KB PDUs, in 16 KB PDUs, and in one PDU (0: the router sets no maximum)."""
    scp = start_scp(maximum_pdu_size=maximum_pdu)
    instances = study(StudySpec(series=1, instances_per_series=3, rows=128, columns=256))

    outcome = scp.client().send_study(encoded(instances))

    assert outcome.complete, outcome.describe()
    assert [ds.PixelData for ds in scp.received] == [ds.PixelData for ds in instances]


@pytest.mark.parametrize("form", ["dataset", "encoded"])
def test_every_status_is_read_in_both_forms(start_scp: Callable[..., RecordingSCP], form: str) -> None:
    statuses = {1: 0x0000, 2: 0xB000, 3: 0xA700, 4: 0xC000, 5: 0x0000}
    scp = start_scp(status_for=lambda n: statuses[n])
    instances = study(StudySpec(series=1, instances_per_series=5))
    stream = edited(instances, accession="ACC1") if form == "dataset" else encoded(instances, accession="ACC1")

    outcome = scp.client().send_study(stream)

    assert (outcome.sent, outcome.confirmed, outcome.warnings) == (5, 3, 1)
    assert [(f.sop_instance_uid, f.status, f.retryable) for f in outcome.failures] == [
        (instances[2].SOPInstanceUID, 0xA700, True),
        (instances[3].SOPInstanceUID, 0xC000, False),
    ]
    assert not outcome.association_ok and outcome.problem is not None and outcome.problem.kind == "aborted"
    with pytest.raises(InstanceRejected):
        raise_for_outcome(outcome)


def test_wire_abort_mid_study_ends_it_at_once(start_scp: Callable[..., RecordingSCP]) -> None:
    """The router's A-ABORT is left for pynetdicom to read: the study stops there, with no DIMSE timeout wait."""
    scp = start_scp(abort_at=3)
    outcome = scp.client(dimse_timeout=DEADLINE_S).send_study(
        encoded(study(StudySpec(series=2, instances_per_series=3)))
    )

    assert (outcome.sent, outcome.confirmed) == (3, 2)
    assert outcome.problem is not None and outcome.problem.kind == "aborted"
    assert [f.retryable for f in outcome.failures] == [True]
    assert "no C-STORE response" in outcome.failures[0].reason
    with pytest.raises(StoreIncomplete):
        raise_for_outcome(outcome)


def test_wire_dimse_timeout_aborts_rather_than_releasing(start_scp: Callable[..., RecordingSCP]) -> None:
    release = threading.Event()
    scp = start_scp(on_store=lambda n: release.wait(DEADLINE_S) if n == 2 else None)
    try:
        outcome = scp.client(dimse_timeout=0.3).send_study(encoded(study(StudySpec(series=1, instances_per_series=4))))
    finally:
        release.set()

    assert (outcome.sent, outcome.confirmed) == (2, 1)
    assert "DIMSE timeout" in outcome.failures[0].reason
    assert outcome.problem is not None and outcome.problem.kind == "aborted"
    assert wait_until(lambda: len(scp.aborted) == 1), "the router sees an abort, never a release of a part"
    assert scp.released == []


def test_wire_converts_when_the_router_takes_only_another_uncompressed_syntax(
    start_scp: Callable[..., RecordingSCP],
) -> None:
    scp = start_scp(contexts=[build_context(CTImageStorage, ImplicitVRLittleEndian)])
    instances = study(StudySpec(series=1, instances_per_series=2))

    outcome = scp.client().send_study(encoded(instances))

    assert outcome.complete, outcome.describe()
    assert {ds.file_meta.TransferSyntaxUID for ds in scp.received} == {ImplicitVRLittleEndian}
    assert [ds.PixelData for ds in scp.received] == [ds.PixelData for ds in instances]
    assert {ds.AccessionNumber for ds in scp.received} == {"RAD2024000123"}


def test_wire_without_an_accepted_context_records_a_permanent_failure(
    start_scp: Callable[..., RecordingSCP],
) -> None:
    scp = start_scp()
    pairs = [(CTImageStorage, ExplicitVRLittleEndian)]
    outcome = scp.client().send_study(encoded(mixed_study()), sop_classes_and_syntaxes=pairs)

    assert (outcome.sent, outcome.confirmed) == (2, 2)
    assert len(outcome.failures) == 2
    assert all("No presentation context" in f.reason and not f.retryable for f in outcome.failures)


def test_wire_preflight_refuses_unroutable_and_foreign_instances(start_scp: Callable[..., RecordingSCP]) -> None:
    instances = study(StudySpec(series=1, instances_per_series=4))
    del instances[1].Modality
    instances[2].StudyInstanceUID = generate_uid()
    scp = start_scp()

    outcome = scp.client().send_study(encoded(instances))

    assert (outcome.sent, outcome.confirmed) == (2, 2)
    reasons = {f.sop_instance_uid: f.reason for f in outcome.failures}
    assert "Modality is missing" in reasons[instances[1].SOPInstanceUID]
    assert "one association carries one study" in reasons[instances[2].SOPInstanceUID]


def test_wire_failing_stream_aborts_and_propagates(start_scp: Callable[..., RecordingSCP]) -> None:
    class PacsBroke(Exception):
        pass

    def breaking() -> Iterator[EncodedInstance]:
        stream = encoded(study(StudySpec(series=1, instances_per_series=4)))
        yield next(stream)
        yield next(stream)
        raise PacsBroke("stream ended early")

    scp = start_scp()
    with pytest.raises(PacsBroke):
        scp.client().send_study(breaking())

    assert wait_until(lambda: len(scp.aborted) == 1)
    assert scp.released == [] and len(scp.received) == 2


def test_datasets_and_encoded_instances_share_one_association(start_scp: Callable[..., RecordingSCP]) -> None:
    """The channel hands the socket back to pynetdicom for a Dataset and takes it again for the next encoded one."""
    instances = study(StudySpec(series=1, instances_per_series=6))
    as_datasets = list(edited(instances[:3], accession="ACC9", patient="P9"))
    as_encoded = list(encoded(instances[3:], accession="ACC9", patient="P9"))
    mixed: list[Dataset | EncodedInstance] = [as_datasets[0], as_encoded[0], as_datasets[1], as_encoded[1]]
    mixed += [as_datasets[2], as_encoded[2]]
    scp = start_scp()

    outcome = scp.client().send_study(iter(mixed))

    assert outcome.complete, outcome.describe()
    assert len(set(scp.store_assocs)) == 1
    assert {ds.AccessionNumber for ds in scp.received} == {"ACC9"}


def test_wire_path_leaves_nothing_for_the_reactor_to_steal(start_scp: Callable[..., RecordingSCP]) -> None:
    """While the channel is engaged, the reactor is parked and the DUL does not read: no response ever reaches the
    DIMSE queue, so the race of §5.3 has nothing to take. The guard stays installed for Dataset sends."""
    seen: list[tuple[bool, bool, int]] = []

    class Watching(RouterClient):
        def _store_on_wire(
            self, wire: WireChannel, item: EncodedInstance, message_id: int
        ) -> tuple[int | None, str | None]:
            result = super()._store_on_wire(wire, item, message_id)
            assoc = wire._assoc
            seen.append((assoc._is_paused, assoc.dul._is_transport_event(), assoc.dimse.msg_queue.qsize()))
            return result

    scp = start_scp()
    client = Watching(LOOPBACK, scp.port, ROUTER_AET)
    outcome = client.send_study(encoded(study(StudySpec(series=2, instances_per_series=3))))

    assert outcome.complete
    assert seen == [(True, False, 0)] * 6


def test_dcmtk_storescp_receives_the_encoded_study_as_files(tmp_path: Path) -> None:
    require_dcmtk("storescp")
    instances = study(StudySpec(series=2, instances_per_series=5, rows=256, columns=256))
    pixels = {ds.SOPInstanceUID: ds.PixelData for ds in instances}

    with dcmtk.StoreSCP(tmp_path / "recv", aet=ROUTER_AET) as storescp:
        client = RouterClient(storescp.host, storescp.port, ROUTER_AET)
        outcome = client.send_study(encoded(instances, accession="ACSN-WIRE-1"))
        files = storescp.wait_for_files(len(instances))

    assert outcome.complete, outcome.describe()
    read = [dcmread(path) for path in files]
    assert {ds.SOPInstanceUID: ds.PixelData for ds in read} == pixels
    assert {ds.AccessionNumber for ds in read} == {"ACSN-WIRE-1"}


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4.5", "1.2.3.4.56", generate_uid()])
@pytest.mark.parametrize("message_id", [1, 7, 0xFFFF])
def test_the_command_set_is_the_one_pynetdicom_encodes(sop_instance_uid: str, message_id: int) -> None:
    req = C_STORE()
    req.MessageID = message_id
    req.Priority = 2
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(req)

    assert c_store_command(CTImageStorage, sop_instance_uid, message_id) == pynetdicom_encode(
        message.command_set, True, True
    )


def store_response_command(message_id: int, status: int, comment: str | None = None) -> bytes:
    rsp = store_response(message_id)
    rsp.Status = status
    rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return pynetdicom_encode(message.command_set, True, True)


def test_a_store_response_is_read_for_its_status_and_message() -> None:
    assert parse_store_response(store_response_command(5, 0x0000), 5) == WireReply(0x0000)
    reply = parse_store_response(store_response_command(5, 0xA700, "disk full"), 5)
    assert (reply.status, reply.comment) == (0xA700, "disk full")
    wrong = parse_store_response(store_response_command(4, 0x0000), 5)
    assert wrong.status is None and "not 5" in (wrong.problem or "")
    assert parse_store_response(b"", 5).status is None


def test_p_data_buffers_split_across_parts_within_the_pdu_limit() -> None:
    parts = (b"a" * 10, memoryview(b"b" * 25), b"c" * 7)
    buffers = p_data_buffers(parts, 42, context_id=3, fragment=16)

    pdus, data, stream = [], b"", b"".join(bytes(b) for b in buffers)
    pos = 0
    while pos < len(stream):
        kind, _, length = struct.unpack_from(">BBL", stream, pos)
        item_length, context_id, control = struct.unpack_from(">LBB", stream, pos + 6)
        pdus.append((kind, length, item_length, context_id, control))
        data += stream[pos + 12 : pos + 6 + length]
        pos += 6 + length
    assert data == b"a" * 10 + b"b" * 25 + b"c" * 7
    assert [p[4] for p in pdus] == [0x00, 0x00, 0x02]
    assert all(kind == 0x04 and length <= 16 + 6 and ctx == 3 for kind, length, _, ctx, _ in pdus)


def test_stored_first_contexts_offer_each_stored_syntax_alone_then_the_merged_fallback() -> None:
    contexts = presentation_contexts(
        [
            (CTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, JPEGLosslessSV1),
            (MRImageStorage, ExplicitVRLittleEndian),
        ],
        stored_first=True,
    )
    assert [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in contexts] == [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (CTImageStorage, [JPEGLosslessSV1]),
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


def test_the_race_guard_still_holds_around_the_wire_path(start_scp: Callable[..., RecordingSCP]) -> None:
    """The provoked race of §5.3 on every Dataset send, with encoded instances sent on the wire in between: every
    Dataset response is handed to its sender (the guard), every encoded one is read off the socket (no race)."""
    provokers: list[RaceProvoker] = []

    class Racing(RouterClient):
        def _prepare(self, assoc: Association) -> None:
            super()._prepare(assoc)
            provokers.append(RaceProvoker(assoc).install())

    instances = study(StudySpec(series=1, instances_per_series=6))
    as_datasets = list(edited(instances[:3], accession="ACC9", patient="P9"))
    as_encoded = list(encoded(instances[3:], accession="ACC9", patient="P9"))
    mixed: list[Dataset | EncodedInstance] = [
        item for pair in zip(as_datasets, as_encoded, strict=True) for item in pair
    ]
    scp = start_scp()

    outcome = Racing(LOOPBACK, scp.port, ROUTER_AET, dimse_timeout=DEADLINE_S).send_study(iter(mixed))

    assert outcome.complete, outcome.describe()
    assert (outcome.sent, outcome.confirmed) == (6, 6)
    assert provokers[0].polls_with_response == 3, "the race happened on each Dataset send and was survived"
    assert isinstance(provokers[0].assoc.dimse, ResponseKeepingDIMSE)
