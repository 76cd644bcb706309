"""A plain, thread-safe HTTP client for the SATUSEHAT FHIR R4 API.

`SatusehatClient` wraps one synchronous `httpx.Client` and knows three things about SATUSEHAT:

* **Auth.** OAuth2 client credentials the way SATUSEHAT wants them: `POST {auth}/accesstoken?grant_type=
  client_credentials` with a form-encoded `client_id` / `client_secret`. The token is cached until
  `issued_at/1000 + expires_in - 60 s` and refreshed by one thread while the others wait for it. A 401 from a
  FHIR call invalidates the token and the request is sent once more with a fresh one; a second 401 raises.
* **Errors.** Every failure becomes a class from `clients.errors`: 4xx → `FhirRejected` (the OperationOutcome
  parsed, `RuleNumber: NNNNN` pulled out) or `DuplicateResource`; 429 → `RateLimited`; 5xx →
  `UpstreamUnavailable`; timeouts → `UpstreamTimeout`; network failures → `ConnectionFailed`. Error bodies are
  read as JSON only when they are JSON: the gateway in front of SATUSEHAT answers plain text ("Gateway Timeout").
* **Idempotent creation.** `create_or_adopt` finds a resource by its business identifier before (and after a
  duplicate error from) a POST, so a re-run never registers the same Encounter twice.

There is exactly one retry layer, and it is not here: apart from the single 401 refresh, the client never
repeats a request. `RateLimited` and the other `Retryable` errors carry `retry_after` (from `Retry-After`) and
the Prefect task decides whether and when to try again, so attempts show in the UI and retries never multiply.
An optional cap (`max_requests_per_second`) spaces requests out before they are sent (a token bucket) and keeps
any one-second window at the platform within the cap whatever delays them on the way (a request window,
clients/ratelimit.py).

The client holds no Prefect import and works as well from a notebook. It is safe to share between threads
(the Prefect tasks call it from the process's I/O threads, tasks/runtime.py). Tokens and the client secret never
appear in messages or logs; request lines are logged at DEBUG (method, path and query, status, milliseconds).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote, urlencode

import httpx
from pydantic import SecretStr

from clients.errors import (
    AuthenticationRejected,
    ConnectionFailed,
    DuplicateResource,
    FhirRejected,
    GatewayError,
    OutcomeIssue,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from clients.ratelimit import RateLimiter, RequestWindow
from models.revisions import changed_elements, identity_conflicts, revised

if TYPE_CHECKING:
    from types import TracebackType

    from models.settings import Settings

__all__ = ["CreateResult", "SatusehatClient", "default_user_agent", "parse_operation_outcome", "parse_retry_after"]

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | int | float] | Sequence[tuple[str, str | int | float]]

_EXPIRY_MARGIN_S = 60.0
"""Refresh this long before the token's stated expiry, so a request never leaves with a dying token."""

_FALLBACK_LIFETIME_S = 300.0
"""Token lifetime assumed when the response has no usable `expires_in` (short on purpose)."""

_RULE_NUMBER = re.compile(r"RuleNumber\s*:?\s*(\d+)", re.IGNORECASE)
_RULE_SUFFIX = re.compile(r"\s*\(\s*RuleNumber\s*:?\s*\d+\s*\)\s*$", re.IGNORECASE)
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DUPLICATE_RULE = 20002
NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
"""The identifier system of an Indonesian NIK on SATUSEHAT's Patient and Practitioner."""
NIK_CACHE_TTL_S = 6 * 3600.0
"""How long an NIK → IHS id answer is reused in this process (an IHS id does not change; the TTL bounds memory
of people not seen again and of a correction made on the platform)."""
_NIK_IN_QUERY = re.compile(r"(id/nik(?:\||%7C))[0-9]+", re.IGNORECASE)
_MAX_DETAIL_CHARS = 300
_MAX_EXCERPT_CHARS = 1000
_MAX_ISSUES_IN_MESSAGE = 5


class _NikRedactingFilter(logging.Filter):
    """httpx logs every request URL at INFO ("HTTP Request: GET …"); a NIK search must not leave the NIK there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _NIK_IN_QUERY.sub(r"\1***", unquote(str(arg))) if "nik" in str(arg).lower() else arg
                for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_NikRedactingFilter())


def default_user_agent() -> str:
    """`satset-gateway/<version> (+python-httpx)`: an explicit agent, since SATUSEHAT's gateway has refused none."""
    try:
        package_version = version("satset-gateway")
    except PackageNotFoundError:
        package_version = "dev"
    return f"satset-gateway/{package_version} (+python-httpx)"


@dataclass(frozen=True)
class CreateResult:
    """What `create_or_adopt` did: `adopted` is True when the resource already existed and was reused.

    `changed` names the elements a correction replaced (`create_or_revise`), `previous_version` the
    `meta.versionId` the platform held before; both empty when nothing was revised."""

    resource_type: str
    id: str
    adopted: bool
    resource: JsonObject
    changed: tuple[str, ...] = ()
    previous_version: str | None = None

    @property
    def action(self) -> str:
        """created, adopted (the same content was already there) or revised (a correction was PUT)."""
        if self.changed:
            return "revised"
        return "adopted" if self.adopted else "created"


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float


class SatusehatClient:
    """SATUSEHAT's FHIR API with token handling, typed errors and identifier-based adoption."""

    def __init__(
        self,
        *,
        auth_base: str,
        fhir_base: str,
        org_id: str,
        client_id: str,
        client_secret: str | SecretStr,
        timeout: float = 30.0,
        user_agent: str | None = None,
        max_requests_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Plain values only, so a notebook needs no Settings.

        `clock` is wall-clock seconds since the epoch (tokens carry an epoch `issued_at`); tests inject a fake.
        `rate_limiter` lets several clients share one budget; it excludes `max_requests_per_second`.
        """
        for name, base in (("auth_base", auth_base), ("fhir_base", fhir_base)):
            if not base.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL, got {base!r}")
        if not client_id:
            raise ValueError("client_id must not be empty")
        secret = client_secret if isinstance(client_secret, SecretStr) else SecretStr(client_secret)
        if not secret.get_secret_value():
            raise ValueError("client_secret must not be empty")
        if max_requests_per_second is not None and rate_limiter is not None:
            raise ValueError("pass either max_requests_per_second or rate_limiter, not both")
        window = None
        if max_requests_per_second is not None:
            rate_limiter = RateLimiter(max_requests_per_second)
            window = RequestWindow.per_second(max_requests_per_second)

        self.auth_base = auth_base.rstrip("/")
        self.fhir_base = fhir_base.rstrip("/")
        self.org_id = org_id
        self.timeout = timeout
        self._client_id = client_id
        self._client_secret = secret
        self._clock = clock
        self._limiter = rate_limiter
        self._window = window
        self._token: _Token | None = None
        self._token_lock = threading.Lock()
        self._ihs_by_nik: dict[tuple[str, str], tuple[str, float]] = {}
        self._ihs_by_nik_lock = threading.Lock()
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": user_agent or default_user_agent(), "Accept": "application/json"},
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        """Build the client from the gateway's settings; `overrides` (e.g. `transport`) win."""
        values: dict[str, Any] = {
            "auth_base": settings.auth_base,
            "fhir_base": settings.fhir_base,
            "org_id": settings.ss_org_id,
            "client_id": settings.ss_client_id,
            "client_secret": settings.ss_client_secret,
            "timeout": settings.ss_timeout_s,
            "max_requests_per_second": settings.ss_max_requests_per_second,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The token bucket every request passes through, if a cap is set."""
        return self._limiter

    @property
    def request_window(self) -> RequestWindow | None:
        """With `max_requests_per_second`: what makes the cap hold as the platform counts, not only as sent."""
        return self._window

    def __repr__(self) -> str:
        return f"SatusehatClient(fhir_base={self.fhir_base!r}, org_id={self.org_id!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ----------------------------------------------------------------------------------------------- auth

    def token(self) -> str:
        """A valid bearer token, fetched once and shared by every thread until shortly before it expires."""
        current = self._token
        if current is not None and self._clock() < current.expires_at:
            return current.value
        with self._token_lock:
            current = self._token
            if current is not None and self._clock() < current.expires_at:
                return current.value
            current = self._fetch_token()
            self._token = current
            return current.value

    def invalidate_token(self, stale: str | None = None) -> None:
        """Forget the cached token; with `stale`, only if it is still that one (another thread may have refreshed)."""
        with self._token_lock:
            if self._token is not None and (stale is None or self._token.value == stale):
                self._token = None

    def _fetch_token(self) -> _Token:
        operation = "POST accesstoken"
        body = urlencode({"client_id": self._client_id, "client_secret": self._client_secret.get_secret_value()})
        request = self._http.build_request(
            "POST",
            f"{self.auth_base}/accesstoken",
            params={"grant_type": "client_credentials"},
            content=body.encode("ascii"),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        requested_at = self._clock()
        response = self._send(request, operation)
        if response.status_code == 429 or response.status_code >= 500:
            raise self._error(response, operation)
        if not response.is_success:
            _, detail = self._explain(response)
            raise AuthenticationRejected(
                f"SATUSEHAT token endpoint refused the client credentials (HTTP {response.status_code}): {detail}"
            )
        data = _json_object(response) or {}
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            # Seen in the wild as an empty 200 body (ivanwilliammd/satusehat-integration#49): a later try may work.
            raise UpstreamUnavailable(
                f"SATUSEHAT token endpoint answered HTTP {response.status_code} without an access_token",
                service="satusehat",
                status_code=response.status_code,
            )
        expires_at = _token_expiry(
            expires_in=_number(data.get("expires_in")),
            issued_at_ms=_number(data.get("issued_at")),
            requested_at=requested_at,
            now=self._clock(),
        )
        return _Token(access_token, expires_at)

    # ----------------------------------------------------------------------------------------------- FHIR

    def create(self, resource: JsonObject) -> JsonObject:
        """POST the resource; returns the server's copy, which carries the new `id`."""
        resource_type = _resource_type_of(resource)
        response = self._fhir("POST", resource_type, body=resource)
        created = _json_object(response)
        if created is not None and isinstance(created.get("id"), str) and created["id"]:
            return created
        location_id = _id_from_location(response.headers.get("Location"), resource_type)
        if location_id is not None:
            return self.read(resource_type, location_id)
        # The POST probably did create something; a retry that searches first will find it.
        raise UpstreamUnavailable(
            f"SATUSEHAT answered POST {resource_type} with HTTP {response.status_code} but no resource id",
            service="satusehat",
            status_code=response.status_code,
        )

    def read(self, resource_type: str, id: str) -> JsonObject:
        """GET one resource by its SATUSEHAT id."""
        _check_resource_type(resource_type)
        _check_id(id)
        return self._fhir_json("GET", f"{resource_type}/{id}")

    def update(self, resource: JsonObject) -> JsonObject:
        """PUT the resource to its id (SATUSEHAT requires the `id` in the body as well as in the path)."""
        resource_type = _resource_type_of(resource)
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            raise ValueError(f"update needs the {resource_type}'s id in the resource body")
        _check_id(resource_id)
        return self._fhir_json("PUT", f"{resource_type}/{resource_id}", body=resource)

    def search(self, resource_type: str, params: SearchParams) -> JsonObject:
        """GET `{type}?params`; returns the searchset Bundle as sent (it has no `entry` when nothing matched)."""
        _check_resource_type(resource_type)
        bundle = self._fhir_json("GET", resource_type, params=params)
        entries = bundle.get("entry")
        if bundle.get("resourceType") != "Bundle" or not isinstance(entries, list | None):
            # A 200 that is not a searchset (an OperationOutcome, an API gateway's JSON fault) must not read as
            # "nothing matched": create-or-adopt would then post a second copy of what the platform holds.
            kind = bundle.get("resourceType") or "JSON object without a resourceType"
            what = f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}"
            if kind == "Bundle":
                what = "a Bundle whose entry is not a list"
            raise UpstreamUnavailable(
                f"SATUSEHAT answered the search GET {resource_type} with {what}, not a searchset Bundle: "
                f"{self._redact(_describe_outcome(bundle) or _describe_json_error(bundle))}",
                service="satusehat",
                status_code=200,
            )
        return bundle

    def find_by_identifier(
        self, resource_type: str, system: str, value: str, *, count: int | None = None
    ) -> list[JsonObject]:
        """Resources whose identifier is `system|value`, newest first (`_sort=-_lastUpdated`).

        `|`, `,`, `$` and `\\` in the system or value are escaped as FHIR search requires.
        """
        params: list[tuple[str, str | int | float]] = [
            ("identifier", f"{_escape_search(system)}|{_escape_search(value)}"),
            ("_sort", "-_lastUpdated"),
        ]
        if count is not None:
            params.append(("_count", count))
        bundle = self.search(resource_type, params)
        entries = bundle.get("entry") or []
        return [
            entry["resource"]
            for entry in entries
            if isinstance(entry, dict)
            and isinstance(entry.get("resource"), dict)
            and entry["resource"].get("resourceType") == resource_type
        ]

    def ihs_id_by_nik(self, resource_type: str, nik: str) -> str | None:
        """The IHS id of the Patient or Practitioner with this NIK, or None when the platform knows none.

        `GET {fhir}/{type}?identifier=https://fhir.kemkes.go.id/id/nik|<NIK>`: the searchset's entries carry the IHS
        id. Found ids are cached in this process for NIK_CACHE_TTL_S (keyed by a hash, not the NIK); an unknown NIK
        is asked again next time. The NIK never appears in a log line or an error message.
        """
        if resource_type not in ("Patient", "Practitioner"):
            raise ValueError(f"a NIK names a Patient or a Practitioner, not a {resource_type}")
        key = (resource_type, hashlib.sha256(nik.encode()).hexdigest())
        now = self._clock()
        with self._ihs_by_nik_lock:
            cached = self._ihs_by_nik.get(key)
            if cached is not None and cached[1] > now:
                return cached[0]
        bundle = self.search(resource_type, [("identifier", f"{NIK_SYSTEM}|{nik}")])
        ids = sorted(
            {
                str(entry["resource"]["id"])
                for entry in bundle.get("entry") or []
                if isinstance(entry, dict)
                and isinstance(entry.get("resource"), dict)
                and entry["resource"].get("resourceType") == resource_type
                and entry["resource"].get("id")
            }
        )
        if not ids:
            return None
        if len(ids) > 1:
            raise FhirRejected(
                f"SATUSEHAT holds {len(ids)} {resource_type} resources for one NIK ({', '.join(ids)}): "
                "not choosing one; send the IHS id instead",
                status_code=409,
            )
        with self._ihs_by_nik_lock:
            self._ihs_by_nik[key] = (ids[0], now + NIK_CACHE_TTL_S)
        return ids[0]

    def create_or_adopt(
        self, resource: JsonObject, identifier_system: str | None = None, *, search_first: bool = True
    ) -> CreateResult:
        """Create the resource unless one with the same business identifier exists; then adopt that one.

        The identifier is the one whose system is `identifier_system` (default: the first). With
        `search_first`, the identifier is looked up before the POST. A first attempt may skip that search to
        save a round trip, but every re-run must search first: a POST that timed out or lost its connection
        may well have been stored, and SATUSEHAT does not always reject the second copy as a duplicate. If the
        POST meets `DuplicateResource`, the identifier is searched again and the match adopted; when even that
        search finds nothing, the duplicate error is raised.

        Which match is adopted (`_adopt`): resources marked `entered-in-error` never are (that is how a hospital
        voids a duplicate); of the others, the one updated last (`meta.lastUpdated`, the server's order when
        dates are missing), with a WARNING naming every id when there are several. A match of another order
        (models/revisions.py `IDENTITY_REFERENCES`: another patient, another visit's Encounter, another
        ServiceRequest) is never adopted and nothing is posted: FhirRejected (HTTP 409), since the identifier
        is taken and the router would file images under the patient of whatever ServiceRequest carries the ACSN.
        """
        resource_type = _resource_type_of(resource)
        system, value = _pick_identifier(resource, identifier_system)
        if search_first:
            adopted = self._adopt(resource, resource_type, system, value)
            if adopted is not None:
                return adopted
        try:
            created = self.create(resource)
        except DuplicateResource:
            adopted = self._adopt(resource, resource_type, system, value)
            if adopted is None:
                raise
            return adopted
        return CreateResult(resource_type=resource_type, id=str(created["id"]), adopted=False, resource=created)

    def create_or_revise(self, resource: JsonObject, identifier_system: str | None = None) -> CreateResult:
        """`create_or_adopt`, then a correction when the adopted resource's content differs from `resource`.

        A re-send with the same content changes nothing. One with another reading, conclusion, exam code or visit
        detail is a clinical correction: the resource is PUT under the existing id, Observation and
        DiagnosticReport with status `amended` (models/revisions.py), and the result names the elements replaced
        and the version the platform held before, so the history stays in the flow's result and artifact.
        """
        result = self.create_or_adopt(resource, identifier_system)
        if not result.adopted:
            return result
        changed = changed_elements(resource, result.resource)
        if not changed:
            return result
        meta = result.resource.get("meta")
        previous = meta.get("versionId") if isinstance(meta, dict) else None
        stored = self.update(revised(resource, result.resource))
        logger.info(
            "revised %s/%s (%s), previous version %s", result.resource_type, result.id, ", ".join(changed), previous
        )
        return CreateResult(
            resource_type=result.resource_type,
            id=result.id,
            adopted=True,
            resource=stored,
            changed=tuple(changed),
            previous_version=str(previous) if previous is not None else None,
        )

    def _adopt(self, resource: JsonObject, resource_type: str, system: str, value: str) -> CreateResult | None:
        """The match to adopt by the rule in `create_or_adopt`'s docstring; None when there is none."""
        found = [item for item in self.find_by_identifier(resource_type, system, value) if _has_id(item)]
        matches = [item for item in found if item.get("status") != "entered-in-error"]
        if len(found) > len(matches):
            voided = ", ".join(str(item["id"]) for item in found if item not in matches)
            logger.info("not adopting %s %s: entered-in-error (%s|%s)", resource_type, voided, system, value)
        conflicts = {str(item["id"]): identity_conflicts(resource, item) for item in matches}
        others = [item for item in matches if conflicts[str(item["id"])]]
        if others:
            elements = sorted({element for item in others for element in conflicts[str(item["id"])]})
            owner = next((whose for element, whose in _OWNER.items() if element in elements), "another order")
            ids = ", ".join(f"{resource_type}/{item['id']}" for item in others)
            raise FhirRejected(
                f"SATUSEHAT already holds {ids} with identifier {system}|{value} for {owner} "
                f"(its {', '.join(elements)} differ from this order's): the identifier is taken, so nothing was "
                "created or adopted; correct the identifier in the HIS, or mark the other resource "
                "entered-in-error",
                status_code=409,
                issues=(
                    OutcomeIssue(
                        severity="error",
                        code="duplicate",
                        text=f"identifier {value} belongs to {owner}'s {resource_type}",
                        expression=(
                            f"{resource_type}.identifier",
                            *(f"{resource_type}.{element}" for element in elements),
                        ),
                    ),
                ),
            )
        if not matches:
            return None
        newest = _newest(matches)
        if len(matches) > 1:
            logger.warning(
                "%d %s resources carry identifier %s|%s (%s); adopting the one updated last, %s",
                len(matches),
                resource_type,
                system,
                value,
                ", ".join(str(item["id"]) for item in matches),
                newest["id"],
            )
        logger.debug("adopting existing %s/%s for identifier %s|%s", resource_type, newest["id"], system, value)
        return CreateResult(resource_type=resource_type, id=str(newest["id"]), adopted=True, resource=newest)

    # -------------------------------------------------------------------------------------------- plumbing

    def _fhir_json(
        self, method: str, path: str, *, params: SearchParams | None = None, body: JsonObject | None = None
    ) -> JsonObject:
        response = self._fhir(method, path, params=params, body=body)
        body = _json_object(response)
        if body is None:
            raise UpstreamUnavailable(
                f"SATUSEHAT answered {method} {path} with HTTP {response.status_code} but no JSON object",
                service="satusehat",
                status_code=response.status_code,
            )
        return body

    def _fhir(
        self, method: str, path: str, *, params: SearchParams | None = None, body: JsonObject | None = None
    ) -> httpx.Response:
        """Send a FHIR request with the bearer token; on a 401, refresh the token and send it once more."""
        operation = f"{method} {path}"
        url = f"{self.fhir_base}/{path}"
        for attempt in (1, 2):
            bearer = self.token()
            request = self._http.build_request(
                method, url, params=params, json=body, headers={"Authorization": f"Bearer {bearer}"}
            )
            response = self._send(request, operation)
            if response.status_code == 401 and attempt == 1:
                logger.debug("%s answered 401; refreshing the token and retrying once", operation)
                self.invalidate_token(bearer)
                continue
            if response.is_success:
                return response
            raise self._error(response, operation, retried_401=attempt == 2)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, request: httpx.Request, operation: str) -> httpx.Response:
        """One HTTP exchange: rate cap, DEBUG request line, transport errors mapped to the gateway's tree."""
        if self._limiter is not None:
            self._limiter.acquire()
        window = self._window
        if window is None:
            return self._exchange(request, operation)
        window.acquire()
        try:
            return self._exchange(request, operation)
        finally:
            window.release()

    def _exchange(self, request: httpx.Request, operation: str) -> httpx.Response:
        target = _NIK_IN_QUERY.sub(r"\1***", unquote(request.url.raw_path.decode("ascii", "replace")))
        started = time.perf_counter()
        error: GatewayError
        try:
            response = self._http.send(request)
        except httpx.TimeoutException as exc:
            error = UpstreamTimeout(
                f"SATUSEHAT did not answer {operation} within {self.timeout:g} s ({type(exc).__name__})",
                service="satusehat",
            )
        except httpx.TransportError as exc:
            error = ConnectionFailed(
                f"could not reach SATUSEHAT for {operation}: {type(exc).__name__}: {self._redact(str(exc))}",
                service="satusehat",
            )
        else:
            elapsed_ms = (time.perf_counter() - started) * 1000
            logger.debug("%s %s -> %d in %.0f ms", request.method, target, response.status_code, elapsed_ms)
            return response
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.debug("%s %s -> %s after %.0f ms", request.method, target, type(error).__name__, elapsed_ms)
        # Raised outside the except clause: the httpx exception holds the request, Authorization header included,
        # and must not travel along as __context__ into Prefect's logs or pickled results.
        raise error from None

    def _error(self, response: httpx.Response, operation: str, *, retried_401: bool = False) -> GatewayError:
        """The gateway error for a non-2xx response."""
        status = response.status_code
        issues, detail = self._explain(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
        if status == 429:
            hint = f"; retry after {retry_after:g} s" if retry_after is not None else ""
            return RateLimited(
                f"SATUSEHAT rate-limited {operation} (HTTP 429){hint}: {detail}",
                service="satusehat",
                retry_after=retry_after,
            )
        if status >= 500:
            return UpstreamUnavailable(
                f"SATUSEHAT unavailable for {operation} (HTTP {status}): {detail}",
                service="satusehat",
                retry_after=retry_after,
                status_code=status,
            )
        excerpt = self._redact(response.text[:_MAX_EXCERPT_CHARS])
        if 300 <= status < 400:
            where = response.headers.get("Location", "?")
            return FhirRejected(
                f"SATUSEHAT redirected {operation} (HTTP {status}) to {where}; check SS_BASE_URL",
                status_code=status,
                body_excerpt=excerpt,
            )
        if _is_duplicate(status, issues, response.text):
            return DuplicateResource(
                f"SATUSEHAT rejected {operation} as a duplicate (HTTP {status}): {detail}",
                status_code=status,
                issues=issues,
                body_excerpt=excerpt,
            )
        again = " with a fresh token" if retried_401 else ""
        return FhirRejected(
            f"SATUSEHAT rejected {operation}{again} (HTTP {status}): {detail}",
            status_code=status,
            issues=issues,
            body_excerpt=excerpt,
        )

    def _explain(self, response: httpx.Response) -> tuple[tuple[OutcomeIssue, ...], str]:
        """Parsed issues and a one-line, secret-free description of an error body (JSON or not)."""
        data = _json_value(response)
        issues = parse_operation_outcome(data) if isinstance(data, dict) else ()
        if issues:
            shown = "; ".join(_describe_issue(issue) for issue in issues[:_MAX_ISSUES_IN_MESSAGE])
            more = len(issues) - _MAX_ISSUES_IN_MESSAGE
            detail = f"{shown}; and {more} more issue(s)" if more > 0 else shown
        elif isinstance(data, dict):
            detail = _describe_json_error(data)
        else:
            detail = _describe_text(response)
        issues = tuple(
            OutcomeIssue(
                severity=issue.severity,
                code=issue.code,
                text=self._redact(issue.text),
                rule_number=issue.rule_number,
                expression=issue.expression,
            )
            for issue in issues
        )
        return issues, self._redact(detail)

    def _redact(self, text: str) -> str:
        """Blank out the client secret and the current token wherever an upstream echoes them back."""
        secrets = [self._client_secret.get_secret_value()]
        current = self._token
        if current is not None:
            secrets.append(current.value)
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


# ------------------------------------------------------------------------------------------ pure helpers


def parse_operation_outcome(body: Mapping[str, Any]) -> tuple[OutcomeIssue, ...]:
    """The issues of an OperationOutcome, with `RuleNumber: NNNNN` from `details.text` as `rule_number`."""
    if body.get("resourceType") != "OperationOutcome":
        return ()
    raw_issues = body.get("issue")
    if not isinstance(raw_issues, list):
        return ()
    issues = []
    for raw in raw_issues:
        if not isinstance(raw, dict):
            continue
        details = raw.get("details") if isinstance(raw.get("details"), dict) else {}
        text = details.get("text") if isinstance(details.get("text"), str) else None
        if text is None and isinstance(raw.get("diagnostics"), str):
            text = raw["diagnostics"]
        if text is None:
            codings = details.get("coding") if isinstance(details.get("coding"), list) else []
            text = next(
                (
                    str(c.get("display") or c["code"])
                    for c in codings
                    if isinstance(c, dict) and (c.get("display") or c.get("code"))
                ),
                "",
            )
        searched = " ".join(part for part in (text, raw.get("diagnostics")) if isinstance(part, str))
        match = _RULE_NUMBER.search(searched)
        where = raw.get("expression") or raw.get("location") or []
        expression = tuple(str(item) for item in where) if isinstance(where, list) else (str(where),)
        issues.append(
            OutcomeIssue(
                severity=str(raw.get("severity") or ""),
                code=str(raw.get("code") or ""),
                text=text,
                rule_number=int(match.group(1)) if match else None,
                expression=expression,
            )
        )
    return tuple(issues)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """`Retry-After` as seconds from `now` (epoch seconds): either delta-seconds or an HTTP-date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def _token_expiry(*, expires_in: float | None, issued_at_ms: float | None, requested_at: float, now: float) -> float:
    """When to stop using a token: `issued_at/1000 + expires_in - 60`, trusting the local clock when in doubt.

    Without a usable `issued_at`, the lifetime counts from when the request was sent. An `issued_at` that
    would make the token expired already, or live longer than the local reckoning, means the clocks disagree;
    the local reckoning then wins (a token that dies early costs a 401 and one refresh, nothing more).
    """
    lifetime = expires_in if expires_in is not None and expires_in > 0 else _FALLBACK_LIFETIME_S
    margin = min(_EXPIRY_MARGIN_S, lifetime / 2)
    local_expiry = requested_at + lifetime - margin
    if issued_at_ms is None:
        return local_expiry
    issued_expiry = issued_at_ms / 1000 + lifetime - margin
    if issued_expiry <= now or issued_expiry > local_expiry:
        return local_expiry
    return issued_expiry


def _number(value: object) -> float | None:
    """SATUSEHAT sends numbers as strings ("3599"); anything unparsable is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _json_value(response: httpx.Response) -> object:
    """The body as JSON when it is JSON, whatever the Content-Type says; otherwise None."""
    text = response.text.strip()
    if not text or text[0] not in "{[":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_object(response: httpx.Response) -> JsonObject | None:
    value = _json_value(response)
    return value if isinstance(value, dict) else None


def _describe_issue(issue: OutcomeIssue) -> str:
    text = _RULE_SUFFIX.sub("", issue.text) or issue.code or "no details"
    prefix = " ".join(
        part
        for part in (
            f"RuleNumber {issue.rule_number}" if issue.rule_number is not None else "",
            f"at {', '.join(issue.expression)}" if issue.expression else "",
        )
        if part
    )
    return f"{prefix}: {text}" if prefix else text


def _describe_outcome(data: Mapping[str, Any]) -> str:
    """The issues of an OperationOutcome in one line ("" when `data` is none or has no issue)."""
    return "; ".join(_describe_issue(issue) for issue in parse_operation_outcome(data)[:_MAX_ISSUES_IN_MESSAGE])


_HTML = re.compile(r"^\s*(<!doctype\s+html|<html|<head|<body|<\?xml|<[a-z][a-z0-9]*[\s>])", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_HTML_SKIPPED = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")
_MAX_PAGE_CHARS = 200_000
"""An error page is read this far (a title or the first visible words are near its start)."""


def _describe_text(response: httpx.Response) -> str:
    """A line from an error body that is not JSON: an HTML error page (a proxy's 502, a firewall's 403) by its
    title or its visible text, plain text as it is, whitespace folded; "empty body" when there is nothing."""
    text = response.text[:_MAX_PAGE_CHARS]
    if _HTML.match(text):
        title = _HTML_TITLE.search(text)
        visible = _HTML_TAG.sub(" ", _HTML_SKIPPED.sub(" ", text))
        shown = title.group(1) if title and title.group(1).strip() else visible
        folded = " ".join(html.unescape(shown).split())
        return f"HTML page: {folded[:_MAX_DETAIL_CHARS]}" if folded else "an HTML page without text"
    return " ".join(text.split())[:_MAX_DETAIL_CHARS] or "empty body"


def _describe_json_error(data: Mapping[str, Any]) -> str:
    """A line from JSON error bodies that are not OperationOutcomes (Apigee faults, OAuth errors)."""
    fault = data.get("fault")
    if isinstance(fault, dict) and isinstance(fault.get("faultstring"), str):
        return fault["faultstring"][:_MAX_DETAIL_CHARS]
    for key in ("error_description", "message", "error", "detail"):
        if isinstance(data.get(key), str) and data[key]:
            return str(data[key])[:_MAX_DETAIL_CHARS]
    return json.dumps(data, ensure_ascii=False)[:_MAX_DETAIL_CHARS]


def _is_duplicate(status: int, issues: Sequence[OutcomeIssue], text: str) -> bool:
    """SATUSEHAT says "duplicate" several ways: rule 20002, HTTP 409, issue code, or just the words."""
    return (
        status == 409
        or any(issue.rule_number == _DUPLICATE_RULE or issue.code.lower() == "duplicate" for issue in issues)
        or "duplicate" in text.lower()
    )


def _resource_type_of(resource: Mapping[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise ValueError("the resource has no resourceType")
    _check_resource_type(resource_type)
    return resource_type


def _check_resource_type(resource_type: str) -> None:
    if not _RESOURCE_TYPE.match(resource_type):
        raise ValueError(f"not a FHIR resource type: {resource_type!r}")


def _check_id(resource_id: str) -> None:
    if not _RESOURCE_ID.match(resource_id):
        raise ValueError(f"not a FHIR resource id: {resource_id!r}")


def _pick_identifier(resource: Mapping[str, Any], system: str | None) -> tuple[str, str]:
    """The (system, value) that makes the resource findable again: the one with `system`, else the first."""
    raw = resource.get("identifier")
    identifiers = [raw] if isinstance(raw, dict) else raw if isinstance(raw, list) else []
    candidates = [
        item
        for item in identifiers
        if isinstance(item, dict) and isinstance(item.get("system"), str) and isinstance(item.get("value"), str)
    ]
    if system is not None:
        candidates = [item for item in candidates if item["system"] == system]
    if not candidates:
        wanted = f" with system {system}" if system is not None else ""
        raise ValueError(
            f"create_or_adopt needs an identifier{wanted} (system and value) on the {resource.get('resourceType')}"
        )
    return candidates[0]["system"], candidates[0]["value"]


def _has_id(resource: Mapping[str, Any]) -> bool:
    return isinstance(resource.get("id"), str) and bool(resource["id"])


_OWNER = {"subject": "another patient", "encounter": "another visit", "basedOn": "another order"}
"""Whose resource an identity conflict shows (models/revisions.py), for the 409's sentence: the first element in
this order that differs (another patient's order is that, whatever else differs too)."""


def _escape_search(value: str) -> str:
    """FHIR search escaping for token parameters (`\\`, `|`, `,`, `$`)."""
    for char in ("\\", "|", ",", "$"):
        value = value.replace(char, "\\" + char)
    return value


def _newest(resources: Sequence[JsonObject]) -> JsonObject:
    """The most recently updated resource; the server's order (already newest first) when dates are missing."""
    stamps = []
    for resource in resources:
        meta = resource.get("meta")
        stamp = meta.get("lastUpdated") if isinstance(meta, dict) else None
        try:
            parsed = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            return resources[0]
        stamps.append(parsed)
    best = max(range(len(resources)), key=lambda index: (stamps[index], -index))
    return resources[best]


def _id_from_location(location: str | None, resource_type: str) -> str | None:
    """The id in a `Location: .../{type}/{id}[/_history/{vid}]` header, if there is one."""
    if not location:
        return None
    parts = httpx.URL(location).path.strip("/").split("/")
    for index in range(len(parts) - 1):
        if parts[index] == resource_type and _RESOURCE_ID.match(parts[index + 1]):
            return parts[index + 1]
    return None
