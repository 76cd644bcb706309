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
