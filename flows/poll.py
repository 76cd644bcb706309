"""poll-ris: work the RIS order table. Claim due orders, run each one's batch flow, write the outcome back.

    claim up to POLL_BATCH_SIZE ──► batch1–4 as subflows, POLL_CONCURRENCY at a time ──► done / failed / dead

Run on a schedule (one deployment, or several pollers on several hosts: claims are atomic, see clients/ris.py).
Each order is its own subflow run, named by its ACSN, so the UI shows every exam; the poll run's artifact holds
counts only. With POLL_ORDER_RUNS=task an order is one task run of the poll run instead (same name, the steps as
plain calls inside it, retried with the order): a few times less work for the Prefect server per order, for
draining backlogs (see models/settings.py and bench/RESULTS.md, item 4). One order's failure never stops the
others. What is recorded:

* success: the ids the batch created or adopted, status done;
* BatchFailed: its message (the step, the cause, the ids so far; never a patient name), retried later with
  backoff unless the cause is Rejected (the platform or the PACS refused the request: retrying cannot help → dead);
* a stored payload that no longer validates, is not a JSON object, crashes a validator (an OverflowError from a
  date at the calendar's edge) or is too large to be a run's parameters: dead, with the field named (an operator
  fixes the order);
* anything else (a bug, a crash inside Prefect): failed and retried, as nothing says a retry is useless; recorded
  by its type (and HTTP status), never its text, which may quote the payload.

Rows the claim cannot hand out (a column Python cannot read; attempts used up, e.g. by a poller that crashed on
every attempt) are made dead by the claim itself and counted here as claimed and dead (clients/ris.py).

While an order runs, its lease is renewed every third of ORDER_LEASE_S, so only a poller that stopped (crash,
hang, lost network) hands its orders to another. Re-running a batch is safe: every step adopts what exists.
"""

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

import httpx
from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from pydantic import Field, ValidationError

from clients.errors import Rejected, Retryable
from flows.batches import batch1, batch2, batch3, batch4, light_steps, run_batch1, run_batch2, run_batch3, run_batch4
from flows.steps import BatchFailed
from models.orders import DEAD, DONE, FAILED, InvalidOrder, RadiologyOrder, describe_invalid, order_input
from models.settings import RisSettings, load_settings
from tasks.artifacts import publish_summary
from tasks.events import order_dead
from tasks.retry import FHIR_RETRIES, FHIR_RETRY_DELAYS_S, JITTER
from tasks.ris import claim_work, complete_order, fail_order, renew_lease

LOST: Final = "lost"
"""An outcome that could not be written: the claim passed to another worker, or the database stayed away.
The order is then finished by whoever holds it, or claimed again when its lease runs out."""

BATCH_FLOWS: Final[dict[int, Callable[[Any], Awaitable[dict[str, Any]]]]] = {
    1: batch1,
    2: batch2,
    3: batch3,
    4: batch4,
}

BATCH_BODIES: Final[dict[int, Callable[..., Awaitable[dict[str, Any]]]]] = {
    1: run_batch1,
    2: run_batch2,
    3: run_batch3,
    4: run_batch4,
}

MIN_RENEW_INTERVAL_S = 0.2


def retry_when_step_retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry predicate of a light-mode order: its step failed on something a later attempt may survive."""
    return isinstance(state.data, BatchFailed) and isinstance(state.data.cause, Retryable)


@task(
    name="run-order",
    task_run_name="batch{batch} {accession_number}",
    retries=FHIR_RETRIES,
    retry_delay_seconds=FHIR_RETRY_DELAYS_S,
    retry_jitter_factor=JITTER,
    retry_condition_fn=retry_when_step_retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def run_order(batch: int, accession_number: str, payload: Any) -> dict[str, Any]:
    """One order in light mode: the batch's steps inside this one task run (the payload is never persisted)."""
    return await BATCH_BODIES[batch](payload, light_steps())


def worker_id() -> str:
    """Who holds a claim: host and process for the operator, a random suffix so two runs never share one."""
    return f"{socket.gethostname()[:80]}-{os.getpid()}-{secrets.token_hex(4)}"


@flow(name="poll-ris", validate_parameters=True)
async def poll_ris(
    batch_size: Annotated[int, Field(ge=1, le=1000)] | None = None,
    concurrency: Annotated[int, Field(ge=1, le=64)] | None = None,
) -> dict[str, int]:
    """Claim due RIS orders and run them; returns {claimed, done, failed, dead, lost}.

    `batch_size` and `concurrency` override POLL_BATCH_SIZE and POLL_CONCURRENCY for this run.
    """
    logger = get_run_logger()
    settings = load_settings(RisSettings)
    worker = worker_id()
    started = time.monotonic()
    claim = await claim_work(worker, batch_size or settings.poll_batch_size)
    orders = claim.orders
    claimed_s = time.monotonic() - started
    logger.info("worker %s claimed %d order(s)", worker, len(orders))
    for accession, reason in claim.dead:
        logger.warning("order %s dead at its claim: %s", accession, reason)
        order_dead(accession, None, reason)  # the alert (satset alerts) an operator acts on

    limit = asyncio.Semaphore(concurrency or settings.poll_concurrency)
    renew_every_s = max(settings.order_lease_s / 3, MIN_RENEW_INTERVAL_S)
    light = settings.poll_order_runs == "task"
    outcomes = await asyncio.gather(*(_run_order(order, worker, limit, renew_every_s, light) for order in orders))

    outcomes += [DEAD] * len(claim.dead)
    summary = {
        "claimed": len(outcomes),
        **{status: outcomes.count(status) for status in (DONE, FAILED, DEAD, LOST)},
    }
    durations = {"claim": round(claimed_s, 3), "orders": round(time.monotonic() - started - claimed_s, 3)}
    logger.info("poll-ris %s", ", ".join(f"{key} {value}" for key, value in summary.items()))
    await publish_summary("poll-ris", None, summary, durations)
    return summary


async def _run_order(
    order: RadiologyOrder, worker: str, limit: asyncio.Semaphore, renew_every_s: float, light: bool = False
) -> str:
    """One order from claim to recorded outcome; never raises (the other orders go on)."""
    assert order.id is not None  # claimed orders come from the table
    async with limit:
        finished = asyncio.Event()
        renewing = asyncio.create_task(_keep_lease(order, worker, renew_every_s, finished))
        try:
            outcome, detail = await _run_batch(order, light)
        except Exception as error:  # _run_batch answers every failure; this is the net under it
            outcome, detail = FAILED, f"poll-ris failed running the order: {type(error).__name__}"
        finally:
            finished.set()  # not cancel(): a renewal in flight completes, and no task run is left 'Crashed'
            await asyncio.gather(renewing, return_exceptions=True)
        return await _record(order, worker, outcome, detail)


async def _run_batch(order: RadiologyOrder, light: bool = False) -> tuple[str, Any]:
    """(done, ids) or (failed/dead, why): the batch's outcome, before anything is written back."""
    try:
        payload = order_input(order)
    except ValidationError as error:
        return DEAD, describe_invalid(error, f"stored batch{order.batch} payload")
    except InvalidOrder as error:
        return DEAD, str(error)
    except Exception as error:  # order_input names what it can; a stored payload that crashes it never runs
        return DEAD, f"invalid stored batch{order.batch} payload: validation failed ({type(error).__name__})"
    try:
        if light:
            return DONE, await run_order(order.batch, order.accession_number, payload)
        return DONE, await BATCH_FLOWS[order.batch](payload)
    except BatchFailed as error:
        return (DEAD if isinstance(error.cause, Rejected) else FAILED), str(error)
    except ValidationError as error:  # never the values: they are clinical data
        return FAILED, f"batch{order.batch} ended unexpectedly: {describe_invalid(error, 'data')}"
    except Exception as error:
        return FAILED, f"batch{order.batch} ended unexpectedly: {unexpected(error)}"


def unexpected(error: Exception) -> str:
    """An unexpected error for `last_error`: its type, and for an HTTP error the status and path, never the text
    (Prefect's 422 quotes the run's parameters, clinical data included)."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"{type(error).__name__}: HTTP {error.response.status_code} from {error.request.url.path}"
    return type(error).__name__


async def _record(order: RadiologyOrder, worker: str, outcome: str, detail: Any) -> str:
    logger = get_run_logger()
    assert order.id is not None
    try:
        if outcome == DONE:
            held = await complete_order(order.id, worker, detail)
            status = DONE if held else None
        else:
            status = await fail_order(order.id, worker, detail, retryable=outcome == FAILED)
    except Exception as error:
        logger.error("order %s: outcome %s not recorded: %s", order.accession_number, outcome, type(error).__name__)
        return LOST
    if status is None:
        logger.warning("order %s: claim lost to another worker; its outcome stands", order.accession_number)
        return LOST
    if status != DONE:
        logger.warning("order %s %s: %s", order.accession_number, status, detail)
    if status == DEAD:
        order_dead(order.accession_number, order.batch, str(detail), attempts=order.attempts)
    return status


async def _keep_lease(order: RadiologyOrder, worker: str, every_s: float, finished: asyncio.Event) -> None:
    """Renew the lease every `every_s` until the batch has `finished` or the claim is gone."""
    assert order.id is not None
    while True:
        try:
            await asyncio.wait_for(finished.wait(), timeout=every_s)
            return
        except TimeoutError:
            pass
        try:
            held = await renew_lease(order.id, worker)
        except Exception:  # the database is away: the next renewal (or the lease) decides
            continue
        if not held:
            get_run_logger().warning("order %s: lease lost; another worker may take it", order.accession_number)
            return
