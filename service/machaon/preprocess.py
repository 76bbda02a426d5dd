"""From a series' DICOM files to model input, and from model output back to the source grid.

Frames are ordered by their position along the slice normal (Image Position and
Orientation), never by file name or Instance Number. Pixels are decoded once
(compressed transfer syntaxes through the pylibjpeg plugins), rescaled to
modality values, MONOCHROME1 inverted, and stacked into one float32 array; every
later step is a whole-array numpy or scipy operation, with no Python loop over pixels.
Anything that cannot be prepared raises PrepareError with a reason an operator
can act on; the job fails with it and other studies carry on.

Real series are untidy. An image sent twice under two SOP Instance UIDs (a
re-send, or the same image in two encodings) lies at the same position and
time as its copy: the newest received is kept and the others are named in
Series.dropped, for the job's event. A model that measures one stack
(input.stack in its manifest) gets only a whole one: see check_complete.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from .manifest import InputSpec, Normalisation, StackSpec

ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation
POSITION_DECIMALS = 2  # positions that agree to 0.01 mm are one position
CHANNELS = {"red": 0, "green": 1, "blue": 2}
# What tells apart images at one position: time (cine), acquisition, echo, b-value, image type.
# Two images at one position that agree on all of these are copies of one image.
TEMPORAL = ("TemporalPositionIdentifier", "TemporalPositionIndex", "TriggerTime",
            "NominalCardiacTriggerDelayTime")
# Times matter too: T1 mapping (inversion times) and real-time series without trigger times. A
# re-send or a re-encoding carries all of these over unchanged.
DISTINCT = (*TEMPORAL, "AcquisitionNumber", "FrameAcquisitionNumber", "EchoTime", "EffectiveEchoTime",
            "InversionTime", "DiffusionBValue", "ImageType", "FrameType", "AcquisitionDateTime",
            "AcquisitionTime", "InstanceNumber")
RUNS_AGAIN = "it runs again by itself when more images arrive"


class PrepareError(Exception):
    """A series that cannot be made into model input; the message says why."""


class SpoolUnreadable(PrepareError):
    """A file that cannot be read from the spool now (removed, unmounted storage, an I/O error):
    it may be back soon, so the job is tried again."""


class IncompleteSeries(PrepareError):
    """A stack with images missing, most likely still on their way: the study is reopened, and its
    jobs planned again, when they arrive."""


@dataclass
class Frame:
    dataset: Dataset
    number: int | None  # 1-based frame number in a multi-frame object; None for a single-frame image
    position: np.ndarray | None  # Image Position (Patient); None for projection images
    orientation: np.ndarray | None  # row and column direction cosines (6,)
    distinct: tuple[str | None, ...]  # the frame's values of DISTINCT

    @property
    def label(self) -> str:
        uid = self.dataset.SOPInstanceUID
        return f"frame {self.number} of instance {uid}" if self.number else f"instance {uid}"

    @property
    def at(self) -> tuple[float, ...] | None:
        """The position, rounded so that copies of one image compare equal."""
        return None if self.position is None else tuple(np.round(self.position, POSITION_DECIMALS))

    @property
    def along(self) -> float | None:
        """mm along the slice normal (what viewers show as slice location)."""
        if self.position is None or self.orientation is None:
            return None
        return float(self.position @ np.cross(self.orientation[:3], self.orientation[3:]))


@dataclass
class Series:
    """A series' frames in geometric order, with their pixels as one array."""

    frames: list[Frame]
    pixels: np.ndarray  # (N, rows, columns) or (N, rows, columns, 3), float32, modality values
    pixel_spacing: tuple[float, float] | None  # mm between rows, between columns
    slice_spacing: float | None  # mm between consecutive frames along the normal; None unless one stack
    dropped: list[str] = field(default_factory=list)  # older copies left out, one note each, for the event

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


def read_series(paths: list[Path], duplicates: Literal["newest", "fail"] = "newest") -> Series:
    """Read, check, order and decode the instances of one series.

    `paths` come in the order the instances were received, oldest first. Copies of one image
    (the same position and time in two instances) are refused with duplicates="fail"; with
    "newest", the newest copy is kept and each older one is named in Series.dropped.
    """
    if not paths:
        raise PrepareError("the series has no instances")
    datasets = [_read(path) for path in paths]
    for ds in datasets:
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise PrepareError(f"instance {ds.SOPInstanceUID} has no pixel data "
                               f"(SOP class {ds.SOPClassUID.name}): this model needs images")
    frames, copies = _newest_copies([frame for ds in datasets for frame in _frames(ds)])
    if copies and duplicates == "fail":
        raise PrepareError("the series holds copies of the same image (the same position and time): "
                           + "; ".join(f"{older} and {newer} ({where})" for older, newer, where in copies)
                           + "; have the sender remove one, or let the newest copy be kept")
    frames = _order(frames)
    kept = list({id(f.dataset): f.dataset for f in frames}.values())
    decoded = {id(ds): _decode(ds) for ds in kept}
    if len({d.shape[1:] for d in decoded.values()}) != 1:
        raise PrepareError("the series' images differ in size: send one size per series")
    pixels = np.stack([decoded[id(f.dataset)][(f.number or 1) - 1] for f in frames])
    dropped = [f"kept {newer}, dropped its older copy {older} ({where})" for older, newer, where in copies]
    return Series(frames, pixels, _pixel_spacing(kept[0]), _slice_spacing(frames), dropped)


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise PrepareError(f"{path} in the spool is not a readable DICOM file ({exc}): send the "
                           "image again, then retry the job") from None
    except OSError as exc:
        raise SpoolUnreadable(f"cannot read {path} from the spool: {exc.strerror or exc}; "
                              "was it removed, or its storage unmounted?") from None


def _frames(ds: Dataset) -> list[Frame]:
    count = _frame_count(ds)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        position = _vector(ds, "ImagePositionPatient", ds.get("ImagePositionPatient"), 3)
        orientation = _vector(ds, "ImageOrientationPatient", ds.get("ImageOrientationPatient"), 6)
        distinct = tuple(_value(ds, keyword) for keyword in DISTINCT)
        return [Frame(ds, (i + 1) if count > 1 else None, position, orientation, distinct)
                for i in range(count)]
    described = len(ds.PerFrameFunctionalGroupsSequence)
    if described != count:
        raise PrepareError(f"instance {ds.SOPInstanceUID} has {count} frame(s) (NumberOfFrames) but its "
                           f"Per-frame Functional Groups Sequence describes {described}; the sender must "
                           "correct it")
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []
    for i, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = _from_groups(groups, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _from_groups(groups, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        position = _vector(ds, "ImagePositionPatient", position, 3)
        orientation = _vector(ds, "ImageOrientationPatient", orientation, 6)
        distinct = tuple(_value(ds, keyword, groups, shared) for keyword in DISTINCT)
        frames.append(Frame(ds, i + 1, position, orientation, distinct))
    return frames


def _frame_count(ds: Dataset) -> int:
    """Number of Frames. Where a sender wrote text that is no number ('1A'), what the uncompressed
    pixel data holds, set on the dataset in memory so that decoding finds it too."""
    value = ds.get("NumberOfFrames")
    try:
        return int(value or 1)
    except ValueError:
        pass
    frame_bytes = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated // 8
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_encapsulated or not frame_bytes:
        raise PrepareError(f"instance {ds.SOPInstanceUID}: NumberOfFrames is '{value}', not a number; "
                           "the sender must correct it")
    count = len(ds.PixelData) // frame_bytes
    ds.NumberOfFrames = count
    return count


def _value(ds: Dataset, keyword: str, *groups: Dataset) -> str | None:
    """A frame's value of `keyword`: in its functional groups (any group's first item; converted
    legacy images keep such values in the Unassigned ... Converted Attributes), else at the top."""
    for source in groups:
        for element in source:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return str(element.value[0][keyword].value)
    return str(ds[keyword].value) if keyword in ds else None


def _from_groups(groups: Dataset, shared: Dataset, sequence: str, attribute: str):
    for source in (groups, shared):
        if sequence in source and attribute in source[sequence].value[0]:
            return source[sequence].value[0][attribute].value
    return None


def _vector(ds: Dataset, keyword: str, value, size: int) -> np.ndarray | None:
    """`size` numbers, None where the value is absent or empty; text where numbers belong is refused."""
    if value is None or not len(value):
        return None
    try:
        numbers = np.array([float(v) for v in value])
    except ValueError:
        numbers = np.array([])
    if numbers.shape != (size,) or not np.isfinite(numbers).all():
        shown = value if isinstance(value, str) else "\\".join(str(v) for v in value)  # as DICOM writes it
        raise PrepareError(f"instance {ds.SOPInstanceUID}: {keyword} is '{shown}', not {size} numbers; "
                           "the sender must correct it")
    return numbers


def _newest_copies(frames: list[Frame]) -> tuple[list[Frame], list[tuple[str, str, str]]]:
    """The frames less older copies of one image, and the copies left out as (older instance,
    newest instance, where). Frames come oldest received first; projection images are never copies."""
    images: dict[tuple, list[Frame]] = defaultdict(list)
    for i, frame in enumerate(frames):
        images[(frame.at, frame.distinct) if frame.at is not None else (i,)].append(frame)
    kept, older = [], defaultdict(list)
    for image in images.values():
        newest = image[-1].dataset
        kept += [f for f in image if f.dataset is newest]
        for frame in image:
            if frame.dataset is not newest:
                older[frame.dataset.SOPInstanceUID, newest.SOPInstanceUID].append(frame)
    return kept, [(old, new, _where(left)) for (old, new), left in older.items()]


def _where(frames: list[Frame]) -> str:
    """Where these frames lie, in mm along the slice normal (or as patient coordinates)."""
    def one(frame: Frame) -> str:
        if frame.along is not None:
            return f"{frame.along:.1f} mm along the slice normal"
        assert frame.position is not None  # copies are found by position: each has one
        return "(" + ", ".join(f"{v:.1f}" for v in frame.position) + ") mm"
    if len(frames) == 1:
        return f"at {one(frames[0])}"
    return f"{len(frames)} frames, from {one(frames[0])} to {one(frames[-1])}"


def _order(frames: list[Frame]) -> list[Frame]:
    """Frames sorted along the slice normal; projection images keep their order."""
    orientations = [f.orientation for f in frames if f.orientation is not None]
    positions = [f.position for f in frames if f.position is not None]
    if len(orientations) < len(frames) or len(positions) < len(frames):
        return frames
    first = orientations[0]
    if any(np.abs(orientation - first).max() > ORIENTATION_TOLERANCE for orientation in orientations):
        raise PrepareError("the series mixes image orientations: a model takes one stack at a time; "
                           "send each orientation as its own series")
    normal = np.cross(first[:3], first[3:])
    along = [float(position @ normal) for position in positions]
    return [frame for _, frame in sorted(zip(along, frames, strict=True), key=lambda pair: pair[0])]


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
    if spacing is None and "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        spacing = _from_groups(ds.PerFrameFunctionalGroupsSequence[0], shared, "PixelMeasuresSequence",
                               "PixelSpacing")
    values = _vector(ds, "PixelSpacing", spacing, 2)
    if values is None or values.min() <= 0:  # 0\0, as some CR writers put it: unknown
        return None
    return float(values[0]), float(values[1])


def _slice_spacing(frames: list[Frame]) -> float | None:
    """The usual step between slices; None where the frames are no single stack (no geometry, or
    several images at one position)."""
    along = [f.along for f in frames if f.along is not None]
    if len(frames) < 2 or len(along) < len(frames):
        return None
    steps = np.diff(along)
    if np.abs(steps).min() < 10 ** -POSITION_DECIMALS:
        return None
    return float(np.median(steps))


def require_geometry(series: Series) -> None:
    """Several frames make one stack only where each is placed in space; name the frame and what it lacks."""
    for frame in series.frames:
        missing = _missing_geometry(frame)
        if missing:
            raise PrepareError(f"{frame.label} has no {missing}: without it the series' {len(series.frames)} "
                               "frames cannot be placed in space as one stack; have the scanner or sender "
                               "include it, or send single images")


def _missing_geometry(frame: Frame) -> str | None:
    """What places the frame in space and is not there, named as the standard names it."""
    ds = frame.dataset
    if frame.number:  # a multi-frame image keeps its geometry in functional groups
        groups = ("in its per-frame or shared functional groups" if "PerFrameFunctionalGroupsSequence" in ds
                  else "(the instance has no functional groups at all)")
        position = f"Plane Position (PlanePositionSequence > ImagePositionPatient) {groups}"
        orientation = f"Plane Orientation (PlaneOrientationSequence > ImageOrientationPatient) {groups}"
    else:
        position = "Image Position (Patient) (0020,0032)"
        orientation = "Image Orientation (Patient) (0020,0037)"
    if frame.position is None:
        return position
    if frame.orientation is None:
        return orientation
    if not ds.get("FrameOfReferenceUID"):
        return "Frame of Reference UID (0020,0052)"
    return None


def check_accepted(series: Series, spec: InputSpec) -> None:
    """The model's manifest says which images it takes; anything else is refused by name."""
    for ds in series.datasets:
        if spec.sop_classes and ds.SOPClassUID not in spec.sop_classes:
            raise PrepareError(f"instance {ds.SOPInstanceUID} is {ds.SOPClassUID.name}, which the model "
                               "does not take (input.sop_classes); narrow the rule's sop_class to match")
        if ds.PhotometricInterpretation not in spec.photometric:
            raise PrepareError(f"instance {ds.SOPInstanceUID} is {ds.PhotometricInterpretation}; the model "
                               f"takes {', '.join(spec.photometric)}")


def check_complete(series: Series, spec: InputSpec) -> None:
    """A model that measures one stack (input.stack) gets a whole one. IncompleteSeries where images
    seem to be missing, PrepareError where the series can never be such a stack."""
    if spec.stack is None:
        return
    require_geometry(series)
    if series.pixel_spacing is None:
        raise PrepareError(f"instance {series.datasets[0].SOPInstanceUID} has no Pixel Spacing (0028,0030) "
                           "(nor PixelMeasuresSequence > PixelSpacing): the model measures in mm")
    _one_time_point(series)
    along = np.array([f.along for f in series.frames])
    short = _expected_images(series)
    try:
        found = [_gaps(along, spec.stack), short]
    except PrepareError:
        if not short:
            raise
        found = [short]  # with images still announced, uneven or wide spacing may be those images
    reasons = [r for r in found if r]
    slices = f"{len(along)} slice{'s' if len(along) > 1 else ''}"
    too_few = len(along) < spec.stack.min_slices
    if too_few and not reasons:  # whole as far as anyone can tell: more will not come by themselves
        raise PrepareError(f"{slices}, fewer than the {spec.stack.min_slices} the model needs to measure "
                           "a volume (input.stack.min_slices); send the whole stack as one series")
    if too_few:
        reasons.insert(0, f"fewer than the {spec.stack.min_slices} the model needs (input.stack.min_slices)")
    if reasons:
        raise IncompleteSeries(f"series incomplete: {slices}, " + "; ".join(reasons) + f"; {RUNS_AGAIN}")


def _one_time_point(series: Series) -> None:
    """A time series (or repeated acquisitions) has several images at each position: not one stack."""
    by_position = defaultdict(list)
    for frame in series.frames:
        by_position[frame.at].append(frame)
    most = max(by_position.values(), key=len)
    if len(most) == 1:
        return
    differ = [k for i, k in enumerate(DISTINCT) if len({f.distinct[i] for f in most}) > 1]
    what = "time points" if set(differ) & set(TEMPORAL) else "images"
    raise PrepareError(f"the series holds {len(most)} {what} per position at {len(by_position)} positions "
                       f"(they differ in {', '.join(differ) or 'nothing the headers show'}); the model "
                       "measures one stack at one time point: send one time point (e.g. end-diastole) "
                       "as a series of its own")


def _gaps(along: np.ndarray, stack: StackSpec) -> str | None:
    """The missing slices: steps longer than usual (or than input.stack.max_gap). Raises PrepareError
    where a step is shorter than usual (the series mixes stacks) or the usual one is over max_gap."""
    if len(along) < 2:
        return None
    steps = np.diff(along)
    usual = float(np.median(steps))
    others = f"{usual:.1f} mm elsewhere"
    narrow = np.flatnonzero(steps < usual * (1 - stack.spacing_tolerance))
    if narrow.size:
        i = narrow[0]
        raise PrepareError(f"slices are unevenly spaced: {steps[i]:.1f} mm between slices {i + 1} and "
                           f"{i + 2}, {others} (input.stack.spacing_tolerance): the series mixes stacks; "
                           "send one evenly spaced stack per series")
    if stack.max_gap and usual > stack.max_gap:
        raise PrepareError(f"slices are {usual:.1f} mm apart; the model measures stacks with at most "
                           f"{stack.max_gap:.1f} mm between slices (input.stack.max_gap)")
    limit = min(usual * (1 + stack.spacing_tolerance), stack.max_gap or np.inf)
    wide = np.flatnonzero(steps > limit)
    if not wide.size:
        return None
    each = [f"{steps[i]:.1f} mm between slices {i + 1} and {i + 2} (at {along[i]:.1f} to {along[i + 1]:.1f} "
            "mm along the slice normal)" for i in wide]
    return ("a gap of " if len(each) == 1 else "gaps of ") + " and of ".join(each) + f", {others}"


def _expected_images(series: Series) -> str | None:
    """What the headers announce, where that is sound: ImagesInAcquisition of single-frame images,
    per acquisition (a series may hold several). Multi-frame images count frames their own way, and
    cine counts (NumberOfTemporalPositions, CardiacNumberOfImages) do not apply to one time point."""
    acquisitions = defaultdict(list)
    for ds in series.datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) == 1:
            acquisitions[ds.get("AcquisitionNumber")].append(ds)
    short = []
    for number, images in acquisitions.items():
        announced = {_count(ds, "ImagesInAcquisition") for ds in images}
        expected = announced.pop() if len(announced) == 1 else 0  # disagreeing: not sound
        if expected > len(images):
            which = f" in acquisition {number}" if len(acquisitions) > 1 else ""
            short.append(f"{len(images)} of {expected} images expected{which} (ImagesInAcquisition)")
    return "; ".join(short) or None


def _count(ds: Dataset, keyword: str) -> int:
    """A count from the header; 0 where it is absent, or text that is no number (not sound)."""
    try:
        return int(ds.get(keyword) or 0)
    except (ValueError, TypeError):
        return 0


def normalise(pixels: np.ndarray, spec: Normalisation) -> np.ndarray:
    """Model input from rescaled pixel values (N, H, W[, C]); per image where statistics are needed."""
    x = pixels.astype(np.float32, copy=False)
    axes = tuple(range(1, x.ndim))
    if spec.method == "window":
        center, width = spec.center, spec.width
        assert center is not None and width is not None  # Normalisation's validator requires them
        low = center - width / 2
        return np.clip((x - low) / width, 0.0, 1.0)
    if spec.method == "zscore":
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return (x - mean) / np.maximum(std, 1e-6)
    if spec.method == "minmax":
        low, high = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
        return (x - low) / np.maximum(high - low, 1e-6)
    assert spec.factor is not None  # Normalisation's validator requires it for "scale"
    return x * spec.factor + spec.offset


def to_layout(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) float32 images to the model's input tensor."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] != spec.channels:
        images = np.repeat(images, spec.channels, axis=-1) if images.shape[-1] == 1 else images
    if spec.layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images, dtype=np.float32)


def model_input(series: Series, spec: InputSpec) -> np.ndarray:
    """The series as the model wants it: channel, size, intensity and layout from its manifest."""
    check_accepted(series, spec)
    check_complete(series, spec)
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
