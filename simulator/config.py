"""The simulator's own configuration.

The simulator stands in for the national platform, so it deliberately shares nothing with the gateway's
settings: it is configured like a platform (its org, its registered client, its router's AE title).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything `satset simulator` can be told; defaults suit a laptop and the tests."""

    host: str = "127.0.0.1"
    http_port: int = 0
    """0 picks a free port; the chosen one is printed when ready."""
    dicom_port: int = 0
    org_id: str = "10000004"
    """The sandbox documentation's dummy organisation id."""
    client_id: str = "satset-local-client"
    client_secret: str = field(default="satset-local-secret", repr=False)
    token_ttl_s: int = 3599
    """SATUSEHAT answers expires_in "3599"."""
    router_aet: str = "DCMROUTER"
    router_delay_s: float = 0.5
    """How long after an association's release the router's ImagingStudy appears (production is asynchronous)."""
    router_enabled: bool = True
    db_path: Path | None = None
    """SQLite file; None keeps the state in memory (tests)."""
    admin_enabled: bool = False
    """The fault-injection / inspection endpoint under /admin; off unless asked for."""
    clock_skew_s: float = 300.0
    """How far in the future a date may be before it counts as 'in the future' (clocks differ)."""
    registry_files: tuple[Path, ...] = ()
    """JSON files of Patients, Practitioners, Locations and Organizations added to the synthetic seed
    (simulator/registry.py describes the format)."""
    strict_undocumented: bool = False
    """Also enforce the catalogue rows no public source documents (simulator/catalogue.py, `default=False`)."""

    def with_ports(self, http_port: int, dicom_port: int) -> SimulatorConfig:
        return replace(self, http_port=http_port, dicom_port=dicom_port)
