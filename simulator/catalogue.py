"""The rule catalogue: every rule the simulator enforces, one row each, with the source it comes from.

This table is the single place a reader looks to see what the simulator refuses and why; `simulator.rules`
applies it to every resource type and `docs/simulator-rules.md` is generated from it (`python -m
simulator.catalogue > docs/simulator-rules.md`).

Numbers and descriptions come from the platform's "kamus validasi"
(https://satusehat.kemkes.go.id/platform/docs/id/api-catalogue/validasi/kamus-validasi/) as mirrored row by row
in ivanwilliammd/satusehat-integration `src/SSResponse/SSValidationError.php` (RULE_MAP; "IVW" below), and from
real OperationOutcomes in public integrations. `number=None` means the platform answers without a RuleNumber as
far as any source shows (the message is still documented). A row with `documented=False` has no public source:
it is off unless `satset simulator --strict-undocumented` asks for it, except where an issue of this project
demands it (`default=True`, said in its source).

Issue codes: the platform's own examples show `value` (rule refusals, authentication), `duplicate`; the
`format` code is used here for date/time format rules. Other codes are this simulator's choice and marked so.

This module must not import the gateway.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

IVW = "kamus validasi, via IVW-PHP SSValidationError.php RULE_MAP"
IVW_TYPES = "kamus validasi response types, via IVW-PHP SSValidationError.php RESPONSE_TYPES (no RuleNumber)"
ISSUE15 = "issue 15's probe table (satusehat.md 2)"

NOT_NULL = "Data harus terisi (tidak boleh kosong)"
CODESYSTEM = "Data harus menggunakan codesystem yang sesuai, lihat Dokumen Lampiran Standar Terminologi SATUSEHAT"
DATETIME = "Data harus menggunakan format datetime YYYY-MM-DDThh:mm:ss+00:00"


@dataclass(frozen=True)
class Rule:
    """One row: what the platform answers when a resource breaks this rule, and where that is written down."""

    key: str
    """Unique name of the row (several rows may share a platform number)."""
    number: int | None
    """The platform's RuleNumber (in `details.text` as `(RuleNumber: N)`); None: answered without one."""
    resource: str
    """Encounter, ServiceRequest, ImagingStudy, Observation, DiagnosticReport, or * for any."""
    path: str
    """The element the rule is about (FHIRPath-like, as in the OperationOutcome's expression)."""
    kind: str
    """required, code, identifier, datetime, reference, consistency, text or request."""
    text: str
    """The message (details.text before the RuleNumber); {fields} are filled per violation."""
    source: str
    code: str = "value"
    """The OperationOutcome issue.code."""
    status: int = 400
    documented: bool = True
    default: bool = True
    """Enforced without --strict-undocumented."""

    def enforced(self, strict_undocumented: bool) -> bool:
        return self.default or strict_undocumented


def _not_null(key: str, number: int | None, path: str, source: str = IVW, **extra: object) -> Rule:
    resource = path.split(".", 1)[0]
    return Rule(key, number, resource, path, "required", NOT_NULL, source, **extra)  # type: ignore[arg-type]


def _codes(key: str, number: int | None, path: str, systems: str, source: str = IVW) -> Rule:
    resource = path.split(".", 1)[0]
    text = f"{CODESYSTEM} sub-bab {path} ({systems})" + ": {detail}"
    return Rule(key, number, resource, path, "code", text, source)


def _datetime(key: str, number: int | None, path: str, source: str = IVW) -> Rule:
    resource = path.split(".", 1)[0]
    return Rule(key, number, resource, path, "datetime", DATETIME + ", got '{value}'", source, code="format")


RULES: tuple[Rule, ...] = (
    # --- Encounter ---------------------------------------------------------------------------------------
    _not_null("encounter.identifier", 10117, "Encounter.identifier"),
    Rule(
        "encounter.identifier.org",
        10117,
        "Encounter",
        "Encounter.identifier.system",
        "identifier",
        "Wrong organization ID provided by system URL: {system}",
        "real OperationOutcome, ivanwilliammd/satusehat-integration issue #18",
    ),
    _not_null("encounter.subject", 10118, "Encounter.subject"),
    _not_null("encounter.participant", 10119, "Encounter.participant.individual"),
    _not_null("encounter.location", 10120, "Encounter.location.location", IVW + "; checked per location item"),
    _not_null("encounter.period", 10121, "Encounter.period"),
    Rule(
        "encounter.period.finished",
        10121,
        "Encounter",
        "Encounter.period.end",
        "required",
        "Jika elemen Encounter.status bernilai 'finished', maka Encounter.period.start dan Encounter.period.end "
        "wajib diisi",
        IVW,
    ),
    _not_null("encounter.statusHistory", 10122, "Encounter.statusHistory"),
    _not_null("encounter.period.start", 10123, "Encounter.period.start"),
    _not_null("encounter.serviceProvider", 10124, "Encounter.serviceProvider"),
    Rule(
        "encounter.period.end",
        10173,
        "Encounter",
        "Encounter.period.end",
        "datetime",
        DATETIME + " dan value lebih dari value pada path Encounter.period.start",
        IVW,
        code="format",
    ),
    # --- ServiceRequest ----------------------------------------------------------------------------------
    _codes("servicerequest.bodySite", 10059, "ServiceRequest.bodySite", "http://snomed.info/sct"),
    _codes("servicerequest.code", 10060, "ServiceRequest.code", "icd-9-cm, loinc, snomed, kemkes examination"),
    _codes("servicerequest.intent", 10063, "ServiceRequest.intent", "http://hl7.org/fhir/request-intent"),
    _codes("servicerequest.status", 10065, "ServiceRequest.status", "http://hl7.org/fhir/request-status"),
    _not_null("servicerequest.status.required", 10065, "ServiceRequest.status"),
    _not_null("servicerequest.subject", 10141, "ServiceRequest.subject"),
    _not_null("servicerequest.encounter", 10142, "ServiceRequest.encounter"),
    _not_null(
        "servicerequest.requester",
        10376,
        "ServiceRequest.requester",
        IVW + " ('Practitioner/{practitioner-ihs-number}')",
    ),
    _not_null(
        "servicerequest.performer",
        10377,
        "ServiceRequest.performer",
        IVW + "; field_notes.md: a production integration fills it with the Organization, so any registered "
        "Practitioner or Organization is accepted",
    ),
    Rule(
        "servicerequest.identifier",
        10415,
        "ServiceRequest",
        "ServiceRequest.identifier.system",
        "identifier",
        "Data harus menggunakan codesystem http://sys-ids.kemkes.go.id/servicerequest/{org} dengan {org} adalah "
        "Organization ID faskes, got {system}",
        IVW + "; an order carrying only the ACSN identifier is accepted (a production integration posts it)",
    ),
    _codes(
        "servicerequest.orderDetail",
        10427,
        "ServiceRequest.orderDetail",
        "DCM, http://sys-ids.kemkes.go.id/ae-title, snomed",
    ),
    _datetime("servicerequest.occurrenceDateTime", 10360, "ServiceRequest.occurrenceDateTime"),
    _datetime("servicerequest.authoredOn", 10361, "ServiceRequest.authoredOn"),
    _not_null(
        "servicerequest.code.required",
        None,
        "ServiceRequest.code",
        "undocumented: no public source says ServiceRequest.code is required (FHIR has it 0..1)",
        documented=False,
        default=False,
    ),
    Rule(
        "servicerequest.identifier.own",
        None,
        "ServiceRequest",
        "ServiceRequest.identifier",
        "identifier",
        "ServiceRequest.identifier with system http://sys-ids.kemkes.go.id/servicerequest/{org} is required",
        "undocumented: the simulator's former rule; an ACSN-only order is accepted by the platform (issue 15)",
        documented=False,
        default=False,
    ),
    # --- ImagingStudy ------------------------------------------------------------------------------------
    _not_null("imagingstudy.identifier", 10150, "ImagingStudy.identifier", IVW + "; the acsn/{org} identifier"),
    _not_null("imagingstudy.status", 10151, "ImagingStudy.status"),
    _not_null("imagingstudy.modality", 10152, "ImagingStudy.modality"),
    _not_null("imagingstudy.subject", 10153, "ImagingStudy.subject"),
    _not_null("imagingstudy.basedOn", 10154, "ImagingStudy.basedOn"),
    _datetime("imagingstudy.started", 10424, "ImagingStudy.started"),
    # --- Observation -------------------------------------------------------------------------------------
    _codes("observation.status", 10008, "Observation.status", "http://hl7.org/fhir/observation-status"),
    _not_null("observation.status.required", 10008, "Observation.status", IVW + " (status rule); " + ISSUE15),
    _codes(
        "observation.category",
        10009,
        "Observation.category",
        "http://terminology.hl7.org/CodeSystem/observation-category",
    ),
    _not_null("observation.category.required", 10009, "Observation.category", IVW + " (category rule); " + ISSUE15),
    _codes("observation.code", 10010, "Observation.code", "loinc, snomed, kemkes examination"),
    _codes("observation.bodySite", 10011, "Observation.bodySite", "http://snomed.info/sct"),
    _not_null("observation.subject", 10129, "Observation.subject"),
    _not_null("observation.encounter", 10130, "Observation.encounter"),
    _datetime("observation.effectiveDateTime", 10295, "Observation.effectiveDateTime"),
    _datetime("observation.issued", 10296, "Observation.issued"),
    Rule(
        "observation.performer",
        10383,
        "Observation",
        "Observation.performer",
        "required",
        "Path Observation.performer wajib terisi dengan Reference yang merujuk pada data Practitioner",
        IVW,
    ),
    Rule(
        "observation.identifier",
        10441,
        "Observation",
        "Observation.identifier.system",
        "identifier",
        "Data harus menggunakan codesystem http://sys-ids.kemkes.go.id/observation/{org} dengan {org} adalah "
        "Organization ID faskes, got {system}",
        IVW + "; checked when an identifier is sent",
    ),
    # --- DiagnosticReport --------------------------------------------------------------------------------
    _codes("diagnosticreport.code", 10071, "DiagnosticReport.code", "kemkes examination, loinc"),
    _codes("diagnosticreport.status", 10072, "DiagnosticReport.status", "http://hl7.org/fhir/diagnostic-report-status"),
    _codes("diagnosticreport.category", 10073, "DiagnosticReport.category", "v2-0074"),
    _codes(
        "diagnosticreport.conclusionCode",
        10074,
        "DiagnosticReport.conclusionCode",
        "loinc, snomed, v3-ObservationInterpretation, kemkes examination",
    ),
    _not_null("diagnosticreport.subject", 10144, "DiagnosticReport.subject"),
    _not_null("diagnosticreport.encounter", 10145, "DiagnosticReport.encounter"),
    _not_null("diagnosticreport.issued.required", 10359, "DiagnosticReport.issued", IVW + " (issued rule); " + ISSUE15),
    _datetime("diagnosticreport.issued", 10359, "DiagnosticReport.issued"),
    _datetime("diagnosticreport.effectiveDateTime", 10379, "DiagnosticReport.effectiveDateTime"),
    Rule(
        "diagnosticreport.performer",
        10384,
        "DiagnosticReport",
        "DiagnosticReport.performer",
        "required",
        "Path DiagnosticReport.performer wajib dikirim dan merujuk pada resource Practitioner yang sudah dikirim "
        "sebelumnya",
        IVW + "; an Organization alone does not satisfy it",
    ),
    _not_null("diagnosticreport.result", 10385, "DiagnosticReport.result"),
    _not_null("diagnosticreport.basedOn", 10387, "DiagnosticReport.basedOn"),
    Rule(
        "diagnosticreport.identifier",
        10432,
        "DiagnosticReport",
        "DiagnosticReport.identifier",
        "identifier",
        "Data Diagnostic Report Radiologi harus menggunakan codesystem "
        "http://sys-ids.kemkes.go.id/diagnostic/{org}/rad (Laboratorium: .../lab)",
        IVW,
    ),
    # --- any resource ------------------------------------------------------------------------------------
    Rule(
        "any.code.unknown",
        None,
        "*",
        "*.coding",
        "code",
        "Code not found: {detail}",
        IVW_TYPES + " 'Code not found'; used where no per-element rule exists (Encounter.class, "
        "participant.type, identifier.type, statuses of Encounter and ImagingStudy)",
    ),
    Rule(
        "any.datetime.format",
        None,
        "*",
        "*.dateTime",
        "datetime",
        "Invalid date time format: {path} must be YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz, "
        "got '{value}'",
        IVW_TYPES + " 'Invalid date time format'; the forms from the ImagingStudy/ServiceRequest docs (satusehat.md "
        "1.5); used where no per-element rule exists",
        code="format",
    ),
    Rule(
        "any.datetime.early",
        None,
        "*",
        "*.dateTime",
        "datetime",
        "Invalid date time value: {path} must not be earlier than 2014-06-03",
        IVW_TYPES + " 'Invalid date time value'; docs: 'tidak bisa kurang dari 03 Juni 2014' (satusehat.md 1.5)",
    ),
    Rule(
        "any.datetime.future",
        None,
        "*",
        "*.dateTime",
        "datetime",
        "Invalid date time value: {path} must not be in the future",
        IVW_TYPES + " 'Invalid date time value' (no future dates)",
    ),
    Rule(
        "any.period.order",
        None,
        "*",
        "*.period.end",
        "datetime",
        "{path}.end must be later than {path}.start",
        "undocumented for periods other than Encounter.period (10173)",
        documented=False,
        default=False,
    ),
    Rule(
        "any.text.empty",
        10134,
        "*",
        "*",
        "text",
        "Text is empty",
        ISSUE15 + "; not found in stored sources (IVW-PHP lists 10134 as Composition.title not null); on by default "
        "because issue 15 asks for it",
        documented=False,
    ),
    Rule(
        "any.reference.not_found",
        20007,
        "*",
        "*.reference",
        "reference",
        "Resource not found {reference}",
        IVW + " 20007; Patient/Practitioner/Location/Organization are resolved in the simulator's registry, the "
        "others in its store; a malformed reference (absolute URL, empty or badly formed IHS id) is not found either",
    ),
    Rule(
        "any.reference.foreign_org",
        None,
        "*",
        "*.reference",
        "reference",
        "resource cannot be accessed due to business rule: {reference} is not this client's organization",
        "platform docs, access token page (satusehat.md 1.2): one client id, one organization",
    ),
    Rule(
        "any.subject.mismatch",
        None,
        "*",
        "*.subject",
        "consistency",
        "{path} {subject} differs from the subject of {other} ({other_subject})",
        "undocumented in stored sources; on by default because issue 14 (1) reports that SATUSEHAT refuses it",
        documented=False,
    ),
    # --- request level -----------------------------------------------------------------------------------
    Rule(
        "request.duplicate",
        20002,
        "*",
        "*.identifier",
        "request",
        "Found duplicate resource: {resource}",
        IVW + " 20002",
        code="duplicate",
    ),
    Rule("request.unreadable", 20005, "*", "*", "request", "Failed to read request payload", IVW + " 20005"),
    Rule("request.invalid_json", 20006, "*", "*", "request", "Invalid JSON Payload Format", IVW + " 20006"),
    Rule(
        "request.not_fhir",
        20008,
        "*",
        "*",
        "request",
        "Failed to unmarshal request payload: {detail}",
        IVW + " 20008 (checked with fhir.resources R4B)",
    ),
    Rule(
        "request.id_required",
        None,
        "*",
        "*.id",
        "request",
        "id is required",
        "real OperationOutcome, ivanwilliammd/satusehat-integration issue #55",
    ),
    Rule(
        "request.id_mismatch",
        None,
        "*",
        "*.id",
        "request",
        "id in the body ({body_id}) differs from the id in the URL ({url_id})",
        "undocumented; FHIR update semantics (a PUT's body id must match the URL)",
        documented=False,
    ),
    Rule(
        "request.token",
        None,
        "*",
        "Authorization",
        "request",
        "Access token is invalid or expired",
        "issue code as AGUMIL/satusehat-sdk retries on it (satusehat.md 1.2); message the simulator's",
        code="invalid-access-token",
        status=401,
    ),
    Rule(
        "request.unsupported",
        None,
        "*",
        "*",
        "request",
        "Resource type {resource} is not supported here",
        "the simulator's own limit (it models the radiology resources only)",
        code="not-supported",
        documented=False,
    ),
)

BY_KEY: dict[str, Rule] = {rule.key: rule for rule in RULES}
if len(BY_KEY) != len(RULES):  # pragma: no cover - a typo in the table
    raise RuntimeError("duplicate rule keys in the catalogue")


def rule(key: str) -> Rule:
    return BY_KEY[key]


def render_markdown(rules: Iterable[Rule] = RULES) -> str:
    """docs/simulator-rules.md: the catalogue as a table (regenerate with `python -m simulator.catalogue`)."""
    lines = [
        "# What the simulator enforces",
        "",
        "Generated from `simulator/catalogue.py` by `python -m simulator.catalogue > docs/simulator-rules.md`;",
        "do not edit by hand (a test compares this page with the generator's output).",
        "",
        "Every refusal is an OperationOutcome (HTTP 400 unless said) whose issue carries the row's `issue.code`,",
        "the element in `expression`, and `(RuleNumber: N)` at the end of `details.text` when the platform",
        "gives a number. Rows marked *strict only* apply with `satset simulator --strict-undocumented`.",
        "References to Patient, Practitioner, Location and Organization are resolved in the simulator's",
        "registry (`--registry FILE`, `POST /admin/registry`); codes of the systems in",
        "`simulator/terminology/` must be listed there. Messages are the kamus validasi's descriptions; the",
        "platform's exact response wording is publicly known only for 10117, 'id is required' and the token errors.",
        "",
        "| Rule | Resource | Element | Kind | Message | issue.code | Default | Source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rules:
        number = str(row.number) if row.number is not None else "—"
        default = ("on" if row.documented else "on (undocumented)") if row.default else "strict only"
        status = "" if row.status == 400 else f" (HTTP {row.status})"
        text = row.text.replace("|", "\\|")
        source = row.source.replace("|", "\\|")
        lines.append(
            f"| {number} | {row.resource} | `{row.path}` | {row.kind} | {text} | `{row.code}`{status} | "
            f"{default} | {source} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
