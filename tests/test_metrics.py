"""Prometheus metrics at /metrics: what a study going through moves, what refusals move, why an
association was rejected, and a scrape that stays fast on a large store."""

from __future__ import annotations

import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from machaon import metrics
from machaon.config import Settings
from machaon.store import Delivery, DeliveryStatus, Job, JobStatus, Result, Study, StudyStatus, utcnow
from machaon.tools import phantom
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import insert, select

from tests.dicomgen import write_ct_series
from tests.harness import acknowledged, delivered, finished, folder_setup, storescu

Samples = dict[tuple[str, frozenset], float]


def parse(body: str) -> Samples:
    """Every sample of an exposition, by name and labels; the parser rejects a malformed one."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def scrape(server) -> Samples:
    """GET /metrics of a running `machaon serve`, waiting for its API to answer."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{server.api_url}/metrics", timeout=10) as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return parse(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise


def without_study_uid(path: Path, out: Path) -> Path:
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(out)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_study_going_through_moves_its_counters(serve, built_models, tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=41)
    server = serve(models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    before = scrape(server)
    sent = storescu(server.port, *study.sax_files, *study.view_files.values(), aet="MRI1")
    instances = phantom.SAX_SLICES + 3
    assert acknowledged(sent.stderr) == instances
    [job] = finished(server, study.study_uid)
    assert job["status"] == "succeeded", job["error"]
    results = delivered(server, study.study_uid)

    # The counters move after each commit: the last may trail the store by a moment.
    def moved():
        after = scrape(server)
        return after if value(after, "machaon_study_latency_seconds_count") > 0 else None
    after = server.wait_for(moved, what="the study's latency to be observed")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("machaon_instances_received_total") == instances
    kept = server.study(study.study_uid)
    assert grew("machaon_received_bytes_total") == sum(i["size_bytes"] for s in kept["series"]
                                                         for i in s["instances"])
    assert grew("machaon_associations_total", outcome="accepted") == 1
    assert grew("machaon_job_duration_seconds_count", model="lv-segmentation", status="succeeded") == 1
    assert grew("machaon_job_stage_seconds_count", stage="inference") == 1
    assert grew("machaon_inference_seconds_count", model="lv-segmentation") == 1
    assert grew("machaon_deliveries_sent_total", destination="out") == len(results) == 2
    assert value(after, "machaon_delivery_failures_total", destination="out") == 0
    assert grew("machaon_study_latency_seconds_count") == 1
    latency = value(after, "machaon_study_latency_seconds_sum")
    assert 0 < latency < 120, latency  # from the last image acknowledged to the SR and SEG in the folder

    # What the store knows, read at the scrape.
    assert value(after, "machaon_store_up") == 1
    assert value(after, "machaon_jobs", state="succeeded", model="lv-segmentation") == 1
    assert value(after, "machaon_jobs", state="queued", model="lv-segmentation") == 0
    assert value(after, "machaon_queue_depth") == 0
    assert value(after, "machaon_oldest_queued_job_age_seconds") == 0
    assert value(after, "machaon_studies", state="complete") == 1
    assert value(after, "machaon_studies_completed_last_hour") == 1
    assert value(after, "machaon_deliveries_pending", destination="out") == 0
    assert value(after, "machaon_deliveries_failing", destination="out") == 0
    assert value(after, "machaon_spool_free_bytes") > 0


def test_refusals_and_rejections_are_counted_and_the_reason_logged(serve, tmp_path):
    server = serve(dicom={"allowed_calling_aets": ["SCANNER", "HOLDER"], "max_associations": 1})
    before = scrape(server)
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)

    refused = storescu(server.port, without_study_uid(ct[0], tmp_path / "nostudy.dcm"))
    assert "Received Store Response (Error: CannotUnderstand)" in refused.stderr, refused.stderr
    intruder = storescu(server.port, *ct, aet="INTRUDER")
    assert "Calling AE Title Not Recognized" in intruder.stderr, intruder.stderr
    server.wait_for(lambda: "association from INTRUDER (127.0.0.1:" in server.log(), what="the rejection logged")
    [line] = [x for x in server.log().splitlines() if "association from INTRUDER" in x]
    assert ("rejected: calling AE title INTRUDER is not in dicom.allowed_calling_aets "
            "(SCANNER, HOLDER); add it there if it may send") in line

    holder = AE("HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", server.port, ae_title="MACHAON")
    assert held.is_established
    try:
        busy = storescu(server.port, *ct)
        assert "Local Limit Exceeded" in busy.stderr, busy.stderr
        server.wait_for(lambda: "already open" in server.log(), what="the rejection logged")
        [line] = [x for x in server.log().splitlines() if "already open" in x]
        assert "association from SCANNER (127.0.0.1:" in line
        assert "rejected: 1 association(s) already open (dicom.max_associations)" in line
    finally:
        held.release()

    # An association on which nothing can be sent: pynetdicom accepts it, with every context
    # rejected; machaon counts and logs it as rejected.
    sender = AE("SCANNER")
    sender.add_requested_context("1.2.826.0.1.3680043.8.498.999.1")  # no SOP class machaon serves
    useless = sender.associate("127.0.0.1", server.port, ae_title="MACHAON")
    if useless.is_established:
        useless.abort()
    server.wait_for(lambda: "no presentation context acceptable" in server.log(), what="the rejection logged")

    def moved():
        after = scrape(server)
        return after if value(after, "machaon_associations_total", outcome="rejected") >= 3 else None
    after = server.wait_for(moved, what="three rejected associations counted")
    assert value(after, "machaon_associations_total", outcome="rejected") - value(
        before, "machaon_associations_total", outcome="rejected") == 3
    assert value(after, "machaon_instances_refused_total", reason="invalid") - value(
        before, "machaon_instances_refused_total", reason="invalid") == 1
    assert value(after, "machaon_instances_received_total") == 0
    for reason in metrics.REFUSAL_REASONS:  # every reason is there from the start, at 0 until it happens
        assert ("machaon_instances_refused_total", frozenset({("reason", reason)})) in after


JOBS = 2_000


@pytest.fixture
def large_store(store, tmp_path):
    """A store with JOBS jobs of 1,000 studies, most succeeded, 4% queued, and a delivery for each of
    the first 20,000: 300 of them pending, 100 of those failing."""
    now = utcnow()
    with store.engine.begin() as conn:
        conn.execute(insert(Study), [dict(
            study_uid=f"1.2.3.{i}", status=StudyStatus.COMPLETE if i % 10 else StudyStatus.RECEIVING,
            first_received_at=now, opened_at=now, last_received_at=now, completed_at=now, completion_count=1,
        ) for i in range(1000)])
        study_ids = list(conn.execute(select(Study.id).order_by(Study.id)).scalars())
        states = [JobStatus.SUCCEEDED] * 90 + [JobStatus.FAILED] * 5 + [JobStatus.QUEUED] * 4 + [JobStatus.RUNNING]
        conn.execute(insert(Job), [dict(
            study_id=study_ids[i % 1000], model=("lv-segmentation", "cxr-findings")[i % 2], status=states[i % 100],
            priority=0, attempts=1, generation=1, created_at=now - timedelta(seconds=JOBS - i),
            # The oldest queued job failed once and waits out its backoff: it is not late.
            not_before=now + timedelta(hours=1) if i == 95 else None,
        ) for i in range(JOBS)])
        first_jobs = list(conn.execute(select(Job.id).order_by(Job.id).limit(20_000)).scalars())
        conn.execute(insert(Result), [dict(
            job_id=job_id, kind="seg", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", sop_instance_uid=f"2.25.{job_id}",
            series_uid=f"2.25.1{job_id}", path=f"results/{job_id}.dcm", created_at=now) for job_id in first_jobs])
        result_ids = list(conn.execute(select(Result.id).order_by(Result.id)).scalars())
        conn.execute(insert(Delivery), [dict(
            result_id=result_id, destination="pacs", attempts=1,
            status=DeliveryStatus.PENDING if i < 300 else DeliveryStatus.SENT,
            last_error="connection refused" if i < 100 else None, next_attempt_at=now,
        ) for i, result_id in enumerate(result_ids)])
    settings = Settings.model_validate({"spool": {"path": str(tmp_path)}, "destinations": {"pacs": {
        "type": "folder", "path": str(tmp_path / "pacs")}}})
    return store, settings, now


def test_a_scrape_counts_what_the_store_holds(large_store):
    # How long a scrape of 100,000 jobs takes is measured by benchmarks/operations.py.
    store, settings, inserted_at = large_store
    body, content_type = metrics.exposition(store, settings)
    samples = parse(body.decode())
    assert value(samples, "machaon_jobs", state="succeeded", model="lv-segmentation") == JOBS * 45 // 100
    assert value(samples, "machaon_jobs", state="cancelled", model="cxr-findings") == 0
    assert value(samples, "machaon_queue_depth") == JOBS * 4 // 100
    # The oldest queued job (i = 95) waits out a backoff, so is not late; the next (i = 96) is.
    waited = JOBS - 96 + (utcnow() - inserted_at).total_seconds()
    assert value(samples, "machaon_oldest_queued_job_age_seconds") == pytest.approx(waited, abs=5)
    assert value(samples, "machaon_studies", state="complete") == 900
    assert value(samples, "machaon_deliveries_pending", destination="pacs") == 300
    assert value(samples, "machaon_deliveries_failing", destination="pacs") == 100
    assert value(samples, "machaon_spool_min_free_bytes") == settings.spool.min_free_mb * 1024 * 1024
