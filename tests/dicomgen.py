"""Synthetic DICOM for tests and benchmarks: CT series with real geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(study_uid: str, series_uid: str, index: int, pixels: np.ndarray,
             patient_id: str = "PHANTOM-1") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame"])
    ds.PatientName, ds.PatientID = "Phantom^Test", patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261122", "080000", "ACC1"
    ds.StudyID, ds.ReferringPhysicianName = "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
    ds.SeriesDescription = "synthetic phantom"
    ds.PatientPosition, ds.PositionReferenceIndicator = "HFS", ""
    ds.Manufacturer, ds.AcquisitionNumber = "machaon test data", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-150.0, -150.0, float(index) * 1.25]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.6, 0.6], 1.25
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def write_ct_series(folder: Path, slices: int, size: int = 512, seed: int = 0,
                    study_uid: str | None = None, series_uid: str | None = None) -> list[Path]:
    """`slices` CT images of size x size 16-bit noise-on-a-disc, one file each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2) * 1000
    paths = []
    for i in range(slices):
        pixels = disc + rng.normal(0, 20, (size, size))
        path = folder / f"ct{i:04d}.dcm"
        ct_slice(study_uid, series_uid, i, pixels).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def set_raw(ds: Dataset, keyword: str, value: str | bytes) -> None:
    """Set a value as the bytes a careless sender writes, whatever its VR says: pydicom would
    refuse to store text in an IS or DS element through its attributes."""
    tag = tag_for_keyword(keyword)
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def with_raw_values(path: Path, out: Path, **values: str | bytes) -> Path:
    """A copy of `path` at `out` with the values set as given (set_raw)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        set_raw(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out
