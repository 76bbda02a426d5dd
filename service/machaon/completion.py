"""When is a study complete? When nothing has arrived for it for a while.

DICOM has no "end of study" message, so a series and its study are complete
once they have been quiet for `complete_after` seconds, and (for a study) no
association that sent to it is still open. An instance arriving later reopens
them (store.record_instance) and they complete again. A study that never goes
quiet is completed after `force_complete_after` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .config import CompletionSettings
from .store import Instance, SeriesRow, Store, Study, StudyStatus, add_event, utcnow

log = logging.getLogger("machaon.completion")


@dataclass(frozen=True)
class Completed:
    study_uid: str
    series_count: int
    instance_count: int
    forced: bool
    completion_count: int


def complete_quiet_studies(session: Session, quiet_s: float, force_after_s: float,
                           in_flight: Collection[str] = (), actor: str = "scheduler") -> list[Completed]:
    """Complete series and studies that received nothing for `quiet_s` seconds
    (studies in `in_flight` excepted), and studies that have been receiving for
    `force_after_s` seconds (caller commits)."""
    now = utcnow()
    quiet_since = now - timedelta(seconds=quiet_s)
    session.execute(
        update(SeriesRow)
        .where(SeriesRow.status == StudyStatus.RECEIVING, SeriesRow.last_received_at <= quiet_since)
        .values(status=StudyStatus.COMPLETE, completed_at=now)
    )
    # SKIP LOCKED: a study whose row an ingest holds is not quiet anyway.
    due = session.execute(
        select(Study).where(
            Study.status == StudyStatus.RECEIVING,
            ((Study.last_received_at <= quiet_since) & Study.study_uid.not_in(in_flight))
            | (Study.opened_at <= now - timedelta(seconds=force_after_s)),
        ).with_for_update(skip_locked=True)
    ).scalars().all()
    return [complete_study(session, study, actor,
                           forced=study.last_received_at > quiet_since or study.study_uid in in_flight)
            for study in due]


def complete_study(session: Session, study: Study, actor: str, forced: bool) -> Completed:
    """Mark one receiving study, locked by the caller, complete; `forced`: before it went quiet
    (its series still receiving are completed with it)."""
    now = utcnow()
    study.status, study.completed_at = StudyStatus.COMPLETE, now
    study.completion_count += 1
    if forced:
        session.execute(update(SeriesRow)
                        .where(SeriesRow.study_id == study.id, SeriesRow.status == StudyStatus.RECEIVING)
                        .values(status=StudyStatus.COMPLETE, completed_at=now))
    series_count, instance_count = _counts(session, study.id)
    add_event(session, actor, "study.force_completed" if forced else "study.completed",
              study.study_uid, series=series_count, instances=instance_count,
              completion_count=study.completion_count)
    return Completed(study.study_uid, series_count, instance_count, forced, study.completion_count)


def _counts(session: Session, study_id: int) -> tuple[int, int]:
    row = session.execute(
        select(func.count(func.distinct(SeriesRow.id)), func.count(Instance.id))
        .select_from(SeriesRow).outerjoin(Instance, Instance.series_id == SeriesRow.id)
        .where(SeriesRow.study_id == study_id)
    ).one()
    return row[0], row[1]


def next_due(store: Store, settings: CompletionSettings) -> datetime | None:
    """When the next study being received will have been quiet for `complete_after` (naive UTC),
    so the scheduler can look then rather than at its next tick; None when none is due later."""
    quiet = timedelta(seconds=settings.complete_after)
    with store.read_session() as session:
        last = session.execute(select(func.min(Study.last_received_at)).where(
            Study.status == StudyStatus.RECEIVING, Study.last_received_at > utcnow() - quiet)
        ).scalar_one_or_none()
    return last + quiet if last else None


def run_completion(store: Store, settings: CompletionSettings,
                   in_flight: Callable[[], Collection[str]] = frozenset) -> list[Completed]:
    """One pass of the scheduler's completion job, with a log line per study."""
    with store.session.begin() as session:
        done = complete_quiet_studies(session, settings.complete_after,
                                      settings.force_complete_after, in_flight())
    for c in done:
        how = (f"force-completed after {settings.force_complete_after:.0f} s of receiving"
               if c.forced else f"complete after {settings.complete_after:g} s quiet")
        again = f" (completion {c.completion_count})" if c.completion_count > 1 else ""
        log.info("study %s %s: %d series, %d instances%s", c.study_uid, how,
                 c.series_count, c.instance_count, again)
    return done
