"""A study from the PACS to the SATUSEHAT DICOM Router: stream, edit, send in one association. No Prefect.

This is the gateway's DICOM path, kept in one plain function so it can be called from a notebook or a test
without any orchestration. Instances stay encoded from the PACS to the router: each Part-10 file is cut out of the
WADO-RS stream, AccessionNumber (ACSN) and PatientID (IHS number) are replaced in its bytes, and the router client
writes it on the wire; while no other study of the process is being transferred, a worker thread retrieves and
edits a few instances ahead while the current one is sent and confirmed. Memory holds at most that read-ahead
(about 2 MB of CT), whatever the study's size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from itertools import chain
from typing import Any, TypeVar

from pydicom.uid import UID

from clients.errors import (
    AssociationRejected,
    ConnectionFailed,
    GatewayError,
    Rejected,
    Service,
    StoreIncomplete,
    StudyNotFound,
    UpstreamUnavailable,
)
from clients.pacs import InstanceRef, PacsClient
from clients.router import (
    EchoOutcome,
    Instance,
    RouterClient,
    SopClassAndSyntax,
    StudyOutcome,
    presentation_contexts,
    raise_for_outcome,
)
from models.dicom import (
    EncodedInstance,
    NotDicom,
    StudyCheck,
    TimeEdits,
    check_study,
    edit_encoded_for_satusehat,
    edit_for_satusehat,
)

T = TypeVar("T")


@dataclass(frozen=True)
class RoutingReport:
    """What one routing did: the counts the existing gateway reported, and the router's own outcome."""

    study_instance_uid: str
    accession_number: str
    total_instance: int
    sent_instance: int
    patient_modified: bool
    accession_modified: bool
    router: str
    elapsed_s: float
    outcome: StudyOutcome

    def as_response(self) -> dict[str, Any]:
        """The existing gateway's /api/dicom/process success body."""
        return {
            "status": "success",
            "study_uid": self.study_instance_uid,
            "total_instance": self.total_instance,
            "sent_instance": self.sent_instance,
            "patient_modified": self.patient_modified,
            "accession_modified": self.accession_modified,
            "router": self.router,
        }


class StudyNotRoutable(Rejected):
    """The PACS study has instances the official router would mangle (no InstanceNumber, a negative one, a time
    it cannot read, ...): refused before anything is created, naming each instance, element and rule."""

    service: Service | None = "pacs"


def preflight_study(pacs: PacsClient, study_instance_uid: str, *, zone: tzinfo, now: datetime) -> StudyCheck:
    """Read the study's metadata from the PACS and check it (`models.dicom.check_study`); raise StudyNotRoutable
    with every problem, StudyNotFound when the PACS has no such study."""
    check = check_study(pacs.study_metadata(study_instance_uid), zone=zone, now=now)
    if not check.ok:
        raise StudyNotRoutable(
            f"study {study_instance_uid} cannot be routed as it is in the PACS: {check.describe()}. The official "
            "DICOM Router would build no ImagingStudy, or an incomplete one, from it; nothing was created. Correct "
            "the study in the PACS (or at the modality) and send the order again",
            service="pacs",
        )
    return check


def verify_router(router: RouterClient) -> EchoOutcome:
    """C-ECHO the router before anything is created: a wrong ROUTER_AET, ROUTER_IP or ROUTER_PORT is found here,
    not after the Encounter and ServiceRequest exist. Raises AssociationRejected (the router refused the called
    AE title: not retried) or ConnectionFailed (nobody answered: retried)."""
    outcome = router.echo()
    if outcome.ok:
        return outcome
    reason = outcome.problem.reason if outcome.problem is not None else f"C-ECHO status 0x{outcome.status or 0:04X}"
    message = (
        f"the DICOM Router did not answer a C-ECHO ({reason}): check ROUTER_AET ({router.called_aet!r}), "
        f"ROUTER_IP ({router.host}) and ROUTER_PORT ({router.port}); nothing was created"
    )
    if outcome.problem is not None and not outcome.problem.retryable:
        raise AssociationRejected(message, service="router")
    raise ConnectionFailed(message, service="router")


READ_AHEAD = 4
"""Instances retrieved and edited ahead of the one being sent (about 2 MB for CT): see `read_ahead`."""


def route_study(
    pacs: PacsClient,
    router: RouterClient,
    *,
    study_instance_uid: str,
    accession_number: str,
    patient_id: str | None = None,
    encoded: bool = True,
    read_ahead: int = READ_AHEAD,
    times: TimeEdits | None = None,
) -> RoutingReport:
    """Send every instance of the study to the router in one association, edited; raise unless all arrived.

    The default path keeps instances encoded from the PACS to the router: Part-10 files are cut out of the WADO-RS
    stream, the two elements are edited in the bytes (`edit_encoded_for_satusehat`) and the router client writes
    them on the wire. With `read_ahead` > 0 a worker thread retrieves and edits up to that many instances while
    the current one is sent and confirmed (the core would otherwise idle while the router answers), unless other
    studies of this process are being transferred when this one's association is up: their threads keep the cores
    busy already (see `_AheadWhenAlone`). 0 does everything in the calling thread. Before the transfer the PACS
    is asked for its series only (the count to check and the kinds of instances to propose); the instance
    listing, when needed, runs alongside: see `_route_encoded`.

    `times` (the pre-flight's `StudyCheck.times`) has StudyTime and SeriesDate/SeriesTime written as HHMMSS too,
    so the router's `started` is one the platform accepts.

    `encoded=False` is the former path, kept for comparison and for callers that want datasets: listing first,
    then pydicom decodes each instance and pynetdicom encodes and sends it.

    Raises StudyNotFound when the PACS lists no instance, the router client's errors (`raise_for_outcome`) when
    the router did not confirm every instance, and StoreIncomplete when the PACS delivered fewer instances than
    it listed (an instance missing from the PACS must not yield an ImagingStudy reported as complete).
    """
    started = time.monotonic()
    if encoded:
        outcome, expected = _route_encoded(
            pacs, router, study_instance_uid, accession_number, patient_id, read_ahead, times
        )
    else:
        refs = pacs.list_instances(study_instance_uid)
        if not refs:
            raise StudyNotFound(f"the PACS lists no instance for study {study_instance_uid}", service="pacs")
        datasets = _delivered_in_full(
            (
                edit_for_satusehat(ds, accession_number=accession_number, patient_id=patient_id, times=times)
                for ds in pacs.iter_instances(study_instance_uid)
            ),
            lambda: len(refs),
            pacs,
            study_instance_uid,
        )
        outcome = _send(router, datasets, read_ahead, study_instance_uid, lambda first: _contexts_for(refs, first))
        expected = len(refs)
    raise_for_outcome(outcome)
    if outcome.confirmed < expected:
        raise StoreIncomplete(
            f"the PACS listed {expected} instances of study {study_instance_uid} but delivered "
            f"{outcome.confirmed}; the router got an incomplete study",
            service="pacs",
        )
    return RoutingReport(
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        total_instance=expected,
        sent_instance=outcome.confirmed,
        patient_modified=patient_id is not None,
        accession_modified=True,
        router=outcome.router,
        elapsed_s=time.monotonic() - started,
        outcome=outcome,
    )


def _route_encoded(
    pacs: PacsClient,
    router: RouterClient,
    study_uid: str,
    accession_number: str,
    patient_id: str | None,
    read_ahead: int,
    times: TimeEdits | None = None,
) -> tuple[StudyOutcome, int]:
    """The encoded path; returns the outcome and the number of instances the PACS says the study has.

    What the PACS must say before the transfer starts is little: which kinds of instances to propose (contexts go
    before the first C-STORE) and, for the check at the end, how many instances there are. The instance-level
    QIDO-RS answers both, but on some PACS it costs as much as moving the study (Orthanc 1.10 reads every file to
    answer it: 0.2 s and 0.18 CPU-s for 300 CT slices). So:

    * The series-level query (one cheap QIDO-RS) comes first. When it gives every series' instance count and SOP
      class (Orthanc does), that is the listing: the association proposes those classes in the first instance's
      syntax, and every instance is checked against what was proposed before it is sent.
    * Otherwise the instance listing runs in its own thread (its own PACS client) while the series are streamed.
      If it has answered when the first instance is ready, its contexts are proposed, as before; if not, what is
      known is proposed and the stream checks the listing as soon as it arrives, before its end at the latest.

    Either check failing (an instance, or the listing, of a kind not proposed) makes the stream raise: the router
    client aborts the association (the router builds nothing from an aborted association) and the study is sent
    again with the instance listing's exact contexts. The router never sees a release before the checks passed.
    """
    series = pacs.list_series_refs(study_uid)
    counted = all(ref.instances is not None and ref.sop_class_uid for ref in series)
    listing = None if counted else _Listing(pacs, study_uid)
    try:
        files = pacs.iter_instance_files(study_uid, series=[ref.series_instance_uid for ref in series])
        proposed: list[SopClassAndSyntax] = []

        def contexts(first: Instance) -> list[SopClassAndSyntax]:
            if listing is not None and listing.done():
                return list(_contexts_for(listing.result(), first))
            first_class, first_syntax = _kind(first)
            proposed.append((first_class, first_syntax))
            proposed.extend((ref.sop_class_uid, first_syntax) for ref in series if ref.sop_class_uid)
            return proposed

        def counted_or_listed() -> int:
            return len(listing.result()) if listing is not None else sum(ref.instances or 0 for ref in series)

        try:
            outcome = _send(
                router,
                _delivered_in_full(
                    _edited(files, accession_number, patient_id, study_uid, times), counted_or_listed, pacs, study_uid
                ),
                read_ahead,
                study_uid,
                contexts,
                proposed,
                listing,
            )
        except _ProposedTooLittle:
            listed = listing.result() if listing is not None else pacs.list_instances(study_uid)
            files = pacs.iter_instance_files(study_uid, listed=listed)
            outcome = _send(
                router,
                _delivered_in_full(
                    _edited(files, accession_number, patient_id, study_uid, times), lambda: len(listed), pacs, study_uid
                ),
                read_ahead,
                study_uid,
                lambda first: _contexts_for(listed, first),
            )
            return outcome, len(listed)
        if listing is not None:
            return outcome, len(listing.result())
        return outcome, sum(ref.instances or 0 for ref in series)
    finally:
        if listing is not None:
            listing.close()


def _delivered_in_full(
    stream: Iterator[Instance], expected: Callable[[], int], pacs: PacsClient, study_uid: str
) -> Iterator[Instance]:
    """`stream`, raising StoreIncomplete at its end if the PACS delivered fewer instances than it listed.

    Raised from inside the stream, so the router client aborts the association instead of releasing it: the router
    builds an ImagingStudy from whatever a released association carried, and a study short of an instance (listed
    by the PACS, never delivered: a lost file, storage offline) must not reach SATUSEHAT as if it were the study.
    The message names the instances missing, from the PACS's instance listing, so an operator can look for them.
    """
    delivered: set[str] = set()
    for item in stream:
        delivered.add(_sop_instance_uid(item))
        yield item
    wanted = expected()
    if len(delivered) < wanted:
        raise StoreIncomplete(_shortfall(pacs, study_uid, wanted, delivered), service="pacs")


def _shortfall(pacs: PacsClient, study_uid: str, wanted: int, delivered: set[str]) -> str:
    message = f"the PACS listed {wanted} instances of study {study_uid} but delivered {len(delivered)}"
    try:
        missing = sorted(ref.sop_instance_uid for ref in pacs.list_instances(study_uid))
    except GatewayError:
        missing = []
    missing = [uid for uid in missing if uid not in delivered]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        message += f" (not delivered: {', '.join(missing[:3])}{more})"
    return message + "; the association was aborted, so the router built nothing from part of the study"


def _sop_instance_uid(item: Instance) -> str:
    return item.sop_instance_uid if isinstance(item, EncodedInstance) else str(item.SOPInstanceUID)


def _edited(
    files: Iterator[bytes],
    accession_number: str,
    patient_id: str | None,
    study_uid: str = "?",
    times: TimeEdits | None = None,
) -> Iterator[EncodedInstance]:
    """The files, edited; one that is not DICOM stops the study (the router client aborts) naming its position."""
    for number, part10 in enumerate(files, 1):
        try:
            yield edit_encoded_for_satusehat(
                part10, accession_number=accession_number, patient_id=patient_id, times=times
            )
        except NotDicom as error:
            raise UpstreamUnavailable(
                f"the PACS sent instance {number} of study {study_uid} as something that is not DICOM: {error}",
                service="pacs",
            ) from None


def _send(
    router: RouterClient,
    instances: Iterator[Instance],
    read_ahead: int,
    study_uid: str,
    contexts: Callable[[Instance], Iterable[SopClassAndSyntax]],
    proposed: list[SopClassAndSyntax] | None = None,
    listing: _Listing | None = None,
) -> StudyOutcome:
    """One association: the first instance decides the contexts (with `contexts`), then the rest follows.

    When `contexts` filled `proposed` (it proposed from what was known, not from an instance listing), every
    instance and, if there is one, the listing are checked against it on the way (`_checked_against`).
    """
    with _AheadWhenAlone(instances, read_ahead) as stream:
        first = next(stream, None)
        if first is None:
            raise StoreIncomplete(f"the PACS delivered no instance of study {study_uid}", service="pacs")
        pairs = list(contexts(first))
        rest: Iterator[Instance] = chain([first], stream)
        if proposed:
            rest = _checked_against(rest, proposed, listing, _kind(first)[1])
        return router.send_study(rest, sop_classes_and_syntaxes=pairs)


class _ProposedTooLittle(Exception):
    """The listing names kinds of instances the association did not propose: send again with its contexts."""


def _checked_against(
    stream: Iterator[Instance], proposed: list[SopClassAndSyntax], listing: _Listing | None, first_syntax: str
) -> Iterator[Instance]:
    """`stream`, raising _ProposedTooLittle before an instance of a kind that was not proposed, and checking the
    listing (if any) as soon as it is in and before the end at the latest (the router client releases when the
    stream ends). The listing's own error is raised too; either way the router client aborts the association."""
    covered = _Covered(proposed)
    checked = listing is None
    for item in stream:
        if not checked and listing is not None and listing.done():
            _check_listing(listing.result(), covered, proposed[0][0], first_syntax)
            checked = True
        if not covered(*_kind(item)):
            raise _ProposedTooLittle()
        yield item
    if not checked and listing is not None:
        _check_listing(listing.result(), covered, proposed[0][0], first_syntax)


def _check_listing(listed: list[InstanceRef], covered: _Covered, first_class: str, first_syntax: str) -> None:
    for ref in listed:
        if not covered(ref.sop_class_uid or first_class, ref.transfer_syntax_uid or first_syntax):
            raise _ProposedTooLittle()


class _Covered:
    """Whether an instance of (SOP class, syntax) can go in an association that proposed `pairs`: its syntax is in
    a context for its class, or it is uncompressed little endian and the class has the merged uncompressed context
    (the router client converts between those)."""

    def __init__(self, pairs: list[SopClassAndSyntax]) -> None:
        self._exact: set[SopClassAndSyntax] = set()
        self._uncompressed: set[str] = set()
        for context in presentation_contexts(pairs):
            sop = str(context.abstract_syntax)
            syntaxes = [str(ts) for ts in context.transfer_syntax]
            self._exact.update((sop, ts) for ts in syntaxes)
            if len(syntaxes) > 1 or _uncompressed(syntaxes[0]):
                self._uncompressed.add(sop)

    def __call__(self, sop_class: str, syntax: str) -> bool:
        return (sop_class, syntax) in self._exact or (sop_class in self._uncompressed and _uncompressed(syntax))


def _uncompressed(syntax: str) -> bool:
    try:
        uid = UID(syntax)
        return uid.is_little_endian and not uid.is_compressed
    except ValueError:
        return False


class _Listing:
    """`list_instances` in a thread of its own, with a client of its own (a PacsClient is one session)."""

    def __init__(self, pacs: PacsClient, study_uid: str) -> None:
        self._client = pacs.twin()
        self._study_uid = study_uid
        self._result: list[InstanceRef] | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="routing-listing", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._client.list_instances(self._study_uid)
        except BaseException as error:  # raised to whoever asks for the result
            self._error = error
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> list[InstanceRef]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        self._thread.join()
        self._client.close()


def _kind(first: Instance) -> SopClassAndSyntax:
    if isinstance(first, EncodedInstance):
        return first.sop_class_uid, str(first.transfer_syntax_uid)
    return str(first.SOPClassUID), str(first.file_meta.TransferSyntaxUID)


def _contexts_for(listed: list[InstanceRef], first: Instance) -> Iterator[SopClassAndSyntax]:
    """One (SOP class, transfer syntax) pair per kind of instance in the study.

    dcm4chee reports each instance's transfer syntax; Orthanc does not, and there the syntax of the first instance
    retrieved stands for the study's (modalities store a study in one syntax). An instance in another syntax is
    then reported as a failure by the router client, never silently dropped.
    """
    first_class, first_syntax = _kind(first)
    yield first_class, first_syntax
    for ref in listed:
        yield ref.sop_class_uid or first_class, ref.transfer_syntax_uid or first_syntax


class _TransfersInProcess:
    """How many studies this process is transferring to a router right now (association up, instances flowing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def start(self) -> int:
        """Count one more transfer; returns how many others were running when it started."""
        with self._lock:
            others = self._count
            self._count += 1
        return others

    def end(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def running(self) -> int:
        with self._lock:
            return self._count


TRANSFERS_IN_PROCESS = _TransfersInProcess()


class _AheadWhenAlone(Iterator[T]):
    """One study's instances, read ahead in a worker thread only when it is the only study being transferred.

    The first item is read in the caller's thread: the router client looks at it before it associates. At the
    second the association is up and the transfer counts in TRANSFERS_IN_PROCESS. If no other study of this
    process is being transferred, a ReadAhead of `depth` takes over the rest (one core would otherwise idle while
    the router answers); if others are, their threads keep the cores busy already and a second thread per study
    only adds GIL hand-offs and CPU, so the rest is read in the caller's thread (8 studies at once, cap 4, 2 cores:
    0.163 instead of 0.193 gateway CPU-s per 300-slice study, 1.21x instead of 1.11x the throughput of one at a
    time; bench/RESULTS.md item 3). Studies waiting for a router slot do not count: with one association at a
    time each study still gets its worker.
    """

    def __init__(self, source: Iterator[T], depth: int) -> None:
        self._source = source
        self._depth = depth
        self._stream: Iterator[T] = source
        self._first_out = False
        self._counted = False

    def __iter__(self) -> _AheadWhenAlone[T]:
        return self

    def __next__(self) -> T:
        if self._first_out and not self._counted:
            self._counted = True
            if TRANSFERS_IN_PROCESS.start() == 0 and self._depth > 0:
                self._stream = ReadAhead(self._source, self._depth)
        item = next(self._stream)
        self._first_out = True
        return item

    def __enter__(self) -> _AheadWhenAlone[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker if there is one (it closes the source), else close the source; end the count."""
        try:
            if isinstance(self._stream, ReadAhead):
                self._stream.close()
            else:
                close = getattr(self._source, "close", None)
                if close is not None:
                    close()
        finally:
            if self._counted:
                self._counted = False
                TRANSFERS_IN_PROCESS.end()


class ReadAhead(Iterator[T]):
    """Iterate `source` in a worker thread, at most `depth` items ahead of the consumer.

    Why: sending an instance is mostly waiting (the socket write, then the router's response), and Python
    releases the GIL there; the worker uses that time to retrieve and edit the next instances. Memory stays
    bounded at `depth` instances whatever the study's size. Errors in `source` are raised to the consumer at the
    point it reaches them. `close()` (or leaving the `with` block) stops the worker and closes `source` in the
    worker's own thread, which ends the PACS response.
    """

    _END = object()

    def __init__(self, source: Iterator[T], depth: int) -> None:
        if depth < 1:
            raise ValueError("read-ahead depth must be at least 1")
        self._source = source
        self._queue: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="routing-read-ahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        return item  # type: ignore[return-value]

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker, drop what it read ahead, and wait (bounded) for it to close the source."""
        self._stop.set()
        self._done = True
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.05)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as raised:  # handed to the consumer, raised there
            error = raised
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
        self._put(self._END, error)

    def _put(self, item: object, error: BaseException | None = None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put((item, error), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False
