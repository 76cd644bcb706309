"""The PACS over DICOMweb: find a study (QIDO-RS), list its instances, stream them one by one (WADO-RS).

Plain code, no Prefect: the tasks wrap it. Standard DICOMweb paths only, so dcm4chee and Orthanc behave alike.

Design decisions:

* **One retry layer.** dicomweb-client retries 408/429/503/504 and every connection error up to 5 times with
  exponential back-off (1+2+4+8 s) by default; that is switched off here, so a failed request raises at once and
  Prefect's task retries are the only retries, visible in the UI.
* **Streaming, one series per request.** `iter_instance_files` (the send path: Part-10 bytes, undecoded) and
  `iter_instances` (pydicom datasets, on top of it) ask for one series at a time (WADO-RS
  `/studies/{s}/series/{se}`, multipart cut part by part as it arrives, by `_dicom_parts`), never the whole study
  in one response. Memory stays at about one instance. Measured on Orthanc 1.10 with 300 CT slices of 512x512
  (158 MB), with dicomweb-client's parser: per series 0.28 s, whole study 0.36 s, one request per instance
  1.75-1.9 s (about 5 ms of per-request overhead each, which client threads did not reduce); client peak RSS 77 MB
  in all three. Cutting the parts here instead: 0.125 s per series. `retrieve_per="instance"` is there for a PACS
  that handles large multipart responses badly.
* **As stored.** Instances are asked for with `transfer-syntax=*`: the PACS sends what it holds, without
  transcoding (cheaper for the PACS, bit-exact pixel data); the C-STORE side negotiates that transfer syntax.
* **Errors** are the gateway's tree (clients/errors.py), with service="pacs":
  not found -> StudyNotFound; 401/403 -> Rejected (authentication failed); other 4xx -> Rejected;
  429 -> RateLimited; 5xx -> UpstreamUnavailable; 408 and timeouts -> UpstreamTimeout;
  refused or dropped connections -> ConnectionFailed; a body that is not DICOM JSON / multipart DICOM ->
  UpstreamUnavailable (a proxy error page, a truncated answer: worth another attempt).
  Several studies for one accession number -> Rejected: the gateway must not pick one silently.
* **No secrets in messages.** Credentials embedded in the URL (http://user:pass@host/...) are moved into the
  session's Basic auth, so no request URL, and no exception text derived from one, carries the password.

A client holds one requests.Session: use one PacsClient per thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from urllib3.exceptions import ReadTimeoutError

from clients.errors import (
    AmbiguousStudy,
    AuthenticationRejected,
    ConnectionFailed,
    GatewayError,
    RateLimited,
    Rejected,
    StudyNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from models.dicom import STUDY_METADATA_KEYWORDS

if TYPE_CHECKING:
    from models.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
RetrievePer = Literal["series", "instance"]

# Accept header parameters: the stored transfer syntax, whatever it is (PS3.18 8.7.3.5.2).
AS_STORED = (("application/dicom", "*"),)
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'

READ_CHUNK = 1 << 20
"""Bytes read from a WADO-RS response at a time: large enough that Python's per-read cost vanishes, small
enough that a part is never held twice."""

# DICOM JSON tags read from QIDO answers.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_SOP_CLASS = "00080016"
_ACCESSION = "00080050"
_MODALITIES = "00080061"
_STUDY_INSTANCES = "00201208"
_SERIES_INSTANCES = "00201209"
_AVAILABLE_TS = "00083002"
_TRANSFER_SYNTAX = "00020010"

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class StudyRef:
    """A study as the PACS describes it in a QIDO-RS answer."""

    study_instance_uid: str
    accession_number: str | None
    number_of_instances: int | None  # NumberOfStudyRelatedInstances, when the PACS reports it
    modalities: tuple[str, ...]  # ModalitiesInStudy


@dataclass(frozen=True)
class SeriesRef:
    """One series of a study: its instance count (NumberOfSeriesRelatedInstances, a standard QIDO-RS series
    attribute) and its SOP class when the PACS reports one at series level (Orthanc does; not standard)."""

    series_instance_uid: str
    sop_class_uid: str | None = None
    instances: int | None = None


@dataclass(frozen=True)
class InstanceRef:
    """One instance, enough to retrieve it and to describe it without pixel data."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None  # AvailableTransferSyntaxUID; dcm4chee reports it, Orthanc does not


class PacsClient:
    """DICOMweb client for the PACS, with the gateway's errors and without a retry layer of its own."""

    def __init__(
        self,
        dicomweb_root: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 60.0,
        retrieve_per: RetrievePer = "series",
        session: requests.Session | None = None,
    ) -> None:
        root, url_user, url_password = _split_credentials(dicomweb_root.rstrip("/"))
        username = username if username is not None else url_user
        password = password if password is not None else url_password
        self.root = root
        self.timeout = timeout
        self.retrieve_per: RetrievePer = retrieve_per
        self._session = session or requests.Session()
        if username is not None:
            self._session.auth = (username, password or "")
        self._dicomweb = DICOMwebClient(root, session=self._session, timeout=timeout, permissive_uid=True)
        # The gateway's one retry layer is Prefect's: see the module docstring.
        self._dicomweb.set_http_retry_params(retry=False)

    def twin(self) -> PacsClient:
        """Another client on the same PACS, with its own session (for another thread): same root, credentials,
        timeout, retrieval mode, and the session's headers, TLS and proxy settings."""
        session = requests.Session()
        session.auth = self._session.auth
        session.headers.update(self._session.headers)
        session.verify = self._session.verify
        session.cert = self._session.cert
        session.proxies.update(self._session.proxies)
        return PacsClient(self.root, timeout=self.timeout, retrieve_per=self.retrieve_per, session=session)

    @classmethod
    def from_settings(cls, settings: Settings) -> PacsClient:
        password = settings.pacs_password.get_secret_value() if settings.pacs_password is not None else None
        return cls(
            settings.pacs_root, username=settings.pacs_username, password=password, timeout=settings.pacs_timeout_s
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"PacsClient({self.root!r}, retrieve_per={self.retrieve_per!r})"

    # -- QIDO-RS -----------------------------------------------------------------------------------------------

    def find_study(self, accession_number: str | None = None, study_instance_uid: str | None = None) -> StudyRef:
        """The one study with this accession number and/or Study Instance UID.

        Matching is exact: the PACS's answers are filtered again here, so wildcards (`*`, `?`) in an accession
        number or a PACS doing fuzzy matching cannot select a different study. Raises StudyNotFound, or Rejected
        when an accession number matches several studies.
        """
        if accession_number is None and study_instance_uid is None:
            raise ValueError("find_study needs an accession number or a Study Instance UID")
        filters: dict[str, str] = {}
        if accession_number is not None:
            accession_number = accession_number.strip()
            if not accession_number:
                raise Rejected("an empty accession number cannot identify a study", service="pacs")
            filters["AccessionNumber"] = accession_number
        if study_instance_uid is not None:
            study_instance_uid = _checked_uid(study_instance_uid)
            filters["StudyInstanceUID"] = study_instance_uid
        searched = " and ".join(f"{key} {value!r}" for key, value in filters.items())

        answers = self._call(
            f"search for studies with {searched}",
            lambda: self._dicomweb.search_for_studies(
                search_filters=filters, fields=[_STUDY_INSTANCES, _MODALITIES, _ACCESSION]
            ),
            not_found=None,
        )
        studies = [_study_ref(answer) for answer in answers if isinstance(answer, dict)]
        studies = [
            study
            for study in studies
            if study is not None
            and (accession_number is None or (study.accession_number or "").strip() == accession_number)
            and (study_instance_uid is None or study.study_instance_uid == study_instance_uid)
        ]
        unique = {study.study_instance_uid: study for study in studies}
        if not unique:
            raise StudyNotFound(f"the PACS has no study with {searched}", service="pacs")
        if len(unique) > 1:
            uids = sorted(unique)
            listed = ", ".join(uids[:5]) + (", ..." if len(uids) > 5 else "")
            raise AmbiguousStudy(
                f"the PACS has {len(uids)} studies with {searched} ({listed}); the gateway will not pick one: "
                "correct the accession numbers in the PACS or ask by Study Instance UID",
                service="pacs",
            )
        return next(iter(unique.values()))

    def ping(self) -> int:
        """One QIDO-RS search for any study (limit 1): proves the URL, the login and DICOMweb in one round trip;
        returns how many studies the answer held (0 or 1). For `satset check`."""
        answers = self._call(
            "a search for any study", lambda: self._dicomweb.search_for_studies(limit=1), not_found=None
        )
        return len(answers)

    def list_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        """Every instance of the study, from QIDO-RS (no pixel data). Raises StudyNotFound if there is none.

        Follows the PS3.18 paging protocol: when the PACS caps the answer and says so in a Warning header, the
        rest is asked for with `offset`, so a study larger than the PACS's QIDO limit is not silently truncated.
        """
        study_instance_uid = _checked_uid(study_instance_uid)
        operation = f"list the instances of study {study_instance_uid}"
        instances: dict[str, InstanceRef] = {}
        while True:
            offset = len(instances) or None
            answers, warning = self._with_warning(
                operation,
                partial(
                    self._dicomweb.search_for_instances,
                    study_instance_uid=study_instance_uid,
                    fields=[_SERIES_UID, _SOP_CLASS, _AVAILABLE_TS, _TRANSFER_SYNTAX],
                    offset=offset,
                ),
                not_found=study_instance_uid,
            )
            added = 0
            for answer in answers:
                ref = _instance_ref(study_instance_uid, answer) if isinstance(answer, dict) else None
                if ref is not None and ref.sop_instance_uid not in instances:
                    instances[ref.sop_instance_uid] = ref
                    added += 1
            if not warning or not added:
                break
            logger.info("PACS capped the instance list of %s at %d: %s", study_instance_uid, len(instances), warning)
        if not instances:
            raise StudyNotFound(f"the PACS has no study {study_instance_uid}", service="pacs")
        return list(instances.values())

    def list_series(self, study_instance_uid: str) -> list[str]:
        """The Series Instance UIDs of the study (one cheap QIDO-RS). Raises StudyNotFound if there is none."""
        return [ref.series_instance_uid for ref in self.list_series_refs(study_instance_uid)]

    def list_series_refs(self, study_instance_uid: str) -> list[SeriesRef]:
        """The study's series with their instance counts, and their SOP class where the PACS reports one at series
        level. One cheap QIDO-RS (no instance-level query); raises StudyNotFound if there is none."""
        study_instance_uid = _checked_uid(study_instance_uid)
        answers = self._call(
            f"list the series of study {study_instance_uid}",
            lambda: self._dicomweb.search_for_series(
                study_instance_uid=study_instance_uid, fields=[_SERIES_UID, _SOP_CLASS, _SERIES_INSTANCES]
            ),
            not_found=study_instance_uid,
        )
        series: dict[str, SeriesRef] = {}
        for answer in answers:
            uid = _first(answer, _SERIES_UID) if isinstance(answer, dict) else None
            if uid and uid not in series:
                count = _first(answer, _SERIES_INSTANCES)
                instances = int(count) if count is not None and count.strip().isdigit() else None
                series[uid] = SeriesRef(uid, _first(answer, _SOP_CLASS), instances)
        if not series:
            raise StudyNotFound(f"the PACS has no study {study_instance_uid}", service="pacs")
        return list(series.values())

    def study_metadata(self, study_instance_uid: str) -> list[dict[str, str]]:
        """Every instance's pre-flight elements (models.dicom.STUDY_METADATA_KEYWORDS) from WADO-RS metadata.

        One request, no pixel data. Per instance a mapping keyword -> text: an element the instance lacks is not in
        it, one present without a value is "". Raises StudyNotFound when the PACS has no such study.
        """
        study_instance_uid = _checked_uid(study_instance_uid)
        answers = self._call(
            f"read the metadata of study {study_instance_uid}",
            lambda: self._dicomweb.retrieve_study_metadata(study_instance_uid),
            not_found=study_instance_uid,
        )
        instances = [_metadata_values(answer) for answer in answers if isinstance(answer, dict)]
        if not instances:
            raise StudyNotFound(f"the PACS has no instance metadata for study {study_instance_uid}", service="pacs")
        return instances

    # -- WADO-RS -----------------------------------------------------------------------------------------------

    def iter_instances(self, study_instance_uid: str) -> Iterator[Dataset]:
        """Stream the study instance by instance, as stored (pixel data included), holding about one at a time.

        One request per series (default) or per instance (`retrieve_per="instance"`); never the whole study in
        one response. Errors surface while iterating, as the gateway's exceptions.
        """
        study_instance_uid = _checked_uid(study_instance_uid)
        operation = f"read an instance of study {study_instance_uid}"
        for part10 in self.iter_instance_files(study_instance_uid):
            yield self._call(operation, partial(_read_part10, part10), not_found=study_instance_uid)

    def iter_instance_files(
        self,
        study_instance_uid: str,
        *,
        listed: Iterable[InstanceRef] | None = None,
        series: Iterable[str] | None = None,
    ) -> Iterator[bytes]:
        """Stream the study as Part-10 files, as stored and undecoded: what the send path edits and forwards.

        Like `iter_instances` (one request per series, or per instance), without pydicom: each multipart body is
        cut out of the response as it arrives, so a part is copied once and memory stays at about one instance
        plus one read chunk. `listed` (what `list_instances` returned) or `series` (Series Instance UIDs) saves
        querying them again; per-instance retrieval needs `listed` or lists the instances itself.
        """
        study_instance_uid = _checked_uid(study_instance_uid)
        refs = list(listed) if listed is not None else None
        if self.retrieve_per == "instance":
            for ref in refs if refs is not None else self.list_instances(study_instance_uid):
                yield self.retrieve_instance_file(ref)
            return
        if series is None:
            if refs is not None:
                series = dict.fromkeys(ref.series_instance_uid for ref in refs)
            else:
                series = self.list_series(study_instance_uid)
        for series_uid in series:
            url = f"{self.root}/studies/{study_instance_uid}/series/{_checked_uid(series_uid)}"
            operation = f"retrieve series {series_uid} of study {study_instance_uid}"
            yield from self._stream_files(url, operation, not_found=study_instance_uid)

    def retrieve_instance(self, ref: InstanceRef) -> Dataset:
        """One instance, as stored. Raises StudyNotFound if the PACS no longer has it."""
        operation = f"read instance {ref.sop_instance_uid} of study {ref.study_instance_uid}"
        part10 = self.retrieve_instance_file(ref)
        return self._call(operation, partial(_read_part10, part10), not_found=ref.study_instance_uid)

    def retrieve_instance_file(self, ref: InstanceRef) -> bytes:
        """One instance as a Part-10 file, as stored. Raises StudyNotFound if the PACS no longer has it."""
        url = (
            f"{self.root}/studies/{_checked_uid(ref.study_instance_uid)}/series/"
            f"{_checked_uid(ref.series_instance_uid)}/instances/{_checked_uid(ref.sop_instance_uid)}"
        )
        operation = f"retrieve instance {ref.sop_instance_uid} of study {ref.study_instance_uid}"
        files = list(self._stream_files(url, operation, not_found=ref.study_instance_uid))
        if len(files) != 1:
            raise UpstreamUnavailable(
                f"the PACS answered {operation} with {len(files)} instances instead of one", service="pacs"
            )
        return files[0]

    def _stream_files(self, url: str, operation: str, *, not_found: str) -> Iterator[bytes]:
        response = self._call(operation, partial(self._get_as_stored, url), not_found=not_found)
        try:
            parts = _dicom_parts(response)
            while True:
                # The multipart body is read and cut lazily, so errors can arise at every step.
                part = self._call(operation, partial(next, parts, None), not_found=not_found)
                if part is None:
                    return
                yield part
        finally:
            # Abandoned midway (the send failed): close the response now, so the connection is not left half read.
            response.close()

    def _get_as_stored(self, url: str) -> requests.Response:
        response = self._session.get(url, headers={"Accept": ACCEPT_AS_STORED}, stream=True, timeout=self.timeout)
        if response.status_code >= 400:
            _ = response.content  # an error body is small; read it so messages can quote it, then free the socket
            response.raise_for_status()
        return response

    # -- error mapping -----------------------------------------------------------------------------------------

    def _with_warning(self, operation: str, call: Callable[[], T], *, not_found: str | None) -> tuple[T, str | None]:
        """`_call`, also returning the Warning header of the last response (how QIDO-RS says "more results")."""
        seen: list[str] = []

        def remember(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            seen.append(response.headers.get("Warning", ""))
            return response

        hooks = self._session.hooks.setdefault("response", [])
        hooks.append(remember)
        try:
            result = self._call(operation, call, not_found=not_found)
        finally:
            hooks.remove(remember)
        return result, (seen[-1] if seen else None) or None

    def _call(self, operation: str, call: Callable[[], T], *, not_found: str | None) -> T:
        """Run one dicomweb-client call; translate what goes wrong into the gateway's exceptions.

        `not_found` is the Study Instance UID a 404 refers to; None means a 404 is a wrong DICOMweb root.
        """
        try:
            return call()
        except GatewayError:
            raise
        except requests.HTTPError as error:
            raise self._http_error(operation, error.response, not_found) from error
        except requests.Timeout as error:
            raise UpstreamTimeout(f"the PACS did not answer ({operation}) in time", service="pacs") from error
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
            if error.args and isinstance(error.args[0], ReadTimeoutError):  # a read timeout while streaming a body
                raise UpstreamTimeout(f"the PACS stopped sending ({operation})", service="pacs") from error
            raise ConnectionFailed(
                f"could not reach the PACS at {self.root}, or the connection dropped ({operation})", service="pacs"
            ) from error
        except (ValueError, InvalidDicomError, KeyError) as error:
            # requests.JSONDecodeError is a ValueError; so are dicomweb-client's multipart errors.
            raise UpstreamUnavailable(
                f"the PACS answered {operation} with a body that is not valid DICOMweb: {type(error).__name__}",
                service="pacs",
            ) from error

    def _http_error(self, operation: str, response: requests.Response | None, not_found: str | None) -> GatewayError:
        status = response.status_code if response is not None else 0
        retry_after = _retry_after(response)
        if status in (401, 403):
            return AuthenticationRejected(
                f"authentication failed for the PACS (HTTP {status}) on {operation}: "
                "check PACS_USERNAME and PACS_PASSWORD",
                service="pacs",
            )
        if status == 404 and not_found is not None:
            return StudyNotFound(f"the PACS has no study {not_found} (HTTP 404 on {operation})", service="pacs")
        if status == 404:
            return Rejected(
                f"the PACS answered HTTP 404 to {operation}: is DCM4CHEE_URL ({self.root}) its DICOMweb root?",
                service="pacs",
            )
        if status == 408:
            return UpstreamTimeout(f"the PACS timed out on {operation} (HTTP 408)", service="pacs")
        if status == 429:
            return RateLimited(
                f"the PACS asked to slow down on {operation} (HTTP 429)", service="pacs", retry_after=retry_after
            )
        if status >= 500:
            return UpstreamUnavailable(
                f"the PACS failed on {operation} (HTTP {status})",
                service="pacs",
                retry_after=retry_after,
                status_code=status,
            )
        return Rejected(f"the PACS refused {operation} (HTTP {status}){_excerpt(response)}", service="pacs")


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Take user:password out of a URL, so it never appears in a request URL, a log line or an error."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return urlunsplit(parts._replace(netloc=netloc)), username, password


def _checked_uid(uid: str) -> str:
    """A caller's Study Instance UID, stripped; anything else than digits and dots is refused (not retried)."""
    uid = uid.strip()
    if len(uid) > 64 or _UID.fullmatch(uid) is None:
        raise Rejected(f"{uid[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)", service="pacs")
    return uid


def _values(answer: dict[str, Any], tag: str) -> list[Any]:
    element = answer.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _first(answer: dict[str, Any], tag: str) -> str | None:
    values = _values(answer, tag)
    return str(values[0]) if values and values[0] is not None else None


def _study_ref(answer: dict[str, Any]) -> StudyRef | None:
    uid = _first(answer, _STUDY_UID)
    if uid is None:
        return None
    count = _first(answer, _STUDY_INSTANCES)
    return StudyRef(
        study_instance_uid=uid,
        accession_number=_first(answer, _ACCESSION),
        number_of_instances=int(count) if count is not None and count.strip().isdigit() else None,
        modalities=tuple(str(value) for value in _values(answer, _MODALITIES) if value),
    )


_METADATA_TAGS = {keyword: f"{tag_for_keyword(keyword):08X}" for keyword in STUDY_METADATA_KEYWORDS}


def _metadata_values(answer: dict[str, Any]) -> dict[str, str]:
    """The pre-flight's elements of one DICOM JSON instance, as text ("" when present without a value)."""
    values: dict[str, str] = {}
    for keyword, tag in _METADATA_TAGS.items():
        element = answer.get(tag)
        if not isinstance(element, dict):
            continue
        first = _values(answer, tag)[:1]
        values[keyword] = "" if not first or first[0] is None else str(first[0])
    return values


def _instance_ref(study_uid: str, answer: dict[str, Any]) -> InstanceRef | None:
    series_uid, sop_uid = _first(answer, _SERIES_UID), _first(answer, _SOP_UID)
    if series_uid is None or sop_uid is None:
        return None
    return InstanceRef(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=_first(answer, _SOP_CLASS),
        transfer_syntax_uid=_first(answer, _AVAILABLE_TS) or _first(answer, _TRANSFER_SYNTAX),
    )


def _retry_after(response: requests.Response | None) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from a PACS, left to the retry policy's own delay


def _excerpt(response: requests.Response | None) -> str:
    if response is None:
        return ""
    text = " ".join(response.text.split())[:200]
    return f": {text}" if text else ""


def _read_part10(part10: bytes) -> Dataset:
    return dcmread(BytesIO(part10))


def _dicom_parts(response: requests.Response, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """The bodies of a multipart/related WADO-RS response, each cut out as soon as its closing boundary arrives.

    Each body is copied once, from the chunks it arrived in (`_PartCutter`). A response cut short (no closing
    boundary) raises ValueError rather than ending quietly, so a truncated series never looks like a shorter one.
    A server that answers a single instance as bare application/dicom (allowed by a since-corrected text of
    PS3.18) is accepted too.
    """
    media_type, _, parameters = response.headers.get("Content-Type", "").partition(";")
    media_type = media_type.strip().lower()
    if media_type == "application/dicom":
        yield response.content
        return
    if media_type != "multipart/related":
        raise ValueError(f"expected a multipart/related answer, got {media_type or 'no content type'!r}")
    cutter = _PartCutter(_boundary(parameters))
    for chunk in response.iter_content(chunk_size):
        yield from cutter.feed(chunk)
    cutter.finish()


def _boundary(parameters: str) -> bytes:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("ascii")
    raise ValueError("a multipart answer without a boundary")


class _PartCutter:
    """Cuts a multipart body into its parts' bodies as chunks arrive, copying each body once.

    Why not one growing buffer: appending every chunk to a bytearray, moving what is left to its front after each
    cut and copying each body out of it moved every byte two to three times; it was the heaviest Python frame of
    a routing's profile. Here the chunks are kept as they came (memoryviews, no copy) until a part's closing
    delimiter is seen, and the body is joined from them once (read + cut + edit of 300 CT slices: 0.067 -> 0.058
    CPU-s on a quiet machine, bench/RESULTS.md). A delimiter split across two chunks is found at the seam. Memory: the
    chunks of one part.
    """

    _HEAD_LIMIT = 64 * 1024
    """A part's header block must end within this many bytes (real ones are about 40-200 bytes)."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # "\r\n" first, so a boundary at the very start of the body (no preamble) matches the delimiter too.
        self._pending: list[memoryview] = [memoryview(b"\r\n")]
        self._pending_size = 2
        self._after_preamble = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The bodies of the parts that `chunk` completes, in order."""
        delimiter, length = self._delimiter, len(self._delimiter)
        view = memoryview(chunk)
        start = 0
        keep = min(length - 1, self._pending_size)
        if keep:  # a delimiter that began in what is pending and ends in this chunk
            seam = self._tail(keep) + bytes(view[: length - 1])
            at = seam.find(delimiter)
            if 0 <= at < keep:
                yield from self._close(self._pending_size - keep + at)
                start = at + length - keep
        while (end := chunk.find(delimiter, start)) >= 0:
            self._append(view[start:end])
            yield from self._close(self._pending_size)
            start = end + length
        self._append(view[start:])

    def finish(self) -> None:
        """Raise ValueError unless the body ended with its closing delimiter (`--` right after the last one)."""
        if not (self._after_preamble and self._head(2) == b"--"):
            raise ValueError("the multipart answer ended before its closing boundary")

    def _append(self, piece: memoryview) -> None:
        if piece:
            self._pending.append(piece)
            self._pending_size += len(piece)

    def _close(self, size: int) -> Iterator[bytes]:
        """The first `size` pending bytes are a whole part (or the preamble); what follows them is a delimiter."""
        pieces = _first_bytes(self._pending, size)
        self._pending, self._pending_size = [], 0
        if self._after_preamble:
            yield _part_body(pieces)
        self._after_preamble = True

    def _tail(self, count: int) -> bytes:
        out: list[bytes] = []
        for piece in reversed(self._pending):
            out.append(bytes(piece[-count:]))
            count -= len(out[-1])
            if count <= 0:
                break
        return b"".join(reversed(out))

    def _head(self, count: int) -> bytes:
        return b"".join(bytes(piece) for piece in _first_bytes(self._pending, min(count, self._pending_size)))


def _first_bytes(pieces: list[memoryview], size: int) -> list[memoryview]:
    """The pieces covering the first `size` bytes of their concatenation (the last one cut to fit)."""
    out: list[memoryview] = []
    for piece in pieces:
        if size <= 0:
            break
        out.append(piece if len(piece) <= size else piece[:size])
        size -= len(out[-1])
    return out


def _part_body(pieces: list[memoryview]) -> bytes:
    """The body of one part (its bytes as `pieces`): what follows its header block (possibly empty), one copy."""
    skip = _after_headers(pieces)
    body: list[memoryview] = []
    for piece in pieces:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        body.append(piece[skip:])
        skip = 0
    return bytes(body[0]) if len(body) == 1 else b"".join(body)  # b"" for an empty body


def _after_headers(pieces: list[memoryview]) -> int:
    """Where the body starts: after the blank line ending the header block, looked for in the first KB (real
    header blocks are 40-200 bytes), then up to `_PartCutter._HEAD_LIMIT`."""
    for limit in (1024, _PartCutter._HEAD_LIMIT):
        head = b"".join(bytes(piece) for piece in _first_bytes(pieces, limit))
        if (at := head.find(b"\r\n\r\n")) >= 0:
            return at + 4
    raise ValueError("a multipart part without a header block")
