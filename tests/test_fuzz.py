"""A hostile peer at 127.0.0.2 throws a corpus of bad traffic at the listener while a real sender
(DCMTK's storescu at 127.0.0.1) stores an image every two seconds. Every control send must succeed;
the server's memory must stay within RSS_BOUND_MB of what it used before; its threads and file
descriptors (but the job store's pooled connections) must come back to where they were; incoming/
must be left empty; and it must still stop at once.

The corpus: garbage bytes, a lone byte, truncated and oversized PDUs, P-DATA before any association,
a garbled A-ASSOCIATE-RQ, wrong calling and called AE titles, datasets that are garbage, truncated,
nested 5,000 sequences deep or a deflate bomb, a C-STORE cut off mid-stream, and 50 connections
that never say anything."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.dicomgen import ct_slice, write_ct_series
from tests.harness import acknowledged, storescu

HOSTILE = "127.0.0.2"
RSS_BOUND_MB = 150  # above the server's RSS before the corpus: a 256 MiB inflation would pass it


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(HOSTILE, 0))


def send_raw(port: int, data: bytes, linger: float = 0.2) -> None:
    with connect(port) as sock:
        try:
            sock.sendall(data)
            time.sleep(linger)
        except OSError:
            pass  # the server may close first: that is the point


def associate(port: int, calling: str = "FUZZER", called: str = "MACHAON", ts=ExplicitVRLittleEndian):
    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ts)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(HOSTILE, 0))


def store_file(port: int, path: Path, ts=ExplicitVRLittleEndian) -> None:
    """Send a file's dataset bytes as they are (after its file meta): pynetdicom would otherwise
    decode the file and send a well-formed encoding of what it could read."""
    assoc = associate(port, ts=ts)
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        assert status and status.Status != 0x0000, f"{path.name} was acknowledged"
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()


def bad_files(folder: Path) -> list[tuple[Path, str]]:
    """Datasets with a valid file meta and a hostile body, and the transfer syntax each is sent in."""
    folder.mkdir()
    image = ct_slice(generate_uid(), generate_uid(), 0, np.zeros((64, 64)))
    good = folder / "good.dcm"
    image.save_as(good, enforce_file_format=True)
    raw = good.read_bytes()
    # pynetdicom reads a file's SOP Class and Instance UIDs before sending it: those stay whole.
    uids_at = raw.index(b"\x08\x00\x18\x00UI")
    uids_end = uids_at + 8 + int.from_bytes(raw[uids_at + 6:uids_at + 8], "little")
    files = []
    for name, tail in (("garbage", random.Random(1).randbytes(4096)),
                       ("truncated", raw[uids_end:uids_end + 300]),
                       ("deep", _deep_sequences(5000) + raw[uids_end:])):
        (folder / f"{name}.dcm").write_bytes(raw[:uids_end] + tail)
        files.append((folder / f"{name}.dcm", ExplicitVRLittleEndian))
    bomb = ct_slice(generate_uid(), generate_uid(), 0, np.zeros((8192, 8192)))  # 128 MiB inflated
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.save_as(folder / "bomb.dcm", enforce_file_format=True)
    files.append((folder / "bomb.dcm", DeflatedExplicitVRLittleEndian))
    return files


def _deep_sequences(depth: int) -> bytes:
    """(0008,1115) Referenced Series Sequence nested `depth` times, undefined lengths throughout."""
    opening = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return opening * depth + closing * depth


def cut_off_mid_stream(port: int, tmp: Path) -> None:
    """A 32 MiB C-STORE whose connection is cut a moment after it starts."""
    big = ct_slice(generate_uid(), generate_uid(), 0, np.zeros((4096, 4096)))
    assoc = associate(port, calling="SCANNER")
    sender = threading.Thread(target=lambda: _ignore(lambda: assoc.send_c_store(big)), daemon=True)
    sender.start()
    time.sleep(0.3)
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    sender.join(timeout=30)
    assoc.abort()


def _ignore(call) -> None:
    try:
        call()
    except Exception:
        pass


def open_files(pid: int) -> list[str]:
    """What the server's file descriptors point at, less the job store's files: its connection pool
    grows with concurrent associations up to SQLAlchemy's bound, and keeps them."""
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return sorted(link for link in links if "machaon.db" not in link)


def proc_figures(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mb": int(status["VmRSS"].split()[0]) // 1024, "threads": int(status["Threads"]),
            "fds": len(open_files(pid))}


def test_hostile_traffic_leaves_real_senders_and_resources_alone(serve, tmp_path):
    server = serve(dicom={"allowed_calling_aets": ["SCANNER", "FUZZER"], "network_timeout": 4,
                          "max_inflated_mb": 32})  # and acse_timeout as by default, 5 s
    port, pid = server.port, server.proc.pid
    control = write_ct_series(tmp_path / "control", slices=1, size=64)
    for _ in range(3):  # warm: the threads and connections a quiet server keeps are all up
        assert acknowledged(storescu(port, *control).stderr) == 1
    time.sleep(3)
    before = proc_figures(pid)

    stop, results, failures, peak = threading.Event(), [], [], [before["rss_mb"]]

    def control_sender():
        while not stop.is_set():
            sent = storescu(port, *control).stderr
            results.append(acknowledged(sent))
            if not results[-1]:
                failures.append(sent)
            stop.wait(2)

    def watch_memory():
        while not stop.is_set():
            peak.append(proc_figures(pid)["rss_mb"])
            stop.wait(0.1)

    threads = [threading.Thread(target=control_sender), threading.Thread(target=watch_memory)]
    for thread in threads:
        thread.start()
    try:
        rng = random.Random(0)
        stalled = [connect(port), connect(port)]  # stop halfway, and stay connected
        stalled[0].sendall(b"\x01\x00")  # two bytes of a PDU header
        stalled[1].sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\0" * 10)  # 10 of 1000 bytes
        established = associate(port)  # an association whose message stops halfway
        established.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\0" * 10)
        send_raw(port, rng.randbytes(1024))  # garbage
        send_raw(port, b"\x01")  # a lone byte
        send_raw(port, struct.pack(">BBL", 0x01, 0, 100) + b"\0" * 10)  # truncated A-ASSOCIATE-RQ
        send_raw(port, struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\0" * (8 << 20))  # oversized
        send_raw(port, struct.pack(">BBL", 0x04, 0, 12) + struct.pack(">LBB", 6, 1, 3) + b"\0" * 6)  # P-DATA first
        send_raw(port, struct.pack(">BBL", 0x01, 0, 200) + rng.randbytes(200))  # garbled A-ASSOCIATE-RQ
        for calling, called in (("INTRUDER", "MACHAON"), ("FUZZER", "NOT-US")):
            assoc = associate(port, calling, called)
            assert assoc.is_rejected
        for path, ts in bad_files(tmp_path / "bad"):
            store_file(port, path, ts)
        cut_off_mid_stream(port, tmp_path)
        half_open = [connect(port) for _ in range(50)]  # all but max_connections_per_host closed at once
        time.sleep(7)  # the others are dropped after acse_timeout; control sends go on meanwhile
        for sock in half_open:
            sock.close()
        time.sleep(4)  # two more control sends after the corpus
        for sock in stalled:  # dropped after acse_timeout, long ago
            sock.settimeout(1)
            assert sock.recv(1024) == b"", "a connection that stopped halfway was kept open"
        server.wait_for(lambda: not established.is_alive(), timeout=10,
                        what="the association stalled mid-message to be dropped after network_timeout")
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert results and all(ok == 1 for ok in results), (
        f"control sends acknowledged: {results}; storescu said: {failures}; server log:\n{server.log()}")
    assert max(peak) < before["rss_mb"] + RSS_BOUND_MB, f"RSS rose from {before['rss_mb']} to {max(peak)} MiB"

    def back_to_baseline():
        now = proc_figures(pid)
        return now["threads"] <= before["threads"] and now["fds"] <= before["fds"]
    server.wait_for(back_to_baseline, timeout=30,
                    what=f"threads and file descriptors back to {before} (now {proc_figures(pid)}: "
                         f"{open_files(pid)})")
    assert not list((server.spool / "incoming").iterdir())
    assert "Traceback" not in server.log() and "pynetdicom" not in server.log()
    assert server.stop() == 0  # nothing a peer left behind holds up stopping
