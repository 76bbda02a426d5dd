"""DICOM TLS on the listener, with DCMTK as the sender: storescu +tls stores, a sender without a
certificate is refused where one is required, and a connection that never starts its handshake does
not hold up the others."""

from __future__ import annotations

import socket
import subprocess

from tests.dicomgen import write_ct_series
from tests.harness import acknowledged, free_port, make_certificates, storescu


def tls_server(serve, tmp_path, **tls):
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    table = {"port": port, "certificate": str(certs / "pacs.crt"), "private_key": str(certs / "pacs.key"),
             "ca_certificates": str(certs / "ca.crt"), **tls}
    extra = "[dicom.tls]\n" + "".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else v}\n"
        for k, v in table.items())
    return serve(extra=extra.replace("'", '"')), port, certs


def test_storescu_over_tls_stores_and_a_silent_connection_holds_nothing_up(serve, tmp_path):
    server, port, certs = tls_server(serve, tmp_path)
    silent = socket.create_connection(("127.0.0.1", port))  # never sends a ClientHello
    ct = write_ct_series(tmp_path / "ct", slices=2, size=64)
    client = ("+tls", str(certs / "machaon.key"), str(certs / "machaon.crt"), "+cf", str(certs / "ca.crt"))
    sent = storescu(port, *ct, extra=client)
    assert acknowledged(sent.stderr) == 2, sent.stderr
    echo = subprocess.run(["/usr/bin/echoscu", "-v", *client, "-aec", "MACHAON", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    assert acknowledged(storescu(server.port, *ct).stderr) == 2  # the plain port too (tls.plain)
    assert f"listening as MACHAON on 127.0.0.1:{port} (DICOM TLS)" in server.log()
    silent.settimeout(15)  # dropped after acse_timeout (5 s) without a handshake
    assert silent.recv(1024) == b""
    assert server.stop() == 0


def test_a_sender_without_a_certificate_is_refused(serve, tmp_path):
    server, port, certs = tls_server(serve, tmp_path, plain=False)
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    anonymous = storescu(port, *ct, extra=("+tla", "+cf", str(certs / "ca.crt")))
    assert anonymous.returncode != 0 and acknowledged(anonymous.stderr) == 0, anonymous.stderr
    server.wait_for(lambda: "DICOM TLS connection from 127.0.0.1 refused: the TLS handshake failed"
                    in server.log(), what="the refusal to be logged")
    untrusted = make_certificates(tmp_path / "other")  # a certificate from a CA machaon does not trust
    wrong_ca = storescu(port, *ct, extra=("+tls", str(untrusted / "machaon.key"), str(untrusted / "machaon.crt"),
                                          "+cf", str(certs / "ca.crt")))
    assert acknowledged(wrong_ca.stderr) == 0, wrong_ca.stderr
    assert f"listening as MACHAON on 127.0.0.1:{server.port}" not in server.log()  # plain = false
