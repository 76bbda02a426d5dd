"""Model output as DICOM: Segmentation and TID 1500 Comprehensive 3D SR objects (highdicom).

Each result goes into the source study as a new series. Its UIDs are derived
from what produced it: the source series, the exact instances, the model's
name and version, and the kind of result. A retry therefore re-creates the same
objects, and the PACS keeps one copy of each; new images or a new model version
give new UIDs: results are idempotent.

Every object names machaon and the model (Manufacturer, Software Versions,
Algorithm Identification) and says it is an AI result, not for clinical use.
A model that finds nothing still gives a valid result that says so: empty SEG
frames, and an SR that reports the segment Absent (and a volume of 0 ml).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from . import __version__
from .manifest import NOT_CLINICAL, Code, Manifest, Segment
from .preprocess import Frame, Series, labels_on_source_grid, require_geometry

MANUFACTURER = "machaon"
AI_RESULT = f"AI result, {NOT_CLINICAL}"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9801, 9802  # out of the way of scanner-assigned numbers
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
PROBABILITY = hd.sr.CodedConcept("PROB", "99MACHAON", "Model output probability")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
# Type 2 in SEG and SR: present, though possibly empty. highdicom 0.28.2 copies each from the
# first source image and fails where the source left one out (a Type 2 there too, but senders do).
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                     "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# How highdicom reads values of these VRs from a source; text that is no such value makes it fail.
READERS = {"DA": DA, "TM": TM, "DT": DT, "DS": float, "IS": int}


Result = tuple[str, Dataset]  # (kind: "seg", "sr", ..., the object)


class ResultError(Exception):
    """A model whose output machaon cannot write as DICOM; the message says why."""


def results_for(series: Series, outputs: np.ndarray, manifest: Manifest) -> list[Result]:
    """The (kind, object) pairs one model's output on one series becomes, by the model's task."""
    write = RESULTS_BY_TASK.get(manifest.task)
    if write is None:
        raise ResultError(f"model {manifest.name}: results of {manifest.task} models are not written yet")
    return write(series, outputs, manifest)


def _segmentation_results(series: Series, outputs: np.ndarray, manifest: Manifest) -> list[Result]:
    """A SEG of the labels on the source grid, and an SR of what they measure."""
    rows, columns = series.pixels.shape[1:3]
    layout = manifest.output.layout
    assert layout is not None  # Manifest's validator requires it of a segmentation model
    labels = labels_on_source_grid(outputs, layout, rows, columns)
    seg = segmentation(series, labels, manifest)
    return [("seg", seg), ("sr", segmentation_report(series, labels, seg, manifest))]


def _classification_results(series: Series, outputs: np.ndarray, manifest: Manifest) -> list[Result]:
    """An SR of the findings' probabilities."""
    return [("sr", classification_report(series, outputs, manifest))]


def result_uid(series: Series, manifest: Manifest, kind: str) -> str:
    """A UID that only these inputs, this model version and this kind of result produce."""
    return generate_uid(entropy_srcs=[series.datasets[0].SeriesInstanceUID, series.instances_digest,
                                      manifest.name, manifest.version, kind])


def _readable_sources(series: Series) -> None:
    """The source datasets as highdicom can copy from them: each Type 2 patient and study attribute
    present, a date, time or number that is none ('unknown', '25:99', 'eight mm') left out (emptied
    where it is one of those), and Slice Thickness given. In memory only: the received files are
    never changed."""
    for ds in series.datasets:
        unreadable = [e.keyword for e in ds if e.VR in READERS and not _readable(e)]
        for keyword in unreadable:
            delattr(ds, keyword)
        for keyword in PATIENT_AND_STUDY:
            ds.setdefault(keyword, "")
        if "ImagePositionPatient" in ds and not ds.get("SliceThickness"):
            # Type 2 in the source, but the SEG needs a value: a stack's slice spacing stands in.
            ds.SliceThickness = round(abs(series.slice_spacing), 4) if series.slice_spacing else ""


def _readable(element) -> bool:
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            if value not in ("", None):
                READERS[element.VR](value)
    except (ValueError, TypeError):
        return False
    return True


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _software(manifest: Manifest) -> list[str]:
    return [f"machaon {__version__}", f"{manifest.name} {manifest.version}"]


def _description(manifest: Manifest, kind: str) -> str:
    return f"{manifest.name} {kind} ({AI_RESULT})"[:64]


def segmentation(series: Series, labels: np.ndarray, manifest: Manifest) -> hd.seg.Segmentation:
    """A BINARY SEG with one frame per source frame and segment, empty frames included.

    Empty frames are kept because some viewers align a SEG to its source by frame
    index and shift it when they are left out; a SEG with no segmented pixel at all is valid.
    """
    if len(series.frames) > 1:  # a SEG places each frame of a stack in space
        require_geometry(series)
    _readable_sources(series)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence,
        source=MANUFACTURER)
    descriptions = [_segment_description(number, segment, algorithm)
                    for number, segment in enumerate(manifest.output.segments, start=1)]
    masks = np.stack([labels == segment.index for segment in manifest.output.segments], axis=-1)
    sources, masks = _in_source_order(series, masks)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=result_uid(series, manifest, "seg-series"),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=result_uid(series, manifest, "seg"),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=manifest.name,
        # highdicom annotates software_versions as str | tuple[str] (one element) but takes any sequence.
        software_versions=_software(manifest),  # type: ignore[arg-type]
        device_serial_number="0", omit_empty_frames=False,
        content_label="MACHAON_AI", content_description=AI_RESULT,
        series_description=_description(manifest, "SEG"))
    if "FrameOfReferenceUID" not in seg:  # of a projection image: Patient Orientation is Type 2C then,
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")  # and highdicom leaves it out
    return seg


def _segment_description(number: int, segment: Segment, algorithm) -> hd.seg.SegmentDescription:
    # A recommended display colour: without one, viewers warn or pick their own.
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment.label,
        segmented_property_category=_coded(segment.category), segmented_property_type=_coded(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*segment.colour))


def _in_source_order(series: Series, masks: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """One mask per source image, or per frame of one multi-frame image, in the source's own order."""
    datasets = series.datasets
    if len(datasets) == len(series.frames):
        return [frame.dataset for frame in series.frames], masks
    if len(datasets) == 1:
        ordered = np.zeros_like(masks)
        for i, frame in enumerate(series.frames):
            ordered[(frame.number or 1) - 1] = masks[i]
        return datasets, ordered
    raise ValueError("a series of several multi-frame instances cannot be segmented as one stack")


def segmentation_report(series: Series, labels: np.ndarray, seg: hd.seg.Segmentation,
                        manifest: Manifest) -> hd.sr.Comprehensive3DSR:
    """TID 1500 measurements of each segment: its area on each slice (mm²) and, for a stack,
    its volume (ml), from Pixel Spacing and the spacing of the slices along their normal.
    A segment found nowhere, or found where nothing can be measured in mm, is reported Absent
    or Present; the SR is never empty."""
    groups = []
    frames = _seg_frames(seg)
    pixel_mm2 = series.pixel_spacing[0] * series.pixel_spacing[1] if series.pixel_spacing else None
    for number, segment in enumerate(manifest.output.segments, start=1):
        mask = labels == segment.index
        if not mask.any() or pixel_mm2 is None:
            groups.append(_presence(series, manifest, segment, found=bool(mask.any())))
        if pixel_mm2 is None:  # without geometry there is nothing to measure in mm
            continue
        for i, frame in enumerate(series.frames):
            if mask[i].any():
                seg_frame = frames[number, frame.dataset.SOPInstanceUID, frame.number]
                groups.append(_area(series, manifest, seg, segment, number, i, frame, seg_frame,
                                    float(mask[i].sum()) * pixel_mm2))
        if series.slice_spacing:
            volume_ml = float(mask.sum()) * pixel_mm2 * abs(series.slice_spacing) / 1000.0
            groups.append(_volume(series, manifest, seg, segment, number, volume_ml))
    report = _report(series, manifest, groups, evidence=[*series.datasets, seg])
    _frame_references_only(report)
    return report


def _presence(series: Series, manifest: Manifest, segment: Segment, found: bool):
    """TID 1501: whether the model found the segment anywhere in the series."""
    tracking = hd.sr.TrackingIdentifier(uid=result_uid(series, manifest, f"found-{segment.index}"),
                                        identifier=f"{segment.label} {'found' if found else 'not found'}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=_coded(segment.type), algorithm_id=_algorithm(manifest),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=_coded(segment.type), value=codes.SCT.Present if found else codes.SCT.Absent)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in series.datasets])


def _area(series: Series, manifest: Manifest, seg: Dataset, segment: Segment, number: int, index: int,
          frame: Frame, seg_frame: int, area_mm2: float):
    ds = frame.dataset
    frames = [frame.number] if frame.number else None
    source = hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID,
                                              referenced_frame_numbers=frames)
    tracking = hd.sr.TrackingIdentifier(uid=result_uid(series, manifest, f"area-{number}-{index}"),
                                        identifier=f"{segment.label} slice {index + 1}")
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, frame_number=seg_frame,
            segment_number=number, source_image=source),
        finding_type=_coded(segment.type),
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=round(area_mm2, 2),
                                        unit=codes.UCUM.SquareMillimeter, algorithm_id=_algorithm(manifest))])


def _volume(series: Series, manifest: Manifest, seg: Dataset, segment: Segment, number: int,
            volume_ml: float):
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(series, manifest, f"volume-{number}"),
                                                     identifier=f"{segment.label} volume"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series.datasets[0].SeriesInstanceUID)),
        finding_type=_coded(segment.type),
        measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=round(volume_ml, 2), unit=MILLILITRE,
                                        algorithm_id=_algorithm(manifest))])


def _seg_frames(seg: hd.seg.Segmentation) -> dict[tuple[int, str, int | None], int]:
    """(segment number, source SOP Instance UID, source frame number) -> the SEG's frame number."""
    frames = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for number, groups in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # With one segment, highdicom puts its identification in the shared groups.
        identification = groups.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        source = groups.DerivationImageSequence[0].SourceImageSequence[0]
        source_frame = source.get("ReferencedFrameNumber")
        key = (identification[0].ReferencedSegmentNumber, source.ReferencedSOPInstanceUID,
               int(source_frame) if source_frame else None)
        frames[key] = number
    return frames


def _frame_references_only(item: Dataset) -> None:
    """A reference to a SEG frame names the frame, and the segment follows from it; the SR IOD
    forbids Referenced Segment Number beside Referenced Frame Number, which highdicom writes."""
    for reference in item.get("ReferencedSOPSequence", []):
        if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
            del reference.ReferencedSegmentNumber
    for child in item.get("ContentSequence", []):
        _frame_references_only(child)


def classification_report(series: Series, probabilities: np.ndarray,
                          manifest: Manifest) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one group per finding: its coded concept, the probability as a measurement
    and whether it reached the manifest's threshold. Several images are summarised by the
    highest probability (a finding seen on any image of the series)."""
    per_finding = probabilities.max(axis=0)
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in series.datasets]
    groups = []
    for finding in manifest.output.findings:
        probability = float(per_finding[finding.index])
        present = probability >= finding.threshold
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid(series, manifest, f"finding-{finding.index}"), identifier=finding.label),
            finding_type=_coded(finding.concept), algorithm_id=_algorithm(manifest),
            measurements=[hd.sr.Measurement(name=PROBABILITY, value=round(probability, 4), unit=UNITY,
                                            algorithm_id=_algorithm(manifest))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_coded(finding.concept), value=codes.SCT.Present if present else codes.SCT.Absent)],
            source_images=sources))
    return _report(series, manifest, groups, evidence=series.datasets)


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version)


def _report(series: Series, manifest: Manifest, groups: list,
            evidence: list[Dataset]) -> hd.sr.Comprehensive3DSR:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["machaon device", manifest.name, manifest.version]),
            name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=f"{manifest.name} {manifest.version}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE, imaging_measurements=groups)
    _readable_sources(series)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=result_uid(series, manifest, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(series, manifest, "sr"),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=_description(manifest, "SR"), software_versions=_software(manifest),
        manufacturer_model_name=manifest.name)


# One function per task; a new kind of result is one more entry.
RESULTS_BY_TASK = {"segmentation": _segmentation_results, "classification": _classification_results}
