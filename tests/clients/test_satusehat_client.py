"""Unit tests of the SATUSEHAT client against an in-memory SATUSEHAT (httpx.MockTransport), no network."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from clients.errors import (
    AuthenticationRejected,
    ConnectionFailed,
    DuplicateResource,
    FhirRejected,
    RateLimited,
    Rejected,
    Retryable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from clients.ratelimit import RateLimiter, RequestWindow
from clients.satusehat import (
    CreateResult,
    SatusehatClient,
    parse_operation_outcome,
    parse_retry_after,
)

AUTH_BASE = "https://ss.test/oauth2/v1"
FHIR_BASE = "https://ss.test/fhir-r4/v1"
TOKEN_PATH = "/oauth2/v1/accesstoken"
ORG_ID = "100025753"
CLIENT_ID = "client-id-123"
SECRET = "s3cr&t+plus=eq/slash %pct"  # characters that break a hand-built form body
ISSUED_AT_MS = 1671109805593  # issued_at of the SATUSEHAT docs' token example
ISSUED_AT_S = ISSUED_AT_MS / 1000
EXPIRES_IN = 3599
EXPIRES_AT = ISSUED_AT_S + EXPIRES_IN - 60

ENCOUNTER_SYSTEM = f"http://sys-ids.kemkes.go.id/encounter/{ORG_ID}"

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "satusehat_examples"


def example(name: str) -> dict[str, Any]:
    """A public SATUSEHAT example body (see tests/data/satusehat_examples/INDEX.md)."""
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


OUTCOME_WRONG_ORG = example("operationoutcome__ivanwilliammd-satusehat-integration-issue18-encounter-wrong-org.json")
OUTCOME_PUT_MISSING_ID = example("operationoutcome__ivanwilliammd-satusehat-integration-issue55-put-missing-id.json")
OUTCOME_ACCESSTOKEN_4XX = example("operationoutcome__satusehat-docs-accesstoken-4xx.json")
TOKEN_RESPONSE = example("token_response__satusehat-docs-accesstoken.json")


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = ISSUED_AT_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Handler = Callable[[httpx.Request], httpx.Response]


class FakeSatusehat:
    """The token endpoint (real credential check, numbered tokens) plus a FHIR handler each test sets."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.token_calls = 0
        self.issued_at: str | None = str(ISSUED_AT_MS)
        self.expires_in: str | None = str(EXPIRES_IN)
        self.before_token: Callable[[int], None] = lambda n: None
        self.fhir: Handler = lambda request: httpx.Response(404, text="no FHIR handler set")
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
        if request.url.path == TOKEN_PATH:
            return self._token(request)
        return self.fhir(request)

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode("ascii"), strict_parsing=True)
        if form != {"client_id": [CLIENT_ID], "client_secret": [SECRET]}:
            return httpx.Response(401, json=OUTCOME_ACCESSTOKEN_4XX)
        with self._lock:
            self.token_calls += 1
            number = self.token_calls
        self.before_token(number)
        body = {**TOKEN_RESPONSE, "access_token": f"tok-{number}", "client_id": CLIENT_ID}
        for key, value in (("issued_at", self.issued_at), ("expires_in", self.expires_in)):
            if value is None:
                body.pop(key)
            else:
                body[key] = value
        return httpx.Response(200, json=body)

    @property
    def fhir_requests(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path != TOKEN_PATH]


@pytest.fixture
def fake() -> FakeSatusehat:
    return FakeSatusehat()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(fake: FakeSatusehat, clock: FakeClock) -> Iterator[Callable[..., SatusehatClient]]:
    clients: list[SatusehatClient] = []

    def make(**overrides: Any) -> SatusehatClient:
        values: dict[str, Any] = {
            "auth_base": AUTH_BASE,
            "fhir_base": FHIR_BASE,
            "org_id": ORG_ID,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "transport": httpx.MockTransport(fake),
            "clock": clock,
        }
        values.update(overrides)
        client = SatusehatClient(**values)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., SatusehatClient]) -> SatusehatClient:
    return make_client()


def json_response(status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"} | headers
    )


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        **({"entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]} if resources else {}),
    }


def encounter(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": ENCOUNTER_SYSTEM, "value": "VISIT-0001"}],
        "status": "arrived",
        "subject": {"reference": "Patient/P00000000001"},
        **extra,
    }


# --------------------------------------------------------------------------------------------------- auth


def test_token_request_is_satusehat_client_credentials(client: SatusehatClient, fake: FakeSatusehat) -> None:
    assert client.token() == "tok-1"

    (request,) = fake.requests
    assert request.method == "POST"
    assert request.url.path == TOKEN_PATH
    assert dict(request.url.params) == {"grant_type": "client_credentials"}
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    raw = request.content.decode("ascii")
    assert raw.count("&") == 1, "the & inside the secret must be percent-encoded"
    assert "%26" in raw and "%2B" in raw
    assert parse_qs(raw, strict_parsing=True) == {"client_id": [CLIENT_ID], "client_secret": [SECRET]}
    assert "Authorization" not in request.headers


def test_token_is_cached_until_issued_at_plus_expires_in_minus_60(
    client: SatusehatClient, fake: FakeSatusehat, clock: FakeClock
) -> None:
    assert client.token() == "tok-1"
    clock.now = EXPIRES_AT - 0.001
    assert client.token() == "tok-1"
    assert fake.token_calls == 1

    clock.now = EXPIRES_AT
    assert client.token() == "tok-2"
    assert fake.token_calls == 2


def test_token_expiry_counts_from_issued_at(client: SatusehatClient, fake: FakeSatusehat, clock: FakeClock) -> None:
    clock.now = ISSUED_AT_S + 10  # our clock is 10 s ahead of the server's: issued_at is the earlier reckoning
    client.token()
    clock.now = EXPIRES_AT - 0.001
    assert client.token() == "tok-1"
    clock.now = EXPIRES_AT  # 10 s before the local reckoning would have expired it
    assert client.token() == "tok-2"


@pytest.mark.parametrize(
    "issued_at",
    [
        pytest.param(None, id="missing"),
        pytest.param("not-a-number", id="garbled"),
        pytest.param("", id="empty"),
        pytest.param(str(ISSUED_AT_MS - 2 * 3600 * 1000), id="server-clock-2h-behind"),
        pytest.param(str(ISSUED_AT_MS + 10_000), id="server-clock-10s-ahead"),
    ],
)
def test_token_expiry_falls_back_to_the_local_clock(
    client: SatusehatClient, fake: FakeSatusehat, clock: FakeClock, issued_at: str | None
) -> None:
    fake.issued_at = issued_at
    start = clock.now
    client.token()
    clock.now = start + EXPIRES_IN - 60 - 0.001
    assert client.token() == "tok-1"
    clock.now = start + EXPIRES_IN - 60
    assert client.token() == "tok-2"


def test_token_without_expires_in_gets_a_short_lifetime(
    client: SatusehatClient, fake: FakeSatusehat, clock: FakeClock
) -> None:
    fake.expires_in = None  # assume 300 s (refreshed 60 s early) rather than forever
    client.token()
    clock.now = ISSUED_AT_S + 240 - 0.001
    assert client.token() == "tok-1"
    clock.now = ISSUED_AT_S + 240
    assert client.token() == "tok-2"


class CountingLock:
    """A lock that counts how many threads have asked for it, so a test can wait until all of them have."""

    def __init__(self, expected: int) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.entered = 0
        self.expected = expected
        self.all_waiting = threading.Event()

    def __enter__(self) -> CountingLock:
        with self._count_lock:
            self.entered += 1
            if self.entered >= self.expected:
                self.all_waiting.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_concurrent_callers_share_one_token_request(client: SatusehatClient, fake: FakeSatusehat) -> None:
    threads = 10
    lock = CountingLock(threads)
    client._token_lock = lock  # type: ignore[assignment]  # observe contention on the refresh lock
    # Hold the first token response until every thread is queued for the refresh lock.
    fake.before_token = lambda number: lock.all_waiting.wait(timeout=10)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        tokens = list(pool.map(lambda _: client.token(), range(threads)))

    assert lock.entered == threads, "every thread found no token and queued for the refresh"
    assert fake.token_calls == 1
    assert tokens == ["tok-1"] * threads


def bearer_of(request: httpx.Request) -> str:
    return request.headers.get("Authorization", "")


def test_401_refreshes_the_token_and_retries_once(client: SatusehatClient, fake: FakeSatusehat) -> None:
    patient = {"resourceType": "Patient", "id": "P00000000001"}
    fake.fhir = lambda request: (
        httpx.Response(401, text="Unauthorized")
        if bearer_of(request) == "Bearer tok-1"
        else json_response(200, patient)
    )

    assert client.read("Patient", "P00000000001") == patient
    assert fake.token_calls == 2
    assert [bearer_of(request) for request in fake.fhir_requests] == ["Bearer tok-1", "Bearer tok-2"]
    assert client.token() == "tok-2"
    assert fake.token_calls == 2


def test_a_second_401_raises(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(
        401, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid-access-token"}]}
    )

    with pytest.raises(FhirRejected) as caught:
        client.read("Patient", "P00000000001")

    assert caught.value.status_code == 401
    assert len(fake.fhir_requests) == 2
    assert fake.token_calls == 2
    assert "tok-" not in str(caught.value)
    assert "fresh token" in str(caught.value)


def test_concurrent_401s_refresh_the_token_once(client: SatusehatClient, fake: FakeSatusehat) -> None:
    threads = 8
    lock = CountingLock(threads)
    client._token_lock = lock  # type: ignore[assignment]
    fake.before_token = lambda number: lock.all_waiting.wait(timeout=10) if number == 1 else None
    all_stale = threading.Event()
    stale_count = [0]
    count_lock = threading.Lock()

    def fhir(request: httpx.Request) -> httpx.Response:
        if bearer_of(request) == "Bearer tok-1":
            with count_lock:
                stale_count[0] += 1
                if stale_count[0] == threads:
                    all_stale.set()
            all_stale.wait(timeout=10)  # answer 401 to all of them at once
            return httpx.Response(401)
        return json_response(200, {"resourceType": "Patient", "id": "p1"})

    fake.fhir = fhir
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda _: client.read("Patient", "p1"), range(threads)))

    assert all(result["id"] == "p1" for result in results)
    assert stale_count[0] == threads
    assert fake.token_calls == 2, "one refresh for all the threads that met the same stale token"


def test_wrong_secret_raises_authentication_rejected_without_the_secret(
    make_client: Callable[..., SatusehatClient], fake: FakeSatusehat
) -> None:
    wrong = "Wr0ng-s3cret&+value"
    client = make_client(client_secret=wrong)

    with pytest.raises(AuthenticationRejected) as caught:
        client.create(encounter())

    error = caught.value
    assert isinstance(error, Rejected) and not isinstance(error, Retryable)
    assert error.service == "satusehat"
    assert "HTTP 401" in str(error)
    assert "not able to be authenticated" in str(error)
    assert wrong not in str(error) and wrong not in repr(error.args)
    assert fake.fhir_requests == [], "no FHIR call without a token"


def test_secret_echoed_by_the_token_endpoint_is_redacted(make_client: Callable[..., SatusehatClient]) -> None:
    client = make_client(
        transport=httpx.MockTransport(
            lambda request: httpx.Response(400, text=f"invalid client_secret {SECRET} for {CLIENT_ID}")
        )
    )
    with pytest.raises(AuthenticationRejected) as caught:
        client.token()
    assert SECRET not in str(caught.value)
    assert "***" in str(caught.value)


def test_client_repr_and_settings_do_not_show_the_secret(client: SatusehatClient) -> None:
    assert SECRET not in repr(client)
    assert SECRET not in repr(vars(client))


def test_token_endpoint_500_is_retryable(make_client: Callable[..., SatusehatClient]) -> None:
    client = make_client(transport=httpx.MockTransport(lambda request: httpx.Response(500, text="Internal error")))
    with pytest.raises(UpstreamUnavailable) as caught:
        client.token()
    assert caught.value.status_code == 500
    assert "POST accesstoken" in str(caught.value)


def test_token_response_without_access_token_is_retryable(make_client: Callable[..., SatusehatClient]) -> None:
    client = make_client(transport=httpx.MockTransport(lambda request: httpx.Response(200, text="")))
    with pytest.raises(UpstreamUnavailable, match="without an access_token"):
        client.token()


def test_user_agent_is_sent_on_every_request(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(200, bundle())
    client.search("Encounter", {"identifier": "x|y"})

    assert len(fake.requests) == 2
    for request in fake.requests:
        assert request.headers["User-Agent"].startswith("satset-gateway/")
        assert request.headers["User-Agent"].endswith("(+python-httpx)")


def test_custom_user_agent(make_client: Callable[..., SatusehatClient], fake: FakeSatusehat) -> None:
    make_client(user_agent="rs-sehat/1.0").token()
    assert fake.requests[0].headers["User-Agent"] == "rs-sehat/1.0"


# --------------------------------------------------------------------------------------------------- errors


def test_operation_outcome_with_rule_number_and_expression(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(400, OUTCOME_WRONG_ORG)

    with pytest.raises(FhirRejected) as caught:
        client.create(encounter())

    error = caught.value
    assert type(error) is FhirRejected
    assert error.status_code == 400
    assert error.service == "satusehat"
    assert error.rule_numbers == (10117,)
    (issue,) = error.issues
    assert issue.severity == "error"
    assert issue.code == "value"
    assert issue.text == OUTCOME_WRONG_ORG["issue"][0]["details"]["text"]
    assert issue.expression == ("Encounter.identifier[0].system",)
    assert str(error) == (
        "SATUSEHAT rejected POST Encounter (HTTP 400): RuleNumber 10117 at Encounter.identifier[0].system: "
        "Wrong organization ID provided by system URL: http://sys-ids.kemkes.go.id/encounter/100025753"
    )
    assert "Wrong organization ID" in error.body_excerpt


def test_operation_outcome_without_rule_number(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(400, OUTCOME_PUT_MISSING_ID)

    with pytest.raises(FhirRejected) as caught:
        client.update(encounter(id="enc-1"))

    assert fake.fhir_requests[0].method == "PUT"
    assert fake.fhir_requests[0].url.path == "/fhir-r4/v1/Encounter/enc-1"
    assert caught.value.rule_numbers == ()
    assert caught.value.issues[0].text == "id is required"
    assert str(caught.value) == "SATUSEHAT rejected PUT Encounter/enc-1 (HTTP 400): id is required"


def test_plain_text_504_is_upstream_unavailable(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: httpx.Response(504, text="Gateway Timeout", headers={"Content-Type": "text/plain"})

    with pytest.raises(UpstreamUnavailable) as caught:
        client.search("ImagingStudy", {"identifier": "a|b"})

    error = caught.value
    assert error.status_code == 504
    assert error.retry_after is None
    assert error.service == "satusehat"
    assert str(error) == "SATUSEHAT unavailable for GET ImagingStudy (HTTP 504): Gateway Timeout"


def test_503_with_retry_after(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: httpx.Response(503, text="", headers={"Retry-After": "7"})
    with pytest.raises(UpstreamUnavailable) as caught:
        client.read("Encounter", "e1")
    assert caught.value.retry_after == 7.0
    assert "empty body" in str(caught.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("30", 30.0, id="seconds"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 45.0, id="http-date"),
        pytest.param("Wed, 21 Oct 2015 07:00:00 GMT", 0.0, id="http-date-in-the-past"),
        pytest.param("soon", None, id="garbled"),
    ],
)
def test_429_is_rate_limited_with_retry_after(
    client: SatusehatClient, fake: FakeSatusehat, clock: FakeClock, header: str, expected: float | None
) -> None:
    clock.now = 1445412480 - 45  # 45 s before Wed, 21 Oct 2015 07:28:00 GMT
    fake.issued_at = None
    fake.fhir = lambda request: httpx.Response(429, text="Too Many Requests", headers={"Retry-After": header})

    with pytest.raises(RateLimited) as caught:
        client.read("Encounter", "e1")

    assert caught.value.retry_after == expected
    assert caught.value.service == "satusehat"
    assert "HTTP 429" in str(caught.value)
    assert len(fake.fhir_requests) == 1, "the client does not retry; Prefect does"


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        pytest.param(httpx.ReadTimeout, UpstreamTimeout, id="read-timeout"),
        pytest.param(httpx.ConnectTimeout, UpstreamTimeout, id="connect-timeout"),
        pytest.param(httpx.PoolTimeout, UpstreamTimeout, id="pool-timeout"),
        pytest.param(httpx.ConnectError, ConnectionFailed, id="connect-error"),
        pytest.param(httpx.ReadError, ConnectionFailed, id="read-error"),
        pytest.param(httpx.RemoteProtocolError, ConnectionFailed, id="dropped-connection"),
    ],
)
def test_transport_errors_are_mapped(
    client: SatusehatClient, fake: FakeSatusehat, exception: type[httpx.TransportError], expected: type[Exception]
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exception("boom", request=request)

    fake.fhir = fail
    with pytest.raises(expected) as caught:
        client.create(encounter())

    error = caught.value
    assert isinstance(error, Retryable)
    assert error.service == "satusehat"
    assert "POST Encounter" in str(error)
    assert error.__cause__ is None and error.__context__ is None, "the httpx request (bearer inside) stays behind"
    assert "tok-1" not in str(error)


def test_token_endpoint_timeout_is_upstream_timeout(make_client: Callable[..., SatusehatClient]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = make_client(transport=httpx.MockTransport(fail), timeout=5)
    with pytest.raises(UpstreamTimeout, match=r"POST accesstoken within 5 s"):
        client.token()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(
            400,
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "processing",
                        "details": {"text": "Found resource with the same identifier (RuleNumber: 20002)"},
                    }
                ],
            },
            id="rule-20002",
        ),
        pytest.param(409, "Conflict", id="http-409"),
        pytest.param(
            400,
            {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "duplicate"}]},
            id="issue-code",
        ),
        pytest.param(422, "Found duplicate resource: Encounter", id="text"),
    ],
)
def test_duplicates_are_recognised(client: SatusehatClient, fake: FakeSatusehat, status: int, body: object) -> None:
    fake.fhir = lambda request: (
        json_response(status, body) if isinstance(body, dict) else httpx.Response(status, text=str(body))
    )
    with pytest.raises(DuplicateResource) as caught:
        client.create(encounter())
    assert caught.value.status_code == status
    assert "as a duplicate" in str(caught.value)


def test_not_found_is_a_plain_rejection(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(
        404,
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "not-found",
                    "details": {"text": "Resource not found (RuleNumber: 20007)"},
                }
            ],
        },
    )
    with pytest.raises(FhirRejected) as caught:
        client.read("Encounter", "nope")
    assert type(caught.value) is FhirRejected
    assert caught.value.rule_numbers == (20007,)
    assert str(caught.value) == "SATUSEHAT rejected GET Encounter/nope (HTTP 404): RuleNumber 20007: Resource not found"


def test_non_json_success_body_is_retryable(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: httpx.Response(200, text="<html>maintenance</html>")
    with pytest.raises(UpstreamUnavailable, match="no JSON object"):
        client.read("Encounter", "e1")


# ----------------------------------------------------------------------------------------------- requests


def test_create_posts_json_with_the_bearer(client: SatusehatClient, fake: FakeSatusehat) -> None:
    resource = encounter()
    fake.fhir = lambda request: json_response(201, {**json.loads(request.content), "id": "enc-1"})

    created = client.create(resource)

    assert created["id"] == "enc-1"
    (request,) = fake.fhir_requests
    assert request.method == "POST"
    assert str(request.url) == f"{FHIR_BASE}/Encounter"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == "Bearer tok-1"
    assert json.loads(request.content) == resource


def test_create_without_body_reads_the_location(client: SatusehatClient, fake: FakeSatusehat) -> None:
    def fhir(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, headers={"Location": f"{FHIR_BASE}/Encounter/enc-9/_history/1"})
        return json_response(200, encounter(id="enc-9"))

    fake.fhir = fhir
    assert client.create(encounter())["id"] == "enc-9"
    assert fake.fhir_requests[1].url.path == "/fhir-r4/v1/Encounter/enc-9"


def test_update_needs_an_id(client: SatusehatClient, fake: FakeSatusehat) -> None:
    with pytest.raises(ValueError, match="id"):
        client.update(encounter())
    assert fake.requests == []


def test_read_rejects_ids_that_would_change_the_path(client: SatusehatClient, fake: FakeSatusehat) -> None:
    with pytest.raises(ValueError):
        client.read("Encounter", "../Patient/1")
    assert fake.requests == []


def test_search_accepts_repeated_parameters(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(200, bundle())
    result = client.search("Observation", [("code", "24648-8"), ("code", "11525-3"), ("_count", "5")])
    assert result["resourceType"] == "Bundle"
    assert fake.fhir_requests[0].url.params.get_list("code") == ["24648-8", "11525-3"]


def test_find_by_identifier_query_and_entries(client: SatusehatClient, fake: FakeSatusehat) -> None:
    newest = {"resourceType": "ServiceRequest", "id": "sr-2"}
    older = {"resourceType": "ServiceRequest", "id": "sr-1"}
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    fake.fhir = lambda request: json_response(200, bundle(newest, older, outcome))

    found = client.find_by_identifier("ServiceRequest", f"http://sys-ids.kemkes.go.id/acsn/{ORG_ID}", "CT,2024|01")

    assert found == [newest, older]
    params = fake.fhir_requests[0].url.params
    assert params["identifier"] == f"http://sys-ids.kemkes.go.id/acsn/{ORG_ID}|CT\\,2024\\|01"
    assert params["_sort"] == "-_lastUpdated"


def test_find_by_identifier_with_no_match(client: SatusehatClient, fake: FakeSatusehat) -> None:
    fake.fhir = lambda request: json_response(200, bundle())
    assert client.find_by_identifier("Encounter", ENCOUNTER_SYSTEM, "X") == []


# --------------------------------------------------------------------------------------------- adoption


def adopting_server(
    fake: FakeSatusehat, *, existing: list[dict[str, Any]], post: Callable[[httpx.Request], httpx.Response]
) -> None:
    def fhir(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return json_response(200, bundle(*existing))
        return post(request)

    fake.fhir = fhir


def test_create_or_adopt_adopts_the_newest_match_without_posting(client: SatusehatClient, fake: FakeSatusehat) -> None:
    older = encounter(id="enc-old", meta={"lastUpdated": "2024-01-01T10:00:00+07:00"})
    newer = encounter(id="enc-new", meta={"lastUpdated": "2024-01-01T03:30:00+00:00"})  # 10:30 WIB
    adopting_server(fake, existing=[older, newer], post=lambda request: pytest.fail("must not POST"))

    result = client.create_or_adopt(encounter())

    assert result == CreateResult(resource_type="Encounter", id="enc-new", adopted=True, resource=newer)
    (search,) = fake.fhir_requests
    assert search.url.params["identifier"] == f"{ENCOUNTER_SYSTEM}|VISIT-0001"


def test_create_or_adopt_creates_when_nothing_matches(client: SatusehatClient, fake: FakeSatusehat) -> None:
    adopting_server(fake, existing=[], post=lambda request: json_response(201, encounter(id="enc-1")))

    result = client.create_or_adopt(encounter())

    assert result.adopted is False
    assert result.id == "enc-1"
    assert [request.method for request in fake.fhir_requests] == ["GET", "POST"]


def test_duplicate_post_is_adopted(client: SatusehatClient, fake: FakeSatusehat) -> None:
    existing = encounter(id="enc-1")
    duplicate = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "duplicate", "details": {"text": "Found duplicate resource: Encounter"}}
        ],
    }
    adopting_server(fake, existing=[existing], post=lambda request: json_response(400, duplicate))

    result = client.create_or_adopt(encounter(), search_first=False)

    assert result == CreateResult(resource_type="Encounter", id="enc-1", adopted=True, resource=existing)
    assert [request.method for request in fake.fhir_requests] == ["POST", "GET"]


def test_duplicate_without_a_match_is_raised(client: SatusehatClient, fake: FakeSatusehat) -> None:
    adopting_server(fake, existing=[], post=lambda request: httpx.Response(409, text="duplicate"))

    with pytest.raises(DuplicateResource):
        client.create_or_adopt(encounter(), search_first=False)
    assert [request.method for request in fake.fhir_requests] == ["POST", "GET"]


def test_create_or_adopt_uses_the_identifier_with_the_given_system(
    client: SatusehatClient, fake: FakeSatusehat
) -> None:
    acsn_system = f"http://sys-ids.kemkes.go.id/acsn/{ORG_ID}"
    order = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {"system": f"http://sys-ids.kemkes.go.id/servicerequest/{ORG_ID}", "value": "ORDER-1"},
            {"use": "usual", "system": acsn_system, "value": "ACC0001"},
        ],
    }
    adopting_server(fake, existing=[], post=lambda request: json_response(201, {**order, "id": "sr-1"}))

    client.create_or_adopt(copy.deepcopy(order), identifier_system=acsn_system)

    assert fake.fhir_requests[0].url.params["identifier"] == f"{acsn_system}|ACC0001"
    with pytest.raises(ValueError, match="identifier with system"):
        client.create_or_adopt(order, identifier_system="http://elsewhere")


def test_create_or_adopt_needs_an_identifier(client: SatusehatClient, fake: FakeSatusehat) -> None:
    with pytest.raises(ValueError, match="needs an identifier"):
        client.create_or_adopt({"resourceType": "Encounter", "status": "arrived"})
    assert fake.requests == []


# ------------------------------------------------------------------------------------------- rate limits


class RecordingSleep:
    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


def test_rate_limiter_spaces_acquisitions() -> None:
    clock = FakeClock(0.0)
    sleep = RecordingSleep(clock)
    limiter = RateLimiter(4.0, burst=1, clock=clock, sleep=sleep)

    for _ in range(4):
        limiter.acquire()

    assert sleep.calls == [0.25, 0.25, 0.25]
    assert clock.now == pytest.approx(0.75)


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    clock = FakeClock(0.0)
    sleep = RecordingSleep(clock)
    limiter = RateLimiter(2.0, burst=3, clock=clock, sleep=sleep)

    for _ in range(3):
        limiter.acquire()
    assert sleep.calls == []
    limiter.acquire()
    assert sleep.calls == [0.5]

    clock.now += 10  # idle: the bucket refills, but never beyond the burst
    for _ in range(3):
        limiter.acquire()
    assert sleep.calls == [0.5]
    limiter.acquire()
    assert sleep.calls == [0.5, 0.5]


def test_rate_limiter_gives_concurrent_callers_distinct_slots() -> None:
    clock = FakeClock(0.0)  # time stands still: every caller must queue behind the previous one
    waits: list[float] = []
    limiter = RateLimiter(10.0, burst=1, clock=clock, sleep=lambda seconds: None)
    callers = 20

    with ThreadPoolExecutor(max_workers=callers) as pool:
        waits = list(pool.map(lambda _: limiter.reserve(), range(callers)))

    assert sorted(waits) == pytest.approx([index / 10.0 for index in range(callers)])


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_rate_limiter_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


def test_every_request_passes_the_rate_limiter(
    make_client: Callable[..., SatusehatClient], fake: FakeSatusehat
) -> None:
    sleep = RecordingSleep()  # the limiter's clock stands still, so each request waits one more slot
    limiter = RateLimiter(2.0, burst=1, clock=lambda: 0.0, sleep=sleep)
    client = make_client(rate_limiter=limiter)
    fake.fhir = lambda request: json_response(200, {"resourceType": "Encounter", "id": "e1"})

    client.read("Encounter", "e1")
    client.read("Encounter", "e1")

    assert len(fake.requests) == 3  # token + 2 reads
    assert sleep.calls == [0.5, 1.0]


def test_max_requests_per_second_builds_a_limiter(make_client: Callable[..., SatusehatClient]) -> None:
    limiter = make_client(max_requests_per_second=5).rate_limiter
    assert limiter is not None and limiter.rate_per_second == 5.0
    assert make_client().rate_limiter is None
    with pytest.raises(ValueError, match="not both"):
        make_client(max_requests_per_second=5, rate_limiter=RateLimiter(1))


# ------------------------------------------------------------------------------------------ construction


def test_from_settings(fake: FakeSatusehat) -> None:
    from models.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DCM4CHEE_URL="http://pacs:8080/dcm4chee-arc/aets/DCM4CHEE/rs",
        ROUTER_IP="10.0.0.5",
        SS_AUTH_URL="https://ss.test/oauth2/v1/",
        SS_BASE_URL="https://ss.test/fhir-r4/v1/",
        SS_ORG_ID=ORG_ID,
        SS_CLIENT_ID=CLIENT_ID,
        SS_CLIENT_SECRET=SECRET,
        SS_MAX_RPS=50,
    )
    with SatusehatClient.from_settings(settings, transport=httpx.MockTransport(fake)) as client:
        assert client.fhir_base == FHIR_BASE
        assert client.org_id == ORG_ID
        assert client.rate_limiter is not None and client.rate_limiter.rate_per_second == 50
        assert client.token() == "tok-1"  # the SecretStr reached the form body intact
    with pytest.raises(RuntimeError):
        client.read("Encounter", "e1")  # the pool was closed on leaving the block


def test_closed_client_refuses_requests(client: SatusehatClient) -> None:
    client.close()
    with pytest.raises(RuntimeError):
        client.token()


def test_debug_log_lines_carry_no_token_or_secret(
    client: SatusehatClient, fake: FakeSatusehat, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="clients.satusehat")
    fake.fhir = lambda request: json_response(200, bundle())

    client.find_by_identifier("Encounter", ENCOUNTER_SYSTEM, "VISIT-0001")

    text = caplog.text
    assert "POST /oauth2/v1/accesstoken?grant_type=client_credentials -> 200" in text
    assert "GET /fhir-r4/v1/Encounter?identifier=" in text and "-> 200" in text
    assert "tok-1" not in text
    assert SECRET not in text and "s3cr" not in text


# ------------------------------------------------------------------------------------------ pure helpers


def test_parse_operation_outcome_tolerates_odd_shapes() -> None:
    assert parse_operation_outcome({"resourceType": "Bundle"}) == ()
    assert parse_operation_outcome({"resourceType": "OperationOutcome", "issue": "nope"}) == ()
    (issue,) = parse_operation_outcome(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                "garbage",
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": "bad date RuleNumber: 10360",
                    "location": ["x"],
                },
            ],
        }
    )
    assert issue.rule_number == 10360
    assert issue.expression == ("x",)
    assert issue.text == "bad date RuleNumber: 10360"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("0", 0.0), ("-5", 0.0), ("1.5", 1.5), ("nan", None), ("Tue, 1 Jan 2099", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=0.0) == expected


# ------------------------------------------------------------------------------------------- request window


def test_request_window_holds_a_place_from_sending_until_a_window_after_the_answer() -> None:
    clock = FakeClock(0.0)
    window = RequestWindow(2, 1.0, clock=clock)

    assert window.try_acquire() == 0.0
    assert window.try_acquire() == 0.0
    assert window.try_acquire() == math.inf  # both in flight: only an answer can free a place
    clock.now = 0.3
    window.release()
    assert window.try_acquire() == pytest.approx(1.0)  # the answer at 0.3 holds its place until 1.3
    clock.now = 1.3
    assert window.try_acquire() == 0.0
    assert window.held == 2


def test_request_window_caps_arrivals_in_any_window_whatever_the_delays() -> None:
    """Requests arriving at the upstream at any moment between sending and answer: never more than the limit in a
    window, however the transit delays bunch them (the property the token bucket alone lacks)."""
    import random

    rng = random.Random(7)
    clock = FakeClock(0.0)
    window = RequestWindow(5, 1.0, clock=clock)
    in_flight: list[tuple[float, float]] = []  # (answer time, arrival time)
    arrivals: list[float] = []
    for _ in range(400):
        clock.now += rng.uniform(0.0, 0.05)
        for answered, _arrival in sorted(in_flight):
            if answered <= clock.now:
                in_flight.remove((answered, _arrival))
                saved, clock.now = clock.now, answered
                window.release()
                clock.now = saved
        if window.try_acquire() == 0.0:
            latency = rng.uniform(0.01, 0.4)
            arrival = clock.now + rng.uniform(0.0, latency)
            arrivals.append(arrival)
            in_flight.append((clock.now + latency, arrival))
    arrivals.sort()
    busiest = max(sum(1 for a in arrivals if start <= a < start + 1.0) for start in arrivals)
    assert len(arrivals) > 30
    assert busiest <= 5


def test_request_window_blocks_concurrent_callers_until_places_free() -> None:
    window = RequestWindow(3, 0.05)
    sent: list[float] = []
    lock = threading.Lock()

    def request(_: int) -> None:
        window.acquire()
        try:
            with lock:
                sent.append(time.monotonic())
        finally:
            window.release()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(request, range(9)))

    assert len(sent) == 9
    assert window.held <= 3


def test_request_window_per_second_and_nonsense() -> None:
    assert (RequestWindow.per_second(80).limit, RequestWindow.per_second(80).window_s) == (80, 1.0)
    assert (RequestWindow.per_second(0.5).limit, RequestWindow.per_second(0.5).window_s) == (1, 2.0)
    assert RequestWindow.per_second(2.5).window_s == pytest.approx(0.8)
    for bad in (lambda: RequestWindow(0), lambda: RequestWindow(1, 0), lambda: RequestWindow.per_second(0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(RuntimeError):
        RequestWindow(1).release()


def test_max_requests_per_second_also_caps_requests_per_window(
    make_client: Callable[..., SatusehatClient], fake: FakeSatusehat
) -> None:
    client = make_client(max_requests_per_second=50)
    assert client.request_window is not None and client.request_window.limit == 50
    assert make_client().request_window is None
    fake.fhir = lambda request: json_response(200, {"resourceType": "Encounter", "id": "e1"})

    client.read("Encounter", "e1")

    assert client.request_window.held == 2  # the token and the read, answered within the last second
