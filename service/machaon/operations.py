"""What operators see and do: the queries and actions behind the CLI, the REST API and the page.

The three surfaces are thin shells over this module and write no SQL of their own. Each action is
one transaction and records an event naming who took it (`cli:<user>`, `api:<token name>`), so
the audit trail answers "who retried this, and when". Refusals raise an OperationError whose
message says what was wrong and what to do; NotFound and Conflict map to HTTP 404 and 409.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from .completion import complete_study as mark_complete
from .planner import matched, new_job
from .retention import images_removed, removed_reason
from .store import (
    ApiToken,
    Delivery,
    DeliveryStatus,
    Event,
    Instance,
    Job,
    JobStatus,
    Result,
    Role,
    SeriesRow,
    Store,
    Study,
    StudyStatus,
    add_event,
    utcnow,
)

if TYPE_CHECKING:
    from .config import Settings
    from .inference import OrtSessions
    from .rules import Rule


class OperationError(Exception):
    """An operator's request that cannot be done as asked; the message says why and what to do."""

    status_code = 400


class NotFound(OperationError):
    status_code = 404


class Conflict(OperationError):
    """The request is valid, but not in the state the thing is in now."""

    status_code = 409


class Invalid(OperationError):
    status_code = 400


# Jobs an operator may queue again; jobs an operator may cancel.
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)
CANCELLABLE = (JobStatus.QUEUED,)
# How operators see a delivery: pending with an error is failing (retried after a backoff).
DELIVERY_STATES = ("pending", "failed", "sent")
DEFAULT_LIMIT = 100
# Jobs queued again per transaction by retry_failed_jobs.
RETRY_CHUNK = 200


def iso(value: datetime | None) -> str | None:
    """Naive UTC from the store as ISO 8601 with a Z."""
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def parse_since(text: str | None) -> datetime | None:
    """"90s", "30m", "2h", "7d" ago, or a date / date-time (local time unless it says otherwise),
    as naive UTC."""
    if not text:
        return None
    if match := re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        try:
            return utcnow() - timedelta(**{unit: int(match.group(1))})
        except OverflowError:
            raise Invalid(f"since={text!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise Invalid(f"since={text!r} is neither a time ago (30m, 2h, 7d) nor a date "
                      "(2026-12-01, 2026-12-01T08:00)") from None
    # A naive time is the machine's local time, as the operator typing it means.
    return when.astimezone(UTC).replace(tzinfo=None)


def _limit(limit: int | None) -> int:
    if limit is not None and limit < 1:
        raise Invalid(f"limit={limit}: give a positive number")
    return min(limit or DEFAULT_LIMIT, 10_000)


# --- studies ----------------------------------------------------------------------------

def _study_dict(study: Study, series_count: int, instance_count: int) -> dict:
    return {
        "study_uid": study.study_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "status": study.status,
        "series_count": series_count,
        "instance_count": instance_count,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "completed_at": iso(study.completed_at),
        "completion_count": study.completion_count,
        "planning_error": study.planning_error,
        "files_removed_at": iso(study.files_removed_at),  # retention removed its images then
    }


def list_studies(session: Session, status: str | None = None, q: str | None = None,
                 since: datetime | None = None, limit: int | None = DEFAULT_LIMIT) -> list[dict]:
    """Studies, most recently received first, with their series and instance counts; `q` is a
    patient ID, accession number or Study Instance UID (whole, or its end as the tables show it:
    "…8.498.1234"), or a study date (YYYYMMDD)."""
    if status and status not in set(StudyStatus):
        raise Invalid(f"status={status!r}: use one of {', '.join(StudyStatus)}")
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(_limit(limit))
    if status:
        query = query.where(Study.status == status)
    if q and (q := q.strip()):
        query = query.where(or_(Study.patient_id == q, Study.accession_number == q, Study.study_date == q,
                                Study.study_uid.endswith(q.lstrip("…"), autoescape=True)))
    if since:
        query = query.where(Study.last_received_at >= since)
    studies = session.execute(query).scalars().all()
    # Counted for the page of studies shown only: a count over every instance would read them all.
    counts = {study_id: (n_series, n_instances) for study_id, n_series, n_instances in session.execute(
        select(SeriesRow.study_id, func.count(func.distinct(SeriesRow.id)), func.count(Instance.id))
        .outerjoin(Instance, Instance.series_id == SeriesRow.id)
        .where(SeriesRow.study_id.in_([s.id for s in studies])).group_by(SeriesRow.study_id))}
    return [_study_dict(s, *counts.get(s.id, (0, 0))) for s in studies]


def show_study(session: Session, study_uid: str) -> dict:
    """One study with its series, instances, jobs (with their results and deliveries) and history."""
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        raise NotFound(f"no study with Study Instance UID {study_uid} (search by patient ID or "
                       "accession number to find its UID)")
    series = [{
        "series_uid": s.series_uid, "modality": s.modality, "series_number": s.series_number,
        "series_description": s.series_description, "status": s.status, "instance_count": len(s.instances),
        "first_received_at": iso(s.first_received_at), "last_received_at": iso(s.last_received_at),
        "completed_at": iso(s.completed_at),
        "instances": [{
            "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
            "transfer_syntax_uid": i.transfer_syntax_uid, "instance_number": i.instance_number,
            "path": i.path, "size_bytes": i.size_bytes, "calling_ae": i.calling_ae,
            "received_at": iso(i.received_at), "receive_count": i.receive_count,
        } for i in s.instances],
    } for s in study.series]
    shown = _study_dict(study, len(series), sum(len(s.instances) for s in study.series))
    shown["series"] = series
    shown["jobs"] = _study_jobs(session, study.id)
    shown["events"] = [{k: e[k] for k in ("at", "actor", "action", "detail")}
                       for e in _events(session, study_uid=study_uid, oldest_first=True)]
    return shown


def find_study(session: Session, text: str) -> dict:
    """show_study for a whole Study Instance UID, or for its end as the tables show it ("…8.498.12")
    where only one study's UID ends so."""
    end = text.removeprefix("…").removeprefix("...")
    if end == text or not end:
        return show_study(session, text)
    found = session.execute(select(Study.study_uid).where(Study.study_uid.endswith(end, autoescape=True))
                            .limit(2)).scalars().all()
    if len(found) > 1:
        raise Invalid(f"more than one study's UID ends in {end}: give the whole UID "
                      "(`machaon studies list --wide` shows them)")
    if not found:
        raise NotFound(f"no study's UID ends in {end}")
    return show_study(session, found[0])


def _study_jobs(session: Session, study_id: int) -> list[dict]:
    jobs = session.execute(select(Job, SeriesRow.series_uid)
                           .outerjoin(SeriesRow, SeriesRow.id == Job.series_id)
                           .where(Job.study_id == study_id).order_by(Job.id)).all()
    return [{
        "id": job.id, "model": job.model, "rule": job.rule, "series_uid": series_uid,
        "destinations": None if job.destinations is None else json.loads(job.destinations),
        "generation": job.generation, "status": job.status, "attempts": job.attempts, "error": job.error,
        "superseded_by": job.superseded_by, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "results": _results(session, job.id),
    } for job, series_uid in jobs]


def _results(session: Session, job_id: int) -> list[dict]:
    """A job's results, each with the deliveries of its object (an earlier run of the same
    object may have delivered it already)."""
    results = session.execute(select(Result).where(Result.job_id == job_id).order_by(Result.id)).scalars()
    return [{
        "kind": r.kind, "sop_instance_uid": r.sop_instance_uid, "series_uid": r.series_uid, "path": r.path,
        "deliveries": [{"id": d.id, "destination": d.destination, "status": d.status, "attempts": d.attempts,
                        "last_error": d.last_error, "sent_at": iso(d.sent_at)}
                       for d in session.execute(select(Delivery).join(Result, Result.id == Delivery.result_id)
                                                .where(Result.sop_instance_uid == r.sop_instance_uid)
                                                .order_by(Delivery.id)).scalars()],
    } for r in results]


def _locked_study(session: Session, study_uid: str) -> Study:
    study = session.execute(select(Study).where(Study.study_uid == study_uid)
                            .with_for_update()).scalar_one_or_none()
    if study is None:
        raise NotFound(f"no study with Study Instance UID {study_uid}")
    return study


def complete_study(store: Store, study_uid: str, actor: str) -> dict:
    """Complete a study still receiving now, as if it had gone quiet; its jobs are planned next."""
    with store.session.begin() as session:
        study = _locked_study(session, study_uid)
        if study.status != StudyStatus.RECEIVING:
            raise Conflict(f"study {study_uid} is already complete; `reprocess` runs its models again")
        _refuse_if_images_removed(session, study)
        done = mark_complete(session, study, actor, forced=True)
    return {"study_uid": study_uid, "completion_count": done.completion_count,
            "series": done.series_count, "instances": done.instance_count}


def _refuse_if_images_removed(session: Session, study: Study) -> None:
    """Its models cannot run again on images retention removed (the caller holds its row lock)."""
    if study.files_removed_at and images_removed(session, study):
        when = study.files_removed_at.strftime("%Y-%m-%d %H:%M UTC")
        raise Conflict(f"study {study.study_uid}: its images were removed from the spool on {when} "
                       f"({removed_reason(session, study.study_uid)}); send the study again to process it")


def reprocess_study(store: Store, rules: list[Rule], study_uid: str, actor: str,
                    model: str | None = None) -> dict:
    """Queue the jobs today's rules give the study (only `model`'s, if given). The same model
    version makes the same result UIDs, so the PACS keeps one copy; a new version, new ones. A job
    already queued or running for the same series, rule and model is not queued twice."""
    with store.session.begin() as session:
        study = _locked_study(session, study_uid)
        if study.status != StudyStatus.COMPLETE:
            raise Conflict(f"study {study_uid} is still receiving: wait for it to complete, or "
                           "complete it now (`machaon studies complete`)")
        if study.planned_count < study.completion_count:
            raise Conflict(f"study {study_uid} has just completed and its jobs are being planned: "
                           "look at its jobs in a few seconds before reprocessing it")
        _refuse_if_images_removed(session, study)
        planned, problems, _ = matched(session, rules, study.id, study_uid)
        if model:
            planned = [p for p in planned if p[2] == model]
        if not planned:
            what = f"model {model!r}" if model else "any model"
            raise Conflict(f"no rule gives study {study_uid} {what} today"
                           + (f" ({'; '.join(problems)})" if problems else "")
                           + f": `machaon rules test {study_uid}` shows why")
        busy = set(session.execute(select(Job.series_id, Job.rule, Job.model).where(
            Job.study_id == study.id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))).all())
        jobs = [new_job(study.id, series_id, rule, name, max(study.completion_count, 1))
                for series_id, rule, name in planned if (series_id, rule.name, name) not in busy]
        session.add_all(jobs)
        session.flush()
        add_event(session, actor, "study.reprocessed", study_uid, jobs=[j.id for j in jobs],
                  models=sorted({j.model for j in jobs}), already_queued=len(planned) - len(jobs) or None)
    return {"study_uid": study_uid, "jobs": [j.id for j in jobs], "already_queued": len(planned) - len(jobs)}


# --- jobs -------------------------------------------------------------------------------

def _job_dict(job: Job, study: Study, series: SeriesRow | None) -> dict:
    return {
        "id": job.id, "status": job.status, "model": job.model, "rule": job.rule,
        "priority": job.priority, "attempts": job.attempts, "error": job.error,
        "study_uid": study.study_uid, "patient_id": study.patient_id, "patient_name": study.patient_name,
        "accession_number": study.accession_number, "study_description": study.study_description,
        "series_uid": series.series_uid if series else None,
        "series_description": series.series_description if series else None,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at), "not_before": iso(job.not_before),
    }


def _jobs_query(status: str | None = None, model: str | None = None, since: datetime | None = None,
                study_uid: str | None = None):
    if status and status not in set(JobStatus):
        raise Invalid(f"status={status!r}: use one of {', '.join(JobStatus)}")
    query = (select(Job, Study, SeriesRow).join(Study, Study.id == Job.study_id)
             .outerjoin(SeriesRow, SeriesRow.id == Job.series_id))
    if status:
        query = query.where(Job.status == status)
    if model:
        query = query.where(Job.model == model)
    if since:
        query = query.where(or_(Job.created_at >= since, Job.finished_at >= since))
    if study_uid:
        query = query.where(Study.study_uid == study_uid)
    return query


def list_jobs(session: Session, status: str | None = None, model: str | None = None,
              since: datetime | None = None, study_uid: str | None = None,
              limit: int | None = DEFAULT_LIMIT) -> list[dict]:
    """Jobs, newest first."""
    query = _jobs_query(status, model, since, study_uid).order_by(Job.id.desc()).limit(_limit(limit))
    return [_job_dict(*row) for row in session.execute(query).all()]


def show_job(session: Session, job_id: int) -> dict:
    """One job: what list_jobs says, and its destinations, stage timings, history and results."""
    row = session.execute(_jobs_query().where(Job.id == job_id)).first()
    if row is None:
        raise NotFound(f"no job {job_id} (`machaon jobs list` shows the jobs)")
    job, study, _ = row
    shown = _job_dict(*row)
    shown.update(
        destinations=None if job.destinations is None else json.loads(job.destinations),
        generation=job.generation, superseded_by=job.superseded_by, lease_owner=job.lease_owner,
        lease_expires_at=iso(job.lease_expires_at),
        timings=json.loads(job.timings) if job.timings else None,
        history=[e for e in _events(session, study_uid=study.study_uid, limit=None, oldest_first=True)
                 if _mentions(e["detail"], job.id)],
        results=_results(session, job.id),
    )
    return shown


def _mentions(detail: dict, job_id: int) -> bool:
    """Whether an event's detail is about the job: it names it, or lists it among others."""
    jobs = detail.get("jobs")
    return detail.get("job") == job_id or (isinstance(jobs, list) and job_id in jobs)


def _queue_again(session: Session, jobs: Sequence[Job], actor: str) -> None:
    """Failed or cancelled jobs queued again, their attempts counted afresh; one event each."""
    studies = dict(session.execute(select(Study.id, Study.study_uid).where(
        Study.id.in_({job.study_id for job in jobs}))).all())
    now = utcnow()
    session.execute(insert(Event), [dict(
        at=now, actor=actor, action="job.retried", study_uid=studies[job.study_id],
        detail=json.dumps({"job": job.id, "model": job.model, "was": job.status,
                           "previous_error": job.error}),
    ) for job in jobs])
    # Due from now: how long it has waited counts from the retry, not from its first queueing.
    session.execute(update(Job).where(Job.id.in_([job.id for job in jobs])).values(
        status=JobStatus.QUEUED, attempts=0, stops=0, not_before=now, error=None, started_at=None,
        finished_at=None, lease_owner=None, lease_expires_at=None))


def _locked_jobs(session: Session, ids: Iterable[int]) -> list[Job]:
    ids = sorted(set(ids))
    if not ids:
        raise Invalid("name at least one job")
    jobs = session.execute(select(Job).where(Job.id.in_(ids)).order_by(Job.id)
                           .with_for_update()).scalars().all()
    missing = sorted(set(ids) - {j.id for j in jobs})
    if missing:
        raise NotFound(f"no job {', '.join(map(str, missing))} (`machaon jobs list` shows the jobs)")
    return list(jobs)


def _refuse_unless(jobs: Sequence[Job], allowed: tuple[JobStatus, ...], action: str, hint: str) -> None:
    wrong = [j for j in jobs if j.status not in allowed]
    if wrong:
        states = ", ".join(f"job {j.id} is {j.status}" for j in wrong[:10])
        raise Conflict(f"cannot {action}: {states}; only {' or '.join(allowed)} jobs can be. {hint}")


def retry_jobs(store: Store, ids: Iterable[int], actor: str) -> dict:
    """Queue failed or cancelled jobs again; all of them or, if one cannot be, none."""
    with store.session.begin() as session:
        jobs = _locked_jobs(session, ids)
        _refuse_unless(jobs, RETRYABLE, "retry",
                       "`machaon studies reprocess UID` runs a study's models again.")
        for study in session.execute(select(Study).where(Study.id.in_({j.study_id for j in jobs}))
                                     .with_for_update()).scalars():
            _refuse_if_images_removed(session, study)
        _queue_again(session, jobs, actor)
    return {"retried": [j.id for j in jobs]}


def _failed(query, since: datetime | None, model: str | None):
    """`query` narrowed to the failed jobs `retry_failed_jobs` takes."""
    query = query.where(Job.status == JobStatus.FAILED)
    if since:
        query = query.where(Job.finished_at >= since)
    return query.where(Job.model == model) if model else query


def count_failed_jobs(session: Session, since: datetime | None = None, model: str | None = None) -> int:
    return session.execute(_failed(select(func.count()).select_from(Job), since, model)).scalar_one()


def retry_failed_jobs(store: Store, actor: str, since: datetime | None = None, model: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Queue again every failed job (failed since `since`, of `model`), a few hundred per
    transaction so that ingest and the workers are never held up for long; `progress(done, total)`
    is called after each."""
    with store.read_session() as session:
        ids = list(session.execute(_failed(select(Job.id), since, model).order_by(Job.id)).scalars())
    retried: list[int] = []
    for start in range(0, len(ids), RETRY_CHUNK):
        with store.session.begin() as session:
            # Still failed: another operator or a worker may have moved some meanwhile.
            jobs = session.execute(select(Job).where(Job.id.in_(ids[start:start + RETRY_CHUNK]),
                                                     Job.status == JobStatus.FAILED)
                                   .with_for_update()).scalars().all()
            if jobs:
                _queue_again(session, jobs, actor)
        retried += [job.id for job in jobs]
        if progress:
            progress(min(start + RETRY_CHUNK, len(ids)), len(ids))
    return {"retried": sorted(retried)}


def cancel_jobs(store: Store, ids: Iterable[int], actor: str) -> dict:
    """Cancel queued jobs (a running job finishes its run); all of them or none."""
    with store.session.begin() as session:
        jobs = _locked_jobs(session, ids)
        _refuse_unless(jobs, CANCELLABLE, "cancel", "A running job finishes its run.")
        studies = dict(session.execute(select(Study.id, Study.study_uid).where(
            Study.id.in_({job.study_id for job in jobs}))).all())
        now = utcnow()
        for job in jobs:
            job.status, job.finished_at = JobStatus.CANCELLED, now
            add_event(session, actor, "job.cancelled", studies[job.study_id], job=job.id, model=job.model)
    return {"cancelled": [j.id for j in jobs]}


def find_result(session: Session, study_uid: str, sop_instance_uid: str) -> dict:
    """A result of the study's jobs: its kind and where it is kept, relative to the spool."""
    row = session.execute(select(Result.kind, Result.path).join(Job, Job.id == Result.job_id)
                          .join(Study, Study.id == Job.study_id)
                          .where(Study.study_uid == study_uid, Result.sop_instance_uid == sop_instance_uid)
                          .limit(1)).first()
    if row is None:
        raise NotFound(f"study {study_uid} has no result {sop_instance_uid}: its page lists the results "
                       "its jobs made")
    return {"kind": row.kind, "path": row.path}


# --- deliveries -------------------------------------------------------------------------

def _delivery_state(delivery: Delivery) -> str:
    if delivery.status == DeliveryStatus.SENT:
        return "sent"
    return "failed" if delivery.last_error else "pending"


def list_deliveries(session: Session, status: str | None = None, destination: str | None = None,
                    limit: int | None = DEFAULT_LIMIT) -> list[dict]:
    """Deliveries, newest first: pending (not tried yet), failed (tried, retried after a backoff)
    or sent."""
    query = (select(Delivery, Result, Job.id, Study.study_uid)
             .join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
             .join(Study, Study.id == Job.study_id))
    if status == "sent":
        query = query.where(Delivery.status == DeliveryStatus.SENT)
    elif status in ("pending", "failed"):
        error = Delivery.last_error.is_not(None) if status == "failed" else Delivery.last_error.is_(None)
        query = query.where(Delivery.status == DeliveryStatus.PENDING, error)
    elif status:
        raise Invalid(f"status={status!r}: use one of {', '.join(DELIVERY_STATES)}")
    if destination:
        query = query.where(Delivery.destination == destination)
    rows = session.execute(query.order_by(Delivery.id.desc()).limit(_limit(limit))).all()
    return [{
        "id": d.id, "destination": d.destination, "status": _delivery_state(d), "attempts": d.attempts,
        "last_error": d.last_error, "next_attempt_at": iso(d.next_attempt_at) if d.status != "sent" else None,
        "sent_at": iso(d.sent_at), "kind": r.kind, "sop_instance_uid": r.sop_instance_uid, "path": r.path,
        "job_id": job_id, "study_uid": study_uid,
    } for d, r, job_id, study_uid in rows]


def retry_deliveries(store: Store, actor: str, ids: Iterable[int] | None = None,
                     destination: str | None = None) -> dict:
    """Make pending deliveries due now, whatever their backoff says: those named, or all of a
    destination's."""
    with store.session.begin() as session:
        query = (select(Delivery, Study.study_uid).join(Result, Result.id == Delivery.result_id)
                 .join(Job, Job.id == Result.job_id).join(Study, Study.id == Job.study_id))
        if ids is not None:
            wanted = set(ids)
            rows = session.execute(query.where(Delivery.id.in_(wanted)).with_for_update(of=Delivery)).all()
            missing = sorted(wanted - {d.id for d, _ in rows})
            if missing:
                raise NotFound(f"no delivery {', '.join(map(str, missing))} "
                               "(`machaon deliveries list` shows them)")
            sent = [d.id for d, _ in rows if d.status == DeliveryStatus.SENT]
            if sent:
                raise Conflict(f"delivery {', '.join(map(str, sent))} was sent already: "
                               "`machaon studies reprocess UID` makes and sends its results again")
        elif destination:
            rows = session.execute(query.where(Delivery.destination == destination,
                                               Delivery.status == DeliveryStatus.PENDING)
                                   .with_for_update(of=Delivery)).all()
        else:
            raise Invalid("name deliveries by ID, or a destination")
        now = utcnow()
        by_study = defaultdict(list)
        for delivery, study_uid in rows:
            delivery.next_attempt_at = now
            by_study[study_uid].append(delivery.id)
        for study_uid, delivery_ids in by_study.items():
            add_event(session, actor, "delivery.retried", study_uid, deliveries=delivery_ids)
    return {"retried": sorted(d.id for d, _ in rows)}


# --- events -----------------------------------------------------------------------------

def list_events(session: Session, study_uid: str | None = None, actor: str | None = None,
                since: datetime | None = None, limit: int | None = 200) -> list[dict]:
    """The audit trail, newest first."""
    return _events(session, study_uid, actor, since, _limit(limit))


def _events(session: Session, study_uid: str | None = None, actor: str | None = None,
            since: datetime | None = None, limit: int | None = None,
            oldest_first: bool = False) -> list[dict]:
    query = select(Event)
    if study_uid:
        query = query.where(Event.study_uid == study_uid)
    if actor:
        query = query.where(Event.actor == actor)
    if since:
        query = query.where(Event.at >= since)
    order = (Event.at, Event.id) if oldest_first else (Event.at.desc(), Event.id.desc())
    query = query.order_by(*order).limit(limit)
    return [{"id": e.id, "at": iso(e.at), "actor": e.actor, "action": e.action, "study_uid": e.study_uid,
             "detail": json.loads(e.detail) if e.detail else {}} for e in session.execute(query).scalars()]


# --- the queue at a glance --------------------------------------------------------------

def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)


def _latencies(session: Session, since: datetime) -> list[tuple[datetime, float]]:
    """For each study with a result delivered since `since`: when its last result was delivered,
    and the seconds from its last image received to then."""
    rows = session.execute(select(Study.delivered_at, Study.last_received_at)
                           .where(Study.delivered_at >= since)).all()
    return [(sent, max((sent - received).total_seconds(), 0.0)) for sent, received in rows if sent]


def summary(session: Session, settings: Settings) -> dict:
    """Counts per state, the last hour's throughput and latency, the backlog per destination and
    the spool's free disk."""
    now = utcnow()
    hour_ago, day_ago = now - timedelta(hours=1), now - timedelta(days=1)
    jobs = dict.fromkeys(JobStatus, 0) | dict(session.execute(
        select(Job.status, func.count()).group_by(Job.status)).all())
    studies = dict.fromkeys(StudyStatus, 0) | dict(session.execute(
        select(Study.status, func.count()).group_by(Study.status)).all())
    # A job waiting out a retry's backoff is not late: it waits from when it is due.
    oldest = session.execute(select(func.min(func.coalesce(Job.not_before, Job.created_at))).where(
        Job.status == JobStatus.QUEUED, Job.not_before.is_(None) | (Job.not_before <= now))).scalar()

    def finished_since(status: JobStatus, since: datetime) -> int:
        return session.execute(select(func.count()).where(Job.status == status,
                                                          Job.finished_at >= since)).scalar_one()

    latencies = [seconds for _, seconds in _latencies(session, hour_ago)]
    return {
        "now": iso(now),
        "studies": studies,
        "jobs": jobs,
        "failed_last_24h": finished_since(JobStatus.FAILED, day_ago),
        "oldest_queued_age_s": round((now - oldest).total_seconds(), 1) if oldest else None,
        "last_hour": {
            "studies_completed": session.execute(select(func.count()).where(
                Study.completed_at >= hour_ago)).scalar_one(),
            "jobs_succeeded": finished_since(JobStatus.SUCCEEDED, hour_ago),
            "jobs_failed": finished_since(JobStatus.FAILED, hour_ago),
            "results_sent": session.execute(select(func.count()).where(
                Delivery.sent_at >= hour_ago)).scalar_one(),
            "latency_p50_s": _percentile(latencies, 50),
            "latency_p95_s": _percentile(latencies, 95),
        },
        "deliveries": _backlog(session, settings),
        "spool": spool_disk(settings),
    }


def _backlog(session: Session, settings: Settings) -> list[dict]:
    """Per destination (each configured one, and any other with deliveries waiting): how many wait
    untried (pending) and after a failure (failed), since when, and the latest error."""
    backlog: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return backlog.setdefault(name, {"destination": name, "pending": 0, "failed": 0,
                                         "oldest_pending_at": None, "last_error": None})

    for name in settings.destinations:
        entry(name)
    failing = Delivery.last_error.is_not(None)
    rows = session.execute(
        select(Delivery.destination, failing, func.count(), func.min(Result.created_at),
               func.max(Delivery.id))
        .join(Result, Result.id == Delivery.result_id).where(Delivery.status == DeliveryStatus.PENDING)
        .group_by(Delivery.destination, failing)).all()
    for name, failed, count, oldest, newest in rows:
        shown = entry(name)
        shown["failed" if failed else "pending"] += count
        if shown["oldest_pending_at"] is None or iso(oldest) < shown["oldest_pending_at"]:
            shown["oldest_pending_at"] = iso(oldest)
        if failed:
            shown["last_error"] = session.get_one(Delivery, newest).last_error
    return list(backlog.values())


def spool_disk(settings: Settings) -> dict:
    """The spool's disk: free and total bytes (None where it cannot be read) and the floor below
    which the listener refuses images."""
    path = settings.spool.path
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {"path": str(path), "free_bytes": None, "total_bytes": None,
                "min_free_bytes": settings.spool.min_free_mb * 2**20}
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total,
            "min_free_bytes": settings.spool.min_free_mb * 2**20}


def activity(session: Session, hours: int = 24) -> list[dict]:
    """Per hour over the last `hours` (oldest first): studies completed, and the latency from last
    image received to last result delivered (p50, p95) of the studies delivered that hour."""
    now = utcnow()
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    completed: dict[datetime, int] = defaultdict(int)
    for at in session.execute(select(Study.completed_at).where(Study.completed_at >= start)).scalars():
        if at is not None:
            completed[at.replace(minute=0, second=0, microsecond=0)] += 1
    latency: dict[datetime, list[float]] = defaultdict(list)
    for sent, seconds in _latencies(session, start):
        latency[sent.replace(minute=0, second=0, microsecond=0)].append(seconds)
    hours_shown = [start + timedelta(hours=i) for i in range(hours)]
    return [{"hour": iso(h), "studies": completed[h], "latency_p50_s": _percentile(latency[h], 50),
             "latency_p95_s": _percentile(latency[h], 95)} for h in hours_shown]


def models_in_use(settings: Settings, ort_sessions: OrtSessions | None = None) -> list[dict]:
    """The built packages, the rules that name each, and the providers its session got in this
    process (None where it has not run here yet)."""
    from .manifest import find_packages
    packages, _ = find_packages(settings.models.path)
    loaded = ort_sessions.loaded() if ort_sessions is not None else {}
    precision = settings.inference.precision
    return [{
        "name": p.name, "version": p.manifest.version, "task": p.manifest.task, "precision": precision,
        "providers": loaded.get((p.name, precision)),
        "evaluation": p.manifest.evaluation.model_dump() if p.manifest.evaluation else None,
        "demo": p.manifest.demo,
        "rules": [r.name for r in settings.rules if p.name in r.models],
    } for p in packages]


# --- API tokens -------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """Who is calling the API: a token's name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"api:{self.name}"


TOKEN_PREFIX = "mch_"
# A token's last use is written at most this often: reading the API must not write on every call.
LAST_USED_EVERY = timedelta(minutes=1)


def _digest(token: str) -> str:
    # The tokens are 256 random bits: a plain hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, name: str, role: str, actor: str) -> str:
    """A new token for `name` with `role`; returned once, only its hash is kept."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise Invalid(f"token name {name!r}: use up to 64 letters, digits and . _ @ - (e.g. a person "
                      "or a system: alice, night-shift, grafana)")
    if role not in set(Role):
        raise Invalid(f"role {role!r}: use {' or '.join(Role)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.session.begin() as session:
        existing = session.execute(select(ApiToken).where(ApiToken.name == name)
                                   .with_for_update()).scalar_one_or_none()
        if existing is not None and existing.revoked_at is None:
            raise Conflict(f"a token named {name!r} exists: revoke it first (`machaon tokens revoke "
                           f"{name}`), or choose another name")
        if existing is not None:  # a revoked token's name may be given again
            session.execute(delete(ApiToken).where(ApiToken.id == existing.id))
            session.flush()
        session.add(ApiToken(name=name, role=role, token_sha256=_digest(token), created_at=utcnow(),
                             created_by=actor))
        add_event(session, actor, "token.created", name=name, role=role)
    return token


def revoke_token(store: Store, name: str, actor: str) -> None:
    with store.session.begin() as session:
        token = session.execute(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
                                .with_for_update()).scalar_one_or_none()
        if token is None:
            raise NotFound(f"no token named {name!r} in use (`machaon tokens list` shows them)")
        token.revoked_at = utcnow()
        add_event(session, actor, "token.revoked", name=name)


def list_tokens(session: Session) -> list[dict]:
    return [{"name": t.name, "role": t.role, "created_at": iso(t.created_at), "created_by": t.created_by,
             "last_used_at": iso(t.last_used_at), "revoked_at": iso(t.revoked_at)}
            for t in session.execute(select(ApiToken).order_by(ApiToken.name)).scalars()]


def authenticate(store: Store, token: str) -> Principal | None:
    """The holder of `token`, or None for an unknown or revoked one."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    digest = _digest(token)
    with store.read_session() as session:
        found = session.execute(select(ApiToken.id, ApiToken.name, ApiToken.role, ApiToken.last_used_at)
                                .where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
                                ).first()
    if found is None:
        return None
    now = utcnow()
    if found.last_used_at is None or now - found.last_used_at > LAST_USED_EVERY:
        try:
            with store.session.begin() as session:
                session.execute(update(ApiToken).where(ApiToken.id == found.id).values(last_used_at=now))
        except sqlalchemy.exc.OperationalError:  # the store is busy: the token is still good
            pass
    return Principal(found.name, Role(found.role))
