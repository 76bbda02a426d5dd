"""Start-up: open and check the store, the spool, the port and the models before serving.

Everything an operator can get wrong is checked before anything is accepted, and
stops start-up with one message naming the setting (a ConfigError, exit 78). What
may come by itself (the database starting, a port still held by a process on its
way out) is waited for, up to service.startup_wait from the start in all, then stops
start-up with exit 75 (an Unavailable), which systemd restarts; SIGTERM meanwhile
ends the wait at once (exit 0). Once the port is ours, files the
spool holds without a row are indexed or quarantined.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy.exc
from sqlalchemy import URL, make_url, select

from .config import ConfigError, Settings, Unavailable, is_secret
from .listener import tls_context
from .manifest import PackageError, load_package
from .scp import Refused, StorageSCP
from .senders import SettingError
from .spool import Spool, SpoolError, valid_uid
from .store import Instance, SchemaError, SeriesRow, Store, Study, add_event, check_schema

log = logging.getLogger("machaon.startup")

T = TypeVar("T")
# Seconds a PostgreSQL connection attempt may take: one that is never answered (a firewall that
# drops packets) otherwise takes minutes to give up.
CONNECT_TIMEOUT_S = 5
# What the server answers when it will take connections soon (PostgreSQL's FATAL messages).
_DATABASE_NOT_YET = ("starting up", "shutting down", "recovery", "too many clients", "connection slots")


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


class Stopped(Exception):
    """SIGTERM (or Ctrl-C) came while start-up waited: the service stops without having started."""


class Waiting:
    """The waits of one start: one deadline, service.startup_wait from now, for all of them (the
    database, then each port: systemd's stop timeout is not longer than that), each ended at once by
    `stopping` (set by SIGTERM)."""

    def __init__(self, settings: Settings, stopping: threading.Event | None = None):
        self.wait_s = settings.service.startup_wait
        self.deadline = time.monotonic() + self.wait_s
        self.stopping = stopping or threading.Event()


def until_available(settings: Settings, attempt: Callable[[], T], waiting: Waiting | None = None) -> T:
    """`attempt()` until it stops raising Unavailable, waiting 1 s, then twice as long each time up
    to 10 s, until `waiting`'s deadline (service.startup_wait after start-up began); then its last
    Unavailable, saying how long it waited. `waiting.stopping` set meanwhile raises Stopped."""
    waiting = waiting or Waiting(settings)
    pause = 1.0
    while True:
        try:
            return attempt()
        except Unavailable as exc:
            left = waiting.deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{exc} (waited service.startup_wait = {waiting.wait_s:g} s)") from None
            log.warning("%s; trying again in %.0f s (giving up in %.0f s)", exc, min(pause, left), left)
            if waiting.stopping.wait(min(pause, left)):
                raise Stopped() from None
            pause = min(pause * 2, 10)


def open_store(settings: Settings, wait: Waiting | bool = False) -> Store:
    """Connect to the job store and check its schema is current. With `wait` (a service starting:
    its Waiting, or True for one of its own), a database that is not reachable yet is waited for
    (until_available)."""
    if wait:
        return until_available(settings, lambda: _open_store(settings), None if wait is True else wait)
    return _open_store(settings)


def _open_store(settings: Settings) -> Store:
    url = database_url(settings)
    sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).exists():
        # Connecting would create an empty file, which later looks like a store with no tables.
        raise settings.error("database.url", f"there is no job store at {sqlite_file}: create it with "
                             "`machaon db upgrade`")
    try:
        store = Store(url.render_as_string(hide_password=False))
    except (OSError, ValueError, sqlalchemy.exc.ArgumentError) as exc:
        raise settings.error("database.url", f"cannot use the database: {exc}") from None
    try:
        check_schema(store.engine)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        store.dispose()
        raise database_problem(settings, exc) from None
    except SchemaError as exc:
        store.dispose()
        raise settings.error("database.url", str(exc)) from None
    return store


def database_url(settings: Settings) -> URL:
    """database.url, with a PostgreSQL connection attempt bounded (CONNECT_TIMEOUT_S) unless the
    URL bounds it itself."""
    url = make_url(settings.database.url)
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        url = url.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)})
    return url


def database_problem(settings: Settings, exc: sqlalchemy.exc.SQLAlchemyError) -> ConfigError | Unavailable:
    """What a database that failed with `exc` means: Unavailable where it may be there soon, else a
    ConfigError."""
    url = make_url(settings.database.url)
    lines = [line.strip() for line in str(getattr(exc, "orig", None) or exc).splitlines() if line.strip()]
    lines = lines or [type(exc).__name__]
    # Only a failure to connect or to talk may pass; any other (a ProgrammingError such as
    # permission denied on the schema) is the configuration's.
    may_pass = isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    refusal = refused(url.get_backend_name(), lines) if may_pass else lines[0]
    if refusal:
        return settings.error("database.url", f"cannot use the database: {refusal}")
    sqlite = url.get_backend_name() == "sqlite"
    where = url.database if sqlite else f"{url.host or 'localhost'}:{url.port or 5432}"
    return settings.unavailable("database.url", f"the database at {where} is not available: {lines[0]}; "
                                "check that it is running and reachable from here")


def refused(backend: str, lines: list[str]) -> str | None:
    """The line of a failed connection's message (`lines`) in which the database answered no (a
    wrong user or password, no such database), or None where it may be there soon: PostgreSQL not
    reachable, not answering or starting up, or SQLite locked by another process. Every line is
    read: libpq tries each address of a host name in turn (::1 refused, then 127.0.0.1 answering
    "password authentication failed"), one line each, in either order."""
    if backend == "sqlite":
        return None if any("database is locked" in line for line in lines) else lines[0]
    for line in lines:  # one without FATAL (refused, timed out, a name not resolved) had no answer
        if "FATAL:" in line and not any(words in line for words in _DATABASE_NOT_YET):
            return line[line.find("connection to server"):] if "connection to server" in line else line
    return None


def open_spool(settings: Settings) -> Spool:
    spool = Spool(settings.spool.path, settings.spool.min_free_mb)
    try:
        spool.prepare()
    except SpoolError as exc:
        raise settings.error("spool.path", str(exc)) from None
    if not spool.has_room():  # not a reason to stop: retention (or an operator) may free space
        log.warning("the spool (%s) has %d MiB free, less than spool.min_free_mb (%d): C-STOREs are "
                    "refused with 'out of resources' until there is more (free disk space, or let "
                    "spool.keep_days / spool.emergency_free_mb remove finished studies)", spool.root,
                    spool.free_bytes() // 2**20, settings.spool.min_free_mb)
    return spool


def start_listener(settings: Settings, store: Store, spool: Spool,
                   waiting: Waiting | None = None) -> StorageSCP:
    """The DICOM listener, once its port is free (until_available: the process that holds it may
    be on its way out, such as this service's previous run)."""
    check_listener_tls(settings)
    scp = StorageSCP(settings, store, spool)
    until_available(settings, lambda: _listen(settings, scp), waiting)
    return scp


def check_listener_tls(settings: Settings) -> None:
    """[dicom.tls]'s certificate, key and CA load (and the key matches the certificate)."""
    tls = settings.dicom.tls
    if tls is None:
        return
    try:
        tls_context(tls)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        files = ", ".join(str(f) for f in (tls.certificate, tls.private_key, tls.ca_certificates) if f)
        raise settings.error("dicom.tls", f"cannot use the TLS files ({files}): {reason}") from None


def _listen(settings: Settings, scp: StorageSCP) -> None:
    try:
        scp.start()
    except OSError as exc:
        tls = settings.dicom.tls
        where = f"{settings.dicom.host}:{settings.dicom.port}" + (f" or {tls.port}" if tls else "")
        if exc.errno == errno.EADDRINUSE:
            raise settings.unavailable("dicom.port", f"{where} is already in use by another program; "
                                       "check which one (ss -ltnp) and stop it, or choose another "
                                       "dicom.port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise settings.error("dicom.port", f"not allowed to listen on {where} "
                                 "(ports below 1024 need CAP_NET_BIND_SERVICE)") from None
        raise settings.error("dicom.host", f"cannot listen on {where}: {exc.strerror or exc}") from None


def check_config_file(settings: Settings) -> None:
    """A configuration file that holds a password must not be readable by other users: the
    service refuses to start until it is made private. Group read is allowed for this process's own
    group (a root-owned file of mode 0640 in the service's group)."""
    for key, source in _secrets(settings):
        path = Path(source)
        if not path.is_file():  # set by an environment variable
            continue
        info = path.stat()
        mode = stat.S_IMODE(info.st_mode)
        if not (mode & stat.S_IROTH or (mode & stat.S_IRGRP and info.st_gid != os.getegid())):
            continue
        if info.st_uid == os.geteuid():
            fix = f"run `chmod 600 {path}`"
        else:
            group, owner = _name(grp.getgrgid, os.getegid()), _name(pwd.getpwuid, info.st_uid)
            fix = f"run `chgrp {group} {path}` and `chmod 640 {path}` (its owner, {owner}, keeps it)"
        raise settings.error(key, f"{path} holds a password and other users can read it (mode {mode:04o}): "
                             f"{fix}")


def _secrets(settings: Settings) -> list[tuple[str, str]]:
    """(key, where it was set) of each secret the configuration holds: a database URL with a
    password, and any key named as a secret (is_secret) with a text value."""
    found = []
    if make_url(settings.database.url).password:
        found.append("database.url")

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, str) and value and is_secret(prefix):
            found.append(prefix)
    for section, value in settings.model_dump(exclude={"sources"}).items():
        walk(section, value)
    return [(key, settings.source_of(key)) for key in found]


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


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
