"""The operations layer on SQLite and PostgreSQL: what an operator can see and do, and the refusals
that say why (404 for what does not exist, 409 for what cannot be done in its state)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from machaon import operations as ops
from machaon.config import Settings
from machaon.planner import plan_jobs
from machaon.rules import Match, Rule
from machaon.store import (
    ApiToken,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from tests.test_store import complete, ingest, instance

CT = Rule(name="ct", models=["ct-model"], destinations=["pacs"], priority=3, match=Match(modality=["CT"]))
OTHER = Rule(name="other", models=["other-model"], destinations=["pacs"], match=Match(modality=["CT"]))


def planned_study(store, rules=(CT,), **extra) -> tuple[str, list[int]]:
    """A complete CT study of one series with the jobs `rules` give it: (study UID, job IDs)."""
    study, series = generate_uid(), generate_uid()
    ingest(store, *(instance(study, series, **extra) for _ in range(3)))
    complete(store)
    plan_jobs(store, list(rules))
    with store.session() as session:
        return study, list(session.execute(select(Job.id).join(Study).where(Study.study_uid == study)
                                           .order_by(Job.id)).scalars())


def set_job(store, job_id: int, **values) -> None:
    with store.session.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def actions(store, study_uid: str) -> list[tuple[str, str]]:
    with store.read_session() as session:
        return [(e["actor"], e["action"]) for e in ops.list_events(session, study_uid=study_uid)]


def test_a_failed_job_is_listed_with_its_reason_and_retried_once_by_whoever_asked(store):
    study, [job] = planned_study(store, accession_number="ACC7")
    set_job(store, job, status=JobStatus.FAILED, attempts=1, error="has no pixel data", finished_at=utcnow())
    with store.read_session() as session:
        [failed] = ops.list_jobs(session, status="failed")
        assert (failed["id"], failed["error"], failed["accession_number"]) == (job, "has no pixel data", "ACC7")
        assert ops.list_jobs(session, status="failed", model="another") == []
        assert ops.count_failed_jobs(session, model="ct-model") == 1

    assert ops.retry_jobs(store, [job], "cli:alice") == {"retried": [job]}
    with store.read_session() as session:
        shown = ops.show_job(session, job)
    assert (shown["status"], shown["attempts"], shown["error"]) == ("queued", 0, None)
    [retried] = [e for e in shown["history"] if e["action"] == "job.retried"]
    assert retried["actor"] == "cli:alice" and retried["detail"]["previous_error"] == "has no pixel data"
    # Queued now: a second retry is refused with the state it is in, and changes nothing.
    with pytest.raises(ops.Conflict, match=rf"job {job} is queued; only failed or cancelled"):
        ops.retry_jobs(store, [job], "cli:alice")
    assert ops.Conflict.status_code == 409
    with pytest.raises(ops.NotFound, match="no job 999999"):
        ops.retry_jobs(store, [job, 999999], "cli:alice")
    assert actions(store, study).count(("cli:alice", "job.retried")) == 1


def test_retrying_all_failed_jobs_takes_only_those_the_filter_names(store):
    _, [old] = planned_study(store)
    _, [recent] = planned_study(store)
    _, [other_model] = planned_study(store, rules=(OTHER,))
    _, [succeeded] = planned_study(store)
    now = utcnow()
    set_job(store, old, status=JobStatus.FAILED, finished_at=now - timedelta(days=2), error="x")
    for job in (recent, other_model):
        set_job(store, job, status=JobStatus.FAILED, finished_at=now, error="x")
    set_job(store, succeeded, status=JobStatus.SUCCEEDED, finished_at=now)
    seen = []
    done = ops.retry_failed_jobs(store, "api:night", since=ops.parse_since("1d"), model="ct-model",
                                 progress=lambda n, total: seen.append((n, total)))
    assert done == {"retried": [recent]} and seen == [(1, 1)]
    with store.read_session() as session:
        states = {j["id"]: j["status"] for j in ops.list_jobs(session)}
    assert states == {old: "failed", recent: "queued", other_model: "failed", succeeded: "succeeded"}


def test_only_queued_jobs_are_cancelled_and_a_cancelled_one_can_be_retried(store):
    study, [queued] = planned_study(store)
    _, [running] = planned_study(store)
    set_job(store, running, status=JobStatus.RUNNING)
    with pytest.raises(ops.Conflict, match=rf"job {running} is running; only queued .* finishes its run"):
        ops.cancel_jobs(store, [queued, running], "cli:bob")
    assert ops.cancel_jobs(store, [queued], "cli:bob") == {"cancelled": [queued]}
    assert ("cli:bob", "job.cancelled") in actions(store, study)
    assert ops.retry_jobs(store, [queued], "cli:bob") == {"retried": [queued]}


def test_a_study_is_completed_on_request_and_then_planned(store):
    study, series = generate_uid(), generate_uid()
    ingest(store, instance(study, series))
    done = ops.complete_study(store, study, "cli:carol")
    assert done["completion_count"] == 1 and done["instances"] == 1
    assert plan_jobs(store, [CT]) == 1
    with pytest.raises(ops.Conflict, match="already complete; `reprocess` runs its models again"):
        ops.complete_study(store, study, "cli:carol")
    with pytest.raises(ops.NotFound):
        ops.complete_study(store, generate_uid(), "cli:carol")
    assert ("cli:carol", "study.force_completed") in actions(store, study)


def test_reprocessing_queues_todays_rules_once_and_names_what_matches_nothing(store):
    study, [first] = planned_study(store)
    set_job(store, first, status=JobStatus.SUCCEEDED, finished_at=utcnow())
    # Today a second rule matches too: reprocessing queues both, each once.
    done = ops.reprocess_study(store, [CT, OTHER], study, "api:alice")
    assert len(done["jobs"]) == 2 and done["already_queued"] == 0
    again = ops.reprocess_study(store, [CT, OTHER], study, "api:alice")
    assert again == {"study_uid": study, "jobs": [], "already_queued": 2}
    with store.read_session() as session:
        jobs = ops.list_jobs(session, study_uid=study)
    assert sorted(j["model"] for j in jobs if j["status"] == "queued") == ["ct-model", "other-model"]
    with pytest.raises(ops.Conflict, match="no rule gives study .* model 'nothing' today: `machaon rules test"):
        ops.reprocess_study(store, [CT], study, "api:alice", model="nothing")
    receiving, series = generate_uid(), generate_uid()
    ingest(store, instance(receiving, series))
    with pytest.raises(ops.Conflict, match="still receiving"):
        ops.reprocess_study(store, [CT], receiving, "api:alice")


def test_studies_are_found_by_patient_id_accession_number_or_uid(store):
    study, _ = planned_study(store, accession_number="A123")
    planned_study(store, accession_number="B456")
    with store.read_session() as session:
        for q in ("A123", study, "…" + study[-12:]):
            assert [s["study_uid"] for s in ops.list_studies(session, q=q)] == [study], q
        assert len(ops.list_studies(session, q="P1")) == 2  # both patients' ID in the test data
        assert ops.list_studies(session, q="nothing") == []
        with pytest.raises(ops.NotFound, match="no study with Study Instance UID 1.2.3"):
            ops.show_study(session, "1.2.3")
        with pytest.raises(ops.Invalid, match="use one of receiving, complete"):
            ops.list_studies(session, status="done")


def _delivery(store, job_id: int, destination: str, **values) -> int:
    with store.session.begin() as session:
        result = Result(job_id=job_id, kind="seg", sop_class_uid="1.2", sop_instance_uid=generate_uid(),
                        series_uid=generate_uid(), path="results/x.dcm", created_at=utcnow())
        session.add(result)
        session.flush()
        delivery = Delivery(**{"result_id": result.id, "destination": destination, "attempts": 0,
                               "status": DeliveryStatus.PENDING,
                               "next_attempt_at": utcnow() + timedelta(hours=1)} | values)
        session.add(delivery)
        session.flush()
        return delivery.id


def test_deliveries_are_listed_by_state_and_sent_now_on_request(store):
    study, [job] = planned_study(store)
    waiting = _delivery(store, job, "pacs")
    failing = _delivery(store, job, "pacs", last_error="association rejected", attempts=3)
    sent = _delivery(store, job, "archive")
    with store.session.begin() as session:
        session.execute(update(Delivery).where(Delivery.id == sent).values(status=DeliveryStatus.SENT,
                                                                           sent_at=utcnow()))
    with store.read_session() as session:
        assert [d["id"] for d in ops.list_deliveries(session, status="failed")] == [failing]
        assert [d["id"] for d in ops.list_deliveries(session, status="pending")] == [waiting]
        assert [d["id"] for d in ops.list_deliveries(session, destination="archive")] == [sent]
    with pytest.raises(ops.Conflict, match=f"delivery {sent} was sent already"):
        ops.retry_deliveries(store, "cli:dave", ids=[sent])
    assert ops.retry_deliveries(store, "cli:dave", destination="pacs") == {"retried": [waiting, failing]}
    with store.read_session() as session:
        due = session.execute(select(Delivery.next_attempt_at).where(Delivery.id == failing)).scalar_one()
        assert due <= utcnow()
        [backlog] = [b for b in ops.summary(session, Settings())["deliveries"] if b["destination"] == "pacs"]
    assert (backlog["pending"], backlog["failed"], backlog["last_error"]) == (1, 1, "association rejected")
    assert ("cli:dave", "delivery.retried") in actions(store, study)


def test_tokens_are_kept_as_hashes_work_until_revoked_and_names_are_checked(store):
    token = ops.create_token(store, "alice", "operator", "cli:root")
    viewer = ops.create_token(store, "wall-screen", "viewer", "cli:root")
    with store.read_session() as session:
        rows = session.execute(select(ApiToken)).scalars().all()
    stored = json.dumps([{c.key: str(getattr(r, c.key)) for c in ApiToken.__table__.columns} for r in rows])
    assert token not in stored and viewer not in stored and token[4:] not in stored
    assert ops.authenticate(store, token) == ops.Principal("alice", "operator")
    assert ops.authenticate(store, viewer).role == "viewer"
    assert ops.authenticate(store, token + "x") is None and ops.authenticate(store, "") is None
    with pytest.raises(ops.Conflict, match="a token named 'alice' exists: revoke it first"):
        ops.create_token(store, "alice", "viewer", "cli:root")
    with pytest.raises(ops.Invalid, match="role 'admin': use viewer or operator"):
        ops.create_token(store, "bob", "admin", "cli:root")
    with pytest.raises(ops.Invalid, match="token name 'a b'"):
        ops.create_token(store, "a b", "viewer", "cli:root")
    ops.revoke_token(store, "alice", "cli:root")
    assert ops.authenticate(store, token) is None
    with pytest.raises(ops.NotFound):
        ops.revoke_token(store, "alice", "cli:root")
    renewed = ops.create_token(store, "alice", "viewer", "cli:root")  # a revoked name may be given again
    assert ops.authenticate(store, renewed) == ops.Principal("alice", "viewer")
    with store.read_session() as session:
        names = {t["name"]: t for t in ops.list_tokens(session)}
        assert names["alice"]["last_used_at"] is not None and names["alice"]["revoked_at"] is None
        assert [e["action"] for e in ops.list_events(session, actor="cli:root")][:2] == \
            ["token.created", "token.revoked"]


def test_the_summary_counts_states_and_the_last_hours_latency(store):
    study, [job] = planned_study(store)
    _, [failed] = planned_study(store)
    set_job(store, failed, status=JobStatus.FAILED, finished_at=utcnow(), error="x")
    delivery = _delivery(store, job, "pacs")
    with store.session.begin() as session:
        last_image = session.execute(select(Study.last_received_at).where(Study.study_uid == study)).scalar_one()
        session.execute(update(Delivery).where(Delivery.id == delivery).values(
            status=DeliveryStatus.SENT, sent_at=last_image + timedelta(seconds=7)))
        session.execute(update(Study).where(Study.study_uid == study).values(  # as dispatch records it
            delivered_at=last_image + timedelta(seconds=7)))
    with store.read_session() as session:
        summary = ops.summary(session, Settings())
        hours = ops.activity(session, hours=24)
    assert summary["jobs"]["failed"] == 1 and summary["jobs"]["queued"] == 1
    assert summary["failed_last_24h"] == 1 and summary["studies"][StudyStatus.COMPLETE] == 2
    assert summary["last_hour"]["latency_p50_s"] == pytest.approx(7, abs=0.01)
    assert summary["last_hour"]["results_sent"] == 1 and summary["oldest_queued_age_s"] >= 0
    assert len(hours) == 24 and sum(h["studies"] for h in hours) == 2
    assert hours[-1]["latency_p95_s"] == pytest.approx(7, abs=0.01)


def test_since_takes_a_time_ago_or_a_local_date():
    now = utcnow()
    assert abs(ops.parse_since("2h") - (now - timedelta(hours=2))) < timedelta(seconds=5)
    assert ops.parse_since(None) is None
    local_midnight = ops.parse_since("2026-12-01")
    assert local_midnight is not None and local_midnight.tzinfo is None
    with pytest.raises(ops.Invalid, match="neither a time ago"):
        ops.parse_since("yesterday")
