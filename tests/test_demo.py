"""The README's first command: `machaon demo` shows the whole job on one machine, and
`machaon demo --send-only` sends the phantom study to any DICOM node."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import highdicom as hd
import pytest

from tests.harness import MACHAON, free_port


def _demo_env(built_models: Path, port: int) -> dict:
    # The embedded default configuration, as a newcomer runs it, on a free port and a short quiet period.
    return {**os.environ, "MACHAON_MODELS_PATH": str(built_models), "MACHAON_DICOM_HOST": "127.0.0.1",
            "MACHAON_DICOM_PORT": str(port), "MACHAON_COMPLETION_COMPLETE_AFTER": "1",
            "MACHAON_COMPLETION_CHECK_EVERY": "0.2", "MACHAON_API_PORT": str(free_port())}


def test_demo_runs_the_job_prints_its_results_keeps_serving_and_a_second_run_reports_its_own_job(
        built_models, tmp_path):
    port = free_port()
    env = _demo_env(built_models, port)
    demo = subprocess.Popen([MACHAON, "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops it" in line for line in lines):
            assert demo.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        output = "".join(lines)
        assert re.search(r"job \d+ \(lv-segmentation\): succeeded", output), output
        paths = {kind: Path(path) for kind, path in re.findall(r"^\s+(SEG|SR): (\S+\.dcm)$", output, re.M)}
        assert set(paths) == {"SEG", "SR"}, output
        assert all((tmp_path / p).is_file() for p in paths.values())  # relative to where it was started
        [reported] = re.findall(r"volume: ([\d.]+) ml", output)
        [true] = re.findall(r"true LV cavity volume is ([\d.]+) ml", output)
        assert float(reported) == pytest.approx(float(true), rel=0.10)
        [volume] = hd.sr.srread(tmp_path / paths["SR"]).content.get_volumetric_roi_measurement_groups()
        assert volume.get_measurements()[0].value == pytest.approx(float(reported))

        # Still serving, for the user's own studies.
        echo = subprocess.run(["/usr/bin/echoscu", "-aec", "MACHAON", "127.0.0.1", str(port)], capture_output=True,
                              timeout=30)
        assert echo.returncode == 0, echo.stderr
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    # The same phantom study again, into the same job store: the first run's job is finished, but
    # it is the job of the new completion that is reported, once it has run.
    first = output
    second = _demo_until_ready(tmp_path, env, "--calling-ae", "CARDIO-MR")
    [(first_job, _)] = re.findall(r"job (\d+) \(lv-segmentation\): (\w+)", first)
    [(second_job, second_status)] = re.findall(r"job (\d+) \(lv-segmentation\): (\w+)", second)
    assert int(second_job) > int(first_job) and second_status == "succeeded", second
    assert "from CARDIO-MR to MACHAON@127.0.0.1" in second
    [study_uid] = re.findall(r"sent phantom study ([\d.]+)", second)
    shown = subprocess.run([MACHAON, "studies", "show", study_uid, "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    study = json.loads(shown.stdout)
    assert study["completion_count"] == 2
    assert {i["calling_ae"] for s in study["series"] for i in s["instances"]} == {"CARDIO-MR"}


def test_send_only_stores_the_phantom_study_in_orthanc(orthanc, tmp_path):
    orthanc.start()
    sent = subprocess.run([MACHAON, "demo", "--send-only", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [study_uid] = re.findall(r"sent the phantom study ([\d.]+): 15 of 15 images stored", sent.stdout)
    series = orthanc.get(f"/dicom-web/studies/{study_uid}/series")
    assert sorted(s["0008103E"]["Value"][0] for s in series) == [
        "FOUR CHAMBER cine (phantom)", "SAX cine (phantom)", "THREE CHAMBER cine (phantom)",
        "TWO CHAMBER cine (phantom)"]
    assert len(orthanc.get(f"/dicom-web/studies/{study_uid}/instances")) == 15


def test_send_only_to_a_node_that_is_not_there_says_so(tmp_path):
    sent = subprocess.run([MACHAON, "demo", "--send-only", f"NOBODY@127.0.0.1:{free_port()}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 1
    assert "NOBODY@127.0.0.1" in sent.stdout and "no association" in sent.stdout


def _demo_until_ready(cwd: Path, env: dict, *args: str) -> str:
    """`machaon demo` run until it has reported its job, then stopped by Ctrl-C; its output."""
    demo = subprocess.Popen([MACHAON, "demo", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops it" in line for line in lines):
            assert demo.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0, "".join(lines)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    return "".join(lines)


def test_send_only_calls_with_the_ae_title_given(serve, tmp_path):
    server = serve(dicom={"allowed_calling_aets": ["CARDIO-MR"]})
    target = f"MACHAON@127.0.0.1:{server.port}"
    refused = subprocess.run([MACHAON, "demo", "--send-only", target], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1  # our own AE title by default, which this node does not allow
    sent = subprocess.run([MACHAON, "demo", "--send-only", target, "--calling-ae", "CARDIO-MR"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [study_uid] = re.findall(r"sent the phantom study ([\d.]+): 15 of 15 images stored", sent.stdout)
    study = server.study(study_uid)
    assert {i["calling_ae"] for s in study["series"] for i in s["instances"]} == {"CARDIO-MR"}
    bad = subprocess.run([MACHAON, "demo", "--send-only", target, "--calling-ae", "A-NAME-LONGER-THAN-16"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "an AE title is 1 to 16 ASCII characters" in bad.stderr
