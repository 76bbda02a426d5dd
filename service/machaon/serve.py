"""`machaon serve`: the DICOM listener, the scheduler, the workers and the dispatcher in one
process; `machaon worker`: only the workers. Both run until SIGTERM or Ctrl-C, after the
checks in startup.py. `machaon serve` also serves the REST API and web page (api/) unless
api.enabled is false.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

from .config import Settings
from .dispatch import Dispatcher
from .inference import OrtSessions
from .scheduler import Scheduler, build_scheduler
from .scp import StorageSCP
from .startup import (
    Stopped,
    Waiting,
    check_models,
    check_tls,
    open_spool,
    open_store,
    reconcile_spool,
    start_listener,
)
from .store import Store
from .worker import Runner, Workers

if TYPE_CHECKING:
    from .api.app import Hooks
    from .api.server import ApiServer

log = logging.getLogger("machaon.serve")


def serve(settings: Settings, on_ready=None) -> None:
    """Run until SIGTERM or Ctrl-C; a second Ctrl-C aborts transfers in flight.

    `on_ready(stopping)`, if given, runs in its own thread once everything is up (the demo)."""
    until_stopped(lambda stopping, hurry: _run(settings, stopping, hurry, on_ready),
                   "letting transfers, jobs and sends in flight finish (up to "
                   f"{settings.dicom.shutdown_grace:.0f} s; Ctrl-C again leaves them)")


def work(settings: Settings) -> None:
    """`machaon worker`: only the job workers, beside a `machaon serve` that shares the
    job store and the spool, until SIGTERM or Ctrl-C."""
    until_stopped(lambda stopping, hurry: _work(settings, stopping, hurry),
                   "letting running jobs finish (Ctrl-C again leaves them to another worker)")


def until_stopped(run, finishing: str) -> None:
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
    except Stopped:  # while start-up waited for the database or a port: nothing was started
        log.info("stopped before start-up ended")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")


def _run(settings: Settings, stopping: threading.Event, hurry: threading.Event, on_ready=None) -> None:
    waiting = Waiting(settings, stopping)  # one deadline for all that start-up waits for
    check_models(settings)
    check_tls(settings)
    spool = open_spool(settings)
    store = open_store(settings, wait=waiting)
    api = hooks = None
    try:
        # The API's port is taken before the listener's, so that either in use stops start-up
        # before any image is accepted; it answers once everything it drives is running.
        if settings.api.enabled:
            api, hooks = _bind_api(settings, store, waiting)
        started = time.time()
        scp = start_listener(settings, store, spool, waiting)
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
        if api and hooks:
            _wire_api(hooks, settings, scp, scheduler, workers, runner)
            api.start()
        if on_ready:
            threading.Thread(target=on_ready, args=(stopping,), name="on-ready", daemon=True).start()
        while not stopping.wait(1):
            pass
        # The API first: nothing new is asked of the parts stopping after it.
        if api:
            api.stop()
        _stop_within(settings.dicom.shutdown_grace, hurry, scp, scheduler, workers, dispatcher)
    finally:
        if api:
            api.stop()
        store.dispose()


def _stop_within(grace: float, hurry: threading.Event, scp: StorageSCP, scheduler: Scheduler,
                 workers: Workers, dispatcher: Dispatcher) -> None:
    """One grace period for everything in flight, whatever the backlog: transfers in, running jobs
    and sends out may finish until the deadline (or a second Ctrl-C); what is still running then is
    left. A transfer left is not acknowledged, so its sender sends it again; a job left goes back
    to the queue; a send left stays pending and goes again at the next start (the same UIDs)."""
    deadline = time.monotonic() + grace
    late = threading.Event()  # set at the deadline, or by a second Ctrl-C

    def watch() -> None:
        hurry.wait(grace)
        late.set()
    threading.Thread(target=watch, name="stop-deadline", daemon=True).start()
    # Workers take no new job from now on, while transfers in finish beside them.
    stopping_workers = threading.Thread(target=workers.stop, args=(late,), name="stop-workers", daemon=True)
    stopping_workers.start()
    scp.stop(grace, late)
    scheduler.stop(late)
    stopping_workers.join()  # by the deadline: workers.stop leaves running jobs once `late` is set
    dispatcher.stop(max(deadline - time.monotonic(), 0), late)


def _bind_api(settings: Settings, store: Store, waiting: Waiting) -> tuple[ApiServer, Hooks]:
    # Imported here: a service with api.enabled = false does without FastAPI.
    from .api.app import Hooks, create_app
    from .api.server import ApiServer

    hooks = Hooks()
    api = ApiServer(settings, create_app(settings, store, hooks))
    api.bind(waiting)
    return api, hooks


def _wire_api(hooks: Hooks, settings: Settings, scp: StorageSCP, scheduler: Scheduler, workers: Workers,
              runner: Runner) -> None:
    """What the API's actions wake, and what its /readyz and /api/v1/models look at, in this process."""
    hooks.jobs_queued = workers.wake
    hooks.deliveries_due = lambda: scheduler.run_soon("dispatch")
    hooks.studies_completed = lambda: scheduler.run_soon("completion")
    hooks.listener_problem = lambda: _listener_problem(settings, scp)
    hooks.ort_sessions = runner.ort_sessions


def _listener_problem(settings: Settings, scp: StorageSCP) -> str | None:
    """None while the DICOM listener accepts associations. Asked without connecting: a probe
    connection would hold an association slot until pynetdicom's timeout."""
    server, where = scp.server, f"{settings.dicom.host}:{settings.dicom.port}"
    sock = server.socket if server is not None else None
    try:
        listening = sock is not None and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # closed
        listening = False
    if not listening:
        return f"the DICOM listener on {where} has stopped"
    busy = scp.established()
    if busy >= settings.dicom.max_associations:
        return (f"all {busy} associations dicom.max_associations allows are in use: new ones are "
                "rejected until one ends")
    return None


def _work(settings: Settings, stopping: threading.Event, hurry: threading.Event) -> None:
    if settings.worker.threads == 0:
        raise settings.error("worker.threads", "is 0: a worker without threads would run nothing")
    waiting = Waiting(settings, stopping)
    check_models(settings)
    spool = open_spool(settings)
    store = open_store(settings, wait=waiting)
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
