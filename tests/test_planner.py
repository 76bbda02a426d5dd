"""Planning on a real job store (SQLite and PostgreSQL), without `machaon serve`: the rules match on
the header facts recorded at ingest, so planning reads no file; each job keeps its destinations."""

from __future__ import annotations

import json
import shutil

import numpy as np
from machaon.completion import complete_quiet_studies
from machaon.config import load_settings
from machaon.planner import plan_jobs, series_in_store
from machaon.rules import Match, Rule
from machaon.scp import StorageSCP
from machaon.spool import Spool
from machaon.store import Event, Instance, Job, ReceivedInstance, SeriesRow, Store, Study, record_instance
from machaon.worker import Runner
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from tests.dicomgen import ct_slice, with_raw_values

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

CHEST = Rule(name="chest", models=["chest-model"], destinations=["pacs", "archive"], priority=5,
             match=Match(modality=["CT"], protocol_name="thorax", body_part=["chest"], image_type=["axial"],
                         min_slices=3, min_size=8, max_size=16))
MR = Rule(name="mr", models=["mr-model"], destinations=["pacs"], match=Match(modality=["MR"]))


def instance(study: str, series: str, **facts) -> ReceivedInstance:
    sop = generate_uid()
    values = dict(sop_class_uid=CT, calling_ae="CT1", modality="CT", rows=512, columns=512) | facts
    return ReceivedInstance(
        study_uid=study, series_uid=series, sop_instance_uid=sop, transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{series}/{sop}.dcm", size_bytes=1000, **values)


def ingest(store: Store, *instances: ReceivedInstance) -> None:
    with store.engine.begin() as conn:
        for inst in instances:
            record_instance(conn, inst, actor="dicom:CT1")


def complete(store: Store) -> None:
    with store.session.begin() as session:
        complete_quiet_studies(session, 0.0, 3600)


def jobs(store: Store, study_uid: str) -> list[Job]:
    with store.session() as session:
        return list(session.execute(select(Job).join(Study).where(Study.study_uid == study_uid)
                                    .order_by(Job.id)).scalars())


def study_row(store: Store, study_uid: str) -> Study:
    with store.session() as session:
        return session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()


def actions(store: Store, study_uid: str) -> list[str]:
    with store.session() as session:
        return list(session.execute(select(Event.action).where(Event.study_uid == study_uid)
                                    .order_by(Event.id)).scalars())


def write_ct(spool: Spool, study: str, series: str, index: int, **values) -> str:
    ds = ct_slice(study, series, index, np.zeros((8, 8)))
    ds.ProtocolName, ds.BodyPartExamined = "Thorax routine", "CHEST"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    relative = spool.relative_path(study, series, ds.SOPInstanceUID)
    spool.path(relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(spool.path(relative), enforce_file_format=True)
    return relative


def test_files_indexed_from_the_spool_are_planned_with_the_spool_gone(store, tmp_path):
    """The facts come from the headers as ingest reads them; planning then needs no file."""
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(load_settings(environ={}), store, spool)
    study, series, other = generate_uid(), generate_uid(), generate_uid()
    for i in range(3):
        scp.index(write_ct(spool, study, series, i))
    scp.index(write_ct(spool, study, other, 0, Modality="MR", ImageType=["DERIVED", "SECONDARY"]))
    complete(store)
    shutil.rmtree(spool.root)

    assert plan_jobs(store, [CHEST, MR]) == 2
    chest, mr = jobs(store, study)
    assert (chest.model, chest.rule, chest.status, chest.generation, chest.priority) == \
        ("chest-model", "chest", "queued", 1, 5)
    assert json.loads(chest.destinations) == ["pacs", "archive"]
    assert (mr.model, json.loads(mr.destinations)) == ("mr-model", ["pacs"])
    assert study_row(store, study).planning_error is None
    with store.read_session() as session:
        facts = {f.series_uid: f for f in series_in_store(session, study)[0]}
    assert (facts[series].protocol_name, facts[series].body_part, facts[series].image_type) == \
        ("Thorax routine", "CHEST", ("ORIGINAL", "PRIMARY", "AXIAL"))
    assert (facts[series].slices, facts[series].rows, facts[series].columns) == (3, 8, 8)
    assert facts[other].image_type == ("DERIVED", "SECONDARY")


def test_a_value_that_is_not_what_its_vr_says_is_recorded_as_absent(store, tmp_path):
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(load_settings(environ={}), store, spool)
    study, series = generate_uid(), generate_uid()
    relative = write_ct(spool, study, series, 0)
    with_raw_values(spool.path(relative), spool.path(relative), NumberOfFrames="1A")
    scp.index(relative)
    with store.session() as session:
        frames = session.execute(select(Instance.frames)).scalar_one()
    assert frames == 1  # as the rules count an image without a readable NumberOfFrames
    assert "instance.invalid_values" in actions(store, study)


def test_each_fact_the_rules_match_on_comes_from_the_rows(store):
    study = generate_uid()
    multiframe, small, other_sender = generate_uid(), generate_uid(), generate_uid()
    chest = dict(protocol_name="THORAX low dose", body_part="CHEST", image_type="ORIGINAL\\PRIMARY\\AXIAL",
                 rows=12, columns=12)
    ingest(store,
           instance(study, multiframe, sop_class_uid=ENHANCED_CT, frames=40, **chest),
           *(instance(study, small, **chest | {"rows": 4, "columns": 4}) for _ in range(4)),
           instance(study, other_sender, calling_ae="MR7", modality="MR"))
    complete(store)
    from_pacs = Rule(name="from-mr7", models=["m"], match=Match(calling_aet=["MR7"]))
    enhanced = Rule(name="enhanced", models=["e"], match=Match(sop_class=[ENHANCED_CT], min_slices=40))
    assert plan_jobs(store, [CHEST, from_pacs, enhanced]) == 3
    planned = {(j.series_id, j.rule) for j in jobs(store, study)}
    with store.session() as session:
        ids = dict(session.execute(select(SeriesRow.series_uid, SeriesRow.id)).all())
    assert planned == {(ids[multiframe], "chest"), (ids[multiframe], "enhanced"),
                       (ids[other_sender], "from-mr7")}  # the small series' images are smaller than 8x8


def test_a_second_completion_supersedes_the_queued_job(store):
    study, series = generate_uid(), generate_uid()
    ingest(store, *(instance(study, series, modality="MR") for _ in range(3)))
    complete(store)
    assert plan_jobs(store, [MR]) == 1
    assert plan_jobs(store, [MR]) == 0  # planned once per completion

    ingest(store, instance(study, series, modality="MR"))  # a late image reopens the study
    assert plan_jobs(store, [MR]) == 0  # receiving again: nothing to plan
    complete(store)
    assert plan_jobs(store, [MR]) == 1
    first, second = jobs(store, study)
    assert (first.status, first.superseded_by, first.generation) == ("superseded", second.id, 1)
    assert (second.status, second.superseded_by, second.generation) == ("queued", None, 2)
    assert json.loads(second.destinations) == ["pacs"]
    assert study_row(store, study).planned_count == 2
    assert actions(store, study).count("jobs.planned") == 2


def test_a_study_no_rule_matches_is_planned_with_no_jobs(store):
    study = generate_uid()
    ingest(store, instance(study, generate_uid(), modality="US"))
    complete(store)
    assert plan_jobs(store, [CHEST, MR]) == 0
    assert jobs(store, study) == []
    row = study_row(store, study)
    assert (row.planned_count, row.planning_error) == (1, None)
    assert actions(store, study)[-1] == "study.no_rule_matched"


def test_an_instance_without_facts_is_named_and_its_series_planned_from_the_others(store):
    """A row from before the facts were recorded, whose file `machaon db upgrade` could not read."""
    study, series = generate_uid(), generate_uid()
    unread = instance(study, series, modality="MR")
    ingest(store, unread, *(instance(study, series, modality="MR") for _ in range(2)))
    with store.engine.begin() as conn:
        conn.execute(update(Instance).where(Instance.sop_instance_uid == unread.sop_instance_uid)
                     .values(frames=None, rows=None, columns=None))
    complete(store)
    assert plan_jobs(store, [MR]) == 1
    error = study_row(store, study).planning_error
    assert f"instance {unread.sop_instance_uid} of series {series}: cannot read {unread.path} from the spool" \
        in error
    assert "study.planning_failed" in actions(store, study)
    with store.read_session() as session:
        [facts], _ = series_in_store(session, study)
    assert facts.slices == 2


def test_a_job_delivers_to_the_destinations_it_was_planned_with(store, tmp_path):
    study = generate_uid()
    ingest(store, instance(study, generate_uid(), modality="MR"))
    complete(store)
    plan_jobs(store, [MR])
    [job] = jobs(store, study)
    # The rule renamed, or gone, since: the job still knows where its results go.
    runner = Runner(load_settings(environ={}), store, Spool(tmp_path), ort_sessions=None)  # type: ignore[arg-type]
    assert runner._destinations(job) == ["pacs"]
    # A job planned before destinations were kept with it asks its rule, by name, as before.
    job.destinations = None
    assert runner._destinations(job) == []
    runner.settings = runner.settings.model_copy(update={"rules": [MR]})
    assert runner._destinations(job) == ["pacs"]
