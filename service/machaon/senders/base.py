"""What every sender shares: the protocol, the base of destination settings, the errors."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pydicom
from pydantic import BaseModel, ConfigDict


class SendError(Exception):
    """A destination did not take a result; the message says what it answered."""


class SettingError(ValueError):
    """A destination setting that is valid as written but cannot be used (a file that cannot be
    loaded); `key` is where it is within the destination's table ("tls.certificate")."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


class Table(BaseModel):
    """A table of the configuration file: an unknown key is a mistake."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DestinationSettings(Table):
    """The base of every destination type's settings; subclasses add `type: Literal["name"]`."""

    def check(self) -> None:
        """At start-up: load what would otherwise be found wanting at the first send (certificates);
        SettingError names the key. Nothing to load by default."""


@dataclass(frozen=True)
class Outgoing:
    """One result to send: its file in the spool, and the dataset read from it."""

    path: Path
    dataset: pydicom.Dataset


# One per result, in order: None once the destination acknowledged it, else what it answered. A
# generator, so that closing it early releases what it holds (an association).
Outcomes = Generator[SendError | None, None, None]


class Sender(Protocol):
    """Sends results to one destination. Made for each batch; `calling_ae` is machaon's AE title."""

    def __init__(self, destination: Any, *, calling_ae: str) -> None: ...

    def send(self, results: Sequence[Outgoing]) -> Outcomes:
        """One outcome per result, in order; raises SendError when nothing more can be sent now."""
        ...


class DestinationType(NamedTuple):
    settings: type[DestinationSettings]
    sender: type[Sender]
