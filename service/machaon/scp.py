"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class.

A C-STORE gets a success status only after its file is whole on disk under its
final name and its row is committed: never acknowledge what cannot be kept. pynetdicom streams each
dataset into a file under the spool's incoming/ folder as its PDUs arrive, so a
large object never sits whole in memory, and the bytes are kept as received.

Of the transfer syntaxes a sender proposes for a presentation context, the first
it lists that machaon accepts is chosen (PS3.8: the sender lists its preference),
so a sender never has to transcode; [dicom.senders.<AE>] replaces that order for
senders that list first what they cannot always deliver.
"""

from __future__ import annotations

import errno
import logging
import re
import ssl
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import config as pydicom_config
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pydicom.valuerep import DA, validate_regex, validate_value
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt, register_uid
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # Verification: named at import time
    Verification,
    uid_to_service_class,
)
from sqlalchemy import Engine, select

from . import metrics
from .config import TRANSFER_SYNTAXES, Settings
from .listener import BoundedSocket, Connections, ListenerServer, start_server, tls_context
from .spool import Spool, valid_uid
from .store import (
    IMAGE_TYPE_LENGTH,
    Instance,
    ReceivedInstance,
    Recorded,
    SeriesConflict,
    Store,
    UidConflict,
    add_event,
    instances_without_facts,
    record_facts,
    record_instance,
)

log = logging.getLogger("machaon.scp")

# Stream received datasets to a file instead of memory (see Event.dataset_path).
_config.STORE_RECV_CHUNKED_DATASET = True

# C-STORE statuses (PS3.4 B.2.3) and the reason each carries in Error Comment.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

DEFAULT_MAX_INFLATED = 1024 * 2**20  # dicom.max_inflated_mb's default, for files read outside ingest


def _storage_sop_classes() -> list[str]:
    """pynetdicom's storage SOP classes, and those only pydicom's UID dictionary names: the retired
    ones (Ultrasound Image Storage (Retired), ...) that old archives still send, DICOS, DICONDE.
    pynetdicom serves the latter once registered with its storage service class."""
    classes: list[str] = [cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax]
    for uid, (_name, kind, _info, _retired, keyword) in UID_dictionary.items():
        if (kind == "SOP Class" and re.search(r"Storage(Trial|Retired)?$", keyword)
                and uid != MediaStorageDirectoryStorage and uid_to_service_class(uid) is ServiceClass):
            register_uid(uid, keyword, StorageServiceClass)
            classes.append(uid)
    return classes


STORAGE_SOP_CLASSES = _storage_sop_classes()

# Why a presentation context was rejected (PS3.8 9.3.3.2, Result/Reason).
_REJECTIONS = {1: "rejected by machaon", 2: "no reason given", 3: "SOP class not supported",
               4: "no transfer syntax machaon accepts"}

_UID_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
# What the rows record (the rules match on them: planning reads no file) and what preprocessing
# reads later. A value among these that is not what its VR says (a number that is no number, a date
# that is no date) is recorded as absent and named in an instance.invalid_values event; the file is
# still kept as received.
_VALUE_TAGS = [
    "Modality", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyDescription",
    "SeriesDate", "SeriesNumber", "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType",
    "InstanceNumber", "NumberOfFrames", "ImagesInAcquisition", "Rows", "Columns", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
]
_IDENTIFYING = {"PatientName", "PatientID", "AccessionNumber"}  # logged only with log.phi = true
_HEADER_TAGS = ["SpecificCharacterSet", *_UID_TAGS, *_VALUE_TAGS]  # the character set decodes names


class Refused(Exception):
    """A C-STORE that gets a failure status; the message goes back to the sender. `kind` is the
    reason's class in the metrics (metrics.REFUSAL_REASONS); by default the status says it."""

    def __init__(self, status: int, reason: str, kind: str | None = None):
        super().__init__(reason)
        self.status = status
        self.kind = kind or _REFUSAL_KINDS.get(status, "store_error")


_REFUSAL_KINDS = {OUT_OF_RESOURCES: "out_of_resources", DOES_NOT_MATCH: "invalid",
                  CANNOT_UNDERSTAND: "invalid", PROCESSING_FAILURE: "store_error"}


@dataclass
class _AssociationLog:
    calling_ae: str
    peer: str
    accepted: frozenset[int]  # presentation context IDs
    offered: dict[int, PresentationContext]  # what the sender proposed, by context ID
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)
    ended: str = "closed"
    protocol_error: bool = False
    conflicts: set[str] = field(default_factory=set)  # UIDs whose conflict was recorded


class StorageSCP:
    def __init__(self, settings: Settings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.spool = spool
        self.ae = self._make_ae()
        self.servers: list[ListenerServer] = []
        self.connections = Connections(settings.dicom)  # shared by the plain and the TLS port
        self._associations: dict[int, _AssociationLog] = {}
        self._associations_lock = threading.Lock()  # association threads and the scheduler
        self._admitted: set[int] = set()  # associations given a slot (under _associations_lock)
        self._overflowing: set[int] = set()  # associations whose message in flight found no room
        self.max_inflated = settings.dicom.max_inflated_mb * 2**20

    def _make_ae(self) -> AE:
        dicom = self.settings.dicom
        ae = AE(ae_title=dicom.ae_title)
        # Who may associate, and how many at once, is decided in _on_requested: pynetdicom's own
        # limit counts connections that never sent an A-ASSOCIATE-RQ, so it is only a backstop.
        ae.maximum_associations = dicom.max_connections
        ae.require_called_aet = False
        ae.maximum_pdu_size = dicom.max_pdu_size
        ae.network_timeout = dicom.network_timeout
        # A connection must send its A-ASSOCIATE-RQ (and answer a release) within acse_timeout.
        ae.acse_timeout = dicom.acse_timeout
        ae.dimse_timeout = dicom.network_timeout
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Start listening (in background threads)."""
        # pynetdicom writes incoming datasets with NamedTemporaryFile; putting
        # them on the spool's file system makes the final rename atomic.
        tempfile.tempdir = str(self.spool.incoming)
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        dicom = self.settings.dicom
        try:
            if dicom.tls is None or dicom.tls.plain:
                self._listen(dicom.port, None, handlers)
            if dicom.tls is not None:
                self._listen(dicom.tls.port, tls_context(dicom.tls), handlers)
        except BaseException:  # a port taken: let go of the other, so that start() may be tried again
            for server in self.servers:
                server.shutdown()
            self.servers = []
            raise

    def _listen(self, port: int, context: ssl.SSLContext | None, handlers) -> None:
        address = (self.settings.dicom.host, port)
        self.servers.append(start_server(self.ae, address, self.settings.dicom, context, handlers,
                                         self._on_oversize, self.connections))
        log.info("listening as %s on %s:%d%s", self.settings.dicom.ae_title, *address,
                 " (DICOM TLS)" if context else "")

    @property
    def server(self) -> ListenerServer | None:
        """The first listener (the plain one, unless only TLS is on)."""
        return self.servers[0] if self.servers else None

    def established(self) -> int:
        """Associations holding a slot (dicom.max_associations)."""
        with self._associations_lock:
            return len(self._admitted)

    def stop(self, grace_s: float, hurry: threading.Event | None = None) -> None:
        """Stop accepting associations, let those in flight finish for up to
        `grace_s` seconds (or until `hurry` is set), then abort whatever is left."""
        if not self.servers:
            return
        for server in self.servers:
            server.shutdown()
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
        joined_by = time.monotonic() + 5  # a handler may be mid-commit: 5 s for all of them
        for assoc in self.ae.active_associations:
            assoc.join(timeout=max(joined_by - time.monotonic(), 0))
        self.servers = []

    # --- negotiation --------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Admit the association or reject it (who calls, from where, to whom; a slot free), then
        order our transfer syntaxes for it before pynetdicom negotiates: it accepts, for each
        proposed context, the first of the acceptor's syntaxes that the sender proposed. The
        acceptor's supported contexts are a per-association copy, settable until negotiation."""
        request = event.assoc.requestor.primitive
        assert request is not None  # pynetdicom keeps the A-ASSOCIATE-RQ before it triggers EVT_REQUESTED
        try:
            admitted = self._admit(event.assoc)
        except Exception:  # a bug of ours: reject rather than let pynetdicom negotiate unchecked
            log.exception("could not decide on the association from %s", event.assoc.requestor.address)
            event.assoc.acse.send_reject(2, 1, 1)
            event.assoc.kill()
            return
        if not admitted:
            return
        sender = self.settings.dicom.senders.get(request.calling_ae_title.strip())
        acceptor = event.assoc.acceptor
        acceptor.supported_contexts = _in_preferred_order(
            acceptor.supported_contexts, request.presentation_context_definition_list,
            sender.transfer_syntaxes if sender else [])

    def _admit(self, assoc: Association) -> bool:
        """Give `assoc` a slot, or send an A-ASSOCIATE-RJ saying why not (and log it). pynetdicom
        then skips negotiation and closes the connection."""
        rejection = self._rejection_of(assoc)
        if rejection is None:
            with self._associations_lock:
                if len(self._admitted) < self.settings.dicom.max_associations:
                    self._admitted.add(id(assoc))
                    return True
            rejection = (2, 3, 2, f"{self.settings.dicom.max_associations} association(s) already open "
                                  "(dicom.max_associations); the sender may try again later")
        result, source, diagnostic, why = rejection
        metrics.association("rejected")
        requestor, request = assoc.requestor, assoc.requestor.primitive
        calling = request.calling_ae_title if request else ""
        log.warning("association from %s (%s:%s) rejected: %s", _ae(calling), requestor.address,
                    requestor.port, why)
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()  # as pynetdicom does after its own rejections: the DUL sends the RJ and stops
        return False

    def _rejection_of(self, assoc: Association) -> tuple[int, int, int, str] | None:
        """(result, source, diagnostic, why) of the A-ASSOCIATE-RJ for a peer that may not send."""
        dicom, request = self.settings.dicom, assoc.requestor.primitive
        assert request is not None
        calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
        if called != dicom.ae_title:
            return 1, 1, 7, f"called AE title {_ae(called)} is not {dicom.ae_title!r} (dicom.ae_title)"
        if dicom.allowed_calling_aets and calling not in dicom.allowed_calling_aets:
            return 1, 1, 3, (f"calling AE title {_ae(calling)} is not in dicom.allowed_calling_aets "
                             f"({', '.join(dicom.allowed_calling_aets)}); add it there if it may send")
        sender = dicom.senders.get(calling)
        if sender and not sender.allows(assoc.requestor.address):
            return 1, 1, 3, (f"calling AE title {_ae(calling)} may call only from "
                             f"{', '.join(sender.hosts)} (dicom.senders.{calling}.hosts)")
        return None

    def _on_oversize(self, sock: BoundedSocket, pdu_type: int, length: int, bound: int) -> None:
        requestor = sock.assoc.requestor
        metrics.association("aborted")
        log.warning("association from %s (%s:%s) aborted: a PDU of type 0x%02X announced %d bytes, more "
                    "than the %d it may have%s", _ae(requestor.ae_title), requestor.address,
                    requestor.port, pdu_type, length, bound,
                    " (dicom.max_pdu_size)" if bound == self.settings.dicom.max_pdu_size else "")

    def _on_pdu(self, event: evt.Event) -> None:
        """A message on a presentation context that was not accepted is a protocol error. pynetdicom
        3.0.4, receiving into a file, looks the context up as it decodes, in its DUL thread: the
        KeyError kills that thread (a traceback), leaves the file in incoming/, and no handler hears
        the association end (no log line, and its studies stay "in flight"). So the message's data
        is dropped here, before pynetdicom reads it, and the association aborted."""
        if not isinstance(event.pdu, P_DATA_TF):
            return
        self._check_room(event.assoc, event.pdu)
        # Until the association thread has run _on_established, the accepted contexts are read here.
        stats = self._associations.get(id(event.assoc))
        if stats and stats.protocol_error:  # aborted already: drop whatever still comes
            event.pdu.presentation_data_value_items = []
            return
        accepted = stats.accepted if stats else frozenset(_by_id(event.assoc.accepted_contexts))
        used = {item.presentation_context_id for item in event.pdu.presentation_data_value_items
                if item.presentation_context_id is not None}  # each item decoded has one
        stray = sorted(used - accepted)
        if not stray:
            return
        event.pdu.presentation_data_value_items = []
        requestor = event.assoc.requestor
        offered = _offered(event.assoc)
        if stats:
            stats.protocol_error = True
            stats.failed += 1
        metrics.instance_refused("protocol_error")
        log.warning("association from %s (%s:%s): a message on presentation context %d (%s), which was "
                    "not accepted: aborting the association", requestor.ae_title, requestor.address,
                    requestor.port, stray[0],
                    _describe_context(offered[stray[0]]) if stray[0] in offered else "never proposed")
        event.assoc.abort()  # within an event handler, pynetdicom's abort does not wait

    def _check_room(self, assoc: Association, pdu: P_DATA_TF) -> None:
        """Free space is checked as each P-DATA-TF of a dataset arrives, before pynetdicom writes it
        to incoming/. Once there is not room for it above spool.min_free_mb, the rest of that
        message's dataset is dropped (each fragment keeps its control byte, so the message still
        ends) and _on_store refuses it with 0xA700; pynetdicom then removes the partial file. The
        disk never fills, and the association goes on."""
        fragments = [(item, item.presentation_data_value or b"")
                     for item in pdu.presentation_data_value_items]
        fragments = [(item, data) for item, data in fragments if data and not data[0] & 1]  # not commands
        if not fragments:
            return
        if id(assoc) not in self._overflowing:
            size = sum(len(data) for _item, data in fragments)
            try:
                if self.spool.free_bytes() - size >= self.spool.min_free_bytes:
                    return
            except OSError:
                return  # the spool itself is gone: _keep says so
            self._overflowing.add(id(assoc))
        for item, data in fragments:
            item.presentation_data_value = data[:1]

    # --- C-STORE ------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        stats = self._associations.get(id(event.assoc))
        calling_ae = event.assoc.requestor.ae_title
        request = event.request
        assert isinstance(request, C_STORE)  # what EVT_C_STORE carries
        try:
            if id(event.assoc) in self._overflowing:
                self._overflowing.discard(id(event.assoc))
                raise Refused(OUT_OF_RESOURCES, "not stored: less than "
                              f"{self.settings.spool.min_free_mb} MiB would be left free in the spool; "
                              "retry later")
            inst = self._keep(event, calling_ae)
        except Refused as exc:
            if stats:
                stats.failed += 1
            metrics.instance_refused(exc.kind)
            log.warning("C-STORE from %s refused (0x%04X): %s (%s in %s)", _ae(calling_ae), exc.status, exc,
                        ascii(str(request.AffectedSOPInstanceUID)), UID(event.context.transfer_syntax).name)
            return _status(exc.status, str(exc))
        metrics.instance_received(inst.size_bytes)
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
            raise Refused(PROCESSING_FAILURE, f"spool unusable: {exc.strerror}", "spool_error") from None
        if not room:
            raise Refused(OUT_OF_RESOURCES,
                          f"less than {self.settings.spool.min_free_mb} MiB free in the spool; retry later")
        header, invalid = _read_header(received, self.max_inflated)
        _check_request(header, event.request)
        relative = self.spool.relative_path(header.StudyInstanceUID, header.SeriesInstanceUID,
                                            header.SOPInstanceUID)
        with self._uid_lock(header.SOPInstanceUID):
            had_copy = self.spool.path(relative).exists()
            try:
                size = self.spool.keep(received, relative)
            except OSError as exc:
                full = exc.errno == errno.ENOSPC
                raise Refused(OUT_OF_RESOURCES if full else PROCESSING_FAILURE,
                              f"spool write failed: {exc.strerror}",
                              "out_of_resources" if full else "spool_error") from None
            inst = _received(header, event.context.transfer_syntax, relative, size, calling_ae)
            try:
                recorded = self._record(inst, invalid, f"dicom:{calling_ae}")
            except Exception as exc:
                if not had_copy:  # never acknowledged, and now in no row: don't leave it
                    self.spool.remove(relative)
                if isinstance(exc, UidConflict):
                    self._conflict(exc, inst, event.assoc)
                raise _refusal(exc, inst) from None
            if recorded.replaced_path:  # the same instance, kept earlier under other UIDs
                self.spool.remove(recorded.replaced_path)
        if recorded.study_reopened:
            log.info("study %s reopened by a new instance from %s", inst.study_uid, calling_ae)
        return inst

    def index(self, relative: str) -> None:
        """Record a file found under studies/ without a row (a crash between its rename and its
        commit left it whole but never acknowledged); Refused if it cannot be read, its UIDs name
        another place, or a newer copy of the instance is kept elsewhere."""
        path = self.spool.path(relative)
        try:
            header, invalid = _read_header(path, self.max_inflated)
        except Refused as exc:
            raise Refused(exc.status, f"cannot be read: {exc}") from None
        if relative != self.spool.relative_path(header.StudyInstanceUID, header.SeriesInstanceUID,
                                                 header.SOPInstanceUID):
            raise Refused(DOES_NOT_MATCH, "cannot be read as filed: its UIDs name another place")
        kept_at = self._kept_at(header.SOPInstanceUID)
        if kept_at:  # a crash between a newer copy's commit and this one's removal
            raise Refused(DOES_NOT_MATCH, f"an older copy of an instance kept at {kept_at}")
        inst = _received(header, header.file_meta.get("TransferSyntaxUID", ""), relative,
                         path.stat().st_size, calling_ae="")
        with self._uid_lock(inst.sop_instance_uid):
            try:
                self._record(inst, invalid, "startup", indexed=True)
            except UidConflict as exc:
                raise Refused(DOES_NOT_MATCH, f"{exc.kind} belongs to another study") from None

    def _conflict(self, conflict: UidConflict, inst: ReceivedInstance, assoc: Association) -> None:
        """A UID claimed by two studies: the first keeps it, and its study's history says who else
        claimed it (once per association and UID, not once per instance of a series)."""
        stats = self._associations.get(id(assoc))
        if stats is not None:
            if conflict.uid in stats.conflicts:
                return
            stats.conflicts.add(conflict.uid)
        peer = f"{inst.calling_ae}@{assoc.requestor.address}"
        log.warning("%s from %s refused: %s %s already belongs to study %s (sent under study %s)",
                    inst.sop_instance_uid, _ae(inst.calling_ae), conflict.kind, conflict.uid,
                    conflict.owner_study_uid, inst.study_uid)
        try:
            with self.store.session.begin() as session:
                add_event(session, f"dicom:{peer}", f"{conflict.kind}.conflict", conflict.owner_study_uid,
                          uid=conflict.uid, sent_under_study=inst.study_uid,
                          sop_instance_uid=inst.sop_instance_uid, refused=True)
        except Exception:
            log.exception("could not record the conflict over %s", conflict.uid)

    def _kept_at(self, sop_instance_uid: str) -> str | None:
        with self.store.read_session() as session:
            return session.execute(select(Instance.path).where(
                Instance.sop_instance_uid == sop_instance_uid)).scalar_one_or_none()

    def _record(self, inst: ReceivedInstance, invalid: dict[str, str], actor: str,
                indexed: bool = False) -> Recorded:
        """The instance's row, and what was wrong with its values, in one transaction."""
        with self.store.engine.begin() as conn:
            recorded = record_instance(conn, inst, actor=actor)
            if indexed:
                add_event(conn, actor, "spool.indexed", inst.study_uid,
                          sop_instance_uid=inst.sop_instance_uid, path=inst.path)
            if invalid:
                add_event(conn, actor, "instance.invalid_values", inst.study_uid,
                          sop_instance_uid=inst.sop_instance_uid, values=invalid)
        if invalid:  # a patient's name or ID is in the event, and in the log only with log.phi
            shown = ", ".join(k if k in _IDENTIFYING and not self.settings.log.phi else f"{k}={v!r}"
                              for k, v in invalid.items())
            log.warning("instance %s of study %s (%s): recorded without the values that are not what "
                        "their VR says: %s", inst.sop_instance_uid, inst.study_uid, actor, shown)
        return recorded

    def _uid_lock(self, sop_instance_uid: str) -> threading.Lock:
        """Two copies of one SOP Instance arriving at once must not interleave their rename and
        their row, nor a copy and retention removing the study's files (the spool's locks)."""
        return self.spool.instance_lock(sop_instance_uid)

    # --- association bookkeeping: one log line and one event per association ---

    def _on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        offered = _offered(assoc)
        stats = _AssociationLog(requestor.ae_title, f"{requestor.address}:{requestor.port}",
                                frozenset(_by_id(assoc.accepted_contexts)), offered)
        with self._associations_lock:
            self._associations[id(assoc)] = stats
        # An association on which nothing can be sent is refused, whatever pynetdicom answered.
        metrics.association("accepted" if stats.accepted else "rejected")
        if not assoc.rejected_contexts:
            return
        rejections = "; ".join(f"{_describe_context(offered[cx_id])}: {_REJECTIONS[cx.result]}"
                               for cx_id, cx in _by_id(assoc.rejected_contexts).items()
                               if cx.result is not None)  # each rejected context has its result
        if stats.accepted:
            log.warning("association from %s (%s): %d presentation context(s) rejected: %s",
                        stats.calling_ae, stats.peer, len(assoc.rejected_contexts), rejections)
        else:
            log.warning("association from %s (%s) rejected: no presentation context acceptable (%s); "
                        "nothing can be sent on it: the sender must propose a storage SOP class (or "
                        "Verification) in a transfer syntax machaon accepts", stats.calling_ae, stats.peer,
                        rejections)

    def _on_end(self, event: evt.Event) -> None:
        stats = self._associations.get(id(event.assoc))
        if stats:
            stats.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"
            if stats.ended == "aborted" and stats.accepted:  # one refused outright was counted so
                metrics.association("aborted")

    def _on_close(self, event: evt.Event) -> None:
        with self._associations_lock:
            stats = self._associations.pop(id(event.assoc), None)
            self._admitted.discard(id(event.assoc))
            self._overflowing.discard(id(event.assoc))
        _remove_partial(event.assoc)
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
        """pynetdicom sent an A-ASSOCIATE-RJ (before negotiating contexts): say why."""
        metrics.association("rejected")
        requestor = event.assoc.requestor
        log.warning("association from %s (%s:%s) rejected: %s", _ae(requestor.ae_title),
                    requestor.address, requestor.port, self._rejection(event.assoc))

    def _rejection(self, assoc: Association) -> str:
        """Why pynetdicom rejected `assoc` (_admit rejects the others), from the A-ASSOCIATE-RJ."""
        answer = assoc.acceptor.primitive
        why = (answer.result_source, answer.diagnostic) if answer else None
        if why == (3, 2):
            return (f"{self.settings.dicom.max_connections} connections already open "
                    "(dicom.max_connections); the sender may try again later")
        if why == (2, 1):
            return "its user identity was not accepted"
        return ("no reason given" if answer is None else
                f"result {answer.result}, source {answer.result_source}, diagnostic {answer.diagnostic}")


def _in_preferred_order(supported: list[PresentationContext], proposed: list[PresentationContext],
                        preferred: list[str]) -> list[PresentationContext]:
    """The supported contexts of the proposed abstract syntaxes, each with its transfer syntaxes
    ordered `preferred` first, then as the sender listed them. (pynetdicom keeps one list per
    abstract syntax: a sender that proposes one in several contexts, in different orders, gets
    the order of the first.)"""
    orders: dict[str, list[str]] = {}
    for cx in proposed:
        if cx.abstract_syntax:  # a context without one matches none of ours
            orders.setdefault(cx.abstract_syntax, list(preferred)).extend(cx.transfer_syntax)
    contexts = []
    for cx in supported:
        if cx.abstract_syntax in orders:
            rank = {ts: i for i, ts in enumerate(dict.fromkeys(orders[cx.abstract_syntax]))}
            cx.transfer_syntax = sorted(cx.transfer_syntax, key=lambda ts: rank.get(str(ts), len(rank)))
            contexts.append(cx)
    return contexts


def _offered(assoc: Association) -> dict[int, PresentationContext]:
    """The presentation contexts the sender proposed, by ID; none until its A-ASSOCIATE-RQ is read."""
    request = assoc.requestor.primitive
    return _by_id(request.presentation_context_definition_list) if request else {}


def _by_id(contexts: list[PresentationContext]) -> dict[int, PresentationContext]:
    """Contexts by ID. pynetdicom types the ID optional (a context being built has none yet);
    those proposed, accepted and rejected in a negotiation all have theirs."""
    return {cx.context_id: cx for cx in contexts if cx.context_id is not None}


def _describe_context(cx: PresentationContext) -> str:
    """'CT Image Storage offered JPEG Lossless, Explicit VR Big Endian', for the log."""
    what = cx.abstract_syntax.name if cx.abstract_syntax else "no abstract syntax"
    return f"{what} offered {', '.join(UID(ts).name for ts in cx.transfer_syntax)}"


def _refusal(exc: Exception, inst: ReceivedInstance) -> Refused:
    if isinstance(exc, UidConflict):
        keyword = "SeriesInstanceUID" if isinstance(exc, SeriesConflict) else "SOPInstanceUID"
        return Refused(DOES_NOT_MATCH, f"{keyword} already used in another study", "conflict")
    log.exception("could not record %s", inst.sop_instance_uid)  # the database is down, say
    return Refused(PROCESSING_FAILURE, "could not record the instance in the job store: "
                   f"{type(exc).__name__}")


def _remove_partial(assoc: Association) -> None:
    """The file of a C-STORE whose association ended before its last fragment (pynetdicom leaves it
    in incoming/): removed now rather than by the sweep at the next start."""
    message = getattr(assoc.dimse, "message", None)
    path = getattr(message, "_data_set_path", None)
    if path is not None and Path(path).exists():
        data_file = getattr(message, "_data_set_file", None)
        if data_file is not None:
            data_file.close()
        Path(path).unlink(missing_ok=True)
        log.info("removed the partial dataset of an unfinished C-STORE from %s",
                 _ae(assoc.requestor.ae_title))


def _ae(title: str | None) -> str:
    """An AE title from a peer, for the log: unprintable characters escaped, "?" if empty."""
    return ascii((title or "").strip()[:16])[1:-1] or "?"


def _short(exc: Exception, limit: int = 120) -> str:
    """An exception about a peer's bytes, for a status or the log: one line, bounded."""
    text = " ".join(str(exc).split())
    return ascii(text if len(text) <= limit else text[:limit] + "...")[1:-1]


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _read_header(path: Path, max_inflated: int = DEFAULT_MAX_INFLATED) -> tuple[Dataset, dict[str, str]]:
    """What the store needs, stopping before the pixel data: the header with valid UIDs, less the
    values that are not what their VR says, and those values as received, by keyword. A deflated
    dataset is refused if it inflates to more than `max_inflated` bytes."""
    try:
        header = _header(path, max_inflated)
    except Refused:
        raise
    except Exception as exc:  # untrusted bytes: whatever pydicom trips on is the sender's
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {_short(exc)}") from None
    for keyword in _UID_TAGS:
        try:
            value = header.get(keyword)
        except Exception as exc:
            raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {keyword}: {exc}") from None
        if not valid_uid(value):
            problem = "missing" if value in (None, "") else f"not a valid UID ({value!r})"
            raise Refused(CANNOT_UNDERSTAND, f"{keyword} is {problem}")
    invalid = {}
    for keyword in _VALUE_TAGS:
        raw = header.get_item(keyword).value if keyword in header else None  # bytes, not yet decoded
        if raw and not _conforms(header, keyword, raw):
            invalid[keyword] = _as_received(raw)
            del header[keyword]  # recorded as absent; the file keeps it
    return header, invalid


def _header(path: Path, max_inflated: int) -> Dataset:
    """The header's tags, read as pydicom reads a file (skipping the values of other tags) but
    checking that the dataset is whole: a value or pixel data cut short is refused. A deflated
    dataset, which pydicom would inflate whole in memory, is inflated here in steps, keeping only
    its first HEADER_BOUND bytes and refusing it past `max_inflated`."""
    meta = read_file_meta_info(path)  # pynetdicom writes the group length: the dataset follows it
    syntax = UID(meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)
    with path.open("rb") as f:
        f.seek(132 + 12 + meta.FileMetaInformationGroupLength)  # preamble, DICM, (0002,0000), the rest
        body: BinaryIO = f
        size = path.stat().st_size
        if syntax == DeflatedExplicitVRLittleEndian:
            start = _inflated_start(f, max_inflated)
            body, size = cast(BinaryIO, DicomBytesIO(start)), len(start)
        implicit = syntax.is_implicit_VR
        header = read_dataset(body, is_implicit_VR=implicit, is_little_endian=True,
                              stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
                              specific_tags=[Tag(keyword) for keyword in _HEADER_TAGS])
        if syntax != DeflatedExplicitVRLittleEndian or size < HEADER_BOUND:  # a kept start ends anywhere
            _check_whole(header, body, size, implicit)
    header.file_meta = meta
    return header


def _check_whole(header: Dataset, f: BinaryIO, size: int, implicit: bool) -> None:
    """After read_dataset: `f` is at the pixel data element, or past the last element read. A value
    read shorter than its length, a value skipped past the end of the file, or pixel data longer
    than what is left, was cut short."""
    short = [elem.tag for elem in header.elements()
             if isinstance(elem, RawDataElement) and elem.value is not None and elem.length != 0xFFFFFFFF
             and len(elem.value) < elem.length]
    if short or f.tell() > size:
        where = f" in {short[0]}" if short else ""
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: it is cut short{where}")
    head = f.read(8)
    if len(head) < 8:
        return  # no pixel data
    long_form = not implicit and head[4:6] in _LONG_VRS
    length = int.from_bytes(f.read(4), "little") if long_form else int.from_bytes(
        head[4:8] if implicit else head[6:8], "little")
    if length != 0xFFFFFFFF:
        if f.tell() + length > size:
            raise Refused(CANNOT_UNDERSTAND, f"pixel data cut short: {size - f.tell()} of {length} bytes")
        return
    while True:  # encapsulated: items up to the sequence delimiter
        item = f.read(8)
        if len(item) < 8:
            raise Refused(CANNOT_UNDERSTAND, "encapsulated pixel data cut short (no sequence delimiter)")
        if item[:4] == b"\xfe\xff\xdd\xe0":
            return
        f.seek(int.from_bytes(item[4:8], "little"), 1)
        if item[:4] != b"\xfe\xff\x00\xe0" or f.tell() > size:
            raise Refused(CANNOT_UNDERSTAND, "encapsulated pixel data cut short or malformed")


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


# A deflated dataset's header must lie within its first 16 MiB once inflated.
HEADER_BOUND = 16 * 1024 * 1024
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double float, pixel data


def _inflated_start(f, max_inflated: int) -> bytes:
    """The first HEADER_BOUND inflated bytes of the deflate stream in `f`, having inflated the rest
    only to count it (never more than a step in memory); Refused past `max_inflated` bytes."""
    inflater, kept, total = zlib.decompressobj(-zlib.MAX_WBITS), bytearray(), 0
    pending = b""
    while True:
        pending = pending or f.read(1 << 16)
        if not pending:
            return bytes(kept)
        out = inflater.decompress(pending, 1 << 20)
        pending = inflater.unconsumed_tail
        total += len(out)
        if total > max_inflated:
            raise Refused(OUT_OF_RESOURCES, f"deflated dataset inflates to more than "
                          f"{max_inflated // 2**20} MiB (dicom.max_inflated_mb)")
        if len(kept) < HEADER_BOUND:
            kept += out[:HEADER_BOUND - len(kept)]
        if inflater.eof:
            return bytes(kept)


def _check_request(header: Dataset, request) -> None:
    if header.SOPInstanceUID != request.AffectedSOPInstanceUID:
        raise Refused(DOES_NOT_MATCH, "SOPInstanceUID differs from the C-STORE request's")
    if header.SOPClassUID != request.AffectedSOPClassUID:
        raise Refused(DOES_NOT_MATCH, "SOPClassUID differs from the C-STORE request's")


def _conforms(header: Dataset, keyword: str, raw: bytes) -> bool:
    """Whether the element's value (`raw`, as received) is what its VR (the dictionary's) says.
    Numbers and dates are checked on the text, each value against pydicom's pattern for the VR,
    leaving out its length limits (many devices write a DS longer than 16 characters: it is still
    a number); other VRs must decode, and a person's name must have pydicom's shape for a PN."""
    vr = dictionary_VR(keyword)
    try:
        if vr in ("IS", "DS", "DA"):
            text = raw.decode("ascii").rstrip(" \x00")
            values = text.split("\\")
            return not text.strip() or (_fits_vm(keyword, len(values))
                                        and all(_number_or_date(vr, v) for v in values))
        if vr == "US":
            return len(raw) % 2 == 0 and _fits_vm(keyword, len(raw) // 2)
        value = header[keyword].value  # pydicom decodes it with the character set
        if vr == "PN":
            validate_value("PN", str(value), pydicom_config.RAISE)
        return True
    except Exception:  # untrusted bytes: whatever pydicom trips on means "not what the VR says"
        return False


def _number_or_date(vr: str, text: str) -> bool:
    if not validate_regex(vr, text)[0]:
        return False
    if vr == "IS":
        return -2**31 <= int(text) < 2**31
    if vr == "DA":
        DA(text)  # raises for a day the calendar does not have (20260231)
    return True


def _fits_vm(keyword: str, count: int) -> bool:
    vm = dictionary_VM(keyword)
    return not vm.isdigit() or count == int(vm)


def _as_received(raw: bytes, limit: int = 64) -> str:
    """A raw value for an event: its text less padding (non-ASCII bytes escaped), or its bytes in
    hexadecimal where it is not text; cut at `limit` characters."""
    text = raw.decode("ascii", "backslashreplace").rstrip(" \x00")
    if not text.isprintable():
        text = raw.hex(" ")
    return text if len(text) <= limit else text[:limit] + "..."


# What a sender writes in these is not trusted to fit the columns: a value that
# would make the row fail is dropped (the file keeps it), not the instance.

def _text(header: Dataset, keyword: str, limit: int) -> str | None:
    value = header.get(keyword)
    return None if value in (None, "") else str(value).replace("\x00", "")[:limit]


def _number(header: Dataset, keyword: str) -> int | None:
    value = header.get(keyword)
    return None if value in (None, "") else int(value)


def _frames(header: Dataset) -> int:
    frames = _number(header, "NumberOfFrames")
    return 1 if frames is None else frames


def _values(header: Dataset, keyword: str, limit: int) -> str | None:
    """A multi-valued text element's values joined by a backslash, as many whole values as fit."""
    value = header.get(keyword)
    if value in (None, ""):
        return None
    joined = ""
    for v in [value] if isinstance(value, str) else value:
        more = str(v).replace("\x00", "")
        if len(joined) + len(more) + bool(joined) > limit:
            break
        joined = f"{joined}\\{more}" if joined else more
    return joined or None


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
        protocol_name=_text(header, "ProtocolName", 64), body_part=_text(header, "BodyPartExamined", 16),
        image_type=_values(header, "ImageType", IMAGE_TYPE_LENGTH),
        instance_number=_number(header, "InstanceNumber"),
        frames=_frames(header),
        rows=_number(header, "Rows"), columns=_number(header, "Columns"),
    )


def record_missing_facts(engine: Engine, spool: Spool, batch: int = 500) -> tuple[int, list[str]]:
    """Record the header facts of kept instances whose rows have none (rows from before revision
    0004), reading each file's header as ingest does. Returns how many were recorded, and a line
    for each file that could not be read: its row keeps no facts and planning names it on its study.
    `machaon db upgrade` runs this; running it again tries those files again."""
    recorded, unreadable, after = 0, [], 0
    while True:
        with engine.connect() as conn:
            todo = instances_without_facts(conn, after, batch)
        facts = []  # the files are read outside the write transaction
        for instance_id, series_id, relative in todo:
            try:
                with spool.path(relative).open("rb"):  # a missing file says so, not "not DICOM"
                    pass
                header, _invalid = _read_header(spool.path(relative))
                facts.append((instance_id, series_id, _received(header, "", relative, 0, "")))
            except OSError as exc:
                unreadable.append(f"{relative}: {exc.strerror or exc}")
            except Exception as exc:  # Refused, or a header pydicom cannot parse: this file, not the rest
                unreadable.append(f"{relative}: {exc}")
        with engine.begin() as conn:
            for instance_id, series_id, inst in facts:
                record_facts(conn, instance_id, series_id, inst)
        recorded += len(facts)
        if len(todo) < batch:
            return recorded, unreadable
        after = todo[-1][0]
