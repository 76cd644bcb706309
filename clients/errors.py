"""The gateway's one exception tree: every client raises these, every retry decision reads them.

    GatewayError
    ├── Rejected                    the request itself is wrong: sending it again fails again, do not retry
    │   ├── FhirRejected            SATUSEHAT answered 4xx (OperationOutcome parsed: rule number, text, expression)
    │   │   └── DuplicateResource   the identifier is already registered (rule 20002, HTTP 409, issue code duplicate)
    │   ├── AuthenticationRejected  the token endpoint refused the client id / secret, or the PACS its login
    │   ├── StudyNotFound           the PACS holds no study for that accession number or Study Instance UID
    │   ├── AmbiguousStudy          the PACS holds several studies for one accession number: none is picked
    │   ├── InstanceRejected        the router refused an instance for a reason resending will not fix
    │   └── AssociationRejected     the router refused the association (called AE title, no common context)
    └── Retryable                   a later attempt may succeed; `retry_after` is a hint in seconds, or None
        ├── RateLimited             HTTP 429 (retry_after from the Retry-After header)
        ├── UpstreamUnavailable     HTTP 5xx, JSON or plain text, from SATUSEHAT or the PACS
        ├── UpstreamTimeout         no answer within the client's timeout
        ├── ConnectionFailed        could not connect, or the connection dropped
        ├── StoreIncomplete         an association ended with instances not confirmed by the router
        └── ImagingStudyNotReady    the router has not (yet) produced an ImagingStudy with every instance sent

Messages name the service, the operation and the rule; they never carry secrets, tokens or patient names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Service = Literal["satusehat", "pacs", "router"]


@dataclass(frozen=True)
class OutcomeIssue:
    """One `OperationOutcome.issue`, with SATUSEHAT's `RuleNumber: NNNNN` pulled out of `details.text`."""

    severity: str
    code: str
    text: str
    rule_number: int | None = None
    expression: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        where = f" at {', '.join(self.expression)}" if self.expression else ""
        return f"{self.text}{where}"


class GatewayError(Exception):
    """Base of every error the gateway's clients raise on purpose."""

    service: Service | None = None

    def __init__(self, message: str, *, service: Service | None = None) -> None:
        super().__init__(message)
        if service is not None:
            self.service = service

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable with its attributes: Prefect stores a failed run's exception and the API reads it back."""
        return (_rebuild, (type(self), self.args, self.__dict__))


class Rejected(GatewayError):
    """The request is wrong as sent; retrying it unchanged cannot succeed."""


class FhirRejected(Rejected):
    """SATUSEHAT refused a FHIR request with a 4xx status; `issues` carries the parsed OperationOutcome."""

    service: Service | None = "satusehat"

    def __init__(
        self, message: str, *, status_code: int, issues: tuple[OutcomeIssue, ...] = (), body_excerpt: str = ""
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.issues = issues
        self.body_excerpt = body_excerpt

    @property
    def rule_numbers(self) -> tuple[int, ...]:
        return tuple(issue.rule_number for issue in self.issues if issue.rule_number is not None)


class DuplicateResource(FhirRejected):
    """The resource's identifier is already registered: adopt the existing resource instead of creating one."""


class AuthenticationRejected(Rejected):
    """Credentials refused: SATUSEHAT's token endpoint (client id / secret) or the PACS (its user / password)."""

    service: Service | None = "satusehat"


class StudyNotFound(Rejected):
    """The PACS has no study matching what was asked for."""

    service: Service | None = "pacs"


class AmbiguousStudy(Rejected):
    """Several PACS studies carry the accession number; routing one at random could file images twice."""

    service: Service | None = "pacs"


class InstanceRejected(Rejected):
    """The router answered a failure status that resending the same instance will not fix."""

    service: Service | None = "router"


class AssociationRejected(Rejected):
    """The router refused the association itself: wrong called AE title, or no presentation context accepted."""

    service: Service | None = "router"


class Retryable(GatewayError):
    """A later attempt may succeed. `retry_after` (seconds) is the upstream's hint, if it gave one."""

    def __init__(self, message: str, *, service: Service | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, service=service)
        self.retry_after = retry_after


class RateLimited(Retryable):
    """HTTP 429: slow down for `retry_after` seconds."""


class UpstreamUnavailable(Retryable):
    """HTTP 5xx (including plain-text gateway errors such as a 504 'Gateway Timeout')."""

    def __init__(
        self, message: str, *, service: Service | None = None, retry_after: float | None = None, status_code: int = 0
    ) -> None:
        super().__init__(message, service=service, retry_after=retry_after)
        self.status_code = status_code


class UpstreamTimeout(Retryable):
    """The upstream did not answer within the client's timeout."""


class ConnectionFailed(Retryable):
    """The connection could not be made or was dropped."""


class StoreIncomplete(Retryable):
    """The association ended before every instance was confirmed; the whole study must be sent again."""

    service: Service | None = "router"


class ImagingStudyNotReady(Retryable):
    """No ImagingStudy for the accession number yet, or one that lists fewer instances than were sent."""

    service: Service | None = "satusehat"


def _rebuild(cls: type[GatewayError], args: tuple[Any, ...], state: dict[str, Any]) -> GatewayError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


def is_retryable(error: BaseException) -> bool:
    """True when a later attempt of the same operation may succeed (the retry predicates build on this)."""
    return isinstance(error, Retryable)
