"""Which transfer syntax a sender gets, which SOP classes are accepted, and what becomes of header
values that are not what their VR says."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from machaon.config import ConfigError, load_settings
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
)
from pynetdicom import AE, _config

from tests.dicomgen import with_raw_values, write_ct_series
from tests.harness import acknowledged, dataset_bytes, storescu


def stored_path(server, header) -> Path:
    return server.spool / "studies" / header.StudyInstanceUID / header.SeriesInstanceUID / \
        f"{header.SOPInstanceUID}.dcm"


def instance_row(server, header) -> dict:
    study = server.study(header.StudyInstanceUID)
    [row] = [i for s in study["series"] for i in s["instances"] if i["sop_instance_uid"] == header.SOPInstanceUID]
    return row


@pytest.mark.parametrize("proposed", [
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian],
    [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian],
])
def test_the_sender_gets_the_transfer_syntax_it_lists_first(serve, tmp_path, proposed):
    server = serve()
    ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", slices=1, size=64)[0])
    ae = AE("SCANNER")
    ae.add_requested_context(CTImageStorage, proposed)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON")
    try:
        assert assoc.is_established
        assert assoc.accepted_contexts[0].transfer_syntax == [proposed[0]]
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert instance_row(server, ds)["transfer_syntax_uid"] == proposed[0]
    kept = pydicom.dcmread(stored_path(server, ds))
    assert kept.file_meta.TransferSyntaxUID == proposed[0]
    assert kept.pixel_array.tobytes() == ds.pixel_array.tobytes()


SENDER_PREFERS_UNCOMPRESSED = """
[dicom.senders.MODALITY]
transfer_syntaxes = ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"]
"""


def test_a_sender_configured_with_machaons_order_sends_uncompressed_as_held(serve, tmp_path):
    """`storescu -xs +C` lists JPEG Lossless first in one context, then the uncompressed syntaxes,
    and fails on the first image it cannot compress. Configured for its AE title, machaon picks
    Explicit VR Little Endian and gets all 300 slices as they are on the sender's disk."""
    server = serve(extra=SENDER_PREFERS_UNCOMPRESSED)
    files = write_ct_series(tmp_path / "ct", slices=300, size=512)

    unconfigured = storescu(server.port, *files, aet="SCANNER", extra=("-xs", "+C"))
    assert acknowledged(unconfigured.stderr) == 0, unconfigured.stderr  # it chose JPEG Lossless
    assert "Store Failed" in unconfigured.stderr

    configured = storescu(server.port, *files, aet="MODALITY", extra=("-xs", "+C"), timeout=300)
    assert configured.returncode == 0, configured.stderr
    assert acknowledged(configured.stderr) == 300
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = server.study(header.StudyInstanceUID)
    assert study["instance_count"] == 300
    rows = [i for s in study["series"] for i in s["instances"]]
    assert {(r["transfer_syntax_uid"], r["calling_ae"]) for r in rows} == {(ExplicitVRLittleEndian, "MODALITY")}
    for source in files:
        kept = stored_path(server, pydicom.dcmread(source, stop_before_pixels=True))
        assert dataset_bytes(kept) == dataset_bytes(source), f"{kept.name} differs from what was sent"


def send_as_held(port: int, aet: str, files: list[Path], fallback: list[str]) -> list[int]:
    """Send each file's own bytes (pynetdicom, chunked), proposing its own transfer syntax first,
    then `fallback`; the statuses, in order."""
    ae = AE(aet)
    for source in files:
        meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID, *fallback])
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="MACHAON")
    try:
        assert assoc.is_established
        return [assoc.send_c_store(source).Status for source in files]
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


JPEG_2000 = ["MR2_J2KR.dcm", "JPEG2000.dcm", "emri_small_jpeg_2k_lossless.dcm", "US1_J2KR.dcm"]


@pytest.mark.parametrize("aet, fallback", [
    ("ARCHIVE", [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),  # its own first: it gets it
    ("MODALITY", []),  # configured to prefer uncompressed, but it offers nothing else: still accepted
])
def test_jpeg_2000_files_are_kept_byte_for_byte(serve, aet, fallback):
    server = serve(extra=SENDER_PREFERS_UNCOMPRESSED)
    for name in JPEG_2000:  # some share a SOP Instance UID: each is checked once it is kept
        source = Path(get_testdata_file(name))
        assert send_as_held(server.port, aet, [source], fallback) == [0], name
        header = pydicom.dcmread(source, stop_before_pixels=True)
        assert dataset_bytes(stored_path(server, header)) == dataset_bytes(source), name
        assert instance_row(server, header)["transfer_syntax_uid"] == header.file_meta.TransferSyntaxUID


RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.5": "Nuclear Medicine Image Storage (Retired)",
}


def test_retired_storage_sop_classes_are_accepted_and_kept(serve, tmp_path):
    server = serve()
    files = []
    for n, sop_class in enumerate(RETIRED):
        path = write_ct_series(tmp_path / f"retired{n}", slices=1, size=64)[0]
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = "US"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    sent = storescu(server.port, *files, extra=("-R",))  # -R: one context per file's SOP class
    assert sent.returncode == 0 and acknowledged(sent.stderr) == len(files), sent.stderr
    for source in files:
        header = pydicom.dcmread(source, stop_before_pixels=True)
        assert dataset_bytes(stored_path(server, header)) == dataset_bytes(source)
        assert instance_row(server, header)["sop_class_uid"] == header.SOPClassUID
    assert "rejected" not in server.log()


def test_values_not_what_their_vr_says_are_recorded_as_absent_and_the_file_kept(serve, tmp_path):
    server = serve()
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)[0]
    bad = with_raw_values(ct, tmp_path / "bad.dcm", NumberOfFrames=b"1A", StudyDate=b"2026-13-45",
                          InstanceNumber=b"1.5 ")
    sent = storescu(server.port, bad)
    assert acknowledged(sent.stderr) == 1, sent.stderr

    header = pydicom.dcmread(bad, stop_before_pixels=True)
    assert dataset_bytes(stored_path(server, header)) == dataset_bytes(bad)
    study = server.study(header.StudyInstanceUID)
    assert study["study_date"] is None and study["patient_id"] == "PHANTOM-1"
    assert instance_row(server, header)["instance_number"] is None
    [event] = [e for e in study["events"] if e["action"] == "instance.invalid_values"]
    assert event["actor"] == "dicom:SCANNER"
    assert event["detail"] == {"sop_instance_uid": header.SOPInstanceUID,
                               "values": {"NumberOfFrames": "1A", "StudyDate": "2026-13-45",
                                          "InstanceNumber": "1.5"}}
    log = server.log()
    assert log.count("not what their VR says") == 1 and "NumberOfFrames='1A'" in log


def test_a_message_on_a_rejected_context_is_logged_and_the_association_aborted(serve, tmp_path):
    server = serve()
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)[0]
    ae = AE("ROGUE")
    ae.add_requested_context(CTImageStorage, JPEGLosslessSV1)  # accepted
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.2")  # Explicit VR Big Endian: rejected
    ae.add_requested_context("1.2.3.4.5", ImplicitVRLittleEndian)  # no such SOP class: rejected
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON")
    assert assoc.is_established and [cx.context_id for cx in assoc.rejected_contexts] == [3, 5]
    # A broken sender that sends on context 3 anyway: pynetdicom would not, unless told it was accepted.
    rejected = assoc._accepted_cx[1]
    rejected.context_id, rejected.transfer_syntax = 3, [ExplicitVRLittleEndian]
    assoc._accepted_cx = {3: rejected}
    assoc.send_c_store(pydicom.dcmread(ct))
    assoc.abort()

    log = server.wait_for(lambda: "association from ROGUE" in (text := server.log()) and " aborted: " in text
                          and text, what="the aborted association's log line")
    assert ("association from ROGUE (127.0.0.1:" in log and "2 presentation context(s) rejected: "
            "CT Image Storage offered Explicit VR Big Endian: no transfer syntax machaon accepts; "
            "1.2.3.4.5 offered Implicit VR Little Endian: SOP class not supported") in log
    assert ("a message on presentation context 3 (CT Image Storage offered Explicit VR Big Endian), which "
            "was not accepted: aborting the association") in log
    assert "aborted: 0 stored, 1 refused" in log
    assert "Traceback" not in log
    assert not list((server.spool / "incoming").iterdir()), "nothing of it may stay on disk"
    assert acknowledged(storescu(server.port, ct).stderr) == 1  # and the listener carries on


def test_a_sender_setting_with_an_unknown_transfer_syntax_names_the_key(tmp_path):
    path = tmp_path / "machaon.toml"
    path.write_text('[dicom.senders.MODALITY]\ntransfer_syntaxes = ["ExplicitVRLittleEndian", "JPEGNope"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert (f"dicom.senders.MODALITY.transfer_syntaxes.1 (set in {path}): Value error, 'JPEGNope' is not a "
            "transfer syntax machaon accepts") in str(err.value)
    path.write_text('[dicom.senders.MODALITY]\ntransfer_syntaxes = ["1.2.840.10008.1.2.1", "JPEG2000Lossless"]\n')
    assert load_settings(path, environ={}).dicom.senders["MODALITY"].transfer_syntaxes == [
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"]


def test_a_patient_name_reaches_the_log_only_where_log_phi_is_true(serve, tmp_path):
    [image] = write_ct_series(tmp_path / "ct", slices=1, size=64)
    bad = with_raw_values(image, tmp_path / "bad.dcm", PatientName="DOE^JANE=A=B=C")  # 4 groups of 3 at most
    for phi in (False, True):
        server = serve(log={"phi": phi})
        assert acknowledged(storescu(server.port, bad).stderr) == 1
        server.wait_for(lambda s=server: "not what their VR says: PatientName" in s.log(), what="the warning")
        assert ("DOE^JANE" in server.log()) == phi
