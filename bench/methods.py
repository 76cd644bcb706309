"""The ways of moving one study from the PACS to the router that the routing benchmark compares.

(a) the gateway: `dicom_process` through a Prefect server (FlowRunner), and `clients.routing.route_study` called
    directly, in its current design (encoded, wire path, read-ahead) and in the designs it replaced;
(b) the existing gateway's way: per instance a WADO-URI download, a dcmodify process and a storescu process;
(c) Orthanc's own modify (/patients/{id}/modify) plus store-to-modality;
(d) dcmtk storescu sending the already-edited files from local disk, one association.

Each returns a dict of timings (seconds) for one run; the caller verifies what arrived.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import requests
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from bench.common import ORTHANC_PASSWORD, ORTHANC_USER, ROUTER_AET, Receiver, Stack, quiet_prefect_console
from clients import routing
from clients.pacs import PacsClient
from clients.router import Instance, RouterClient
from models.dicom import EncodedInstance, edit_for_satusehat
from stack.dcmtk import storescu
from stack.studies import StudySpec, iter_instances


def new_accession() -> str:
    """A fresh ACSN per run: route-study results are cached by (router, study, ACSN, patient), so a repeated
    ACSN would measure Prefect's cache instead of the routing."""
    return "B" + uuid.uuid4().hex[:15].upper()


PATIENT_ID = "P02478375538"


def bench_pacs(dicomweb_url: str) -> PacsClient:
    """A PACS client for the benchmarks' Orthanc (its user and password)."""
    return PacsClient(dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD)


def route_confirmed(
    pacs: PacsClient, router: RouterClient, study_uid: str, *, accession: str | None = None, **options: Any
) -> routing.RoutingReport:
    """route_study with the benchmarks' patient (and a fresh ACSN unless given); raises unless the router confirmed
    every instance, so no benchmark times a routing that failed."""
    report = routing.route_study(
        pacs,
        router,
        study_instance_uid=study_uid,
        accession_number=accession or new_accession(),
        patient_id=PATIENT_ID,
        **options,
    )
    if not report.outcome.complete:
        raise RuntimeError(report.outcome.describe())
    return report


# -- (a) the gateway ---------------------------------------------------------------------------------------------


class RouteTimer:
    """Wraps clients.routing.route_study and the PACS listings to time them wherever they are called from (the
    Prefect task calls `routing.route_study` through the module, so the flow's route time is measured too).

    `listing_s` is the PACS listing the transfer waits for: the series query, plus the instance query when it is
    made (the previous design makes it first; the current one only when the series query is not enough).
    """

    def __init__(self) -> None:
        self.route_s: list[float] = []
        self._listing: list[float] = []
        self.listing_s: list[float] = []
        self._route = routing.route_study
        self._wrapped = {name: getattr(PacsClient, name) for name in ("list_instances", "list_series_refs")}

    def install(self) -> RouteTimer:
        timer = self

        def route_study(*args: Any, **kwargs: Any) -> routing.RoutingReport:
            timer._listing = []
            started = time.perf_counter()
            try:
                return timer._route(*args, **kwargs)
            finally:
                timer.route_s.append(time.perf_counter() - started)
                timer.listing_s.append(sum(timer._listing))

        def timed(real: Callable[..., Any]) -> Callable[..., Any]:
            def listing(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return real(*args, **kwargs)
                finally:
                    timer._listing.append(time.perf_counter() - started)

            return listing

        routing.route_study = route_study  # type: ignore[assignment]
        for name, real in self._wrapped.items():
            setattr(PacsClient, name, timed(real))
        return self

    def uninstall(self) -> None:
        routing.route_study = self._route  # type: ignore[assignment]
        for name, real in self._wrapped.items():
            setattr(PacsClient, name, real)

    def last(self) -> dict[str, float]:
        return {"route_s": self.route_s[-1], "listing_s": self.listing_s[-1]}


class FlowRunner:
    """Runs the real `dicom_process` flow in this process against the benchmark's Prefect server.

    The environment is the gateway's (stack.gateway_env); changing receiver rebuilds the gateway's clients.
    """

    def __init__(self, stack: Stack, timer: RouteTimer) -> None:
        self.stack = stack
        self.timer = timer
        self.loop = asyncio.new_event_loop()
        self._receiver: str | None = None

    def use(self, receiver: str) -> None:
        if receiver == self._receiver:
            return
        os.environ.update(self.stack.gateway_env(receiver))
        from tasks import runtime

        runtime.reset()
        quiet_prefect_console()
        self._receiver = receiver

    def run(self, receiver: str, study_uid: str, accession: str, *, stub: bool = False) -> dict[str, float]:
        """One dicom_process run; `stub` replaces route_study by a no-op, so the wall time is Prefect's own share
        (flow and task runs, states, result persistence, the summary artifact) plus the study lookup."""
        self.use(receiver)
        from flows.dicom import dicom_process
        from models.inputs import DicomProcessInput

        payload = DicomProcessInput(study=study_uid, patientid=PATIENT_ID, accesionnum=accession)
        real_route = self.timer._route
        if stub:
            self.timer._route = _no_routing  # type: ignore[assignment]
        started = time.perf_counter()
        try:
            result = self.loop.run_until_complete(dicom_process(payload))
        finally:
            self.timer._route = real_route  # type: ignore[assignment]
        wall = time.perf_counter() - started
        if result.get("status") != "success":
            raise RuntimeError(f"dicom_process did not succeed: {result}")
        timings = self.timer.last()
        return {"wall_s": wall, **timings, "prefect_s": wall - timings["route_s"]}

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def _no_routing(pacs: PacsClient, router: RouterClient, **kwargs: Any) -> routing.RoutingReport:
    from clients.router import StudyOutcome

    outcome = StudyOutcome(kwargs["study_instance_uid"], kwargs["accession_number"], 0, 0, 0, (), 0.0, True)
    return routing.RoutingReport(
        kwargs["study_instance_uid"], kwargs["accession_number"], 0, 0, True, True, router.router, 0.0, outcome
    )


class DirectRouter:
    """route_study without Prefect, with one PACS client and one router client per receiver (as a worker has)."""

    def __init__(self, stack: Stack, timer: RouteTimer) -> None:
        self.stack = stack
        self.timer = timer
        self.pacs = bench_pacs(stack.orthanc.dicomweb_url)
        self._routers: dict[tuple[str, str], RouterClient] = {}

    def router(self, receiver: str, kind: str = "wire") -> RouterClient:
        key = (receiver, kind)
        if key not in self._routers:
            scp = self.stack.receivers[receiver].scp
            cls = {"wire": RouterClient, "pynetdicom": RouterClient, "bytes": PynetdicomBytesRouter}[kind]
            self._routers[key] = cls(scp.host, scp.port, ROUTER_AET, wire=kind == "wire")
        return self._routers[key]

    def run(
        self, receiver: str, study_uid: str, accession: str, *, encoded: bool, read_ahead: int, kind: str = "wire"
    ) -> dict[str, float]:
        route_confirmed(
            self.pacs,
            self.router(receiver, kind),
            study_uid,
            accession=accession,
            encoded=encoded,
            read_ahead=read_ahead,
        )
        return self.timer.last()


class PynetdicomBytesRouter(RouterClient):
    """The cheaper idea measured first: keep instances encoded (no pydicom, no encode) but hand the bytes to
    pynetdicom's own send path (DIMSE message -> one P-DATA per max-PDU fragment through the DUL queue and
    reactor thread). Benchmark-only: it shows how much of the cost is pynetdicom's per-PDU machinery."""

    def _store_with_pynetdicom(self, assoc: Association, item: Instance, message_id: int) -> tuple[int | None, None]:
        if not isinstance(item, EncodedInstance):
            return super()._store_with_pynetdicom(assoc, item, message_id)
        context = assoc._get_valid_context(item.sop_class_uid, item.transfer_syntax_uid, "scu", allow_conversion=False)
        request = C_STORE()
        request.MessageID = message_id
        request.Priority = 2
        request.AffectedSOPClassUID = item.sop_class_uid
        request.AffectedSOPInstanceUID = item.sop_instance_uid
        request.DataSet = BytesIO(item.data_set_bytes())
        # What Association.send_c_store does after encoding: park the reactor, send, wait for the response.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(request, context.context_id)  # type: ignore[arg-type]
        _, response = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        status = getattr(response, "Status", None)
        return (int(status) if status is not None else None), None


# -- (b) the existing gateway ------------------------------------------------------------------------------------


def existing_gateway(
    stack: Stack, receiver: Receiver, study_uid: str, accession: str, workdir: Path
) -> dict[str, float]:
    """The existing gateway's /api/dicom/process, step for step (observed_contracts.md): one metadata request,
    then per instance a WADO-URI download on a new connection, `dcmodify`, `storescu` (one association per
    instance), success read from its output. TCP_NODELAY=1 for storescu, as for every dcmtk process here."""
    auth = (ORTHANC_USER, ORTHANC_PASSWORD)
    base = stack.orthanc.http_url
    env = dict(os.environ, TCP_NODELAY="1")
    workdir.mkdir(parents=True, exist_ok=True)
    download_s = modify_s = store_s = 0.0
    started = time.perf_counter()
    metadata = requests.get(f"{stack.orthanc.dicomweb_url}/studies/{study_uid}/metadata", auth=auth, timeout=60)
    metadata.raise_for_status()
    sent = 0
    for index, instance in enumerate(metadata.json()):
        series = instance["0020000E"]["Value"][0]
        sop = instance["00080018"]["Value"][0]
        path = workdir / f"{study_uid}_{index}.dcm"
        t0 = time.perf_counter()
        # Orthanc 1.10 refuses a URL-encoded contentType (observed_contracts.md): write the query by hand.
        url = (
            f"{base}/wado?requestType=WADO&studyUID={study_uid}&seriesUID={series}&objectUID={sop}"
            "&contentType=application/dicom"
        )
        with requests.get(url, auth=auth, stream=True, timeout=30) as response:
            response.raise_for_status()
            with path.open("wb") as out:
                for chunk in response.iter_content(1 << 16):
                    out.write(chunk)
        t1 = time.perf_counter()
        subprocess.run(
            ["dcmodify", "--ignore-errors", "-i", f"(0010,0020)={PATIENT_ID}", "-i", f"(0008,0050)={accession}", path],
            capture_output=True,
            check=True,
        )
        path.with_name(path.name + ".bak").unlink(missing_ok=True)
        t2 = time.perf_counter()
        scp = receiver.scp
        output = subprocess.run(
            ["storescu", "-v", "--propose-lossless", "-aec", ROUTER_AET, scp.host, str(scp.port), str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        sent += "Received Store Response (Success)" in output.stdout + output.stderr
        path.unlink()
        t3 = time.perf_counter()
        download_s, modify_s, store_s = download_s + t1 - t0, modify_s + t2 - t1, store_s + t3 - t2
    total = time.perf_counter() - started
    if sent != len(metadata.json()):
        raise RuntimeError(f"the existing gateway's way stored {sent} of {len(metadata.json())}")
    return {"wall_s": total, "download_s": download_s, "dcmodify_s": modify_s, "storescu_s": store_s}


# -- (c) Orthanc modify + store ----------------------------------------------------------------------------------


class OrthancModifyStore:
    """Orthanc edits the study itself and C-STOREs it to the router (a modality in its configuration).

    /studies/{id}/modify cannot change PatientID in Orthanc 1.10, so /patients/{id}/modify it is, keeping the
    UIDs (Force). The modified copy is a new patient in Orthanc; it is deleted after each run, untimed.
    """

    def __init__(self, stack: Stack) -> None:
        self.client = httpx.Client(base_url=stack.orthanc.http_url, auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=600)

    def run(self, receiver: Receiver, study_uid: str, accession: str) -> dict[str, float]:
        found = self.client.post("/tools/lookup", content=study_uid).json()
        study_id = next(item["ID"] for item in found if item["Type"] == "Study")
        patient = self.client.get(f"/studies/{study_id}").json()["ParentPatient"]
        started = time.perf_counter()
        modified = self.client.post(
            f"/patients/{patient}/modify",
            json={
                "Replace": {"PatientID": PATIENT_ID + accession[-4:], "AccessionNumber": accession},
                "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                "Force": True,
            },
        )
        modified.raise_for_status()
        new_patient = modified.json()["ID"]
        try:
            new_studies = self.client.get(f"/patients/{new_patient}").json()["Studies"]
            modified_at = time.perf_counter()
            stored = self.client.post(
                f"/modalities/{receiver.modality}/store", json={"Resources": new_studies, "Synchronous": True}
            )
            stored.raise_for_status()
            done = time.perf_counter()
            answer = stored.json()
            if answer.get("FailedInstancesCount"):
                raise RuntimeError(f"Orthanc's store failed for {answer['FailedInstancesCount']} instances")
        finally:
            self.client.delete(f"/patients/{new_patient}")
        return {"wall_s": done - started, "modify_s": modified_at - started, "store_s": done - modified_at}

    def close(self) -> None:
        self.client.close()


# -- (d) storescu from disk --------------------------------------------------------------------------------------


def write_edited_files(spec: StudySpec, directory: Path, accession: str) -> int:
    """The study as (d) sends it: already edited, Part-10 files on local disk. Returns the instance count."""
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for ds in iter_instances(spec):
        edit_for_satusehat(ds, accession_number=accession, patient_id=PATIENT_ID)
        ds.save_as(directory / f"{count:05d}.dcm", enforce_file_format=True)
        count += 1
    return count


def storescu_from_disk(receiver: Receiver, directory: Path, expected: int) -> dict[str, float]:
    scp = receiver.scp
    started = time.perf_counter()
    result = storescu(scp.host, scp.port, [directory], called_aet=ROUTER_AET)
    wall = time.perf_counter() - started
    if result.stores_succeeded != expected:
        raise RuntimeError(f"storescu stored {result.stores_succeeded} of {expected}: {result.stderr[-500:]}")
    return {"wall_s": wall}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


Method = Callable[[str, str], dict[str, float]]
"""(receiver label, ACSN) -> timings of one run."""


def rotate(items: list[str], by: int) -> Iterator[str]:
    """The methods in a different order each round, so none always runs first (warmest or coldest)."""
    shift = by % len(items)
    yield from items[shift:] + items[:shift]
