"""APScheduler wiring: the periodic jobs `machaon serve` runs in the background."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from .completion import next_due, run_completion
from .config import Settings
from .dispatch import run_dispatch
from .spool import Spool
from .store import Store
from .worker import Workers, plan_jobs

# How often unfinished transfers are looked for.
SWEEP_EVERY_S = 300


def build_scheduler(settings: Settings, store: Store, spool: Spool,
                    studies_in_flight: Callable[[], Collection[str]],
                    workers: Workers) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        timezone="UTC",
        # One run at a time per job; a run missed while busy is skipped, not
        # queued. A job that raises is logged by APScheduler and runs again.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    def complete_and_plan():
        run_completion(store, settings.completion, studies_in_flight)
        if plan_jobs(store, spool, settings.rules):
            workers.wake()
        # Look again the moment the next study is due to go quiet, not up to check_every later.
        due = next_due(store, settings.completion)
        job = scheduler.get_job("completion")
        if due and job and job.next_run_time:
            due = due.replace(tzinfo=UTC)
            if datetime.now(UTC) < due < job.next_run_time:
                job.modify(next_run_time=due)

    scheduler.add_job(complete_and_plan, "interval", id="completion", seconds=settings.completion.check_every)
    scheduler.add_job(run_dispatch, "interval", id="dispatch", seconds=settings.dispatch.check_every,
                      args=[settings, store, spool])
    # A transfer being written touches its file with every PDU, and pynetdicom
    # drops an association silent for network_timeout: a file untouched for
    # twice that belongs to no live association.
    scheduler.add_job(spool.sweep_incoming, "interval", id="sweep-incoming",
                      seconds=SWEEP_EVERY_S, args=[2 * settings.dicom.network_timeout])
    return scheduler

