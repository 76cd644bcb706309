"""pin_result_storage: the flow runs of a gateway process name their result storage, so Prefect stops asking the
server for it (and building a client for the question) in every flow run. Against the session's Prefect server."""

from __future__ import annotations

import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.filesystems import LocalFileSystem
from prefect.settings import get_current_settings

from deployments.serve import RESULT_STORAGE_BLOCK, pin_result_storage

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_without_a_named_storage_a_local_block_at_prefects_own_path_is_saved_and_named() -> None:
    with get_client(sync_client=True) as client:
        client.clear_server_default_result_storage()
    environ: dict[str, str] = {}

    slug = pin_result_storage(environ)

    assert slug == f"local-file-system/{RESULT_STORAGE_BLOCK}"
    assert environ == {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": slug}
    block = LocalFileSystem.load(RESULT_STORAGE_BLOCK)
    assert block.basepath == str(get_current_settings().results.local_storage_path)


def test_a_storage_the_operator_named_is_kept() -> None:
    environ = {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/hospital-results"}

    assert pin_result_storage(environ) == "s3-bucket/hospital-results"
    assert environ == {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/hospital-results"}


def test_the_servers_default_result_storage_block_is_the_one_named(tmp_path: object) -> None:
    name = f"server-default-{uuid.uuid4().hex[:8]}"
    block_id = LocalFileSystem(basepath=str(tmp_path)).save(name)
    with get_client(sync_client=True) as client:
        client.update_server_default_result_storage(block_id)
    try:
        environ: dict[str, str] = {}
        assert pin_result_storage(environ) == f"local-file-system/{name}"
        assert environ["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == f"local-file-system/{name}"
    finally:
        with get_client(sync_client=True) as client:
            client.clear_server_default_result_storage()
