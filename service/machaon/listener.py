"""The sockets under the DICOM listener (scp.py): how many connections a peer may hold, the TLS
handshake, and how large a PDU may be, each checked before pynetdicom reads or keeps anything
(DESIGN rule 9: hostile peers get bounded resources).

pynetdicom 3.0.4 accepts every connection, does a TLS handshake in its one accepting thread (a peer
that never finishes it would stop all others), reads without a timeout (a peer that stops halfway
holds its thread for ever), and reads a whole PDU into memory whatever length its header
announces. The server and socket classes here change only those things.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from .config import DicomSettings, DicomTlsSettings

log = logging.getLogger("machaon.scp")

P_DATA_TF = 0x04
# The largest PDU other than a P-DATA-TF we read: an A-ASSOCIATE-RQ proposing every storage SOP
# class in a dozen transfer syntaxes is ~100 KB.
CONTROL_PDU_BOUND = 1024 * 1024


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that refuses a PDU longer than it may be before reading it. pynetdicom's
    DUL reads a PDU as recv(6) (its header) then recv(length): the second call is where an
    oversized PDU is stopped: an A-ABORT is sent, the connection closed, and the DUL told the
    connection has gone (it reads less than the header announced)."""

    announced: tuple[int, int] | None = None  # (PDU type, length) of the header just read
    on_oversize: Callable[[BoundedSocket, int, int, int], None] | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        announced, self.announced = self.announced, None
        if announced is not None and nr_bytes == announced[1]:
            bound = self.pdu_bound(announced[0])
            if nr_bytes > bound:
                self._abort()
                if self.on_oversize:
                    self.on_oversize(self, announced[0], nr_bytes, bound)
                return bytearray()
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            self.announced = (pdu_type, length)
        return data

    def pdu_bound(self, pdu_type: int) -> int:
        """A P-DATA-TF on an established association may be as long as the maximum we told the
        peer (PS3.8 D.1: Maximum Length Received); any other PDU, CONTROL_PDU_BOUND."""
        assoc = self.assoc
        answer = assoc.acceptor.primitive  # our A-ASSOCIATE-AC goes out before is_established is set
        accepted = assoc.is_established or (answer is not None and answer.result == 0)
        if pdu_type == P_DATA_TF and accepted and assoc.acceptor.maximum_length:
            return assoc.acceptor.maximum_length
        return CONTROL_PDU_BOUND

    def _abort(self) -> None:
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00  # service provider, reason not specified
        try:
            if self.socket is not None:
                self.socket.sendall(abort.encode())
                self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer went first


class _Handler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        # The socket pynetdicom just made, with recv bounded: constructing a second one would
        # announce the connection to the state machine twice.
        sock = assoc.dul.socket
        assert sock is not None and isinstance(self.server, ListenerServer)  # set just now; ours
        sock.__class__ = BoundedSocket
        cast(BoundedSocket, sock).on_oversize = self.server.on_oversize
        self.server.connections.attach(self.request, assoc)
        return assoc


@dataclass
class _Connection:
    host: str
    sock: socket.socket
    accepted: float = field(default_factory=time.monotonic)
    assoc: Association | None = None


class Connections:
    """The connections open on every port of the listener, for the caps and the watchdog. A
    connection whose A-ASSOCIATE-RQ has not been read acse_timeout after it was accepted (nothing
    sent, a TLS handshake or a request dribbled in or cut off) is shut down: the thread reading it
    wakes, and its place is free. Later, pynetdicom's timeouts and the socket's apply."""

    def __init__(self, settings: DicomSettings):
        self.settings = settings
        self._open: list[_Connection] = []
        self._said: dict[str, float] = {}  # peer address -> when a refusal was last logged
        self._lock = threading.Lock()  # the accepting thread of each port, and handler threads

    def admit(self, host: str, sock: socket.socket) -> bool:
        with self._lock:
            self._open = [c for c in self._open if c.sock.fileno() != -1]  # pynetdicom closed the rest
            from_host = sum(c.host == host for c in self._open)
            if len(self._open) >= self.settings.max_connections:
                why = f"{len(self._open)} connections already open (dicom.max_connections)"
            elif from_host >= self.settings.max_connections_per_host:
                why = f"{from_host} connections from it already open (dicom.max_connections_per_host)"
            else:
                self._open.append(_Connection(host, sock))
                return True
            self._say(host, why)
            return False

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        with self._lock:
            for connection in self._open:
                if connection.sock is sock:
                    connection.assoc = assoc

    def reap(self) -> None:
        """Shut down the connections that did not become an association in time."""
        deadline = time.monotonic() - self.settings.acse_timeout
        with self._lock:
            late = [c for c in self._open if c.accepted < deadline and c.sock.fileno() != -1
                    and (c.assoc is None or c.assoc.requestor.primitive is None)]  # no A-ASSOCIATE-RQ yet
        for connection in late:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def _say(self, host: str, why: str) -> None:
        """A refused connection is logged once a minute per peer: a flood must not flood the log."""
        now = time.monotonic()
        self._said = {h: t for h, t in self._said.items() if now - t < 60}  # bounded by the flood's rate
        if host not in self._said:
            self._said[host] = now
            log.warning("connection from %s closed at once: %s (said once a minute per address)",
                        host, why)


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the caps and watchdog of `connections` (shared by every
    port), a timeout on every read, and the TLS handshake done in the connection's own thread."""

    daemon_threads = True  # a connection's thread never holds up stopping (the watchdog ends it)
    block_on_close = False

    def __init__(self, ae, address, settings: DicomSettings, ssl_context: ssl.SSLContext | None,
                 evt_handlers, on_oversize: Callable[[BoundedSocket, int, int, int], None],
                 connections: Connections):
        self.settings = settings
        self.on_oversize = on_oversize
        self.connections = connections
        super().__init__(ae, address, ae.ae_title, ae.supported_contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=_Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]  # bound by now
        # A peer that stops mid-message on an established association is dropped after this long.
        client.settimeout(self.settings.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        """Called by the accepting thread for each new connection: False closes it at once."""
        return self.connections.admit(client_address[0], request)

    def service_actions(self) -> None:
        """Called by the accepting thread's loop about twice a second."""
        super().service_actions()
        self.connections.reap()

    def finish_request(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()  # within acse_timeout, or the watchdog shuts the socket
            except (OSError, ssl.SSLError) as exc:
                reason = _tls_reason(exc)
                # A peer that leaves before saying anything (a port probe) is not worth a warning.
                log.log(logging.WARNING if reason else logging.INFO,
                        "DICOM TLS connection from %s refused: the TLS handshake failed: %s",
                        client_address[0], reason or "the connection ended before the handshake "
                        "finished (or it took over dicom.acse_timeout)")
                self.shutdown_request(request)
                return
        super().finish_request(request, client_address)


def _tls_reason(exc: Exception) -> str | None:
    """What went wrong in a TLS handshake (PEER_DID_NOT_RETURN_A_CERTIFICATE, TLSV1_ALERT_UNKNOWN_CA,
    ...), or None where the connection just ended."""
    if isinstance(exc, ssl.SSLError) and exc.reason and exc.reason != "UNEXPECTED_EOF_WHILE_READING":
        return exc.reason
    return None


def tls_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    """The server context for [dicom.tls]: TLS 1.2 or later, the client's certificate checked
    against ca_certificates (and required if require_client_certificate). Raises OSError or
    ssl.SSLError naming the file that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def start_server(ae, address: tuple[str, int], settings: DicomSettings, ssl_context: ssl.SSLContext | None,
                 evt_handlers, on_oversize, connections: Connections) -> ListenerServer:
    """Bind `address` and serve it in a background thread (as AE.start_server(block=False))."""
    server = ListenerServer(ae, address, settings, ssl_context, evt_handlers, on_oversize, connections)
    ae._servers.append(server)  # so that AE.shutdown stops it, as it does the servers it starts
    threading.Thread(target=server.serve_forever, name=f"listener:{address[1]}", daemon=True).start()
    return server
