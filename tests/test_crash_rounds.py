"""`kill -9` through the whole path, five times: while a study streams in, while its job runs, while
its results are being sent to a real Orthanc, and in the quiet period before completion. After each
kill the service is started again on the same spool and store, and the scanner sends again what it
never heard back about. In the end no acknowledged instance is missing or altered, every study's
results are in Orthanc once (one SEG and one SR), and the jobs a killed process left running were
taken back at its restart, not after their 10-minute lease."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from machaon.store import JobStatus
from machaon.tools import phantom

from tests.harness import RULES, dataset_bytes, delivered, jobs_of, storescu

SLICES = 40


def acknowledged_files(storescu_stderr: str) -> list[Path]:
    """The files storescu -v heard a success for ("Sending file: X", then the response)."""
    acked, current = [], None
    for line in storescu_stderr.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:")[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
    return acked


def spooled(server) -> int:
    return sum(1 for _ in (server.spool / "studies").rglob("*.dcm"))


def moment(round_: int, server, study_uid: str, before: int):
    """When to kill in each round: mid-transfer, job running, results being sent, quiet period."""
    def jobs(status):
        return any(j["status"] == status for j in jobs_of(server, study_uid))
    return [
        lambda: spooled(server) >= before + 10,  # a third of the study in
        lambda: jobs(JobStatus.RUNNING),
        lambda: any(r for j in jobs_of(server, study_uid) for r in j["results"]),  # results made
        lambda: spooled(server) >= before + SLICES,  # all in, not yet complete
        lambda: spooled(server) >= before + 25,
    ][round_]


def test_kill_9_rounds_lose_nothing_and_send_each_result_once(serve, built_models, orthanc, tmp_path):
    orthanc.start()
    setup = RULES.format(destination="pacs") + (
        f'[destinations.pacs]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\ntimeout = 10\n')
    settings = {"models": {"path": str(built_models)}, "worker": {"lease": 600}}
    server = serve(**settings, extra=setup)
    studies = []
    for round_ in range(5):
        study = phantom.write_study(tmp_path / f"study{round_}", seed=90 + round_, views=False, slices=SLICES)
        studies.append(study)
        before = spooled(server)
        sender = subprocess.Popen(
            ["/usr/bin/storescu", "-v", "-aet", "SCANNER", "-aec", "MACHAON", "127.0.0.1", str(server.port),
             *map(str, study.sax_files)], stderr=subprocess.PIPE, text=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})
        server.wait_for(moment(round_, server, study.study_uid, before), timeout=60,
                        what=f"the moment of round {round_ + 1}")
        server.proc.kill()
        server.proc.wait()
        acked = acknowledged_files(sender.communicate(timeout=60)[1])
        server = serve(db_url=server.db_url, workdir=server.workdir, **settings, extra=setup)
        for source in acked:  # nothing acknowledged is missing or altered
            header = pydicom.dcmread(source, stop_before_pixels=True)
            kept = server.spool / "studies" / header.StudyInstanceUID / header.SeriesInstanceUID / (
                f"{header.SOPInstanceUID}.dcm")
            assert dataset_bytes(kept) == dataset_bytes(source), f"round {round_ + 1}: {source.name}"
        unheard = [f for f in study.sax_files if f not in acked]
        if unheard:  # as a scanner does: what it never heard back about, it sends again
            assert len(storescu(server.port, *unheard).stderr.split("Received Store Response (Success)")) \
                == len(unheard) + 1

    for study in studies:
        delivered(server, study.study_uid)
        instances = orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")
        modalities = sorted(i["00080060"]["Value"][0] for i in instances)
        assert modalities == ["SEG", "SR"], f"{study.study_uid}: {modalities}"
        taken_back = [e for e in server.study(study.study_uid)["events"] if e["action"] == "job.lease_expired"]
        assert all("no longer running" in e["detail"].get("reason", "") for e in taken_back)
