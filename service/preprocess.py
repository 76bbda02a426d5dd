"""From a series' DICOM files to model input, and from model output back to the source grid.

Frames are ordered by their position along the slice normal (Image Position and
Orientation), never by file name or Instance Number. Pixels are decoded once
(compressed transfer syntaxes through the pylibjpeg plugins), rescaled to
modality values, MONOCHROME1 inverted, and stacked into one float32 array; every
later step is a whole-array numpy or scipy operation (DESIGN rule 6).
Anything that cannot be prepared raises PrepareError with a reason an operator
can act on; the job fails with it and other studies carry on.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from .inference import normalise, to_layout
from .manifest import InputSpec

ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation
CHANNELS = {"red": 0, "green": 1, "blue": 2}


class PrepareError(Exception):
    """A series that cannot be made into model input; the message says why."""


@dataclass
class Frame:
    dataset: Dataset
    number: int | None  # 1-based frame number in a multi-frame object; None for a single-frame image
    position: np.ndarray | None  # Image Position (Patient); None for projection images
    orientation: np.ndarray | None  # row and column direction cosines (6,)


@dataclass
class Series:
    """A series' frames in geometric order, with their pixels as one array."""

    frames: list[Frame]
    pixels: np.ndarray  # (N, rows, columns) or (N, rows, columns, 3), float32, modality values
    pixel_spacing: tuple[float, float] | None  # mm between rows, between columns
    slice_spacing: float | None  # mm between consecutive frames along the normal

    @functools.cached_property
    def instances_digest(self) -> str:
        """sha256 of the sorted SOP Instance UIDs: which exact images these are."""
        uids = "".join(sorted(ds.SOPInstanceUID for ds in self.datasets))
        return hashlib.sha256(uids.encode()).hexdigest()

    @property
    def datasets(self) -> list[Dataset]:
        """The source instances, each once, in the order of their first frame."""
        seen: dict[str, Dataset] = {}
        for frame in self.frames:
            seen.setdefault(frame.dataset.SOPInstanceUID, frame.dataset)
        return list(seen.values())


def read_series(paths: list[Path]) -> Series:
    """Read, check, order and decode the instances of one series."""
    if not paths:
        raise PrepareError("the series has no instances")
    datasets = [_read(path) for path in paths]
    for ds in datasets:
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise PrepareError(f"instance {ds.SOPInstanceUID} has no pixel data "
                               f"(SOP class {ds.SOPClassUID.name}): this model needs images")
    frames = _order([frame for ds in datasets for frame in _frames(ds)])
    decoded = {id(ds): _decode(ds) for ds in datasets}
    if len({d.shape[1:] for d in decoded.values()}) != 1:
        raise PrepareError("the series' images differ in size: send one size per series")
    pixels = np.stack([decoded[id(f.dataset)][(f.number or 1) - 1] for f in frames])
    return Series(frames, pixels, _pixel_spacing(datasets[0]), _slice_spacing(frames))


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise PrepareError(f"cannot read {path} from the spool: {exc}; was it removed or damaged?") from None


def _frames(ds: Dataset) -> list[Frame]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        position = _vector(ds.get("ImagePositionPatient"))
        orientation = _vector(ds.get("ImageOrientationPatient"))
        return [Frame(ds, (i + 1) if count > 1 else None, position, orientation) for i in range(count)]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []
    for i, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = _from_groups(groups, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _from_groups(groups, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        frames.append(Frame(ds, i + 1, position, orientation))
    return frames


def _from_groups(groups: Dataset, shared: Dataset, sequence: str, attribute: str) -> np.ndarray | None:
    for source in (groups, shared):
        if sequence in source and attribute in source[sequence].value[0]:
            return _vector(source[sequence].value[0][attribute].value)
    return None


def _vector(value) -> np.ndarray | None:
    return None if value is None else np.array([float(v) for v in value])


def _order(frames: list[Frame]) -> list[Frame]:
    """Frames sorted along the slice normal; projection images keep their order."""
    if any(f.orientation is None or f.position is None for f in frames):
        return frames
    first = frames[0].orientation
    if any(np.abs(f.orientation - first).max() > ORIENTATION_TOLERANCE for f in frames):
        raise PrepareError("the series mixes image orientations: a model takes one stack at a time; "
                           "send each orientation as its own series")
    normal = np.cross(first[:3], first[3:])
    return sorted(frames, key=lambda f: float(f.position @ normal))


def _decode(ds: Dataset) -> np.ndarray:
    """All frames of one instance as (frames, rows, columns[, 3]) float32 modality values."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # the decoders raise many types; the reason is what matters
        raise PrepareError(f"instance {ds.SOPInstanceUID}: cannot decode its pixel data "
                           f"({ds.file_meta.TransferSyntaxUID.name}): {exc}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    if frames == 1:
        pixels = pixels[None]
    if colour:
        return pixels.astype(np.float32)  # pydicom has already turned YBR into RGB
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # bright means low: turn it the usual way round
        low = values.min(axis=(1, 2), keepdims=True)
        high = values.max(axis=(1, 2), keepdims=True)
        values = high + low - values
    return values


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None and "SharedFunctionalGroupsSequence" in ds:
        measures = ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        spacing = measures[0].get("PixelSpacing") if measures else None
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def _slice_spacing(frames: list[Frame]) -> float | None:
    if len(frames) < 2 or frames[0].orientation is None or frames[0].position is None:
        return None
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    steps = np.diff([float(f.position @ normal) for f in frames])
    return float(np.median(steps))


def check_accepted(series: Series, spec: InputSpec) -> None:
    """The model's manifest says which images it takes; anything else is refused by name."""
    for ds in series.datasets:
        if spec.sop_classes and ds.SOPClassUID not in spec.sop_classes:
            raise PrepareError(f"instance {ds.SOPInstanceUID} is {ds.SOPClassUID.name}, which the model "
                               "does not take (input.sop_classes); narrow the rule's sop_class to match")
        if ds.PhotometricInterpretation not in spec.photometric:
            raise PrepareError(f"instance {ds.SOPInstanceUID} is {ds.PhotometricInterpretation}; the model "
                               f"takes {', '.join(spec.photometric)}")


def model_input(series: Series, spec: InputSpec) -> np.ndarray:
    """The series as the model wants it: channel, size, intensity and layout from its manifest."""
    check_accepted(series, spec)
    pixels = series.pixels
    if pixels.ndim == 4:
        if spec.channel_select:
            pixels = pixels[..., CHANNELS[spec.channel_select]]
        elif spec.channels != 3:
            raise PrepareError(f"the images are colour but the model takes {spec.channels} channel(s) "
                               "and its manifest selects none")
    elif spec.channels == 3:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    rows, columns = spec.size[-2:]
    return to_layout(normalise(resize(pixels, rows, columns), spec.normalisation), spec)


def resize(images: np.ndarray, rows: int, columns: int, order: int = 1) -> np.ndarray:
    """(N, H, W[, C]) to (N, rows, columns[, C]), pixel areas aligned (linear by default)."""
    from scipy.ndimage import zoom

    if images.shape[1:3] == (rows, columns):
        return images
    factors = (1, rows / images.shape[1], columns / images.shape[2]) + (1,) * (images.ndim - 3)
    return zoom(images, factors, order=order, mode="nearest", grid_mode=True)


def labels_on_source_grid(probabilities: np.ndarray, layout: str, rows: int, columns: int) -> np.ndarray:
    """Class probabilities (N, h, w, C) or (N, C, h, w) to a label map (N, rows, columns) of the source.

    The probabilities are resampled before the argmax, so edges are not blocky.
    """
    if layout == "NCHW":
        probabilities = probabilities.transpose(0, 2, 3, 1)
    return resize(probabilities, rows, columns).argmax(axis=-1).astype(np.uint8)
