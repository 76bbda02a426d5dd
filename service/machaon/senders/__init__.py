"""Destinations as plug-ins: one module per destination type, behind one small protocol.

A module holds the type's settings (a pydantic model for its `[destinations.NAME]` table, whose
`type` key names it) and its sender. `TYPES` below lists them; the configuration's
`destinations` are validated against the union it makes, and the dispatcher finds each
destination's sender there. Adding a destination type is one module here, its line in `TYPES`,
and its test.

A sender is made from its destination's settings for one batch of results, and `send` gives one
outcome per result, in order: None once the destination acknowledged it, or a SendError saying
what it answered. `send` raises SendError when nothing (more) can be sent now, such as when there
is no connection: the results not yet answered wait for the next attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field

from .base import DestinationSettings, DestinationType, Outgoing, Sender, SendError, SettingError
from .dicom import OPEN_ASSOCIATIONS, DicomDestination, DicomSender
from .dicomweb import DicomWebDestination, StowRsSender
from .folder import FolderDestination, FolderSender

__all__ = ["Destination", "DestinationSettings", "Outgoing", "SendError", "Sender", "SettingError", "TYPES",
           "abandon_sends", "sender_for"]

# Destination types by the `type` key of their table.
TYPES: dict[str, DestinationType] = {
    "folder": DestinationType(FolderDestination, FolderSender),
    "dicom": DestinationType(DicomDestination, DicomSender),
    "dicomweb": DestinationType(DicomWebDestination, StowRsSender),
}

if TYPE_CHECKING:
    # What type checkers see; keep it in step with TYPES.
    Destination = FolderDestination | DicomDestination | DicomWebDestination
else:
    # The `destinations` tables, told apart by their `type` key.
    Destination = Annotated[Union[tuple(t.settings for t in TYPES.values())],  # noqa: UP007
                            Field(discriminator="type")]


def sender_for(destination: Destination, calling_ae: str) -> Sender:
    """The sender of `destination`'s type, made from its settings."""
    return TYPES[destination.type].sender(destination, calling_ae=calling_ae)


def abandon_sends(senders: Collection[threading.Thread]) -> None:
    """At shutdown, once the sends still running in the threads `senders` are no longer waited
    for: end what would keep the process alive after them (the connection threads of their DICOM
    associations; HTTP requests and file copies run in the senders' own threads)."""
    OPEN_ASSOCIATIONS.abandon(senders)
