"""Start-up and restarts: what may come by itself (the database, a port) is waited for, then the
service exits 75 for systemd to restart it; a restarted service takes back the jobs its previous
process left running; what it writes is readable by its own user only."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import threading
import uuid

import psycopg
import pytest
import sqlalchemy
from machaon.cli import EXIT_CONFIG, EXIT_UNAVAILABLE
from machaon.tools import phantom
from sqlalchemy import URL, make_url

from tests.harness import (
    MACHAON,
    Server,
    acknowledged,
    finished,
    folder_setup,
    free_port,
    jobs_of,
    run_machaon,
    storescu,
)


class Forwarder:
    """Forwards 127.0.0.1:`port` to a real server once started: a database that comes up late."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.port, self.target = port, target  # refused until start()
        self.listener: socket.socket | None = None
        self.closing = threading.Event()

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.closing.set()
        if self.listener:
            self.listener.close()

    def _accept(self) -> None:
        assert self.listener is not None
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def when_logged(server: Server, text: str, then) -> threading.Thread:
    """Run `then()` once the server's log holds `text` (watched from a thread, as the test starts
    the server meanwhile)."""
    def watch():
        while not stopped.wait(0.1):
            if text in server.log():
                then()
                return
    stopped = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.stopped = stopped  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.postgres
def test_a_database_that_comes_up_late_is_waited_for(tmp_path, pg_store_url):
    real = make_url(pg_store_url)
    forwarder = Forwarder(free_port(), (real.host or "127.0.0.1", real.port or 5432))
    late = real.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    server = Server(tmp_path, late, {"service": {"startup_wait": 60}})
    watcher = when_logged(server, "trying again in", forwarder.start)
    try:
        server.start()
        assert f"database.url (set in {server.config}): the database at 127.0.0.1:{forwarder.port} is not " \
               "available" in server.log()
        assert "giving up in" in server.log()  # each retry says how long is left
        assert server.stop() == 0
    finally:
        watcher.stopped.set()  # type: ignore[attr-defined]
        forwarder.stop()


def test_a_database_that_never_answers_is_given_up_on_with_exit_75(tmp_path):
    # A port that takes connections and never answers them (a PostgreSQL hung, a firewall): each
    # attempt gives up after its own timeout, and start-up after service.startup_wait.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        url = f"postgresql+psycopg://machaon@127.0.0.1:{port}/machaon"
        config = tmp_path / "machaon.toml"
        config.write_text(f'[spool]\npath = "{tmp_path}/s"\n[service]\nstartup_wait = 1\n')
        proc = run_machaon("serve", config=config, env={"MACHAON_DATABASE_URL": url}, timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "machaon: not available: database.url (set in environment variable MACHAON_DATABASE_URL): " \
           f"the database at 127.0.0.1:{port} is not available: connection timeout expired" in last
    assert "(waited service.startup_wait = 1 s)" in last


@pytest.mark.postgres
def test_a_database_that_answers_no_on_one_of_its_addresses_is_a_configuration_error(tmp_path, postgres_url):
    # libpq tries each address of a host in turn and says why each failed, one line each: here ::1
    # (refused: the server listens on 127.0.0.1) after 127.0.0.1, which answered that there is no
    # such database, as it answers a wrong password. That answer does not pass by waiting.
    real = make_url(postgres_url)
    host, port = real.host or "127.0.0.1", real.port or 5432
    url = URL.create(real.drivername, real.username, real.password, database="no_such_database",
                     query={"host": f"{host},::1", "port": f"{port},{port}"}).render_as_string(hide_password=False)
    config = tmp_path / "machaon.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}/s"\n[service]\nstartup_wait = 60\n')
    proc = run_machaon("serve", config=config, env={"MACHAON_DATABASE_URL": url}, timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "machaon: configuration error: database.url (set in environment variable MACHAON_DATABASE_URL): " \
           f'cannot use the database: connection to server at "{host}", port {port} failed: FATAL:  database ' \
           '"no_such_database" does not exist' in proc.stderr


@pytest.mark.postgres
def test_a_database_user_without_permission_is_a_configuration_error(tmp_path, pg_store_url):
    url = make_url(pg_store_url)
    role = f"machaon_test_{uuid.uuid4().hex[:8]}"
    schema = url.query["options"].split("=", 1)[1]  # -csearch_path=<schema>
    admin = url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        # It may look into the store's schema, not read its tables.
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    try:
        config = tmp_path / "machaon.toml"
        config.write_text(f'[spool]\npath = "{tmp_path}/s"\n[service]\nstartup_wait = 60\n')
        env = {"MACHAON_DATABASE_URL": url.set(username=role).render_as_string(hide_password=False)}
        proc = run_machaon("serve", config=config, env=env, timeout=60)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "cannot use the database: permission denied for table alembic_version" in proc.stderr


def test_sigterm_while_start_up_waits_for_the_database_stops_at_once(tmp_path):
    # systemd stops a unit that has not started yet with SIGTERM, and kills it after TimeoutStopSec
    # (60 s): start-up waiting for a database gives up its wait at once.
    url = f"postgresql+psycopg://machaon@127.0.0.1:{free_port()}/machaon"  # refused: nothing listens
    server = Server(tmp_path, url, {"service": {"startup_wait": 120}})
    with server.log_path.open("a") as log:
        proc = subprocess.Popen([MACHAON, "serve", "--config", str(server.config)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            server.wait_for(lambda: "trying again in" in server.log(), timeout=60, what="start-up to wait")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, server.log()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stopped before start-up ended" in server.log()


def test_a_port_still_held_by_a_process_on_its_way_out_is_waited_for(tmp_path):
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": f"sqlite:///{tmp_path}/machaon.db"}, check=True)
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    server = Server(tmp_path, f"sqlite:///{tmp_path}/machaon.db", {"dicom": {"port": port}})
    watcher = when_logged(server, "trying again in", held.close)
    try:
        server.start()
        assert f"dicom.port (set in {server.config}): 127.0.0.1:{port} is already in use" in server.log()
        image = phantom.write_study(tmp_path / "study", seed=70, views=False).sax_files[0]
        assert acknowledged(storescu(port, image).stderr) == 1
        assert server.stop() == 0
    finally:
        watcher.stopped.set()  # type: ignore[attr-defined]
        held.close()


def test_a_restarted_service_takes_back_its_own_jobs_at_once(serve, built_models, db_url, tmp_path):
    study = phantom.write_study(tmp_path / "study", seed=71, views=False, slices=60)  # a job of seconds
    # A lease far longer than the wait below: the job can only finish in time if it is taken back.
    settings = {"models": {"path": str(built_models)}, "worker": {"lease": 600}}
    server = serve(db_url=db_url, **settings, extra=folder_setup(tmp_path))
    assert acknowledged(storescu(server.port, *study.sax_files).stderr) == 60
    server.wait_for(lambda: any(j["status"] == "running" for j in jobs_of(server, study.study_uid)),
                    timeout=60, what="the job to run")
    server.stop(signal.SIGKILL)  # mid-job: its lease is left behind, unrenewed for 10 minutes

    # The same host name in another PID namespace (a container with the host's network): the
    # process that holds the job may be running there, so it waits for its lease.
    own = lease_owner(db_url)  # "<host>:<pid>:<namespace>:<claim>"
    host, pid, namespace, claim = own.split(":")
    lease_owner(db_url, f"{host}:{pid}:{'0' * len(namespace)}:{claim}")
    elsewhere = serve(db_url=db_url, workdir=server.workdir, **settings, extra=folder_setup(tmp_path))
    [job] = jobs_of(elsewhere, study.study_uid)
    assert job["status"] == "running" and job["attempts"] == 1, job
    assert "took back" not in elsewhere.log()
    assert elsewhere.stop() == 0

    lease_owner(db_url, own)  # this host's: the same host, boot and PID namespace
    restarted = serve(db_url=db_url, workdir=server.workdir, **settings, extra=folder_setup(tmp_path))
    [job] = finished(restarted, study.study_uid)  # waits 60 s at most, against a 600 s lease
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    [taken] = [e for e in restarted.study(study.study_uid)["events"] if e["action"] == "job.lease_expired"]
    assert taken["detail"]["reason"] == (f"taken back without waiting for its lease: its worker {own}, an "
                                         "earlier process on this host, is no longer running")
    assert "took back 1 job(s) left running by an earlier process on this host" in restarted.log()
    results = list((restarted.spool / "results").rglob("*.dcm"))
    assert results and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in results)


def lease_owner(db_url: str, new: str | None = None) -> str:
    """The lease owner of the one running job in the store at `db_url`; `new` replaces it."""
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.begin() as conn:
            [owner] = conn.execute(sqlalchemy.text("SELECT lease_owner FROM jobs WHERE status = 'running'")).scalars()
            if new:
                conn.execute(sqlalchemy.text("UPDATE jobs SET lease_owner = :new WHERE status = 'running'"),
                             {"new": new})
        return owner
    finally:
        engine.dispose()


def test_what_the_service_writes_is_for_its_own_user_only(serve, tmp_path):
    server = serve()
    study = phantom.write_study(tmp_path / "study", seed=72, views=False)
    assert acknowledged(storescu(server.port, study.sax_files[0]).stderr) == 1
    database = server.workdir / "machaon.db"
    files = [database, database.with_name("machaon.db-wal"), database.with_name("machaon.db-shm"),
             *(server.spool / "studies").rglob("*.dcm")]
    folders = [server.spool, *(p for p in server.spool.rglob("*") if p.is_dir())]
    assert len(files) == 4 and len(folders) >= 5  # spool, incoming, studies, the study, its series
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o600" for p in files}
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {str(p): "0o700" for p in folders}
