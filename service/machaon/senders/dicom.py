"""DICOM destinations: results stored by C-STORE at a PACS, over DICOM TLS where configured.

`DicomClient` is the one way machaon calls a DICOM node: the dispatcher, `machaon echo` and the
demo all associate through it, so an association that cannot be made is explained the same way
everywhere (rejected and why, no TCP connection and the system's reason, a TLS handshake that
failed and on which side, aborted, no answer).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator, Sequence
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


class DicomClient:
    """Associations from `calling_ae` to the node `called_ae` at host:port, every network operation
    (connection, TLS handshake, each wait for an answer) bounded by `timeout` seconds."""

    def __init__(self, called_ae: str, host: str, port: int, *, calling_ae: str, timeout: float,
                 tls: TlsSettings | None = None):
        self.called_ae, self.host, self.port = called_ae, host, port
        self.calling_ae, self.timeout, self.tls = calling_ae, timeout, tls
        self.where = f"{called_ae}@{host}:{port}"

    @classmethod
    def of(cls, destination: DicomDestination, calling_ae: str) -> DicomClient:
        return cls(destination.ae_title, destination.host, destination.port, calling_ae=calling_ae,
                   timeout=destination.timeout, tls=destination.tls)

    @contextmanager
    def association(self, contexts: Sequence[tuple[str, Sequence[str] | None]]) -> Iterator[Association]:
        """An association offering `contexts` (abstract syntax, transfer syntaxes or None for
        pynetdicom's defaults), released on leaving; SendError says why there is none."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for abstract_syntax, transfer_syntaxes in contexts:
            ae.add_requested_context(abstract_syntax, transfer_syntaxes)
        try:
            tls_args = (self.tls.context(), self.host) if self.tls else None
        except SettingError as exc:  # a certificate file changed since start-up
            raise SendError(f"{self.where}: {exc}") from None
        connected: list[bool] = []  # tells "no network path" apart from "DICOM said no"
        answers: list[Any] = []  # pynetdicom only logs why an association was rejected
        def opened(event: Any) -> None:
            connected.append(True)
            # pynetdicom clears the socket's timeout once connected, so a peer that stops reading
            # would block a send for ever; with it, a stalled write fails within our timeout.
            event.assoc.dul.socket.socket.settimeout(self.timeout)

        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, opened),
            (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args,
                                 evt_handlers=handlers)
        except OSError as exc:  # the host name did not resolve
            raise SendError(f"{self.where}: association failed: "
                            f"{self.connection_problem() or exc.strerror or exc}") from None
        if not assoc.is_established:
            why = self._why_not(assoc, contexts, connected, answers)
            raise SendError(f"{self.where}: association failed: {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _why_not(self, assoc: Association, contexts: Sequence[tuple[str, Sequence[str] | None]],
                 connected: list[bool], answers: list[Any]) -> str:
        """Why an association request came to nothing, in words an operator can act on."""
        from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

        if assoc.is_rejected:
            why = next((f"{a.result_str}: {a.reason_str}" for a in answers
                        if isinstance(a, A_ASSOCIATE) and a.result), "")
            return (f"the node rejected the association: check that it knows the calling AE title "
                    f"{self.calling_ae} and is called {self.called_ae}" + (f" ({why})" if why else ""))
        if any(isinstance(a, A_ASSOCIATE) and a.result == 0 for a in answers):  # none of our contexts
            offered = ", ".join(dict.fromkeys(UID(abstract_syntax).name for abstract_syntax, _ in contexts))
            return (f"it does not accept {offered} objects (no presentation context accepted): allow "
                    "them on the node, or send them elsewhere")
        if not connected or self.tls:
            # pynetdicom only logs why it could not connect, and a peer that refuses our TLS
            # certificate says so after the handshake: try again here, where the error is kept.
            reason = self.connection_problem()
            if reason:
                return reason
        if any(isinstance(a, A_ABORT | A_P_ABORT) for a in answers):
            return "the node aborted the association request (is it a DICOM node?)"
        return f"no answer to the association request within {self.timeout:g} s"

    def connection_problem(self) -> str | None:
        """Why no connection (or no TLS session) can be made to the node, or None when one can."""
        try:
            raw = socket.create_connection((self.host, self.port), self.timeout)
        except socket.gaierror as exc:
            return f"could not be reached ({exc.strerror or exc}): check the host name"
        except TimeoutError:
            return (f"could not be reached (no TCP connection within {self.timeout:g} s): is the PACS "
                    "listening at that address and port, and does a firewall let us through?")
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
                    tls.settimeout(min(self.timeout, 2))
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
                return (f"no answer to the TLS handshake within {self.timeout:g} s: is this the PACS's "
                        "DICOM TLS port?")
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
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # pynetdicom's word for an association that is gone
                raise SendError(f"{self.where}: the association was lost before all results were "
                                "sent") from None
            except (ValueError, AttributeError) as exc:  # not encodable in any accepted context
                yield SendError(f"{self.where}: cannot send {ds.SOPInstanceUID}: {exc}")
                continue
            yield c_store_failure(self.where, ds, status)


def c_store_failure(where: str, ds: pydicom.Dataset, status: pydicom.Dataset | None) -> SendError | None:
    """What a C-STORE status says went wrong, or None when the node keeps the object (with a
    warning or not)."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    if status and status.Status in (0x0000, 0xB000, 0xB007, 0xB006):
        return None
    if not status:
        return SendError(f"{where}: no response to the C-STORE of {ds.SOPInstanceUID}")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status.Status, ("", "a status unknown to DICOM"))[1]
    comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
    return SendError(f"{where}: C-STORE of {ds.SOPInstanceUID} answered 0x{status.Status:04X} "
                     f"({meaning}){comment}")
