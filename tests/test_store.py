"""The job store on SQLite and on the PostgreSQL server: ingest, duplicates, completion."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from alembic import command
from machaon.cli import main
from machaon.completion import complete_quiet_studies
from machaon.operations import list_studies, show_study
from machaon.planner import plan_jobs
from machaon.rules import Match, Rule
from machaon.spool import Spool
from machaon.store import (
    Event,
    InstanceConflict,
    ReceivedInstance,
    SchemaError,
    SeriesConflict,
    Store,
    Study,
    _alembic_config,
    check_schema,
    record_instance,
    upgrade,
)
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select, text

from tests.dicomgen import ct_slice


def instance(study: str, series: str, sop: str | None = None, **extra) -> ReceivedInstance:
    sop = sop or generate_uid()
    return ReceivedInstance(
        study_uid=study, series_uid=series, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{series}/{sop}.dcm", size_bytes=1000, calling_ae="CT1",
        patient_id="P1", modality="CT", **extra)


def ingest(store: Store, *instances: ReceivedInstance):
    with store.engine.begin() as conn:
        return [record_instance(conn, inst, actor="dicom:CT1") for inst in instances]


def complete(store: Store, quiet_s: float = 0.0, force_after_s: float = 3600):
    with store.session.begin() as session:
        return complete_quiet_studies(session, quiet_s, force_after_s)


def events(store: Store, study_uid: str) -> list[str]:
    with store.session() as session:
        return list(session.execute(
            select(Event.action).where(Event.study_uid == study_uid).order_by(Event.id)).scalars())


def test_upgrade_creates_every_table_and_is_idempotent(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"studies", "series", "instances", "jobs", "results", "events"} <= tables
    check_schema(store.engine)  # does not raise
    before, after = upgrade(store.engine)
    assert before == after


def test_unmigrated_database_is_refused(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(SchemaError, match="run `machaon db upgrade`"):
        check_schema(store.engine)


def test_instances_create_study_and_series(store):
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    ingest(store, instance(study, s1), instance(study, s1), instance(study, s2, series_description="T2"))
    with store.session() as session:
        [row] = list_studies(session)
        shown = show_study(session, study)
    assert (row["study_uid"], row["series_count"], row["instance_count"]) == (study, 2, 3)
    assert row["status"] == "receiving" and row["patient_id"] == "P1"
    assert [s["instance_count"] for s in shown["series"]] == [2, 1]
    assert shown["series"][1]["series_description"] == "T2"
    assert events(store, study) == ["study.received"]


def test_same_sop_instance_twice_is_counted_once(store):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first, second = ingest(store, instance(study, series, sop), instance(study, series, sop))
    assert not first.replaced and second.replaced
    with store.session() as session:
        shown = show_study(session, study)
    assert shown["instance_count"] == 1
    assert shown["series"][0]["instances"][0]["receive_count"] == 2


def test_quiet_study_completes_and_late_instance_reopens_it(store):
    study, series = generate_uid(), generate_uid()
    ingest(store, instance(study, series))
    assert complete(store, quiet_s=60) == []  # not quiet long enough yet
    time.sleep(0.05)
    [done] = complete(store, quiet_s=0.01)
    assert (done.study_uid, done.instance_count, done.forced, done.completion_count) == (study, 1, False, 1)
    assert complete(store, quiet_s=0.01) == []  # completes once

    [recorded] = ingest(store, instance(study, series))
    assert recorded.study_reopened
    with store.session() as session:
        shown = show_study(session, study)
    assert shown["status"] == "receiving" and shown["series"][0]["status"] == "receiving"
    time.sleep(0.05)
    [again] = complete(store, quiet_s=0.01)
    assert again.completion_count == 2 and again.instance_count == 2
    assert events(store, study) == ["study.received", "study.completed", "study.reopened", "study.completed"]


def test_study_that_never_goes_quiet_is_force_completed(store):
    study, series = generate_uid(), generate_uid()
    ingest(store, instance(study, series))
    time.sleep(0.05)
    [done] = complete(store, quiet_s=60, force_after_s=0.01)
    assert done.forced
    with store.session() as session:
        shown = show_study(session, study)
    assert shown["status"] == "complete" and shown["series"][0]["status"] == "complete"
    assert events(store, study)[-1] == "study.force_completed"


def test_concurrent_ingest_and_completion_lose_nothing(store):
    """Eight senders into one study while the completion job runs: every
    instance counted once, and the study never left complete with a late image."""
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(80)]
    stop = threading.Event()

    def completion_loop():
        while not stop.is_set():
            complete(store, quiet_s=0.0)

    checker = threading.Thread(target=completion_loop)
    checker.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda sop: ingest(store, instance(study, series, sop)), sops + sops[:20]))
    stop.set()
    checker.join()
    with store.session() as session:
        shown = show_study(session, study)
    assert shown["instance_count"] == 80
    assert sum(i["receive_count"] for i in shown["series"][0]["instances"]) == 100
    # Every reopen was followed by a completion or the study is still receiving.
    actions = [a for a in events(store, study) if a != "study.received"]
    completions = actions.count("study.completed")
    assert actions.count("study.reopened") in (completions - 1, completions)


def test_series_uid_reused_in_another_study_is_refused(store):
    series = generate_uid()
    study_a, study_b = generate_uid(), generate_uid()
    ingest(store, instance(study_a, series))
    with pytest.raises(SeriesConflict):
        ingest(store, instance(study_b, series))
    with store.session() as session:
        assert [s["study_uid"] for s in list_studies(session)] == [study_a]  # rolled back whole


def test_sop_instance_uid_of_another_study_is_refused_and_the_first_kept(store):
    study_a, study_b, sop = generate_uid(), generate_uid(), generate_uid()
    ingest(store, instance(study_a, generate_uid(), sop))
    with pytest.raises(InstanceConflict, match=f"instance {sop} already belongs to study {study_a}"):
        ingest(store, instance(study_b, generate_uid(), sop))
    with store.session() as session:
        assert [s["study_uid"] for s in list_studies(session)] == [study_a]
        assert show_study(session, study_a)["instance_count"] == 1


def test_reading_does_not_hold_up_ingest(store):
    """An operator's open query must not make C-STOREs wait (SQLite: no write lock)."""
    study, series = generate_uid(), generate_uid()
    with store.read_session() as session:
        list_studies(session)  # its transaction is open now
        done = []
        writer = threading.Thread(target=lambda: done.append(ingest(store, instance(study, series))))
        writer.start()
        writer.join(timeout=10)
        assert done, "ingest waited on a reader"


def test_study_with_an_open_association_is_not_quiet(store):
    study, series = generate_uid(), generate_uid()
    ingest(store, instance(study, series))
    time.sleep(0.05)
    with store.session.begin() as session:
        assert complete_quiet_studies(session, 0.01, 3600, in_flight={study}) == []
    with store.session.begin() as session:  # the maximum still applies
        [forced] = complete_quiet_studies(session, 0.01, 0.01, in_flight={study})
    assert forced.forced


def migrate(store: Store, step, revision: str) -> None:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":  # as store.upgrade: no cascades while tables are copied
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        step(_alembic_config(conn), revision)


def test_migrating_down_and_up_keeps_results_and_their_deliveries(store):
    # Two runs of one job made the same object (one SOP Instance UID): since 0003 each job has its
    # own row; going back to 0002 (one row per UID) and up again loses no delivery.
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (id, study_uid, status, first_received_at, opened_at, "
                          "last_received_at, completion_count, planned_count) VALUES "
                          "(1, '1.2.3', 'complete', '2026-12-01', '2026-12-01', '2026-12-01', 2, 2)"))
        for job in (1, 2):
            conn.execute(text("INSERT INTO jobs (id, study_id, model, status, priority, attempts, created_at, "
                              f"generation) VALUES ({job}, 1, 'm', 'succeeded', 0, 1, '2026-12-01', {job})"))
            conn.execute(text("INSERT INTO results (id, job_id, kind, sop_class_uid, sop_instance_uid, series_uid, "
                              f"path, created_at) VALUES ({job}, {job}, 'sr', '1.2', '1.2.3.4', '1.2.3.5', "
                              "'results/x.dcm', '2026-12-01')"))
            conn.execute(text("INSERT INTO deliveries (id, result_id, destination, status, attempts) VALUES "
                              f"({job}, {job}, 'pacs{job}', 'sent', 1)"))

    migrate(store, command.downgrade, "0002")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM results")).scalars().all() == [1]
        assert conn.execute(text("SELECT result_id, destination FROM deliveries ORDER BY id")).all() == \
            [(1, "pacs1"), (1, "pacs2")]
    migrate(store, command.upgrade, "head")
    check_schema(store.engine)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM deliveries")).scalar() == 2


def test_upgrading_from_0003_records_the_header_facts_of_the_instances_kept(store, db_url, tmp_path,
                                                                            monkeypatch, capsys):
    """`machaon db upgrade` reads the facts of the rows already there from their files in the spool;
    a file it cannot read leaves its row without facts, which planning names, and is tried again."""
    migrate(store, command.downgrade, "0003")
    spool = Spool(tmp_path / "spool")
    study, series = "1.2.3", "1.2.3.1"
    files = []
    for i in range(3):
        ds = ct_slice(study, series, i, np.zeros((8, 10)))
        ds.ProtocolName, ds.BodyPartExamined, ds.NumberOfFrames = "Thorax", "CHEST", 2
        files.append(ds)
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (id, study_uid, status, first_received_at, opened_at, "
                          "last_received_at, completion_count, planned_count) VALUES "
                          f"(1, '{study}', 'complete', '2026-12-01', '2026-12-01', '2026-12-01', 1, 0)"))
        conn.execute(text("INSERT INTO series (id, study_id, series_uid, modality, status, first_received_at, "
                          f"last_received_at) VALUES (1, 1, '{series}', 'CT', 'complete', '2026-12-01', "
                          "'2026-12-01')"))
        for i, ds in enumerate(files):
            relative = spool.relative_path(study, series, ds.SOPInstanceUID)
            conn.execute(text("INSERT INTO instances (id, series_id, sop_instance_uid, sop_class_uid, "
                              "transfer_syntax_uid, path, size_bytes, calling_ae, received_at, receive_count) "
                              f"VALUES ({i + 1}, 1, '{ds.SOPInstanceUID}', '{ds.SOPClassUID}', "
                              f"'1.2.840.10008.1.2.1', '{relative}', 1000, 'CT1', '2026-12-01', 1)"))
            if i < 2:  # the third file is missing
                spool.path(relative).parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(spool.path(relative), enforce_file_format=True)
        conn.execute(text("INSERT INTO jobs (id, study_id, series_id, model, rule, status, priority, attempts, "
                          "created_at, generation) VALUES (1000, 1, 1, 'm', 'r', 'queued', 0, 0, '2026-12-01', 1)"))
    monkeypatch.setenv("MACHAON_DATABASE_URL", db_url)
    monkeypatch.setenv("MACHAON_SPOOL_PATH", str(spool.root))

    assert main(["db", "upgrade"]) == 0
    said = capsys.readouterr().out
    assert "upgraded from 0003 to revision" in said
    assert "recorded the header facts of 2 instance(s)" in said
    assert "1 instance(s) kept without header facts" in said and files[2].SOPInstanceUID in said
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT frames, rows, columns FROM instances ORDER BY id")).all() == \
            [(2, 8, 10), (2, 8, 10), (None, None, None)]
        assert conn.execute(text("SELECT modality, protocol_name, body_part, image_type FROM series")).one() == \
            ("CT", "Thorax", "CHEST", "ORIGINAL\\PRIMARY\\AXIAL")
        # Planned before destinations were kept with jobs: its rule, by name, says when it ends.
        assert conn.execute(text("SELECT destinations FROM jobs")).scalar_one() is None

    rule = Rule(name="ct", models=["m"], match=Match(modality=["CT"], body_part=["chest"], min_slices=4))
    assert plan_jobs(store, [rule]) == 1  # two files of two frames each
    with store.session() as session:
        error = session.execute(select(Study.planning_error)).scalar_one()
    assert f"instance {files[2].SOPInstanceUID} of series {series}: cannot read studies/" in error

    files[2].save_as(spool.path(spool.relative_path(study, series, files[2].SOPInstanceUID)),
                     enforce_file_format=True)  # the file is back: upgrading again records it
    assert main(["db", "upgrade"]) == 0
    said = capsys.readouterr().out
    assert "up to date" in said and "recorded the header facts of 1 instance(s)" in said
    assert "without header facts" not in said

    migrate(store, command.downgrade, "0003")
    assert {"frames", "rows", "columns"}.isdisjoint(c["name"] for c in inspect(store.engine).get_columns("instances"))
    assert "destinations" not in {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM instances")).scalar() == 3
    migrate(store, command.upgrade, "head")
    check_schema(store.engine)
