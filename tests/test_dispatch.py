"""Dispatch without a `machaon serve` process: deliveries in a real job store, results in a real
spool, sent by the real senders; each destination sent to independently of the others."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from machaon.config import Settings
from machaon.dispatch import Dispatcher
from machaon.senders import TYPES, sender_for
from machaon.senders.dicom import DicomClient
from machaon.spool import Spool
from machaon.store import (
    Delivery,
    DeliveryStatus,
    Event,
    Job,
    JobStatus,
    Result,
    Store,
    Study,
    StudyStatus,
    utcnow,
)
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.dicomgen import ct_slice
from tests.harness import free_port, run_machaon


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


def settings(**destinations) -> Settings:
    return Settings.model_validate({"destinations": destinations,
                                    "dispatch": {"retry_initial": 60, "retry_max": 600}})


def results_for(store: Store, spool: Spool, *destinations: str, count: int = 2, size: int = 8) -> list:
    """A succeeded job of a new study with `count` results of `size`² pixels in the spool, each due
    at `destinations`."""
    study_uid, series_uid, now = generate_uid(), generate_uid(), utcnow()
    datasets = [ct_slice(study_uid, series_uid, i, np.zeros((size, size))) for i in range(count)]
    with store.session.begin() as session:
        study = Study(study_uid=study_uid, status=StudyStatus.COMPLETE, first_received_at=now, opened_at=now,
                      last_received_at=now)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, model="test", status=JobStatus.SUCCEEDED, created_at=now)
        session.add(job)
        session.flush()
        for ds in datasets:
            relative = spool.result_path(study_uid, series_uid, ds.SOPInstanceUID)
            spool.write(ds, relative)
            result = Result(job_id=job.id, kind="seg", sop_class_uid=ds.SOPClassUID, path=relative,
                            sop_instance_uid=ds.SOPInstanceUID, series_uid=series_uid, created_at=now)
            session.add(result)
            session.flush()
            session.add_all(Delivery(result_id=result.id, destination=name, status=DeliveryStatus.PENDING,
                                     attempts=0, next_attempt_at=now) for name in destinations)
    return datasets


def deliveries(store: Store, destination: str) -> list[Delivery]:
    with store.read_session() as session:
        return list(session.scalars(select(Delivery).where(Delivery.destination == destination)
                                    .order_by(Delivery.id)))


def events(store: Store, action: str) -> list[Event]:
    with store.read_session() as session:
        return list(session.scalars(select(Event).where(Event.action == action).order_by(Event.id)))


def written(folder: Path, ds) -> Path:
    return folder / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_results_are_written_to_a_folder_once(store, spool, tmp_path):
    out = tmp_path / "out"
    datasets = results_for(store, spool, "out", count=3)
    config = settings(out={"type": "folder", "path": str(out)})

    dispatcher = Dispatcher(config, store, spool)
    started = dispatcher.run(wait=True)
    assert started["out"].result() == 3
    assert all(written(out, ds).is_file() for ds in datasets)
    assert {(d.status, d.attempts, d.last_error) for d in deliveries(store, "out")} == {("sent", 1, None)}
    assert len(events(store, "result.sent")) == 3

    assert dispatcher.run(wait=True) == {}  # nothing is sent twice


def test_a_folder_that_cannot_be_written_keeps_its_results_pending_with_a_backoff(store, spool, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    results_for(store, spool, "out")
    config = settings(out={"type": "folder", "path": str(tmp_path / "not-a-folder")})

    before, dispatcher = utcnow(), Dispatcher(config, store, spool)
    assert dispatcher.run(wait=True)["out"].result() == 0
    for delivery in deliveries(store, "out"):
        assert delivery.status == "pending" and delivery.attempts == 1
        assert delivery.last_error.startswith(f"cannot write {tmp_path / 'not-a-folder'}/")
        assert delivery.next_attempt_at >= before + timedelta(seconds=60)  # dispatch.retry_initial
    [failed, _] = events(store, "result.send_failed")
    assert '"attempt": 1' in failed.detail and '"retry_in_s": 60' in failed.detail
    assert dispatcher.run(wait=True) == {}  # not due again before the backoff


def test_results_for_a_destination_no_longer_configured_wait_for_it(store, spool):
    results_for(store, spool, "gone")
    Dispatcher(settings(), store, spool).run(wait=True)
    for delivery in deliveries(store, "gone"):
        assert delivery.status == "pending" and delivery.attempts == 1
        assert "destination 'gone' is no longer configured" in delivery.last_error


def test_a_pacs_on_a_closed_port_is_named_with_the_reason(store, spool):
    port = free_port()
    results_for(store, spool, "pacs")
    config = settings(pacs={"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "timeout": 2})
    Dispatcher(config, store, spool).run(wait=True)
    for delivery in deliveries(store, "pacs"):
        assert delivery.status == "pending" and delivery.attempts == 1
        assert delivery.last_error.startswith(f"PACS@127.0.0.1:{port}: association failed: could not be reached "
                                              "(Connection refused): is the PACS listening"), delivery.last_error


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections and never answers on them."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        connections: list[socket.socket] = []

        def accept():
            try:
                while True:
                    connections.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                pass
        threading.Thread(target=accept, daemon=True).start()
        yield server.getsockname()[1]
    for connection in connections:
        connection.close()


def test_a_pacs_that_never_answers_does_not_hold_up_the_other_destinations(store, spool, tmp_path, silent_peer):
    out = tmp_path / "out"
    datasets = results_for(store, spool, "hung", "out")
    config = settings(out={"type": "folder", "path": str(out)},
                      hung={"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": silent_peer,
                            "timeout": 2})
    dispatcher = Dispatcher(config, store, spool)
    started = dispatcher.run()
    assert started["out"].result(timeout=60) == 2
    assert all(written(out, ds).is_file() for ds in datasets)
    assert dispatcher.run() == {}  # the hung send is not started a second time

    assert started["hung"].result(timeout=60) == 0
    for delivery in deliveries(store, "hung"):
        assert delivery.status == "pending" and delivery.attempts == 1  # tried once, by one thread
        assert delivery.last_error == (f"HUNG@127.0.0.1:{silent_peer}: association failed: timed out: no answer "
                                       "to the association request within 2 s (the node took the connection: is "
                                       "it hung or overloaded?)")
    # The folder's results were recorded as sent before the hung PACS gave up.
    assert max(e.id for e in events(store, "result.sent")) < min(e.id for e in events(store, "result.send_failed"))


@pytest.fixture
def stalled_pacs():
    """A real DICOM node behind a relay that, once the association is accepted, stops reading what
    machaon sends: a peer that hangs in the middle of a transfer."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE("STALL")
    ae.add_supported_context(CTImageStorage)
    node = ae.start_server(("127.0.0.1", 0), block=False)
    node_port = node.socket.getsockname()[1]
    relay, held = socket.create_server(("127.0.0.1", 0)), []

    def serve_one():
        client = relay.accept()[0]
        upstream = socket.create_connection(("127.0.0.1", node_port))
        held.extend([client, upstream])
        upstream.sendall(client.recv(65536))  # the association request
        client.sendall(upstream.recv(65536))  # its acceptance; from now on nothing is read
    threading.Thread(target=serve_one, daemon=True).start()
    yield relay.getsockname()[1]
    for connection in held:
        connection.close()
    relay.close()
    node.shutdown()


def test_a_pacs_that_stops_reading_mid_transfer_fails_within_the_timeout(store, spool, stalled_pacs):
    # 32 MB: more than the connection's buffers hold, so the send blocks once the peer stops reading.
    [ds] = results_for(store, spool, "stalled", count=1, size=4096)
    config = settings(stalled={"type": "dicom", "ae_title": "STALL", "host": "127.0.0.1", "port": stalled_pacs,
                               "timeout": 2})
    started = Dispatcher(config, store, spool).run()
    assert started["stalled"].result(timeout=60) == 0
    [delivery] = deliveries(store, "stalled")
    assert delivery.status == "pending" and delivery.attempts == 1
    assert delivery.last_error == (f"STALL@127.0.0.1:{stalled_pacs}: C-STORE of {ds.SOPInstanceUID} timed out: "
                                   "no answer within 2 s"), delivery.last_error


def test_stopping_waits_for_the_sends_in_flight_and_starts_no_more(store, spool, silent_peer):
    results_for(store, spool, "hung")
    config = settings(hung={"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": silent_peer,
                            "timeout": 1})
    dispatcher = Dispatcher(config, store, spool)
    started = dispatcher.run()
    assert dispatcher.stop(timeout=60) == []  # none left behind
    assert started["hung"].done()
    assert all(d.attempts == 1 for d in deliveries(store, "hung"))  # its outcome was recorded
    for delivery in deliveries(store, "hung"):
        with store.session.begin() as session:  # due again
            session.get(Delivery, delivery.id).next_attempt_at = utcnow()
    assert dispatcher.run() == {}


def test_a_dicomweb_server_that_is_down_costs_one_attempt(store, spool):
    with socket.create_server(("127.0.0.1", 0)) as server:  # answers every connection by closing it
        port, connections = server.getsockname()[1], []

        def refuse():
            try:
                while True:
                    connection = server.accept()[0]
                    connections.append(connection)
                    connection.close()
            except OSError:
                pass
        threading.Thread(target=refuse, daemon=True).start()
        results_for(store, spool, "web")
        config = settings(web={"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web", "timeout": 2})
        Dispatcher(config, store, spool).run(wait=True)
    assert len(connections) == 1  # not retried by the HTTP client: the dispatcher's backoff decides
    for delivery in deliveries(store, "web"):
        assert delivery.status == "pending" and delivery.attempts == 1
        assert delivery.last_error.startswith(f"http://127.0.0.1:{port}/dicom-web: STOW-RS of "), delivery.last_error


def test_every_destination_type_is_configurable_and_has_its_sender():
    config = settings(out={"type": "folder", "path": "/tmp/out"},
                      pacs={"type": "dicom", "ae_title": "PACS", "host": "pacs", "port": 104},
                      web={"type": "dicomweb", "url": "https://pacs/dicom-web"})
    assert set(TYPES) == {"folder", "dicom", "dicomweb"}
    for destination in config.destinations.values():
        assert isinstance(destination, TYPES[destination.type].settings)
        assert isinstance(sender_for(destination, "MACHAON"), TYPES[destination.type].sender)


def test_echo_calls_a_configured_destination_as_the_dispatcher_would(tmp_path):
    port = free_port()
    config = tmp_path / "machaon.toml"
    config.write_text(f'[destinations.pacs]\ntype = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n')
    echo = run_machaon("echo", "pacs", "--timeout", "2", config=config)
    assert echo.returncode == 1
    assert f"PACS@127.0.0.1:{port}: association failed: could not be reached (Connection refused)" in echo.stderr


def test_a_send_stuck_past_the_stop_deadline_is_left_pending_and_does_not_hold_the_process(store, spool,
                                                                                            silent_peer):
    results_for(store, spool, "hung")
    config = settings(hung={"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": silent_peer,
                            "timeout": 600})
    dispatcher, before = Dispatcher(config, store, spool), set(threading.enumerate())
    started = dispatcher.run()
    assert dispatcher.stop(timeout=1) == ["hung"]  # abandoned at the deadline
    assert not started["hung"].done()
    for delivery in deliveries(store, "hung"):  # neither sent nor failed: sent again at the next start
        assert (delivery.status, delivery.attempts, delivery.last_error) == ("pending", 0, None)
    # pynetdicom's connection threads are not daemons: one left waiting for the hung node would
    # keep the process from exiting until its timeout.
    for _ in range(100):
        kept = [t for t in set(threading.enumerate()) - before if not t.daemon]
        if not kept:
            break
        kept[0].join(0.1)
    assert kept == []
    # Only those sends were abandoned: another association is made as usual.
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("ECHO")
    ae.add_supported_context(Verification)
    node = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        client = DicomClient("ECHO", "127.0.0.1", node.socket.getsockname()[1], calling_ae="MACHAON", timeout=10)
        with client.association([(Verification, None)]) as assoc:
            assert assoc.send_c_echo().Status == 0
    finally:
        node.shutdown()
