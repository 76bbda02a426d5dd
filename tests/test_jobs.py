"""The main job, end to end: a study arrives by C-STORE, completes, its rules queue jobs, the
model runs, and the SEG and SR reach their destination; failures are kept on the job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import highdicom as hd
import psycopg
import pydicom
import pytest
from machaon.tools import phantom
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

from tests.harness import (
    MACHAON,
    RULES,
    Orthanc,
    acknowledged,
    delivered,
    finished,
    folder_setup,
    free_port,
    jobs_of,
    make_certificates,
    run_machaon,
    storescu,
)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_phantom_study_gets_a_seg_and_sr_in_the_folder(serve, built_models, tmp_path, backend, request):
    study = phantom.write_study(tmp_path / "study", seed=31)
    db_url = request.getfixturevalue("pg_store_url") if backend == "postgresql" else None
    server = serve(db_url=db_url, models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    sent = storescu(server.port, *study.sax_files, *study.view_files.values(), aet="MRI1")
    assert acknowledged(sent.stderr) == phantom.SAX_SLICES + 3
    [job] = finished(server, study.study_uid)
    assert job["status"] == "succeeded", job["error"]
    assert job["model"] == "lv-segmentation" and job["rule"] == "lv"  # the long-axis views matched no rule
    results = delivered(server, study.study_uid)
    assert sorted(r["kind"] for r in results) == ["seg", "sr"]

    files = sorted((tmp_path / "out" / study.study_uid).rglob("*.dcm"))
    assert len(files) == 2
    for path in files:
        if shutil.which("dciodvfy"):
            checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert not [x for x in (checked.stdout + checked.stderr).splitlines() if x.startswith("Error")]
    seg = next(hd.seg.segread(p) for p in files if pydicom.dcmread(p).Modality == "SEG")
    mask = seg.get_pixels_by_source_instance(
        [pydicom.dcmread(p).SOPInstanceUID for p in study.sax_files], segment_numbers=[1]).squeeze(-1)
    truth = study.sax_labels == phantom.CAVITY
    assert 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum()) >= 0.9
    sr = next(hd.sr.srread(p) for p in files if pydicom.dcmread(p).Modality == "SR")
    [volume] = sr.content.get_volumetric_roi_measurement_groups()
    assert volume.get_measurements()[0].value == pytest.approx(study.cavity_volume_ml, rel=0.10)


@pytest.mark.postgres
def test_an_extra_worker_process_runs_the_jobs_beside_serve(serve, built_models, tmp_path, pg_store_url):
    # `machaon serve` receives and delivers but runs no jobs itself; `machaon worker`, with
    # the same configuration and job store, takes them.
    server = serve(db_url=pg_store_url, models={"path": str(built_models)}, worker={"threads": 0},
                   dispatch={"check_every": 0.5}, extra=folder_setup(tmp_path))
    idle = run_machaon("worker", config=server.config)
    assert idle.returncode == 78 and "worker.threads" in idle.stderr and "would run nothing" in idle.stderr
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([MACHAON, "worker", "--config", str(server.config)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "MACHAON_WORKER_THREADS": "1"})
    try:
        study = phantom.write_study(tmp_path / "study", seed=30, views=False, slices=60)  # a job of seconds
        assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 60
        with psycopg.connect(pg_store_url.replace("+psycopg", ""), autocommit=True) as database:
            deadline = time.monotonic() + 60
            while not database.execute("SELECT 1 FROM jobs WHERE status = 'running'").fetchone():
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)  # mid-job: the job is let finish first
        assert worker.wait(60) == 0
        [job] = finished(server, study.study_uid)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        delivered(server, study.study_uid)
        actors = {e["action"]: e["actor"] for e in server.study(study.study_uid)["events"]}
        assert actors["job.succeeded"] == f"{socket.gethostname()}:{worker.pid}"
        assert actors["result.sent"] == "dispatcher"
        assert len(list((tmp_path / "out" / study.study_uid).rglob("*.dcm"))) == 2
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
    assert "1 thread(s) taking jobs from postgresql+psycopg://" in (tmp_path / "worker.log").read_text()


def _spoil(study, how: str) -> None:
    """Rewrite a phantom study's short-axis files into one kind of bad input."""
    for i, path in enumerate(study.sax_files):
        ds = pydicom.dcmread(path)
        if how == "mixed orientations" and i % 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        elif how == "no pixel data":
            del ds.PixelData
        elif how == "unsupported SOP class":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        elif how == "corrupt compressed frame":
            ds.compress(RLELossless)
            if i == 3:  # one frame cut short, as a broken encoder would leave it
                frame = get_frame(ds.PixelData, 0, number_of_frames=1)
                ds.PixelData = encapsulate([frame[: len(frame) // 3]])
        ds.save_as(path)


BAD_INPUT = {
    "mixed orientations": "mixes image orientations: a model takes one stack at a time",
    "no pixel data": "has no pixel data (SOP class MR Image Storage): this model needs images",
    "unsupported SOP class": "is Secondary Capture Image Storage, which the model does not take",
    "corrupt compressed frame": "cannot decode its pixel data (RLE Lossless)",
}


def test_bad_studies_fail_with_a_reason_and_a_good_one_still_succeeds(serve, built_models, tmp_path):
    bad = {}
    for seed, how in enumerate(BAD_INPUT, start=40):
        bad[how] = phantom.write_study(tmp_path / f"bad{seed}", seed=seed, views=False)
        _spoil(bad[how], how)
    good = phantom.write_study(tmp_path / "good", seed=32, views=False)
    server = serve(models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    files = [f for study in bad.values() for f in study.sax_files] + good.sax_files
    assert acknowledged(storescu(server.port, *files, extra=("-xr",)).stderr) == len(files)
    for how, study in bad.items():
        [job] = finished(server, study.study_uid)
        assert job["status"] == "failed", how
        assert BAD_INPUT[how] in job["error"], (how, job["error"])
        assert job["results"] == []
    [succeeded] = finished(server, good.study_uid)
    assert succeeded["status"] == "succeeded"
    delivered(server, good.study_uid)


def test_study_without_a_matching_rule_is_recorded_as_such(serve, built_models, tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=34)
    server = serve(models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    assert acknowledged(storescu(server.port, study.view_files["two-chamber"]).stderr) == 1
    server.wait_for(lambda: any(e["action"] == "study.no_rule_matched" for e in server.study(study.study_uid)["events"]),
                    what="no rule matched")
    assert jobs_of(server, study.study_uid) == []


def test_a_stack_with_slices_missing_fails_as_incomplete_and_succeeds_once_they_arrive(serve, built_models,
                                                                                     tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=35, views=False)
    server = serve(models={"path": str(built_models)}, extra=folder_setup(tmp_path))
    late = [study.sax_files[5], study.sax_files[-1]]  # a middle slice and the apex, still on their way
    assert acknowledged(storescu(server.port, *[f for f in study.sax_files if f not in late]).stderr) == 10
    [first] = finished(server, study.study_uid)
    assert first["status"] == "failed" and first["results"] == []
    assert first["error"].startswith("series incomplete: 10 slices, a gap of 16.0 mm between slices 5 and 6")
    assert "10 of 12 images expected (ImagesInAcquisition)" in first["error"]
    assert first["error"].endswith("it runs again by itself when more images arrive")
    assert acknowledged(storescu(server.port, *late).stderr) == 2
    finished(server, study.study_uid, count=2)
    jobs = jobs_of(server, study.study_uid)
    assert [(j["generation"], j["status"]) for j in jobs] == [(1, "failed"), (2, "succeeded")]
    assert sorted(r["kind"] for r in delivered(server, study.study_uid)) == ["seg", "sr"]
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2  # nothing went out from the partial stack


def test_a_job_cut_off_by_a_crash_runs_again_once_its_lease_runs_out(serve, built_models, tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=36, views=False, slices=60)  # a job of a few seconds
    settings = {"models": {"path": str(built_models)}, "worker": {"lease": 3}}
    server = serve(**settings, extra=folder_setup(tmp_path))
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 60
    database = sqlite3.connect(f"file:{server.workdir / 'machaon.db'}?mode=ro", uri=True)
    deadline = time.monotonic() + 60
    while not database.execute("SELECT 1 FROM jobs WHERE status = 'running'").fetchone():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    database.close()
    server.stop(signal.SIGKILL)  # mid-job: the lease is left behind, unrenewed

    restarted = serve(**settings, db_url=server.db_url, workdir=server.workdir, extra=folder_setup(tmp_path))
    [job] = finished(restarted, study.study_uid)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert "job.lease_expired" in [e["action"] for e in restarted.study(study.study_uid)["events"]]
    delivered(restarted, study.study_uid)
    assert len(list((tmp_path / "out" / study.study_uid).rglob("*.dcm"))) == 2


def test_results_reach_orthanc_where_a_viewer_finds_them_even_after_it_was_down(serve, built_models, orthanc, tmp_path):
    setup = RULES.format(destination="pacs") + (
        f'[destinations.pacs]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        'timeout = 5\n')
    study = phantom.write_study(tmp_path / "study", seed=37, views=False)
    server = serve(models={"path": str(built_models)}, dispatch={"check_every": 0.5, "retry_initial": 0.5,
                                                                   "retry_max": 2}, extra=setup)
    # The PACS is down when the results are ready: they wait, and each try is recorded.
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 12
    [job] = finished(server, study.study_uid)
    assert job["status"] == "succeeded"
    server.wait_for(lambda: all(d["attempts"] >= 2 and "association failed" in d["last_error"]
                                for r in jobs_of(server, study.study_uid)[0]["results"] for d in r["deliveries"]),
                    what="failed attempts recorded")
    orthanc.start()
    delivered(server, study.study_uid)
    time.sleep(2)  # more dispatch passes: nothing acknowledged is sent again

    # As a viewer would look: C-FIND at series level, and QIDO-RS.
    found = subprocess.run(["/usr/bin/findscu", "-S", "-aet", "VIEWER", "-aec", "ORTHANC", "-k", "QueryRetrieveLevel=SERIES",
                            "-k", f"StudyInstanceUID={study.study_uid}", "-k", "SeriesInstanceUID", "-k", "Modality",
                            "127.0.0.1", str(orthanc.dicom_port)], capture_output=True, text=True, timeout=30)
    modalities = sorted(re.findall(r"\(0008,0060\) CS \[(\w+) ?\]", found.stderr + found.stdout))
    assert modalities == ["SEG", "SR"]
    series = orthanc.get(f"/dicom-web/studies/{study.study_uid}/series")
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["SEG", "SR"]  # only the results were sent to this PACS
    instances = orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")
    assert len(instances) == 2  # one SEG and one SR: none twice


# A PACS that stores images and SR but was never told about SEG (a common gap in older archives).
NO_SEG_PROFILE = r"""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[NoSeg]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = MRImageStorage\Uncompressed
PresentationContext3 = Comprehensive3DSRStorage\Uncompressed
[[Profiles]]
[NoSeg]
PresentationContexts = NoSeg
"""


def test_a_pacs_that_refuses_seg_gets_the_sr_and_the_seg_waits_with_a_reason(serve, built_models, tmp_path):
    (tmp_path / "pacs").mkdir()
    (tmp_path / "no-seg.cfg").write_text(NO_SEG_PROFILE)
    port = free_port()
    pacs_log = (tmp_path / "storescp.log").open("w")
    pacs = subprocess.Popen(["storescp", "-v", "-aet", "OLDPACS", "-od", str(tmp_path / "pacs"),
                             "-xf", str(tmp_path / "no-seg.cfg"), "NoSeg", str(port)],
                            stdout=pacs_log, stderr=subprocess.STDOUT)
    try:
        setup = RULES.format(destination="pacs") + (
            f'[destinations.pacs]\ntype = "dicom"\nae_title = "OLDPACS"\nhost = "127.0.0.1"\nport = {port}\n')
        study = phantom.write_study(tmp_path / "study", seed=39, views=False)
        server = serve(models={"path": str(built_models)}, dispatch={"retry_initial": 60}, extra=setup)
        assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 12
        [job] = finished(server, study.study_uid)
        assert job["status"] == "succeeded", job["error"]

        def outcome():
            results = {r["kind"]: r["deliveries"][0] for r in jobs_of(server, study.study_uid)[0]["results"]}
            return results if results["sr"]["status"] == "sent" and results["seg"]["attempts"] else None
        results = server.wait_for(outcome, what="the SR sent and the SEG tried")
        assert results["seg"]["status"] == "pending"
        assert "does not accept Segmentation Storage" in results["seg"]["last_error"]
        assert [p.name[:2] for p in (tmp_path / "pacs").iterdir()] == ["SR"]  # storescp names files by modality
        assert (tmp_path / "storescp.log").read_text().count("Association Received") == 1  # both results, one association
    finally:
        pacs.terminate()
        pacs.wait(10)
        pacs_log.close()


def test_results_reach_orthanc_over_dicom_tls_and_a_wrong_ca_is_named(serve, built_models, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", DicomTlsEnabled=True, DicomTlsCertificate=str(certs / "pacs.crt"),
                      DicomTlsPrivateKey=str(certs / "pacs.key"),
                      DicomTlsTrustedCertificates=str(certs / "ca.crt"), DicomTlsRemoteCertificateRequired=True)
    orthanc.start()
    try:
        destination = ('[destinations.{name}]\ntype = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                       f'port = {orthanc.dicom_port}\n'
                       '[destinations.{name}.tls]\nca_certificates = "{ca}"\n'
                       f'certificate = "{certs / "machaon.crt"}"\nprivate_key = "{certs / "machaon.key"}"\n')
        setup = (RULES.format(destination='pacs", "impostor", "stranger')
                 + destination.format(name="pacs", ca=certs / "ca.crt")
                 + destination.format(name="impostor", ca=certs / "other-ca.crt")  # trusts the wrong CA
                 + destination.format(name="stranger", ca=certs / "ca.crt").split("certificate = ")[0])  # no cert
        study = phantom.write_study(tmp_path / "study", seed=33, views=False)
        server = serve(models={"path": str(built_models)}, extra=setup)
        assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 12

        def outcome():
            deliveries = [d for j in jobs_of(server, study.study_uid) for r in j["results"] for d in r["deliveries"]]
            by = {(d["destination"], d["status"]) for d in deliveries}
            expected = {("pacs", "sent"), ("impostor", "pending"), ("stranger", "pending")}
            return deliveries if len(deliveries) == 6 and by == expected and all(d["attempts"] for d in deliveries) \
                else None
        deliveries = server.wait_for(outcome, timeout=60, what="sent over TLS, refused with the wrong CA or no cert")
        errors = {d["destination"]: d["last_error"] for d in deliveries}
        assert "TLS handshake failed: its certificate is not trusted" in errors["impostor"], errors
        assert "TLS refused by the PACS" in errors["stranger"] and "client certificate" in errors["stranger"], errors
        series = orthanc.get(f"/dicom-web/studies/{study.study_uid}/series")
        assert sorted(s["00080060"]["Value"][0] for s in series) == ["SEG", "SR"]
    finally:
        orthanc.stop()


def test_a_certificate_that_cannot_be_loaded_stops_start_up(built_models, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    (tmp_path / "machaon.toml").write_text(
        f'[models]\npath = "{built_models}"\n[destinations.pacs]\ntype = "dicom"\nae_title = "PACS"\n'
        f'host = "127.0.0.1"\nport = 2762\n[destinations.pacs.tls]\nca_certificates = "{certs / "ca.crt"}"\n'
        f'certificate = "{certs / "machaon.crt"}"\nprivate_key = "{certs / "pacs.key"}"\n')  # not its key
    started = run_machaon("serve", config=tmp_path / "machaon.toml", timeout=60)
    assert started.returncode == 78
    assert f"destinations.pacs.tls.certificate (set in {tmp_path / 'machaon.toml'}): cannot use" in started.stderr
    assert "the private key does not belong to the certificate" in started.stderr


def test_results_reach_orthanc_by_stow_rs(serve, built_models, orthanc, tmp_path):
    orthanc.start()
    setup = RULES.format(destination="web") + f'[destinations.web]\ntype = "dicomweb"\nurl = "{orthanc.url}/dicom-web"\n'
    study = phantom.write_study(tmp_path / "study", seed=38, views=False)
    server = serve(models={"path": str(built_models)}, extra=setup)
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 12
    delivered(server, study.study_uid)
    series = orthanc.get(f"/dicom-web/studies/{study.study_uid}/series")
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["SEG", "SR"]


def test_chest_radiograph_through_the_service_gives_14_findings(serve, built_models, tmp_path):
    radiograph = Path(pydicom.__file__).parents[1] / "data_store" / "data" / "RG1_J2KR.dcm"  # pydicom-data: a real CR
    setup = ('[[rules]]\nname = "chest"\nmodels = ["cxr-findings"]\ndestinations = ["out"]\n'
             'match = { modality = ["CR", "DX"] }\n' + f'[destinations.out]\ntype = "folder"\npath = "{tmp_path / "out"}"\n')
    server = serve(models={"path": str(built_models)}, extra=setup)
    assert acknowledged(storescu(server.port, radiograph, extra=("-xv",)).stderr) == 1
    study_uid = pydicom.dcmread(radiograph, stop_before_pixels=True).StudyInstanceUID
    [job] = finished(server, study_uid)
    assert job["status"] == "succeeded", job["error"]
    [result] = delivered(server, study_uid)
    [path] = (tmp_path / "out").rglob("*.dcm")
    sr = hd.sr.srread(path)
    assert result["kind"] == "sr" and len(sr.ContentSequence[-1].ContentSequence) == 14
    assert "cxr-findings 0.0.1" in sr.SoftwareVersions and "not for clinical use" in sr.SeriesDescription
