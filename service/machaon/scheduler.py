"""APScheduler wiring: the periodic jobs `machaon serve` runs in the background."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.schedulers.background import BackgroundScheduler

from .completion import next_due, run_completion
from .config import Settings
from .dispatch import Dispatcher
from .planner import plan_jobs
from .retention import Retention
from .spool import Spool
from .store import Store
from .worker import Workers

# How often unfinished transfers are looked for.
SWEEP_EVERY_S = 300
# How often retention looks at free space (and, every 10 minutes, at keep_days); its first run
# comes this soon after start.
RETENTION_EVERY_S = 60
RETENTION_FIRST_S = 30
# A job whose runs are skipped because its last run is still going is said again at most this often.
SKIPPED_REPEAT_S = 600


class _SkippedRunsOnce(logging.Filter):
    """APScheduler warns each time a job falls due while its previous run is still going: every
    check_every seconds (2 s for dispatch) for as long as that run lasts, and whenever a job is
    brought forward meanwhile. The first warning of each job passes, then one per
    SKIPPED_REPEAT_S, counting those left out."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._said: dict[str, tuple[float, int]] = {}  # job -> when said last, how many left out since

    def filter(self, record: logging.LogRecord) -> bool:
        if "skipped: maximum number of running instances" not in str(record.msg):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        job = str(getattr(args[0], "id", "")) if args else ""  # the Job (its text changes with its next run)
        now = time.monotonic()
        with self._lock:
            said, left_out = self._said.get(job, (None, 0))
            if said is not None and now - said < SKIPPED_REPEAT_S:
                self._said[job] = (said, left_out + 1)
                return False
            self._said[job] = (now, 0)
        record.msg = (f"{record.msg}: its previous run is still going; later runs are skipped until it ends "
                      f"(said at most every {SKIPPED_REPEAT_S // 60} minutes"
                      + (f", {left_out} time(s) since the last)" if left_out else ")"))
        return True


_SKIPPED_RUNS_ONCE = _SkippedRunsOnce()

log = logging.getLogger("machaon.scheduler")


class _OwnThreads(BaseExecutor):
    """Runs each run of a job in a daemon thread of its own. APScheduler's thread pool is joined
    when the process exits, so one run stuck (on a database that stopped answering) would keep a
    stopped service from exiting; this one is left behind once Scheduler.stop's deadline passes."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[threading.Thread] = set()
        self._running_lock = threading.Lock()

    def _do_submit_job(self, job, run_times) -> None:
        def run() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)
            finally:
                with self._running_lock:
                    self.running.discard(thread)
        thread = threading.Thread(target=run, name=f"scheduler-{job.id}", daemon=True)
        with self._running_lock:
            self.running.add(thread)
        thread.start()

    def still_running(self) -> list[threading.Thread]:
        with self._running_lock:
            return list(self.running)


class Scheduler:
    """The service's periodic jobs, any of which can be brought forward from any thread."""

    def __init__(self):
        logging.getLogger("apscheduler.scheduler").addFilter(_SKIPPED_RUNS_ONCE)  # once, however often called
        self._runs = _OwnThreads()
        self.aps = BackgroundScheduler(
            timezone="UTC",
            executors={"default": self._runs},
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

    @property
    def stopping(self) -> bool:
        """Whether `stop` has begun: a long job ends its run early."""
        return self._stopped

    def stop(self, late: threading.Event | None = None) -> None:
        """Stop, letting the runs in progress finish until `late` is set (the end of the shutdown
        grace); one still going then (stuck on a database that stopped answering) is left."""
        with self._lock:
            self._stopped = True
        self.aps.shutdown(wait=False)
        while (running := self._runs.still_running()) and not (late and late.is_set()):
            running[0].join(0.2)
        if running:
            log.warning("leaving %d scheduled task(s) still running: %s", len(running),
                        ", ".join(t.name.removeprefix("scheduler-") for t in running))


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
    retention = Retention(store, spool, settings.spool, stopping=lambda: scheduler.stopping)
    aps.add_job(retention.run, "interval", id="retention", seconds=RETENTION_EVERY_S,
                next_run_time=datetime.now(UTC) + timedelta(seconds=RETENTION_FIRST_S))
    return scheduler
