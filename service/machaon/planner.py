"""Planning: when a study completes, which jobs it gets.

The rules are matched against each series of a completed study; every (series,
model) a matching rule names becomes a queued job. A study reopened by late
images and completed again gets new jobs (its `generation`), and its older jobs
still queued for the same series, rule and model are superseded. A study that
cannot be planned has the reason recorded and never holds up the others.
"""

from __future__ import annotations

import logging

import sqlalchemy.exc
from sqlalchemy import select

from .rules import Rule, SeriesFacts, matching, read_headers
from .spool import Spool
from .store import Job, JobStatus, SeriesRow, Store, Study, StudyStatus, add_event, utcnow

log = logging.getLogger("machaon.planner")


def plan_jobs(store: Store, spool: Spool, rules: list[Rule]) -> int:
    """Jobs for every study completion that has none yet; returns how many were created.
    One study that cannot be planned has the reason recorded and never holds up the others."""
    with store.read_session() as session:
        due = session.execute(select(Study.id, Study.study_uid, Study.completion_count).where(
            Study.status == StudyStatus.COMPLETE, Study.planned_count < Study.completion_count)).all()
    created = 0
    for study_id, study_uid, generation in due:
        try:
            created += _plan_study(store, spool, rules, study_id, study_uid, generation)
        except sqlalchemy.exc.SQLAlchemyError:
            raise  # the store, not the study: the next pass plans it
        except Exception as exc:  # a bug: logged once, and the study is not tried again each pass
            log.exception("study %s: planning failed", study_uid)
            _planning_failed(store, study_id, study_uid, generation,
                             f"internal error: {exc!r} (details in the service log)")
    return created


def _plan_study(store: Store, spool: Spool, rules: list[Rule], study_id: int, study_uid: str,
                generation: int) -> int:
    """Queue the jobs of one study completion; returns how many."""
    with store.read_session() as session:  # headers are read outside the write transaction
        facts, problems = series_in_store(session, spool, study_uid) or ([], [])
        ids = dict(session.execute(select(SeriesRow.series_uid, SeriesRow.id)
                                   .where(SeriesRow.study_id == study_id)).all())
    planned = [(ids[f.series_uid], rule, model) for f in facts if f.series_uid in ids
               for rule in matching(rules, f) for model in rule.models]
    problem = "; ".join(problems) or None
    with store.session.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if (study.status != StudyStatus.COMPLETE or study.completion_count != generation
                or study.planned_count >= generation):
            return 0  # reopened or planned meanwhile: the next pass sees it as it is now
        jobs = [Job(study_id=study_id, series_id=series_id, model=model, rule=rule.name,
                    generation=generation, status=JobStatus.QUEUED, priority=rule.priority, attempts=0,
                    created_at=utcnow())
                for series_id, rule, model in planned]
        session.add_all(jobs)
        session.flush()
        superseded = _supersede(session, jobs)
        study.planned_count, study.planning_error = generation, problem
        if problem:
            add_event(session, "scheduler", "study.planning_failed", study_uid, error=problem)
        if planned:
            add_event(session, "scheduler", "jobs.planned", study_uid, jobs=len(planned),
                      models=sorted({m for _, _, m in planned}), superseded=superseded or None)
        elif not problem:
            add_event(session, "scheduler", "study.no_rule_matched", study_uid, series=len(facts))
    if problem:
        log.warning("study %s: %s", study_uid, problem)
    if planned or not problem:
        log.info("study %s: %s", study_uid, f"{len(planned)} job(s) queued" if planned else "no rule matched")
    return len(planned)


def _supersede(session, jobs: list[Job]) -> list[int]:
    """Older completions' jobs still queued for the same series, rule and model will not run:
    the new job does the same work on what the series holds now. Returns their ids."""
    superseded = []
    for job in jobs:
        older = session.execute(select(Job).where(
            Job.series_id == job.series_id, Job.rule == job.rule, Job.model == job.model,
            Job.status == JobStatus.QUEUED, Job.generation < job.generation,
        ).with_for_update(skip_locked=True)).scalars()
        for old in older:
            old.status, old.superseded_by, old.finished_at = JobStatus.SUPERSEDED, job.id, job.created_at
            superseded.append(old.id)
    return superseded


def _planning_failed(store: Store, study_id: int, study_uid: str, generation: int, reason: str) -> None:
    with store.session.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study.completion_count == generation and study.planned_count < generation:
            study.planned_count, study.planning_error = generation, reason
            add_event(session, "scheduler", "study.planning_failed", study_uid, error=reason)


def series_in_store(session, spool, study_uid: str) -> tuple[list[SeriesFacts], list[str]] | None:
    """The series of a received study, read from the spool, and a line for each file that
    could not be read (its series is planned from the others); None if the study is unknown."""
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        return None
    found, problems = [], []
    for series in session.execute(select(SeriesRow).where(SeriesRow.study_id == study.id)).scalars():
        headers = []
        for instance in series.instances:
            try:
                headers.append(read_headers(spool.path(instance.path)))
            except Exception as exc:  # removed or damaged by hand: the reason goes on the study
                problems.append(f"instance {instance.sop_instance_uid} of series {series.series_uid}: "
                                f"cannot read {instance.path} from the spool ({exc})")
        if headers:
            found.append(SeriesFacts.from_headers(headers, {i.calling_ae for i in series.instances}))
    return found, problems
