"""Jobs: planned from the rules when a study completes, then run one at a time per worker thread.

A completed study gets one job per (series, model) its rules name; a study
reopened by late images and completed again gets new jobs (its `generation`).
A worker claims a job with a lease it renews while the job runs, so a crashed
worker's job goes back to the queue (DESIGN rule 2). A job reads its series
from the spool, prepares it, runs the model, writes the SEG and SR into the
spool and records them with one pending delivery per destination, all or
nothing. Whatever goes wrong fails that job with a reason, and the next job runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from datetime import timedelta

import numpy as np
import sqlalchemy.exc
from sqlalchemy import select

from .config import Settings
from .dispatch import PENDING
from .inference import Sessions
from .manifest import Manifest, PackageError, load_package
from .preprocess import PrepareError, Series, labels_on_source_grid, model_input, read_series
from .results import classification_report, segmentation, segmentation_report
from .rules import Rule, matching, series_in_store
from .spool import Spool
from .store import COMPLETE, Delivery, Job, Result, Store, Study, add_event, utcnow
from .store import Series as SeriesRow

log = logging.getLogger("machaon.worker")

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
SUPERSEDED = "superseded"  # queued, then replaced by a newer completion's job before it ran


class JobError(Exception):
    """A job that cannot succeed as it stands; the message is kept on the job for the operator."""


def plan_jobs(store: Store, spool: Spool, rules: list[Rule]) -> int:
    """Jobs for every study completion that has none yet; returns how many were created.
    One study that cannot be planned has the reason recorded and never holds up the others."""
    with store.read_session() as session:
        due = session.execute(select(Study.id, Study.study_uid, Study.completion_count).where(
            Study.status == COMPLETE, Study.planned_count < Study.completion_count)).all()
    created = 0
    for study_id, study_uid, generation in due:
        try:
            created += _plan_study(store, spool, rules, study_id, study_uid, generation)
        except sqlalchemy.exc.SQLAlchemyError:
            raise  # the store, not the study: the next pass plans it
        except Exception as exc:  # a bug: logged once, and the study is not tried again each pass
            log.exception("study %s: planning failed", study_uid)
            _planning_failed(store, study_id, study_uid, generation,
                             f"internal error: {exc!r} (details in the service log)")
    return created


def _plan_study(store: Store, spool: Spool, rules: list[Rule], study_id: int, study_uid: str,
                generation: int) -> int:
    """Queue the jobs of one study completion; returns how many."""
    with store.read_session() as session:  # headers are read outside the write transaction
        facts, problems = series_in_store(session, spool, study_uid) or ([], [])
        ids = dict(session.execute(select(SeriesRow.series_uid, SeriesRow.id)
                                   .where(SeriesRow.study_id == study_id)).all())
    planned = [(ids[f.series_uid], rule, model) for f in facts if f.series_uid in ids
               for rule in matching(rules, f) for model in rule.models]
    problem = "; ".join(problems) or None
    with store.session.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if (study.status != COMPLETE or study.completion_count != generation
                or study.planned_count >= generation):
            return 0  # reopened or planned meanwhile: the next pass sees it as it is now
        jobs = [Job(study_id=study_id, series_id=series_id, model=model, rule=rule.name,
                    generation=generation, status=QUEUED, priority=rule.priority, attempts=0,
                    created_at=utcnow())
                for series_id, rule, model in planned]
        session.add_all(jobs)
        session.flush()
        superseded = _supersede(session, jobs)
        study.planned_count, study.planning_error = generation, problem
        if problem:
            add_event(session, "scheduler", "study.planning_failed", study_uid, error=problem)
        if planned:
            add_event(session, "scheduler", "jobs.planned", study_uid, jobs=len(planned),
                      models=sorted({m for _, _, m in planned}), superseded=superseded or None)
        elif not problem:
            add_event(session, "scheduler", "study.no_rule_matched", study_uid, series=len(facts))
    if problem:
        log.warning("study %s: %s", study_uid, problem)
    if planned or not problem:
        log.info("study %s: %s", study_uid, f"{len(planned)} job(s) queued" if planned else "no rule matched")
    return len(planned)


def _supersede(session, jobs: list[Job]) -> list[int]:
    """Older completions' jobs still queued for the same series, rule and model will not run:
    the new job does the same work on what the series holds now. Returns their ids."""
    superseded = []
    for job in jobs:
        older = session.execute(select(Job).where(
            Job.series_id == job.series_id, Job.rule == job.rule, Job.model == job.model,
            Job.status == QUEUED, Job.generation < job.generation,
        ).with_for_update(skip_locked=True)).scalars()
        for old in older:
            old.status, old.superseded_by, old.finished_at = SUPERSEDED, job.id, job.created_at
            superseded.append(old.id)
    return superseded


def _planning_failed(store: Store, study_id: int, study_uid: str, generation: int, reason: str) -> None:
    with store.session.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study.completion_count == generation and study.planned_count < generation:
            study.planned_count, study.planning_error = generation, reason
            add_event(session, "scheduler", "study.planning_failed", study_uid, error=reason)


def claim_job(store: Store, owner: str, lease_s: float) -> int | None:
    """Take the most urgent queued job, or a running one whose lease ran out; None if there is none."""
    with store.session.begin() as session:
        now = utcnow()
        abandoned = (Job.status == RUNNING) & (Job.lease_expires_at < now)
        job = session.execute(
            select(Job).where((Job.status == QUEUED) | abandoned)
            .order_by(Job.priority.desc(), Job.id).limit(1).with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if job is None:
            return None
        if job.status == RUNNING:  # its worker stopped renewing: crashed, killed or cut off
            study_uid = session.get(Study, job.study_id).study_uid
            add_event(session, owner, "job.lease_expired", study_uid, job=job.id, model=job.model,
                      previous_owner=job.lease_owner, attempt=job.attempts + 1)
            log.warning("job %d: the lease of %s ran out; running it again (attempt %d)",
                        job.id, job.lease_owner, job.attempts + 1)
        job.status, job.lease_owner = RUNNING, owner
        job.lease_expires_at = now + timedelta(seconds=lease_s)
        job.attempts += 1
        job.started_at, job.error = now, None
        return job.id


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float) -> bool:
    with store.session.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status != RUNNING or job.lease_owner != owner:
            return False
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_s)
        return True


class _Lease:
    """Renews a job's lease every third of its length while the job runs."""

    def __init__(self, store: Store, job_id: int, owner: str, lease_s: float):
        self.args, self.stop = (store, job_id, owner, lease_s), threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def _renew(self):
        while not self.stop.wait(self.args[3] / 3):
            if not renew_lease(*self.args):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class Runner:
    """Runs claimed jobs: the part of `machaon serve` (and `machaon worker`) that does the work."""

    def __init__(self, settings: Settings, store: Store, spool: Spool, sessions: Sessions):
        self.settings, self.store, self.spool, self.sessions = settings, store, spool, sessions
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.on_results = lambda: None  # called when a job has queued deliveries (wakes the dispatcher)

    def run_next(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job_id = claim_job(self.store, self.owner, self.settings.worker.lease)
        if job_id is None:
            return False
        queued = False
        with _Lease(self.store, job_id, self.owner, self.settings.worker.lease):
            try:
                queued = self._run(job_id)
            except (JobError, PrepareError, PackageError) as exc:
                self._fail(job_id, str(exc))
            except Exception as exc:  # a bug must fail one job, not the worker
                log.error("job %d: internal error\n%s", job_id, traceback.format_exc())
                self._fail(job_id, f"internal error: {exc!r} (details in the service log)")
        if queued:
            self.on_results()
        return True

    def _run(self, job_id: int) -> bool:
        """Run one job to its end; True when it queued deliveries."""
        with self.store.read_session() as session:
            job = session.get(Job, job_id)
            series_row = session.get(SeriesRow, job.series_id)
            study_uid, model, rule_name = series_row.study.study_uid, job.model, job.rule
            # Oldest received first: of two copies of one image, the newest is kept.
            received = sorted(series_row.instances, key=lambda i: (i.received_at, i.id))
            paths = [self.spool.path(i.path) for i in received]
        clock = _Stopwatch()
        package = load_package(self.settings.models.path, model)
        model_run = self.sessions.get(package, self.settings.inference.precision).run
        clock.lap("load_model")
        series = read_series(paths, self.settings.worker.duplicates)
        clock.lap("read_and_decode")
        x = model_input(series, package.manifest.input)
        clock.lap("prepare")
        size = self.settings.worker.batch_size
        outputs = np.concatenate([model_run(x[i:i + size]) for i in range(0, len(x), size)])
        clock.lap("inference")
        datasets = _results(series, outputs, package.manifest)
        clock.lap("encode_results")
        destinations = next((r.destinations for r in self.settings.rules if r.name == rule_name), [])
        kept = []
        for kind, ds in datasets:
            relative = self.spool.result_path(study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.spool.write(ds, relative)
            kept.append((kind, ds, relative))
        clock.lap("write_results")
        if series.dropped:
            log.warning("job %d: %s", job_id, "; ".join(series.dropped))
        return self._succeed(job_id, study_uid, kept, destinations, clock.laps, series.dropped)

    def _succeed(self, job_id: int, study_uid: str, kept: list, destinations: list[str],
                 seconds: dict[str, float], dropped: list[str]) -> bool:
        now = utcnow()
        with self.store.session.begin() as session:
            # The study's row first: the jobs that make the same objects are all of this study, so
            # one at a time sees which objects are already on their way (each is sent once).
            study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
            session.get(Study, study_id, with_for_update=True)
            job = session.get(Job, job_id, with_for_update=True)
            if job.status != RUNNING or job.lease_owner != self.owner:
                log.warning("job %d was taken over while it ran; its results are left to the new run", job_id)
                return False
            for kind, ds, relative in kept:
                result = Result(kind=kind, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                series_uid=ds.SeriesInstanceUID, created_at=now, job_id=job_id, path=relative)
                session.add(result)
                session.flush()
                # The same UID made by an earlier run is the same object: where it is already
                # queued or sent, it is not sent again.
                known = set(session.execute(
                    select(Delivery.destination).join(Result, Result.id == Delivery.result_id)
                    .where(Result.sop_instance_uid == ds.SOPInstanceUID)).scalars())
                session.add_all(Delivery(result_id=result.id, destination=d, status=PENDING, attempts=0,
                                         next_attempt_at=now) for d in destinations if d not in known)
            job.status, job.finished_at, job.lease_owner = SUCCEEDED, now, None
            add_event(session, self.owner, "job.succeeded", study_uid, job=job_id, model=job.model,
                      results=[ds.SOPInstanceUID for _, ds, _ in kept], seconds=seconds,
                      dropped_copies=dropped or None)
        log.info("job %d (%s) succeeded: %s", job_id, job.model, ", ".join(k for k, _, _ in kept))
        return bool(destinations)

    def _fail(self, job_id: int, reason: str) -> None:
        with self.store.session.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            job.status, job.error, job.finished_at, job.lease_owner = FAILED, reason, utcnow(), None
            study_uid = session.get(Study, job.study_id).study_uid
            add_event(session, self.owner, "job.failed", study_uid, job=job_id, model=job.model, error=reason)
        log.warning("job %d (%s) failed: %s", job_id, job.model, reason)


class _Stopwatch:
    """Seconds spent in each stage of a job, kept in its job.succeeded event."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now


def _results(series: Series, outputs: np.ndarray, manifest: Manifest) -> list[tuple[str, object]]:
    """The DICOM objects for one model's output: SEG and SR, or SR alone."""
    if manifest.task == "segmentation":
        rows, columns = series.pixels.shape[1:3]
        labels = labels_on_source_grid(outputs, manifest.output.layout, rows, columns)
        seg = segmentation(series, labels, manifest)
        return [("seg", seg), ("sr", segmentation_report(series, labels, seg, manifest))]
    if manifest.task == "classification":
        return [("sr", classification_report(series, outputs, manifest))]
    raise JobError(f"model {manifest.name}: results of {manifest.task} models are not written yet")


class Workers:
    """Worker threads that run jobs until stopped; `wake` makes them look at once."""

    def __init__(self, runner: Runner, threads: int, idle_s: float = 1.0):
        self.runner, self.idle_s = runner, idle_s
        self.stopping, self.woken = threading.Event(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wake(self) -> None:
        self.woken.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.runner.run_next():
                    continue
            except Exception:  # the store was unreachable, say: try again later
                log.exception("worker: could not claim a job")
            self.woken.wait(self.idle_s)
            self.woken.clear()

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Let running jobs finish, then stop; once `hurry` is set, leave them: their leases
        run out and another worker, or this one started again, runs them from the start."""
        self.stopping.set()
        self.woken.set()
        while any(t.is_alive() for t in self.threads) and not (hurry and hurry.is_set()):
            for thread in self.threads:
                thread.join(0.2)
        running = sum(t.is_alive() for t in self.threads)
        if running:
            log.warning("leaving %d running job(s) to be taken over once their lease runs out "
                        "(worker.lease = %.0f s)", running, self.runner.settings.worker.lease)
