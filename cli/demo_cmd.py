"""`satset demo`: the whole stack on embedded defaults. For now: the SATUSEHAT simulator with its router."""

from __future__ import annotations

from cli.simulator_cmd import simulator


def demo() -> None:
    """Start the local SATUSEHAT platform (simulator + DICOM Router) on 127.0.0.1 until Ctrl-C."""
    simulator(port=8010, dicom_port=11112, admin=True)
