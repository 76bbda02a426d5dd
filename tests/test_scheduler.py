"""The scheduler stops on SIGTERM even while one of its jobs is touching it."""

from __future__ import annotations

import threading
import time

from machaon.scheduler import Scheduler


def test_stop_while_a_running_job_brings_itself_forward():
    # The completion pass brings its own next run forward. APScheduler's shutdown holds its
    # job-store lock while it waits for running jobs, so that call once left `machaon serve`
    # hanging on SIGTERM for ever.
    scheduler = Scheduler()
    started, proceed, finished = threading.Event(), threading.Event(), threading.Event()

    def job():
        started.set()
        proceed.wait(5)
        scheduler.run_soon("job")
        finished.set()

    scheduler.aps.add_job(job, "interval", id="job", seconds=0.05)
    scheduler.start()
    assert started.wait(5), "the job never ran"
    stopper = threading.Thread(target=scheduler.stop, daemon=True)
    stopper.start()
    time.sleep(0.3)  # the shutdown is now waiting for the running job
    proceed.set()
    stopper.join(5)
    assert not stopper.is_alive(), "stop() is still waiting for its own job"
    assert finished.is_set(), "the running job was not let finish"


def test_run_soon_only_brings_a_job_forward():
    scheduler = Scheduler()
    scheduler.aps.add_job(lambda: None, "interval", id="job", seconds=3600)
    scheduler.aps.start(paused=True)  # the job's next run time changes, the job itself never runs
    try:
        later = scheduler.aps.get_job("job").next_run_time
        scheduler.run_soon("job", later.replace(year=later.year + 1))
        assert scheduler.aps.get_job("job").next_run_time == later
        scheduler.run_soon("job")
        assert scheduler.aps.get_job("job").next_run_time < later
    finally:
        scheduler.stop()
    scheduler.run_soon("job")  # after stop: nothing happens, nothing raises
