"""An emulation of the official SATUSEHAT DICOM Router v1.1.0: a C-STORE SCP turning associations into ImagingStudy.

What it copies from the router (shared/research/satusehat.md §3, observed_contracts.md):

* It accepts every storage SOP class in every transfer syntax, plus C-ECHO, and only when the called AE title is
  its own (`ae.require_called_aet`); any other called AE title is rejected (reason 0x07, not recognised).
  `transfer_syntaxes=V1_0_1_TRANSFER_SYNTAXES` emulates router v1.0.1 instead, which accepted only the default
  syntaxes plus JPEG Lossless SV1 and JPEG 2000 Lossless (research §3.3): a router still running it refuses the
  presentation contexts of, e.g., JPEG Baseline or RLE studies.
* C-STORE answers Success (0x0000) at once, before anything reaches the platform. Like the router's handler,
  a dataset with no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID or AccessionNumber *element* makes the
  handler fail, so pynetdicom answers 0xC211; present-but-empty values are accepted and fail later.
* Processing happens only on A-RELEASE (the router binds EVT_RELEASED and nothing for EVT_ABORTED): an aborted
  association, or a connection that drops without release, never yields an ImagingStudy; its instances are
  discarded ("router.discarded" event). For each (StudyInstanceUID, AccessionNumber) of a released association,
  in arrival order: empty ACSN → skipped; ServiceRequest searched as the router's raw query
  `identifier=acsn/{org}%7CACSN&_sort=-_lastUpdated&_count=1` (FHIR search semantics: an ACSN with `,` is two
  values OR-ed, see simulator/search.py) → none, or a subject that is not "Patient/<id>" → skipped ("ServiceRequest not
  found"); then the ImagingStudy is built from *this association's* instances only and replaces the newest one
  with that ACSN (PUT, same id) or is created (POST). There is no retry, as in production.
* The build is the router's (simulator/imaging.py): a later instance its FHIR library refuses (no
  InstanceNumber, a negative one, a new series without SeriesNumber or Modality) ends the build there, and the
  partial ImagingStudy is posted all the same ("router.build_stopped" event, then "router.imagingstudy" with
  `partial`); a `started` without a zone (StudyTime absent, empty or shorter than hhmmss) is posted as is and
  refused by the platform's date rules ("router.failed"), so no ImagingStudy appears, as in production.
* The POST/PUT goes through Platform.create / Platform.update with the JSON text the router would send, the same
  path and rules as an external `POST /fhir-r4/v1/ImagingStudy`: the emulation never bypasses validation.
* The platform sees it `router_delay_s` after the release, from a worker thread: the gateway must poll, as in
  production. Processing is serial (one worker), which avoids the router's create/create race on one ACSN.

Memory: the C-STORE handler decodes only the builder's attributes (stopping before group 0x0021, so never the
pixel data) from pynetdicom's received bytes and keeps a small `InstanceHeader`; nothing is written to disk.
STOW to the platform's DICOM store is not emulated (v1.1.0 ignores its answers anyway).

Faults (simulator/faults.py): "abort" is taken at an association's first C-STORE (so C-ECHO-only associations do
not use it up) and aborts the association when C-STORE number `after_instances + 1` arrives (that instance is not
kept; with fewer instances the association completes normally). "status" is taken per C-STORE: that instance is
answered `fault.status` and not kept. "lose" is taken like "abort", per association: C-STORE number
`after_instances + 1` is answered Success but not kept, so the ImagingStudy built on release lists fewer instances
than were sent and confirmed.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, JPEG2000Lossless, JPEGLosslessSV1
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from simulator.imaging import (
    ImagingStudyBuildError,
    InstanceHeader,
    absent_at_store,
    acsn_system,
    build_imaging_study,
    patient_reference,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from simulator.config import SimulatorConfig
    from simulator.faults import Faults, RouterFault
    from simulator.store import Store

LOGGER = logging.getLogger("simulator.router")

STATUS_SUCCESS = 0x0000
STATUS_HANDLER_FAILED = 0xC211
"""What pynetdicom answers when the router's C-STORE handler raises (it does on absent UIDs / AccessionNumber)."""

_HEADER_TAGS: list[BaseTag | int] = [
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet",
        "ImageType",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyDate",
        "SeriesDate",
        "StudyTime",
        "SeriesTime",
        "AccessionNumber",
        "Modality",
        "StudyDescription",
        "SeriesDescription",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
    )
]
V1_0_1_TRANSFER_SYNTAXES: tuple[str, ...] = (*DEFAULT_TRANSFER_SYNTAXES, JPEGLosslessSV1, JPEG2000Lossless)
"""What router v1.0.1 accepted for storage: pynetdicom's defaults (implicit/explicit little endian, deflated,
explicit big endian) plus JPEG Lossless SV1 and JPEG 2000 Lossless (its CHANGELOG, research §3.3)."""

_STOP_AT = 0x00210000
"""Every attribute the builder reads is in groups 0008/0020: stop decoding there (far before the pixel data)."""


class _Platform(Protocol):
    """The part of simulator.platform.Platform the router uses (create / update with the platform's rules)."""

    config: SimulatorConfig
    store: Store
    faults: Faults

    def create(self, resource: Any, resource_type: str | None = None) -> dict[str, Any]: ...

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]: ...

    def search(self, resource_type: str, params: list[tuple[str, str]], base_url: str = "") -> dict[str, Any]: ...


@dataclass
class _Association:
    """What the router keeps of one association until it is released (or dropped)."""

    id: str
    peer: str
    calling_aet: str = ""
    called_aet: str = ""
    instances: dict[tuple[str, str, str], InstanceHeader] = field(default_factory=dict)
    """(study, series, SOP) → header; a re-sent SOP instance replaces the earlier one (the router's file does)."""
    stores: int = 0
    abort_fault: RouterFault | None = None
    lose_fault: RouterFault | None = None
    abort_checked: bool = False
    aborted: bool = False

    def studies(self) -> list[tuple[str, str, list[InstanceHeader]]]:
        """(StudyInstanceUID, AccessionNumber, instances) in order of first arrival, as the router groups them."""
        groups: dict[tuple[str, str], list[InstanceHeader]] = {}
        for header in self.instances.values():
            key = (header.study_instance_uid or "", header.accession_number or "")
            groups.setdefault(key, []).append(header)
        return [(study, accession, headers) for (study, accession), headers in groups.items()]


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    association: _Association = field(compare=False)


class RouterEmulator:
    """The DICOM Router stand-in: start() it, send it studies, wait_idle(), then look for the ImagingStudy."""

    def __init__(
        self, platform: _Platform, faults: Faults | None = None, *, transfer_syntaxes: Sequence[str] | None = None
    ) -> None:
        """`transfer_syntaxes`: what storage contexts accept; None (v1.1.0) is every one pynetdicom knows."""
        self.platform = platform
        self.transfer_syntaxes = list(transfer_syntaxes) if transfer_syntaxes is not None else ALL_TRANSFER_SYNTAXES
        self.config: SimulatorConfig = platform.config
        self.store: Store = platform.store
        self.faults: Faults = faults if faults is not None else platform.faults
        self.port: int = 0
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._cond = threading.Condition()
        self._open: dict[Association, _Association] = {}
        self._threads: list[Association] = []
        self._jobs: list[_Job] = []
        self._busy = False
        self._draining = False
        self._closing = False
        self._worker: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> int:
        """Listen on config.host:config.dicom_port (0 = a free port) and return the bound port."""
        if self._ae is not None:
            raise RuntimeError("the router emulation is already started (it cannot be restarted; make a new one)")
        ae = AE(ae_title=self.config.router_aet)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, self.transfer_syntaxes)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._worker = threading.Thread(target=self._work, name="satset-router-worker", daemon=True)
        self._worker.start()
        self._ae = ae
        self._server = ae.start_server((self.config.host, self.config.dicom_port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        LOGGER.info("router emulation %s listening on %s:%d", self.config.router_aet, self.config.host, self.port)
        return self.port

    def stop(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop listening, then finish or drop the work already scheduled, and join every thread started.

        Open associations are aborted (so, as in production, they yield nothing). With `drain` the associations
        already released are processed now, without waiting out the rest of `router_delay_s`, so their
        ImagingStudy exists when stop() returns; without it they are dropped ("router.dropped" event).
        """
        if self._ae is not None:
            self._ae.shutdown()  # aborts active associations and closes the listening socket
        deadline = time.monotonic() + timeout
        for assoc in list(self._threads):
            if assoc.ident is not None:
                assoc.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if drain:
                self._draining = True
            else:
                for job in self._jobs:
                    self._log("router.dropped", association=job.association.id, reason="router stopped")
                self._jobs.clear()
            self._closing = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            for state in self._open.values():
                self._discard(state, "router stopped")
            self._open.clear()
            self._threads.clear()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no association is open and no released one awaits processing; False if `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._prune()
                if not self._open and not self._jobs and not self._busy:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Short waits: a connection that dies without EVT_CONN_CLOSE is only noticed by pruning.
                self._cond.wait(min(remaining, 0.05))

    @property
    def address(self) -> tuple[str, int]:
        return (self.config.host, self.port)

    # --- pynetdicom handlers (each association runs in its own thread) ----------------------------------

    def _on_conn_open(self, event: Event) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            # pynetdicom never sets TCP_NODELAY; without it small PDUs stall on Nagle/delayed ACK (~40 ms each).
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = event.address
        with self._cond:
            self._prune()  # keeps a long-running simulator from accumulating finished association threads
            state = _Association(id=f"assoc-{next(self._ids):06d}", peer=f"{address[0]}:{address[1]}")
            self._open[event.assoc] = state
            self._threads.append(event.assoc)

    def _on_rejected(self, event: Event) -> None:
        primitive = event.assoc.requestor.primitive
        self._log(
            "router.rejected",
            association=self._state_id(event.assoc),
            calling_aet=_aet(primitive.calling_ae_title if primitive else None),
            called_aet=_aet(primitive.called_ae_title if primitive else None),
            reason=f"called AE title is not {self.config.router_aet}",
        )

    def _on_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Event) -> int:
        with self._cond:
            state = self._open.get(event.assoc)
        if state is None:  # cannot happen while pynetdicom triggers EVT_CONN_OPEN first; be safe anyway
            return STATUS_HANDLER_FAILED
        if not state.abort_checked:
            state.abort_checked = True
            state.abort_fault = self.faults.take_router("abort")
            if state.abort_fault is not None:
                self._log(
                    "router.fault",
                    association=state.id,
                    fault="abort",
                    after_instances=state.abort_fault.after_instances,
                )
            state.lose_fault = self.faults.take_router("lose")
        state.stores += 1
        if state.abort_fault is not None and state.stores > state.abort_fault.after_instances:
            state.aborted = True
            # Inside a handler pynetdicom's abort() only queues the A-ABORT (non-blocking); the reactor then
            # sends it and closes the connection, so the C-STORE-RSP below never reaches the peer.
            event.assoc.abort()
            return STATUS_HANDLER_FAILED
        status_fault = self.faults.take_router("status")
        if status_fault is not None:
            self._log("router.fault", association=state.id, fault="status", status=f"0x{status_fault.status:04X}")
            return status_fault.status
        header = InstanceHeader.from_dataset(_read_header(event))
        if state.lose_fault is not None and state.stores == state.lose_fault.after_instances + 1:
            self._log("router.fault", association=state.id, fault="lose", sop=header.sop_instance_uid)
            return STATUS_SUCCESS  # acknowledged, then never part of the ImagingStudy
        absent = absent_at_store(header)
        if absent:
            self._log("router.store_failed", association=state.id, missing=list(absent), sop=header.sop_instance_uid)
            return STATUS_HANDLER_FAILED
        key = (header.study_instance_uid or "", header.series_instance_uid or "", header.sop_instance_uid or "")
        with self._cond:
            state.instances[key] = header
        return STATUS_SUCCESS

    def _on_released(self, event: Event) -> None:
        primitive = event.assoc.requestor.primitive
        with self._cond:
            state = self._open.pop(event.assoc, None)
            if state is None:
                return
            state.calling_aet = _aet(primitive.calling_ae_title if primitive else None)
            state.called_aet = _aet(primitive.called_ae_title if primitive else None)
            if not state.instances:
                self._cond.notify_all()
                return  # C-ECHO-only associations: nothing for the router to do, nothing logged
            self._log(
                "router.received",
                association=state.id,
                calling_aet=state.calling_aet,
                called_aet=state.called_aet,
                peer=state.peer,
                instances=len(state.instances),
                studies=[
                    {"study": study, "accession": accession, "instances": len(headers)}
                    for study, accession, headers in state.studies()
                ],
            )
            due = time.monotonic() + max(0.0, self.config.router_delay_s)
            heapq.heappush(self._jobs, _Job(due, next(self._seq), state))
            self._cond.notify_all()

    def _on_aborted(self, event: Event) -> None:
        with self._cond:
            state = self._open.get(event.assoc)
            if state is not None:
                state.aborted = True

    def _on_conn_close(self, event: Event) -> None:
        with self._cond:
            state = self._open.pop(event.assoc, None)
            if state is not None:
                self._discard(state, "association aborted" if state.aborted else "connection closed without release")
            self._cond.notify_all()

    # --- processing ------------------------------------------------------------------------------------

    def _work(self) -> None:
        """The worker thread: run each released association's job when it is due (all at once when draining)."""
        while True:
            with self._cond:
                while True:
                    if self._jobs:
                        wait = self._jobs[0].due - time.monotonic()
                        if self._draining or wait <= 0:
                            job = heapq.heappop(self._jobs)
                            self._busy = True
                            break
                        self._cond.wait(wait)
                    elif self._closing:
                        return
                    else:
                        self._cond.wait()
            try:
                self._process(job.association)
            except Exception as exc:  # the worker must survive anything (a platform bug, a closed store)
                LOGGER.exception("router emulation: processing %s failed", job.association.id)
                try:
                    self._log("router.failed", association=job.association.id, reason=f"internal error: {exc!r}")
                except Exception:
                    LOGGER.exception("router emulation: could not log the failure")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _process(self, state: _Association) -> None:
        """What the router's EVT_RELEASED handler does, study by study, for one association."""
        system = acsn_system(self.config.org_id)
        for study_uid, accession, headers in state.studies():
            where = {"association": state.id, "accession": accession, "study": study_uid}
            if not accession:
                self._log("router.skipped", reason="empty AccessionNumber: Failed to create ImagingStudy", **where)
                continue
            existing = self._router_search("ImagingStudy", system, accession)
            service_request = self._router_search("ServiceRequest", system, accession)
            if service_request is None:
                self._log("router.skipped", reason="ServiceRequest not found", **where)
                continue
            subject = patient_reference(service_request)
            if subject is None:
                self._log(
                    "router.skipped",
                    reason="ServiceRequest not found: its subject.reference is not Patient/<id>",
                    service_request=service_request.get("id"),
                    **where,
                )
                continue
            imaging_study_id = existing["id"] if existing else None
            try:
                built = build_imaging_study(
                    headers,
                    service_request_id=service_request["id"],
                    subject_reference=subject,
                    imaging_study_id=imaging_study_id,
                    org_id=self.config.org_id,
                )
            except ImagingStudyBuildError as exc:
                self._log("router.failed", reason=f"Failed to create ImagingStudy: {exc}", tag=exc.tag, **where)
                continue
            if built.stopped is not None:
                # process_dicom_2_fhir prints the error and returns the study built so far; the router POSTs it.
                self._log(
                    "router.build_stopped",
                    reason=str(built.stopped),
                    tag=built.stopped.tag,
                    sop_instance_uid=built.stopped.sop_instance_uid,
                    instances=built.study["numberOfInstances"],
                    received=len(headers),
                    **where,
                )
            # What goes over the wire: JSON text, parsed by the platform as an external POST/PUT body is, through
            # the same Platform.create / Platform.update (and so the same rules) as the HTTP routes.
            body = json.loads(json.dumps(built.study))
            try:
                if imaging_study_id is None:
                    saved = self.platform.create(body, "ImagingStudy")
                else:
                    saved = self.platform.update("ImagingStudy", imaging_study_id, body)
            except Exception as exc:
                # The platform's OutcomeError (a FHIR rejection) carries status and outcome(); anything else is a
                # failed POST/PUT too, as the router logs "Failed to POST ImagingStudy" on any exception.
                verb = "POST" if imaging_study_id is None else "PUT"
                self._log(
                    "router.failed",
                    reason=f"{verb} ImagingStudy failed: {_outcome_text(exc)}",
                    status=getattr(exc, "status", None),
                    outcome=_outcome(exc),
                    **where,
                )
                continue
            self._log(
                "router.imagingstudy",
                id=saved.get("id"),
                action="created" if imaging_study_id is None else "replaced",
                service_request=service_request["id"],
                series=body["numberOfSeries"],
                instances=body["numberOfInstances"],
                partial=built.stopped is not None,
                **where,
            )

    def _router_search(self, resource_type: str, system: str, accession: str) -> dict[str, Any] | None:
        """The router's lookup by ACSN, through the platform's search as its HTTP GET reaches it.

        The router writes the ACSN into the URL raw, encoding only `|` (interface/satusehat.py:
        `?identifier=<system>%7C<ACSN>&_sort=-_lastUpdated&_count=1`); the platform decodes that query string once
        and applies FHIR search semantics (simulator/search.py). So an ACSN with a `,` is searched as two values
        OR-ed (the ServiceRequest holding the whole ACSN is not found), and `&`, `#` or `+` cut or change it, as
        in production. Like the router: `total >= 1` → `entry[0].resource`, else nothing.
        """
        url = f"/{resource_type}?identifier={system}%7C{accession}&_sort=-_lastUpdated&_count=1"
        params = parse_qsl(urlsplit(url).query, keep_blank_values=True)
        found = self.platform.search(resource_type, params)
        entries = found.get("entry") or []
        if found.get("total", 0) >= 1 and entries:
            resource = entries[0].get("resource")
            return resource if isinstance(resource, dict) else None
        return None

    # --- helpers ---------------------------------------------------------------------------------------

    def _discard(self, state: _Association, reason: str) -> None:
        if state.instances:
            self._log("router.discarded", association=state.id, reason=reason, instances=len(state.instances))

    def _prune(self) -> None:
        """Forget associations whose thread has ended without EVT_CONN_CLOSE (caller holds the lock)."""
        for assoc in [a for a in self._open if a.ident is not None and not a.is_alive()]:
            self._discard(self._open.pop(assoc), "connection lost")
        self._threads = [a for a in self._threads if a.ident is None or a.is_alive()]

    def _state_id(self, assoc: Association) -> str | None:
        with self._cond:
            state = self._open.get(assoc)
        return state.id if state else None

    def _log(self, kind: str, **detail: Any) -> None:
        LOGGER.info("%s %s", kind, detail)
        self.store.log_event(kind, **detail)


def _read_header(event: Event) -> Dataset:
    """The builder's attributes of the received dataset, decoded without ever touching the pixel data."""
    path = getattr(event.request, "_dataset_path", None)
    if path is not None:  # pynetdicom's STORE_RECV_CHUNKED_DATASET mode: the dataset is in a temporary file
        return dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    syntax = UID(event.context.transfer_syntax)
    stream = event.request.DataSet
    if not isinstance(stream, BytesIO):
        raise TypeError(f"unexpected C-STORE Data Set type {type(stream).__name__}")
    stream.seek(0)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    if syntax.is_deflated:
        stream = BytesIO(zlib.decompress(stream.getvalue(), -zlib.MAX_WBITS))
        implicit, little = False, True
    return read_dataset(
        stream, implicit, little, stop_when=lambda tag, vr, length: tag >= _STOP_AT, specific_tags=_HEADER_TAGS
    )


def _aet(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip()


def _outcome(error: Exception) -> dict[str, Any] | None:
    """The OperationOutcome of a platform rejection (simulator.platform.OutcomeError.outcome()), else None."""
    outcome_of = getattr(error, "outcome", None)
    if not callable(outcome_of):
        return None
    try:
        outcome = outcome_of()
    except Exception:
        return None
    return outcome if isinstance(outcome, dict) else None


def _outcome_text(error: Exception) -> str:
    """The OperationOutcome's issue texts, joined: what the router would have logged from the platform's answer."""
    outcome = _outcome(error) or {}
    texts = []
    for issue in outcome.get("issue", []):
        details = issue.get("details", {}) if isinstance(issue, dict) else {}
        text = details.get("text") or issue.get("diagnostics") or issue.get("code")
        if text:
            texts.append(str(text))
    return "; ".join(texts) or str(error)
