"""Sending results to their destinations, with retries, and never twice once acknowledged.

Each (result, destination) pair is a delivery row: pending until the
destination acknowledges it, then sent. A failure is recorded on the row and
retried after a backoff that doubles up to `dispatch.retry_max`; nothing is
dropped while a PACS is down. Results carry deterministic UIDs, so even a send
repeated after a crash (acknowledged, not yet recorded) leaves one copy.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from .config import DicomDestination, DicomWebDestination, DispatchSettings, FolderDestination, Settings
from .spool import Spool, copy_durably
from .store import Delivery, DeliveryStatus, Job, Result, Store, Study, add_event, utcnow

log = logging.getLogger("machaon.dispatch")

PER_ASSOCIATION = 50


class SendError(Exception):
    """A destination did not take a result; the message says what it answered."""


def send_to_folder(destination: FolderDestination, path: Path, ds: pydicom.Dataset) -> None:
    target = destination.path / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    try:
        copy_durably(path, target)
    except OSError as exc:
        raise SendError(f"cannot write {target}: {exc.strerror or exc}") from None


def send_by_c_store(destination: DicomDestination, datasets: list[pydicom.Dataset],
                    calling_ae: str) -> Iterator[SendError | None]:
    """C-STORE `datasets` over one association, yielding for each None once it was acknowledged,
    or why it was not. Raises SendError when the association cannot be made or is lost."""
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = _associate(destination, datasets, calling_ae, where)
    try:
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        for ds in datasets:
            if ds.SOPClassUID not in accepted:
                yield SendError(f"{where} does not accept {ds.SOPClassUID.name} objects (presentation "
                                "context rejected): allow that SOP class on the PACS, or route this "
                                "model's results elsewhere")
                continue
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # pynetdicom's word for an association that is gone
                raise SendError(f"{where}: the association was lost before all results were sent") from None
            except (ValueError, AttributeError) as exc:  # not encodable in any accepted context
                yield SendError(f"{where}: cannot send {ds.SOPInstanceUID}: {exc}")
                continue
            yield _refusal(where, ds, status)
    finally:
        if assoc.is_established:
            assoc.release()


def _associate(destination: DicomDestination, datasets: list[pydicom.Dataset], calling_ae: str, where: str):
    """An association that offers each result's SOP class in the transfer syntax it was written
    in, then Implicit VR Little Endian; SendError says why there is none."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
    for sop_class in {ds.SOPClassUID for ds in datasets}:
        syntaxes = {ds.file_meta.TransferSyntaxUID for ds in datasets if ds.SOPClassUID == sop_class}
        ae.add_requested_context(sop_class, list(dict.fromkeys([*sorted(syntaxes), ImplicitVRLittleEndian])))
    try:
        tls_args = (destination.tls.context(), destination.host) if destination.tls else None
    except ValueError as exc:  # a certificate file changed since start-up
        raise SendError(f"{where}: tls.{exc}") from None
    answers = []  # pynetdicom only logs why an association was rejected
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))])
    if assoc.is_rejected:
        why = next((f"{a.result_str}, {a.reason_str}" for a in answers if hasattr(a, "reason_str")), "")
        raise SendError(f"{where}: association rejected ({why}): check that the PACS knows the calling "
                        f"AE title {calling_ae} and that its own AE title is {destination.ae_title}")
    if not assoc.is_established:
        why = _no_connection(destination) or ("the PACS aborted the association request" if assoc.is_aborted
                                              else "no answer to the association request")
        raise SendError(f"{where}: association failed: {why}")
    return assoc


def _no_connection(destination: DicomDestination) -> str | None:
    """Why no connection could be made, or None: pynetdicom only logs it, so the connection (and
    the TLS handshake) is tried again here, where its error can be kept on the delivery."""
    try:
        with socket.create_connection((destination.host, destination.port), destination.timeout) as raw:
            if destination.tls:
                with destination.tls.context().wrap_socket(raw, server_hostname=destination.host) as tls:
                    # With TLS 1.3 the server judges our certificate after the handshake: its
                    # verdict, if any, arrives as an alert on the first read.
                    tls.settimeout(min(destination.timeout, 2))
                    try:
                        tls.recv(1)
                    except TimeoutError:
                        pass
    except ssl.SSLCertVerificationError as exc:
        return (f"TLS handshake failed: its certificate is not trusted ({exc.verify_message}); "
                "check tls.ca_certificates")
    except ssl.SSLError as exc:
        return (f"TLS refused by the PACS ({exc.reason or exc}): does it want a client certificate "
                "(tls.certificate), and does it trust the one given?")
    except OSError as exc:
        return f"{exc.strerror or exc} (is the PACS listening at that address and port?)"
    return None


def _refusal(where: str, ds: pydicom.Dataset, status) -> SendError | None:
    """None for a C-STORE status that means the PACS keeps the object (warnings included)."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    if status and status.Status in (0x0000, 0xB000, 0xB007, 0xB006):
        return None
    if not status:
        return SendError(f"{where}: no response to the C-STORE of {ds.SOPInstanceUID}")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status.Status, ("", "a status unknown to DICOM"))[1]
    comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
    return SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} answered 0x{status.Status:04X} "
                     f"({meaning}){comment}")


def send_by_stow_rs(destination: DicomWebDestination, ds: pydicom.Dataset) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if destination.username:
        session.auth = (destination.username, destination.password or "")
    client = DICOMwebClient(destination.url, session=session, timeout=destination.timeout)
    try:
        response = client.store_instances([ds])
    except requests.RequestException as exc:
        raise SendError(f"{destination.url}: STOW-RS of {ds.SOPInstanceUID} failed: {exc}") from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "no reason given")
        raise SendError(f"{destination.url}: STOW-RS refused {ds.SOPInstanceUID} (failure reason {reason})")


def run_dispatch(settings: Settings, store: Store, spool: Spool) -> int:
    """Send every delivery that is due; returns how many were sent."""
    now = utcnow()
    with store.read_session() as session:
        due = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.attempts, Result.path, Study.study_uid)
            .join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.id)
        ).all()
    by_destination = defaultdict(list)
    for row in due:
        by_destination[row.destination].append(row)
    # A backlog left by an outage goes in pieces: so many results read and sent per association.
    return sum(_send_to(settings, store, spool, name, rows[i:i + PER_ASSOCIATION])
               for name, rows in by_destination.items() for i in range(0, len(rows), PER_ASSOCIATION))


def _send_to(settings: Settings, store: Store, spool: Spool, name: str, rows: list) -> int:
    """Send deliveries due at one destination (one association for a DICOM peer); returns how many."""
    destination = settings.destinations.get(name)
    if destination is None:
        for row in rows:
            _retry_later(store, settings.dispatch, row, f"destination {name!r} is no longer configured: "
                         "configure it again, or its results wait")
        return 0
    ready = []
    for row in rows:
        try:
            path = spool.path(row.path)
            ready.append((row, path, pydicom.dcmread(path)))
        except (OSError, InvalidDicomError) as exc:
            _retry_later(store, settings.dispatch, row, f"cannot read the result {row.path}: {exc}")
    outcomes = _sending(destination, ready, settings.dicom.ae_title)
    sent = handled = 0
    try:
        for row, _, ds in ready:
            error = next(outcomes)
            if error:
                _retry_later(store, settings.dispatch, row, str(error))
            else:
                _mark_sent(store, row, ds.SOPInstanceUID)
                sent += 1
            handled += 1
    except Exception as exc:  # no association, or it was lost: the rest waits for the next attempt
        if not isinstance(exc, SendError):  # a bug must not stall this destination or the others
            log.exception("sending to %s failed unexpectedly", name)
            exc = f"unexpected error: {exc!r} (details in the service log)"
        for row, _, _ in ready[handled:]:
            _retry_later(store, settings.dispatch, row, str(exc))
    finally:
        outcomes.close()
    return sent


def _sending(destination, ready: list, calling_ae: str) -> Iterator[SendError | None]:
    """Each ready result sent to `destination` in turn: None when it took it, else why not."""
    if isinstance(destination, DicomDestination):
        yield from send_by_c_store(destination, [ds for _, _, ds in ready], calling_ae)
        return
    for _, path, ds in ready:
        try:
            if isinstance(destination, FolderDestination):
                send_to_folder(destination, path, ds)
            else:
                send_by_stow_rs(destination, ds)
        except SendError as exc:
            yield exc
        else:
            yield None


def _mark_sent(store: Store, row, sop_uid: str) -> None:
    with store.session.begin() as session:
        delivery = session.get(Delivery, row.id, with_for_update=True)
        delivery.status, delivery.sent_at, delivery.last_error = DeliveryStatus.SENT, utcnow(), None
        delivery.attempts += 1
        add_event(session, "dispatcher", "result.sent", row.study_uid, destination=row.destination,
                  sop_instance_uid=sop_uid)
    log.info("sent %s to %s", sop_uid, row.destination)


def _retry_later(store: Store, policy: DispatchSettings, row, error: str) -> None:
    attempts, name, study_uid = row.attempts, row.destination, row.study_uid
    delay = min(policy.retry_initial * 2 ** attempts, policy.retry_max)
    with store.session.begin() as session:
        delivery = session.get(Delivery, row.id, with_for_update=True)
        delivery.attempts = attempts + 1
        delivery.last_error = error
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        add_event(session, "dispatcher", "result.send_failed", study_uid, destination=name, error=error,
                  attempt=attempts + 1, retry_in_s=delay)
    log.warning("sending to %s failed (attempt %d, next in %.0f s): %s", name, attempts + 1, delay, error)
