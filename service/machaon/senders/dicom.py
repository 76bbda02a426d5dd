"""DICOM destinations: results stored by C-STORE at a PACS, over DICOM TLS where configured.

`DicomClient` is the one way machaon calls a DICOM node: the dispatcher, `machaon echo` and the
demo all associate through it, so an association that cannot be made is explained the same way
everywhere (rejected and why, no TCP connection and the system's reason, a TLS handshake that
failed and on which side, the connection closed, timed out waiting for an answer).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydicom
from pydantic import AfterValidator, Field, model_validator
from pydicom.uid import UID, ImplicitVRLittleEndian

from .base import DestinationSettings, Outcomes, Outgoing, SendError, SettingError, Table

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import EventHandlerType


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isascii():
        raise ValueError("an AE title is 1 to 16 ASCII characters, without backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class TlsSettings(Table):
    """TLS to a destination: the CA certificates (PEM) that vouch for it, and our own certificate
    and key for a peer that asks for one (DICOM TLS usually does). Loaded at start-up."""

    ca_certificates: Path
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = True  # the peer's certificate must name the host we connect to

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key, or neither")
        return self

    def context(self) -> ssl.SSLContext:
        """An SSL context for connecting to the peer; SettingError names the file that cannot be used."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_certificates))
        except (OSError, ssl.SSLError) as exc:
            raise SettingError("tls.ca_certificates",
                               f"cannot load {self.ca_certificates}: {_why(exc)}") from None
        context.check_hostname = self.check_hostname
        if self.certificate:
            try:
                # A key protected by a pass phrase would make OpenSSL ask for it on the terminal.
                context.load_cert_chain(self.certificate, self.private_key, password=_no_pass_phrase)
            except (OSError, ValueError) as exc:
                raise SettingError("tls.certificate", f"cannot use {self.certificate} with "
                                   f"{self.private_key}: {_why(exc)}") from None
        return context


def _no_pass_phrase() -> str:
    raise ValueError("the private key is protected by a pass phrase; give machaon a key without one, "
                     "readable by machaon alone")


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the private key does not belong to the certificate"
    return reason or getattr(exc, "strerror", None) or str(exc)


class DicomDestination(DestinationSettings):
    """A DICOM node (a PACS) that receives results by C-STORE."""

    type: Literal["dicom"]
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    connect_timeout: float = Field(5, gt=0)  # seconds for the TCP connection (and TLS handshake)
    # Seconds to wait for each answer: to the association request, to each C-STORE (and for a
    # peer to read what is sent to it).
    timeout: float = Field(30, gt=0)
    tls: TlsSettings | None = None  # DICOM TLS (the PACS's TLS port, often 2762)

    def check(self) -> None:
        if self.tls:
            self.tls.context()


class DicomSender:
    """All results of a batch over one association; each SOP class offered in the transfer syntax its
    results were written in, then Implicit VR Little Endian (which every node accepts)."""

    def __init__(self, destination: DicomDestination, *, calling_ae: str):
        self.client = DicomClient.of(destination, calling_ae)

    def send(self, results: Sequence[Outgoing]) -> Outcomes:
        datasets = [result.dataset for result in results]
        contexts = []
        for sop_class in dict.fromkeys(ds.SOPClassUID for ds in datasets):
            written = sorted({ds.file_meta.TransferSyntaxUID for ds in datasets
                              if ds.SOPClassUID == sop_class})
            contexts.append((sop_class, list(dict.fromkeys([*written, ImplicitVRLittleEndian]))))
        with self.client.association(contexts) as assoc:
            yield from self.client.c_store(assoc, datasets)


class _OpenAssociations:
    """The associations in progress and the threads that opened them, so that a stopping service
    can abandon those its sends hold: pynetdicom's connection thread is not a daemon, and one
    waiting for a hung node would keep the process alive until its timeout ran out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Association, threading.Thread] = {}
        self._abandoned: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    def add(self, assoc: Association, opener: threading.Thread) -> None:
        with self._lock:
            if opener in self._abandoned:  # connected only after it was abandoned
                _drop(assoc)
            else:
                self._open[assoc] = opener

    def discard(self, assoc: Association) -> None:
        with self._lock:
            self._open.pop(assoc, None)

    def abandon(self, openers: Collection[threading.Thread]) -> None:
        """Stop the connection thread of every association that `openers` have open, now or once
        connected, wherever it is (no A-ABORT: a hung node would not read it)."""
        with self._lock:
            self._abandoned.update(openers)
            for assoc, opener in self._open.items():
                if opener in self._abandoned:
                    _drop(assoc)


def _drop(assoc: Association) -> None:
    """Stop `assoc`'s connection thread and shut its socket, which wakes a send blocked on a node
    that stopped reading."""
    assoc.dul.kill_dul()
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


OPEN_ASSOCIATIONS = _OpenAssociations()


class DicomClient:
    """Associations from `calling_ae` to the node `called_ae` at host:port, the connection (and
    TLS handshake) bounded by `connect_timeout` seconds (`timeout` when not given) and each wait
    for an answer by `timeout`."""

    def __init__(self, called_ae: str, host: str, port: int, *, calling_ae: str, timeout: float,
                 tls: TlsSettings | None = None, connect_timeout: float | None = None):
        self.called_ae, self.host, self.port = called_ae, host, port
        self.calling_ae, self.timeout, self.tls = calling_ae, timeout, tls
        self.connect_timeout = connect_timeout or timeout
        self.where = f"{called_ae}@{host}:{port}"

    @classmethod
    def of(cls, destination: DicomDestination, calling_ae: str) -> DicomClient:
        return cls(destination.ae_title, destination.host, destination.port, calling_ae=calling_ae,
                   timeout=destination.timeout, tls=destination.tls,
                   connect_timeout=destination.connect_timeout)

    @contextmanager
    def association(self, contexts: Sequence[tuple[str, Sequence[str] | None]]) -> Iterator[Association]:
        """An association offering `contexts` (abstract syntax, transfer syntaxes or None for
        pynetdicom's defaults), released on leaving; SendError says why there is none."""
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connect_timeout
        ae.acse_timeout = ae.dimse_timeout = self.timeout
        # pynetdicom's idle limit aborts an association silent for so long: longer than the waits
        # above, so that a hung node is found by them and reported as such, not as an abort.
        ae.network_timeout = 2 * self.timeout
        for abstract_syntax, transfer_syntaxes in contexts:
            ae.add_requested_context(abstract_syntax, transfer_syntaxes)
        try:
            tls_args = (self.tls.context(), self.host) if self.tls else None
        except SettingError as exc:  # a certificate file changed since start-up
            raise SendError(f"{self.where}: {exc}") from None
        seen = _Seen(self.timeout, opener=threading.current_thread())
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args,
                                 evt_handlers=seen.handlers())
        except OSError as exc:  # the host name did not resolve
            raise SendError(f"{self.where}: association failed: "
                            f"{self.connection_problem() or exc.strerror or exc}") from None
        try:
            if not assoc.is_established:
                raise SendError(f"{self.where}: association failed: {self._why_not(assoc, contexts, seen)}")
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            OPEN_ASSOCIATIONS.discard(assoc)

    def _why_not(self, assoc: Association, contexts: Sequence[tuple[str, Sequence[str] | None]],
                 seen: _Seen) -> str:
        """Why an association request came to nothing, in words an operator can act on."""
        from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT

        answers = seen.answers
        if assoc.is_rejected:
            why = next((f"{a.result_str}: {a.reason_str}" for a in answers
                        if isinstance(a, A_ASSOCIATE) and a.result), "")
            return (f"the node rejected the association: check that it knows the calling AE title "
                    f"{self.calling_ae} and is called {self.called_ae}" + (f" ({why})" if why else ""))
        if any(isinstance(a, A_ASSOCIATE) and a.result == 0 for a in answers):  # none of our contexts
            offered = ", ".join(dict.fromkeys(UID(abstract_syntax).name for abstract_syntax, _ in contexts))
            return (f"it does not accept {offered} objects (no presentation context accepted): allow "
                    "them on the node, or send them elsewhere")
        if not seen.connected or self.tls:
            # pynetdicom only logs why it could not connect, and a peer that refuses our TLS
            # certificate says so after the handshake: try again here, where the error is kept.
            reason = self.connection_problem()
            if reason:
                return reason
        if seen.aborts:
            abort = seen.aborts[0]
            why = abort.source_str + (f": {abort.reason_str}" if abort.source == 2 else "")
            return (f"the node aborted the association request (A-ABORT from its {why}): is it a DICOM node, "
                    f"and does it know the calling AE title {self.calling_ae}?")
        if any(isinstance(a, A_P_ABORT) for a in answers):  # the connection was closed under us
            return ("the node closed the connection without answering the association request: is this "
                    "port a DICOM node's?")
        return (f"timed out: no answer to the association request within {self.timeout:g} s (the node took "
                "the connection: is it hung or overloaded?)")

    def connection_problem(self) -> str | None:
        """Why no connection (or no TLS session) can be made to the node, or None when one can."""
        try:
            raw = socket.create_connection((self.host, self.port), self.connect_timeout)
        except socket.gaierror as exc:
            return f"could not be reached ({exc.strerror or exc}): check the host name"
        except TimeoutError:
            return (f"could not be reached: connection timed out after {self.connect_timeout:g} s (no TCP "
                    "connection): is the PACS listening at that address and port, and does a firewall let "
                    "us through?")
        except OSError as exc:
            return (f"could not be reached ({exc.strerror or exc}): is the PACS listening at that address "
                    "and port?")
        with raw:
            if not self.tls:
                return None
            try:
                with self.tls.context().wrap_socket(raw, server_hostname=self.host) as tls:
                    # With TLS 1.3 the server judges our certificate after the handshake: its
                    # verdict, if any, arrives as an alert on the first read.
                    tls.settimeout(min(self.connect_timeout, 2))
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
            except SettingError as exc:
                return str(exc)
            except TimeoutError:
                return (f"TLS handshake timed out: no answer within {self.connect_timeout:g} s: is this the "
                        "PACS's DICOM TLS port?")
            except OSError as exc:
                return (f"the PACS closed the TLS connection ({exc.strerror or exc}): does it want a client "
                        "certificate (tls.certificate), and does it trust the one given?")
        return None

    def c_store(self, assoc: Association, datasets: Sequence[pydicom.Dataset]) -> Iterator[SendError | None]:
        """C-STORE each dataset in turn: None once the node keeps it, else why not. Raises SendError
        when the association is lost (the rest were not sent)."""
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        for ds in datasets:
            if ds.SOPClassUID not in accepted:
                yield SendError(f"{self.where} does not accept {ds.SOPClassUID.name} objects (presentation "
                                "context rejected): allow that SOP class on the PACS, or route this "
                                "model's results elsewhere")
                continue
            started = time.monotonic()
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # pynetdicom's word for an association that is gone
                raise SendError(f"{self.where}: the association was lost before all results were "
                                "sent") from None
            except (ValueError, AttributeError) as exc:  # not encodable in any accepted context
                yield SendError(f"{self.where}: cannot send {ds.SOPInstanceUID}: {exc}")
                continue
            # No status comes back both when our wait ran out and when the node ended the
            # association first; the time it took tells them apart.
            waited_out = time.monotonic() - started >= self.timeout
            yield c_store_failure(self.where, ds, status, timeout=self.timeout if waited_out else None)


class _Seen:
    """What pynetdicom tells only its log, from its events: whether a connection was made (no
    network path, or DICOM said no), the ACSE answers (why an association was rejected), the
    A-ABORT PDUs the node sent (an abort that came from it, not from our own timeout)."""

    def __init__(self, timeout: float, opener: threading.Thread):
        self.timeout, self.opener = timeout, opener
        self.connected = False
        self.answers: list[Any] = []
        self.aborts: list[Any] = []

    def handlers(self) -> list[EventHandlerType]:
        from pynetdicom import evt

        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._answered),
                (evt.EVT_PDU_RECV, self._received)]

    def _opened(self, event: Any) -> None:
        self.connected = True
        OPEN_ASSOCIATIONS.add(event.assoc, self.opener)
        # pynetdicom clears the socket's timeout once connected, so a peer that stops reading
        # would block a send for ever; with it, a stalled write fails within our timeout.
        event.assoc.dul.socket.socket.settimeout(self.timeout)

    def _answered(self, event: Any) -> None:
        self.answers.append(event.primitive)

    def _received(self, event: Any) -> None:
        from pynetdicom.pdu import A_ABORT_RQ

        if isinstance(event.pdu, A_ABORT_RQ):
            self.aborts.append(event.pdu)


def c_store_failure(where: str, ds: pydicom.Dataset, status: pydicom.Dataset | None,
                    timeout: float | None = None) -> SendError | None:
    """What a C-STORE status says went wrong, or None when the node keeps the object (with a
    warning or not). No status at all: the wait for it ran out (`timeout`, the seconds waited), or
    else the node ended the association first."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    if status and status.Status in (0x0000, 0xB000, 0xB007, 0xB006):
        return None
    if not status and timeout:
        return SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} timed out: no answer within {timeout:g} s")
    if not status:
        return SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} got no answer: the node aborted the "
                         "association or closed the connection")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status.Status, ("", "a status unknown to DICOM"))[1]
    comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
    return SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} rejected with status 0x{status.Status:04X} "
                     f"({meaning}){comment}")
