"""Start-up: open and check the store, the spool, the port and the models before serving.

Everything an operator can get wrong is checked before anything is accepted, and
stops start-up with one message naming the setting (a ConfigError). Once the
port is ours, files the spool holds without a row are indexed or quarantined.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import sqlalchemy.exc
from sqlalchemy import make_url, select

from .config import Settings
from .manifest import PackageError, load_package
from .scp import Refused, StorageSCP
from .senders import SettingError
from .spool import Spool, SpoolError, valid_uid
from .store import Instance, SchemaError, SeriesRow, Store, Study, add_event, check_schema

log = logging.getLogger("machaon.startup")


def check_models(settings: Settings) -> None:
    """Every model a rule names must be a usable package before anything is accepted."""
    for i, rule in enumerate(settings.rules):
        for model in rule.models:
            try:
                load_package(settings.models.path, model)
            except PackageError as exc:
                raise settings.error(f"rules.{i}.models", f"{exc}") from None


def check_tls(settings: Settings) -> None:
    """Certificates and keys are loaded at start-up, not found wanting at the first send (each
    destination type says what it loads: senders/dicom.py, the DICOM TLS files)."""
    for name, destination in settings.destinations.items():
        try:
            destination.check()
        except SettingError as exc:
            raise settings.error(f"destinations.{name}.{exc.key}", exc.problem) from None


def open_store(settings: Settings) -> Store:
    """Connect to the job store and check its schema is current."""
    url = make_url(settings.database.url)
    sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).exists():
        # Connecting would create an empty file, which later looks like a store with no tables.
        raise settings.error("database.url", f"there is no job store at {sqlite_file}: create it with "
                             "`machaon db upgrade`")
    try:
        store = Store(settings.database.url)
    except (OSError, ValueError, sqlalchemy.exc.ArgumentError) as exc:
        raise settings.error("database.url", f"cannot use the database: {exc}") from None
    try:
        check_schema(store.engine)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        store.dispose()
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise settings.error("database.url", f"cannot use the database: {reason}") from None
    except SchemaError as exc:
        store.dispose()
        raise settings.error("database.url", str(exc)) from None
    return store


def open_spool(settings: Settings) -> Spool:
    spool = Spool(settings.spool.path, settings.spool.min_free_mb)
    try:
        spool.prepare()
    except SpoolError as exc:
        raise settings.error("spool.path", str(exc)) from None
    return spool


def start_listener(settings: Settings, store: Store, spool: Spool) -> StorageSCP:
    scp = StorageSCP(settings, store, spool)
    try:
        scp.start()
    except OSError as exc:
        where = f"{settings.dicom.host}:{settings.dicom.port}"
        if exc.errno == errno.EADDRINUSE:
            raise settings.error("dicom.port", f"{where} is already in use by another program") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise settings.error("dicom.port", f"not allowed to listen on {where} "
                                 "(ports below 1024 need CAP_NET_BIND_SERVICE)") from None
        raise settings.error("dicom.host", f"cannot listen on {where}: {exc.strerror or exc}") from None
    return scp


def reconcile_spool(store: Store, spool: Spool, index, started: float) -> None:
    """Index the files under studies/ that have no row (a crash between their rename and their
    commit: they are whole, but were never acknowledged), or quarantine those that cannot be
    indexed. `index(relative)` records one file; files written since `started` are this process's
    own. One file that fails is logged and the others go on; the next start looks again."""
    counts = dict.fromkeys(("indexed", "quarantined", "failed", "skipped"), 0)
    try:
        for study_uid, files in spool.study_files():
            with store.read_session() as session:
                known = set(session.execute(select(Instance.path).join(SeriesRow).join(Study)
                                            .where(Study.study_uid == study_uid)).scalars())
            for relative in files:
                if relative not in known:
                    counts[_reconcile(store, spool, index, started, study_uid, relative)] += 1
    except sqlalchemy.exc.SQLAlchemyError as exc:  # the store went away: the next start looks again
        log.error("spool reconciliation stopped: the job store failed: %s", exc)
    if counts["indexed"] or counts["quarantined"] or counts["failed"]:
        log.warning("spool: of the files found without a row, %(indexed)d indexed, %(quarantined)d moved "
                    "to quarantine/, %(failed)d left for the next start", counts)


def _reconcile(store: Store, spool: Spool, index, started: float, study_uid: str, relative: str) -> str:
    """What became of one file without a row: "indexed", "quarantined", "failed" or "skipped"."""
    try:
        if spool.path(relative).stat().st_mtime >= started:
            return "skipped"  # received by this process, its row on its way
        index(relative)
        return "indexed"
    except FileNotFoundError:
        return "skipped"  # a replaced copy, removed by the listener meanwhile
    except Refused as exc:
        reason = str(exc)
    except sqlalchemy.exc.SQLAlchemyError:
        raise
    except Exception:  # a bug: this file waits for the next start, the others go on
        log.exception("could not index %s", relative)
        return "failed"
    try:
        moved = spool.quarantine(relative)
    except OSError as exc:
        log.error("could not move %s to quarantine/: %s", relative, exc.strerror or exc)
        return "failed"
    with store.session.begin() as session:
        add_event(session, "startup", "spool.quarantined", study_uid if valid_uid(study_uid) else None,
                  path=moved, reason=reason)
    log.warning("%s cannot be indexed (%s): moved to %s", relative, reason, moved)
    return "quarantined"
