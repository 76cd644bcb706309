"""The HIS API under test: the app from `create_app` with known credentials, and an HTTP client speaking to it.

Most tests go through httpx's ASGITransport (the app in this process, flows run against the real parts of the
`gateway` fixture); tests/api/test_server.py goes through a real socket.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from models.settings import ApiSettings

API_KEY = "his-test-key-0123456789abcdef"
BASIC_USER = "his"
BASIC_PASSWORD = "his-test-password:with colon"
PATIENT_NAME = "Budi Santoso"


BATCH3 = {
    "identifier_value": "RG2023I0000175",
    "subject_id": "P10443013727",
    "individual_id": "10016869420",
    "period_start": "2025-08-01T05:57:41+00:00",
    "noacsn": "ACC20250002",
    "performer_id": "10000504193",
    "performer_value": "Tak tampak bercak",
    "conclusion_text": "Normal",
}
LINKS = {"encounter_id": "e-1", "service_request_id": "s-1", "imaging_study_id": "i-1", "observation_id": "o-1"}
DATED = {
    "/api/satset/encounter": BATCH3,
    "/api/satset/service-req": {**BATCH3, **LINKS, "requester_reference": "Practitioner/10016869420"},
    "/api/satset/observation": {**BATCH3, **LINKS},
    "/api/satset/conclusion": {**BATCH3, **LINKS},
    "/api/satset/batch1": BATCH3,
    "/api/satset/batch2": {**BATCH3, **LINKS},
    "/api/satset/batch3": BATCH3,
    "/api/satset/batch4": {**BATCH3, "study": "1.2.826.0.1.3680043.8.498.1"},
}
"""Every endpoint whose body has a date, each with a valid body (what a test changes makes it invalid)."""


def api_settings(**overrides: object) -> ApiSettings:
    """ApiSettings from these values only: no environment variable or .env file of the machine leaks in."""
    values: dict[str, object] = {
        "API_KEY": API_KEY,
        "API_BASIC_USER": BASIC_USER,
        "API_BASIC_PASSWORD": BASIC_PASSWORD,
        "API_AUTH_DISABLED": False,
        **overrides,
    }
    return ApiSettings(_env_file=None, **values)  # type: ignore[call-arg]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def app() -> FastAPI:
    return create_app(api_settings())


@pytest.fixture
async def anonymous(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends no credentials."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        yield client


@pytest.fixture
async def his(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends the API key, as a configured HIS does."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers={"X-API-Key": API_KEY}
    ) as client:
        yield client
