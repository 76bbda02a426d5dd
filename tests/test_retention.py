"""Retention on SQLite and PostgreSQL with a real spool: the files of finished, delivered studies go
after spool.keep_days, or oldest first below spool.emergency_free_mb; rows and history stay, nothing
unprocessed or undelivered ever goes, and a study whose images went is not processed again."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from machaon import operations as ops
from machaon.config import SpoolSettings
from machaon.planner import plan_jobs
from machaon.retention import Retention, mark_removal
from machaon.rules import Match, Rule
from machaon.spool import Spool
from machaon.store import (
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    ReceivedInstance,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select, update

from tests.test_store import complete, ingest, instance, migrate

CT = Rule(name="ct", models=["ct-model"], destinations=["pacs"], match=Match(modality=["CT"]))
MiB = 2**20


@pytest.fixture
def spool(tmp_path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


def received(store, spool: Spool, study: str, *sops: str, series: str | None = None, size: int = 1000,
             content: bytes = b"x") -> list[ReceivedInstance]:
    """Instances of one series of `study` (a new one unless named) kept in the spool and recorded,
    as the listener does."""
    series = series or generate_uid()
    instances = [replace(instance(study, series, sop), size_bytes=size)
                 for sop in sops or (generate_uid(), generate_uid())]
    for inst in instances:
        write(spool, inst.path, size, content)
    ingest(store, *instances)
    return instances


def write(spool: Spool, relative: str, size: int, content: bytes = b"x") -> None:
    path = spool.path(relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content * size)


def finished_study(store, spool: Spool, days_ago: float = 20, rules=(CT,), job=JobStatus.SUCCEEDED,
                   delivery: str | None = "sent", size: int = 1000) -> str:
    """A complete study of two instances whose jobs ended as `job`, each with one result whose
    delivery is `delivery` (sent, pending, failing, or None for none), last active `days_ago`."""
    study = generate_uid()
    received(store, spool, study, size=size)
    complete(store)
    plan_jobs(store, list(rules))
    then = utcnow() - timedelta(days=days_ago)
    with store.session.begin() as session:
        study_id = session.execute(select(Study.id).where(Study.study_uid == study)).scalar_one()
        for job_id in session.execute(select(Job.id).where(Job.study_id == study_id)).scalars():
            session.execute(update(Job).where(Job.id == job_id).values(status=job, finished_at=then))
            if delivery:
                add_result(session, spool, study, job_id, delivery, then)
        session.execute(update(Study).where(Study.id == study_id).values(
            completed_at=then, delivered_at=then if delivery == "sent" else None))
    return study


def add_result(session, spool: Spool, study: str, job_id: int, delivery: str, then) -> None:
    sop, series = generate_uid(), generate_uid()
    relative = Spool.result_path(study, series, sop)
    write(spool, relative, 500)
    result = Result(job_id=job_id, kind="seg", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    sop_instance_uid=sop, series_uid=series, path=relative, created_at=then)
    session.add(result)
    session.flush()
    session.add(Delivery(result_id=result.id, destination="pacs", attempts=1,
                         status=DeliveryStatus.SENT if delivery == "sent" else DeliveryStatus.PENDING,
                         sent_at=then if delivery == "sent" else None,
                         last_error="association rejected" if delivery == "failing" else None))


def files_of(spool: Spool, study: str) -> list[Path]:
    return [p for top in (spool.studies / study, spool.results / study) if top.exists()
            for p in top.rglob("*") if p.is_file()]


def retention(store, spool: Spool, keep_days: int = 14, emergency_free_mb: int = 0, free_bytes=None) -> Retention:
    return Retention(store, spool, SpoolSettings(keep_days=keep_days, emergency_free_mb=emergency_free_mb),
                     free_bytes=free_bytes)


def shown(store, study: str) -> dict:
    with store.read_session() as session:
        return ops.show_study(session, study)


def removals(store, study: str) -> list[dict]:
    return [e["detail"] for e in shown(store, study)["events"] if e["action"] == "study.files_removed"]


def study_id(store, study: str) -> int:
    with store.read_session() as session:
        return session.execute(select(Study.id).where(Study.study_uid == study)).scalar_one()


def test_an_old_delivered_study_loses_its_files_and_keeps_its_rows_and_history(store, spool):
    old, recent = finished_study(store, spool, days_ago=20), finished_study(store, spool, days_ago=3)
    assert len(files_of(spool, old)) == 3  # two instances and a result

    done = retention(store, spool).run()

    assert [(r.study_uid, r.files, r.bytes, r.reason) for r in done] == [(old, 3, 2500, "keep_days")]
    assert files_of(spool, old) == []
    assert not (spool.studies / old).exists() and not (spool.results / old).exists()
    assert len(files_of(spool, recent)) == 3
    study = shown(store, old)
    assert study["files_removed_at"] and study["instance_count"] == 2
    assert [j["status"] for j in study["jobs"]] == ["succeeded"]
    assert study["jobs"][0]["results"][0]["deliveries"][0]["status"] == "sent"
    assert removals(store, old) == [{"files": 3, "bytes": 2500, "reason": "keep_days"}]
    assert shown(store, recent)["files_removed_at"] is None

    assert retention(store, spool).run() == []  # once is enough
    assert len(removals(store, old)) == 1


def test_keep_days_0_keeps_every_file(store, spool):
    old = finished_study(store, spool, days_ago=400)
    assert retention(store, spool, keep_days=0).run() == []
    assert len(files_of(spool, old)) == 3


def test_studies_without_jobs_or_with_cancelled_jobs_are_finished_too(store, spool):
    nothing_matched = finished_study(store, spool, rules=(), delivery=None)
    cancelled = finished_study(store, spool, job=JobStatus.CANCELLED, delivery=None)
    assert {r.study_uid for r in retention(store, spool).run()} == {nothing_matched, cancelled}
    assert files_of(spool, nothing_matched) == files_of(spool, cancelled) == []


def _queued(store, spool):
    return finished_study(store, spool, job=JobStatus.QUEUED, delivery=None)


def _receiving(store, spool):
    study = finished_study(store, spool)
    received(store, spool, study)  # a late series reopens it
    return study


def _not_planned(store, spool):
    study = finished_study(store, spool, rules=(), delivery=None)
    with store.session.begin() as session:  # completed again, its jobs not planned yet
        session.execute(update(Study).where(Study.study_uid == study).values(
            completion_count=Study.completion_count + 1))
    return study


def _planning_failed(store, spool):
    study = finished_study(store, spool, delivery=None)
    with store.session.begin() as session:
        session.execute(update(Study).where(Study.study_uid == study).values(planning_error="unreadable"))
    return study


UNFINISHED = {
    "a queued job": _queued,
    "a running job": lambda store, spool: finished_study(store, spool, job=JobStatus.RUNNING, delivery=None),
    "a failed job": lambda store, spool: finished_study(store, spool, job=JobStatus.FAILED, delivery=None),
    "a pending delivery": lambda store, spool: finished_study(store, spool, delivery="pending"),
    "a failing delivery": lambda store, spool: finished_study(store, spool, delivery="failing"),
    "still receiving": _receiving,
    "jobs not planned yet": _not_planned,
    "a planning problem": _planning_failed,
}


@pytest.mark.parametrize("unfinished", UNFINISHED)
def test_a_study_with_work_left_keeps_its_files_however_old_and_full_the_disk(store, spool, unfinished):
    study = UNFINISHED[unfinished](store, spool)
    with store.session.begin() as session:
        session.execute(update(Study).where(Study.study_uid == study).values(
            completed_at=utcnow() - timedelta(days=400), delivered_at=None))
    before = files_of(spool, study)

    assert retention(store, spool, keep_days=1, emergency_free_mb=10, free_bytes=lambda: 0).run() == []

    assert files_of(spool, study) == before and before
    assert shown(store, study)["files_removed_at"] is None


def test_below_emergency_free_space_the_oldest_finished_studies_go_until_there_is_room(store, spool):
    busy = finished_study(store, spool, days_ago=10, job=JobStatus.QUEUED, delivery=None, size=MiB)
    oldest, older, newest = (finished_study(store, spool, days_ago=days, size=MiB) for days in (3, 2, 1))
    used = lambda: sum(p.stat().st_size for p in spool.root.rglob("*") if p.is_file())  # noqa: E731
    capacity = used() + MiB // 2
    free = lambda: capacity - used()  # noqa: E731  a disk just big enough for what is there

    done = retention(store, spool, keep_days=14, emergency_free_mb=4, free_bytes=free).run()

    assert [(r.study_uid, r.reason) for r in done] == [(oldest, "emergency_free_mb"), (older, "emergency_free_mb")]
    assert free() >= 4 * MiB
    assert files_of(spool, oldest) == files_of(spool, older) == []
    assert len(files_of(spool, newest)) == 3 and len(files_of(spool, busy)) == 2
    assert removals(store, oldest)[0]["reason"] == "emergency_free_mb"
    assert retention(store, spool, keep_days=14, emergency_free_mb=4, free_bytes=free).run() == []


def test_an_instance_arriving_after_the_mark_keeps_its_file_and_so_does_the_study(store, spool):
    study = finished_study(store, spool)
    before = files_of(spool, study)
    mark = mark_removal(store, study_id(store, study))
    assert mark is not None
    [late] = received(store, spool, study, generate_uid())  # reopens the study before any file went

    assert retention(store, spool).remove_files(mark, "keep_days") is None

    assert set(files_of(spool, study)) == {*before, spool.path(late.path)}
    study_now = shown(store, study)
    assert study_now["status"] == StudyStatus.RECEIVING and study_now["files_removed_at"] is None
    assert removals(store, study) == []


def test_a_copy_sent_again_after_the_mark_is_kept(store, spool):
    study = finished_study(store, spool)
    [series] = shown(store, study)["series"]
    sop = series["instances"][0]["sop_instance_uid"]
    mark = mark_removal(store, study_id(store, study))
    assert mark is not None
    [again] = received(store, spool, study, sop, series=series["series_uid"], content=b"y")  # same name

    assert retention(store, spool).remove_files(mark, "keep_days") is None
    assert spool.path(again.path).read_bytes() == b"y" * 1000


def test_a_removal_a_stop_interrupted_is_finished_at_the_next_start(store, spool):
    study = finished_study(store, spool)
    assert mark_removal(store, study_id(store, study)) is not None  # then the process stopped

    done = retention(store, spool, keep_days=0).run()

    assert [(r.study_uid, r.files) for r in done] == [(study, 3)]
    assert files_of(spool, study) == []
    assert retention(store, spool, keep_days=0).run() == []


def test_a_study_whose_images_went_is_not_processed_again_until_it_is_sent_again(store, spool):
    study = finished_study(store, spool, job=JobStatus.CANCELLED, delivery=None)
    [job] = [j["id"] for j in shown(store, study)["jobs"]]
    retention(store, spool).run()
    removed_on = shown(store, study)["files_removed_at"][:10]
    refusal = (rf"study {study}: its images were removed from the spool on {removed_on} \d\d:\d\d UTC "
               r"\(spool.keep_days\); send the study again to process it")

    with pytest.raises(ops.Conflict, match=refusal):
        ops.reprocess_study(store, [CT], study, actor="cli:tester")
    with pytest.raises(ops.Conflict, match=refusal):
        ops.retry_jobs(store, [job], actor="cli:tester")
    received(store, spool, study)  # a late series: the study receives again, its first images gone
    with pytest.raises(ops.Conflict, match=refusal):
        ops.complete_study(store, study, actor="cli:tester")

    # The whole study sent again: every instance has its file back.
    for series in shown(store, study)["series"]:
        received(store, spool, study, *(i["sop_instance_uid"] for i in series["instances"]))
    complete(store)
    plan_jobs(store, [CT])
    assert ops.reprocess_study(store, [CT], study, actor="cli:tester")["study_uid"] == study


def test_the_files_removed_column_comes_and_goes_with_its_migration(store):
    migrate(store, command.downgrade, "0005")
    assert "files_removed_at" not in {c["name"] for c in inspect(store.engine).get_columns("studies")}
    migrate(store, command.upgrade, "head")
    assert "files_removed_at" in {c["name"] for c in inspect(store.engine).get_columns("studies")}

