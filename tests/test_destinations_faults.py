"""Destinations that fail as hospital networks do: a DICOMweb server on a closed port, a PACS that
accepts connections and never answers. A healthy PACS beside them gets its results as usual, each
failing delivery says what happened, and SIGTERM stops the service within dicom.shutdown_grace
even with a send stuck in a hung PACS (that delivery stays pending, to be sent after a restart)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from machaon.scheduler import Scheduler
from machaon.senders import Outgoing, SendError
from machaon.senders.dicom import DicomClient, c_store_failure
from machaon.senders.dicomweb import DicomWebDestination, StowRsSender
from machaon.tools import phantom
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Verification

from tests.dicomgen import ct_slice
from tests.harness import acknowledged, free_port, jobs_of, storescu

GRACE = 5  # dicom.shutdown_grace of the server under test
# How long a stop may take beyond the grace: the last checks and the interpreter's exit.
STOP_MARGIN = 10


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections, reads what is sent, and never answers."""
    server, held = socket.create_server(("127.0.0.1", 0)), []

    def drain(connection: socket.socket) -> None:
        try:
            while connection.recv(65536):
                pass
        except OSError:  # closed at the end of the test
            pass

    def accept() -> None:
        try:
            while True:
                connection = server.accept()[0]
                held.append(connection)
                threading.Thread(target=drain, args=(connection,), daemon=True).start()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in held:
        connection.close()


def answering_with(reply: bytes):
    """A TCP port that answers whatever it is sent with `reply`, then reads on without answering."""
    server, held = socket.create_server(("127.0.0.1", 0)), []

    def serve() -> None:
        try:
            while True:
                connection = server.accept()[0]
                held.append(connection)
                connection.recv(65536)
                connection.sendall(reply)
        except OSError:
            pass
    threading.Thread(target=serve, daemon=True).start()
    return server, held


@pytest.fixture
def unreachable_port():
    """A port whose connections time out, as behind a firewall that drops them: a listening socket
    that accepts nothing, its backlog filled by one connection of ours (later ones are dropped)."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        filler.connect(server.getsockname())
        yield server.getsockname()[1]


def setup(orthanc_port: int, closed_port: int, silent_port: int) -> str:
    """One rule sending the LV segmenter's results to four destinations: the healthy Orthanc, a
    DICOMweb server that is not running, a PACS that never answers within its timeout, and one
    whose timeout is far longer than the shutdown grace (its send is in flight at SIGTERM)."""
    return f'''
[[rules]]
name = "lv"
models = ["lv-segmentation"]
destinations = ["pacs", "web", "hung", "frozen"]
match = {{ modality = ["MR"], series_description = "sax", min_slices = 3 }}

[destinations.pacs]
type = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}

[destinations.web]
type = "dicomweb"
url = "http://127.0.0.1:{closed_port}/dicom-web"

[destinations.hung]
type = "dicom"
ae_title = "HUNG"
host = "127.0.0.1"
port = {silent_port}
timeout = 2

[destinations.frozen]
type = "dicom"
ae_title = "FROZEN"
host = "127.0.0.1"
port = {silent_port}
timeout = 600
'''


def deliveries(server, study_uid: str) -> dict[str, list[dict]]:
    by_destination: dict[str, list[dict]] = {}
    for job in jobs_of(server, study_uid):
        for result in job["results"]:
            for delivery in result["deliveries"]:
                by_destination.setdefault(delivery["destination"], []).append(delivery)
    return by_destination


def test_failing_destinations_hold_up_neither_a_healthy_pacs_nor_a_stop(serve, built_models, orthanc, tmp_path,
                                                                        silent_peer):
    orthanc.start()
    closed_port = free_port()
    server = serve(models={"path": str(built_models)}, dicom={"shutdown_grace": GRACE},
                   dispatch={"retry_initial": 1, "retry_max": 2},
                   extra=setup(orthanc.dicom_port, closed_port, silent_peer))
    study = phantom.write_study(tmp_path / "study", seed=70, views=False)
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == phantom.SAX_SLICES

    # The healthy PACS gets both results (SEG and SR) within the usual time.
    def sent_to_pacs():
        pacs = deliveries(server, study.study_uid).get("pacs", [])
        return len(pacs) == 2 and all(d["status"] == "sent" for d in pacs)
    server.wait_for(sent_to_pacs, timeout=60, what="the results to reach the healthy PACS")
    assert len(orthanc.get(f"/dicom-web/studies/{study.study_uid}/instances")) == 2

    # The failing ones say what happened, each on its own delivery rows.
    def failed_with_reasons():
        shown = deliveries(server, study.study_uid)
        errors = {name: [d["last_error"] or "" for d in shown.get(name, [])] for name in ("web", "hung")}
        return all(len(e) == 2 and all(e) for e in errors.values()) and errors
    errors = server.wait_for(failed_with_reasons, timeout=60, what="the failing deliveries' reasons")
    for error in errors["web"]:
        assert error.startswith(f"http://127.0.0.1:{closed_port}/dicom-web: STOW-RS of "), error
        assert "could not connect (Connection refused)" in error, error
    for error in errors["hung"]:
        assert error == (f"HUNG@127.0.0.1:{silent_peer}: association failed: timed out: no answer to the "
                         "association request within 2 s (the node took the connection: is it hung or "
                         "overloaded?)"), error
    frozen = deliveries(server, study.study_uid)["frozen"]
    assert all(d["status"] == "pending" and d["attempts"] == 0 for d in frozen)  # still in its first send

    # SIGTERM: the send stuck in the frozen PACS is left behind at the deadline, not waited for.
    assert server.stop(timeout=GRACE + STOP_MARGIN) == 0
    log = server.log()
    assert "still sending to frozen: not waited for" in log, log
    # Its results are neither sent nor failed: they go at the next start.
    shown = json.loads(server.machaon("studies", "show", study.study_uid, "--json").stdout)
    frozen = [d for job in shown["jobs"] for r in job["results"] for d in r["deliveries"]
              if d["destination"] == "frozen"]
    assert [(d["status"], d["attempts"], d["last_error"]) for d in frozen] == [("pending", 0, None)] * 2


# The texts operators read on delivery rows, from the senders themselves.

def test_a_pacs_on_a_closed_port_is_said_to_refuse_the_connection():
    port = free_port()
    client = DicomClient("PACS", "127.0.0.1", port, calling_ae="MACHAON", timeout=5, connect_timeout=2)
    with pytest.raises(SendError) as refused, client.association([(Verification, None)]):
        pass
    assert str(refused.value) == (f"PACS@127.0.0.1:{port}: association failed: could not be reached (Connection "
                                  "refused): is the PACS listening at that address and port?")


def test_a_pacs_that_never_answers_is_said_to_have_timed_out(silent_peer):
    client = DicomClient("PACS", "127.0.0.1", silent_peer, calling_ae="MACHAON", timeout=1, connect_timeout=1)
    with pytest.raises(SendError) as hung, client.association([(Verification, None)]):
        pass
    assert "timed out: no answer to the association request within 1 s" in str(hung.value)
    assert "abort" not in str(hung.value)


def test_a_pacs_behind_a_firewall_is_said_to_time_out_connecting(unreachable_port):
    client = DicomClient("PACS", "127.0.0.1", unreachable_port, calling_ae="MACHAON", timeout=30,
                         connect_timeout=1)
    with pytest.raises(SendError) as unreachable, client.association([(Verification, None)]):
        pass
    assert str(unreachable.value) == (
        f"PACS@127.0.0.1:{unreachable_port}: association failed: could not be reached: connection timed out "
        "after 1 s (no TCP connection): is the PACS listening at that address and port, and does a firewall "
        "let us through?")


def test_a_peer_that_closes_the_connection_is_not_said_to_hang():
    with socket.create_server(("127.0.0.1", 0)) as server:
        def close_each():
            try:
                while True:
                    server.accept()[0].close()
            except OSError:
                pass
        threading.Thread(target=close_each, daemon=True).start()
        port = server.getsockname()[1]
        client = DicomClient("PACS", "127.0.0.1", port, calling_ae="MACHAON", timeout=5, connect_timeout=2)
        with pytest.raises(SendError) as closed, client.association([(Verification, None)]):
            pass
    assert str(closed.value) == (f"PACS@127.0.0.1:{port}: association failed: the node closed the connection "
                                 "without answering the association request: is this port a DICOM node's?")


@pytest.mark.parametrize(("status", "said"), [
    (0xA700, "rejected with status 0xA700 (Refused: Out of Resources)"),
    (0xC000, "rejected with status 0xC000 (Cannot Understand)"),
    (0xA900, "rejected with status 0xA900 (Data Set Does Not Match SOP Class)"),
    (0xFFF0, "rejected with status 0xFFF0 (a status unknown to DICOM)"),
])
def test_a_c_store_status_is_named_with_its_meaning(status, said):
    ds, answer = Dataset(), Dataset()
    ds.SOPInstanceUID, answer.Status = "1.2.3", status
    error = c_store_failure("PACS@pacs:104", ds, answer)
    assert str(error) == f"PACS@pacs:104: C-STORE of 1.2.3 {said}"


def test_a_c_store_without_an_answer_is_said_to_have_timed_out():
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    assert str(c_store_failure("PACS@pacs:104", ds, Dataset(), timeout=30)) == (
        "PACS@pacs:104: C-STORE of 1.2.3 timed out: no answer within 30 s")


def stow(url: str) -> list:
    """The outcomes of one STOW-RS of a small result to `url`, or the SendError raised."""
    ds = ct_slice(generate_uid(), generate_uid(), 0, np.zeros((8, 8)))
    destination = DicomWebDestination(type="dicomweb", url=url, connect_timeout=1, timeout=1)
    try:
        return [str(outcome) for outcome in StowRsSender(destination, calling_ae="MACHAON")
                .send([Outgoing(Path("result.dcm"), ds)])]
    except SendError as exc:
        return [f"raised: {exc}".replace(ds.SOPInstanceUID, "UID")]


def test_dicomweb_failures_say_what_happened(silent_peer, unreachable_port):
    closed = free_port()
    assert stow(f"http://127.0.0.1:{closed}/dicom-web") == [
        f"raised: http://127.0.0.1:{closed}/dicom-web: STOW-RS of UID failed: could not connect (Connection "
        "refused): is the DICOMweb server running at that address?"]
    assert stow(f"http://127.0.0.1:{unreachable_port}/dicom-web") == [
        f"raised: http://127.0.0.1:{unreachable_port}/dicom-web: STOW-RS of UID failed: could not connect: timed "
        "out after 1 s (no TCP connection): is the server running at that address, and does a firewall let us "
        "through?"]
    assert stow(f"http://127.0.0.1:{silent_peer}/dicom-web") == [
        f"raised: http://127.0.0.1:{silent_peer}/dicom-web: STOW-RS of UID failed: timed out: no answer within "
        "1 s (the server took the connection: is it hung or overloaded?)"]
    plain, held = answering_with(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with plain:
        port = plain.getsockname()[1]
        [tls] = stow(f"https://127.0.0.1:{port}/dicom-web")
        assert tls.startswith(f"raised: https://127.0.0.1:{port}/dicom-web: STOW-RS of UID failed: TLS failed "), tls
    conflict, held = answering_with(b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n")
    with conflict:
        port = conflict.getsockname()[1]
        [rejected] = stow(f"http://127.0.0.1:{port}/dicom-web")
        assert rejected.startswith(f"http://127.0.0.1:{port}/dicom-web: STOW-RS of "), rejected
        assert rejected.endswith(" rejected: HTTP 409 Conflict"), rejected


def test_a_run_that_overruns_is_said_once_not_at_every_tick(caplog):
    scheduler, running = Scheduler(), threading.Event()
    finish = threading.Event()

    def overrun() -> None:
        running.set()
        finish.wait(30)
    job = f"overrun-{generate_uid()}"  # said once per job id and process: one no other test has used
    scheduler.aps.add_job(overrun, "interval", id=job, seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="apscheduler"):
        scheduler.start()
        try:
            assert running.wait(30)
            for _ in range(10):  # ten ticks fall due while the first run goes on
                scheduler.run_soon(job)
                finish.wait(0.1)
        finally:
            finish.set()
            scheduler.stop()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert "its previous run is still going; later runs are skipped until it ends" in skipped[0]
