"""`satset check`: every part the gateway talks to, tried once, quickly, before anything is created.

Each check returns a `Check` value (pynetdicom's way: outcomes as values, not exceptions): its name, whether it
passed, how long it took, what it found, and the setting to fix when it failed. Nothing here retries: a refused
connection or a wrong AE title is reported in seconds, not after the flows' retry budget. Nothing here creates a
resource anywhere: the PACS is searched, SATUSEHAT asked for a token, the router echoed, Prefect's health read,
the RIS table looked at, and a file written and removed in TEMP_DIR.

No secret, token or patient data appears in a check's text.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from clients.errors import GatewayError
from clients.pacs import PacsClient
from clients.router import RouterClient
from clients.satusehat import SatusehatClient
from models.settings import Settings

CHECK_TIMEOUT_S = 10.0
"""Each part gets this long to answer: a misconfiguration shows in seconds."""

MAX_CLOCK_SKEW_S = 60.0
"""The platform refuses times in the future; a clock this far off makes every fresh report look like one."""


@dataclass(frozen=True)
class Check:
    """One part, tried once. `setting` names what to fix when it failed (an environment variable)."""

    name: str
    ok: bool
    seconds: float
    detail: str
    setting: str = ""
    skipped: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_checks(
    settings: Settings, *, prefect_api_url: str | None, environ: Mapping[str, str] | None = None
) -> list[Check]:
    """Every check, in the order a run uses the parts; each runs even when an earlier one failed.

    `prefect_api_url` is the caller's (Prefect's own setting, from its profile or PREFECT_API_URL): this module
    stays free of Prefect."""
    env = os.environ if environ is None else environ
    checks: list[tuple[str, str, Callable[[], str]]] = [
        ("temp_dir", "TEMP_DIR", lambda: _temp_dir(settings)),
        ("pacs", "DCM4CHEE_URL, PACS_USERNAME, PACS_PASSWORD", lambda: _pacs(settings)),
        ("satusehat_token", "SS_AUTH_URL, SS_CLIENT_ID, SS_CLIENT_SECRET", lambda: _token(settings)),
        ("clock", "the host's clock (NTP)", lambda: _clock_skew(settings)),
        ("router", "ROUTER_IP, ROUTER_PORT, ROUTER_AET, GATEWAY_AET", lambda: _router(settings)),
        ("prefect_api", "PREFECT_API_URL", lambda: _prefect(prefect_api_url)),
        ("ris_database", "RIS_DATABASE_URL", lambda: _ris(env)),
    ]
    return [_timed(name, setting, check) for name, setting, check in checks]


class Skipped(Exception):
    """A part this installation does not use (e.g. no RIS table): reported, not failed."""


def _timed(name: str, setting: str, check: Callable[[], str]) -> Check:
    started = time.monotonic()
    try:
        detail = check()
    except Skipped as skipped:
        return Check(name, True, time.monotonic() - started, str(skipped), setting, skipped=True)
    except GatewayError as error:
        return Check(name, False, time.monotonic() - started, error.message, setting)
    except Exception as error:  # the check's job is to report any failure, whatever raised it
        return Check(name, False, time.monotonic() - started, f"{type(error).__name__}: {error}", setting)
    return Check(name, True, time.monotonic() - started, detail)


def _temp_dir(settings: Settings) -> str:
    settings.temp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=settings.temp_dir, prefix=".satset-check-") as probe:
        probe.write(b"ok")
        probe.flush()
    return f"{settings.temp_dir} is writable"


def _pacs(settings: Settings) -> str:
    password = settings.pacs_password.get_secret_value() if settings.pacs_password is not None else None
    with PacsClient(
        settings.pacs_root,
        username=settings.pacs_username,
        password=password,
        timeout=min(settings.pacs_timeout_s, CHECK_TIMEOUT_S),
    ) as pacs:
        found = pacs.ping()
    return f"QIDO-RS search answered ({found} study shown of a limit of 1)"


def _token(settings: Settings) -> str:
    with SatusehatClient.from_settings(settings, timeout=min(settings.ss_timeout_s, CHECK_TIMEOUT_S)) as client:
        client.token()
    return f"token issued for client of organization {settings.ss_org_id}"


def _clock_skew(settings: Settings) -> str:
    """The platform's Date header against this host's clock (any answer carries one, a 401 included)."""
    sent = time.time()
    answer = httpx.get(f"{str(settings.ss_base_url).rstrip('/')}/metadata", timeout=CHECK_TIMEOUT_S)
    received = time.time()
    stamp = answer.headers.get("date")
    if not stamp:
        raise Skipped("the platform's answer carries no Date header; clock not compared")
    platform = parsedate_to_datetime(stamp).astimezone(UTC).timestamp()
    skew = (sent + received) / 2 - platform
    if abs(skew) > MAX_CLOCK_SKEW_S + (received - sent):
        raise ValueError(
            f"this host's clock is {skew:+.0f} s off the platform's ({datetime.now(UTC):%H:%M:%S} UTC here); "
            "SATUSEHAT refuses times in the future, so set the clock (NTP)"
        )
    return f"clock within {abs(skew):.1f} s of the platform's"


def _router(settings: Settings) -> str:
    client = RouterClient.from_settings(
        settings, acse_timeout=CHECK_TIMEOUT_S, network_timeout=CHECK_TIMEOUT_S, connect_timeout=CHECK_TIMEOUT_S
    )
    outcome = client.echo()
    if outcome.ok:
        return f"C-ECHO to {outcome.router} from {settings.calling_aet}: Success"
    why = outcome.problem.reason if outcome.problem is not None else f"status 0x{outcome.status or 0:04X}"
    raise ValueError(f"C-ECHO to {outcome.router} from {settings.calling_aet} failed: {why}")


def _prefect(api_url: str | None) -> str:
    url = (api_url or "").rstrip("/")
    if not url:
        raise ValueError("PREFECT_API_URL is not set: runs need a Prefect server (see docs/deployment.md)")
    answer = httpx.get(f"{url}/health", timeout=CHECK_TIMEOUT_S)
    answer.raise_for_status()
    return f"Prefect API at {url} is healthy"


def _ris(env: Mapping[str, str]) -> str:
    from sqlalchemy import create_engine, inspect

    from models.orders import RadiologyOrder

    url = env.get("RIS_DATABASE_URL", "")
    if not url:
        raise Skipped("RIS_DATABASE_URL is not set: no RIS poller on this installation")
    engine = create_engine(url)
    try:
        with engine.connect():
            table = RadiologyOrder.__table__.name  # type: ignore[attr-defined]
            present = inspect(engine).has_table(table)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if not present:
        raise ValueError(
            f"{where} has no table {table}: the poller creates it on its first run, as does `satset orders list`"
        )
    return f"{where} reachable, table {table} present"
