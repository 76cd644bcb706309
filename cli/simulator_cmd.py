"""`satset simulator`: the local SATUSEHAT platform (OAuth2, FHIR R4, DICOM Router) for development and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from simulator.config import SimulatorConfig
from simulator.faults import HttpFault, HttpFaultKind, RouterFault
from simulator.registry import RegistryError
from simulator.server import start_simulator

_ROUTER_FAULT_HELP = (
    "Arm a DICOM Router fault at start-up: abort:AFTER[:COUNT] (abort associations after AFTER instances), "
    "status:CODE[:COUNT] (answer CODE, e.g. 0xA700, to C-STOREs) or lose:AFTER[:COUNT] (answer Success but leave "
    "the instances after AFTER out of the ImagingStudy). Repeatable."
)
_FAULT_HELP = (
    "Arm an HTTP fault at start-up, KIND:AMOUNT where KIND is 429, 500, 504, hang or lost-response "
    "and AMOUNT a count (3) or a fraction (0.05). Repeatable."
)


def simulator(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0 = a free one).")] = 8010,
    dicom_port: Annotated[int, typer.Option(help="DICOM Router port (0 = a free one).")] = 11112,
    org_id: Annotated[str, typer.Option(envvar="SIM_ORG_ID", help="The organisation id of the registered client.")] = (
        "10000004"
    ),
    client_id: Annotated[str, typer.Option(envvar="SIM_CLIENT_ID")] = "satset-local-client",
    client_secret: Annotated[str, typer.Option(envvar="SIM_CLIENT_SECRET", show_default=False)] = (
        "satset-local-secret"
    ),
    token_ttl: Annotated[int, typer.Option(help="Token lifetime in seconds.")] = 3599,
    router_aet: Annotated[str, typer.Option(help="The router's AE title; associations must call it.")] = "DCMROUTER",
    router_delay: Annotated[float, typer.Option(help="Seconds before the router's ImagingStudy appears.")] = 0.5,
    no_router: Annotated[bool, typer.Option("--no-router", help="Do not start the DICOM Router emulation.")] = False,
    db: Annotated[Path | None, typer.Option(help="SQLite file to keep state in (default: memory).")] = None,
    admin: Annotated[bool, typer.Option(help="Enable /admin (fault injection, inspection).")] = False,
    latency: Annotated[float, typer.Option(help="Seconds added to every request.")] = 0.0,
    fault: Annotated[list[str] | None, typer.Option(help=_FAULT_HELP)] = None,
    router_fault: Annotated[list[str] | None, typer.Option(help=_ROUTER_FAULT_HELP)] = None,
    registry: Annotated[
        list[Path] | None,
        typer.Option(help="JSON file of Patients/Practitioners/Locations/Organizations to register. Repeatable."),
    ] = None,
    strict_undocumented: Annotated[
        bool, typer.Option(help="Also enforce the rules no public source documents (docs/simulator-rules.md).")
    ] = False,
) -> None:
    """Run the SATUSEHAT simulator until Ctrl-C, printing its URLs when ready."""
    config = SimulatorConfig(
        host=host,
        http_port=port,
        dicom_port=dicom_port,
        org_id=org_id,
        client_id=client_id,
        client_secret=client_secret,
        token_ttl_s=token_ttl,
        router_aet=router_aet,
        router_delay_s=router_delay,
        router_enabled=not no_router,
        db_path=db,
        admin_enabled=admin,
        registry_files=tuple(registry or ()),
        strict_undocumented=strict_undocumented,
    )
    faults = [_parse_fault(spec) for spec in fault or []]
    router_faults = [_parse_router_fault(spec) for spec in router_fault or []]
    try:
        running = start_simulator(config)
    except RegistryError as error:
        raise typer.BadParameter(str(error), param_hint="--registry") from None
    running.platform.faults.latency_s = latency
    for armed in faults:
        running.platform.faults.arm_http(armed)
    for armed_router in router_faults:
        running.platform.faults.arm_router(armed_router)
    typer.echo(running.describe(), err=False)
    running.serve_until_signalled()


def _parse_router_fault(spec: str) -> RouterFault:
    """abort:AFTER[:COUNT] aborts associations after AFTER instances; status:CODE[:COUNT] answers CODE (hex ok);
    lose:AFTER[:COUNT] acknowledges the instances after AFTER and leaves them out of the ImagingStudy."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind in ("abort", "lose") and len(parts) in (1, 2):
            return RouterFault(kind=kind, after_instances=int(parts[0]), count=int(parts[1]) if len(parts) == 2 else 1)
        if kind == "status" and len(parts) in (1, 2):
            return RouterFault(kind="status", status=int(parts[0], 0), count=int(parts[1]) if len(parts) == 2 else 1)
    except ValueError:
        pass
    forms = "abort:AFTER[:COUNT], status:CODE[:COUNT] or lose:AFTER[:COUNT]"
    raise typer.BadParameter(f"--router-fault {spec!r}: use {forms}")


def _parse_fault(spec: str) -> HttpFault:
    kind, _, amount = spec.partition(":")
    if kind not in get_args(HttpFaultKind):
        raise typer.BadParameter(f"--fault {spec!r}: KIND must be one of {', '.join(get_args(HttpFaultKind))}")
    try:
        value = float(amount or "1")
    except ValueError:
        raise typer.BadParameter(f"--fault {spec!r}: AMOUNT must be a count or a fraction") from None
    if 0 < value < 1:
        return HttpFault(kind=kind, count=None, fraction=value)  # type: ignore[arg-type]
    return HttpFault(kind=kind, count=int(value))  # type: ignore[arg-type]
