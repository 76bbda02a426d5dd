"""Shared fixtures: a PostgreSQL database per run, `machaon serve` as a real process, a real
Orthanc, and model packages built from models/ in the real build environments. The helpers they
use are in harness.py."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.harness import ENVS, Orthanc, Server, copy_model, run_machaon

# The server every store test also runs against; CI starts it (.ci/run).
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

@pytest.fixture(scope="session")
def built_models(tmp_path_factory):
    """lv-segmentation and cxr-findings built as a user would, without variants (for speed)."""
    from machaon.tools.build import Builder
    from rich.console import Console

    sources = tmp_path_factory.mktemp("sources")
    out = tmp_path_factory.mktemp("built")
    builder = Builder(sources, out, ENVS, Console(quiet=True))
    for name in ("lv-segmentation", "cxr-findings"):
        copy_model(sources, name, **{"source.variants": []})
        builder.build(name)
    return out


@pytest.fixture(scope="module")
def lv(built_models):
    """The built lv-segmentation package."""
    from machaon.manifest import Package
    return Package(built_models / "lv-segmentation")


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this test run, dropped at the end."""
    name = f"machaon_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is NOT reachable at {PG_ADMIN_URL} ({exc}). The store tests "
                    "must run against it: start it (.ci/run does) or set TEST_POSTGRES_URL; "
                    "`-m 'not postgres'` leaves these tests out.", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_store_url(postgres_url):
    """A migrated job store in a PostgreSQL schema of its own (a database per
    test would be slow)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": url}, check=True)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A migrated, empty job store on each backend."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_store_url")
    url = f"sqlite:///{tmp_path}/machaon.db"
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": url}, check=True)
    return url


@pytest.fixture
def serve(tmp_path):
    """Start `machaon serve` with extra settings; every server is stopped after the test."""
    servers: list[Server] = []

    def start(db_url: str | None = None, workdir: Path | None = None, extra: str = "", **settings) -> Server:
        workdir = workdir or tmp_path / f"server{len(servers)}"
        workdir.mkdir(exist_ok=True)
        if db_url is None:
            db_url = f"sqlite:///{workdir}/machaon.db"
            run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": db_url}, check=True)
        server = Server(workdir, db_url, settings, extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def orthanc(tmp_path):
    if not shutil.which("Orthanc") or not Path(Orthanc.PLUGIN).exists():
        pytest.fail("Orthanc with the DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb (.ci/install)")
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def store(db_url):
    """A job store (SQLAlchemy engine and sessions) on each backend, migrated and empty."""
    from machaon.store import Store
    store = Store(db_url)
    yield store
    store.dispose()
