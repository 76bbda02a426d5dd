"""The listener under hostile or careless peers: connections that never associate hold no slot,
each address has a cap, oversized PDUs and deflate bombs are stopped before they cost memory, who
may call (and from where, and to whom) is checked, and a UID claimed by two studies stays with the
first. Hostile traffic comes from 127.0.0.2 and real senders from 127.0.0.1 (both loopback)."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.dicomgen import ct_slice, write_ct_series
from tests.harness import acknowledged, storescu

HOSTILE = "127.0.0.2"


def connect(port: int, source: str = HOSTILE) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def closed_by_peer(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it was still open after `within` s."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_connections_that_never_associate_hold_no_slot(serve, tmp_path):
    """With room for one association, ten connect-and-close connections and five that stay silent
    do not keep a real sender out; the silent ones are dropped after acse_timeout."""
    server = serve(dicom={"max_associations": 1, "acse_timeout": 2})
    for _ in range(10):
        connect(server.port).close()
    silent = [connect(server.port) for _ in range(5)]
    ct = write_ct_series(tmp_path / "ct", slices=2, size=64)
    sent = storescu(server.port, *ct)
    assert acknowledged(sent.stderr) == 2, sent.stderr
    for sock in silent:  # nothing sent: closed by the server, with nothing said
        assert closed_by_peer(sock, within=15) == b""


def test_connections_per_address_are_capped(serve, tmp_path):
    server = serve(dicom={"max_connections_per_host": 3, "acse_timeout": 30})
    held = [connect(server.port) for _ in range(3)]
    time.sleep(0.5)  # the server counts a connection once it has accepted it
    extra = connect(server.port)
    assert closed_by_peer(extra, within=5) == b""  # closed at once, long before acse_timeout
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    assert acknowledged(storescu(server.port, *ct).stderr) == 1  # another address is not held up
    server.wait_for(lambda: "connection from 127.0.0.2 closed at once: 3 connections from it already open"
                    in server.log(), what="the refused connection to be logged")
    for sock in held:
        sock.close()


def test_an_oversized_pdu_aborts_before_it_is_read(serve, tmp_path):
    """A PDU header announcing 4 GiB, before any association and on an established one: A-ABORT and
    the connection closed at once, without reading (or keeping) what follows."""
    server = serve()
    baseline = rss_mb(server.proc.pid)
    sock = connect(server.port)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF))
    answer = closed_by_peer(sock, within=10)
    assert answer is not None and answer[:1] == b"\x07", answer  # A-ABORT-RQ, then closed
    flood = connect(server.port)
    try:  # the same, with what it announced following: the server closes without reading it
        flood.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\0" * (64 << 20))
        raise AssertionError("64 MiB were read by a server that should have closed the connection")
    except (BrokenPipeError, ConnectionResetError):
        pass

    ae = AE("SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON", bind_address=(HOSTILE, 0))
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 262144 + 1) + b"\0" * 65536)  # one byte too long
    server.wait_for(lambda: assoc.is_aborted, what="the association to be aborted")
    server.wait_for(lambda: "aborted: a PDU of type 0x04 announced 262145 bytes, more than the 262144 it may "
                    "have (dicom.max_pdu_size)" in server.log(), what="the abort to be logged")
    assert rss_mb(server.proc.pid) < baseline + 32
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    assert acknowledged(storescu(server.port, *ct).stderr) == 1


def deflated(path: Path, pixels: np.ndarray, series_description: str = "deflated") -> Path:
    ds = ct_slice(generate_uid(), generate_uid(), 0, pixels)
    ds.SeriesDescription = series_description
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_deflate_bomb_is_refused_and_a_deflated_image_kept(serve, tmp_path):
    server = serve(dicom={"max_inflated_mb": 64})
    image = deflated(tmp_path / "small.dcm", np.full((64, 64), 100), "deflated small")
    bomb = deflated(tmp_path / "bomb.dcm", np.zeros((16384, 8192)))  # 256 MiB of zeros
    assert bomb.stat().st_size < 2 << 20
    baseline = rss_mb(server.proc.pid)
    sent = storescu(server.port, bomb, image, extra=("--no-halt", "--propose-deflated"))
    assert "Refused: OutOfResources" in sent.stderr and acknowledged(sent.stderr) == 1, sent.stderr
    assert "deflated dataset inflates to more than 64 MiB (dicom.max_inflated_mb)" in server.log()
    assert rss_mb(server.proc.pid) < baseline + 64
    study = server.study(pydicom.dcmread(image).StudyInstanceUID)
    assert study and study["series"][0]["series_description"] == "deflated small"
    assert not list((server.spool / "incoming").iterdir())


def test_who_may_call_from_where_and_to_whom(serve, tmp_path):
    server = serve(dicom={"allowed_calling_aets": ["SCANNER"]},
                   extra=f'[dicom.senders.SCANNER]\nhosts = ["{HOSTILE}"]\n')
    ct = write_ct_series(tmp_path / "ct", slices=1, size=64)
    wrong_called = storescu(server.port, *ct, aec="SOMEONE")
    assert "Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
    wrong_host = storescu(server.port, *ct)  # SCANNER, but from 127.0.0.1
    assert "Calling AE Title Not Recognized" in wrong_host.stderr, wrong_host.stderr
    assert "calling AE title SCANNER may call only from 127.0.0.2 (dicom.senders.SCANNER.hosts)" in server.log()
    assert "called AE title SOMEONE is not 'MACHAON' (dicom.ae_title)" in server.log()

    ae = AE("SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MACHAON", bind_address=(HOSTILE, 0))
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(ct[0])).Status == 0
    assoc.release()


def test_a_uid_claimed_by_another_study_stays_with_the_first(serve, tmp_path):
    """The same SOP Instance UID, or Series UID, sent under another study is refused (0xA900): the
    first copy is kept where it was, and its study's history names the claim once."""
    server = serve()
    first = write_ct_series(tmp_path / "first", slices=2, size=64)
    assert acknowledged(storescu(server.port, *first).stderr) == 2
    owner = pydicom.dcmread(first[0])
    kept = sorted(p.relative_to(server.spool) for p in (server.spool / "studies").rglob("*.dcm"))

    other_study = generate_uid()
    same_instance = pydicom.dcmread(first[0])
    same_instance.StudyInstanceUID, same_instance.SeriesInstanceUID = other_study, generate_uid()
    same_instance.save_as(tmp_path / "same-instance.dcm")
    same_series = write_ct_series(tmp_path / "same-series", slices=3, size=64, study_uid=other_study,
                                  series_uid=owner.SeriesInstanceUID, seed=1)
    sent = storescu(server.port, tmp_path / "same-instance.dcm", *same_series, extra=("--no-halt",))
    assert acknowledged(sent.stderr) == 0 and sent.stderr.count("Refused") + sent.stderr.count("Error") >= 4
    assert "SOPInstanceUID already used in another study" in server.log()
    assert "SeriesInstanceUID already used in another study" in server.log()
    assert sorted(p.relative_to(server.spool) for p in (server.spool / "studies").rglob("*.dcm")) == kept

    shown = json.loads(server.machaon("events", "--study", owner.StudyInstanceUID, "--json").stdout)
    conflicts = [e for e in shown if e["action"].endswith(".conflict")]
    assert sorted(e["action"] for e in conflicts) == ["instance.conflict", "series.conflict"], conflicts
    assert all(e["detail"]["sent_under_study"] == other_study for e in conflicts)
