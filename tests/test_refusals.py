"""What machaon refuses, how the sender hears it, and that everyone else carries on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from tests.dicomgen import write_ct_series
from tests.harness import acknowledged, storescu


def send_good_study(server, tmp_path: Path, name: str = "good") -> subprocess.Popen:
    files = write_ct_series(tmp_path / name, slices=30, size=128)
    return subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aet", "SCANNER", "-aec", "MACHAON", "127.0.0.1", str(server.port),
         *map(str, files)], stderr=subprocess.PIPE, text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin"})


def assert_all_stored(sender: subprocess.Popen, expected: int = 30) -> None:
    output = sender.communicate(timeout=120)[1]
    assert sender.returncode == 0 and acknowledged(output) == expected, output


def without(path: Path, keyword: str, out: Path) -> Path:
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(out)
    return out


def raw_file(path: Path, meta_from: Path, dataset: bytes) -> Path:
    """A file with valid File Meta Information and `dataset` as its body."""
    source = pydicom.dcmread(meta_from, stop_before_pixels=True)
    source.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(f, source.file_meta)
        f.write(dataset)
    return path


def raw_send(port: int, files: list[Path]) -> list[tuple[int, str]]:
    """Send files as they are, undecoded, as a broken sender would: the
    C-STORE request names what the File Meta says."""
    metas = [pydicom.dcmread(f, stop_before_pixels=True).file_meta for f in files]
    ae = AE("BROKEN")
    for meta in metas:
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="MACHAON")
    assert assoc.is_established
    try:
        return [(r.Status, str(r.get("ErrorComment", ""))) for r in map(assoc.send_c_store, files)]
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_malformed_datasets_are_refused_and_others_carry_on(serve, tmp_path):
    server = serve()
    good = send_good_study(server, tmp_path)
    ct = write_ct_series(tmp_path / "bad", slices=1, size=64)[0]

    no_study = storescu(server.port, without(ct, "StudyInstanceUID", tmp_path / "nostudy.dcm"))
    assert "Received Store Response (Error: CannotUnderstand)" in no_study.stderr, no_study.stderr

    garbage = raw_file(tmp_path / "garbage.dcm", ct, b"\x08\x00\x16\x00ZZ\x04\x00abcd")  # no such VR
    bad_uid = tmp_path / "baduid.dcm"  # a UID that would make a path outside the spool
    ds = pydicom.dcmread(ct)
    ds.SeriesInstanceUID = "1.2.3/../../../../tmp/x"
    ds.save_as(bad_uid)
    statuses = raw_send(server.port, [garbage, bad_uid])
    assert statuses[0][0] == 0xC000 and statuses[0][1].startswith("dataset cannot be decoded"), statuses
    assert statuses[1] == (0xC000, "SeriesInstanceUID is not a valid UID ('1.2.3/../../../../tmp/x')"[:64])

    assert_all_stored(good)
    log = server.log()
    assert "refused (0xC000): StudyInstanceUID is missing" in log
    assert "refused (0xC000): dataset cannot be decoded" in log
    assert not list((server.spool / "incoming").iterdir()), "refused transfers must not stay on disk"
    assert server.proc.poll() is None


def test_dataset_that_contradicts_its_request_is_refused(serve):
    """rtdose.dcm's File Meta names a different SOP Instance than its dataset."""
    server = serve()
    [(status, comment)] = raw_send(server.port, [Path(get_testdata_file("rtdose.dcm"))])
    assert status == 0xA900 and "SOPInstanceUID differs" in comment


def test_unknown_calling_ae_is_rejected(serve, tmp_path):
    server = serve(dicom={"allowed_calling_aets": ["SCANNER", "PACS"]})
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    intruder = storescu(server.port, *ct, aet="INTRUDER")
    assert intruder.returncode != 0
    assert "Association Rejected" in intruder.stderr
    assert "Calling AE Title Not Recognized" in intruder.stderr
    # pynetdicom answers the sender before it runs the handler that logs the rejection.
    server.wait_for(lambda: "association from INTRUDER" in server.log() and "rejected" in server.log(),
                    what="the rejection to be logged")
    assert acknowledged(storescu(server.port, *ct, aet="SCANNER").stderr) == 1


def test_associations_beyond_the_maximum_are_rejected(serve, tmp_path):
    server = serve(dicom={"max_associations": 1})
    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", server.port, ae_title="MACHAON")
    assert held.is_established
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    busy = storescu(server.port, *ct)
    assert "Association Rejected" in busy.stderr and "Local Limit Exceeded" in busy.stderr, busy.stderr
    held.release()
    assert acknowledged(storescu(server.port, *ct).stderr) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB file system of our own, so the watermark can really be crossed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_watermark_refuses_with_out_of_resources(serve, tmp_path, small_disk):
    server = serve(spool={"path": str(small_disk / "spool"), "min_free_mb": 24})
    ct = write_ct_series(tmp_path / "ct", slices=2, size=256)
    assert acknowledged(storescu(server.port, ct[0]).stderr) == 1
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (30 << 20))  # leaves under 24 MiB free

    refused = storescu(server.port, ct[1])
    assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stderr
    assert "refused (0xA700): not stored: less than 24 MiB would be left free in the spool" in server.log()
    assert not list((server.spool / "incoming").iterdir())

    ballast.unlink()  # space is back: the same instance is accepted again
    assert acknowledged(storescu(server.port, ct[1]).stderr) == 1
    assert server.machaon("echo", f"MACHAON@127.0.0.1:{server.port}").returncode == 0


def test_one_object_larger_than_the_free_space_is_refused_not_aborted(serve, tmp_path, small_disk):
    """Free space is checked as the object streams in: the object is refused with 0xA700 on its own
    association, which goes on; the disk never fills; incoming/ keeps nothing."""
    server = serve(spool={"path": str(small_disk / "spool"), "min_free_mb": 4})
    (small_disk / "ballast").write_bytes(b"\0" * (26 << 20))  # about 22 MiB free
    [large] = write_ct_series(tmp_path / "large", slices=1, size=4096)  # 32 MiB
    small = write_ct_series(tmp_path / "small", slices=2, size=64)
    # One association: the large object, then a small one (there is room for it).
    sent = storescu(server.port, large, small[0], extra=("--no-halt",))
    assert "Received Store Response (Refused: OutOfResources)" in sent.stderr, sent.stderr
    assert acknowledged(sent.stderr) == 1 and "Abort" not in sent.stderr, sent.stderr
    assert "would be left free in the spool" in server.log()
    assert not list((server.spool / "incoming").iterdir())
    (small_disk / "ballast").unlink()  # space is back
    assert acknowledged(storescu(server.port, large, small[1]).stderr) == 2


def test_a_spool_below_its_watermark_at_start_is_said_at_once(serve, tmp_path, small_disk):
    server = serve(spool={"path": str(small_disk / "spool"), "min_free_mb": 64})  # a 48 MiB disk
    assert "less than spool.min_free_mb (64): C-STOREs are refused with 'out of resources'" in server.log()
    [image] = write_ct_series(tmp_path / "ct", slices=1, size=64)
    assert "Refused: OutOfResources" in storescu(server.port, image).stderr
