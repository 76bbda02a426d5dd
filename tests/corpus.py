"""A corpus of real and deliberately damaged DICOM files, for the end-to-end robustness test.

Real files come from what is installed here: pydicom's test files, pydicom-data
(`data_store`) and pynetdicom's test files (highdicom ships none). Damaged files
are made here, from the phantom generator and from those real files.

Most real files are copied with UIDs of their own (derived from the file name):
pydicom ships one image in many variants under one set of UIDs, and machaon would
take the variants for re-sends of one instance. Files whose damage is in their
framing (no File Meta, a bad File Meta) are copied byte for byte instead.

`build_corpus(folder)` writes the files and says, for each, what it is and which
sender (storescu or Orthanc) sends it.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
from machaon.tools import phantom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG4HP41,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    VideoPhotographicImageStorage,
    generate_uid,
)

from tests.dicomgen import set_raw

STORESCU, ORTHANC = "storescu", "orthanc"  # who sends a file to machaon

PYNETDICOM_FILES = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    kind: str  # what it is, in a few words: the test's report names files by it
    via: str  # STORESCU or ORTHANC
    study_uid: str | None
    sop_class_uid: str | None
    transfer_syntax: str | None  # None: a data set without File Meta
    # Where the issue says what must become of it: the status of its study's jobs, and for
    # "failed", optionally the start of their error after the instance ("failed: series incomplete").
    expect: str = ""


def build_corpus(folder: Path) -> list[CorpusFile]:
    """Write the corpus under `folder` (about 90 small files); the order is the order of sending."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    with warnings.catch_warnings():  # pydicom warns about every value we spoil on purpose
        warnings.simplefilter("ignore")
        for make in (_real_files, _every_transfer_syntax, _damaged_stacks, _odd_objects):
            files += make(folder)
    return files


# --- real files -------------------------------------------------------------------------------

# (file, what it is, sender, copied byte for byte: where pydicom would not read it back as
# it is, or would write it whole). "pynetdicom:" names pynetdicom's test files.
REAL = [
    ("CT_small.dcm", "CT, explicit VR little endian", STORESCU, False),
    ("MR_small_implicit.dcm", "MR, implicit VR little endian", STORESCU, False),
    ("MR_small_expb.dcm", "MR, explicit VR big endian (retired transfer syntax)", STORESCU, False),
    ("MR_small_RLE.dcm", "MR, RLE lossless", STORESCU, False),
    ("MR_small_jpeg_ls_lossless.dcm", "MR, JPEG-LS lossless", STORESCU, False),
    ("MR2_J2KI.dcm", "MR 1024x1024, JPEG 2000 lossy", STORESCU, False),
    ("JPGExtended.dcm", "NM, JPEG extended (12 bit)", STORESCU, False),
    ("SC_rgb_jpeg_dcmtk.dcm", "RGB secondary capture, JPEG baseline", STORESCU, False),
    ("SC_rgb_jpeg_gdcm.dcm", "RGB secondary capture, JPEG lossless SV1", STORESCU, False),
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS near-lossless, no Modality", STORESCU, False),
    ("693_J2KI.dcm", "CT, JPEG 2000 lossy", STORESCU, False),
    ("image_dfl.dcm", "secondary capture, deflated explicit VR little endian", STORESCU, False),
    ("emri_small.dcm", "enhanced MR, 10 frames, no functional groups (no plane geometry)", STORESCU, False),
    ("emri_small_jpeg_2k_lossless_too_short.dcm", "enhanced MR, 10 JPEG 2000 frames, file cut short",
     STORESCU, True),
    ("MR_truncated.dcm", "MR, file truncated inside the pixel data", STORESCU, True),
    ("color-pl.dcm", "Ultrasound Image Storage (retired SOP class), RGB planar", STORESCU, False),
    ("liver_1frame.dcm", "Segmentation (SEG)", STORESCU, False),
    ("test-SR.dcm", "Comprehensive SR", STORESCU, False),
    ("reportsi_with_empty_number_tags.dcm", "Basic Text SR with empty IS values", STORESCU, False),
    ("waveform_ecg.dcm", "12-lead ECG waveform (no image)", STORESCU, False),
    ("rtplan.dcm", "RT Plan (no image), implicit VR", STORESCU, False),
    ("badVR.dcm", "RT Dose with NumberOfFrames '1A'", STORESCU, False),
    ("bad_sequence.dcm", "CT, JPEG lossless, a sequence with a wrong length", STORESCU, False),
    ("explicit_VR-UN.dcm", "CT, JPEG 2000, elements (its SOP Class UID too) with VR UN", STORESCU, False),
    ("J2K_pixelrep_mismatch.dcm", "CT, JPEG 2000 whose signedness disagrees with the header",
     STORESCU, False),
    ("SC_rgb_small_odd.dcm", "RGB 3x3 image (odd length)", STORESCU, False),
    ("ExplVR_LitEndNoMeta.dcm", "RT Ion Plan without File Meta", STORESCU, True),
    ("rtstruct.dcm", "RT Structure Set without File Meta (no image)", STORESCU, True),
    ("pynetdicom:CTImageStorage_bad_meta.dcm", "CT with a damaged File Meta", STORESCU, True),
    ("RG3_J2KI.dcm", "chest CR 1760x1760, JPEG 2000 lossy", STORESCU, False),
    ("pynetdicom:MRImageStorage_JPG2000_Lossless.dcm", "MR, JPEG 2000 lossless", ORTHANC, False),
    ("OBXXXX1A_rle_2frame.dcm", "US multi-frame (2), RLE", ORTHANC, False),
    ("examples_ybr_color.dcm", "US multi-frame (30), JPEG baseline YBR", ORTHANC, False),
    ("JPEG-LL.dcm", "NM 1024x256, JPEG lossless SV1", ORTHANC, False),
    ("rtdose_rle.dcm", "RT Dose multi-frame (15), RLE, its SOP Class UID written with VR UN", ORTHANC, False),
    ("pynetdicom:SCImageStorage_Deflated.dcm", "secondary capture, deflated", ORTHANC, False),
    ("US1_J2KR.dcm", "US, JPEG 2000 lossless", ORTHANC, False),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 image with GB18030 text", ORTHANC, False),
    ("emri_small_big_endian.dcm", "enhanced MR, 10 frames, explicit VR big endian", ORTHANC, False),
    ("reportsi.dcm", "Basic Text SR", ORTHANC, False),
]


def _real_files(folder: Path) -> list[CorpusFile]:
    files = []
    for name, kind, via, as_is in REAL:
        source = (PYNETDICOM_FILES / name.split(":", 1)[1] if name.startswith("pynetdicom:")
                  else Path(get_testdata_file(name)))
        target = folder / "real" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if as_is:
            shutil.copyfile(source, target)
        else:
            ds = pydicom.dcmread(source)
            _own_uids(ds, source.name)
            ds.save_as(target)  # as read: the same transfer syntax, every other value untouched
        files.append(_describe(target, kind, via))
    return files


def _own_uids(ds: Dataset, key: str) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(key, "study"), _uid(key, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(key, "instance")


# --- one chest radiograph in every transfer syntax pydicom can write ---------------------------------

ENCODINGS = [  # (transfer syntax, pydicom compress() options, sender)
    (ExplicitVRLittleEndian, None, STORESCU),
    (ImplicitVRLittleEndian, None, ORTHANC),
    (DeflatedExplicitVRLittleEndian, None, STORESCU),
    (RLELossless, {}, ORTHANC),
    (JPEGLSLossless, {}, STORESCU),
    (JPEGLSNearLossless, {"jls_error": 3}, ORTHANC),
    (JPEG2000Lossless, {}, STORESCU),
    (JPEG2000, {"j2k_cr": [20]}, ORTHANC),
]


def _every_transfer_syntax(folder: Path) -> list[CorpusFile]:
    """The same synthetic CR (the chest model takes CR) once per transfer syntax, each its
    own study; JPEG baseline, extended and lossless come from the real files above."""
    files = []
    for ts, options, via in ENCODINGS:
        ds = _radiograph(f"cr {ts}")
        if options is not None:
            ds.compress(ts, generate_instance_uid=False, **options)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        path = folder / "transfer-syntax" / f"cr-{ts.name.replace(' ', '_').replace('/', '_')}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(_describe(path, f"CR radiograph, {ts.name}", via, "succeeded"))
    return files


def _radiograph(key: str, size: int = 256) -> Dataset:
    """A small 12-bit chest-like CR: a bright body, two dark lungs."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) ** 2 / 0.2 + (xx - 0.5) ** 2 / 0.18 < 1) * 2500
    lungs = sum(((yy - 0.45) ** 2 / 0.06 + (xx - c) ** 2 / 0.015 < 1) for c in (0.33, 0.67)) * -1800
    pixels = np.clip(body + lungs + 300 + np.random.default_rng(7).normal(0, 30, (size, size)), 0, 4095)
    ds = _new_dataset(ComputedRadiographyImageStorage, key, "CR", "PA chest (synthetic)")
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    _set_pixels(ds, pixels.astype(np.uint16))
    return ds


# --- short-axis stacks, each damaged in one way ----------------------------------------------------

# lv-segmentation takes stacks of 5 slices or more (its input.stack.min_slices).
STACK_SLICES = 6


def _damaged_stacks(folder: Path) -> list[CorpusFile]:
    """Phantom short-axis MR stacks (each its own study) that the lv-segmentation rule takes,
    each spoiled in one way."""
    files = []
    for seed, (kind, via, spoil, expect) in enumerate(STACKS, start=901):
        slices = STACK_SLICES + (spoil is _drop_a_middle_slice)  # as many left once one is gone
        study = phantom.write_study(folder / f"stack-{seed}", seed=seed, views=False, slices=slices)
        paths = spoil([pydicom.dcmread(p) for p in study.sax_files], study.sax_files)
        files += [_describe(p, f"SAX stack: {kind}", via, expect) for p in paths]
    return files


def _save_all(datasets: list[Dataset], paths: list[Path]) -> list[Path]:
    for ds, path in zip(datasets, paths, strict=True):
        ds.save_as(path)
    return paths


def _wrong_types(datasets, paths):
    for ds in datasets:
        set_raw(ds, "StudyDate", "not a date")
        set_raw(ds, "SeriesDate", "2026-01-01")  # a date, but not as DICOM writes one
        set_raw(ds, "StudyTime", "25:99")
        set_raw(ds, "PatientBirthDate", "unknown")
        set_raw(ds, "SeriesNumber", "1A")
        set_raw(ds, "InstanceNumber", "x" + str(ds.InstanceNumber))
        set_raw(ds, "SliceThickness", "eight mm")
        set_raw(ds, "PatientAge", "forty")
        set_raw(ds, "PatientID", "P" * 90)  # LO holds 64 characters
        set_raw(ds, "AccessionNumber", "A" * 40)  # SH holds 16
    return _save_all(datasets, paths)


def _frames_1a(datasets, paths):
    for ds in datasets:
        set_raw(ds, "NumberOfFrames", "1A")
    return _save_all(datasets, paths)


def _text_in_pixel_spacing(datasets, paths):
    for ds in datasets:
        set_raw(ds, "PixelSpacing", "abc\\1.40625")
    return _save_all(datasets, paths)


def _no_geometry(datasets, paths):
    for ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
            delattr(ds, keyword)
    return _save_all(datasets, paths)


def _no_patient_name(datasets, paths):
    for ds in datasets:
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                        "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
            delattr(ds, keyword)
    return _save_all(datasets, paths)


def _blank(datasets, paths):
    for ds in datasets:
        ds.PixelData = bytes(len(ds.PixelData))
        ds.WindowCenter, ds.WindowWidth = 0, 1
    return _save_all(datasets, paths)


def _duplicate_a_position(datasets, paths):
    """The third slice again, later, under a new SOP Instance UID (a re-sent reconstruction)."""
    again = pydicom.dcmread(paths[2])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = _uid(str(paths[2]), "again")
    copy = paths[2].with_name("003-again.dcm")
    again.save_as(copy)
    return [*paths, copy]


def _drop_a_middle_slice(datasets, paths):
    middle = len(paths) // 2
    paths[middle].unlink()
    return paths[:middle] + paths[middle + 1:]


def _truncate_one_slice(datasets, paths):
    """One slice's pixel data cut to half its length, as an interrupted export leaves it."""
    ds = datasets[1]
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return _save_all(datasets, paths)


def _as_enhanced(datasets, paths, geometry: bool = True):
    """The stack converted to one Legacy Converted Enhanced MR object (highdicom)."""
    import highdicom as hd
    key = str(paths[0])
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=_uid(key, "enhanced series"), series_number=20,
        sop_instance_uid=_uid(key, "enhanced"), instance_number=1)
    if not geometry:
        del image.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
        for frame in image.PerFrameFunctionalGroupsSequence:
            del frame.PlanePositionSequence
    path = paths[0].parent / ("enhanced.dcm" if geometry else "enhanced-no-geometry.dcm")
    image.save_as(path, enforce_file_format=True)
    return [path]


# (what is wrong, sender, how it is spoiled, what must become of it). Values that are not
# needed to place and read the pixels are recorded as absent: the job succeeds without them.
STACKS: list[tuple[str, str, Callable, str]] = [
    ("dates that are not dates, text in IS/DS, over-long IDs", STORESCU, _wrong_types, "succeeded"),
    ("NumberOfFrames '1A' on single-frame images", STORESCU, _frames_1a, "succeeded"),
    ("text in PixelSpacing", ORTHANC, _text_in_pixel_spacing, "failed"),
    ("no ImagePosition/ImageOrientation", STORESCU, _no_geometry, "failed"),
    ("no PatientName, PatientID or other type 2 study attributes", ORTHANC, _no_patient_name, "succeeded"),
    ("all pixels zero (the model finds nothing)", STORESCU, _blank, "succeeded"),
    ("one position sent twice under two SOP Instance UIDs", STORESCU, _duplicate_a_position, "succeeded"),
    ("the middle slice missing", ORTHANC, _drop_a_middle_slice, "failed: series incomplete"),
    ("one slice's pixel data cut to half", STORESCU, _truncate_one_slice, "failed"),
    (f"Legacy Converted Enhanced MR, {STACK_SLICES} frames", STORESCU, _as_enhanced, "succeeded"),
    ("Legacy Converted Enhanced MR, plane geometry removed", ORTHANC,
     lambda datasets, paths: _as_enhanced(datasets, paths, geometry=False), "failed"),
]


# --- single objects that are odd in their identity -----------------------------------------------

def _odd_objects(folder: Path) -> list[CorpusFile]:
    folder = folder / "odd"
    folder.mkdir(parents=True, exist_ok=True)
    made = [
        (_no_series_uid(), "CR without SeriesInstanceUID", STORESCU),
        (_bad_study_uid(), "CR whose StudyInstanceUID is not a UID", STORESCU),
        (_private_sop_class(), "private SOP class (Siemens CSA Non-Image)", ORTHANC),  # storescu won't
        (_retired_nm(), "Nuclear Medicine Image Storage (retired SOP class)", STORESCU),
        (_video(), "video photographic image, MPEG-4 AVC/H.264 (not a real stream)", STORESCU),
        (_pdf(), "Encapsulated PDF (no image)", ORTHANC),
    ]
    files = []
    for index, (ds, kind, via) in enumerate(made):
        path = folder / f"{index:02d}-{ds.Modality.lower()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(_describe(path, kind, via))
    return files


def _no_series_uid() -> Dataset:
    ds = _radiograph("no series uid", size=64)
    del ds.SeriesInstanceUID
    return ds


def _bad_study_uid() -> Dataset:
    ds = _radiograph("bad study uid", size=64)
    set_raw(ds, "StudyInstanceUID", "1.2.3.STUDY.4")
    return ds


def _private_sop_class() -> Dataset:
    ds = _new_dataset(UID("1.3.12.2.1107.5.9.1"), "private", "MR", "CSA report")
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291008, "CS", "SPEC NUM 4")
    return ds


def _retired_nm() -> Dataset:
    ds = _new_dataset(UID("1.2.840.10008.5.1.4.1.1.5"), "retired nm", "NM", "planar (retired class)")
    _set_pixels(ds, (np.arange(64 * 64).reshape(64, 64) % 200).astype(np.uint16))
    return ds


def _video() -> Dataset:
    ds = _new_dataset(VideoPhotographicImageStorage, "video", "XC", "endoscopy video")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 64, 64, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_PARTIAL_420", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = 40
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x09\xf0" + bytes(200)])  # an access-unit delimiter, then nothing
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    return ds


def _pdf() -> Dataset:
    ds = _new_dataset(EncapsulatedPDFStorage, "pdf", "DOC", "report (PDF)")
    ds.BurnedInAnnotation, ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = "NO", "Report", "application/pdf"
    ds.ConceptNameCodeSequence = []
    pdf = (b"%PDF-1.1\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
           b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)
    return ds


# --- helpers -----------------------------------------------------------------------------------------

def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["machaon corpus", *parts])


def _new_dataset(sop_class: str, key: str, modality: str, description: str) -> Dataset:
    """The patient, study and series modules every object here shares; its own study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(key, "instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(key, "study"), _uid(key, "series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Corpus^Test", "CORPUS-1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "090000", "", "1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "machaon corpus"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, 1, 1, description
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()


def _describe(path: Path, kind: str, via: str, expect: str = "") -> CorpusFile:
    """What the test needs to know of a file, read back from what was written."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    study = ds.get("StudyInstanceUID")
    return CorpusFile(path, kind, via, str(study) if study else None,
                      str(ds.get("SOPClassUID")) if "SOPClassUID" in ds else None,
                      str(ts) if ts else None, expect)
