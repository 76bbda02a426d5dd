"""Synthetic cardiac MR phantoms: images, ground truth and real DICOM.

No medical images or pretrained weights can be shipped, so the demo models are
trained on these phantoms and the end-to-end tests send them. A phantom heart is
an ellipsoidal left-ventricle cavity inside a myocardial shell, a right ventricle
beside it, a descending aorta behind, lungs and a body outline; intensities vary
per study, with a smooth coil bias and Rician noise, and every voxel's label is
known. Images are drawn in millimetres on the slice plane, so the DICOM geometry
written with them (Image Position/Orientation, Pixel Spacing, slice spacing) is
exact by construction.

Nothing here is anatomy: it is a test object with the right shapes and contrast.
The array part uses numpy only; pydicom is imported where DICOM is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATRIX = 256  # rows = columns of a phantom image
SPACING = 1.40625  # mm per pixel: a 360 mm field of view
SLICE_GAP = 8.0  # mm between short-axis slices; slices are contiguous
SAX_SLICES = 12

BACKGROUND, CAVITY, MYOCARDIUM = 0, 1, 2  # values in the label maps
VIEWS = ("short-axis", "two-chamber", "three-chamber", "four-chamber")

# Relative signal of each tissue on a bright-blood (SSFP-like) image.
_BLOOD, _MYO, _TISSUE, _LUNG, _FAT = 1.0, 0.33, 0.45, 0.07, 0.8


@dataclass(frozen=True)
class Heart:
    """The random parameters of one phantom study."""

    centre: tuple[float, float]  # in-plane offset of the LV axis from the image centre, mm
    lv_radius: float  # cavity radius at the base, mm
    lv_length: float  # cavity length from base to apex, mm
    wall: float  # myocardial thickness, mm
    rv_angle: float  # direction of the right ventricle from the LV axis, radians
    rv_size: float  # right-ventricle semi-axis, mm
    body: tuple[float, float]  # body semi-axes, mm
    scale: float  # signal of blood in stored units
    noise: float  # noise sigma relative to blood signal
    bias: tuple[float, float]  # linear coil-bias gradient along x and y

    @classmethod
    def random(cls, rng: np.random.Generator) -> Heart:
        u = rng.uniform
        return cls(
            centre=(u(-25, 25), u(-20, 20)), lv_radius=u(20, 30), lv_length=u(70, 95), wall=u(7, 12),
            rv_angle=u(2.6, 3.6), rv_size=u(24, 34), body=(u(135, 165), u(100, 125)),
            scale=u(600, 2400), noise=u(0.02, 0.06), bias=(u(-0.25, 0.25), u(-0.25, 0.25)),
        )

    @property
    def depth(self) -> float:
        """Distance along the long axis from the base plane to the apex's outer wall."""
        return self.lv_length + self.wall


def _grid(matrix: int, spacing: float, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm, origin at the image centre; x right, y down."""
    n = matrix * supersample
    axis = (np.arange(n) - (n - 1) / 2) * (spacing / supersample)
    return np.meshgrid(axis, axis, indexing="xy")


def _ellipse(x, y, cx, cy, a, b, angle=0.0) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / max(a, 1e-6)) ** 2 + (v / max(b, 1e-6)) ** 2 <= 1.0


def _shell(d: float, radius: float, length: float) -> float:
    """Radius at depth d of a half-ellipsoid with this base radius and length."""
    return radius * math.sqrt(max(0.0, 1.0 - (d / length) ** 2)) if 0 <= d < length else 0.0


def _body(x, y, heart: Heart) -> np.ndarray:
    """Signal of everything that is not heart: body, fat rim, lungs, spine, aorta."""
    bx, by = heart.body
    image = np.where(_ellipse(x, y, 0, 0, bx, by), _TISSUE, 0.0)
    image = np.where(_ellipse(x, y, 0, 0, bx, by) & ~_ellipse(x, y, 0, 0, bx - 12, by - 12), _FAT, image)
    for side in (-1, 1):
        image = np.where(_ellipse(x, y, side * bx * 0.5, -by * 0.05, bx * 0.38, by * 0.62), _LUNG, image)
    image = np.where(_ellipse(x, y, 0, by * 0.72, 18, 14), 0.25, image)  # vertebral body
    return np.where(_ellipse(x, y, bx * 0.12, by * 0.45, 11, 11), _BLOOD, image)  # descending aorta


def _finish(signal: np.ndarray, heart: Heart, supersample: int, rng: np.random.Generator) -> np.ndarray:
    """Average the supersampled signal, add coil bias and Rician noise, scale to 12 bits."""
    n = signal.shape[0] // supersample
    signal = signal.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    ramp = np.linspace(-1, 1, n)
    signal = signal * (1 + heart.bias[0] * ramp[None, :] + heart.bias[1] * ramp[:, None])
    sigma = heart.noise
    real = signal + rng.normal(0, sigma, signal.shape)
    imag = rng.normal(0, sigma, signal.shape)
    return np.clip(np.hypot(real, imag) * heart.scale, 0, 4095).astype(np.uint16)


def _lv(x, y, heart: Heart, d: float) -> tuple[np.ndarray, np.ndarray]:
    """The LV cavity and the LV's outer wall at depth d, as masks on grid x, y."""
    cx, cy = heart.centre
    r_cavity = _shell(d, heart.lv_radius, heart.lv_length)
    r_outer = _shell(d, heart.lv_radius + heart.wall, heart.depth)
    return (_ellipse(x, y, cx, cy, r_cavity, r_cavity * 0.92) & (r_cavity > 0),
            _ellipse(x, y, cx, cy, r_outer, r_outer * 0.92) & (r_outer > 0))


def sax_slice(heart: Heart, d: float, rng: np.random.Generator, matrix: int = MATRIX,
              spacing: float = SPACING) -> tuple[np.ndarray, np.ndarray]:
    """One short-axis slice at depth d (mm from the base plane): image (uint16) and labels (uint8).

    The image is drawn at twice the resolution and averaged, for partial volume at
    edges; the labels are drawn at pixel centres.
    """
    cavity, outer = _lv(*_grid(matrix, spacing, 1), heart, d)
    labels = np.where(cavity, CAVITY, np.where(outer, MYOCARDIUM, BACKGROUND)).astype(np.uint8)

    x, y = _grid(matrix, spacing, 2)
    cavity, outer = _lv(x, y, heart, d)
    cx, cy = heart.centre
    r_rv = _shell(d, heart.rv_size, heart.lv_length * 0.8)
    offset = heart.lv_radius + heart.wall + r_rv * 0.35
    rx, ry = cx + offset * math.cos(heart.rv_angle), cy + offset * math.sin(heart.rv_angle)
    rv = _ellipse(x, y, rx, ry, r_rv * 0.6, r_rv * 1.1, heart.rv_angle) & ~outer & (r_rv > 0)
    rv_wall = _ellipse(x, y, rx, ry, r_rv * 0.6 + 3, r_rv * 1.1 + 3, heart.rv_angle) & ~outer & (r_rv > 0)
    signal = _body(x, y, heart)
    # The heart sits in soft tissue, not in lung.
    signal = np.where(_ellipse(x, y, cx, cy, heart.lv_radius + heart.wall + 25, heart.lv_radius + 25),
                      _TISSUE, signal)
    signal = np.where(rv_wall, _MYO, signal)
    signal = np.where(rv, _BLOOD * 0.95, signal)
    signal = np.where(outer, _MYO, signal)
    signal = np.where(cavity, _BLOOD, signal)
    return _finish(signal, heart, 2, rng), labels


def sax_depths(heart: Heart, slices: int = SAX_SLICES) -> np.ndarray:
    """Depths of a stack that starts one slice above the base and runs past the apex."""
    return -SLICE_GAP + SLICE_GAP * np.arange(slices) + SLICE_GAP / 2


def long_axis_image(heart: Heart, view: str, rng: np.random.Generator, matrix: int = MATRIX,
                    spacing: float = SPACING) -> np.ndarray:
    """A long-axis (or mid short-axis) image of the phantom heart in the named view."""
    if view == "short-axis":
        return sax_slice(heart, heart.lv_length * 0.45, rng, matrix, spacing)[0]
    x, y = _grid(matrix, spacing, 2)
    tilt = rng.uniform(-0.5, 0.5) + math.pi / 4  # the long axis runs from base (up right) to apex
    c, s = math.cos(tilt), math.sin(tilt)
    cx, cy = heart.centre
    length, radius = heart.lv_length / 2, heart.lv_radius

    def along(t, n=0.0):  # a point t mm along the long axis and n mm across it
        return cx + t * c - n * s, cy + t * s + n * c

    signal = _body(x, y, heart)
    signal = np.where(_ellipse(x, y, cx, cy, length + 40, radius + 35, tilt), _TISSUE, signal)
    atria = [(0.0, radius * 0.9)]  # left atrium
    if view == "four-chamber":
        rvx, rvy = along(-length * 0.1, -(radius * 2 + heart.wall))
        signal = np.where(_ellipse(x, y, rvx, rvy, length * 0.85 + 3, radius * 0.7 + 3, tilt), _MYO, signal)
        signal = np.where(_ellipse(x, y, rvx, rvy, length * 0.85, radius * 0.7, tilt), _BLOOD * 0.95, signal)
        atria.append((-(radius * 2 + heart.wall), radius * 0.8))  # right atrium
    for across, r in atria:
        ax, ay = along(-length - r * 0.9, across)
        signal = np.where(_ellipse(x, y, ax, ay, r, r * 1.1, tilt), _BLOOD * 0.9, signal)
    if view == "three-chamber":  # the aortic outflow leaves the base towards the septum side
        ox, oy = along(-length - 8, -radius * 1.2)
        signal = np.where(_ellipse(x, y, ox, oy, 40, 11, tilt - 1.0), _BLOOD, signal)
    signal = np.where(_ellipse(x, y, cx, cy, length + heart.wall, radius + heart.wall, tilt), _MYO, signal)
    signal = np.where(_ellipse(x, y, cx, cy, length, radius, tilt), _BLOOD, signal)
    return _finish(signal, heart, 2, rng)


def sax_dataset(studies: int, seed: int, matrix: int = MATRIX) -> tuple[np.ndarray, np.ndarray]:
    """Short-axis slices of `studies` random hearts: images (N, H, W) uint16 and labels (N, H, W)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(studies):
        heart = Heart.random(rng)
        for d in sax_depths(heart):
            image, label = sax_slice(heart, float(d), rng, matrix, SPACING * MATRIX / matrix)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.stack(labels)


def view_dataset(per_view: int, seed: int, matrix: int = MATRIX) -> tuple[np.ndarray, np.ndarray]:
    """Images of random hearts in each of VIEWS: images (N, H, W) uint16 and view indices (N,)."""
    rng = np.random.default_rng(seed)
    images, views = [], []
    for _ in range(per_view):
        heart = Heart.random(rng)
        for index, view in enumerate(VIEWS):
            images.append(long_axis_image(heart, view, rng, matrix, SPACING * MATRIX / matrix))
            views.append(index)
    return np.stack(images), np.array(views, dtype=np.int64)


@dataclass
class PhantomStudy:
    """What was written, and the truth a model's output can be judged against."""

    study_uid: str
    sax_files: list[Path]  # one per slice, base to apex
    view_files: dict[str, Path]  # one single-image series per long-axis view
    sax_labels: np.ndarray  # (slices, rows, columns), in the order of sax_files
    heart: Heart

    @property
    def cavity_volume_ml(self) -> float:
        """The LV cavity volume the short-axis stack shows: labelled voxels times voxel size."""
        voxels = int((self.sax_labels == CAVITY).sum())
        return voxels * SPACING * SPACING * SLICE_GAP / 1000.0


def _sax_orientation() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A double-oblique short-axis plane, as a scanner would plan it: row, column, normal."""
    def rotation(axis: int, degrees: float) -> np.ndarray:
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    m = rotation(2, -35) @ rotation(0, 50) @ rotation(1, -20)
    row, column = m @ np.array([1.0, 0, 0]), m @ np.array([0, 1.0, 0])
    return row, column, np.cross(row, column)


def write_study(folder: Path, seed: int, views: bool = True, patient_id: str | None = None,
                slices: int = SAX_SLICES) -> PhantomStudy:
    """Write one phantom cardiac MR study as DICOM files under `folder`.

    A short-axis stack (one MR image per slice) and, with `views`, one image each
    of the two-, three- and four-chamber views, each in its own series. The same
    seed gives the same pixels and the same UIDs.
    """
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    heart = Heart.random(rng)
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=["machaon phantom", str(seed), *map(str, parts)])

    study = _StudyHeader(uid("study"), uid("frame"), patient_id or f"PHANTOM-{seed}", seed)
    row, column, normal = _sax_orientation()
    centre = np.array([15.0, 25.0, 30.0])  # where the base of the LV is, in patient mm
    corner = -(MATRIX - 1) / 2 * SPACING
    sax_files, labels = [], []
    for index, d in enumerate(sax_depths(heart, slices)):
        image, label = sax_slice(heart, float(d), rng)
        # Every slice's centre lies on the line through `centre` along the normal;
        # the heart's in-plane offset is drawn in the image itself.
        position = centre + corner * row + corner * column + float(d) * normal
        ds = study.image(image, uid("sax"), 1, "SAX cine (phantom)", uid("sax", index), index + 1,
                         position, row, column)
        ds.ImagesInAcquisition = slices  # as scanners write it: how many images make the stack whole
        sax_files.append(_save(ds, folder / "sax" / f"{index + 1:03d}.dcm"))
        labels.append(label)
    view_files = {}
    if views:
        for number, view in enumerate(VIEWS[1:], start=2):
            # Long-axis planes are drawn in the image plane only; their orientation
            # is a plausible one, tilted from the short axis, not the true intersection.
            lax_row, lax_column = row, np.cross(normal, row) * -1
            ds = study.image(long_axis_image(heart, view, rng), uid(view), number,
                             f"{view.replace('-', ' ').upper()} cine (phantom)", uid(view, 0), 1,
                             centre + corner * lax_row + corner * lax_column, lax_row, lax_column)
            view_files[view] = _save(ds, folder / view / "001.dcm")
    return PhantomStudy(study.study_uid, sax_files, view_files, np.stack(labels), heart)


def _save(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class _StudyHeader:
    study_uid: str
    frame_uid: str
    patient_id: str
    seed: int

    def image(self, pixels: np.ndarray, series_uid: str, series_number: int, description: str,
              sop_uid: str, number: int, position: np.ndarray, row: np.ndarray, column: np.ndarray):
        """One MR Image Storage instance with the modules its IOD requires."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = "080000"
        ds.SeriesTime = ds.ContentTime = f"08{series_number:02d}00"
        ds.AccessionNumber, ds.Modality = f"PH{self.seed}", "MR"
        ds.Manufacturer = "machaon phantom"
        ds.InstitutionName = "Synthetic data, not a patient"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Cardiac MR phantom (synthetic)"
        ds.SeriesDescription = description
        ds.PatientName, ds.PatientID = "Phantom^Cardiac", self.patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.BodyPartExamined = "HEART"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SS", ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness, ds.SpacingBetweenSlices = SLICE_GAP, SLICE_GAP
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 3.2, 1.6, 1
        ds.MagneticFieldStrength, ds.FlipAngle = 1.5, 60
        ds.ProtocolName = "cine SSFP phantom"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, number
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = self.frame_uid, ""
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.SliceLocation = round(float(np.dot(position, np.cross(row, column))), 4)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [SPACING, SPACING]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = int(np.percentile(pixels, 99) / 2), int(np.percentile(pixels, 99))
        ds.PixelData = pixels.astype("<u2").tobytes()
        return ds
