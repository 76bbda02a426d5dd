"""Routing rules: which models a completed series gets, and where the results go.

A rule matches a series when every condition it sets holds: Modality, SOP Class,
Series Description and Protocol Name (regular expressions, searched
case-insensitively), Body Part Examined, Image Type values, the calling AE
title, and the geometry (number of slices, in-plane size). A series that matches
no rule is recorded as such: that is not an error. `explain` says, for each
rule, why it does not match, which is what `machaon rules test` prints.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pydicom
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: list[str] = []  # any of these
    sop_class: list[str] = []  # every instance of the series in one of these
    series_description: Regex | None = None
    protocol_name: Regex | None = None
    body_part: list[str] = []  # any of these, case-insensitive
    image_type: list[str] = []  # all of these among the Image Type values
    calling_aet: list[str] = []  # any of these sent the series
    min_slices: int | None = Field(None, ge=1)
    max_slices: int | None = Field(None, ge=1)
    min_size: int | None = Field(None, ge=1)  # rows and columns at least
    max_size: int | None = Field(None, ge=1)  # rows and columns at most


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    destinations: list[str] = []
    priority: int = 0  # higher runs first
    match: Match = Match()


@dataclass
class SeriesFacts:
    """What the rules look at: a series' header facts and how it arrived. Planning builds it from
    the facts recorded at ingest (planner.series_in_store); `machaon rules test FOLDER` from files."""

    series_uid: str
    modality: str = ""
    sop_classes: set[str] = field(default_factory=set)
    series_description: str = ""
    protocol_name: str = ""
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    calling_aets: set[str] = field(default_factory=set)
    slices: int = 0  # frames, counting every frame of a multi-frame object
    rows: int = 0
    columns: int = 0

    @classmethod
    def from_headers(cls, headers: list[Dataset], calling_aets: Iterable[str] = ()) -> SeriesFacts:
        first = headers[0]
        return cls(
            series_uid=_text(first, "SeriesInstanceUID"), modality=_text(first, "Modality"),
            sop_classes={_text(ds, "SOPClassUID") for ds in headers},
            series_description=_text(first, "SeriesDescription"),
            protocol_name=_text(first, "ProtocolName"),
            body_part=_text(first, "BodyPartExamined"),
            image_type=_values(first, "ImageType"),
            calling_aets=set(calling_aets),
            slices=sum(_number(ds, "NumberOfFrames", 1) for ds in headers),
            rows=_number(first, "Rows", 0), columns=_number(first, "Columns", 0))


# What the rules read from a file, and nothing more (`machaon rules test` reads every file of a folder).
HEADER_TAGS = ["SeriesInstanceUID", "Modality", "SOPClassUID", "SeriesDescription", "ProtocolName",
               "BodyPartExamined", "ImageType", "NumberOfFrames", "Rows", "Columns"]


def _value(ds: Dataset, keyword: str, default):
    """A header value, or `default` when it is absent or cannot be read as its VR says
    (a sender's "1A" in an IS): such values were recorded as absent at ingest too."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom's converters raise several types; any means "not readable"
        return default
    return default if value in (None, "") else value


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = _value(ds, keyword, ())
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _text(ds: Dataset, keyword: str) -> str:
    return str(_value(ds, keyword, ""))


def _number(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(_value(ds, keyword, default))
    except (ValueError, TypeError, OverflowError):
        return default


def explain(rule: Rule, facts: SeriesFacts) -> list[str]:
    """Why `rule` does not match the series; empty when it matches."""
    m, why = rule.match, []
    if m.modality and facts.modality not in m.modality:
        why.append(f"modality is {facts.modality or 'missing'}, not {' or '.join(m.modality)}")
    if m.sop_class and not facts.sop_classes <= set(m.sop_class):
        why.append(f"SOP class {', '.join(sorted(facts.sop_classes - set(m.sop_class)))} is not listed")
    for name, pattern, value in (("series description", m.series_description, facts.series_description),
                                 ("protocol name", m.protocol_name, facts.protocol_name)):
        if pattern is not None and not re.search(pattern, value, re.IGNORECASE):
            why.append(f"{name} {value!r} does not match /{pattern}/")
    if m.body_part and facts.body_part.upper() not in {b.upper() for b in m.body_part}:
        why.append(f"body part is {facts.body_part or 'missing'}, not {' or '.join(m.body_part)}")
    missing = [v for v in m.image_type if v.upper() not in {t.upper() for t in facts.image_type}]
    if missing:
        image_type = "\\".join(facts.image_type) or "missing"
        why.append(f"image type {image_type} lacks {', '.join(missing)}")
    if m.calling_aet and not facts.calling_aets & set(m.calling_aet):
        why.append(f"sent by {', '.join(sorted(facts.calling_aets)) or 'unknown'}, "
                   f"not {' or '.join(m.calling_aet)}")
    if m.min_slices and facts.slices < m.min_slices:
        why.append(f"{facts.slices} slices, fewer than {m.min_slices}")
    if m.max_slices and facts.slices > m.max_slices:
        why.append(f"{facts.slices} slices, more than {m.max_slices}")
    size = f"{facts.rows}x{facts.columns}"
    if m.min_size and min(facts.rows, facts.columns) < m.min_size:
        why.append(f"images are {size}, smaller than {m.min_size}")
    if m.max_size and max(facts.rows, facts.columns) > m.max_size:
        why.append(f"images are {size}, larger than {m.max_size}")
    return why


def matching(rules: list[Rule], facts: SeriesFacts) -> list[Rule]:
    """The rules that match the series, highest priority first."""
    return sorted((r for r in rules if not explain(r, facts)), key=lambda r: -r.priority)


def read_headers(path: Path) -> Dataset:
    """What the rules need from one file, without its pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)


def series_in_folder(path: Path) -> tuple[list[SeriesFacts], list[str]]:
    """The series of the DICOM files under `path` (a file or a folder, searched recursively),
    and a line for each DICOM file that could not be read."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    headers: dict[str, list[Dataset]] = defaultdict(list)
    problems = []
    for file in files:
        try:
            ds = read_headers(file)
        except InvalidDicomError:
            continue  # not DICOM: a folder of studies often holds other files too
        except Exception as exc:  # DICOM, but damaged: name it and go on with the others
            problems.append(f"{file}: cannot read its header: {exc}")
            continue
        if "SeriesInstanceUID" in ds:
            headers[_text(ds, "SeriesInstanceUID")].append(ds)
    return [SeriesFacts.from_headers(h) for h in headers.values()], problems
