"""Shared fixtures: a PostgreSQL database per run, `machaon serve` as a real process, a real
Orthanc, and model packages built from models/ in the real build environments. The helpers they
use are in harness.py.

The tests run in parallel, in pytest-xdist workers (addopts in pyproject.toml): a session fixture
runs once in each worker, so what must be made once per run (the build environments, the built
packages) is made under a file lock, where the other workers find it ready."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest
from filelock import FileLock

from tests.harness import ENVS, REPO, Orthanc, Server, build_environments, copy_model, run_machaon

# The server every store test also runs against; CI starts it (.ci/run).
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

BUILT_MODELS = ("lv-segmentation", "cxr-findings")


@pytest.fixture(autouse=True)
def _build_environments_ready(request):
    """The build environments, for the tests that run the converters themselves (their modules
    import ENVS): created before the test, once for all workers."""
    if getattr(request.module, "ENVS", None) is ENVS:
        from machaon.tools.build import converters_dir
        build_environments(sorted(p.stem.removeprefix("requirements-")
                                  for p in converters_dir().glob("requirements-*.txt")))


@pytest.fixture(scope="session")
def built_models(tmp_path_factory):
    """lv-segmentation and cxr-findings built as a user would, without variants (for speed).

    Built once per run into a folder that the run's workers share: the first worker builds them
    while the others wait on the lock, then find them up to date (the builder skips unchanged
    models)."""
    from machaon.manifest import read_manifest
    from machaon.tools.build import Builder
    from rich.console import Console

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    build_environments(sorted({read_manifest(REPO / "models" / name / "manifest.toml").source.framework
                               for name in BUILT_MODELS}))
    with FileLock(root / "built-models.lock"):
        sources, out = root / "built-models-sources", root / "built-models"
        builder = Builder(sources, out, ENVS, Console(quiet=True))
        for name in BUILT_MODELS:
            if not (sources / name).exists():
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


# Modules whose tests share an expensive module fixture, kept on one worker so that it is made once:
# test_wheel builds a wheel in the checkout (build/, not safe twice at once) and installs it.
ONE_WORKER = ("test_wheel",)
# The longest modules start first, so that the run does not end waiting on one of them alone.
SLOW_FIRST = ("test_wheel", "test_convert")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    def module(item) -> str:
        found = getattr(item, "module", None)
        return found.__name__.rpartition(".")[2] if found else ""

    for item in items:
        if module(item) in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(module(item)))
    items.sort(key=lambda item: module(item) not in SLOW_FIRST)  # stable: the order is kept otherwise
