"""machaon: receives DICOM studies, runs AI models on them, sends results to the PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("machaon")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
