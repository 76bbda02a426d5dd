"""Jobs recover by themselves when the failure may pass, stop when it cannot, and operators run
them again from the CLI once the cause is fixed; every action names who took it."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sqlite3
import subprocess
import time

import pydicom
from machaon.tools import phantom

from tests.harness import (
    MACHAON,
    RULES,
    acknowledged,
    finished,
    folder_setup,
    storescu,
)


def kept_path(server, dicom_file) -> object:
    header = pydicom.dcmread(dicom_file, stop_before_pixels=True)
    return server.spool / "studies" / header.StudyInstanceUID / header.SeriesInstanceUID / \
        f"{header.SOPInstanceUID}.dcm"


def cli_json(server, *args) -> list | dict:
    return json.loads(server.machaon(*args, "--json").stdout)


def test_an_image_briefly_unreadable_fails_one_attempt_and_the_next_succeeds(serve, built_models, tmp_path):
    server = serve(models={"path": str(built_models)}, completion={"complete_after": 2, "check_every": 0.2},
                   worker={"retry_initial": 3}, extra=folder_setup(tmp_path))
    db = server.db_url.removeprefix("sqlite:///")
    study = phantom.write_study(tmp_path / "study", seed=50, views=False)
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES
    # Storage unmounted for a moment, say: the file is not there when the job first reads it.
    kept = kept_path(server, study.sax_files[0])
    away = kept.with_name("away")
    kept.rename(away)
    server.wait_for(lambda: _job_row(db) == ("queued", 1), what="the first attempt to fail and be queued again")
    away.rename(kept)
    [done] = finished(server, study.study_uid)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 2, None)
    shown = cli_json(server, "jobs", "show", str(done["id"]))
    retry, succeeded = shown["history"][-2:]
    assert (retry["action"], succeeded["action"]) == ("job.retry_scheduled", "job.succeeded")
    assert retry["detail"]["error"].startswith(f"cannot read {kept} from the spool: No such file")
    assert retry["detail"]["retry_in_s"] == 3
    assert set(shown["timings"]) >= {"read_and_decode", "inference", "encode_results"}


def _job_row(db: str) -> tuple[str, int] | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT status, attempts FROM jobs").fetchone()


def test_a_job_whose_worker_is_killed_every_time_fails_after_max_attempts(serve, built_models, tmp_path):
    # Jobs run only in `machaon worker` processes here, killed with SIGKILL while they run the job.
    server = serve(models={"path": str(built_models)}, worker={"threads": 0, "lease": 1, "max_attempts": 2},
                   extra=folder_setup(tmp_path))
    db = server.db_url.removeprefix("sqlite:///")
    study = phantom.write_study(tmp_path / "study", seed=51, views=False)
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES
    server.wait_for(lambda: _job_row(db), what="the job to be planned")
    env = {**os.environ, "MACHAON_WORKER_THREADS": "1"}
    log = (tmp_path / "workers.log").open("a")

    def worker() -> subprocess.Popen:
        return subprocess.Popen([MACHAON, "worker", "--config", str(server.config)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        for attempt in (1, 2):
            process = worker()
            deadline = time.monotonic() + 60
            while _job_row(db) != ("running", attempt) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _job_row(db) == ("running", attempt), (tmp_path / "workers.log").read_text()
            process.kill()
            process.wait()
        # The next worker finds the lease run out a second time: the job fails, the worker lives.
        process = worker()
        [job] = finished(server, study.study_uid)
        assert job["status"] == "failed" and job["attempts"] == 2
        assert "the worker stopped 2 times while running this job" in job["error"]
        assert process.poll() is None
    finally:
        process.kill()
        log.close()


def test_a_failed_job_is_retried_from_the_cli_once_its_cause_is_fixed(serve, built_models, orthanc, tmp_path):
    orthanc.start()
    setup = RULES.format(destination="pacs") + (
        f'[destinations.pacs]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\ntimeout = 5\n')
    server = serve(models={"path": str(built_models)}, extra=setup)
    study = phantom.write_study(tmp_path / "study", seed=52, views=False)
    good = tmp_path / "good.dcm"
    shutil.copy(study.sax_files[5], good)
    broken = pydicom.dcmread(study.sax_files[5])
    del broken.PixelData  # a scanner that sent a header without its image
    broken.save_as(study.sax_files[5])
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES

    [failed] = server.wait_for(lambda: cli_json(server, "jobs", "list", "--status", "failed"),
                               what="the failed job", timeout=60)
    assert failed["study_uid"] == study.study_uid and "has no pixel data" in failed["error"]
    listed = server.machaon("jobs", "list", "--status", "failed", check=True).stdout
    assert str(failed["id"]) in listed and "failed" in listed

    # The scanner sends the image again: the study completes again, and its new job succeeds.
    assert acknowledged(storescu(server.port, good).stderr) == 1
    server.wait_for(lambda: len(finished(server, study.study_uid, count=2)) == 2, what="the second job")
    # The operator retries the failed one: it runs again, and its results (the same objects) are not
    # sent twice.
    retried = server.machaon("jobs", "retry", str(failed["id"]))
    assert f"queued again: 1 job(s) ({failed['id']})" in retried.stdout
    shown = server.wait_for(lambda: (j := cli_json(server, "jobs", "show", str(failed["id"])))["status"]
                            == "succeeded" and j, what="the retried job to succeed", timeout=60)
    assert [r["deliveries"][0]["status"] for r in shown["results"]] == ["sent", "sent"]
    time.sleep(2)  # a few dispatch passes more
    instances = orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")
    assert len(instances) == 2  # one SEG and one SR, each once
    actors = [(e["actor"], e["action"]) for e in cli_json(server, "events", "--study", study.study_uid)]
    assert (f"cli:{getpass.getuser()}", "job.retried") in actors
