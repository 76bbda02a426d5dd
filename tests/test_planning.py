"""Planning jobs from what arrived: one study that cannot be read never holds up another, a study
sent again runs its models once per completion, and files left without a row are found at start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
from machaon.tools import phantom

from tests.dicomgen import with_raw_values
from tests.harness import MACHAON, acknowledged, finished, folder_setup, jobs_of, run_machaon, storescu


def test_a_file_damaged_after_acknowledgement_fails_its_job_and_the_next_study_runs(serve, built_models,
                                                                                   tmp_path):
    server = serve(models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    bad = phantom.write_study(tmp_path / "bad", seed=40, views=False)
    assert acknowledged(storescu(server.port, *bad.sax_files).stderr) == phantom.SAX_SLICES
    # Between its acknowledgement and its job, one kept file is damaged (a disk, a person). Planning
    # reads the rows, not the files, so the study is planned; its job fails saying which file.
    header = pydicom.dcmread(bad.sax_files[0], stop_before_pixels=True)
    kept = server.spool / "studies" / header.StudyInstanceUID / header.SeriesInstanceUID / \
        f"{header.SOPInstanceUID}.dcm"
    kept.write_bytes(b"\x00" * 16)
    [job] = finished(server, bad.study_uid)
    assert job["status"] == "failed"
    assert f"{kept} in the spool is not a readable DICOM file" in job["error"]
    assert "send the image again" in job["error"]

    good = phantom.write_study(tmp_path / "good", seed=41, views=False)
    assert acknowledged(storescu(server.port, *good.sax_files).stderr) == phantom.SAX_SLICES
    [job] = finished(server, good.study_uid)
    assert job["status"] == "succeeded", job["error"]
    assert server.study(good.study_uid)["planning_error"] is None
    assert "Traceback" not in server.log()


def test_rules_test_reads_a_folder_with_a_malformed_value(tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=42, views=False)
    with_raw_values(study.sax_files[0], study.sax_files[0], NumberOfFrames="1A")
    done = run_machaon("rules", "test", str(tmp_path / "study"), env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "'SAX cine (phantom)', 12 images of 256x256\n  match cardiac-short-axis" in done.stdout


def test_a_study_sent_three_times_runs_its_model_once_per_completion(serve, built_models, tmp_path):
    # No worker in serve while the study is sent again and again: every completion queues a job,
    # and each supersedes the one queued before it.
    server = serve(models={"path": str(built_models)}, worker={"threads": 0}, dispatch={"check_every": 0.5},
                   extra=folder_setup(tmp_path))
    study = phantom.write_study(tmp_path / "study", seed=43, views=False)
    for generation in (1, 2, 3):
        assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES
        server.wait_for(lambda g=generation: len(jobs_of(server, study.study_uid)) == g,
                        what=f"the job of completion {generation}")
    jobs = jobs_of(server, study.study_uid)
    series_uid = pydicom.dcmread(study.sax_files[0], stop_before_pixels=True).SeriesInstanceUID
    assert [j["status"] for j in jobs] == ["superseded", "superseded", "queued"]
    assert [j["superseded_by"] for j in jobs] == [jobs[1]["id"], jobs[2]["id"], None]
    assert {j["series_uid"] for j in jobs} == {series_uid}

    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([MACHAON, "worker", "--config", str(server.config)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "MACHAON_WORKER_THREADS": "1"})
    try:
        [third] = finished(server, study.study_uid)
        assert third["status"] == "succeeded" and third["attempts"] == 1
        # Sent a fourth time, the same images give the same objects: the new job has them as its
        # results, the earlier job keeps its own, and each object went to the folder once.
        assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES
        finished(server, study.study_uid, count=2)
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    jobs = jobs_of(server, study.study_uid)
    third, fourth = jobs[2], jobs[3]
    assert [j["status"] for j in jobs] == ["superseded", "superseded", "succeeded", "succeeded"]
    assert [r["sop_instance_uid"] for r in third["results"]] == [r["sop_instance_uid"] for r in fourth["results"]]
    assert len(third["results"]) == 2
    for result in fourth["results"]:
        [delivery] = result["deliveries"]
        assert delivery["destination"] == "out"
    events = server.study(study.study_uid)["events"]
    assert sum(e["action"] == "job.succeeded" for e in events) == 2
    assert sum(e["action"] == "result.sent" for e in events) == 2
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2


def test_files_left_without_a_row_are_indexed_or_quarantined_at_start(serve, tmp_path):
    server = serve()
    study = phantom.write_study(tmp_path / "study", seed=44, views=False)
    assert acknowledged(storescu(server.port, *study.sax_files[:-1]).stderr) == phantom.SAX_SLICES - 1
    assert server.stop() == 0
    # As a kill between the rename and the commit leaves them: a whole file under its final name,
    # and a file nobody can read.
    last = pydicom.dcmread(study.sax_files[-1], stop_before_pixels=True)
    folder = server.spool / "studies" / last.StudyInstanceUID / last.SeriesInstanceUID
    shutil.copyfile(study.sax_files[-1], folder / f"{last.SOPInstanceUID}.dcm")
    (folder / "1.2.3.4.dcm").write_bytes(b"not DICOM")
    # and an older copy of a kept instance, filed under the UIDs it had before it was sent again
    older = pydicom.dcmread(study.sax_files[0])
    kept_at = f"studies/{older.StudyInstanceUID}/{older.SeriesInstanceUID}/{older.SOPInstanceUID}.dcm"
    older.StudyInstanceUID, older.SeriesInstanceUID = "1.2.3.5", "1.2.3.6"
    (server.spool / "studies" / "1.2.3.5" / "1.2.3.6").mkdir(parents=True)
    older.save_as(server.spool / "studies" / "1.2.3.5" / "1.2.3.6" / f"{older.SOPInstanceUID}.dcm")
    server.start()
    server.wait_for(lambda: server.study(study.study_uid)["instance_count"] == phantom.SAX_SLICES,
                    what="the file without a row to be indexed")
    assert (server.spool / "quarantine" / last.StudyInstanceUID / last.SeriesInstanceUID / "1.2.3.4.dcm").exists()
    assert not (folder / "1.2.3.4.dcm").exists()
    events = {e["action"]: e for e in server.study(study.study_uid)["events"]}
    assert events["spool.indexed"]["detail"]["sop_instance_uid"] == last.SOPInstanceUID
    assert "quarantine/" in events["spool.quarantined"]["detail"]["path"]
    assert "cannot be decoded" in events["spool.quarantined"]["detail"]["reason"]
    assert Path(server.spool / events["spool.quarantined"]["detail"]["path"]).exists()
    server.wait_for(lambda: (server.spool / "quarantine" / "1.2.3.5" / "1.2.3.6").exists(),
                    what="the older copy to be quarantined")
    assert server.study("1.2.3.5") is None  # not indexed over the newer copy
    assert f"an older copy of an instance kept at {kept_at}" in server.log()
