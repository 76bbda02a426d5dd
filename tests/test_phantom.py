"""The phantom generator writes real DICOM with exact geometry and known truth."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from machaon.tools import phantom


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return phantom.write_study(tmp_path_factory.mktemp("phantom"), seed=3)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (dicom3tools) is installed by .ci/install")
def test_every_file_passes_dciodvfy(study):
    files = study.sax_files + list(study.view_files.values())
    assert len(files) == phantom.SAX_SLICES + 3
    for path in files:
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"


def test_geometry_is_a_contiguous_stack_along_the_normal(study):
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.sax_files]
    row, column = np.array(headers[0].ImageOrientationPatient[:3]), np.array(headers[0].ImageOrientationPatient[3:])
    normal = np.cross(row, column)
    assert abs(np.dot(row, column)) < 1e-6 and abs(np.linalg.norm(normal) - 1) < 1e-6
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps @ normal, phantom.SLICE_GAP, atol=1e-3)  # spaced by the slice gap...
    assert np.allclose(steps - np.outer(steps @ normal, normal), 0, atol=1e-3)  # ...and only along the normal
    assert {h.StudyInstanceUID for h in headers} == {study.study_uid}
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == 12
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    assert all(float(h.SliceThickness) == phantom.SLICE_GAP for h in headers)
    assert {h.ImagesInAcquisition for h in headers} == {phantom.SAX_SLICES}  # how many make it whole


def test_truth_matches_the_pixels_and_a_plausible_volume(study):
    slices = [pydicom.dcmread(p).pixel_array.astype(float) for p in study.sax_files]
    middle = len(slices) // 2
    cavity = study.sax_labels[middle] == phantom.CAVITY
    myocardium = study.sax_labels[middle] == phantom.MYOCARDIUM
    assert cavity.any() and myocardium.any()
    # Bright blood, darker muscle: what a segmenter learns from.
    assert slices[middle][cavity].mean() > 2 * slices[middle][myocardium].mean()
    assert not (study.sax_labels[0] == phantom.CAVITY).any()  # the first slice is above the base
    assert 50 < study.cavity_volume_ml < 250


def test_same_seed_same_study_other_seed_other_study(tmp_path):
    a = phantom.write_study(tmp_path / "a", seed=5, views=False)
    b = phantom.write_study(tmp_path / "b", seed=5, views=False)
    c = phantom.write_study(tmp_path / "c", seed=6, views=False)
    assert a.study_uid == b.study_uid != c.study_uid
    assert pydicom.dcmread(a.sax_files[4]).PixelData == pydicom.dcmread(b.sax_files[4]).PixelData
    assert a.cavity_volume_ml != c.cavity_volume_ml
