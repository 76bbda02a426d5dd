"""Untidy real-world series: each gives an error an operator can act on, or a valid result, never an
internal error. Duplicates, time series, missing geometry, missing patient data, nothing found and
incomplete stacks, each as a user sees the outcome: the PrepareError's message, or SEG and SR objects
that dciodvfy accepts and highdicom reads back."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from machaon.inference import OrtSessions, RuntimeOptions
from machaon.manifest import Manifest, Package
from machaon.preprocess import (
    IncompleteSeries,
    PrepareError,
    check_complete,
    labels_on_source_grid,
    model_input,
    read_series,
)
from machaon.results import classification_report, segmentation, segmentation_report
from machaon.tools import phantom
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless, generate_uid

from tests.dicomgen import with_raw_values

DATA = Path(pydicom.__file__).parents[1] / "data_store" / "data"  # the pydicom-data package's files
REPO = Path(__file__).resolve().parents[1]
ORT_SESSIONS = OrtSessions(RuntimeOptions(providers=("cpu",)))
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return phantom.write_study(tmp_path_factory.mktemp("phantom"), seed=31, views=False)


def copy(path: Path, dest: Path, **changes) -> Path:
    """The instance at `path` saved as `dest` under a new SOP Instance UID, with attributes changed."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest


def uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def along(path: Path) -> float:
    """mm along the slice normal, as the service reports positions."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    return float(np.array(ds.ImagePositionPatient, dtype=float) @ np.cross(orientation[:3], orientation[3:]))


def enhanced(study, path: Path, keep_positions: bool = True) -> Path:
    """The phantom's stack as one Legacy Converted Enhanced MR image, its plane positions kept or not."""
    legacy = [pydicom.dcmread(p) for p in study.sax_files]
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=60,
        sop_instance_uid=generate_uid(), instance_number=1)
    if not keep_positions:
        for groups in image.PerFrameFunctionalGroupsSequence:
            del groups.PlanePositionSequence
    image.save_as(path)
    return path


def without_stack(manifest: Manifest) -> Manifest:
    """The manifest of a model that takes series as they come (no [input.stack])."""
    return manifest.model_copy(update={"input": manifest.input.model_copy(update={"stack": None})})


def segment(series, package: Package) -> np.ndarray:
    probabilities = ORT_SESSIONS.get(package).run(model_input(series, package.manifest.input))
    return labels_on_source_grid(probabilities, package.manifest.output.layout, *series.pixels.shape[1:3])


def valid(obj, path: Path):
    """Save the object, check it with dciodvfy and read it back as a viewer would."""
    obj.save_as(path)
    assert shutil.which("dciodvfy"), "dciodvfy judges every object: install dicom3tools (.ci/install does)"
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], f"{path}: {errors}"
    return hd.seg.segread(path) if obj.Modality == "SEG" else hd.sr.srread(path)


def evaluations(sr) -> dict[str, str]:
    """Tracking identifier -> qualitative evaluation of each TID 1501 group."""
    return {group.tracking_identifier: evaluation.value.meaning
            for group in sr.content.get_image_measurement_groups()
            for evaluation in group.get_qualitative_evaluations()}


# --- 1. Duplicate slice positions ---------------------------------------------------------

def test_a_resent_image_is_dropped_for_its_newer_copy_and_named(study, lv, tmp_path):
    original = study.sax_files[4]
    resent = copy(original, tmp_path / "resent.dcm")  # the same image again, under a new UID
    series = read_series([*study.sax_files, resent])  # received last: the newest copy
    [note] = series.dropped
    assert note == (f"kept {uid(resent)}, dropped its older copy {uid(original)} "
                    f"(at {along(original):.1f} mm along the slice normal)")
    kept = [ds.SOPInstanceUID for ds in series.datasets]
    assert len(series.frames) == phantom.SAX_SLICES and uid(resent) in kept and uid(original) not in kept

    labels = segment(series, lv)  # a whole stack again: the model runs and measures the phantom
    seg = valid(segmentation(series, labels, lv.manifest), tmp_path / "seg.dcm")
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    [volume] = sr.content.get_volumetric_roi_measurement_groups()
    [measured] = volume.get_measurements(name=codes.SCT.Volume)
    assert measured.value == pytest.approx(study.cavity_volume_ml, rel=0.10)


def test_the_same_image_in_two_encodings_is_one_image_or_refused(study, tmp_path):
    rle = pydicom.dcmread(study.sax_files[7])
    rle.SOPInstanceUID = rle.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rle.compress(RLELossless)
    rle.save_as(tmp_path / "rle.dcm")
    files = [tmp_path / "rle.dcm", *study.sax_files]  # the RLE copy came first: the older one
    series = read_series(files)
    assert [ds.SOPInstanceUID for ds in series.datasets] == [uid(p) for p in study.sax_files]
    assert np.array_equal(series.pixels, read_series(study.sax_files).pixels)
    assert series.dropped == [f"kept {uid(study.sax_files[7])}, dropped its older copy {rle.SOPInstanceUID} "
                              f"(at {along(study.sax_files[7]):.1f} mm along the slice normal)"]

    with pytest.raises(PrepareError, match="copies of the same image") as refused:
        read_series(files, duplicates="fail")
    assert f"{rle.SOPInstanceUID} and {uid(study.sax_files[7])}" in str(refused.value)


def test_a_resent_multiframe_image_drops_every_older_frame(study, tmp_path):
    first = enhanced(study, tmp_path / "first.dcm")
    again = copy(first, tmp_path / "again.dcm")
    series = read_series([first, again])
    assert len(series.frames) == phantom.SAX_SLICES and [ds.SOPInstanceUID for ds in series.datasets] == [uid(again)]
    [note] = series.dropped
    assert note.startswith(f"kept {uid(again)}, dropped its older copy {uid(first)} (12 frames, from ")


def test_cine_time_points_are_not_duplicates_but_a_stack_model_refuses_them(study, lv, tmp_path):
    phases = [copy(path, tmp_path / f"{t}" / path.name, TriggerTime=t, ImagesInAcquisition=24)
              for t in (0, 400) for path in study.sax_files]
    resent = copy(phases[15], tmp_path / "resent.dcm")  # and one image of the second phase sent twice
    series = read_series([*phases, resent])
    assert len(series.frames) == 2 * phantom.SAX_SLICES
    assert len(series.dropped) == 1 and uid(phases[15]) in series.dropped[0]
    assert series.slice_spacing is None  # no single stack: no volume would be reported
    with pytest.raises(PrepareError, match=r"the series holds 2 time points per position at 12 positions "
                       r"\(they differ in TriggerTime\); the model measures one stack at one time point: "
                       r"send one time point \(e.g. end-diastole\) as a series of its own"):
        model_input(series, lv.manifest.input)


# --- 2. Stacks without plane geometry -----------------------------------------------------

def test_a_multiframe_stack_without_plane_positions_names_the_frame_and_attribute(study, lv, tmp_path):
    path = enhanced(study, tmp_path / "enhanced.dcm", keep_positions=False)
    series = read_series([path])  # its Frame of Reference UID is there; its plane positions are not
    expected = (rf"frame 1 of instance {uid(path)} has no Plane Position \(PlanePositionSequence > "
                r"ImagePositionPatient\) in its per-frame or shared functional groups: without it the "
                r"series' 12 frames cannot be placed in space as one stack")
    with pytest.raises(PrepareError, match=expected):
        model_input(series, lv.manifest.input)  # a stack model: refused before inference
    labels = np.zeros(series.pixels.shape[:3], np.uint8)
    with pytest.raises(PrepareError, match=expected):  # any segmentation of several frames needs it
        segmentation(series, labels, without_stack(lv.manifest))


def test_a_real_enhanced_mr_without_functional_groups_names_what_is_missing(lv):
    path = DATA / "emri_small.dcm"  # 10 frames, a Frame of Reference UID, and no functional groups
    with pytest.raises(PrepareError, match=rf"^frame 1 of instance {uid(path)} has no Plane Position "
                       r"\(PlanePositionSequence > ImagePositionPatient\) \(the instance has no functional "
                       r"groups at all\): without it the series' 10 frames cannot be placed in space"):
        model_input(read_series([path]), lv.manifest.input)


def test_a_single_projection_image_needs_no_geometry(lv, tmp_path):
    series = read_series([DATA / "RG3_UNCR.dcm"])  # a CR: no position, orientation or pixel spacing
    labels = np.zeros(series.pixels.shape[:3], np.uint8)
    labels[0, 100:200, 100:200] = 1
    seg = valid(segmentation(series, labels, lv.manifest), tmp_path / "seg.dcm")
    assert seg.get_pixels_by_source_instance([series.datasets[0].SOPInstanceUID]).sum() == 100 * 100
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    assert evaluations(sr) == {"LV cavity found": "Present"}  # nothing to measure in mm, but found


# --- 3. Missing Type 2 patient and study attributes ---------------------------------------

def test_a_source_without_patient_and_study_data_still_gives_seg_and_sr(study, lv, tmp_path):
    files = []
    for path in study.sax_files:
        ds = pydicom.dcmread(path)
        for keyword in TYPE2:
            delattr(ds, keyword)
        ds.save_as(tmp_path / path.name)
        files.append(tmp_path / path.name)
    stored = [p.read_bytes() for p in files]
    series = read_series(files)
    labels = segment(series, lv)
    seg = valid(segmentation(series, labels, lv.manifest), tmp_path / "seg.dcm")
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    for result in (seg, sr):
        assert all(result[keyword].value in ("", None) for keyword in TYPE2)
        assert result.StudyInstanceUID == study.study_uid
    assert [p.read_bytes() for p in files] == stored  # the received files are never changed


def test_a_radiograph_without_patient_and_study_data_still_gives_a_classification_sr(built_models, tmp_path):
    ds = pydicom.dcmread(DATA / "RG1_UNCR.dcm")
    for keyword in TYPE2:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(tmp_path / "cr.dcm")
    package = Package(built_models / "cxr-findings")
    series = read_series([tmp_path / "cr.dcm"])
    probabilities = ORT_SESSIONS.get(package).run(model_input(series, package.manifest.input))
    sr = valid(classification_report(series, probabilities, package.manifest), tmp_path / "sr.dcm")
    assert len(sr.content.get_image_measurement_groups()) == 14
    assert sr.PatientID == "" and "PatientID" not in pydicom.dcmread(tmp_path / "cr.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_dates_times_and_numbers_that_are_none_are_left_empty_in_the_results(study, lv, tmp_path):
    files = []
    for path in study.sax_files:
        files.append(tmp_path / path.name)
        with_raw_values(path, files[-1], PatientBirthDate="unknown", StudyTime="25:99",
                        SliceThickness="eight mm")
    series = read_series(files)
    labels = segment(series, lv)
    seg = valid(segmentation(series, labels, lv.manifest), tmp_path / "seg.dcm")
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    for result in (seg, sr):
        assert result.PatientBirthDate in ("", None) and result.StudyTime in ("", None)
        assert result.StudyDate == "20260101"  # what could be read is kept
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert measures.SliceThickness == pytest.approx(phantom.SLICE_GAP, abs=1e-3)  # the stack's spacing stands in


# --- 4. A model that finds nothing ---------------------------------------------------------

def test_a_blank_stack_gives_an_empty_seg_and_an_sr_saying_absent_and_zero_ml(study, lv, tmp_path):
    files = []
    for path in study.sax_files:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), "<u2").tobytes()  # a uniform image: no heart
        ds.save_as(tmp_path / path.name)
        files.append(tmp_path / path.name)
    series = read_series(files)
    labels = segment(series, lv)  # the real model, finding nothing
    assert not labels.any()
    seg = valid(segmentation(series, labels, lv.manifest), tmp_path / "seg.dcm")
    assert seg.NumberOfFrames == phantom.SAX_SLICES  # one empty frame per slice
    assert not seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in series.datasets]).any()
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    assert evaluations(sr) == {"LV cavity not found": "Absent"}
    [volume] = sr.content.get_volumetric_roi_measurement_groups()
    [measured] = volume.get_measurements(name=codes.SCT.Volume)
    assert measured.value == 0 and measured.unit.value == "ml"
    assert sr.content.get_planar_roi_measurement_groups() == []  # no slice has an area to report


def test_nothing_found_on_one_slice_gives_an_sr_saying_absent(study, lv, tmp_path):
    series = read_series([study.sax_files[0]])  # one slice: areas could be measured, a volume not
    labels = np.zeros(series.pixels.shape[:3], np.uint8)
    seg = valid(segmentation(series, labels, without_stack(lv.manifest)), tmp_path / "seg.dcm")
    sr = valid(segmentation_report(series, labels, seg, lv.manifest), tmp_path / "sr.dcm")
    assert evaluations(sr) == {"LV cavity not found": "Absent"}
    assert sr.content.get_volumetric_roi_measurement_groups() == []


# --- 5. Incomplete stacks -------------------------------------------------------------------

def test_a_missing_slice_is_a_gap_named_by_position(study, lv):
    files = study.sax_files[:4] + study.sax_files[5:]
    series = read_series(files)
    with pytest.raises(IncompleteSeries) as incomplete:
        model_input(series, lv.manifest.input)
    a, b = along(study.sax_files[3]), along(study.sax_files[5])
    assert str(incomplete.value) == (
        f"series incomplete: 11 slices, a gap of 16.0 mm between slices 4 and 5 (at {a:.1f} to {b:.1f} mm "
        "along the slice normal), 8.0 mm elsewhere; 11 of 12 images expected (ImagesInAcquisition); "
        "it runs again by itself when more images arrive")
    check_complete(series, without_stack(lv.manifest).input)  # a model without [input.stack] takes it


def test_missing_end_slices_are_found_from_images_in_acquisition(study, lv):
    series = read_series(study.sax_files[:7])  # evenly spaced: only the header tells
    with pytest.raises(IncompleteSeries, match=r"^series incomplete: 7 slices, 7 of 12 images expected "
                       r"\(ImagesInAcquisition\); it runs again by itself when more images arrive$"):
        model_input(series, lv.manifest.input)


def test_too_few_slices_for_a_volume(study, lv, tmp_path):
    # Whole as the headers tell: nothing more will come, so it does not wait for more.
    files = [copy(p, tmp_path / p.name, ImagesInAcquisition=3) for p in study.sax_files[:3]]
    with pytest.raises(PrepareError, match=r"^3 slices, fewer than the 5 the model needs to measure a volume "
                       r"\(input.stack.min_slices\); send the whole stack") as refused:
        model_input(read_series(files), lv.manifest.input)
    assert not isinstance(refused.value, IncompleteSeries)
    with pytest.raises(IncompleteSeries, match=r"^series incomplete: 3 slices, fewer than the 5 the model "
                       r"needs \(input.stack.min_slices\); 3 of 12 images expected"):
        model_input(read_series(study.sax_files[:3]), lv.manifest.input)


def test_slices_too_far_apart_or_unevenly_spaced_are_refused(study, lv, tmp_path):
    every_other = study.sax_files[::2]
    with pytest.raises(IncompleteSeries, match="^series incomplete: 6 slices, 6 of 12 images expected"):
        model_input(read_series(every_other), lv.manifest.input)  # the others may be on their way
    coarse = [copy(p, tmp_path / "coarse" / p.name, ImagesInAcquisition=6) for p in every_other]
    with pytest.raises(PrepareError, match=r"slices are 16.0 mm apart; the model measures stacks with at most "
                       r"15.0 mm between slices \(input.stack.max_gap\)") as refused:
        model_input(read_series(coarse), lv.manifest.input)  # a protocol too coarse to measure
    assert not isinstance(refused.value, IncompleteSeries)

    ds = pydicom.dcmread(study.sax_files[5], stop_before_pixels=True)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    shifted = np.array(ds.ImagePositionPatient, dtype=float) + 2.0 * np.cross(orientation[:3], orientation[3:])
    stray = copy(study.sax_files[5], tmp_path / "stray.dcm", ImagePositionPatient=[f"{v:.4f}" for v in shifted],
                 ImagesInAcquisition=13)
    files = [copy(p, tmp_path / p.name, ImagesInAcquisition=13) for p in study.sax_files] + [stray]
    with pytest.raises(PrepareError, match=r"slices are unevenly spaced: 2.0 mm between slices 6 and 7, "
                       r"8.0 mm elsewhere \(input.stack.spacing_tolerance\): the series mixes stacks") as refused:
        model_input(read_series(files), lv.manifest.input)
    assert not isinstance(refused.value, IncompleteSeries)


def test_stack_fields_are_optional_and_checked(lv):
    source = tomllib.loads((REPO / "models" / "lv-segmentation" / "manifest.toml").read_text())
    assert source["input"]["stack"] == {"min_slices": 5, "spacing_tolerance": 0.1, "max_gap": 15.0}
    assert lv.manifest.input.stack == Manifest.model_validate(source).input.stack  # the build keeps it
    del source["input"]["stack"]  # a package built before the table existed
    assert Manifest.model_validate(source).input.stack is None
    myo = tomllib.loads((REPO / "models" / "myo-segmentation" / "manifest.toml").read_text())
    assert myo["input"]["stack"]["max_gap"] == 15.0
    source["input"]["stack"] = {"max_gapp": 15.0}
    with pytest.raises(ValueError, match="max_gapp"):
        Manifest.model_validate(source)


# --- Text where numbers belong, and frames counted two ways ------------------------------------

def test_text_in_pixel_spacing_is_named(study, tmp_path):
    files = [with_raw_values(p, tmp_path / p.name, PixelSpacing="abc\\1.40625") for p in study.sax_files]
    with pytest.raises(PrepareError, match=r"^instance [0-9.]+: PixelSpacing is 'abc\\1.40625', not 2 numbers; "
                       "the sender must correct it$"):
        read_series(files)


def test_frames_that_the_functional_groups_and_the_pixel_data_count_differently_are_named():
    path = Path(get_testdata_file("liver_1frame.dcm"))  # a SEG: 3 per-frame items, 1 frame of pixels
    with pytest.raises(PrepareError, match=rf"^instance {uid(path)} has 1 frame\(s\) \(NumberOfFrames\) but "
                       "its Per-frame Functional Groups Sequence describes 3; the sender must correct it$"):
        read_series([path])


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_a_number_of_frames_that_is_no_number_is_read_from_the_pixel_data(study, lv, tmp_path):
    files = [with_raw_values(p, tmp_path / p.name, NumberOfFrames="1A") for p in study.sax_files]
    series = read_series(files)
    assert len(series.frames) == phantom.SAX_SLICES and series.slice_spacing == pytest.approx(phantom.SLICE_GAP, abs=1e-3)
    assert model_input(series, lv.manifest.input).shape[0] == phantom.SAX_SLICES
