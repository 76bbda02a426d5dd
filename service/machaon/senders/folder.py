"""Folder destinations: results written as files, for a viewer or a script that reads a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..spool import copy_durably
from .base import DestinationSettings, Outcomes, Outgoing, SendError


class FolderDestination(DestinationSettings):
    """Results written as files: <path>/<study>/<series>/<instance>.dcm."""

    type: Literal["folder"]
    path: Path


class FolderSender:
    """Copies each result under the folder, durably: a file there is whole."""

    def __init__(self, destination: FolderDestination, *, calling_ae: str):
        self.destination = destination

    def send(self, results: Sequence[Outgoing]) -> Outcomes:
        for result in results:
            ds = result.dataset
            target = (self.destination.path / ds.StudyInstanceUID / ds.SeriesInstanceUID
                      / f"{ds.SOPInstanceUID}.dcm")
            try:
                copy_durably(result.path, target)
            except OSError as exc:
                yield SendError(f"cannot write {target}: {exc.strerror or exc}")
            else:
                yield None
