"""From a series' files to SEG and TID 1500 SR: geometry, decoding, and objects dciodvfy accepts."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from machaon.inference import OrtSessions, RuntimeOptions
from machaon.manifest import Package
from machaon.preprocess import PrepareError, labels_on_source_grid, model_input, read_series
from machaon.results import classification_report, segmentation, segmentation_report
from machaon.tools import phantom
from pydicom.encaps import encapsulate, get_frame

DATA = Path(pydicom.__file__).parents[1] / "data_store" / "data"  # the pydicom-data package's files
ORT_SESSIONS = OrtSessions(RuntimeOptions(providers=("cpu",)))
needs_dciodvfy = pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy is installed by .ci/install")


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def segment(files: list[Path], package: Package):
    series = read_series(files)
    manifest = package.manifest
    probabilities = ORT_SESSIONS.get(package).run(model_input(series, manifest.input))
    labels = labels_on_source_grid(probabilities, manifest.output.layout, *series.pixels.shape[1:3])
    return series, labels


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return phantom.write_study(tmp_path_factory.mktemp("phantom"), seed=21, views=True)


def test_slices_are_ordered_by_geometry_not_by_file_or_instance_number(study, tmp_path):
    files = list(study.sax_files)
    random.Random(1).shuffle(files)
    for i, path in enumerate(files):  # Instance Numbers that contradict the geometry
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 100 - i
        ds.save_as(tmp_path / f"{i:02d}.dcm")
    series = read_series(sorted(tmp_path.glob("*.dcm")))
    expected = [pydicom.dcmread(p).SOPInstanceUID for p in study.sax_files]
    assert [f.dataset.SOPInstanceUID for f in series.frames] == expected
    assert series.slice_spacing == pytest.approx(phantom.SLICE_GAP, abs=1e-3)
    assert series.pixel_spacing == (phantom.SPACING, phantom.SPACING)


@needs_dciodvfy
def test_lv_seg_and_sr_are_valid_and_measure_the_phantom(study, lv, tmp_path):
    series, labels = segment(study.sax_files, lv)
    seg = segmentation(series, labels, lv.manifest)
    sr = segmentation_report(series, labels, seg, lv.manifest)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []

    # What a viewer reads back: one frame per slice, empty ones too, and the phantom's cavity.
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.NumberOfFrames == phantom.SAX_SLICES
    assert seg.StudyInstanceUID == study.study_uid and seg.SeriesInstanceUID != series.datasets[0].SeriesInstanceUID
    mask = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in series.datasets], segment_numbers=[1]).squeeze(-1).astype(bool)
    truth = study.sax_labels == phantom.CAVITY
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) >= 0.9
    description = seg.SegmentSequence[0]
    assert description.SegmentLabel == "LV cavity" and "RecommendedDisplayCIELabValue" in description
    assert description.SegmentAlgorithmName == "lv-segmentation"
    assert seg.Manufacturer == "machaon" and "lv-segmentation 1.0.0" in seg.SoftwareVersions
    assert "not for clinical use" in seg.SeriesDescription and "not for clinical use" in seg.ContentDescription

    sr = hd.sr.srread(tmp_path / "sr.dcm")
    [volume] = sr.content.get_volumetric_roi_measurement_groups()
    [measured] = volume.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)
    assert measured.unit.value == "ml"
    assert measured.value == pytest.approx(study.cavity_volume_ml, rel=0.10)
    areas = sr.content.get_planar_roi_measurement_groups()
    assert len(areas) == int(mask.any(axis=(1, 2)).sum())  # one per slice where the SEG shows the cavity
    assert "not for clinical use" in sr.SeriesDescription


def test_result_uids_follow_the_inputs(study, lv):
    series, labels = segment(study.sax_files, lv)
    first = segmentation(series, labels, lv.manifest)
    again = segmentation(series, labels, lv.manifest)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    newer = lv.manifest.model_copy(update={"version": "1.0.1"})
    assert segmentation(series, labels, newer).SOPInstanceUID != first.SOPInstanceUID
    fewer = read_series(study.sax_files[1:])
    assert segmentation(fewer, labels[1:], lv.manifest).SOPInstanceUID != first.SOPInstanceUID


@needs_dciodvfy
def test_multiframe_source_is_ordered_and_segmented(study, lv, tmp_path):
    legacy = [pydicom.dcmread(p) for p in reversed(study.sax_files)]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy, series_instance_uid=pydicom.uid.generate_uid(), series_number=50,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    series, labels = segment([tmp_path / "enhanced.dcm"], lv)
    assert len(series.frames) == phantom.SAX_SLICES
    truth = study.sax_labels == phantom.CAVITY  # base to apex, whatever the frames' order in the file
    assert 2 * ((labels == 1) & truth).sum() / ((labels == 1).sum() + truth.sum()) >= 0.9
    seg = segmentation(series, labels, lv.manifest)
    seg.save_as(tmp_path / "seg.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []


@needs_dciodvfy
def test_chest_radiograph_gives_an_sr_with_14_findings(built_models, tmp_path):
    package = Package(built_models / "cxr-findings")
    series = read_series([DATA / "RG1_J2KR.dcm"])  # a real CR, JPEG 2000, MONOCHROME1
    probabilities = ORT_SESSIONS.get(package).run(model_input(series, package.manifest.input))
    sr = classification_report(series, probabilities, package.manifest)
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    groups = sr.ContentSequence[-1].ContentSequence  # Imaging Measurements: one group per finding
    assert len(groups) == 14
    labels = {g.ContentSequence[0].TextValue for g in groups}  # each group's tracking identifier
    assert {"Cardiomegaly", "Pneumothorax", "Support devices"} <= labels


def test_compressed_and_monochrome1_pixels_are_decoded_and_turned_round():
    compressed = read_series([DATA / "RG1_J2KR.dcm"]).pixels
    plain = read_series([DATA / "RG1_UNCR.dcm"]).pixels
    assert np.array_equal(compressed, plain)  # lossless JPEG 2000 decodes to the same values
    raw = pydicom.dcmread(DATA / "RG1_UNCR.dcm").pixel_array.astype(np.float32)
    # MONOCHROME1: the brightest stored value becomes the darkest.
    assert plain[0][raw == raw.max()].max() == plain[0].min()


def test_what_cannot_be_prepared_is_named(study, tmp_path):
    with pytest.raises(PrepareError, match="mixes image orientations"):
        read_series([*study.sax_files, study.view_files["four-chamber"]])
    ds = pydicom.dcmread(study.sax_files[0])
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(PrepareError, match=r"has no pixel data \(SOP class MR Image Storage\)"):
        read_series([tmp_path / "nopixels.dcm"])
    broken = pydicom.dcmread(DATA / "RG3_J2KR.dcm")
    frame = get_frame(broken.PixelData, 0, number_of_frames=1)
    broken.PixelData = encapsulate([frame[: len(frame) // 2]])  # a JPEG 2000 frame cut off halfway
    broken.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(PrepareError, match=r"cannot decode its pixel data \(JPEG 2000 Image Compression"):
        read_series([tmp_path / "corrupt.dcm"])

