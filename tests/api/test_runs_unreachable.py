"""GET /api/runs/{id} while the Prefect API is unreachable: a JSON 503 like every other endpoint, not a 500."""

from __future__ import annotations

import socket

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.anyio


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_run_status_with_prefect_unreachable_is_503_with_a_json_body(his: httpx.AsyncClient) -> None:
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{closed_port()}/api"}):
        answer = await his.get("/api/runs/00000000-0000-4000-8000-000000000000")

    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == "the Prefect API could not be reached"
    assert answer.headers["Retry-After"] == "30"
