"""C-STORE to the SATUSEHAT DICOM Router: one association per study, every instance's status checked.

The official router stores each instance, answers Success at once, and only on association *release* builds the
ImagingStudy from the files of that association (a later association for the same ACSN replaces it with a PUT).
So a study goes in ONE association, and "complete" means: released cleanly, every instance confirmed.

Outcomes are values, as in pynetdicom: `send_study` and `echo` return what happened and never raise for anything
the network or the router did. `raise_for_outcome` turns an incomplete `StudyOutcome` into the gateway's
exceptions (clients/errors.py) at the task boundary, where Prefect's retry predicates read them.

Two pynetdicom 3.0.4 problems are handled here (bench/RESULTS.md §5):
- it never sets TCP_NODELAY, and 16 KB PDUs then crawl (20x slower): set on the socket right after associate();
- a response race in its send_* methods: the association's reactor thread can take the C-STORE-RSP off the
  DIMSE queue, drop it ("Received unexpected C-STORE service message"), and the send then waits dimse_timeout and
  returns an empty status. `ResponseKeepingDIMSE` (below) closes it.

Two ways to send (bench/RESULTS.md, "routing"): a pydicom Dataset goes through pynetdicom's send_c_store (it
encodes, and hands each max-PDU fragment through a queue to its DUL thread, which polls the socket every 1 ms);
an EncodedInstance (models.dicom: the edited bytes as the PACS stored them) goes on the `WireChannel`: the sending
thread writes the P-DATA-TF PDUs with sendmsg() and reads the C-STORE-RSP itself, while pynetdicom's state
machine, association, release and abort stay in charge. That second way is what made the gateway's path 2.5x
faster; its statuses are read and classified exactly as pynetdicom's are.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeAlias

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from clients.errors import AssociationRejected, ConnectionFailed, InstanceRejected, StoreIncomplete
from models.dicom import EncodedInstance, RoutingSummary, check_routable, encode_data_set

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    from models.settings import Settings

LOGGER = logging.getLogger(__name__)

_PYNETDICOM_LOGGER = logging.getLogger("pynetdicom")
if _PYNETDICOM_LOGGER.level == logging.NOTSET:
    # pynetdicom logs every PDU at INFO/DEBUG; keep it to warnings unless someone configured it on purpose.
    _PYNETDICOM_LOGGER.setLevel(logging.WARNING)

MAX_PRESENTATION_CONTEXTS = 128
"""PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255, so one association proposes at most 128."""

UNCOMPRESSED_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

RETRYABLE_FAILURE_CODES = frozenset({0x0110, 0x0213})
"""Processing Failure and Resource Limitation: the router's trouble, not the instance's; 0xA7xx is added by range."""

SopClassAndSyntax = tuple[str, str]

Instance: TypeAlias = Dataset | EncodedInstance
"""What send_study sends: a pydicom Dataset (encoded by pynetdicom) or an EncodedInstance (sent as it is)."""


# --------------------------------------------------------------------------------------------------------------
# Outcomes


class InstanceFailure(NamedTuple):
    """One instance the router did not confirm. `status` is None when there was no status to read."""

    sop_instance_uid: str
    status: int | None
    reason: str
    retryable: bool

    def describe(self) -> str:
        code = "no status" if self.status is None else f"0x{self.status:04X}"
        return f"{self.sop_instance_uid or '(no SOP Instance UID)'} ({code}: {self.reason})"


ProblemKind = Literal["connect", "rejected", "rejected_transient", "no_context", "aborted", "release", "empty"]


@dataclass(frozen=True)
class AssociationProblem:
    """Why the association did not run its course: it never started, or it ended before a clean release."""

    kind: ProblemKind
    reason: str

    @property
    def retryable(self) -> bool:
        return self.kind not in ("rejected", "no_context")


@dataclass(frozen=True)
class StudyOutcome:
    """What one association did with one study.

    `sent` counts C-STORE requests that went out, `confirmed` those answered Success or Warning (`warnings` of
    them with a Warning: stored, possibly coerced). `failures` lists every instance not confirmed, including ones
    refused before sending (not routable, wrong study, no accepted context). `association_ok` is True when the
    association was established and released cleanly; otherwise `problem` says why.
    """

    study_instance_uid: str
    accession_number: str
    sent: int
    confirmed: int
    warnings: int
    failures: tuple[InstanceFailure, ...]
    elapsed_s: float
    association_ok: bool
    problem: AssociationProblem | None = None
    router: str = ""

    @property
    def complete(self) -> bool:
        """Released cleanly, something sent, everything sent confirmed, nothing refused."""
        return self.association_ok and self.sent > 0 and self.confirmed == self.sent and not self.failures

    @property
    def retryable(self) -> bool:
        """Would sending the whole study again possibly complete it? False once any refusal is permanent."""
        if self.complete:
            return False
        if self.problem is not None and not self.problem.retryable:
            return False
        return all(failure.retryable for failure in self.failures)

    def describe(self) -> str:
        """One line for logs and exception messages: no patient data, only UIDs, ACSN, counts and statuses."""
        head = f"router {self.router}: study {self.study_instance_uid or '?'} (ACSN {self.accession_number or '?'})"
        parts = [f"{self.confirmed} of {self.sent} sent instances confirmed"]
        if self.warnings:
            parts.append(f"{self.warnings} with a warning")
        if self.problem is not None:
            parts.append(self.problem.reason)
        if self.failures:
            shown = ", ".join(failure.describe() for failure in self.failures[:3])
            more = f" and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
            parts.append(f"{len(self.failures)} not stored: {shown}{more}")
        return f"{head}: {'; '.join(parts)}"


@dataclass(frozen=True)
class EchoOutcome:
    """A C-ECHO: `ok` when the router answered Success."""

    router: str
    ok: bool
    status: int | None
    elapsed_s: float
    problem: AssociationProblem | None = None


def raise_for_outcome(outcome: StudyOutcome) -> StudyOutcome:
    """Return `outcome` if complete, else raise what a retry predicate needs to know.

    AssociationRejected: the router refused the association (called AE, no common presentation context).
    ConnectionFailed: could not connect, or a transient association reject (e.g. the router's association limit).
    InstanceRejected: at least one instance was refused for a reason resending will not fix (0xA9xx, 0xCxxx, not
    routable, wrong study); it wins over retryable trouble in the same outcome, since the study cannot complete.
    StoreIncomplete: everything else (0xA7xx, no response, aborted, release not confirmed, nothing to send).
    """
    if outcome.complete:
        return outcome
    message = outcome.describe()
    problem = outcome.problem
    if problem is not None and problem.kind in ("rejected", "no_context"):
        raise AssociationRejected(message)
    if problem is not None and problem.kind in ("connect", "rejected_transient"):
        raise ConnectionFailed(message, service="router")
    if not outcome.retryable:
        raise InstanceRejected(message)
    raise StoreIncomplete(message)


StatusKind = Literal["success", "warning", "retryable", "rejected"]


def classify_store_status(code: int) -> tuple[StatusKind, str]:
    """Sort a C-STORE status (PS3.4 B.2.3, PS3.7 C) into what the gateway does with it, plus its description.

    0x0000 success; Warning category (0xB000/0xB006/0xB007, 0x0001, 0x0107, 0x0116) counts as stored;
    0xA7xx Out of Resources, 0x0110 Processing Failure and 0x0213 Resource Limitation may pass, so retryable;
    everything else (0xA9xx, 0xCxxx, other failures, unknown codes) is a refusal of this instance.
    """
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "Unknown status"))[1] or "Success"
    category = code_to_category(code)
    if code == 0x0000:
        return "success", description
    if category == "Warning":
        return "warning", description
    if 0xA700 <= code <= 0xA7FF or code in RETRYABLE_FAILURE_CODES:
        return "retryable", description
    return "rejected", description


# --------------------------------------------------------------------------------------------------------------
# Presentation contexts


def presentation_contexts(
    pairs: Iterable[SopClassAndSyntax], *, stored_first: bool = False
) -> list[PresentationContext]:
    """Contexts for a study's (SOP Class UID, Transfer Syntax UID) pairs, in first-seen order.

    Uncompressed little-endian data (explicit, implicit, deflated) gets one context per SOP class proposing its own
    syntaxes plus Explicit and Implicit VR Little Endian, because pynetdicom converts between those when the router
    picks another. Compressed, big-endian or unknown syntaxes cannot be converted: each gets a context of its own.
    The caller checks the count against MAX_PRESENTATION_CONTEXTS.

    `stored_first` (encoded instances, sent as stored) also proposes each uncompressed pair alone, ahead of the
    merged context: an acceptor chooses within a context by its own preference (pynetdicom, like the official
    router, picks Implicit VR first), so only a context offering the stored syntax alone makes sure the instances
    can go as they are; the merged context stays as the fallback that needs a conversion.
    """
    uncompressed: dict[str, list[UID]] = {}
    order: list[tuple[str, UID | None]] = []
    for sop_class, syntax in pairs:
        sop, ts = str(sop_class), UID(str(syntax))
        if _is_uncompressed_little_endian(ts):
            if stored_first and (sop, ts) not in order:
                order.append((sop, ts))
            if sop not in uncompressed:
                uncompressed[sop] = []
                order.append((sop, None))
            if ts not in uncompressed[sop]:
                uncompressed[sop].append(ts)
        elif (sop, ts) not in order:
            order.append((sop, ts))
    contexts = []
    for sop, ts in order:
        if ts is None:
            syntaxes = [*uncompressed[sop], *(s for s in UNCOMPRESSED_LITTLE_ENDIAN if s not in uncompressed[sop])]
            contexts.append(build_context(sop, syntaxes))
        else:
            contexts.append(build_context(sop, ts))
    return contexts


def _is_uncompressed_little_endian(ts: UID) -> bool:
    try:
        return ts.is_little_endian and not ts.is_compressed
    except ValueError:  # not a known transfer syntax: propose it as it is, exact match only
        return False


def _sop_and_syntax(ds: Instance) -> SopClassAndSyntax | None:
    if isinstance(ds, EncodedInstance):
        return (ds.sop_class_uid, str(ds.transfer_syntax_uid)) if ds.sop_class_uid else None
    sop_class = ds.get("SOPClassUID")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not sop_class or not syntax:
        return None
    return str(sop_class), str(syntax)


# --------------------------------------------------------------------------------------------------------------
# The response race guard and the socket option


class ResponseKeepingDIMSE(DIMSEServiceProvider):
    """A DIMSE provider whose non-blocking reads (the reactor's poll) never take a response off the queue.

    The race (pynetdicom 3.0.4, association.py `_run_reactor` and `send_c_store`): a send pauses the reactor by
    clearing `_reactor_checkpoint` and spinning until `_is_paused` is True, then blocks in
    `dimse.get_msg(block=True)` for the response. When the previous send set the checkpoint again, the reactor was
    woken but may not have run yet, so `_is_paused` is still True from before: the next send goes ahead while the
    reactor is about to make one `dimse.get_msg(block=False)` poll. On a loaded machine that poll can come after
    the C-STORE-RSP has arrived; the reactor takes it, finds it is no request, logs "Received unexpected C-STORE
    service message" and drops it; the send waits dimse_timeout and returns an empty status.

    The fix belongs where the message is handed out: the reactor only ever calls get_msg(block=False), and
    a send_* method only ever calls get_msg(block=True). So a non-blocking read takes the head of the queue only
    when it is a service request (what the reactor exists to serve); responses and the (None, None) wake-up that
    pynetdicom queues when the connection closes stay for the blocked sender. Peek and take happen under the
    queue's own lock, so the DUL thread's put and the sender's get cannot interleave with them.
    An SCU-only association (the gateway's) never receives requests, so nothing waits behind a kept response.
    Keeping the close marker also matters: unguarded, a reactor poll between two sends can swallow it, and a send
    after a peer abort waits the whole dimse_timeout instead of returning at once.
    """

    @classmethod
    def taking_over(cls, previous: DIMSEServiceProvider) -> ResponseKeepingDIMSE:
        """A guarded provider sharing `previous`'s queue and state, to swap in before any DIMSE traffic."""
        guarded = cls(previous.assoc)
        guarded.msg_queue = previous.msg_queue
        guarded.cancel_req = previous.cancel_req
        guarded.message = previous.message
        return guarded

    def get_msg(self, block: bool = False) -> tuple[int | None, object | None]:  # type: ignore[override]
        if block:
            return super().get_msg(block=True)
        queue = self.msg_queue
        with queue.mutex:
            if not queue.queue:
                return None, None
            _, message = queue.queue[0]
            if is_for_sender(message):
                return None, None
            return queue.queue.popleft()


def is_for_sender(message: object | None) -> bool:
    """True for what a blocked send_* waits on: a DIMSE response, or None (pynetdicom's 'connection closed')."""
    return message is None or getattr(message, "MessageIDBeingRespondedTo", None) is not None


def guard_response_race(assoc: Association) -> None:
    """Install ResponseKeepingDIMSE on an established association, before its first send_*."""
    if not isinstance(assoc.dimse, ResponseKeepingDIMSE):
        assoc.dimse = ResponseKeepingDIMSE.taking_over(assoc.dimse)


def set_tcp_nodelay(assoc: Association) -> bool:
    """Turn Nagle off on the association's socket (pynetdicom leaves it on); False if there is no socket."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is None:
        return False
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        LOGGER.warning("could not set TCP_NODELAY on the router connection: %s", error)
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# The wire path: encoded instances written, and their responses read, by the sending thread itself

WIRE_FRAGMENT_UNBOUNDED = 1 << 20
"""PDV size when the router sets no maximum PDU length (0): any size is allowed; 1 MiB keeps writes large."""

DUL_PARK_S = 0.05
"""How long pynetdicom's DUL thread sleeps at a time while a WireChannel owns the socket (it polls every 1 ms)."""

_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg()
_PDATA_HEADER = struct.Struct(">BBLLBB")  # P-DATA-TF type, reserved, PDU length; PDV length, context ID, control
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_UID_ELEMENT = struct.Struct("<HHL")
_US_ELEMENT = struct.Struct("<HHLH")
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


class WireReply(NamedTuple):
    """What came back for one C-STORE sent on the wire: the status, or None and why there was none."""

    status: int | None
    problem: str | None = None
    comment: str | None = None


def c_store_command(sop_class_uid: str, sop_instance_uid: str, message_id: int, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1), as pynetdicom encodes it."""
    elements = [
        _uid_element(0x0002, sop_class_uid),
        _US_ELEMENT.pack(0x0000, 0x0100, 2, 0x0001),  # Command Field: C-STORE-RQ
        _US_ELEMENT.pack(0x0000, 0x0110, 2, message_id),
        _US_ELEMENT.pack(0x0000, 0x0700, 2, priority),
        _US_ELEMENT.pack(0x0000, 0x0800, 2, 0x0001),  # Command Data Set Type: a data set follows
        _uid_element(0x1000, sop_instance_uid),
    ]
    body = b"".join(elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _uid_element(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return _UID_ELEMENT.pack(0x0000, element, len(value)) + value


def parse_store_response(command: bytes, message_id: int) -> WireReply:
    """Status of a C-STORE-RSP command set (Implicit VR Little Endian); no status if it answers something else."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = _UID_ELEMENT.unpack_from(command, pos)
        values[group << 16 | element] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    field, responded_to, status, data_set = (values.get(tag) for tag in (0x0100, 0x0120, 0x0900, 0x0800))
    if field is None or status is None or responded_to is None or len(status) != 2 or len(responded_to) != 2:
        return WireReply(None, "an invalid C-STORE response (no status)")
    if int.from_bytes(field, "little") != _C_STORE_RSP:
        return WireReply(None, f"a DIMSE message 0x{int.from_bytes(field, 'little'):04X} instead of a C-STORE response")
    if int.from_bytes(responded_to, "little") != message_id:
        return WireReply(
            None, f"a C-STORE response to message {int.from_bytes(responded_to, 'little')}, not {message_id}"
        )
    if data_set is not None and int.from_bytes(data_set, "little") != _NO_DATA_SET:
        return WireReply(None, "a C-STORE response announcing a data set")
    comment = values.get(0x0902)
    text = comment.decode("latin-1").strip(" \0") if comment else None
    return WireReply(int.from_bytes(status, "little"), None, text)


def p_data_buffers(
    parts: Iterable[bytes | memoryview], nbytes: int, context_id: int, fragment: int
) -> list[memoryview]:
    """The data set as P-DATA-TF PDUs of one PDV each, as (header, slice, ...) buffers for sendmsg: no copy.

    `fragment` is the most data one PDV carries: the router's maximum PDU length minus the 6 bytes of PDV item
    header that length includes (PS3.8 9.3.5, the same split pynetdicom makes).
    """
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    buffers: list[memoryview] = []
    remaining, index, offset = nbytes, 0, 0
    while remaining > 0:
        size = min(fragment, remaining)
        remaining -= size
        control = 0x00 if remaining else 0x02  # data set fragment; 0x02 marks the last one
        buffers.append(memoryview(_PDATA_HEADER.pack(0x04, 0, size + 6, size + 2, context_id, control)))
        while size:
            view = views[index]
            take = min(size, len(view) - offset)
            buffers.append(view[offset : offset + take])
            offset += take
            size -= take
            if offset == len(view):
                index, offset = index + 1, 0
    return buffers


class WireChannel:
    """C-STORE on an established pynetdicom association, bypassing pynetdicom's per-PDU machinery.

    Why: pynetdicom hands every PDU (16 KB for the official router) from the sending thread through a queue to its
    DUL thread, which runs the state machine and writes it, and reads the response in a 1 ms polling loop. On a
    2-core machine that costs more than the transfer itself (bench/RESULTS.md). Here the sending thread writes the
    whole request with one sendmsg() per 1024 buffers, and reads the response PDU itself.

    The association stays pynetdicom's and its state machine stays right: P-DATA in state Sta6 never changes the
    state (DT-1 and DT-2 both return Sta6), so writing and reading P-DATA-TF PDUs directly is what those actions
    would have done. While engaged: the DUL thread does not read the socket (a gate on its transport check), the
    association reactor is parked at its checkpoint (as pynetdicom's own send_* park it), and anything but a
    P-DATA-TF from the router, or a closed connection, is left unread and the channel disengages, so pynetdicom
    reads it and processes the abort or release as always. The idle timer is restarted on every response, so
    pynetdicom's network timeout does not fire after a long study. Not engaged, pynetdicom is untouched: release,
    abort, C-ECHO and Dataset sends (with the response race guard) work as before.
    """

    def __init__(self, assoc: Association, dimse_timeout: float | None) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._sock: socket.socket = assoc.dul.socket.socket  # type: ignore[union-attr]
        self._timeout = dimse_timeout
        max_pdu = int(assoc.acceptor.maximum_length or 0)
        self.fragment = max_pdu - 6 if max_pdu > 6 else WIRE_FRAGMENT_UNBOUNDED
        self._accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts
            if cx.context_id is not None and cx.transfer_syntax
        }
        self._engaged = False
        self._broken = False
        self._previous_timeout: float | None = None
        self._gate = threading.Lock()
        self._given_back = threading.Event()
        self._given_back.set()
        read_socket = self._dul._is_transport_event

        def gated_transport_event() -> bool:
            if self._engaged:
                # Park the DUL thread instead of letting it poll every millisecond (it has nothing to do while the
                # channel owns the socket): back within 50 ms for its own checks, at once on disengage.
                self._given_back.wait(DUL_PARK_S)
                return False
            with self._gate:
                if self._engaged:
                    return False
                return read_socket()

        self._dul._is_transport_event = gated_transport_event  # type: ignore[method-assign]

    @staticmethod
    def usable(assoc: Association) -> bool:
        """A plain TCP socket (not TLS) and the pynetdicom internals this relies on (3.0.x); else use pynetdicom."""
        sock = getattr(assoc.dul.socket, "socket", None)
        return (
            type(sock) is socket.socket
            and hasattr(assoc.dul, "_is_transport_event")
            and hasattr(assoc.dul, "_idle_timer")
            and hasattr(assoc, "_reactor_checkpoint")
            and hasattr(assoc, "_is_paused")
        )

    def context_for(self, sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
        return self._accepted.get((sop_class_uid, transfer_syntax_uid))

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        return [syntax for (sop, syntax) in self._accepted if sop == sop_class_uid]

    def engage(self) -> bool:
        """Take the socket over from pynetdicom; False if the association is gone."""
        if self._engaged:
            return True
        if self._broken or not self._assoc.is_established:
            return False
        with self._gate:
            self._engaged = True
            self._given_back.clear()
        self._assoc._reactor_checkpoint.clear()
        while not self._assoc._is_paused:
            if self._assoc._kill or not self._assoc.is_established:
                self.disengage()
                return False
            time.sleep(0.0001)
        self._previous_timeout = self._sock.gettimeout()
        self._sock.settimeout(self._timeout)
        return True

    def disengage(self) -> None:
        """Give the socket back to pynetdicom (idempotent)."""
        if not self._engaged:
            return
        with contextlib.suppress(OSError):  # the socket may be closed already
            self._sock.settimeout(self._previous_timeout)
        self._dul._idle_timer.restart()
        with self._gate:
            self._engaged = False
            self._given_back.set()
        self._assoc._reactor_checkpoint.set()

    def close(self) -> None:
        """Disengage and remove the gate from the DUL (the association is ending)."""
        self.disengage()
        self._dul.__dict__.pop("_is_transport_event", None)

    def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        message_id: int,
        parts: Iterable[bytes | memoryview],
        nbytes: int,
    ) -> WireReply:
        """Send one C-STORE-RQ with its data set and read the C-STORE-RSP; an empty reply if the association broke."""
        if not self.engage():
            return WireReply(None, "the association ended before the C-STORE request")
        command = c_store_command(sop_class_uid, sop_instance_uid, message_id)
        buffers = [memoryview(_PDATA_HEADER.pack(0x04, 0, len(command) + 6, len(command) + 2, context_id, 0x03))]
        buffers.append(memoryview(command))
        buffers += p_data_buffers(parts, nbytes, context_id, self.fragment)
        try:
            _send_buffers(self._sock, buffers)
            command_reply = self._read_command()
        except (OSError, ConnectionError) as error:  # TimeoutError is an OSError: no response within dimse_timeout
            self._broken = True
            self.disengage()
            kind = "no C-STORE response within the DIMSE timeout" if isinstance(error, TimeoutError) else str(error)
            return WireReply(None, kind)
        if isinstance(command_reply, str):
            self._broken = True
            self.disengage()
            return WireReply(None, command_reply)
        self._dul._idle_timer.restart()
        reply = parse_store_response(command_reply, message_id)
        if reply.status is None:
            self._broken = True
            self.disengage()
        return reply

    def _read_command(self) -> bytes | str:
        """The command set of the next DIMSE message, or why there is none (then nothing is consumed)."""
        command = bytearray()
        while True:
            peeked = self._sock.recv(1, socket.MSG_PEEK)
            if not peeked:
                return "the router closed the connection"
            if peeked[0] != 0x04:
                return f"the router sent PDU type 0x{peeked[0]:02X} (A-ABORT or A-RELEASE) instead of a response"
            _, _, length = _PDU_HEADER.unpack(self._recv_exact(6))
            body = self._recv_exact(length)
            pos = 0
            while pos + 6 <= len(body):
                item_length, _, control = _PDV_HEADER.unpack_from(body, pos)
                if not control & 0x01:
                    return "the router's response carried a data set fragment"
                command += body[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if control & 0x02:
                    return bytes(command)

    def _recv_exact(self, count: int) -> bytes:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            got = self._sock.recv_into(view[received:])
            if not got:
                raise ConnectionError("the router closed the connection in the middle of a PDU")
            received += got
        return bytes(buffer)


def _send_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Write every buffer, in order, with as few sendmsg() calls as the kernel allows (partial writes resumed)."""
    index = 0
    while index < len(buffers):
        sent = sock.sendmsg(buffers[index : index + _IOV_MAX])
        while sent:
            size = len(buffers[index])
            if sent >= size:
                sent -= size
                index += 1
            else:
                buffers[index] = buffers[index][sent:]
                sent = 0


# --------------------------------------------------------------------------------------------------------------
# Concurrency cap

_slots_lock = threading.Lock()
_slots: dict[tuple[str, int], tuple[int, threading.BoundedSemaphore]] = {}


def router_slots(host: str, port: int, limit: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore capping simultaneous associations to the router at host:port.

    Shared by every RouterClient for that address in this process (Prefect runs tasks in threads, each with its
    own client), so `limit` holds however many clients there are. The first limit asked for wins; a different one
    later is logged and ignored. Across processes (several workers) use a Prefect concurrency limit instead.
    """
    if limit < 1:
        raise ValueError(f"router association limit must be at least 1, got {limit}")
    key = (host, port)
    with _slots_lock:
        existing = _slots.get(key)
        if existing is None:
            existing = (limit, threading.BoundedSemaphore(limit))
            _slots[key] = existing
        elif existing[0] != limit:
            LOGGER.warning(
                "router %s:%s association limit stays %s (asked for %s): the first client set it",
                host,
                port,
                existing[0],
                limit,
            )
        return existing[1]


# --------------------------------------------------------------------------------------------------------------
# The client


class RouterClient:
    """C-STORE SCU for the SATUSEHAT DICOM Router (plain I/O, no Prefect).

    Thread-safe: every call makes its own pynetdicom AE and association; an association is never shared between
    threads. At most `max_associations` calls to one router run at a time in this process (see router_slots).
    `wire=False` sends encoded instances through pynetdicom too (decoded first): the escape hatch, and the
    comparison the benchmarks make.
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_aet: str = "DCMROUTER",
        calling_aet: str = "SATSET",
        *,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 30.0,
        network_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_associations: int = 4,
        wire: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.connect_timeout = connect_timeout
        self.wire = wire
        self.slots = router_slots(host, port, max_associations)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: float) -> RouterClient:
        """A client for the router the settings name (ROUTER_IP, ROUTER_PORT, ROUTER_AET, GATEWAY_AET)."""
        return cls(
            settings.router_ip,
            settings.router_port,
            settings.router_aet,
            settings.calling_aet,
            max_associations=settings.router_max_associations,
            **overrides,
        )

    @property
    def router(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    def echo(self) -> EchoOutcome:
        """C-ECHO the router. Not counted against the association cap: a health check must not queue behind sends."""
        started = time.monotonic()
        assoc, connected = self._associate([build_context(Verification)])
        if not assoc.is_established:
            problem = self._problem_for(assoc, connected, contexts=1)
            return EchoOutcome(self.router, False, None, time.monotonic() - started, problem)
        try:
            self._prepare(assoc)
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        code = status.get("Status")
        elapsed = time.monotonic() - started
        if code is None:
            problem = AssociationProblem("aborted", "no C-ECHO response (DIMSE timeout or association lost)")
            return EchoOutcome(self.router, False, None, elapsed, problem)
        return EchoOutcome(self.router, int(code) == 0x0000, int(code), elapsed)

    def send_study(
        self, instances: Iterable[Instance], *, sop_classes_and_syntaxes: Iterable[SopClassAndSyntax] | None = None
    ) -> StudyOutcome:
        """Send one study in one association and report every instance's fate.

        `instances` is consumed lazily, one at a time, so a streamed study is never held in memory. Each is a
        pydicom Dataset (pynetdicom encodes and sends it) or an EncodedInstance (models.dicom: the edited bytes as
        the PACS stored them), which goes out on the WireChannel without being decoded or encoded again.
        The presentation contexts must be proposed before the first instance is sent, so pass the study's
        (SOP Class UID, Transfer Syntax UID) pairs from the PACS metadata. Without them only the first instance is
        looked at: a study whose later instances have another SOP class or transfer syntax then gets those
        instances recorded as failures ("no presentation context"), not sent.

        Each instance is checked before sending (check_routable, same StudyInstanceUID and AccessionNumber as the
        first); one that fails is recorded and skipped. If iterating `instances` raises, the association is
        aborted (the router then builds nothing from it) and the exception propagates.
        """
        started = time.monotonic()
        stream = iter(instances)
        first = next(stream, None)
        if first is None:
            return self._outcome(started, "", "", problem=AssociationProblem("empty", "no instances to send"))
        summary = _summary(first)
        study_uid = str(summary.get("StudyInstanceUID", "") or "")
        accession = str(summary.get("AccessionNumber", "") or "")

        if sop_classes_and_syntaxes is None:
            first_pair = _sop_and_syntax(first)
            pairs = [first_pair] if first_pair else []
        else:
            pairs = list(sop_classes_and_syntaxes)
        contexts = presentation_contexts(pairs, stored_first=isinstance(first, EncodedInstance))
        if not contexts:
            reason = "no presentation context to propose: no SOP Class UID / Transfer Syntax UID known"
            return self._outcome(started, study_uid, accession, problem=AssociationProblem("no_context", reason))
        if len(contexts) > MAX_PRESENTATION_CONTEXTS:
            reason = f"the study needs {len(contexts)} presentation contexts; one association allows 128"
            return self._outcome(started, study_uid, accession, problem=AssociationProblem("no_context", reason))

        with self.slots:
            assoc, connected = self._associate(contexts)
            if not assoc.is_established:
                problem = self._problem_for(assoc, connected, contexts=len(contexts))
                return self._outcome(started, study_uid, accession, problem=problem)
            outcome = self._send_on(assoc, chain([first], stream), study_uid, accession, started)
        LOGGER.info("%s", outcome.describe())
        return outcome

    # -- internals ---------------------------------------------------------------------------------------------

    def _associate(self, contexts: list[PresentationContext]) -> tuple[Association, threading.Event]:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.connection_timeout = self.connect_timeout
        connected = threading.Event()
        handlers = [(evt.EVT_CONN_OPEN, lambda _event: connected.set())]
        assoc = ae.associate(self.host, self.port, contexts=contexts, ae_title=self.called_aet, evt_handlers=handlers)
        return assoc, connected

    def _prepare(self, assoc: Association) -> None:
        """Right after associate(), before any DIMSE message: Nagle off, response race guarded."""
        set_tcp_nodelay(assoc)
        guard_response_race(assoc)

    def _problem_for(self, assoc: Association, connected: threading.Event, *, contexts: int) -> AssociationProblem:
        response = assoc.acceptor.primitive
        if assoc.is_rejected and response is not None:
            kind: ProblemKind = "rejected_transient" if response.result == 0x02 else "rejected"
            reason = (
                f"the router rejected the association for called AE {self.called_aet!r} (calling AE "
                f"{self.calling_aet!r}): {response.result_str}, {response.reason_str} (source: {response.source_str})"
            )
            return AssociationProblem(kind, reason)
        if response is not None and response.result == 0x00:
            reason = f"the router accepted none of the {contexts} proposed presentation contexts"
            return AssociationProblem("no_context", reason)
        if not connected.is_set():
            return AssociationProblem("connect", f"could not connect to {self.host}:{self.port}")
        reason = f"connected to {self.host}:{self.port} but no association response within {self.acse_timeout} s"
        return AssociationProblem("connect", reason)

    def _send_on(
        self, assoc: Association, instances: Iterator[Instance], study_uid: str, accession: str, started: float
    ) -> StudyOutcome:
        sent = confirmed = warnings = 0
        failures: list[InstanceFailure] = []
        lost = False
        wire: WireChannel | None = None
        wire_usable = False
        try:
            self._prepare(assoc)
            wire_usable = self.wire and WireChannel.usable(assoc)
            for item in instances:
                if not assoc.is_established:
                    lost = True
                    break
                summary = _summary(item)
                sop_uid = str(summary.get("SOPInstanceUID", "") or "")
                refusal = _preflight(summary, study_uid, accession)
                if refusal is not None:
                    failures.append(InstanceFailure(sop_uid, None, refusal, False))
                    continue
                message_id = sent % 0xFFFF + 1
                try:
                    if isinstance(item, EncodedInstance) and wire_usable:
                        if wire is None:  # made on the first encoded instance: a Dataset-only study never has one
                            wire = WireChannel(assoc, self.dimse_timeout)
                        code, reason = self._store_on_wire(wire, item, message_id)
                    else:
                        if wire is not None:
                            wire.disengage()
                        code, reason = self._store_with_pynetdicom(assoc, item, message_id)
                except (ValueError, AttributeError) as error:  # no accepted context, cannot encode, no file meta
                    failures.append(InstanceFailure(sop_uid, None, f"not sent: {error}", False))
                    continue
                except RuntimeError:  # the association ended between the check above and the send
                    lost = True
                    break
                sent += 1
                if code is None:
                    # No status: DIMSE timeout, invalid response or connection closed. Whatever the reactor has
                    # noticed yet, the association is unusable: a further send would wait dimse_timeout.
                    failures.append(InstanceFailure(sop_uid, None, reason or _NO_RESPONSE, True))
                    lost = True
                    break
                kind, description = classify_store_status(code)
                if kind == "success":
                    confirmed += 1
                elif kind == "warning":
                    confirmed += 1
                    warnings += 1
                else:
                    failures.append(InstanceFailure(sop_uid, code, description, kind == "retryable"))
        except BaseException:
            # The stream (the PACS) failed, or we were interrupted: abort, so the router builds nothing from a part.
            if wire is not None:
                wire.close()
            assoc.abort()
            raise
        if wire is not None:
            wire.close()  # pynetdicom reads the socket again: release, abort and a peer's A-ABORT as always
        # The router builds the ImagingStudy from whatever a *released* association carried: with any instance not
        # stored (refused here, refused by the router, or lost), abort, so it builds nothing from part of a study.
        releasing = assoc.is_established and not lost and not failures
        if releasing:
            assoc.release()
        elif assoc.is_established:
            assoc.abort()
        problem = None
        if not assoc.is_released:
            if releasing:
                reason = "the router did not confirm the release, so it may not build the ImagingStudy"
                problem = AssociationProblem("release", reason)
            elif failures and not lost:
                reason = "the association was aborted, not released, so the router builds no ImagingStudy from part"
                problem = AssociationProblem("aborted", f"{reason} of the study")
            else:
                reason = f"the association was aborted after {sent} C-STORE requests, before a clean release"
                problem = AssociationProblem("aborted", reason)
        return self._outcome(
            started,
            study_uid,
            accession,
            sent=sent,
            confirmed=confirmed,
            warnings=warnings,
            failures=tuple(failures),
            association_ok=problem is None,
            problem=problem,
        )

    def _store_on_wire(
        self, wire: WireChannel, item: EncodedInstance, message_id: int
    ) -> tuple[int | None, str | None]:
        """C-STORE an encoded instance as it is; converted first only if the router took another syntax for it."""
        sop_class, syntax = item.sop_class_uid, str(item.transfer_syntax_uid)
        context_id = wire.context_for(sop_class, syntax)
        parts, nbytes = item.parts, item.nbytes
        if context_id is None:
            target = _convertible_syntax(syntax, wire.accepted_syntaxes(sop_class))
            if target is None:
                raise ValueError(
                    f"No presentation context for '{UID(sop_class).name}' with transfer syntax "
                    f"'{UID(syntax).name}' was accepted by the router"
                )
            context_id = wire.context_for(sop_class, target)
            data = encode_data_set(item.to_dataset(), UID(target))
            parts, nbytes = (data,), len(data)
        reply = wire.store(context_id, sop_class, item.sop_instance_uid, message_id, parts, nbytes)  # type: ignore[arg-type]
        if reply.status is None:
            return None, f"no C-STORE response: {reply.problem}"
        return reply.status, None

    def _store_with_pynetdicom(self, assoc: Association, item: Instance, message_id: int) -> tuple[int | None, None]:
        dataset = item.to_dataset() if isinstance(item, EncodedInstance) else item
        status = assoc.send_c_store(dataset, msg_id=message_id)
        code = status.get("Status")
        return (int(code) if code is not None else None), None

    def _outcome(
        self,
        started: float,
        study_uid: str,
        accession: str,
        *,
        sent: int = 0,
        confirmed: int = 0,
        warnings: int = 0,
        failures: tuple[InstanceFailure, ...] = (),
        association_ok: bool = False,
        problem: AssociationProblem | None = None,
    ) -> StudyOutcome:
        return StudyOutcome(
            study_instance_uid=study_uid,
            accession_number=accession,
            sent=sent,
            confirmed=confirmed,
            warnings=warnings,
            failures=failures,
            elapsed_s=time.monotonic() - started,
            association_ok=association_ok,
            problem=problem,
            router=self.router,
        )


_NO_RESPONSE = "no C-STORE response (DIMSE timeout or association lost)"


def _summary(item: Instance) -> Dataset | RoutingSummary:
    """What the pre-flight and the study checks read: the Dataset itself, or an encoded instance's summary."""
    return item.summary if isinstance(item, EncodedInstance) else item


def _convertible_syntax(syntax: str, accepted: list[str]) -> str | None:
    """An accepted syntax the instance can be re-encoded into: only between uncompressed little-endian ones."""
    if not _is_uncompressed_little_endian(UID(syntax)):
        return None
    return next((other for other in accepted if _is_uncompressed_little_endian(UID(other))), None)


def _preflight(ds: Dataset | RoutingSummary, study_uid: str, accession: str) -> str | None:
    """Why `ds` must not go into this association, or None. The router answers Success to anything, then fails."""
    problems = check_routable(ds)
    if problems:
        return "not routable: " + "; ".join(problems)
    if str(ds.StudyInstanceUID) != study_uid:
        return f"belongs to study {ds.StudyInstanceUID}, not {study_uid}: one association carries one study"
    if str(ds.AccessionNumber) != accession:
        return f"AccessionNumber {ds.AccessionNumber!r} differs from the study's {accession!r}"
    return None
