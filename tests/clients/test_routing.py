"""clients.routing: a study from a real Orthanc to dcmtk's storescp, on every path, and the read-ahead worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from clients import routing
from clients.errors import StoreIncomplete, UpstreamUnavailable
from clients.pacs import InstanceRef, PacsClient, SeriesRef
from clients.router import RouterClient
from clients.routing import TRANSFERS_IN_PROCESS, ReadAhead, route_study
from stack.dcmtk import StoreSCP
from stack.orthanc import OrthancServer
from stack.studies import StudySpec
from tests.plugins.pacs import ORTHANC_PASSWORD, ORTHANC_USER, UploadStudy

pytestmark = pytest.mark.integration


@pytest.fixture
def pacs(orthanc: OrthancServer) -> Iterator[PacsClient]:
    with PacsClient(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, timeout=30) as client:
        yield client


def router_for(storescp: StoreSCP) -> RouterClient:
    return RouterClient(storescp.host, storescp.port, storescp.aet)


@pytest.mark.parametrize(
    ("encoded", "read_ahead"),
    [(True, 4), (True, 0), (False, 0), (False, 2)],
    ids=["wire", "wire-1thread", "ds", "ds-ra"],
)
def test_a_study_arrives_edited_on_every_path(
    pacs: PacsClient, upload_study: UploadStudy, storescp: StoreSCP, encoded: bool, read_ahead: int
) -> None:
    study = upload_study(series=3, instances_per_series=4, rows=96, columns=128)
    originals = study.by_sop_uid

    report = route_study(
        pacs,
        router_for(storescp),
        study_instance_uid=study.study_instance_uid,
        accession_number="RAD2024000123",
        patient_id="P02478375538",
        encoded=encoded,
        read_ahead=read_ahead,
    )

    assert (report.total_instance, report.sent_instance) == (12, 12)
    assert report.outcome.complete
    received = [dcmread(path) for path in storescp.wait_for_files(12)]
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(originals)
    for ds in received:
        original = originals[str(ds.SOPInstanceUID)]
        assert (ds.AccessionNumber, ds.PatientID) == ("RAD2024000123", "P02478375538")
        assert ds.PixelData == original.PixelData
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
    assert storescp.log().count("Association Acknowledged") == 1, "one association for the study"


def test_the_read_ahead_thread_runs_only_while_no_other_study_is_being_transferred(
    monkeypatch: pytest.MonkeyPatch, pacs: PacsClient, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    started: list[int] = []

    class CountedReadAhead(ReadAhead[object]):
        def __init__(self, source: Iterator[object], depth: int) -> None:
            started.append(TRANSFERS_IN_PROCESS.running)
            super().__init__(source, depth)

    monkeypatch.setattr(routing, "ReadAhead", CountedReadAhead)
    study = upload_study(series=1, instances_per_series=6, rows=64, columns=64)

    def route(accession: str) -> routing.RoutingReport:
        return route_study(
            pacs,
            router_for(storescp),
            study_instance_uid=study.study_instance_uid,
            accession_number=accession,
            read_ahead=3,
        )

    assert route("RAD1").sent_instance == 6
    assert started == [1], "alone: the rest retrieved and edited ahead in a worker thread, the transfer counted"
    assert TRANSFERS_IN_PROCESS.running == 0

    assert TRANSFERS_IN_PROCESS.start() == 0  # another study of this process is being transferred
    try:
        report = route("RAD2")
        assert TRANSFERS_IN_PROCESS.running == 1
    finally:
        TRANSFERS_IN_PROCESS.end()

    assert report.outcome.complete
    assert report.sent_instance == 6
    assert started == [1], "while another is transferred: everything in the calling thread"
    assert route("RAD3").sent_instance == 6
    assert started == [1, 1], "alone again: the worker thread is back"
    received = [dcmread(path, stop_before_pixels=True) for path in storescp.received_files()]
    assert len(received) == 6 and {ds.AccessionNumber for ds in received} == {"RAD3"}


def test_a_transfer_that_fails_is_no_longer_counted(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    study = upload_study(series=1, instances_per_series=6)
    broken = BreakingPacs(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD)

    with pytest.raises(UpstreamUnavailable):
        route_study(broken, router_for(storescp), study_instance_uid=study.study_instance_uid, accession_number="R1")

    assert TRANSFERS_IN_PROCESS.running == 0


class BreakingPacs(PacsClient):
    """Delivers two instances, then the PACS connection drops."""

    def iter_instance_files(self, study_instance_uid: str, **kwargs: object) -> Iterator[bytes]:
        files = super().iter_instance_files(study_instance_uid, **kwargs)  # type: ignore[arg-type]
        try:
            yield next(files)
            yield next(files)
        finally:
            files.close()
        raise UpstreamUnavailable("the PACS dropped the connection", service="pacs")


@pytest.mark.parametrize("read_ahead", [0, 4])
def test_a_pacs_failure_mid_study_aborts_and_leaves_no_worker(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP, read_ahead: int
) -> None:
    study = upload_study(series=1, instances_per_series=6)
    broken = BreakingPacs(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD)

    with pytest.raises(UpstreamUnavailable):
        route_study(
            broken,
            router_for(storescp),
            study_instance_uid=study.study_instance_uid,
            accession_number="RAD1",
            read_ahead=read_ahead,
        )

    assert _wait(lambda: "Association Aborted" in storescp.log()), "the router saw an abort, not a release"
    assert "Association Release" not in storescp.log()
    assert not [t for t in threading.enumerate() if t.name == "routing-read-ahead"]


def _wait(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the read-ahead worker -------------------------------------------------------------------------------------


def test_read_ahead_keeps_order_and_stays_bounded() -> None:
    produced: list[int] = []
    consumed: list[int] = []
    lead: list[int] = []

    def source() -> Iterator[int]:
        for n in range(50):
            produced.append(n)
            yield n

    with ReadAhead(source(), depth=3) as stream:
        for item in stream:
            time.sleep(0.001)
            consumed.append(item)
            lead.append(len(produced) - len(consumed))

    assert consumed == list(range(50))
    assert max(lead) <= 3 + 1, "at most `depth` queued plus the one being produced"


def test_read_ahead_raises_the_sources_error_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise UpstreamUnavailable("boom", service="pacs")

    stream = ReadAhead(source(), depth=4)
    assert next(stream) == 1
    assert next(stream) == 2
    with pytest.raises(UpstreamUnavailable, match="boom"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    stream.close()


def test_closing_the_read_ahead_stops_the_worker_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    stream = ReadAhead(source(), depth=2)
    assert next(stream) == 1
    stream.close()

    assert closed.is_set(), "the generator's finally ran (in the worker's thread)"
    assert not [t for t in threading.enumerate() if t.name == "routing-read-ahead"]


def test_read_ahead_depth_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReadAhead(iter([]), depth=0)


# -- what the PACS says before the transfer: series listing, or the instance listing alongside -------------------


class ListingLater(PacsClient):
    """A PACS whose instance listing answers late (or fails), and whose series listing may lack SOP classes or
    misstate them and the counts."""

    def __init__(
        self,
        *args: object,
        delay_s: float = 0.0,
        fail: bool = False,
        series_classes: bool = True,
        series_class: str | None = None,
        extra_count: int = 0,
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.options = {
            "delay_s": delay_s,
            "fail": fail,
            "series_classes": series_classes,
            "series_class": series_class,
            "extra_count": extra_count,
        }
        self.instance_listings = 0

    def twin(self) -> ListingLater:
        twin = super().twin()
        twin.__class__ = ListingLater
        twin.options = self.options  # type: ignore[attr-defined]
        twin.instance_listings = 0  # type: ignore[attr-defined]
        return twin  # type: ignore[return-value]

    def list_instances(self, study_instance_uid: str) -> list[InstanceRef]:
        time.sleep(self.options["delay_s"])  # type: ignore[arg-type]
        if self.options["fail"]:
            raise UpstreamUnavailable("the PACS failed the instance listing", service="pacs")
        return super().list_instances(study_instance_uid)

    def list_series_refs(self, study_instance_uid: str) -> list[SeriesRef]:
        refs = super().list_series_refs(study_instance_uid)
        if not self.options["series_classes"]:
            return [SeriesRef(ref.series_instance_uid, None, ref.instances) for ref in refs]
        forced = self.options["series_class"]
        extra = int(self.options["extra_count"])  # type: ignore[call-overload]
        return [
            SeriesRef(ref.series_instance_uid, forced or ref.sop_class_uid, (ref.instances or 0) + extra)
            for ref in refs
        ]


def upload_mixed(upload_study: UploadStudy) -> tuple[str, int]:
    """A CT series and an MR series in one study: two SOP classes, so two kinds of context."""
    ct = upload_study(modality="CT", series=1, instances_per_series=4)
    mr = StudySpec(
        modality="MR",
        series=1,
        instances_per_series=3,
        study_instance_uid=ct.study_instance_uid,
        accession_number=ct.accession_number,
    )
    upload_study(spec=mr)
    return ct.study_instance_uid, 7


def pacs_with(orthanc: OrthancServer, **options: object) -> ListingLater:
    return ListingLater(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, **options)


def test_a_mixed_study_goes_in_one_association_on_the_series_listing(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    """Orthanc reports each series' SOP class and count: no instance-level query at all."""
    study_uid, count = upload_mixed(upload_study)
    pacs = pacs_with(orthanc, delay_s=30.0)  # an instance listing would time the test out

    report = route_study(pacs, router_for(storescp), study_instance_uid=study_uid, accession_number="RAD7")

    assert report.outcome.complete and (report.total_instance, report.sent_instance) == (count, count)
    assert storescp.log().count("Association Acknowledged") == 1
    assert "Association Aborted" not in storescp.log()


@pytest.mark.parametrize("delay_s", [0.0, 0.5, 3.0], ids=["listing-first", "listing-midway", "listing-last"])
def test_without_series_classes_the_instance_listing_runs_alongside(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP, delay_s: float
) -> None:
    study = upload_study(series=2, instances_per_series=4)

    report = route_study(
        pacs_with(orthanc, delay_s=delay_s, series_classes=False),
        router_for(storescp),
        study_instance_uid=study.study_instance_uid,
        accession_number="RAD6",
    )

    assert report.outcome.complete and (report.total_instance, report.sent_instance) == (8, 8)
    assert storescp.log().count("Association Acknowledged") == 1
    assert "Association Aborted" not in storescp.log()


def test_a_listing_naming_an_unproposed_kind_makes_the_study_go_again(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    """Without series SOP classes only the first instance's kind is proposed; the late listing names MR too: the
    first association is aborted (the router builds nothing from it) and the study goes again, complete."""
    study_uid, count = upload_mixed(upload_study)

    report = route_study(
        pacs_with(orthanc, delay_s=0.3, series_classes=False),
        router_for(storescp),
        study_instance_uid=study_uid,
        accession_number="RAD8",
    )

    assert report.outcome.complete and report.sent_instance == count
    log = storescp.log()
    assert log.count("Association Acknowledged") == 2
    assert log.count("Association Aborted") == 1 and log.count("Association Release") == 1
    assert log.index("Association Aborted") < log.index("Association Release")


def test_an_instance_of_an_unproposed_kind_makes_the_study_go_again(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    """A PACS that misstates the series' SOP class: whichever series comes second (CT or MR) is caught at its first
    instance, before it is sent; the association is aborted and the study sent again with the instance listing's
    contexts."""
    study_uid, count = upload_mixed(upload_study)

    report = route_study(
        pacs_with(orthanc, series_class="1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture, wrong for both
        router_for(storescp),
        study_instance_uid=study_uid,
        accession_number="RAD5",
    )

    assert report.outcome.complete and report.sent_instance == count
    log = storescp.log()
    assert (log.count("Association Aborted"), log.count("Association Release")) == (1, 1)
    received = [dcmread(path, stop_before_pixels=True) for path in storescp.received_files()]
    assert {ds.Modality for ds in received} == {"CT", "MR"}


def test_fewer_instances_than_the_series_counts_is_store_incomplete(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    study = upload_study(series=2, instances_per_series=3)

    with pytest.raises(StoreIncomplete, match="listed 8 instances"):
        route_study(
            pacs_with(orthanc, extra_count=1),
            router_for(storescp),
            study_instance_uid=study.study_instance_uid,
            accession_number="RAD4",
        )


def test_a_failed_listing_aborts_the_transfer(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    study = upload_study(series=1, instances_per_series=5)

    with pytest.raises(UpstreamUnavailable, match="instance listing"):
        route_study(
            pacs_with(orthanc, delay_s=0.2, fail=True, series_classes=False),
            router_for(storescp),
            study_instance_uid=study.study_instance_uid,
            accession_number="RAD9",
        )

    assert "Association Release" not in storescp.log()
    assert not [t for t in threading.enumerate() if t.name.startswith("routing-")]


class Withholding(PacsClient):
    """A PACS that lists an instance it cannot deliver (a lost file, storage offline): retrieval leaves it out."""

    def __init__(self, *args: object, withheld: str, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.withheld = withheld.encode("ascii")

    def iter_instance_files(self, study_instance_uid: str, **kw: object) -> Iterator[bytes]:
        return (part for part in super().iter_instance_files(study_instance_uid, **kw) if self.withheld not in part)  # type: ignore[arg-type]


def test_an_instance_listed_but_not_delivered_aborts_the_association_naming_it(
    orthanc: OrthancServer, upload_study: UploadStudy, storescp: StoreSCP
) -> None:
    """The router builds an ImagingStudy from whatever a released association carried: a study short of an
    instance must end in an abort, and the reason must say which instance to look for."""
    study = upload_study(series=1, instances_per_series=3)
    missing = sorted(study.by_sop_uid)[1]
    pacs = Withholding(orthanc.dicomweb_url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, withheld=missing)

    with pytest.raises(StoreIncomplete, match=rf"listed 3 instances .* delivered 2 \(not delivered: {missing}\)"):
        route_study(pacs, router_for(storescp), study_instance_uid=study.study_instance_uid, accession_number="RAD3")

    log = storescp.log()
    assert log.count("Association Aborted") == 1 and "Association Release" not in log
