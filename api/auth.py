"""Who may call the HIS API: an API key (`X-API-Key`) or HTTP Basic, checked before any route runs.

Authentication is on by default. The old Flask gateway had none, so a hospital switching to us must configure a
credential (API_KEY, or API_BASIC_USER + API_BASIC_PASSWORD); without one the API refuses to start, unless
API_AUTH_DISABLED=true says on purpose that the network alone protects it.

The check is ASGI middleware rather than a FastAPI dependency so that it runs before anything else: a caller
without credentials learns nothing, not even whether its JSON parses or a path exists. Credentials are compared
as SHA-256 digests with `hmac.compare_digest`, so the time taken says nothing about how much of a guess matched,
not even its length. Open without credentials: the health check (`/api/satset/halo`) and the API documentation
(`/api/docs`, `/api/openapi.json`), which describe only what the old gateway's Swagger page already showed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from models.settings import ApiSettings, SettingsError

API_KEY_HEADER = "X-API-Key"
REALM = "satset-gateway"
MIN_API_KEY_LENGTH = 16
"""A key shorter than this can be guessed; `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."""

log = logging.getLogger("satset.api")


class ApiConfigError(SettingsError):
    """The API's own settings cannot protect it; the message names the variables to set."""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def _same(given: str, expected_digest: bytes) -> bool:
    return hmac.compare_digest(_digest(given), expected_digest)


@dataclass(frozen=True)
class Guard:
    """The configured credentials (as digests only) and the paths anyone may call."""

    api_key: bytes | None
    basic_user: bytes | None
    basic_password: bytes | None
    open_paths: frozenset[str]

    @classmethod
    def from_settings(cls, settings: ApiSettings, open_paths: Iterable[str]) -> Guard | None:
        """The guard for these settings; None when authentication is explicitly disabled.

        Raises ApiConfigError when no credential is configured (and auth is not disabled), when only half of
        the Basic pair is set, or when the API key is too short to resist guessing.
        """
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        user = settings.api_basic_user or ""
        password = settings.api_basic_password.get_secret_value() if settings.api_basic_password else ""
        problems = []
        if bool(user) != bool(password):
            missing = "API_BASIC_PASSWORD" if user else "API_BASIC_USER"
            problems.append(f"{missing} is not set: HTTP Basic needs both API_BASIC_USER and API_BASIC_PASSWORD")
        if ":" in user:
            problems.append(
                "API_BASIC_USER must not contain ':': HTTP Basic sends user:password, so everything after the first "
                "':' would be read as the password and this user could never log in"
            )
        if key and len(key) < MIN_API_KEY_LENGTH:
            problems.append(
                f"API_KEY must be at least {MIN_API_KEY_LENGTH} characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if problems:
            raise ApiConfigError("invalid HIS API settings:\n  " + "\n  ".join(problems))
        if settings.api_auth_disabled:
            return None
        if not key and not user:
            raise ApiConfigError(
                "the HIS API needs a credential: set API_KEY (sent by the HIS as X-API-Key) or "
                "API_BASIC_USER and API_BASIC_PASSWORD (HTTP Basic); or set API_AUTH_DISABLED=true to run "
                "it without authentication on a network that protects it"
            )
        return cls(
            api_key=_digest(key) if key else None,
            basic_user=_digest(user) if user else None,
            basic_password=_digest(password) if password else None,
            open_paths=frozenset(open_paths),
        )

    @property
    def schemes(self) -> list[str]:
        """The configured schemes, by their OpenAPI security scheme names."""
        return [name for name, on in (("ApiKey", self.api_key), ("Basic", self.basic_user)) if on is not None]

    def how_to(self) -> list[str]:
        """What a caller may send, in words, for the 401 body."""
        ways = []
        if self.api_key is not None:
            ways.append(f"the API key in the {API_KEY_HEADER} header")
        if self.basic_user is not None:
            ways.append("HTTP Basic credentials (Authorization: Basic ...)")
        return ways

    def challenge(self) -> str:
        """WWW-Authenticate: Basic (browsers and curl understand it), plus the API key header when configured."""
        challenges = []
        if self.basic_user is not None:
            challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self.api_key is not None:
            challenges.append(f'ApiKey realm="{REALM}", header="{API_KEY_HEADER}"')
        return ", ".join(challenges)

    def refusal(self, headers: Headers) -> str | None:
        """Why the request is refused, or None when one of the credentials it presents is valid."""
        key = headers.get(API_KEY_HEADER)
        basic = _basic_credentials(headers.get("authorization"))
        if key is None and basic is None:
            return "authentication required"
        if key is not None and self.api_key is not None and _same(key, self.api_key):
            return None
        if basic is not None and self.basic_user is not None and self.basic_password is not None:
            user_ok = _same(basic[0], self.basic_user)
            password_ok = _same(basic[1], self.basic_password)  # always compared: no early exit on the user
            if user_ok & password_ok:
                return None
        return "invalid credentials"


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header; None if absent, another scheme, or malformed."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII characters in the header itself
        return None
    user, separator, password = decoded.partition(":")
    return (user, password) if separator else None


class AuthMiddleware:
    """Answers 401 (with WWW-Authenticate) before routing unless the path is open or a credential is valid."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.guard.open_paths:
            await self.app(scope, receive, send)
            return
        reason = self.guard.refusal(Headers(scope=scope))
        if reason is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client[0] if client else "?", reason)
        detail = "send " + " or ".join(self.guard.how_to())
        response = JSONResponse(
            {"error": reason, "detail": detail},
            status_code=401,
            headers={"WWW-Authenticate": self.guard.challenge()},
        )
        await response(scope, receive, send)
