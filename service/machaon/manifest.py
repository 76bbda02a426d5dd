"""Model packages: an ONNX file and the manifest that says what it is for.

A package is a folder with `model.onnx` (plus optional `model.fp16.onnx`,
`model.int8.onnx`) and `manifest.toml`. The manifest says which images the model
accepts and how to prepare them, what its outputs mean as coded concepts, and
where it came from. Adding a model never changes service code: models are data.
A model that measures a series as one stack (a volume) says so in an optional
[input.stack] table, and gets only whole stacks (see StackSpec); packages built
before that table existed still load, and take series as they come.

The source manifest in models/<name>/ has the same fields plus [source] (how to
build it); the build adds [provenance], [evaluation] and [[variants]].
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST = "manifest.toml"
PRECISIONS = ("fp32", "fp16", "int8")
NOT_CLINICAL = "not for clinical use"


class PackageError(Exception):
    """A model package that cannot be used; the message names the package and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_uid(value: str) -> str:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) or len(value) > 64:
        raise ValueError("a UID is digits and dots, at most 64 characters")
    return value


UID = Annotated[str, AfterValidator(_check_uid)]
Channel = Annotated[int, Field(ge=0, le=255)]


class Code(_Strict):
    """A coded concept as DICOM writes it: (value, coding scheme, meaning)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16, description="SCT, DCM, or a private 99XXX scheme")
    meaning: str = Field(min_length=1, max_length=64)


class Normalisation(_Strict):
    """How stored pixel values (after modality rescale) become model input."""

    method: Literal["window", "zscore", "minmax", "scale"]
    center: float | None = None  # window
    width: float | None = Field(None, gt=0)  # window
    factor: float | None = None  # scale: x * factor + offset
    offset: float = 0.0

    @model_validator(mode="after")
    def _needs(self):
        needed = {"window": ("center", "width"), "scale": ("factor",)}.get(self.method, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"method {self.method!r} needs {' and '.join(missing)}")
        return self


class StackSpec(_Strict):
    """[input.stack]: the model measures the series as one stack (a volume in its SR), so the
    stack must be whole before results go out. A series that is not is refused before inference:
    one image per position (not a time series), every frame placed in space, at least
    `min_slices` slices, neighbouring slices evenly spaced (each step within `spacing_tolerance`
    of the usual one; a longer step is a missing slice) and at most `max_gap` mm apart, and as
    many images as the headers announce (ImagesInAcquisition)."""

    min_slices: int = Field(2, ge=2)
    spacing_tolerance: float = Field(0.1, gt=0, lt=1)  # a fraction of the usual (median) step
    max_gap: float | None = Field(None, gt=0)  # mm between neighbouring slices; None: no limit


class InputSpec(_Strict):
    modalities: list[str] = Field(min_length=1)
    sop_classes: list[UID] = []  # empty: any image SOP class of those modalities
    photometric: list[Literal["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                              "PALETTE COLOR"]] = Field(min_length=1)
    kind: Literal["slice", "volume"]  # 2D images one by one, or the whole series as a volume
    size: list[Annotated[int, Field(ge=1)]] = Field(min_length=2, max_length=3)  # [rows, columns]
    channels: int = Field(ge=1)
    layout: Literal["NHWC", "NCHW"]
    channel_select: Literal["red", "green", "blue"] | None = None  # one colour channel of an RGB image
    normalisation: Normalisation
    stack: StackSpec | None = None  # absent: images are taken as they come, whole or not

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.size) != (3 if self.kind == "volume" else 2):
            raise ValueError("size is [rows, columns] for a slice model, "
                             "[slices, rows, columns] for a volume")
        if self.channel_select and self.channels != 1:
            raise ValueError("channel_select feeds one channel: channels must be 1")
        if self.channel_select and all(p.startswith("MONOCHROME") for p in self.photometric):
            raise ValueError("channel_select picks a colour channel, but photometric lists only monochrome")
        return self

    def shape(self, batch: int) -> tuple[int, ...]:
        """The model's input tensor shape for this many images."""
        rows, columns = self.size[-2:]
        if self.layout == "NHWC":
            return (batch, rows, columns, self.channels)
        return (batch, self.channels, rows, columns)


class Segment(_Strict):
    label: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=1, description="the class index in the model output; 0 is background")
    category: Code
    type: Code
    colour: list[Channel] = Field(min_length=3, max_length=3)  # RGB, shown by viewers


class Finding(_Strict):
    label: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0, description="the position in the model output")
    concept: Code
    threshold: float = Field(0.5, gt=0, lt=1)


class Point(_Strict):
    label: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0)
    concept: Code


class OutputSpec(_Strict):
    activation: Literal["softmax", "sigmoid", "none"]  # what the model already applies
    layout: Literal["NHWC", "NCHW"] | None = None  # of a segmentation map
    segments: list[Segment] = []
    findings: list[Finding] = []
    points: list[Point] = []


class Source(_Strict):
    """How the build gets the source model (source manifests only)."""

    framework: Literal["keras", "mxnet"]
    file: str | None = None  # committed model: .h5/.keras, or the MXNet prefix (<prefix>-symbol.json)
    recipe: str | None = None  # a script that writes `file` (random-weight models)
    train: str | None = None  # the script that trained `file`, for the record
    parity_tolerance: float = Field(1e-4, gt=0)
    data: Literal["phantom-sax", "phantom-views", "random"] = "random"  # parity and calibration inputs
    variants: list[Literal["fp16", "int8"]] = []
    opset: int = Field(17, ge=11)  # for tf2onnx; mx.onnx chooses its own

    @model_validator(mode="after")
    def _has_model(self):
        if not self.file:
            raise ValueError("name the source model in file (and the script that makes it in recipe, if any)")
        return self


class Provenance(_Strict):
    source_framework: str
    source_framework_version: str
    converter: str
    converter_version: str
    opset: int
    parity_max_abs_diff: float
    parity_tolerance: float
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of model.onnx
    built: str
    source_file: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the .h5/.keras, or the -symbol.json


class Evaluation(_Strict):
    data: str  # what it was measured on
    metric: str
    value: float
    samples: int
    seed: int | None = None
    epochs: int | None = None


class Variant(_Strict):
    precision: Literal["fp16", "int8"]
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_abs_diff: float  # largest output difference from fp32 on the build's evaluation inputs
    metric: str  # how its decisions compare with fp32's: dice or label agreement
    value: float


class Manifest(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    task: Literal["segmentation", "classification", "landmarks"]
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    demo: Literal["phantom", "random-weights"] | None = None
    input: InputSpec
    output: OutputSpec
    source: Source | None = None
    provenance: Provenance | None = None
    evaluation: Evaluation | None = None
    variants: list[Variant] = []

    @model_validator(mode="after")
    def _consistent(self):
        if self.demo and NOT_CLINICAL not in self.intended_use.lower():
            raise ValueError(f"intended_use of a demo model must say {NOT_CLINICAL!r}")
        wanted = {"segmentation": "segments", "classification": "findings", "landmarks": "points"}[self.task]
        for field in ("segments", "findings", "points"):
            items = getattr(self.output, field)
            if field == wanted and not items:
                raise ValueError(f"a {self.task} model lists its output.{field}")
            if field != wanted and items:
                raise ValueError(f"output.{field} is not used by a {self.task} model")
            indexes = [item.index for item in items]
            if len(set(indexes)) != len(indexes):
                raise ValueError(f"output.{field}: two entries share an index")
        if self.task == "segmentation" and not self.output.layout:
            raise ValueError("output.layout (NHWC or NCHW) is needed for a segmentation map")
        return self

    def file_for(self, precision: str) -> str:
        if precision == "fp32":
            return "model.onnx"
        for variant in self.variants:
            if variant.precision == precision:
                return variant.file
        raise PackageError(f"model {self.name} has no {precision} variant: build it with "
                           f"variants = [\"{precision}\"] in its [source], or use fp32")

    def sha256_for(self, precision: str) -> str:
        if precision == "fp32":
            if self.provenance is None:
                raise PackageError(f"model {self.name} has no [provenance]: it is a source manifest, "
                                   "not a built package")
            return self.provenance.sha256
        return next(v.sha256 for v in self.variants if v.precision == precision)


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest; errors name the file and each bad field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackageError(f"{path} is missing: every model package has a {MANIFEST}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid TOML: {exc}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise PackageError(f"{path}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """One clause per problem, each naming the field: 'output.segments.0.colour: ...'."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problem = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problem = "unknown field"
        parts.append(f"{field}: {problem}")
    return "; ".join(parts)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Package:
    """A built model package, checked: its manifest is valid and its ONNX file is the one built."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = read_manifest(folder / MANIFEST)
        if self.manifest.provenance is None:
            raise PackageError(f"{folder / MANIFEST} has no [provenance]: it is a source manifest, "
                               f"not a built package; run `machaon models build {self.manifest.name}`")

    @property
    def name(self) -> str:
        return self.manifest.name

    def onnx_path(self, precision: str = "fp32") -> Path:
        """The ONNX file for `precision`, after checking it is there and its sha256 is the manifest's."""
        path = self.folder / self.manifest.file_for(precision)
        if not path.is_file():
            raise PackageError(f"model {self.name}: {path} is missing; rebuild the package "
                               f"(`machaon models build {self.name}`)")
        expected = self.manifest.sha256_for(precision)
        actual = sha256_of(path)
        if actual != expected:
            raise PackageError(f"model {self.name}: {path} has sha256 {actual[:12]}..., the manifest says "
                               f"{expected[:12]}...; the file was changed or damaged after the build: "
                               "rebuild it")
        return path


def find_packages(directory: Path) -> tuple[list[Package], list[str]]:
    """Every package under `directory`, and one error line for each folder that is not a usable one."""
    packages, errors = [], []
    # A build writes into a hidden folder (.NAME-...) and renames it into place when it is whole.
    folders = sorted(p for p in directory.iterdir()
                     if p.is_dir() and not p.name.startswith(".")) if directory.is_dir() else []
    for folder in folders:
        try:
            packages.append(Package(folder))
        except PackageError as exc:
            errors.append(str(exc))
    return packages, errors


def load_package(directory: Path, name: str) -> Package:
    folder = directory / name
    if not folder.is_dir():
        known = sorted(p.name for p in directory.iterdir()
                       if p.is_dir() and not p.name.startswith(".")) if directory.is_dir() else []
        raise PackageError(f"no model package {name!r} in {directory}"
                           + (f" (there are: {', '.join(known)})" if known else
                              "; build one with `machaon models build`"))
    return Package(folder)
