"""`machaon serve`: the DICOM listener, the scheduler, the workers and the dispatcher in one
process; `machaon worker`: only the workers. Both run until SIGTERM or Ctrl-C, after the
checks in startup.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from .config import Settings
from .dispatch import Dispatcher
from .inference import OrtSessions
from .scheduler import build_scheduler
from .startup import check_models, check_tls, open_spool, open_store, reconcile_spool, start_listener
from .worker import Runner, Workers

log = logging.getLogger("machaon.serve")


def serve(settings: Settings, on_ready=None) -> None:
    """Run until SIGTERM or Ctrl-C; a second Ctrl-C aborts transfers in flight.

    `on_ready(stopping)`, if given, runs in its own thread once everything is up (the demo)."""
    _until_stopped(lambda stopping, hurry: _run(settings, stopping, hurry, on_ready),
                   f"letting transfers in flight finish (up to {settings.dicom.shutdown_grace:.0f} s; "
                   "Ctrl-C again aborts them)")


def work(settings: Settings) -> None:
    """`machaon worker`: only the job workers, beside a `machaon serve` that shares the
    job store and the spool, until SIGTERM or Ctrl-C."""
    _until_stopped(lambda stopping, hurry: _work(settings, stopping, hurry),
                   "letting running jobs finish (Ctrl-C again leaves them to another worker)")


def _until_stopped(run, finishing: str) -> None:
    """`run(stopping, hurry)` with SIGTERM and Ctrl-C setting `stopping`, and a second one `hurry`."""
    stopping, hurry = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            hurry.set()
            return
        log.info("%s: stopping; %s", signal.Signals(signum).name, finishing)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(stopping, hurry)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")


def _run(settings: Settings, stopping: threading.Event, hurry: threading.Event, on_ready=None) -> None:
    check_models(settings)
    check_tls(settings)
    spool = open_spool(settings)
    store = open_store(settings)
    try:
        started = time.time()
        scp = start_listener(settings, store, spool)
        # Once the port is ours, no other machaon is using this spool: what
        # incoming/ held before we started was never acknowledged.
        spool.sweep_incoming(untouched_for_s=time.time() - started)
        threading.Thread(target=reconcile_spool, args=(store, spool, scp.index, started),
                         name="reconcile", daemon=True).start()
        runner = Runner(settings, store, spool, OrtSessions(settings.inference.runtime_options()))
        workers = Workers(runner, settings.worker.threads)
        dispatcher = Dispatcher(settings, store, spool)
        scheduler = build_scheduler(settings, store, spool, scp.studies_in_flight, workers, dispatcher)
        # New results are sent at once rather than at the dispatcher's next tick.
        runner.on_results = lambda: scheduler.run_soon("dispatch")
        scheduler.start()
        workers.start()
        if on_ready:
            threading.Thread(target=on_ready, args=(stopping,), name="on-ready", daemon=True).start()
        while not stopping.wait(1):
            pass
        # One grace period for everything in flight: transfers in, then sends out.
        deadline = time.monotonic() + settings.dicom.shutdown_grace
        scp.stop(settings.dicom.shutdown_grace, hurry)
        scheduler.stop()
        workers.stop(hurry)
        dispatcher.stop(max(deadline - time.monotonic(), 0), hurry)
    finally:
        store.dispose()


def _work(settings: Settings, stopping: threading.Event, hurry: threading.Event) -> None:
    if settings.worker.threads == 0:
        raise settings.error("worker.threads", "is 0: a worker without threads would run nothing")
    check_models(settings)
    spool = open_spool(settings)
    store = open_store(settings)
    try:
        runner = Runner(settings, store, spool, OrtSessions(settings.inference.runtime_options()))
        workers = Workers(runner, settings.worker.threads)
        workers.start()
        log.info("worker %s: %d thread(s) taking jobs from %s", runner.owner, settings.worker.threads,
                 store.engine.url.render_as_string(hide_password=True))
        while not stopping.wait(1):
            pass
        workers.stop(hurry)
    finally:
        store.dispose()
