"""Sending results to their destinations, with retries, and never twice once acknowledged.

Each (result, destination) pair is a delivery row: pending until the
destination acknowledges it, then sent. A failure is recorded on the row and
retried after a backoff that doubles up to `dispatch.retry_max`; nothing is
dropped while a PACS is down. Results carry deterministic UIDs, so even a send
repeated after a crash (acknowledged, not yet recorded) leaves one copy.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pydicom
from sqlalchemy import select

from .config import DicomDestination, DicomWebDestination, DispatchSettings, FolderDestination, Settings
from .spool import Spool, copy_durably
from .store import Delivery, Job, Result, Store, Study, add_event, utcnow

log = logging.getLogger("machaon.dispatch")

SENT = "sent"
PENDING = "pending"


class SendError(Exception):
    """A destination did not take a result; the message says what it answered."""


def send_to_folder(destination: FolderDestination, path: Path, ds: pydicom.Dataset) -> None:
    target = destination.path / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    try:
        copy_durably(path, target)
    except OSError as exc:
        raise SendError(f"cannot write {target}: {exc.strerror or exc}") from None


def send_by_c_store(destination: DicomDestination, path: Path, ds: pydicom.Dataset, calling_ae: str) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
    # The result's own SOP class, in the transfer syntax it was written in (and the default).
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID, "1.2.840.10008.1.2"])
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"{where}: association {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
        code = f"0x{status.Status:04X}" if status else "no response"
        raise SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} answered {code} "
                        f"{status.get('ErrorComment', '') if status else ''}".strip())


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
            .where(Delivery.status == PENDING, Delivery.next_attempt_at <= now).order_by(Delivery.id)
        ).all()
    sent = 0
    for delivery_id, name, attempts, relative, study_uid in due:
        destination = settings.destinations.get(name)
        try:
            if destination is None:
                raise SendError(f"destination {name!r} is no longer configured")
            path = spool.path(relative)
            ds = pydicom.dcmread(path)
            if isinstance(destination, FolderDestination):
                send_to_folder(destination, path, ds)
            elif isinstance(destination, DicomWebDestination):
                send_by_stow_rs(destination, ds)
            else:
                send_by_c_store(destination, path, ds, settings.dicom.ae_title)
        except (SendError, OSError) as exc:
            _retry_later(store, settings.dispatch, delivery_id, attempts, str(exc), study_uid, name)
            continue
        _mark_sent(store, delivery_id, study_uid, name, ds.SOPInstanceUID)
        sent += 1
    return sent


def _mark_sent(store: Store, delivery_id: int, study_uid: str, name: str, sop_uid: str) -> None:
    with store.session.begin() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        delivery.status, delivery.sent_at, delivery.last_error = SENT, utcnow(), None
        delivery.attempts += 1
        add_event(session, "dispatcher", "result.sent", study_uid, destination=name, sop_instance_uid=sop_uid)
    log.info("sent %s to %s", sop_uid, name)


def _retry_later(store: Store, policy: DispatchSettings, delivery_id: int, attempts: int, error: str,
                 study_uid: str, name: str) -> None:
    delay = min(policy.retry_initial * 2 ** attempts, policy.retry_max)
    with store.session.begin() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        delivery.attempts = attempts + 1
        delivery.last_error = error
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        add_event(session, "dispatcher", "result.send_failed", study_uid, destination=name, error=error,
                  attempt=attempts + 1, retry_in_s=delay)
    log.warning("sending to %s failed (attempt %d, next in %.0f s): %s", name, attempts + 1, delay, error)
