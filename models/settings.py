"""Gateway settings, read from the environment (and `.env`) under the existing gateway's names.

A hospital switching from the Flask gateway keeps its environment file: DCM4CHEE_URL, ROUTER_IP,
ROUTER_PORT, ROUTER_AET, SS_AUTH_URL, SS_BASE_URL, SS_ORG_ID, SS_CLIENT_ID, SS_CLIENT_SECRET, TEMP_DIR and
LOG_FILE mean what they meant there. Everything added since has a default that suits one gateway host.
"""

from __future__ import annotations

import re
import tempfile
from datetime import tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.timeutil import WIB, WIT, WITA

AeTitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]
"""A DICOM AE title: 1 to 16 printable ASCII characters, not all spaces (PS3.5 AE value representation)."""


S = TypeVar("S", bound=BaseSettings)

_AGENT_REFERENCE = re.compile(r"^(Organization|Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}$")


def _loinc(code: str) -> str:
    """A LOINC code with a valid check digit (models.inputs.check_loinc; imported late: inputs imports this)."""
    from models.inputs import check_loinc

    try:
        return check_loinc(code)
    except ValueError:
        raise ValueError(f"{code!r} is not a LOINC code with a valid check digit (e.g. 24648-8)") from None


class Settings(BaseSettings):
    """Where the PACS, the SATUSEHAT platform and the DICOM Router are, and how to reach them."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, frozen=True
    )

    # The PACS (dcm4chee or Orthanc), reached over DICOMweb.
    dcm4chee_url: AnyHttpUrl = Field(
        alias="DCM4CHEE_URL",
        description="DICOMweb root of the PACS, e.g. http://pacs:8080/dcm4chee-arc/aets/DCM4CHEE/rs "
        "or http://orthanc:8042/dicom-web",
    )
    pacs_username: str | None = Field(default=None, alias="PACS_USERNAME")
    pacs_password: SecretStr | None = Field(default=None, alias="PACS_PASSWORD")
    pacs_timeout_s: float = Field(default=60.0, gt=0, alias="PACS_TIMEOUT_S")

    # The SATUSEHAT DICOM Router (C-STORE SCP).
    router_ip: str = Field(alias="ROUTER_IP", min_length=1)
    router_port: int = Field(default=11112, ge=1, le=65535, alias="ROUTER_PORT")
    router_aet: AeTitle = Field(default="DCMROUTER", alias="ROUTER_AET")
    calling_aet: AeTitle = Field(default="SATSET", alias="GATEWAY_AET")
    router_max_associations: int = Field(default=4, ge=1, alias="ROUTER_MAX_ASSOCIATIONS")

    # The SATUSEHAT platform.
    ss_auth_url: AnyHttpUrl = Field(
        alias="SS_AUTH_URL", description="e.g. https://api-satusehat-stg.dto.kemkes.go.id/oauth2/v1"
    )
    ss_base_url: AnyHttpUrl = Field(
        alias="SS_BASE_URL", description="e.g. https://api-satusehat-stg.dto.kemkes.go.id/fhir-r4/v1"
    )
    ss_org_id: str = Field(alias="SS_ORG_ID", min_length=1, pattern=r"^[A-Za-z0-9-]+$")
    ss_client_id: str = Field(alias="SS_CLIENT_ID", min_length=1)
    ss_client_secret: SecretStr = Field(alias="SS_CLIENT_SECRET")
    ss_timeout_s: float = Field(default=30.0, gt=0, alias="SS_TIMEOUT_S")
    ss_max_requests_per_second: float | None = Field(default=None, gt=0, alias="SS_MAX_RPS")

    # What the hospital chose for the gaps in an order (docs/his-integration.md, "What the gateway fills in").
    service_request_performer: str | None = Field(
        default=None,
        alias="SERVICE_REQUEST_PERFORMER",
        description="ServiceRequest.performer when the HIS names none: 'Organization/<id>', 'Practitioner/<IHS>' "
        "or 'PractitionerRole/<id>'; unset = Organization/{SS_ORG_ID} (the radiology department's organisation)",
    )
    encounter_class: Literal["AMB", "IMP", "EMER"] = Field(default="AMB", alias="ENCOUNTER_CLASS")
    """Encounter.class when the HIS sends no `encounter_class`: AMB (the existing gateway's constant), IMP, EMER."""
    default_exam_code: str | None = Field(
        default=None,
        alias="DEFAULT_EXAM_CODE",
        description="LOINC code of the exam an order is for when neither the HIS body (codind_code) nor "
        "EXAM_CODE_BY_MODALITY gives one; unset = such an order is refused",
    )
    exam_code_by_modality: dict[str, str] = Field(
        default_factory=dict,
        alias="EXAM_CODE_BY_MODALITY",
        description='JSON object, DICOM modality → LOINC exam code, e.g. {"CT": "24725-4", "DX": "36643-5"}: the '
        "exam of an order without codind_code, from the PACS study's modality",
    )

    # ImagingStudy appears only after the router has processed the association.
    imaging_study_deadline_s: float = Field(default=300.0, gt=0, alias="IMAGING_STUDY_DEADLINE_S")

    # Local files.
    temp_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "satset", alias="TEMP_DIR")
    log_file: Path | None = Field(default=None, alias="LOG_FILE")

    @field_validator("ss_client_secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("service_request_performer")
    @classmethod
    def _performer_reference(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not _AGENT_REFERENCE.match(value.strip()):
            raise ValueError(
                "must be a relative reference 'Organization/<id>', 'Practitioner/<id>' or 'PractitionerRole/<id>'"
            )
        return value.strip()

    @field_validator("default_exam_code")
    @classmethod
    def _default_exam_is_loinc(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return _loinc(value.strip())

    @field_validator("exam_code_by_modality")
    @classmethod
    def _exam_table(cls, value: dict[str, str]) -> dict[str, str]:
        from models.inputs import check_modality

        table: dict[str, str] = {}
        for modality, code in value.items():
            try:
                key = check_modality(modality.strip())
            except ValueError:
                raise ValueError(f"{modality!r} is not a DICOM acquisition modality code (CID 29)") from None
            table[key] = _loinc(code.strip())
        return table

    @property
    def pacs_root(self) -> str:
        """The DICOMweb root without a trailing slash."""
        return str(self.dcm4chee_url).rstrip("/")

    @property
    def fhir_base(self) -> str:
        return str(self.ss_base_url).rstrip("/")

    @property
    def auth_base(self) -> str:
        return str(self.ss_auth_url).rstrip("/")

    # The PACS study and the router's ImagingStudy (docs/his-integration.md, "The study, checked first").
    study_timezone: Literal["Asia/Jakarta", "Asia/Makassar", "Asia/Jayapura"] = Field(
        default="Asia/Jakarta", alias="STUDY_TIMEZONE"
    )
    """The zone of the PACS's StudyDate/StudyTime: the router's `tz_name`, the modality's local time."""
    imaging_study_resend: bool = Field(default=True, alias="IMAGING_STUDY_RESEND")
    """Send the study once more when no complete ImagingStudy came within IMAGING_STUDY_DEADLINE_S (false: fail)."""
    imaging_study_resend_grace_s: float = Field(default=300.0, ge=0, alias="IMAGING_STUDY_RESEND_GRACE_S")
    """When no ImagingStudy of the study exists at all at the deadline, how much longer to wait before sending
    again: the router may still be building the first, and a re-send then makes a second ImagingStudy."""

    @property
    def study_zone(self) -> tzinfo:
        return {"Asia/Jakarta": WIB, "Asia/Makassar": WITA, "Asia/Jayapura": WIT}[self.study_timezone]


class RisSettings(BaseSettings):
    """The RIS order table and the poller: where pending exams live and how eagerly they are worked."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    ris_database_url: str = Field(
        default="sqlite:///satset-ris.db",
        alias="RIS_DATABASE_URL",
        description="SQLAlchemy URL: sqlite:///path.db, postgresql+psycopg2://user@host/db, mysql+pymysql://...",
    )
    poll_batch_size: int = Field(default=20, ge=1, le=1000, alias="POLL_BATCH_SIZE")
    poll_concurrency: int = Field(default=4, ge=1, le=64, alias="POLL_CONCURRENCY")
    poll_order_runs: Literal["flow", "task"] = Field(default="flow", alias="POLL_ORDER_RUNS")
    """How poll-ris runs each order: `flow`, a batch subflow run per order with a task run per step (every exam a
    flow run in the UI, with its artifact); `task`, one task run per order named like the subflow would be, the
    steps as plain calls inside it, retried with the order. `task` costs the Prefect server a few times less per
    order: the setting for draining backlogs (bench/RESULTS.md, item 4)."""
    order_max_attempts: int = Field(default=5, ge=1, alias="ORDER_MAX_ATTEMPTS")
    order_lease_s: float = Field(default=900.0, gt=0, alias="ORDER_LEASE_S")
    """A claimed order whose worker died becomes claimable again after this long."""
    order_retry_backoff_s: float = Field(default=60.0, gt=0, alias="ORDER_RETRY_BACKOFF_S")
    """First wait before a failed order is retried; doubles per attempt."""


class ApiSettings(BaseSettings):
    """The HIS-facing HTTP API: where it listens and who may call it."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    api_host: str = Field(default="127.0.0.1", alias="API_HOST")
    api_port: int = Field(default=8080, ge=1, le=65535, alias="API_PORT")
    api_key: SecretStr | None = Field(default=None, alias="API_KEY", description="Sent by the HIS as X-API-Key")
    api_basic_user: str | None = Field(default=None, alias="API_BASIC_USER")
    api_basic_password: SecretStr | None = Field(default=None, alias="API_BASIC_PASSWORD")
    api_auth_disabled: bool = Field(default=False, alias="API_AUTH_DISABLED")
    """Authentication is on unless this is set explicitly (never in production)."""
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024, alias="API_MAX_BODY_BYTES")
    """The largest request body accepted (413 above it). An order is a few hundred bytes of JSON."""
    api_sync_imaging_wait_s: float = Field(default=20.0, gt=0, alias="API_SYNC_IMAGING_WAIT_S")
    """How long a synchronous batch3/batch4 call waits for the router's ImagingStudy before answering 404 with
    the ids so far (the HIS sends the same body again later, or calls with ?async=true, which waits up to
    IMAGING_STUDY_DEADLINE_S in the background)."""


class LogSettings(BaseSettings):
    """LOG_FILE alone: read by every `satset` command, including those that need no other gateway setting."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, frozen=True
    )

    log_file: Path | None = Field(default=None, alias="LOG_FILE")


class SettingsError(Exception):
    """The environment does not describe a usable gateway; the message names each variable and the rule."""


def describe_validation_error(error: ValidationError, model: type[BaseSettings] = Settings) -> str:
    """Turn pydantic's report into one line per variable, by its environment name, without echoing values."""
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        field = model.model_fields.get(name)
        env_name = field.alias if field is not None and field.alias else name
        rule = "is required but not set" if item["type"] == "missing" else item["msg"]
        lines.append(f"{env_name}: {rule}")
    return "invalid gateway settings:\n  " + "\n  ".join(lines)


def load_settings(model: type[S] = Settings, **overrides: object) -> S:  # type: ignore[assignment]
    """Read settings of `model`, raising SettingsError that names every missing or malformed variable."""
    try:
        return model(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, model)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
