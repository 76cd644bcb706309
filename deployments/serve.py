"""Serve every gateway deployment from one process: the single-host way to run the gateway (`satset serve`).

One long-lived process registers the deployments, keeps the poller's schedule, and runs each flow run that the
UI, the HIS API or the schedule creates in a subprocess of its own, at most `limit` at a time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, MutableMapping, Sequence

from deployments.catalog import GatewayDeployment, available_deployments
from deployments.zombies import SILENT_AFTER_S, ensure_crash_automation, heartbeat_environment

DEFAULT_LIMIT = 4
"""Flow runs at once on one gateway host: each is a Python process; the DICOM Router takes 4 associations."""


RESULT_STORAGE_BLOCK = "satset-gateway-results"
"""The LocalFileSystem block `pin_result_storage` saves when nothing names a result storage."""


class ServeError(Exception):
    """The process cannot serve: the message says what to set."""


def prefect_api_url() -> str:
    """The Prefect server to register with; a gateway host never falls back to a throwaway ephemeral server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServeError(
            "PREFECT_API_URL is not set. Start a Prefect server (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`): "
            "without it runs, schedules and history would live in a temporary server that dies with this process."
        )
    return str(url)


def pin_result_storage(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Name the default result storage in PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK for the flow runs this process starts.

    Without it, every flow run asks the server for its default result storage twice, each time through a new
    synchronous client (an SSL context built, the run's event loop blocked for the request): two thirds of
    Prefect's own time in a batch4 run, and in a poll that runs orders as subflows it stalls every order at once
    (bench/RESULTS.md, item 5). Named, Prefect resolves it once per process. What is named is what Prefect would
    have used: the operator's block if PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK is set (kept), else the server's
    default result storage block, else a LocalFileSystem block (saved as RESULT_STORAGE_BLOCK) at Prefect's local
    result path. Returns the slug, or None when the server's default block has no name to give (left as it is).
    """
    from prefect.client.orchestration import get_client
    from prefect.filesystems import LocalFileSystem
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    named = environ.get("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK") or settings.results.default_storage_block
    if named:
        return named
    with get_client(sync_client=True) as client:
        server_default = client.read_server_default_result_storage().default_result_storage_block_id
        document = None if server_default is None else client.read_block_document(server_default)
    if document is not None:
        if not document.name or document.is_anonymous or document.block_type is None:
            return None
        slug = f"{document.block_type.slug}/{document.name}"
    else:
        LocalFileSystem(basepath=str(settings.results.local_storage_path)).save(RESULT_STORAGE_BLOCK, overwrite=True)
        slug = f"local-file-system/{RESULT_STORAGE_BLOCK}"
    environ["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = slug
    return slug


def prefect_ui_url() -> str | None:
    from prefect.settings import PREFECT_UI_URL

    url = PREFECT_UI_URL.value()
    return str(url).rstrip("/") if url else None


def describe(
    served: Sequence[GatewayDeployment],
    skipped: Sequence[GatewayDeployment],
    limit: int,
    poll_interval_s: int | None = None,
) -> list[str]:
    """What `satset serve` prints before it starts: each deployment, its schedule and limit, and the UI."""
    width = max((len(d.full_name) for d in served), default=0)
    lines = [f"Serving {len(served)} deployments from this process, at most {limit} flow runs at once:"]
    for deployment in served:
        lines.append(f"  {deployment.full_name:<{width}}  {_when(deployment, poll_interval_s)}")
    for deployment in skipped:
        # TODO(poller): nothing left to do once every module in the catalog exists; kept for flows in progress.
        lines.append(f"  skipped {deployment.full_name}: {deployment.entrypoint} is not in this checkout")
    ui = prefect_ui_url()
    if ui:
        lines.append(f"Prefect UI: {ui}/deployments")
    lines.append(f"A flow run whose process dies is marked Crashed within about {SILENT_AFTER_S + 5} s (heartbeats).")
    lines.append("Ctrl-C stops serving; schedules stay active and runs wait for the next `satset serve`.")
    return lines


def _when(deployment: GatewayDeployment, poll_interval_s: int | None) -> str:
    if deployment.interval_s is None:
        schedule = "on request (UI, HIS API, prefect deployment run)"
    else:
        schedule = f"every {poll_interval_s or deployment.interval_s} s"
    if deployment.concurrency is not None:
        schedule += f"; at most {deployment.concurrency.limit} at once ({deployment.concurrency.collision_strategy})"
    return schedule


def serve_gateway(
    limit: int = DEFAULT_LIMIT,
    poll_interval_s: int | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Register and serve every deployment whose flow exists, until interrupted.

    `pause_on_shutdown=False`: stopping or restarting the process must not switch the poller's schedule off
    (Prefect's default would pause it, and nothing would turn it on again).
    """
    from prefect import serve

    if limit < 1:
        raise ServeError(f"--limit must be at least 1, not {limit}")
    if poll_interval_s is not None and poll_interval_s < 1:
        raise ServeError(f"--poll-interval must be at least 1 second, not {poll_interval_s}")
    prefect_api_url()
    pin_result_storage()  # the flow runs are subprocesses of this one: they inherit the environment
    silent_after_s = heartbeat_environment()  # likewise: each run beats, and one that stops is Crashed (zombies.py)
    asyncio.run(ensure_crash_automation(silent_after_s))
    served, skipped = available_deployments()
    runner_deployments = [d.to_runner_deployment(interval_s=poll_interval_s) for d in served]
    for line in describe(served, skipped, limit, poll_interval_s):
        echo(line)
    serve(*runner_deployments, pause_on_shutdown=False, limit=limit, print_starting_message=False)
