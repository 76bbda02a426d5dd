"""Workers: claiming a queued job under a lease and running it.

A worker claims the most urgent job with a lease it renews while the job runs,
so a crashed worker's job goes back to the queue (the store is the single
source of truth). A job reads its series from the spool, prepares it, runs the
model, writes its results into the spool and records them with one pending
delivery per destination, all or nothing. A failure that may pass queues the job
again after a backoff, up to worker.max_attempts; any other fails that job with a
reason; either way, the next job runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import sqlalchemy.exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import metrics
from .config import Settings, WorkerSettings
from .inference import InferenceError, OrtSessions
from .manifest import PackageError, load_package
from .preprocess import PrepareError, SpoolUnreadable, model_input, read_series
from .results import ResultError, results_for
from .spool import Spool
from .store import (
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    SeriesRow,
    Store,
    Study,
    add_event,
    utcnow,
)

log = logging.getLogger("machaon.worker")


class JobError(Exception):
    """A job that cannot succeed as it stands; the message is kept on the job for the operator."""


# Failures that cannot pass by themselves (bad input, a model not built, a result that cannot be
# made): the job fails at once. Any other failure may pass (see Runner.run_next).
CANNOT_PASS = (JobError, PrepareError, PackageError, ResultError)
# Failures that are expected to pass: the spool or the store briefly unavailable, ONNX Runtime.
MAY_PASS = (SpoolUnreadable, InferenceError, OSError, sqlalchemy.exc.OperationalError)


def claim_job(store: Store, owner: str, policy: WorkerSettings) -> tuple[int, str] | None:
    """Take a running job whose lease ran out, else the most urgent queued job that is due (oldest
    first within a priority); None if there is none. Returns the job and the lease owner of this
    claim (`owner` and a claim of its own, so that two threads of one process never pass for each
    other). A job whose worker stopped while running it max_attempts times fails instead: it may be
    what stops them."""
    while True:
        with store.session.begin() as session:
            now = utcnow()
            job = session.execute(
                select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
                .limit(1).with_for_update(skip_locked=True)).scalar_one_or_none()
            if job is not None and _abandoned_too_often(session, job, owner, policy,
                                                        f"the lease of {job.lease_owner} ran out"):
                continue  # failed: look again
            job = job or session.execute(
                select(Job).where(Job.status == JobStatus.QUEUED,
                                  Job.not_before.is_(None) | (Job.not_before <= now))
                .order_by(Job.priority.desc(), Job.created_at, Job.id)
                .limit(1).with_for_update(skip_locked=True)).scalar_one_or_none()
            if job is None:
                return None
            lease_owner = f"{owner}:{process_namespace()}:{uuid.uuid4().hex[:8]}"
            job.status, job.lease_owner = JobStatus.RUNNING, lease_owner
            job.lease_expires_at = now + timedelta(seconds=policy.lease)
            job.attempts += 1
            job.started_at, job.not_before = now, None
            return job.id, lease_owner


def _abandoned_too_often(session: Session, job: Job, owner: str, policy: WorkerSettings, why: str) -> bool:
    """A running job whose worker stopped (crashed, killed or cut off; `why` says how we know):
    counted, and run again, unless it has used its max_attempts, when it fails (True)."""
    study_uid = session.get_one(Study, job.study_id).study_uid  # the job's lock keeps its study
    job.stops += 1
    if job.attempts >= policy.max_attempts:
        stopped = (f"the worker stopped {job.stops} times while running this job" if job.stops == job.attempts
                   else f"the worker stopped while running this job, on attempt {job.attempts} of "
                        f"{policy.max_attempts} ({job.stops} such stops in all; before: {job.error})")
        reason = (f"{stopped} ({why}): the study may be what stops it; the service log "
                  f"around those times says more, and `machaon jobs retry {job.id}` runs it again")
        _finish_failed(session, job, owner, reason, study_uid)
        log.error("job %d (%s) failed: %s", job.id, job.model, reason)
        return True
    add_event(session, owner, "job.lease_expired", study_uid, job=job.id, model=job.model,
              previous_owner=job.lease_owner, attempt=job.attempts + 1, reason=why)
    log.warning("job %d: %s; running it again (attempt %d of %d)",
                job.id, why, job.attempts + 1, policy.max_attempts)
    return False


@functools.cache
def process_namespace() -> str:
    """A short name for this boot of this machine and this process's PID namespace, kept in lease
    owners after "<host>:<pid>": a pid names one process only within both. Containers with the host's
    network share its host name, not its PIDs, and cloned machines may share a name too. Without
    /proc (not Linux) a name of this process's own: no other process's pid can be vouched for."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return uuid.uuid4().hex[:8]
    return hashlib.sha256(f"{boot}:{pid_namespace}".encode()).hexdigest()[:8]


def take_back_own_jobs(store: Store, owner: str, policy: WorkerSettings) -> int:
    """Put back at once the jobs an earlier process of this host, boot and PID namespace left
    running (a crash, kill -9), rather than when their lease runs out; each counts as a stopped run,
    as a lease that ran out does. `owner` is this process's "<host>:<pid>"; returns how many were
    put back. A job of another namespace (a container sharing the host's name), or from before the
    namespace was kept in lease owners, waits for its lease."""
    host = owner.rsplit(":", 1)[0]
    with store.session.begin() as session:
        jobs = session.execute(
            select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_owner.startswith(f"{host}:"))
            .with_for_update(skip_locked=True)).scalars().all()
        taken = 0
        for job in jobs:
            pid = _pid_of(job.lease_owner or "", host)
            if pid is None or _machaon_running(pid):
                continue
            why = (f"taken back without waiting for its lease: its worker {job.lease_owner}, an earlier "
                   "process on this host, is no longer running")
            if not _abandoned_too_often(session, job, owner, policy, why):
                job.status, job.lease_owner, job.lease_expires_at, job.not_before = \
                    JobStatus.QUEUED, None, None, None
            taken += 1
    return taken


def _pid_of(lease_owner: str, host: str) -> int | None:
    """The process id in a lease owner "<host>:<pid>:<namespace>:<claim>" of `host` and of our
    namespace; None for another's."""
    parts = lease_owner.split(":")
    ours = len(parts) == 4 and parts[0] == host and parts[2] == process_namespace()
    return int(parts[1]) if ours and parts[1].isdigit() else None


def _machaon_running(pid: int) -> bool:
    """Whether process `pid` is a machaon still running. Our own pid is an earlier process's
    (a container's PID 1 started again: nothing is ours yet), and a pid reused by another program
    is not machaon; where /proc cannot tell, a live process is taken to be one."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: its command line says what it is
        pass
    if not Path("/proc/self").exists():
        return True
    try:
        return b"machaon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # it ended meanwhile
        return False
    except OSError:
        return True


def _finish_failed(session: Session, job: Job, owner: str, reason: str, study_uid: str) -> None:
    job.status, job.error, job.finished_at = JobStatus.FAILED, reason, utcnow()
    job.lease_owner = job.lease_expires_at = None
    add_event(session, owner, "job.failed", study_uid, job=job.id, model=job.model, error=reason,
              attempts=job.attempts)


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float) -> bool:
    with store.session.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.RUNNING or job.lease_owner != owner:
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
            try:
                if not renew_lease(*self.args):
                    return  # taken over: the job's end is recorded by whoever holds it now
            except sqlalchemy.exc.SQLAlchemyError as exc:  # the store busy or away: try again next time
                log.warning("job %d: could not renew its lease: %s", self.args[1], exc)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class Runner:
    """Runs claimed jobs: the part of `machaon serve` (and `machaon worker`) that does the work."""

    def __init__(self, settings: Settings, store: Store, spool: Spool, ort_sessions: OrtSessions):
        self.settings, self.store, self.spool, self.ort_sessions = settings, store, spool, ort_sessions
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.on_results = lambda: None  # called when a job has queued deliveries (wakes the dispatcher)

    def run_next(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        claimed = claim_job(self.store, self.owner, self.settings.worker)
        if claimed is None:
            return False
        job_id, lease = claimed
        queued = False
        clock = _Stopwatch()
        with _Lease(self.store, job_id, lease, self.settings.worker.lease):
            try:
                queued = self._run(job_id, lease, clock)
            except MAY_PASS as exc:
                self._failed(job_id, lease, str(exc), clock, may_pass=True)
            except CANNOT_PASS as exc:
                self._failed(job_id, lease, str(exc), clock, may_pass=False)
            except Exception as exc:  # a bug must fail one job, not the worker; it may not recur
                log.error("job %d: internal error\n%s", job_id, traceback.format_exc())
                self._failed(job_id, lease, f"internal error: {exc!r} (details in the service log)", clock,
                             may_pass=True)
        if queued:
            self.on_results()
        return True

    def _run(self, job_id: int, lease: str, clock: _Stopwatch) -> bool:
        """Run one job to its end, timing each stage on `clock`; True when it queued deliveries."""
        with self.store.read_session() as session:
            job = session.get(Job, job_id)
            series_row = session.get(SeriesRow, job.series_id) if job and job.series_id is not None else None
            if job is None or series_row is None:
                # Deleted with its study since it was claimed, or a job from before jobs were
                # planned per series (revision 0002): there is nothing to run it on.
                raise JobError("its series is not in the store")
            study_uid, model = series_row.study.study_uid, job.model
            destinations = self._destinations(job)
            # Oldest received first: of two copies of one image, the newest is kept.
            received = sorted(series_row.instances, key=lambda i: (i.received_at, i.id))
            paths = [self.spool.path(i.path) for i in received]
        clock.restart()
        package = load_package(self.settings.models.path, model)
        model_run = self.ort_sessions.get(package, self.settings.inference.precision).run
        clock.lap("load_model")
        series = read_series(paths, self.settings.worker.duplicates)
        clock.lap("read_and_decode")
        x = model_input(series, package.manifest.input)
        clock.lap("prepare")
        size = self.settings.worker.batch_size
        outputs = np.concatenate([model_run(x[i:i + size]) for i in range(0, len(x), size)])
        clock.lap("inference")
        metrics.inference_seconds(model, clock.laps["inference"])
        datasets = results_for(series, outputs, package.manifest)
        clock.lap("encode_results")
        kept = []
        for kind, ds in datasets:
            relative = self.spool.result_path(study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.spool.write(ds, relative)
            kept.append((kind, ds, relative))
        clock.lap("write_results")
        if series.dropped:
            log.warning("job %d: %s", job_id, "; ".join(series.dropped))
        return self._succeed(job_id, lease, study_uid, kept, destinations, clock.laps, series.dropped)

    def _destinations(self, job: Job) -> list[str]:
        """Where the job's results go: what its rule said when the job was planned. A job planned
        before destinations were kept with it (revision 0004) asks its rule as configured now."""
        if job.destinations is not None:
            return list(json.loads(job.destinations))
        rule = next((r for r in self.settings.rules if r.name == job.rule), None)
        if rule is None:
            log.warning("job %d: its rule %r is no longer configured; its results go nowhere",
                        job.id, job.rule)
        return rule.destinations if rule else []

    def _succeed(self, job_id: int, lease: str, study_uid: str, kept: list, destinations: list[str],
                 seconds: dict[str, float], dropped: list[str]) -> bool:
        now = utcnow()
        with self.store.session.begin() as session:
            # The study's row first: the jobs that make the same objects are all of this study, so
            # one at a time sees which objects are already on their way (each is sent once).
            study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
            if study_id is None or session.get(Study, study_id, with_for_update=True) is None:
                log.warning("job %d: its study was deleted while it ran; its results are not recorded",
                            job_id)
                return False
            job = session.get_one(Job, job_id, with_for_update=True)  # the study's lock keeps it
            if job.status != JobStatus.RUNNING or job.lease_owner != lease:
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
                session.add_all(Delivery(result_id=result.id, destination=d, status=DeliveryStatus.PENDING,
                                         attempts=0, next_attempt_at=now)
                                for d in destinations if d not in known)
            job.status, job.finished_at, job.lease_owner = JobStatus.SUCCEEDED, now, None
            job.timings, job.error = json.dumps(seconds), None  # an earlier attempt's error is in the history
            add_event(session, self.owner, "job.succeeded", study_uid, job=job_id, model=job.model,
                      results=[ds.SOPInstanceUID for _, ds, _ in kept], destinations=destinations,
                      seconds=seconds, dropped_copies=dropped or None)
        log.info("job %d (%s) succeeded: %s", job_id, job.model, ", ".join(k for k, _, _ in kept))
        metrics.job_finished(job.model, "succeeded", sum(seconds.values()), seconds)
        return bool(destinations)

    def _failed(self, job_id: int, lease: str, reason: str, clock: _Stopwatch, may_pass: bool) -> None:
        """Record a failed run: queued again after a backoff when the failure may pass and attempts
        remain, else failed with the reason."""
        policy = self.settings.worker
        with self.store.session.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:  # deleted with its study while it ran
                log.warning("job %d: its study was deleted while it ran (%s)", job_id, reason)
                return
            if job.status != JobStatus.RUNNING or job.lease_owner != lease:
                log.warning("job %d was taken over while it ran (%s)", job_id, reason)
                return
            study_uid = session.get_one(Study, job.study_id).study_uid  # the job's lock keeps its study
            job.timings = json.dumps(clock.laps)
            if not may_pass or job.attempts >= policy.max_attempts:
                if may_pass:
                    reason = f"{reason} (attempt {job.attempts} of {policy.max_attempts}: no more retries)"
                _finish_failed(session, job, self.owner, reason, study_uid)
                outcome = "failed"
            else:
                delay = min(policy.retry_initial * 2 ** (job.attempts - 1), policy.retry_max)
                job.status, job.error = JobStatus.QUEUED, f"attempt {job.attempts} failed: {reason}"
                job.not_before = utcnow() + timedelta(seconds=delay)
                job.lease_owner = job.lease_expires_at = None
                add_event(session, self.owner, "job.retry_scheduled", study_uid, job=job_id,
                          model=job.model, error=reason, attempt=job.attempts, retry_in_s=delay)
                outcome = "retried"
        metrics.job_finished(job.model, outcome, sum(clock.laps.values()), None)
        if outcome == "failed":
            log.warning("job %d (%s) failed: %s", job_id, job.model, reason)
        else:
            log.warning("job %d (%s) attempt %d of %d failed, trying again in %.0f s: %s", job_id,
                        job.model, job.attempts, policy.max_attempts, delay, reason)


class _Stopwatch:
    """Seconds spent in each stage of a job, kept in its job.succeeded event."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now


class Workers:
    """Worker threads that run jobs until stopped; `wake` makes them look at once."""

    def __init__(self, runner: Runner, threads: int, idle_s: float = 1.0):
        self.runner, self.idle_s = runner, idle_s
        self.stopping, self.woken = threading.Event(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> None:
        """Take back the jobs an earlier process on this host left running, then start the threads."""
        try:
            taken = take_back_own_jobs(self.runner.store, self.runner.owner, self.runner.settings.worker)
        except sqlalchemy.exc.SQLAlchemyError as exc:  # their leases bring them back all the same
            log.warning("could not look for jobs an earlier process left running: %s", exc)
        else:
            if taken:
                log.warning("took back %d job(s) left running by an earlier process on this host", taken)
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
                log.exception("worker: could not claim a job or record its outcome")
            self.woken.wait(self.idle_s)
            self.woken.clear()

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Let running jobs finish, then stop; once `hurry` is set, leave them: this service
        started again on this host takes them back at once, another worker once their leases run
        out; either runs them from the start."""
        self.stopping.set()
        self.woken.set()
        while any(t.is_alive() for t in self.threads) and not (hurry and hurry.is_set()):
            for thread in self.threads:
                thread.join(0.2)
        running = sum(t.is_alive() for t in self.threads)
        if running:
            log.warning("leaving %d running job(s): this service started again on this host takes them "
                        "back at once; another worker once their lease runs out (worker.lease = %.0f s)",
                        running, self.runner.settings.worker.lease)
