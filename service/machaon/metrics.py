"""Prometheus metrics, served at /metrics by the API.

Two kinds. What only this process sees (instances received and refused, associations, job and
inference times, sends) is counted as it happens, in a registry of machaon's own rather than
prometheus_client's global one, so that tests and two apps in one process do not clash. What the
job store knows (jobs, studies, the queue, deliveries waiting) is read from it at each scrape, so
that every process serving the API reports it, `machaon api` running alone included, and a
restart loses none of it. Those reads are group-by queries on indexed columns: a scrape stays fast
with a hundred thousand jobs.

Label values come from small fixed sets or from the configuration (models, destinations), never
from what a sender writes (AE titles, SOP classes), so the number of series stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from . import operations
from .config import Settings
from .store import Delivery, DeliveryStatus, Job, JobStatus, Store, Study, StudyStatus, utcnow

log = logging.getLogger("machaon.metrics")

# No <name>_created series beside each counter and histogram: they double the series stored for
# a start time that process_start_time_seconds already gives.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of this process

# Why a C-STORE got a failure status (scp.py), or a message was dropped.
REFUSAL_REASONS = (
    "out_of_resources",  # the spool is below its free-space watermark, or full
    "invalid",  # the dataset cannot be decoded, or contradicts its C-STORE request
    "conflict",  # its series already belongs to another study
    "store_error",  # the job store could not record it
    "spool_error",  # the spool could not be written (other than full)
    "protocol_error",  # a message on a presentation context that was not accepted
)
# accepted: established with a context to send on; rejected: refused (A-ASSOCIATE-RJ, or no
# presentation context acceptable); aborted: an accepted association that ended in an abort.
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "aborted")
JOB_OUTCOMES = ("succeeded", "failed", "retried")

_instances = Counter("machaon_instances_received", "Instances received and kept (C-STORE success)",
                     registry=REGISTRY)
_received_bytes = Counter("machaon_received_bytes", "Bytes of the instances received and kept",
                          registry=REGISTRY)
_refused = Counter("machaon_instances_refused", "Instances refused with a C-STORE failure status, by reason",
                   ["reason"], registry=REGISTRY)
_associations = Counter("machaon_associations", "DICOM associations requested of the listener, by outcome",
                        ["outcome"], registry=REGISTRY)
_job_seconds = Histogram("machaon_job_duration_seconds", "Time a job ran, by model and outcome",
                         ["model", "status"], registry=REGISTRY,
                         buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
_stage_seconds = Histogram("machaon_job_stage_seconds", "Time a successful job spent in each stage",
                           ["stage"], registry=REGISTRY,
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
_inference_seconds = Histogram("machaon_inference_seconds", "Time ONNX Runtime took for one job's series",
                               ["model"], registry=REGISTRY,
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
_latency = Histogram("machaon_study_latency_seconds",
                     "From a study's last image acknowledged to its last result delivered",
                     registry=REGISTRY, buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))
_sent = Counter("machaon_deliveries_sent", "Results a destination acknowledged", ["destination"],
                registry=REGISTRY)
_send_failures = Counter("machaon_delivery_failures", "Failed attempts to send a result, by destination",
                         ["destination"], registry=REGISTRY)

# Every fixed label value exists from the start at 0, so rate() and alerts see the first one.
for _reason in REFUSAL_REASONS:
    _refused.labels(_reason)
for _outcome in ASSOCIATION_OUTCOMES:
    _associations.labels(_outcome)


# --- what this process counts ----------------------------------------------------------------

def instance_received(size_bytes: int) -> None:
    _instances.inc()
    _received_bytes.inc(size_bytes)


def instance_refused(reason: str) -> None:
    assert reason in REFUSAL_REASONS, reason  # a new reason is added to the list, not invented here
    _refused.labels(reason).inc()


def association(outcome: str) -> None:
    assert outcome in ASSOCIATION_OUTCOMES, outcome
    _associations.labels(outcome).inc()


def job_finished(model: str, status: str, seconds: float, stages: dict[str, float] | None = None) -> None:
    """A job's run ended: `status` is succeeded, failed, or retried (failed, queued again after a
    backoff); `stages` are the seconds of each stage of a successful run."""
    assert status in JOB_OUTCOMES, status
    _job_seconds.labels(model, status).observe(seconds)
    for stage, stage_seconds in (stages or {}).items():
        _stage_seconds.labels(stage).observe(stage_seconds)


def inference_seconds(model: str, seconds: float) -> None:
    _inference_seconds.labels(model).observe(seconds)


def destinations(names: Iterable[str]) -> None:
    """The configured destinations' send counters, at 0 until their first send."""
    for name in names:
        _sent.labels(name)
        _send_failures.labels(name)


def delivery_sent(destination: str) -> None:
    _sent.labels(destination).inc()


def delivery_failed(destination: str, count: int = 1) -> None:
    _send_failures.labels(destination).inc(count)


def study_delivered(latency_s: float) -> None:
    """A study's last result was delivered, `latency_s` after its last image was acknowledged."""
    _latency.observe(max(latency_s, 0.0))


# --- what the store knows, read at each scrape ----------------------------------------------

def exposition(store: Store, settings: Settings) -> tuple[bytes, str]:
    """The body of a /metrics response and its content type: Prometheus text format 0.0.4, which
    every Prometheus version reads."""
    return generate_latest(_Scrape(store, settings)), CONTENT_TYPE_PLAIN_0_0_4


class _Scrape(Collector):
    """This process's counters, then what the store and the spool say now."""

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from _spool(self.settings)
        try:
            with self.store.read_session() as session:
                families = list(_from_store(session, self.settings))
        except SQLAlchemyError as exc:  # the scrape still says what it can, and that the store is down
            log.warning("metrics: the job store could not be read: %s", exc)
            families = []
        up = GaugeMetricFamily("machaon_store_up", "1 if the job store answered this scrape, else 0")
        up.add_metric([], 1 if families else 0)
        yield up
        yield from families


def _spool(settings: Settings) -> Iterator[Metric]:
    disk = operations.spool_disk(settings)
    if disk["free_bytes"] is None:
        log.warning("metrics: the spool %s cannot be read", settings.spool.path)
        return
    for name, help_text, value in (
        ("machaon_spool_free_bytes", "Free space on the spool's file system", disk["free_bytes"]),
        ("machaon_spool_total_bytes", "Size of the spool's file system", disk["total_bytes"]),
        ("machaon_spool_min_free_bytes", "Free space below which instances are refused (spool.min_free_mb)",
         disk["min_free_bytes"]),
    ):
        yield GaugeMetricFamily(name, help_text, value=value)


def _from_store(session: Session, settings: Settings) -> Iterator[Metric]:
    now = utcnow()
    yield from _jobs(session, now)
    yield from _studies(session, now)
    yield from _deliveries(session, settings)


def _jobs(session: Session, now) -> Iterator[Metric]:
    counts = {(status, model): n for status, model, n in session.execute(
        select(Job.status, Job.model, func.count()).group_by(Job.status, Job.model))}
    jobs = GaugeMetricFamily("machaon_jobs", "Jobs in the store, by state and model",
                             labels=["state", "model"])
    for model in sorted({model for _, model in counts}):  # every state of a model known, 0 included
        for state in JobStatus:
            jobs.add_metric([state.value, model], counts.get((state.value, model), 0))
    yield jobs
    queued = sum(n for (status, _), n in counts.items() if status == JobStatus.QUEUED)
    yield GaugeMetricFamily("machaon_queue_depth", "Jobs queued, those waiting out a retry backoff included",
                            value=queued)
    # A job waiting out a backoff is not late: it is due from its not_before.
    due_since = func.coalesce(Job.not_before, Job.created_at)
    oldest = session.scalar(select(func.min(due_since)).where(
        Job.status == JobStatus.QUEUED, (Job.not_before.is_(None)) | (Job.not_before <= now)))
    yield GaugeMetricFamily("machaon_oldest_queued_job_age_seconds",
                            "How long the job due the longest has waited for a worker (0: none waits)",
                            value=max((now - oldest).total_seconds(), 0) if oldest else 0)


def _studies(session: Session, now) -> Iterator[Metric]:
    counts = {status: n for status, n in session.execute(
        select(Study.status, func.count()).group_by(Study.status))}
    studies = GaugeMetricFamily("machaon_studies", "Studies in the store, by state", labels=["state"])
    for state in StudyStatus:
        studies.add_metric([state.value], counts.get(state.value, 0))
    yield studies
    completed = session.scalar(select(func.count()).select_from(Study).where(
        Study.status == StudyStatus.COMPLETE, Study.completed_at >= now - timedelta(hours=1)))
    yield GaugeMetricFamily("machaon_studies_completed_last_hour", "Studies completed in the last hour "
                            "(and not reopened since)", value=completed or 0)


def _deliveries(session: Session, settings: Settings) -> Iterator[Metric]:
    failing = Delivery.last_error.is_not(None)
    rows = session.execute(
        select(Delivery.destination, failing, func.count()).where(Delivery.status == DeliveryStatus.PENDING)
        .group_by(Delivery.destination, failing))
    pending = dict.fromkeys(settings.destinations, 0)
    failed = dict.fromkeys(settings.destinations, 0)
    for destination, has_error, n in rows:
        pending[destination] = pending.get(destination, 0) + n
        failed[destination] = failed.get(destination, 0) + (n if has_error else 0)
    for name, help_text, values in (
        ("machaon_deliveries_pending", "Results not yet acknowledged by their destination", pending),
        ("machaon_deliveries_failing", "Results whose last attempt to send failed (retried after a backoff)",
         failed),
    ):
        family = GaugeMetricFamily(name, help_text, labels=["destination"])
        for destination, n in sorted(values.items()):
            family.add_metric([destination], n)
        yield family
