"""The gateway's alerts as code: four Prefect automations, each sending to one notification block.

    order dead ─────────────── satset.order.dead (tasks/events.py, emitted by the poller)
    batch flow failed ──────── prefect.flow-run.Failed / Crashed of batch1-4, dicom-process
    poller silent ──────────── no prefect.flow-run.Completed of poll-ris within N minutes (proactive)
    ImagingStudy wait slow ─── satset.imaging-study.wait-slow (tasks/events.py, emitted by the wait)

`install_alerts` is idempotent: each automation is found by its name and updated in place (a duplicate left by
hand is deleted), so running `satset alerts install` again after an upgrade or with another block changes the
installed automations instead of adding more. The action is a notification block the hospital chooses: a generic
webhook made from a URL here, or any block it made itself in the Prefect UI (Slack, Microsoft Teams, email via
SendGrid, Telegram through a Custom Webhook, ...). Needs the Prefect server's triggers service, which also runs
the actions (on by default; PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=false would silence every alert).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final
from uuid import UUID

from tasks.events import IMAGING_STUDY_WAIT_SLOW, ORDER_DEAD

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

NAME_PREFIX: Final = "satset: "
"""Every automation this module owns starts with it: `satset alerts list/remove` touch nothing else."""

DEFAULT_BLOCK_NAME: Final = "satset-alerts"
WEBHOOK_BLOCK_TYPE: Final = "custom-webhook"
BATCH_FLOWS: Final = ("batch1", "batch2", "batch3", "batch4", "dicom-process")
POLL_FLOW: Final = "poll-ris"
DEFAULT_POLL_SILENCE: Final = timedelta(minutes=10)
"""The poller runs every minute; ten without one completed means it stopped, hangs or cannot reach the RIS."""

ORDER_DEAD_NAME: Final = NAME_PREFIX + "order dead"
BATCH_FAILED_NAME: Final = NAME_PREFIX + "batch flow failed"
POLL_SILENT_NAME: Final = NAME_PREFIX + "poller silent"
IMAGING_SLOW_NAME: Final = NAME_PREFIX + "ImagingStudy wait slow"


class AlertsError(Exception):
    """The alerts cannot be installed as asked; the message says what to change."""


@dataclass(frozen=True)
class Installed:
    """What `install_alerts` did to one automation: "created" or "updated"."""

    name: str
    id: UUID
    action: str


def gateway_automations(
    block_document_id: UUID, poll_silence: timedelta = DEFAULT_POLL_SILENCE
) -> list[AutomationCore]:
    """The four automations, each notifying through the block with this id."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    silence = _duration(poll_silence)

    def notify(subject: str, body: str) -> list[SendNotification]:
        return [SendNotification(block_document_id=block_document_id, subject=subject, body=body)]

    return [
        AutomationCore(
            name=ORDER_DEAD_NAME,
            description="An order of the RIS table went dead: fix it (satset orders edit) and redrive it.",
            trigger=EventTrigger(
                expect={ORDER_DEAD},
                match={"prefect.resource.id": "satset.order.*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify(
                "satset: order {{ event.resource.name }} is dead",
                "The batch{{ event.payload.batch }} order {{ event.resource.name }} went dead"
                "{% if event.payload.attempts %} after {{ event.payload.attempts }} attempt(s){% endif %}: "
                "{{ event.payload.reason }}\n"
                "Fix the order, then: satset orders redrive {{ event.resource.name }}\n"
                "{{ event.payload.run_url }}",
            ),
        ),
        AutomationCore(
            name=BATCH_FAILED_NAME,
            description="A run of batch1-4 or dicom-process ended Failed or Crashed.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(BATCH_FLOWS)},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify(
                "satset: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
                "The flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
                "{{ flow_run.state.message }}\n"
                "{{ flow_run|ui_url or 'flow run ' ~ flow_run.id ~ ' (set PREFECT_UI_URL on the server for a link)' }}",
            ),
        ),
        AutomationCore(
            name=POLL_SILENT_NAME,
            description=f"No poll-ris run completed for {silence}: the RIS orders are not being worked.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Completed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": POLL_FLOW},
                posture=Posture.Proactive,
                threshold=1,
                within=poll_silence,
            ),
            actions=notify(
                f"satset: the RIS poller has not completed for {silence}",
                f"No run of poll-ris completed in the last {silence}. Is `satset serve` (or the worker) running, "
                "and can it reach the RIS database and the Prefect API? `satset check` tells which part fails.",
            ),
        ),
        AutomationCore(
            name=IMAGING_SLOW_NAME,
            description="An ImagingStudy wait passed half of IMAGING_STUDY_DEADLINE_S without a complete study.",
            trigger=EventTrigger(
                expect={IMAGING_STUDY_WAIT_SLOW},
                match={"prefect.resource.id": "satset.order.*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify(
                "satset: ImagingStudy for {{ event.resource.name }} is late",
                "Waited {{ event.payload.waited_s }} s of {{ event.payload.deadline_s }} s for the DICOM Router's "
                "ImagingStudy of {{ event.resource.name }}: {{ event.payload.detail }}\n"
                "Check the router (its logs, its connection to SATUSEHAT).\n{{ event.payload.run_url }}",
            ),
        ),
    ]


def _duration(span: timedelta) -> str:
    """ "10 minutes", "1 minute", "90 seconds": as a person would say it in an alert."""
    seconds = round(span.total_seconds())
    count, unit = (seconds // 60, "minute") if seconds % 60 == 0 else (seconds, "second")
    return f"{count} {unit}{'' if count == 1 else 's'}"


def save_webhook_block(url: str, name: str = DEFAULT_BLOCK_NAME) -> UUID:
    """A Custom Webhook notification block POSTing {"subject", "body"} as JSON to `url`, saved (overwritten) as `name`.

    The URL is kept in the block's secrets (a Slack or Teams URL is a credential), so the UI shows it masked.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if not url.startswith(("http://", "https://")):
        raise AlertsError("--webhook-url must be an http:// or https:// URL")
    block = CustomWebhookNotificationBlock(
        name=name,
        url="{{webhook_url}}",
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        secrets={"webhook_url": url},  # type: ignore[arg-type]  # pydantic turns the dict into a SecretDict
    )
    return block.save(name, overwrite=True)  # type: ignore[no-any-return]


def parse_block_reference(reference: str) -> tuple[str, str]:
    """ "slack-webhook/radiology" -> ("slack-webhook", "radiology"), or AlertsError saying the expected form."""
    slug, _, name = reference.partition("/")
    if not slug or not name:
        raise AlertsError(f"--block {reference!r}: expected <block type slug>/<name>, e.g. slack-webhook/radiology")
    return slug, name


def find_notification_block(client: SyncPrefectClient, reference: str) -> UUID:
    """The id of an existing block given as "<block type slug>/<name>" (as the UI shows it); it must notify."""
    from prefect.exceptions import ObjectNotFound

    slug, name = parse_block_reference(reference)
    try:
        document = client.read_block_document_by_name(name, slug, include_secrets=False)
    except ObjectNotFound:
        raise AlertsError(f"--block {reference!r}: no such block on this Prefect server") from None
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise AlertsError(f"--block {reference!r} is not a notification block (it cannot notify)")
    return document.id


def install_alerts(automations: list[AutomationCore], client: SyncPrefectClient) -> list[Installed]:
    """Create each automation, or update the one of the same name; delete any extra copies of that name."""
    done = []
    for automation in automations:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            keep, *extra = existing
            client.update_automation(keep.id, automation)
            for duplicate in extra:
                client.delete_automation(duplicate.id)
            done.append(Installed(automation.name, keep.id, "updated"))
        else:
            done.append(Installed(automation.name, client.create_automation(automation), "created"))
    return done


def installed_alerts(client: SyncPrefectClient) -> list[tuple[str, UUID, bool]]:
    """(name, id, enabled) of every automation this module owns on the server."""
    return [(a.name, a.id, a.enabled) for a in client.read_automations() if a.name.startswith(NAME_PREFIX)]


def remove_alerts(client: SyncPrefectClient) -> list[str]:
    """Delete every automation this module owns; the notification block stays (the hospital may use it elsewhere)."""
    removed = []
    for name, automation_id, _ in installed_alerts(client):
        client.delete_automation(automation_id)
        removed.append(name)
    return removed
