"""The job store: what was received, what is complete, what was done, by whom.

SQLAlchemy 2 ORM over SQLite (WAL) or PostgreSQL. Every state change is one
transaction. The schema is owned by the Alembic migrations in
machaon/migrations; `machaon db upgrade` applies them and start-up checks them.

The states a row goes through, and who moves it (nothing else does):

    study, series  receiving -> complete         completion (quiet period, or forced)
                   complete  -> receiving        ingest (an image arrived after completion)
    job            queued    -> running          worker (claim, once its not_before has passed)
                   running   -> succeeded        worker (results recorded)
                   running   -> queued           worker (failed for a reason that may pass: tried
                                                 again after a backoff, up to worker.max_attempts)
                   running   -> failed           worker (the reason kept on the job: bad input, a
                                                 missing model, or max_attempts reached)
                   running   -> running          worker (a lease ran out: claimed again)
                   running   -> failed           worker (a lease ran out max_attempts times)
                   queued    -> superseded       planner (a newer completion's job does the work)
                   queued    -> cancelled        operator
                   failed, cancelled -> queued   operator (retry: attempts start again)
    delivery       pending   -> sent             dispatch (the destination acknowledged it)
                   pending   -> pending          dispatch (failed; tried again after a backoff),
                                                 operator (retry: due now)

Operators act through operations.py, which records each action as an event naming them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


class StudyStatus(StrEnum):
    """A study's (and a series') reception; see the table above."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # queued, then replaced by a newer completion's job before it ran
    CANCELLED = "cancelled"  # queued, then cancelled by an operator

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUPERSEDED, JobStatus.CANCELLED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # a pending delivery with a last_error is failing: operators see it as "failed"
    SENT = "sent"


class Role(StrEnum):
    """What an API token may do."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # read, and act: retry, cancel, reprocess, complete


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so neither backend gets one."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# series.image_type: Image Type's values, joined by a backslash, as many whole values as fit.
IMAGE_TYPE_LENGTH = 256


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    # When the study last went to "receiving" (first image, or reopened).
    opened_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    # When a result of the study was last delivered (the dashboard's latency: from last_received_at).
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    # How many times the study was completed: 2 means it was reopened once.
    completion_count: Mapped[int] = mapped_column(Integer, default=0)
    # How many of those completions have had their jobs planned (rules applied).
    planned_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Why the latest planning could not read or plan all of the study (None when it could).
    planning_error: Mapped[str | None] = mapped_column(Text)
    # When retention last removed its files from the spool (retention.py): the files of the
    # instances received before then are gone; its rows stay.
    files_removed_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    series: Mapped[list[SeriesRow]] = relationship(back_populates="study", order_by="SeriesRow.id")


class SeriesRow(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    # What the rules match on besides the above, recorded at ingest so that planning reads no file.
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    image_type: Mapped[str | None] = mapped_column(String(IMAGE_TYPE_LENGTH))  # values joined by "\\"
    status: Mapped[str] = mapped_column(String(16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # The images it holds: its NumberOfFrames, else 1. NULL: its header facts (these three and its
    # series') were never recorded: a row kept before revision 0004 whose file `machaon db upgrade`
    # could not read.
    frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    # Relative to the spool folder.
    path: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    # The same SOP Instance UID received again replaces the file and counts here.
    receive_count: Mapped[int] = mapped_column(Integer, default=1)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The queue, in the order workers take it; and operators' lists of recent failures.
        Index("ix_jobs_queue", "status", text("priority DESC"), "created_at", "id"),
        Index("ix_jobs_status_finished", "status", "finished_at"),
        Index("ix_jobs_status_model", "status", "model"),  # counts per state and model (metrics)
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str | None] = mapped_column(String(64))
    # Where its results go (a JSON list), as the rule said when the job was planned. NULL for a job
    # planned before revision 0004: its rule, looked up by name when the job runs, says.
    destinations: Mapped[str | None] = mapped_column(Text)
    # The study's completion this job was planned for: a reopened study gets new jobs.
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A job queued again after a failure that may pass waits until then (backoff).
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    # Seconds spent in each stage of its last run (a JSON object).
    timings: Mapped[str | None] = mapped_column(Text)
    # How many of its attempts ended with its worker stopping (its lease ran out).
    stops: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    # A queued job made redundant by a newer completion's job for the same series, rule and model.
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Result(Base):
    """An object a job produced. A re-run that produces the same object (same UID) gets a row of
    its own, so each job keeps its results; the object is delivered once (see Delivery)."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    """One result to one destination: pending until the destination acknowledged it."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),
                      Index("ix_deliveries_destination_status", "destination", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)


class Event(Base):
    """The audit trail: who did what, when."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[str | None] = mapped_column(Text)


class ApiToken(Base):
    """A bearer token for the REST API and the web page; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


# --- engine and schema ---------------------------------------------------------

class SchemaError(Exception):
    """The database schema is missing or older than this version of machaon."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (see _sqlite_on_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns, which a C-STORE success promises.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn) -> None:
    # IMMEDIATE takes the write lock up front, so two writers wait for each other
    # (busy_timeout) instead of one failing when it upgrades a read lock. Readers
    # (Store.read_session) need no lock in WAL mode and must not hold up ingest.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


def _alembic_config(bind: Engine | Connection | None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "machaon:migrations")
    cfg.attributes["bind"] = bind
    return cfg


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply the migrations; returns (revision before, revision after)."""
    before = current_revision(engine)
    if engine.dialect.name != "sqlite":
        command.upgrade(_alembic_config(engine), "head")
        return before, head_revision()
    # SQLite alters a table by copying and dropping it; with foreign keys on, the
    # drop would cascade into every row that refers to it. They go off (outside
    # any transaction, or SQLite ignores it) and are checked afterwards.
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None  # an open connection has its sqlite3 connection
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            command.upgrade(_alembic_config(conn), "head")
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
    if broken:
        raise SchemaError(f"the migration left {len(broken)} rows referring to missing ones")
    return before, head_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    assert head is not None  # machaon/migrations holds the revisions, one of them the head
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no machaon tables" if current is None else f"is at revision {current}, not {head}"
        raise SchemaError(f"the database {state}: run `machaon db upgrade`")


class Store:
    """An engine and its session factory: what the service threads share."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        # For queries that write nothing (the CLI, the API).
        self.read_session = sessionmaker(self.engine.execution_options(read_only=True))

    def dispose(self) -> None:
        self.engine.dispose()


def add_event(db: Session | Connection, actor: str, action: str, study_uid: str | None = None,
              **detail) -> None:
    db.execute(insert(Event).values(
        at=utcnow(), actor=actor, action=action, study_uid=study_uid,
        detail=json.dumps(detail, default=str) if detail else None))


# --- ingest ----------------------------------------------------------------------

@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP read from a received instance's header."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    body_part: str | None = None
    image_type: str | None = None  # the values joined by a backslash
    instance_number: int | None = None
    frames: int = 1  # NumberOfFrames, else 1
    rows: int | None = None
    columns: int | None = None


class UidConflict(Exception):
    """A UID meant to be unique already filed under another study (a sender error, or a peer
    claiming what is not its own); the caller's transaction must roll back, keeping the first."""

    def __init__(self, kind: str, uid: str, owner_study_uid: str):
        super().__init__(f"{kind} {uid} already belongs to study {owner_study_uid}")
        self.kind, self.uid, self.owner_study_uid = kind, uid, owner_study_uid


class SeriesConflict(UidConflict):
    """A Series Instance UID already filed under another study."""

    def __init__(self, uid: str, owner_study_uid: str):
        super().__init__("series", uid, owner_study_uid)


class InstanceConflict(UidConflict):
    """A SOP Instance UID already kept under another study."""

    def __init__(self, uid: str, owner_study_uid: str):
        super().__init__("instance", uid, owner_study_uid)


@dataclass(frozen=True)
class Recorded:
    replaced_path: str | None  # the earlier copy's path, when it was elsewhere
    replaced: bool
    study_reopened: bool


def _insert(dialect: str, table):
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


@functools.cache
def _ingest_statements(dialect: str) -> SimpleNamespace:
    """Built once per dialect: ingest runs these for every instance."""
    def keep(column):  # a new non-empty value wins, else the one we had
        return func.coalesce(bindparam(f"new_{column.key}"), column)

    return SimpleNamespace(
        new_study=_insert(dialect, Study).on_conflict_do_nothing(index_elements=["study_uid"])
        .returning(Study.id),
        touch_study=update(Study).where(Study.study_uid == bindparam("uid")).values(
            last_received_at=bindparam("now"),
            **{c.key: keep(c) for c in (Study.patient_id, Study.patient_name, Study.accession_number,
                                        Study.study_date, Study.study_description)},
        ).returning(Study.id, Study.status, Study.completion_count),
        reopen_study=update(Study).where(Study.id == bindparam("study_id")).values(
            status=StudyStatus.RECEIVING, opened_at=bindparam("now"), completed_at=None),
        new_series=_insert(dialect, SeriesRow).on_conflict_do_nothing(index_elements=["series_uid"]),
        touch_series=update(SeriesRow).where(SeriesRow.series_uid == bindparam("uid")).values(
            status=StudyStatus.RECEIVING, completed_at=None, last_received_at=bindparam("now"),
            **{c.key: keep(c) for c in _SERIES_FACTS},
        ).returning(SeriesRow.id, SeriesRow.study_id),
        kept_instance=select(Instance.path, Study.study_uid)
        .join(SeriesRow, Instance.series_id == SeriesRow.id).join(Study, SeriesRow.study_id == Study.id)
        .where(Instance.sop_instance_uid == bindparam("uid")),
        study_uid=select(Study.study_uid).where(Study.id == bindparam("id")),
        upsert_instance=_upsert_instance(dialect),
    )


def _upsert_instance(dialect: str):
    """The newer copy of a SOP Instance replaces the older one, counted once."""
    stmt = _insert(dialect, Instance)
    return stmt.on_conflict_do_update(
        index_elements=["sop_instance_uid"],
        set_={**{c: stmt.excluded[c] for c in _INSTANCE_UPDATED},
              "receive_count": Instance.receive_count + 1},
    )


_INSTANCE_UPDATED = ("series_id", "sop_class_uid", "transfer_syntax_uid", "instance_number",
                     "frames", "rows", "columns", "path", "size_bytes", "calling_ae", "received_at")
# What a series' instances say about it: a new non-empty value wins at ingest.
_SERIES_FACTS = (SeriesRow.modality, SeriesRow.series_number, SeriesRow.series_description,
                 SeriesRow.protocol_name, SeriesRow.body_part, SeriesRow.image_type)


def record_instance(conn: Connection, inst: ReceivedInstance, actor: str) -> Recorded:
    """Record one received instance (caller commits). Creates or reopens its
    study and series; a SOP Instance UID seen before is updated, not added."""
    q = _ingest_statements(conn.dialect.name)
    now = utcnow()
    created = conn.execute(q.new_study, dict(
        study_uid=inst.study_uid, status=StudyStatus.RECEIVING, first_received_at=now, opened_at=now,
        last_received_at=now, completion_count=0)).first() is not None
    # The UPDATE locks the row (PostgreSQL) before we look at its status, so the
    # completion job cannot close the study between our look and our write.
    study_id, status, completions = conn.execute(q.touch_study, dict(
        uid=inst.study_uid, now=now, new_patient_id=inst.patient_id,
        new_patient_name=inst.patient_name, new_accession_number=inst.accession_number,
        new_study_date=inst.study_date, new_study_description=inst.study_description)).one()
    reopened = status == StudyStatus.COMPLETE
    if reopened:
        conn.execute(q.reopen_study, dict(study_id=study_id, now=now))
    conn.execute(q.new_series, dict(study_id=study_id, series_uid=inst.series_uid,
                                    status=StudyStatus.RECEIVING, first_received_at=now,
                                    last_received_at=now))
    series_id, series_study_id = conn.execute(q.touch_series, dict(
        uid=inst.series_uid, now=now, **_new_series_facts(inst))).one()
    if series_study_id != study_id:
        owner = conn.execute(q.study_uid, dict(id=series_study_id)).scalar_one()
        raise SeriesConflict(inst.series_uid, owner)
    kept = conn.execute(q.kept_instance, dict(uid=inst.sop_instance_uid)).first()
    if kept is not None and kept.study_uid != inst.study_uid:
        raise InstanceConflict(inst.sop_instance_uid, kept.study_uid)
    previous = kept.path if kept is not None else None
    conn.execute(q.upsert_instance, dict(
        series_id=series_id, sop_instance_uid=inst.sop_instance_uid,
        sop_class_uid=inst.sop_class_uid, transfer_syntax_uid=inst.transfer_syntax_uid,
        instance_number=inst.instance_number, frames=inst.frames, rows=inst.rows, columns=inst.columns,
        path=inst.path, size_bytes=inst.size_bytes, calling_ae=inst.calling_ae, received_at=now,
        receive_count=1))
    if created:
        add_event(conn, actor, "study.received", inst.study_uid)
    elif reopened:
        add_event(conn, actor, "study.reopened", inst.study_uid, completion_count=completions)
    return Recorded(
        replaced_path=previous if previous not in (None, inst.path) else None,
        replaced=previous is not None, study_reopened=reopened,
    )


def _new_series_facts(inst: ReceivedInstance) -> dict:
    return {f"new_{c.key}": getattr(inst, c.key) for c in _SERIES_FACTS}


# --- header facts of rows kept before they were recorded at ingest (revision 0004) ---------

def instances_without_facts(conn: Connection, after_id: int, limit: int) -> list[tuple[int, int, str]]:
    """(id, series id, spool path) of up to `limit` instances past `after_id` whose header facts
    were never recorded, in the order they were received."""
    return [(row.id, row.series_id, row.path) for row in conn.execute(
        select(Instance.id, Instance.series_id, Instance.path)
        .where(Instance.frames.is_(None), Instance.id > after_id).order_by(Instance.id).limit(limit))]


def record_facts(conn: Connection, instance_id: int, series_id: int, inst: ReceivedInstance) -> None:
    """Record the header facts read from a kept instance's file (caller commits). Its series keeps
    the facts it has; those it lacks come from the first of its instances that has them."""
    # Only a row still without facts: one received again meanwhile has its own, from its new file.
    conn.execute(update(Instance).where(Instance.id == instance_id, Instance.frames.is_(None)).values(
        frames=inst.frames, rows=inst.rows, columns=inst.columns))
    conn.execute(update(SeriesRow).where(SeriesRow.id == series_id).values(
        **{c.key: func.coalesce(c, getattr(inst, c.key)) for c in _SERIES_FACTS}))
