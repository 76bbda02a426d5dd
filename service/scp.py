"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class.

A C-STORE gets a success status only after its file is whole on disk under its
final name and its row is committed (DESIGN rule 1). pynetdicom streams each
dataset into a file under the spool's incoming/ folder as its PDUs arrive, so a
large object never sits whole in memory, and the bytes are kept as received.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRBigEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from .config import Settings
from .spool import Spool, valid_uid
from .store import ReceivedInstance, SeriesConflict, Store, add_event, record_instance

log = logging.getLogger("machaon.scp")

# Stream received datasets to a file instead of memory (see Event.dataset_path).
_config.STORE_RECV_CHUNKED_DATASET = True

# C-STORE statuses (PS3.4 B.2.3) and the reason each carries in Error Comment.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# Every transfer syntax pydicom knows, stored as received: nothing is decoded at
# ingest. pynetdicom accepts the first of ours that the sender proposes, so the
# compressed and deflated ones come first: a sender proposes them for data it
# holds that way, and asking it to decode instead wastes space or fails (a
# sender without the codec). Explicit VR Big Endian (retired) is left out.
TRANSFER_SYNTAXES = sorted(
    (ts for ts in AllTransferSyntaxes if ts != ExplicitVRBigEndian),
    key=lambda ts: not (ts.is_compressed or ts.is_deflated),
)

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyDescription",
    "SeriesNumber", "SeriesDescription", "InstanceNumber",
]


class Refused(Exception):
    """A C-STORE that gets a failure status; the message goes back to the sender."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class _AssociationLog:
    calling_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)
    ended: str = "closed"


class StorageSCP:
    def __init__(self, settings: Settings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.spool = spool
        self.server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()
        self._associations: dict[int, _AssociationLog] = {}
        self._associations_lock = threading.Lock()  # association threads and the scheduler
        # Two copies of one SOP Instance arriving at once must not interleave
        # their rename and their row; striped locks keep that cheap.
        self._uid_locks = [threading.Lock() for _ in range(64)]

    def _make_ae(self) -> AE:
        dicom = self.settings.dicom
        ae = AE(ae_title=dicom.ae_title)
        ae.maximum_associations = dicom.max_associations
        ae.maximum_pdu_size = dicom.max_pdu_size
        ae.network_timeout = dicom.network_timeout
        ae.acse_timeout = dicom.network_timeout
        ae.dimse_timeout = dicom.network_timeout
        ae.require_calling_aet = list(dicom.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Start listening (in background threads)."""
        # pynetdicom writes incoming datasets with NamedTemporaryFile; putting
        # them on the spool's file system makes the final rename atomic.
        tempfile.tempdir = str(self.spool.incoming)
        handlers = [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        address = (self.settings.dicom.host, self.settings.dicom.port)
        self.server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.settings.dicom.ae_title, *address)

    def stop(self, grace_s: float, hurry: threading.Event | None = None) -> None:
        """Stop accepting associations, let those in flight finish for up to
        `grace_s` seconds (or until `hurry` is set), then abort whatever is left."""
        if self.server is None:
            return
        self.server.shutdown()
        deadline = time.monotonic() + grace_s
        # Only associations that got established carry transfers worth waiting
        # for; a connection that never sent an A-ASSOCIATE-RQ is just dropped.
        while (any(a.is_established for a in self.ae.active_associations)
               and time.monotonic() < deadline and not (hurry and hurry.is_set())):
            time.sleep(0.05)
        left = [a for a in self.ae.active_associations if a.is_established]
        if left:
            log.warning("aborting %d association(s) still open", len(left))
        self.ae.shutdown()
        for assoc in self.ae.active_associations:  # a handler may be mid-commit
            assoc.join(timeout=5)
        self.server = None

    # --- C-STORE ------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        stats = self._associations.get(id(event.assoc))
        calling_ae = event.assoc.requestor.ae_title
        try:
            inst = self._keep(event, calling_ae)
        except Refused as exc:
            if stats:
                stats.failed += 1
            log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae, exc.status, exc)
            return _status(exc.status, str(exc))
        if stats:
            with self._associations_lock:
                stats.stored += 1
                stats.bytes += inst.size_bytes
                stats.studies.add(inst.study_uid)
        return _status(SUCCESS)

    def studies_in_flight(self) -> set[str]:
        """Studies that associations still open have sent to: a sender may be
        streaming a large object of theirs, so they are not quiet yet."""
        with self._associations_lock:
            return set().union(*(stats.studies for stats in self._associations.values()))

    def _keep(self, event: evt.Event, calling_ae: str) -> ReceivedInstance:
        received = Path(event.dataset_path)
        try:
            room = self.spool.has_room()
        except OSError as exc:
            raise Refused(PROCESSING_FAILURE, f"spool unusable: {exc.strerror}") from None
        if not room:
            raise Refused(OUT_OF_RESOURCES,
                          f"less than {self.settings.spool.min_free_mb} MiB free in the spool; retry later")
        header = _read_header(received, event.request)
        relative = self.spool.relative_path(header.StudyInstanceUID, header.SeriesInstanceUID,
                                            header.SOPInstanceUID)
        with self._uid_locks[zlib.crc32(header.SOPInstanceUID.encode()) % len(self._uid_locks)]:
            had_copy = self.spool.path(relative).exists()
            try:
                size = self.spool.keep(received, relative)
            except OSError as exc:
                raise Refused(OUT_OF_RESOURCES if exc.errno == errno.ENOSPC else PROCESSING_FAILURE,
                              f"spool write failed: {exc.strerror}") from None
            inst = _received(header, event.context.transfer_syntax, relative, size, calling_ae)
            try:
                with self.store.engine.begin() as conn:
                    recorded = record_instance(conn, inst, actor=f"dicom:{calling_ae}")
            except Exception as exc:
                if not had_copy:  # never acknowledged, and now in no row: don't leave it
                    self.spool.remove(relative)
                raise _refusal(exc, inst) from None
            if recorded.replaced_path:  # the same instance, kept earlier under other UIDs
                self.spool.remove(recorded.replaced_path)
        if recorded.study_reopened:
            log.info("study %s reopened by a new instance from %s", inst.study_uid, calling_ae)
        return inst

    # --- association bookkeeping: one log line and one event per association ---

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self._associations_lock:
            self._associations[id(event.assoc)] = _AssociationLog(
                requestor.ae_title, f"{requestor.address}:{requestor.port}")

    def _on_end(self, event: evt.Event) -> None:
        stats = self._associations.get(id(event.assoc))
        if stats:
            stats.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"

    def _on_close(self, event: evt.Event) -> None:
        with self._associations_lock:
            stats = self._associations.pop(id(event.assoc), None)
        if stats is None:
            return
        seconds = time.monotonic() - stats.started
        log.info("association from %s (%s) %s: %d stored, %d refused, %.1f MB in %.1f s",
                 stats.calling_ae, stats.peer, stats.ended, stats.stored, stats.failed,
                 stats.bytes / 1e6, seconds)
        if stats.stored or stats.failed:
            try:
                with self.store.session.begin() as session:
                    add_event(session, f"dicom:{stats.calling_ae}@{stats.peer}", "association",
                              stored=stats.stored, refused=stats.failed, bytes=stats.bytes,
                              seconds=round(seconds, 3), ended=stats.ended,
                              studies=sorted(stats.studies))
            except Exception:
                log.exception("could not record the association from %s", stats.calling_ae)

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s:%s) rejected", requestor.ae_title,
                    requestor.address, requestor.port)


def _refusal(exc: Exception, inst: ReceivedInstance) -> Refused:
    if isinstance(exc, SeriesConflict):
        log.warning("series %s of %s already belongs to another study", inst.series_uid,
                    inst.sop_instance_uid)
        return Refused(DOES_NOT_MATCH, "SeriesInstanceUID already used in another study")
    log.exception("could not record %s", inst.sop_instance_uid)  # the database is down, say
    return Refused(PROCESSING_FAILURE, "could not record the instance in the job store: "
                   f"{type(exc).__name__}")


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _read_header(path: Path, request) -> Dataset:
    """Read what the store needs, stopping before the pixel data."""
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        for keyword in _HEADER_TAGS:  # values decode lazily; surface errors here
            getattr(header, keyword, None)
    except Exception as exc:  # untrusted bytes: whatever pydicom trips on is the sender's
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = header.get(keyword)
        if not valid_uid(value):
            problem = "missing" if value in (None, "") else f"not a valid UID ({value!r})"
            raise Refused(CANNOT_UNDERSTAND, f"{keyword} is {problem}")
    if header.SOPInstanceUID != request.AffectedSOPInstanceUID:
        raise Refused(DOES_NOT_MATCH, "SOPInstanceUID differs from the C-STORE request's")
    if header.SOPClassUID != request.AffectedSOPClassUID:
        raise Refused(DOES_NOT_MATCH, "SOPClassUID differs from the C-STORE request's")
    return header


# What a sender writes in these is not trusted to fit the columns: a value that
# would make the row fail is dropped (the file keeps it), not the instance.

def _text(header: Dataset, keyword: str, limit: int) -> str | None:
    value = header.get(keyword)
    return None if value in (None, "") else str(value).replace("\x00", "")[:limit]


def _number(header: Dataset, keyword: str) -> int | None:
    try:
        value = header.get(keyword)
        number = None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
    return number if number is not None and -2**31 <= number < 2**31 else None


def _received(header: Dataset, transfer_syntax: str, relative: str, size: int,
              calling_ae: str) -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=header.StudyInstanceUID, series_uid=header.SeriesInstanceUID,
        sop_instance_uid=header.SOPInstanceUID, sop_class_uid=header.SOPClassUID,
        transfer_syntax_uid=str(transfer_syntax), path=relative, size_bytes=size,
        calling_ae=calling_ae,
        patient_id=_text(header, "PatientID", 64), patient_name=_text(header, "PatientName", 324),
        accession_number=_text(header, "AccessionNumber", 16),
        study_date=_text(header, "StudyDate", 8),
        study_description=_text(header, "StudyDescription", 64),
        modality=_text(header, "Modality", 16), series_number=_number(header, "SeriesNumber"),
        series_description=_text(header, "SeriesDescription", 64),
        instance_number=_number(header, "InstanceNumber"),
    )
