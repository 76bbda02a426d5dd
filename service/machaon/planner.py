"""Planning: when a study completes, which jobs it gets.

The rules are matched against each series of a completed study, on the header
facts recorded at ingest (planning reads no file); every (series, model) a
matching rule names becomes a queued job, which keeps the rule's destinations. A
study reopened by late images and completed again gets new jobs (its
`generation`), and its older jobs still queued for the same series, rule and
model are superseded. A study that cannot be planned has the reason recorded and
never holds up the others.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import sqlalchemy.exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from .rules import Rule, SeriesFacts, matching
from .store import Instance, Job, JobStatus, SeriesRow, Store, Study, StudyStatus, add_event, utcnow

log = logging.getLogger("machaon.planner")


def plan_jobs(store: Store, rules: list[Rule]) -> int:
    """Jobs for every study completion that has none yet; returns how many were created.
    One study that cannot be planned has the reason recorded and never holds up the others."""
    with store.read_session() as session:
        due = session.execute(select(Study.id, Study.study_uid, Study.completion_count).where(
            Study.status == StudyStatus.COMPLETE, Study.planned_count < Study.completion_count)).all()
    created = 0
    for study_id, study_uid, generation in due:
        try:
            created += _plan_study(store, rules, study_id, study_uid, generation)
        except sqlalchemy.exc.SQLAlchemyError:
            raise  # the store, not the study: the next pass plans it
        except Exception as exc:  # a bug: logged once, and the study is not tried again each pass
            log.exception("study %s: planning failed", study_uid)
            _planning_failed(store, study_id, study_uid, generation,
                             f"internal error: {exc!r} (details in the service log)")
    return created


def matched(session: Session, rules: list[Rule], study_id: int, study_uid: str
            ) -> tuple[list[tuple[int, Rule, str]], list[str], int]:
    """(series id, rule, model) for each job the rules give the study's series as received, a line
    for each instance planning cannot read, and how many series there are."""
    facts, problems = series_in_store(session, study_uid) or ([], [])
    ids = dict(session.execute(select(SeriesRow.series_uid, SeriesRow.id)
                               .where(SeriesRow.study_id == study_id)).all())
    planned = [(ids[f.series_uid], rule, model) for f in facts if f.series_uid in ids
               for rule in matching(rules, f) for model in rule.models]
    return planned, problems, len(facts)


def new_job(study_id: int, series_id: int, rule: Rule, model: str, generation: int) -> Job:
    return Job(study_id=study_id, series_id=series_id, model=model, rule=rule.name,
               destinations=json.dumps(rule.destinations), generation=generation,
               status=JobStatus.QUEUED, priority=rule.priority, attempts=0, created_at=utcnow())


def _plan_study(store: Store, rules: list[Rule], study_id: int, study_uid: str, generation: int) -> int:
    """Queue the jobs of one study completion; returns how many."""
    with store.read_session() as session:
        planned, problems, series_count = matched(session, rules, study_id, study_uid)
    problem = "; ".join(problems) or None
    with store.session.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if (study is None or study.status != StudyStatus.COMPLETE or study.completion_count != generation
                or study.planned_count >= generation):
            return 0  # deleted, reopened or planned meanwhile: the next pass sees it as it is now
        jobs = [new_job(study_id, series_id, rule, model, generation) for series_id, rule, model in planned]
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
            add_event(session, "scheduler", "study.no_rule_matched", study_uid, series=series_count)
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
        if study is None:  # deleted meanwhile: nothing is left to record it on
            return
        if study.completion_count == generation and study.planned_count < generation:
            study.planned_count, study.planning_error = generation, reason
            add_event(session, "scheduler", "study.planning_failed", study_uid, error=reason)


def series_in_store(session: Session, study_uid: str) -> tuple[list[SeriesFacts], list[str]] | None:
    """The series of a received study as the rules see them, from the facts recorded at ingest,
    and a line for each instance without them (a row from before they were recorded whose file
    could not be read: its series is planned from the others); None if the study is unknown."""
    study_id = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study_id is None:
        return None
    instances = defaultdict(list)
    for row in session.execute(
            select(Instance.series_id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.calling_ae,
                   Instance.path, Instance.frames, Instance.rows, Instance.columns)
            .join(SeriesRow, SeriesRow.id == Instance.series_id)
            .where(SeriesRow.study_id == study_id).order_by(Instance.id)):
        instances[row.series_id].append(row)
    found, problems = [], []
    for series in session.execute(select(SeriesRow).where(SeriesRow.study_id == study_id)
                                  .order_by(SeriesRow.id)).scalars():
        known = [i for i in instances[series.id] if i.frames is not None]
        problems += [f"instance {i.sop_instance_uid} of series {series.series_uid}: cannot read {i.path} "
                     "from the spool, so its header facts were never recorded (`machaon db upgrade` "
                     "records them once the file is back)"
                     for i in instances[series.id] if i.frames is None]
        if known:
            found.append(SeriesFacts(
                series_uid=series.series_uid, modality=series.modality or "",
                sop_classes={i.sop_class_uid for i in known},
                series_description=series.series_description or "",
                protocol_name=series.protocol_name or "", body_part=series.body_part or "",
                image_type=tuple(series.image_type.split("\\")) if series.image_type else (),
                calling_aets={i.calling_ae for i in instances[series.id]},
                slices=sum(i.frames for i in known), rows=known[0].rows or 0, columns=known[0].columns or 0))
    return found, problems
