"""Sending results to their destinations, with retries, and never twice once acknowledged.

Each (result, destination) pair is a delivery row: pending until the
destination acknowledges it, then sent. A failure is recorded on the row and
retried after a backoff that doubles up to `dispatch.retry_max`; nothing is
dropped while a PACS is down. Results carry deterministic UIDs, so even a send
repeated after a crash (acknowledged, not yet recorded) leaves one copy.

Each destination is sent to in a thread of its own, one at a time: a PACS that
is slow or hangs holds up only its own deliveries, for at most its
`connect_timeout` and `timeout` per network operation, and the others go on.
Stopping waits for the sends in flight up to a deadline and then abandons
them: their deliveries stay pending and are sent again at the next start. How
a result is sent is its destination type's business (senders/); this module
decides what is due, in what batches, and what to record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import metrics
from .config import DispatchSettings, Settings
from .senders import Destination, Outgoing, SendError, abandon_sends, sender_for
from .spool import Spool
from .store import (
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Store,
    Study,
    StudyStatus,
    add_event,
    utcnow,
)

log = logging.getLogger("machaon.dispatch")

# A backlog left by an outage goes in pieces: so many results read and sent per association.
PER_ASSOCIATION = 50


class Dispatcher:
    """The sends in flight: at most one per destination, each in a thread of its own. `run` is
    called every `dispatch.check_every` seconds (and at once when a job has new results)."""

    def __init__(self, settings: Settings, store: Store, spool: Spool) -> None:
        self.settings, self.store, self.spool = settings, store, spool
        self._starting = threading.Lock()  # one round of starts at a time
        self._in_flight: dict[str, Future[int]] = {}
        self._threads: dict[str, threading.Thread] = {}  # the thread of each destination's latest send
        self._stopping = threading.Event()
        self._abandoned = threading.Event()  # sends still running are no longer waited for
        metrics.destinations(settings.destinations)

    def run(self, *, wait: bool = False) -> dict[str, Future[int]]:
        """Start sending the deliveries that are due, in a thread per destination, except at those
        whose previous send is still running (their turn comes at a later call). Returns the sends
        started, by destination; each future's result is how many results it sent. With `wait`,
        returns once they have all finished."""
        started: dict[str, Future[int]] = {}
        with self._starting:
            if self._stopping.is_set():
                return started
            # Destinations busy now are left out of this round even if they finish meanwhile: the
            # rows read below could be the ones they are sending.
            busy = {name for name, send in self._in_flight.items() if not send.done()}
            if busy:
                log.debug("still sending to %s: their results wait for those sends", ", ".join(sorted(busy)))
            for name, rows in _due(self.store, busy).items():
                work = partial(_send_due, self.settings, self.store, self.spool, name, rows, self._stopping,
                               self._abandoned)
                started[name], self._threads[name] = _in_thread(f"dispatch {name}", work)
                self._in_flight[name] = started[name]
        if wait:
            wait_for(started.values())
        return started

    def stop(self, timeout: float, hurry: threading.Event | None = None) -> list[str]:
        """Start no more sends, and wait up to `timeout` seconds (less if `hurry` is set) for those
        in flight, which send no new batch meanwhile. Returns the destinations still being sent
        to: those sends are abandoned (their threads end with the process, and what they had not
        recorded stays pending, neither sent nor failed), and sent again at the next start (the
        same UIDs: the PACS keeps one copy)."""
        with self._starting:
            self._stopping.set()
            running = {name: send for name, send in self._in_flight.items() if not send.done()}
        deadline = time.monotonic() + timeout
        while running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            wait_for(running.values(), timeout=min(0.2, max(deadline - time.monotonic(), 0)))
            running = {name: send for name, send in running.items() if not send.done()}
        if running:
            self._abandoned.set()
            abandon_sends([self._threads[name] for name in running])
            log.warning("still sending to %s: not waited for; what was not recorded as sent is sent again "
                        "at the next start", ", ".join(sorted(running)))
        return sorted(running)


def _in_thread(name: str, work: Callable[[], int]) -> tuple[Future[int], threading.Thread]:
    """`work()` run in a daemon thread (a hung peer must not keep the process alive): its future,
    and the thread."""
    future: Future[int] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(work())
        except BaseException as exc:  # the store failed, or a bug: logged here, kept on the future
            log.exception("%s stopped", name)
            future.set_exception(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return future, thread


def _due(store: Store, busy: set[str]) -> dict[str, list[Any]]:
    """The deliveries due now, by destination, oldest first; none of the `busy` destinations'."""
    with store.read_session() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.attempts, Result.path, Study.study_uid)
            .join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= utcnow(),
                   Delivery.destination.not_in(busy))
            .order_by(Delivery.id)
        ).all()
    by_destination: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_destination[row.destination].append(row)
    return by_destination


def _send_due(settings: Settings, store: Store, spool: Spool, name: str, rows: Sequence[Any],
              stopping: threading.Event, abandoned: threading.Event) -> int:
    """Send the deliveries due at one destination, batch after batch; returns how many were sent."""
    destination = settings.destinations.get(name)
    if destination is None:
        _retry_later(store, settings.dispatch, name, rows, f"destination {name!r} is no longer configured: "
                     "configure it again, or its results wait")
        return 0
    sent = 0
    for i in range(0, len(rows), PER_ASSOCIATION):
        if stopping.is_set():  # shutting down: the rest are still due at the next start
            break
        sent += _send_batch(settings, store, spool, destination, name, rows[i:i + PER_ASSOCIATION], abandoned)
    return sent


def _send_batch(settings: Settings, store: Store, spool: Spool, destination: Destination, name: str,
                rows: Sequence[Any], abandoned: threading.Event) -> int:
    """Send one batch (one association for a DICOM peer) and record each outcome; returns how many
    were sent."""
    def failed(failures: Sequence[Any], why: str) -> None:
        if abandoned.is_set():  # cut off by the shutdown, not by the destination: left as they were
            log.info("sending to %s: %d result(s) left pending at shutdown (%s)", name, len(failures), why)
        else:
            _retry_later(store, settings.dispatch, name, failures, why)

    ready: list[tuple[Any, Outgoing]] = []
    for row in rows:
        try:
            path = spool.path(row.path)
            ready.append((row, Outgoing(path, pydicom.dcmread(path))))
        except (OSError, InvalidDicomError) as exc:
            failed([row], f"cannot read the result {row.path}: {exc}")
    if not ready:
        return 0
    outcomes = sender_for(destination, settings.dicom.ae_title).send([outgoing for _, outgoing in ready])
    sent = handled = 0
    try:
        for row, outgoing in ready:
            error = next(outcomes)
            if error:
                failed([row], str(error))
            else:
                _mark_sent(store, name, row, outgoing.dataset.SOPInstanceUID)
                sent += 1
            handled += 1
    except Exception as exc:  # no connection, or it was lost: the rest waits for the next attempt
        why = str(exc)
        if not isinstance(exc, SendError):  # a bug must not stall this destination or the others
            log.exception("sending to %s failed unexpectedly", name)
            why = f"unexpected error: {exc!r} (details in the service log)"
        failed([row for row, _ in ready[handled:]], why)
    finally:
        outcomes.close()  # releases the association of a batch cut short
    return sent


def _mark_sent(store: Store, name: str, row: Any, sop_uid: str) -> None:
    with store.session.begin() as session:
        # The study's row first, then the delivery's, in the order workers lock them: of two
        # destinations finishing at once, one sees the other's send (_all_delivered).
        study = session.execute(select(Study).where(Study.study_uid == row.study_uid)
                                .with_for_update()).scalar()
        delivery = session.get(Delivery, row.id, with_for_update=True)
        if study is None or delivery is None:  # its study was deleted meanwhile
            return
        now = utcnow()
        delivery.status, delivery.sent_at, delivery.last_error = DeliveryStatus.SENT, now, None
        study.delivered_at = now
        delivery.attempts += 1
        add_event(session, "dispatcher", "result.sent", row.study_uid, destination=name,
                  sop_instance_uid=sop_uid)
        last_received = _all_delivered(session, study)
    metrics.delivery_sent(name)
    if last_received is not None:
        metrics.study_delivered((now - last_received).total_seconds())
    log.info("sent %s to %s", sop_uid, name)


def _all_delivered(session: Session, study: Study) -> datetime | None:
    """When the study's last image was received, if this delivery was its last: the study is
    complete, none of its jobs is still to run, and none of its results waits to be sent."""
    if study.status != StudyStatus.COMPLETE:
        return None
    unfinished = select(Job.id).where(Job.study_id == study.id,
                                      Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    waiting = (select(Delivery.id).join(Result, Result.id == Delivery.result_id)
               .join(Job, Job.id == Result.job_id)
               .where(Job.study_id == study.id, Delivery.status == DeliveryStatus.PENDING))
    if session.scalar(unfinished.limit(1)) is not None or session.scalar(waiting.limit(1)) is not None:
        return None
    return study.last_received_at


def _retry_later(store: Store, policy: DispatchSettings, name: str, rows: Sequence[Any], error: str) -> None:
    """Record a failed attempt at each of `rows`, each retried after its own backoff; one log line."""
    if not rows:
        return
    metrics.delivery_failed(name, len(rows))
    for i in range(0, len(rows), PER_ASSOCIATION):  # short transactions: ingest shares the store
        _record_failures(store, policy, name, rows[i:i + PER_ASSOCIATION], error)
    first = rows[0]
    delay = min(policy.retry_initial * 2 ** first.attempts, policy.retry_max)
    what = "" if len(rows) == 1 else f" for {len(rows)} results"
    log.warning("sending to %s failed%s (attempt %d, next in %.0f s): %s", name, what, first.attempts + 1,
                delay, error)


def _record_failures(store: Store, policy: DispatchSettings, name: str, rows: Sequence[Any],
                     error: str) -> None:
    with store.session.begin() as session:
        for row in rows:
            delay = min(policy.retry_initial * 2 ** row.attempts, policy.retry_max)
            delivery = session.get(Delivery, row.id, with_for_update=True)
            if delivery is None:  # its study was deleted meanwhile
                continue
            delivery.attempts = row.attempts + 1
            delivery.last_error = error
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
            add_event(session, "dispatcher", "result.send_failed", row.study_uid, destination=name,
                      error=error, attempt=row.attempts + 1, retry_in_s=delay)
