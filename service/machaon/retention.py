"""Retention: which studies' spool files may go, and when (spool.keep_days, spool.emergency_free_mb).

A study may lose its files only when nothing is left to do with them: it is complete and planned,
every job of it succeeded or was cancelled (a failed one may be retried, which needs the images),
and every result was delivered. Its rows, jobs and history stay; studies.files_removed_at says
when its files went, and one event per study says how many.

A late instance may reopen a study while its files are being removed. So the study is marked
(files_removed_at) in one transaction that locks its row and checks it again, and only after that
commits are its files removed, each under the lock its instance is kept under and only while the
study is still complete and not reopened: an instance that arrived after the mark keeps its file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, exists, not_, or_, select, update
from sqlalchemy.orm import Session

from .config import SpoolSettings
from .spool import Spool
from .store import (
    Delivery,
    DeliveryStatus,
    Event,
    Instance,
    Job,
    JobStatus,
    Result,
    SeriesRow,
    Store,
    Study,
    StudyStatus,
    add_event,
    utcnow,
)

log = logging.getLogger("machaon.retention")

ACTOR = "retention"
REMOVED = "study.files_removed"
# Studies marked per query; each is marked in a transaction of its own, so ingest never waits long.
BATCH = 5
# How often keep_days is applied; free space (emergency_free_mb) is looked at on every run.
KEEP_DAYS_EVERY_S = 600

# A study's last activity: its completion or its latest delivery, whichever was later.
LAST_ACTIVITY = case((Study.delivered_at > Study.completed_at, Study.delivered_at), else_=Study.completed_at)


def removable() -> list:
    """The conditions a study must meet to lose its files (see the module's docstring)."""
    unfinished_job = exists().where(Job.study_id == Study.id,
                                    Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED)))
    undelivered = exists().where(Job.study_id == Study.id, Result.job_id == Job.id,
                                 Delivery.result_id == Result.id, Delivery.status == DeliveryStatus.PENDING)
    return [
        Study.status == StudyStatus.COMPLETE,
        Study.planned_count >= Study.completion_count,  # its latest completion's jobs exist
        Study.planning_error.is_(None),  # some of it could not be planned: an operator may act
        not_(unfinished_job),
        not_(undelivered),
        # Not removed since it was last active: a study completed again after a removal has new files.
        or_(Study.files_removed_at.is_(None), Study.files_removed_at < LAST_ACTIVITY),
    ]


@dataclass(frozen=True)
class Mark:
    """A study marked for removal: the moment, and what it looked like then."""

    study_id: int
    study_uid: str
    at: datetime
    opened_at: datetime
    previous: datetime | None = None  # when its files were removed before, if they were


@dataclass(frozen=True)
class Removal:
    study_uid: str
    files: int
    bytes: int
    reason: str


class Retention:
    """The scheduler's retention job: `run` once soon after start, then every minute or so."""

    def __init__(self, store: Store, spool: Spool, settings: SpoolSettings,
                 free_bytes: Callable[[], int] | None = None, stopping: Callable[[], bool] = lambda: False):
        self.store, self.spool, self.settings = store, spool, settings
        self.free_bytes = free_bytes or spool.free_bytes
        self.stopping = stopping
        self._resumed = False
        self._said_stuck = False  # the warning that nothing is left to remove, said once until there is room
        self._keep_days_due = 0.0  # time.monotonic() of the next keep_days pass

    def run(self) -> list[Removal]:
        done: list[Removal] = []
        if not self._resumed:  # a removal a stop or a crash interrupted
            done += self.resume()
            self._resumed = True
        if self.settings.keep_days and time.monotonic() >= self._keep_days_due:
            done += self.remove_old()
            self._keep_days_due = time.monotonic() + KEEP_DAYS_EVERY_S
        if self.settings.emergency_free_mb:
            done += self.make_room()
        if done:
            log.info("retention: removed the spool files of %d finished studies (%d files, %.1f MiB)",
                     len(done), sum(r.files for r in done), sum(r.bytes for r in done) / 2**20)
        return done

    def remove_old(self) -> list[Removal]:
        """Studies whose last activity is more than keep_days ago, in the order they were received."""
        cutoff = utcnow() - timedelta(days=self.settings.keep_days)
        done: list[Removal] = []
        after = 0
        while not self.stopping():
            with self.store.read_session() as session:
                ids = list(session.execute(
                    select(Study.id).where(Study.id > after, Study.completed_at < cutoff,
                                           LAST_ACTIVITY < cutoff, *removable())
                    .order_by(Study.id).limit(BATCH)).scalars())
            if not ids:
                break
            after = ids[-1]
            done += self._remove_each(ids, "keep_days", LAST_ACTIVITY < cutoff)
        return done

    def make_room(self) -> list[Removal]:
        """Below emergency_free_mb free, removable studies oldest first until it is free again."""
        wanted = self.settings.emergency_free_mb * 2**20
        done: list[Removal] = []
        tried: set[int] = set()
        if self.free_bytes() >= wanted:
            self._said_stuck = False
        while self.free_bytes() < wanted and not self.stopping():
            with self.store.read_session() as session:
                ids = list(session.execute(
                    select(Study.id).where(Study.id.not_in(tried), *removable())
                    .order_by(LAST_ACTIVITY, Study.id).limit(1)).scalars())
            if not ids:
                if not self._said_stuck:
                    self._said_stuck = True
                    log.warning("retention: %.0f MiB free in the spool, under spool.emergency_free_mb (%d), "
                                "and no finished, delivered study is left to remove: look at the failed "
                                "jobs and deliveries (`machaon jobs list --status failed`, `machaon "
                                "deliveries list --status failed`)",
                                self.free_bytes() / 2**20, self.settings.emergency_free_mb)
                break
            tried.update(ids)
            done += self._remove_each(ids, "emergency_free_mb")
        return done

    def resume(self) -> list[Removal]:
        """Finish the removals a stop or a crash left between the mark and the event saying it was
        done: studies marked, not reopened since, without the event."""
        finished = exists().where(Event.study_uid == Study.study_uid, Event.action == REMOVED,
                                  Event.at >= Study.files_removed_at)
        with self.store.read_session() as session:
            rows = session.execute(
                select(Study.id, Study.study_uid, Study.files_removed_at, Study.opened_at).where(
                    Study.files_removed_at.is_not(None), Study.status == StudyStatus.COMPLETE,
                    Study.opened_at < Study.files_removed_at, not_(finished))).all()
        # (files_removed_at is never None here: the query says so)
        marks = [Mark(row.id, row.study_uid, row.files_removed_at or row.opened_at, row.opened_at)
                 for row in rows]
        done = []
        for mark in marks:
            if self.stopping():
                break
            if removal := self.remove_files(mark, "resumed"):
                done.append(removal)
        return done

    def _remove_each(self, ids: list[int], reason: str, *still) -> list[Removal]:
        done = []
        for study_id in ids:
            if self.stopping():
                break
            mark = mark_removal(self.store, study_id, *still)
            if mark and (removal := self.remove_files(mark, reason)):
                done.append(removal)
        return done

    def remove_files(self, mark: Mark, reason: str) -> Removal | None:
        """Remove the marked study's instance and result files, stopping if it is reopened
        meanwhile; then its empty folders, and one event saying what went. None if it was reopened
        before any went."""
        with self.store.read_session() as session:
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .join(SeriesRow, SeriesRow.id == Instance.series_id)
                .where(SeriesRow.study_id == mark.study_id).order_by(Instance.id)).all()
            results = session.execute(
                select(Result.sop_instance_uid, Result.path).join(Job, Job.id == Result.job_id)
                .where(Job.study_id == mark.study_id).distinct()).all()
        files = size = 0
        reopened = False
        for sop_instance_uid, relative in [*instances, *results]:
            with self.spool.instance_lock(sop_instance_uid):
                reopened = not still_marked(self.store, mark)
                if reopened:
                    log.info("study %s was reopened while its files were being removed: the rest stay",
                             mark.study_uid)
                    break
                removed = self.spool.remove_kept(relative)
            files, size = files + bool(removed), size + removed
        else:
            self.spool.remove_empty_folders(mark.study_uid)
        with self.store.session.begin() as session:
            if reopened and not files:  # before any file went: it keeps them all, as if never marked
                session.execute(update(Study).where(Study.id == mark.study_id,
                                                    Study.files_removed_at == mark.at)
                                .values(files_removed_at=mark.previous))
                return None
            add_event(session, ACTOR, REMOVED, mark.study_uid, files=files, bytes=size, reason=reason)
        log.debug("study %s: removed %d files (%d bytes) from the spool (%s)",
                  mark.study_uid, files, size, reason)
        return Removal(mark.study_uid, files, size, reason)


def mark_removal(store: Store, study_id: int, *still) -> Mark | None:
    """Mark one study as losing its files if it still may (and still meets `still`), its row locked
    against a late instance, an operator or the planner; None if it may not."""
    with store.session.begin() as session:
        # The lock first, then the check: a check made before the lock could be stale.
        locked = session.execute(select(Study.id).where(Study.id == study_id).with_for_update()).first()
        if locked is None or not _still_removable(session, study_id, *still):
            return None
        study_uid, opened_at, previous = session.execute(select(
            Study.study_uid, Study.opened_at, Study.files_removed_at).where(Study.id == study_id)).one()
        now = utcnow()
        session.execute(update(Study).where(Study.id == study_id).values(files_removed_at=now))
    return Mark(study_id, study_uid, now, opened_at, previous)


def _still_removable(session: Session, study_id: int, *still) -> bool:
    query = select(Study.id).where(Study.id == study_id, *removable(), *still)
    return session.execute(query).first() is not None


def still_marked(store: Store, mark: Mark) -> bool:
    """Whether the study is as it was marked: complete, and not reopened by a late instance."""
    with store.read_session() as session:
        row = session.execute(select(Study.status, Study.opened_at, Study.files_removed_at)
                              .where(Study.id == mark.study_id)).first()
    return row is not None and tuple(row) == (StudyStatus.COMPLETE, mark.opened_at, mark.at)


def images_removed(session: Session, study: Study) -> bool:
    """Whether some of the study's instances have lost their files: received before its files were
    last removed, and not received again since."""
    if study.files_removed_at is None:
        return False
    return session.execute(select(exists().where(
        SeriesRow.study_id == study.id, Instance.series_id == SeriesRow.id,
        Instance.received_at <= study.files_removed_at))).scalar_one()


def removed_reason(session: Session, study_uid: str) -> str:
    """The setting that had the study's files removed last, for an operator's message."""
    detail = session.execute(select(Event.detail).where(Event.study_uid == study_uid, Event.action == REMOVED)
                             .order_by(Event.id.desc()).limit(1)).scalar_one_or_none() or ""
    return "spool.emergency_free_mb" if "emergency_free_mb" in detail else "spool.keep_days"

