"""A scanner for secrets and patient names where they must never be: logs, Prefect's records, persisted results,
the RIS table and the API's answers.

Give it the secrets of a run (client secret, tokens the platform issued, API keys, passwords) and the patient
names it used; it looks for each in the forms a leak would take, not only verbatim:

* verbatim (names case-insensitively, and also as DICOM PN `FAMILY^GIVEN` and by each name part of 5+ letters);
* URL-encoded (`%26`, `+` for spaces: a secret in a query string or a form body), JSON- and HTML-escaped;
* base64 and base64url, at any alignment: the secret inside a longer encoded string (an `Authorization: Basic`
  header of `user:password`, a pickled task result that Prefect stores base64-encoded) is found by the encoded
  core of the secret alone, for each of the three byte offsets it can start at;
* and in any base64 blob of the text, decoded (a result file's `"result": "<base64 pickle>"`), as a second pass.

Where it looks, each a method: text, bytes, files under a folder (result storage, log files, a SQLite database),
log records, a Prefect server's artifacts, logs, flow and task runs (parameters and state messages), the RIS
table's rows, and HTTP responses. A finding names the place and the form, and shows its context with the secret
itself masked, so a failing test does not print the secret it caught.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

MIN_SECRET_LENGTH = 8
"""Shorter values would match by chance; a secret that short is a problem of its own."""
MIN_NAME_PART = 5
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_DECODED_TEXT = 2 * 1024 * 1024
_BASE64_BLOB = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")


@dataclass(frozen=True)
class Form:
    """One way a needle can appear: `text` to look for, and whether case matters."""

    how: str
    text: str
    ignore_case: bool = False


@dataclass(frozen=True)
class Needle:
    label: str
    """What it is (e.g. 'client secret', 'patient name 2'): findings name this, never the value."""
    value: str
    forms: tuple[Form, ...]


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str
    needle: str
    form: str
    context: str

    def __str__(self) -> str:
        return f"{self.needle} ({self.form}) in {self.where}: …{self.context}…"


def base64_cores(value: bytes) -> list[tuple[str, str]]:
    """The base64 characters that depend on `value` alone, for each of the 3 offsets it can start at inside a
    longer encoded string, in the standard and the URL-safe alphabet."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + value + b"\0\0").decode()
        first = math.ceil(8 * offset / 6)
        last = (8 * (offset + len(value))) // 6
        core = encoded[first:last]
        if len(core) >= 8:
            cores.append((f"base64 (offset {offset})", core))
            urlsafe = core.replace("+", "-").replace("/", "_")
            if urlsafe != core:
                cores.append((f"base64url (offset {offset})", urlsafe))
    return cores


def secret_forms(value: str) -> tuple[Form, ...]:
    forms = [Form("verbatim", value)]
    for how, text in (
        ("URL-encoded", quote(value, safe="")),
        ("form-encoded", quote_plus(value, safe="")),
        ("JSON-escaped", json.dumps(value)[1:-1]),
        ("HTML-escaped", html.escape(value)),
    ):
        if text != value:
            forms.append(Form(how, text))
    forms += [Form(how, text) for how, text in base64_cores(value.encode())]
    return _unique(forms)


def name_forms(name: str) -> tuple[Form, ...]:
    parts = name.split()
    forms = [Form("verbatim", name, ignore_case=True)]
    if len(parts) >= 2:
        given, family = " ".join(parts[:-1]), parts[-1]
        forms.append(Form("DICOM PN", f"{family}^{given}", ignore_case=True))
        forms.append(Form("DICOM PN", f"{given}^{family}", ignore_case=True))
        forms.append(Form("URL-encoded", quote_plus(name), ignore_case=True))
        forms.append(Form("URL-encoded", quote(name, safe=""), ignore_case=True))
    for part in parts:
        if len(part) >= MIN_NAME_PART:
            forms.append(Form("name part", part, ignore_case=True))
    spellings = {name, name.upper(), *(f.text for f in forms if f.how == "DICOM PN"), *(f.text.upper() for f in forms)}
    for spelling in sorted(spellings):
        forms += [Form(how, text) for how, text in base64_cores(spelling.encode())]
    return _unique(forms)


def _unique(forms: Iterable[Form]) -> tuple[Form, ...]:
    seen: dict[tuple[str, bool], Form] = {}
    for form in forms:
        seen.setdefault((form.text.lower() if form.ignore_case else form.text, form.ignore_case), form)
    return tuple(seen.values())


class CapturedRecords(logging.Handler):
    """Every record emitted while installed, formatted with its exception and stack."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self._formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        try:
            self.texts.append(self._formatter.format(record))
        except Exception as error:  # a record that cannot be formatted is a bug to see, not to hide
            self.texts.append(f"{record.name} unformattable record {record.msg!r} {record.args!r}: {error}")


@contextmanager
def capture_logs(debug_loggers: Iterable[str] = ()) -> Iterator[CapturedRecords]:
    """Capture every log record of the process: on the root logger and on each logger that does not propagate
    (Prefect's run loggers), with the loggers named in `debug_loggers` lowered to DEBUG meanwhile."""
    handler = CapturedRecords()
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [
        logger for logger in manager.loggerDict.values() if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    levels = {name: logging.getLogger(name).level for name in debug_loggers}
    for logger in loggers:
        logger.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class LeakScanner:
    """The needles of one run, and everything found so far (`findings`) with what was scanned (`scanned`)."""

    secrets: Mapping[str, str]
    names: Iterable[str]
    needles: list[Needle] = field(init=False)
    findings: list[Finding] = field(default_factory=list, init=False)
    scanned: dict[str, int] = field(default_factory=dict, init=False)
    """How many items of each kind were scanned, so a test can show it did look somewhere."""

    def __post_init__(self) -> None:
        self.needles = []
        for label, value in self.secrets.items():
            if len(value) < MIN_SECRET_LENGTH:
                raise ValueError(f"{label} is shorter than {MIN_SECRET_LENGTH} characters: it would match by chance")
            self.needles.append(Needle(label, value, secret_forms(value)))
        for number, name in enumerate(self.names, 1):
            self.needles.append(Needle(f"patient name {number}", name, name_forms(name)))

    def add_secret(self, label: str, value: str) -> None:
        if value not in {n.value for n in self.needles}:
            self.needles.append(Needle(label, value, secret_forms(value)))

    # --- the core ---------------------------------------------------------------------------------------------

    def scan_text(self, where: str, text: str, *, kind: str = "text") -> list[Finding]:
        self.scanned[kind] = self.scanned.get(kind, 0) + 1
        found = self._search(where, text, kind)
        if len(text) <= MAX_DECODED_TEXT:
            # Second pass: base64 blobs decoded (a name in another casing inside an encoded pickle, say).
            hit = {finding.needle for finding in found}
            for blob in _BASE64_BLOB.finditer(text.encode("utf-8", "replace")):
                decoded = _b64decode(blob.group())
                if decoded is not None:
                    more = self._search(f"{where} (decoded base64)", decoded.decode("utf-8", "replace"), kind, hit)
                    found += more
                    hit |= {finding.needle for finding in more}
        self.findings += found
        return found

    def scan_bytes(self, where: str, data: bytes, *, kind: str = "bytes") -> list[Finding]:
        # Undecodable bytes (a pickle's opcodes) become U+FFFD; every run of text between them stays searchable.
        return self.scan_text(where, data.decode("utf-8", "replace"), kind=kind)

    def _search(self, where: str, text: str, kind: str, skip: set[str] | frozenset[str] = frozenset()) -> list[Finding]:
        found = []
        lowered: str | None = None
        for needle in self.needles:
            if needle.label in skip:
                continue
            for form in needle.forms:
                if form.ignore_case:
                    lowered = text.lower() if lowered is None else lowered
                    at = lowered.find(form.text.lower())
                else:
                    at = text.find(form.text)
                if at >= 0:
                    context = text[max(0, at - 60) : at + len(form.text) + 60]
                    context = context.replace(text[at : at + len(form.text)], f"<{needle.label}>")
                    found.append(Finding(kind, where, needle.label, form.how, " ".join(context.split())))
                    break  # one finding per needle and place is enough
        return found

    # --- the places -------------------------------------------------------------------------------------------

    def scan_files(self, root: Path, *, kind: str = "file") -> list[Finding]:
        """Every regular file under `root` (a folder or one file), as bytes."""
        found: list[Finding] = []
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                data = path.read_bytes()
            except OSError:
                continue  # removed meanwhile (a temp file, a SQLite journal)
            found += self.scan_bytes(str(path), data, kind=kind)
        return found

    def scan_records(self, captured: CapturedRecords) -> list[Finding]:
        found = []
        for number, text in enumerate(captured.texts):
            record = captured.records[number]
            found += self.scan_text(f"log record {record.name}:{record.lineno}", text, kind="log record")
        return found

    def scan_rows(self, where: str, rows: Iterable[Mapping[str, Any]]) -> list[Finding]:
        found = []
        for row in rows:
            for column, value in row.items():
                if value is None:
                    continue
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                found += self.scan_text(f"{where} column {column} (row {row.get('id', '?')})", text, kind="row value")
        return found

    def scan_response(self, where: str, status: int, headers: Mapping[str, str], body: str) -> list[Finding]:
        shown = "\n".join(f"{k}: {v}" for k, v in headers.items())
        return self.scan_text(f"API answer {where} ({status})", f"{shown}\n\n{body}", kind="API answer")

    async def scan_prefect(self, client: Any, since: Any = None, page: int = 200) -> list[Finding]:
        """Artifacts, logs, flow runs (parameters, state messages) and task runs (state messages) of the Prefect
        server `client` talks to; with `since` (an aware datetime), only what was made from then on. Logs still
        queued in this process are sent first."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterStartTime,
            LogFilter,
            LogFilterTimestamp,
        )
        from prefect.logging.handlers import APILogHandler

        await APILogHandler.aflush()  # logs travel to the server in batches: send what is queued first
        found: list[Finding] = []
        offset = 0
        while True:
            logs = await client.read_logs(
                log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=since)) if since else None,
                limit=page,
                offset=offset,
            )
            for log in logs:
                found += self.scan_text(f"Prefect log {log.name} of run {log.flow_run_id}", log.message, kind="log")
            if len(logs) < page:
                break
            offset += page
        offset = 0
        while True:
            artifacts = await client.read_artifacts(limit=page, offset=offset)
            for artifact in artifacts:
                if since is not None and artifact.created is not None and artifact.created < since:
                    continue
                text = json.dumps(
                    {"key": artifact.key, "description": artifact.description, "data": artifact.data}, default=str
                )
                found += self.scan_text(f"Prefect artifact {artifact.key} ({artifact.id})", text, kind="artifact")
            if len(artifacts) < page:
                break
            offset += page
        run_filter = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)) if since else None
        offset = 0
        while True:
            runs = await client.read_flow_runs(flow_run_filter=run_filter, limit=page, offset=offset)
            for run in runs:
                text = json.dumps(
                    {
                        "name": run.name,
                        "parameters": run.parameters,
                        "state": run.state.message if run.state else None,
                        "tags": run.tags,
                    },
                    default=str,
                )
                found += self.scan_text(f"Prefect flow run {run.name} ({run.id})", text, kind="flow run")
            if len(runs) < page:
                break
            offset += page
        offset = 0
        while True:
            tasks = await client.read_task_runs(flow_run_filter=run_filter, limit=page, offset=offset)
            for task in tasks:
                text = json.dumps({"name": task.name, "state": task.state.message if task.state else None})
                found += self.scan_text(f"Prefect task run {task.name} ({task.id})", text, kind="task run")
            if len(tasks) < page:
                break
            offset += page
        return found


def _b64decode(blob: bytes) -> bytes | None:
    text = blob.rstrip(b"=")
    if len(text) % 4 == 1:
        text = text[:-1]
    padded = text + b"=" * (-len(text) % 4)
    try:
        if b"-" in padded or b"_" in padded:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
