"""Receiving studies from DCMTK's storescu, a real and independent sender."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.dicomgen import write_ct_series
from tests.harness import acknowledged, dataset_bytes, free_port, storescu


def stored_path(server, header) -> Path:
    return server.spool / "studies" / header.StudyInstanceUID / header.SeriesInstanceUID / \
        f"{header.SOPInstanceUID}.dcm"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct") / "series", slices=12, size=128)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_series_is_kept_byte_identical_completed_and_reopened(serve, ct_series, tmp_path, backend, request):
    db_url = request.getfixturevalue("pg_store_url") if backend == "postgresql" else None
    server = serve(db_url=db_url)
    sent = storescu(server.port, *ct_series[:-1])
    assert sent.returncode == 0, sent.stderr
    assert acknowledged(sent.stderr) == 11

    header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
    for source in ct_series[:-1]:
        kept = stored_path(server, pydicom.dcmread(source, stop_before_pixels=True))
        assert dataset_bytes(kept) == dataset_bytes(source), f"{kept.name} differs from what was sent"
    study = server.study(header.StudyInstanceUID)
    assert study["instance_count"] == 11 and study["patient_id"] == "PHANTOM-1"
    assert study["series"][0]["modality"] == "CT"
    assert {i["calling_ae"] for i in study["series"][0]["instances"]} == {"SCANNER"}

    server.wait_for(lambda: server.study(header.StudyInstanceUID)["status"] == "complete",
                    what="the study to complete after its quiet period")
    assert re.search(rf"study {header.StudyInstanceUID} complete after 1 s quiet: 1 series, 11 instances",
                     server.log())
    assert "association from SCANNER (127.0.0.1:" in server.log()

    late = storescu(server.port, ct_series[-1])
    assert acknowledged(late.stderr) == 1
    assert f"study {header.StudyInstanceUID} reopened by a new instance from SCANNER" in server.log()
    def planned_twice():  # completion and planning commit one after the other
        s = server.study(header.StudyInstanceUID)
        planned = [e for e in s["events"] if e["action"] == "study.no_rule_matched"]
        return s if s["completion_count"] == 2 and len(planned) == 2 else None
    done = server.wait_for(planned_twice, what="the reopened study to complete and be planned again")
    assert done["status"] == "complete" and done["instance_count"] == 12
    actions = [e["action"] for e in done["events"] if e["action"].startswith("study.")]
    # No rules are configured here, so each completion also records that none matched.
    assert actions == ["study.received", "study.completed", "study.no_rule_matched", "study.reopened",
                       "study.completed", "study.no_rule_matched"]

    listed = server.machaon("studies", "list", "--status", "complete", "--json")
    assert [s["study_uid"] for s in json.loads(listed.stdout)] == [header.StudyInstanceUID]
    assert server.stop() == 0


def test_a_study_completes_when_its_quiet_period_ends_not_at_the_next_tick(serve, tmp_path):
    """The scheduler looks again the moment a study is due, however sparse its regular ticks."""
    quiet = 3.0
    server = serve(completion={"complete_after": quiet, "check_every": 2.9})
    studies = []
    for n in range(2):
        series = write_ct_series(tmp_path / f"study{n}", slices=2, size=64, seed=100 + n)
        assert acknowledged(storescu(server.port, *series).stderr) == 2
        studies.append(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        time.sleep(1.1)  # the second study falls at another point between two ticks
    for study_uid in studies:
        shown = server.wait_for(lambda uid=study_uid: (s := server.study(uid))["status"] == "complete" and s,
                                what="the study to complete")
        last = datetime.fromisoformat(shown["series"][0]["last_received_at"])
        completed = datetime.fromisoformat(shown["completed_at"])
        assert (completed - last).total_seconds() == pytest.approx(quiet, abs=0.25)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_study_waits_for_its_sender_to_close_the_association(serve, ct_series):
    """A sender still connected may be streaming a large object of the study."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    server = serve()
    ae = AE("SLOWSENDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON")
    header = pydicom.dcmread(ct_series[0])
    assert assoc.send_c_store(header).Status == 0
    cpu_before = _cpu_seconds(server.proc.pid)
    time.sleep(3)  # three times complete_after
    assert server.study(header.StudyInstanceUID)["status"] == "receiving"
    assert _cpu_seconds(server.proc.pid) - cpu_before < 1.0  # it waited, it did not spin
    assoc.release()
    server.wait_for(lambda: server.study(header.StudyInstanceUID)["status"] == "complete",
                    what="the study to complete once its sender let go")


def test_same_instance_twice_is_stored_once(serve, ct_series):
    server = serve()
    first, second = storescu(server.port, ct_series[0]), storescu(server.port, ct_series[0])
    assert acknowledged(first.stderr) == acknowledged(second.stderr) == 1
    header = pydicom.dcmread(ct_series[0], stop_before_pixels=True)
    study = server.study(header.StudyInstanceUID)
    assert study["instance_count"] == 1
    assert study["series"][0]["instances"][0]["receive_count"] == 2
    series_dir = stored_path(server, header).parent
    assert [p.name for p in series_dir.iterdir()] == [f"{header.SOPInstanceUID}.dcm"]


# Compressed transfer syntaxes, multi-frame and the object types results use,
# each with the storescu option that proposes the file's own transfer syntax.
SAMPLES = [
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),            # JPEG baseline
    ("JPEG-LL.dcm", "-xs"),                      # JPEG lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),    # JPEG-LS lossless
    ("MR2_J2KR.dcm", "-xv"),                     # JPEG 2000 lossless
    ("JPEG2000.dcm", "-xw"),                     # JPEG 2000
    ("MR_small_RLE.dcm", "-xr"),                 # RLE lossless
    ("image_dfl.dcm", "-xd"),                    # deflated explicit VR little endian
    ("emri_small_jpeg_2k_lossless.dcm", "-xv"),  # enhanced MR, 10 frames, JPEG 2000 lossless
    ("emri_small.dcm", "-xe"),                   # enhanced MR, 10 frames
    ("liver.dcm", "-xe"),                        # Segmentation
    ("rtdose.dcm", "-xi"),                       # implicit VR little endian, multi-frame
]


def test_compressed_multiframe_seg_and_sr_arrive_intact(serve, tmp_path):
    server = serve()
    sr = comprehensive_3d_sr(tmp_path / "sr.dcm")
    samples = [(Path(get_testdata_file(name)), flag) for name, flag in SAMPLES] + [(sr, "-xe")]
    for source, flag in samples:
        sent = storescu(server.port, source, extra=("-R", flag))  # -R: SEG and SR need it
        assert acknowledged(sent.stderr) == 1, sent.stderr
        header = pydicom.dcmread(source, stop_before_pixels=True)
        kept = stored_path(server, header)
        assert content(kept) == content(source), f"{source.name} changed on the way"
        study = server.study(header.StudyInstanceUID)
        [row] = [i for s in study["series"] for i in s["instances"]
                 if i["sop_instance_uid"] == header.SOPInstanceUID]
        assert row["transfer_syntax_uid"] == header.file_meta.TransferSyntaxUID, source.name
        assert row["sop_class_uid"] == header.SOPClassUID


def content(path: Path) -> dict:
    """Element values: storescu re-encodes sequence lengths, corrects VRs and
    drops trailing padding on the way, so its output is compared by value."""
    return {e.tag: e.value for e in pydicom.dcmread(path) if e.tag != 0xFFFCFFFC}


def test_objects_are_kept_byte_for_byte_as_sent(serve, tmp_path):
    """A sender that sends files as they are (pynetdicom, chunked) gets them kept
    byte for byte, in whatever transfer syntax it used."""
    from pynetdicom import AE, _config
    server = serve()
    # rtdose.dcm's File Meta names another SOP Instance than its dataset; a raw
    # send passes that on, and it is refused (see test_refusals).
    sources = [Path(get_testdata_file(name)) for name, _ in SAMPLES if name != "rtdose.dcm"]
    sources.append(comprehensive_3d_sr(tmp_path / "sr.dcm"))
    ae = AE("RAWSENDER")
    for source in sources:
        meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON")
    try:
        assert assoc.is_established
        for source in sources:  # some samples share a SOP Instance UID: check each at once
            assert assoc.send_c_store(source).Status == 0, source.name
            kept = stored_path(server, pydicom.dcmread(source, stop_before_pixels=True))
            assert dataset_bytes(kept) == dataset_bytes(source), f"{source.name} changed on the way"
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


def comprehensive_3d_sr(path: Path) -> Path:
    """A minimal Comprehensive 3D SR, the kind results are sent as."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.ValueType = "SR", "SR-1", "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_large_multiframe_is_streamed_to_disk(serve, tmp_path):
    """A 300 MB object must not need 300 MB of the server's memory."""
    big = large_multiframe(tmp_path / "big.dcm", frames=1200)  # 1200 x 512 x 512 x 1 byte
    server = serve()
    before = peak_rss_mb(server.proc.pid)
    sent = storescu(server.port, big, extra=("-R",), timeout=300)
    assert acknowledged(sent.stderr) == 1, sent.stderr
    growth = peak_rss_mb(server.proc.pid) - before
    assert growth < 100, f"receiving a {big.stat().st_size >> 20} MB object grew the server by {growth:.0f} MB"
    header = pydicom.dcmread(big, stop_before_pixels=True)
    assert stored_path(server, header).stat().st_size >= big.stat().st_size - 1024


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def large_multiframe(path: Path, frames: int) -> Path:
    """A multi-frame secondary capture written without holding its pixels in memory."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "BIG-1"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * 1024
    with path.open("ab") as f:  # (7FE0,0010) OB, explicit VR: tag, VR, 2 reserved, 4-byte length
        f.write(b"\xe0\x7f\x10\x00OB\x00\x00" + (len(frame) * frames).to_bytes(4, "little"))
        for _ in range(frames):
            f.write(frame)
    return path


def test_kill_9_mid_transfer_loses_nothing_acknowledged(serve, tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=150, size=256)
    server = serve()
    sender = subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aet", "SCANNER", "-aec", "MACHAON", "127.0.0.1", str(server.port),
         *map(str, files)], stderr=subprocess.PIPE, text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})
    # Kill once some, but not all, instances were acknowledged.
    server.wait_for(lambda: len(list((server.spool / "studies").rglob("*.dcm"))) >= 40, timeout=60,
                    what="40 instances to arrive")
    server.proc.kill()
    server.proc.wait()
    output = sender.communicate(timeout=60)[1]

    # storescu logs "Sending file: X" before each store and the response after.
    acked, current = [], None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:")[1].strip())
        elif "Received Store Response (Success)" in line:
            acked.append(current)
    assert 40 <= len(acked) < len(files), f"{len(acked)} acknowledged: the kill came too late to test"

    restarted = serve(db_url=server.db_url, workdir=server.workdir)  # same spool and store
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = restarted.study(header.StudyInstanceUID)
    recorded = {i["sop_instance_uid"] for s in study["series"] for i in s["instances"]}
    for source in acked:
        h = pydicom.dcmread(source, stop_before_pixels=True)
        assert h.SOPInstanceUID in recorded, f"acknowledged {source.name} is not in the store"
        assert dataset_bytes(stored_path(server, h)) == dataset_bytes(source)
    # Whatever is under a final name is whole; unfinished transfers were swept away.
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for kept in (server.spool / "studies").rglob("*.dcm"):
        assert dataset_bytes(kept) == dataset_bytes(by_uid[kept.stem]), f"{kept.name} is not whole"
    # The start-up sweep runs just after the port is ours, so it may still be under way.
    restarted.wait_for(lambda: not list((server.spool / "incoming").iterdir()), timeout=10,
                       what="the unfinished transfer to be swept at start-up")


def test_sigterm_lets_the_transfer_in_flight_finish(serve, tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=120, size=256)
    server = serve()
    sender = subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aec", "MACHAON", "127.0.0.1", str(server.port), *map(str, files)],
        stderr=subprocess.PIPE, text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})
    server.wait_for(lambda: len(list((server.spool / "studies").rglob("*.dcm"))) >= 10, timeout=60,
                    what="the transfer to start")
    assert server.stop() == 0
    output = sender.communicate(timeout=60)[1]
    assert sender.returncode == 0, output
    assert acknowledged(output) == len(files)
    assert len(list((server.spool / "studies").rglob("*.dcm"))) == len(files)
    assert "SIGTERM: stopping; letting transfers" in server.log()
    refused = storescu(server.port, files[0])  # and nothing new is accepted after it stopped
    assert refused.returncode != 0


def test_echo_command(serve):
    server = serve()
    ok = server.machaon("echo", f"MACHAON@127.0.0.1:{server.port}")
    assert "success" in ok.stdout
    down = server.machaon("echo", f"NOBODY@127.0.0.1:{free_port()}", check=False)
    assert down.returncode == 1 and "could not be reached" in down.stderr
    picky = serve(dicom={"allowed_calling_aets": ["PACS"]})
    refused = server.machaon("echo", f"MACHAON@127.0.0.1:{picky.port}", check=False)
    assert refused.returncode == 1
    assert "rejected the association: check that it knows the calling AE title MACHAON" in refused.stderr
    dcmtk = subprocess.run(["/usr/bin/echoscu", "-aec", "MACHAON", "127.0.0.1", str(server.port)],
                           capture_output=True, text=True, timeout=30)
    assert dcmtk.returncode == 0, dcmtk.stderr
