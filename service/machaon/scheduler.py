"""APScheduler wiring: the periodic jobs `machaon serve` runs in the background."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from .completion import next_due, run_completion
from .config import Settings
from .dispatch import Dispatcher
from .planner import plan_jobs
from .spool import Spool
from .store import Store
from .worker import Workers

# How often unfinished transfers are looked for.
SWEEP_EVERY_S = 300


class Scheduler:
    """The service's periodic jobs, any of which can be brought forward from any thread."""

    def __init__(self):
        self.aps = BackgroundScheduler(
            timezone="UTC",
            # One run at a time per job; a run missed while busy is skipped, not
            # queued. A job that raises is logged by APScheduler and runs again.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self.aps.start()

    def run_soon(self, job_id: str, at: datetime | None = None) -> None:
        """Run `job_id` at `at` (now by default) when that is before its next run.

        Safe from the scheduler's own jobs: APScheduler's shutdown holds its job-store
        lock while it waits for running jobs, so a job touching the scheduler then would
        wait for ever; once `stop` has begun this does nothing."""
        with self._lock:
            if self._stopped:
                return
            job = self.aps.get_job(job_id)
            at = at or datetime.now(UTC)
            if job and job.next_run_time and at < job.next_run_time:
                job.modify(next_run_time=at)

    def stop(self) -> None:
        """Stop, letting the jobs that are running finish."""
        with self._lock:
            self._stopped = True
        self.aps.shutdown(wait=True)


def build_scheduler(settings: Settings, store: Store, spool: Spool,
                    studies_in_flight: Callable[[], Collection[str]],
                    workers: Workers, dispatcher: Dispatcher) -> Scheduler:
    scheduler = Scheduler()

    def complete_and_plan():
        run_completion(store, settings.completion, studies_in_flight)
        if plan_jobs(store, settings.rules):
            workers.wake()
        # Look again the moment the next study is due to go quiet, not up to check_every later.
        due = next_due(store, settings.completion)  # naive UTC, or None
        if due and (due := due.replace(tzinfo=UTC)) > datetime.now(UTC):
            scheduler.run_soon("completion", due)

    aps = scheduler.aps
    aps.add_job(complete_and_plan, "interval", id="completion", seconds=settings.completion.check_every)
    aps.add_job(dispatcher.run, "interval", id="dispatch", seconds=settings.dispatch.check_every)
    # A transfer being written touches its file with every PDU, and pynetdicom
    # drops an association silent for network_timeout: a file untouched for
    # twice that belongs to no live association.
    aps.add_job(spool.sweep_incoming, "interval", id="sweep-incoming",
                seconds=SWEEP_EVERY_S, args=[2 * settings.dicom.network_timeout])
    return scheduler
