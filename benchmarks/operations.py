"""Operators' queries and actions on a job store the size of a busy site's week.

A job store migrated by `machaon db upgrade` is filled with bulk inserts (COPY on PostgreSQL) with
a seeded, realistic week: ~100 instances per study in a few series, CT/MR/X-ray studies with the
models their series get, jobs in every state (mostly succeeded; some thousands failed with their
reasons; a backlog queued and running; some waiting out a retry's backoff), results with one
delivery per destination (sent; recent ones pending; an archive that has been down for the last
hour and a half; a few that keep failing), and the events the service writes. Then `machaon api`
serves it alone, and over HTTP (after warm-up requests, taking turns):

- GET /api/v1/jobs?status=failed&limit=100 and GET /api/v1/summary: median and p95 latency;
  GET /api/v1/studies?q=<an accession number>, GET /metrics and the dashboard's HTML as extras,
  and GET /healthz as the floor of the HTTP stack; the target is a p95 under 100 ms. Each
  endpoint's operation is then run in this process and every SELECT it runs is timed again alone;
  those of an endpoint over the target are printed, those of every endpoint with --explain, which
  adds the plan of each that takes 5 ms or more (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN
  on SQLite).
- the dashboard's first contentful paint and load time in headless Debian chromium (Playwright),
  signed in with the token's cookie: median of a few loads after a warm-up one.
- POST /api/v1/jobs/retry with the filter (since, and a model if that comes closer) that takes
  closest to 1,000 failed jobs, last since it changes the store.

    .venv/bin/python -m benchmarks.operations [--backend sqlite|postgresql|both]
        [--jobs 100000] [--instances 1000000] [--seed 1] [--requests 50] [--loads 5] [--retry 1000]
        [--explain] [--keep]
        [--sql "CREATE INDEX ..."]     # run on the filled store before measuring (try a fix)
        [--database URL]               # measure a store filled before (kept with --keep)

PostgreSQL: a throwaway database on --postgres (default postgres@127.0.0.1:5432), dropped at the
end unless --keep. SQLite gets no ANALYZE (the service never runs one); PostgreSQL gets the VACUUM
ANALYZE autovacuum runs after such a load. Prints a table to paste into a note; writes the same, with
each endpoint's statements and plans, to benchmarks/out/operations.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from machaon.display import Column, print_table, progress, step
from rich.console import Console

HERE = Path(__file__).resolve().parent
MACHAON = str(Path(sys.executable).with_name("machaon"))
CHROMIUM = Path("/usr/bin/chromium")
TARGET_MS = 100.0
WARM_UP = 5
EXPLAIN_FROM_MS = 5.0  # statements at least this slow get their plan printed with --explain
CHUNK = 20_000  # rows per bulk insert
WEEK = timedelta(days=7)
QUIET_S = 60  # completion.complete_after on the filled site
BACKLOG = timedelta(minutes=4)  # jobs created this recently are still queued (the oldest running)
WORKERS = 4
ARCHIVE_DOWN_FOR = timedelta(minutes=90)
UID_ROOT = "1.2.826.0.1.3680043.10.1066"

console = Console(highlight=False)


# --- what a week at the site looks like --------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A model the kind's rule gives one of its series."""

    series: int  # index into Kind.series
    model: str
    task: str  # segmentation: SEG + SR; classification: SR
    seconds: float  # a typical run


def targets(*by_series: tuple[int, str, float, tuple[str, ...]]) -> tuple[Target, ...]:
    """(series, task, seconds, models) groups as Targets."""
    return tuple(Target(series, model, task, seconds) for series, task, seconds, models in by_series
                 for model in models)


@dataclass(frozen=True)
class Kind:
    modality: str
    description: str
    rule: str
    weight: float  # share of the studies
    size: float  # relative number of images
    sop_class: str
    ae: str
    series: tuple[tuple[str, float], ...]  # (description, share of the study's images)
    targets: tuple[Target, ...]
    destinations: tuple[str, ...]
    matrix: int


CT, MR, DX = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1.1"
SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
SEG, CLS = "segmentation", "classification"
# A site that runs many models on each study: ~8.8 jobs per study when it completes; the rest of
# the jobs asked for are later runs (reprocessing, retries).
KINDS = (
    Kind("CT", "CT CHEST WO CONTRAST", "ct-chest", 0.25, 4.0, CT, "CT_SOMATOM",
         (("SCOUT", 0.005), ("AX 5.0 B30f", 0.2), ("AX 1.0 B60f LUNG", 0.6), ("COR 3.0 MPR", 0.195)),
         targets((2, SEG, 20, ("lung-nodules", "emphysema", "airway-analysis", "interstitial-lung-disease")),
                 (2, CLS, 6, ("pneumothorax-ct",)),
                 (1, SEG, 12, ("body-composition", "coronary-calcium", "aortic-diameter",
                               "vertebral-fracture", "liver-fat", "lymph-nodes")),
                 (1, CLS, 5, ("thyroid-nodules",))),
         ("pacs", "archive"), 512),
    Kind("CT", "CT ABDOMEN PELVIS W CONTRAST", "ct-abdomen", 0.2, 4.0, CT, "CT_REVOLUTION",
         (("SCOUT", 0.005), ("ARTERIAL 2.5", 0.3), ("PORTAL VENOUS 2.5", 0.4), ("DELAYED 5.0", 0.295)),
         targets((2, SEG, 15, ("liver-segmentation", "spleen-segmentation", "kidney-segmentation",
                               "pancreas-segmentation", "liver-lesions", "adrenal-nodules",
                               "body-composition", "vertebral-fracture")),
                 (1, SEG, 10, ("aortic-aneurysm", "renal-arteries"))),
         ("pacs", "archive"), 512),
    Kind("MR", "MR HEART FUNCTION", "mr-heart", 0.15, 2.0, MR, "MR_AVANTO",
         (("LOCALIZER", 0.05), ("CINE 4CH", 0.25), ("sax", 0.5), ("LGE SAX", 0.2)),
         targets((2, SEG, 4, ("lv-segmentation", "rv-segmentation", "myocardial-strain")),
                 (2, CLS, 2, ("lv-function",)),
                 (1, SEG, 3, ("atrial-volumes", "valve-planes")),
                 (3, SEG, 6, ("scar-quantification",)), (3, CLS, 2, ("scar-report",))),
         ("pacs",), 256),
    Kind("MR", "MR BRAIN WWO CONTRAST", "mr-brain", 0.15, 2.5, MR, "MR_SKYRA",
         (("T1 SAG", 0.2), ("T2 AX", 0.25), ("FLAIR AX", 0.25), ("T1 POST AX", 0.3)),
         targets((3, SEG, 20, ("brain-mets", "meningioma")), (2, SEG, 14, ("white-matter-lesions",)),
                 (0, SEG, 25, ("brain-volumetry", "hippocampus-volumes")), (0, CLS, 8, ("brain-age",)),
                 (1, SEG, 10, ("ventricles",)), (1, CLS, 6, ("infarct-detection",))),
         ("pacs",), 256),
    Kind("DX", "XR CHEST PA LAT", "cxr", 0.25, 0.02, DX, "DX_YSIO",
         (("PA", 0.5), ("LAT", 0.5)),
         targets((0, CLS, 1.5, ("cxr-findings", "cxr-tubes-lines", "pneumothorax-xr", "cxr-nodules")),
                 (1, CLS, 1.5, ("cxr-lateral-findings",))),
         ("pacs",), 2048),
)
# Why jobs fail, with how often, and how many attempts each took.
FAILURES = (
    (30, 1, "cannot decode its pixel data: transfer syntax 1.2.840.10008.1.2.4.91 (JPEG 2000) needs "
            "pylibjpeg-openjpeg, which is not installed"),
    (20, 1, "the series' {n} images are in 2 orientations (axial and coronal): {model} needs one stack"),
    (15, 1, "images of different sizes in one series (512x512 and 256x256): {model} needs one grid"),
    (12, 1, "slice spacing varies from 1.0 to 5.0 mm: the series is not one volume"),
    (10, 3, "the worker stopped 3 times while running this job (its lease ran out each time): the study "
            "may be what stops it; the service log around those times says more, and `machaon jobs "
            "retry {job}` runs it again"),
    (8, 3, "onnxruntime: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory "
           "(attempt 3 of 3: no more retries)"),
    (5, 1, "no built package for model {model} in /var/lib/machaon/models: build it with `machaon "
           "models build {model}`"),
)
TRANSIENT = "onnxruntime: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory"
ARCHIVE_DOWN = "cannot connect to ARCHIVE at 10.20.0.15:11112: [Errno 111] Connection refused"
PACS_REFUSES = ("PACS answered C-STORE with status 0xA900 (Data Set does not match SOP Class) for a "
                "{kind}")
FAMILY = ("SMITH", "GARCIA", "MUELLER", "ROSSI", "DUBOIS", "NOWAK", "JANSEN", "SILVA", "KOWALSKI",
          "HANSEN", "MARTIN", "NIELSEN", "LEROY", "KLEIN", "MORENO", "BAKER", "WEBER", "FISCHER")
GIVEN = ("ANNA", "JOHN", "MARIA", "PETER", "ELENA", "LUCAS", "SOFIA", "DAVID", "EMMA", "PAUL",
         "CLARA", "MARC", "NINA", "TOM", "JULIA", "OSKAR")

# Each table's columns, in the order the rows below give them; tables in the order they are written
# (each one after those it refers to).
COLUMNS = {
    "studies": ("id", "study_uid", "patient_id", "patient_name", "accession_number", "study_date",
                "study_description", "status", "first_received_at", "opened_at", "last_received_at",
                "completed_at", "completion_count", "planned_count", "planning_error"),
    "series": ("id", "study_id", "series_uid", "modality", "series_number", "series_description",
               "body_part", "image_type", "status", "first_received_at", "last_received_at", "completed_at"),
    "instances": ("id", "series_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid",
                  "instance_number", "frames", "rows", "columns", "path", "size_bytes", "calling_ae",
                  "received_at", "receive_count"),
    "jobs": ("id", "study_id", "series_id", "model", "rule", "destinations", "generation", "status",
             "priority", "attempts", "stops", "not_before", "timings", "lease_owner", "lease_expires_at",
             "error", "superseded_by", "created_at", "started_at", "finished_at"),
    "results": ("id", "job_id", "kind", "sop_class_uid", "sop_instance_uid", "series_uid", "path",
                "created_at"),
    "deliveries": ("id", "result_id", "destination", "status", "attempts", "next_attempt_at",
                   "last_error", "sent_at"),
    "events": ("id", "at", "actor", "action", "study_uid", "detail"),
}


@dataclass
class StudyPlan:
    id: int
    uid: str
    kind: Kind
    first: datetime
    last: datetime
    completed: datetime | None
    jobs: int
    series: list[tuple[int, str]] = field(default_factory=list)  # (id, UID), in Kind.series order
    images: list[int] = field(default_factory=list)  # per series


class Writer:
    """Rows buffered per table and written in bulk, parents before children: SQLAlchemy Core
    inserts of lists of dicts on SQLite (its types format the times as the service's do), COPY on
    PostgreSQL."""

    def __init__(self, engine):
        from machaon.store import Base
        self.engine, self.tables = engine, Base.metadata.tables
        self.rows: dict[str, list[tuple]] = {name: [] for name in COLUMNS}
        self.next_id = dict.fromkeys(COLUMNS, 1)
        self.count = dict.fromkeys(COLUMNS, 0)

    def new_id(self, table: str) -> int:
        self.next_id[table] += 1
        return self.next_id[table] - 1

    def add(self, table: str, row: tuple) -> None:
        self.rows[table].append(row)

    def rows_done(self) -> None:
        """Called once the rows added so far refer to no row not yet added: a study with all its
        rows, a job with its own."""
        if any(len(rows) >= CHUNK for rows in self.rows.values()):
            self.flush()

    def event(self, at: datetime, actor: str, action: str, study_uid: str | None, **detail) -> None:
        self.add("events", (self.new_id("events"), at, actor, action, study_uid,
                            json.dumps(detail) if detail else None))

    def flush(self) -> None:
        with self.engine.begin() as conn:
            for table, rows in self.rows.items():
                if rows:
                    self._write(conn, table, rows)
                    self.count[table] += len(rows)
                    rows.clear()

    def _write(self, conn, table: str, rows: list[tuple]) -> None:
        columns = COLUMNS[table]
        if conn.dialect.name != "postgresql":
            conn.execute(self.tables[table].insert(), [dict(zip(columns, row, strict=True)) for row in rows])
            return
        quoted = ", ".join(f'"{c}"' for c in columns)  # "rows" and "columns" are keywords
        with conn.connection.driver_connection.cursor() as cursor:
            with cursor.copy(f"COPY {table} ({quoted}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def finish(self) -> None:
        """Write what is left; PostgreSQL's id sequences start past the ids given here."""
        self.flush()
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                for table in COLUMNS:
                    conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                         f"(SELECT max(id) FROM {table}))")


def apportion(total: int, weights: Sequence[float], minimum: Sequence[int]) -> list[int]:
    """Whole numbers, each at least its minimum, in proportion to the weights, that sum to total."""
    spare = total - sum(minimum)
    if spare < 0:
        raise SystemExit(f"{total:,} cannot be shared among {len(weights):,} with at least {sum(minimum):,} "
                         "in all: give a larger --jobs or --instances")
    raw = [w * spare / sum(weights) for w in weights]
    counts = [m + int(r) for m, r in zip(minimum, raw, strict=True)]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def uid(*parts: object) -> str:
    return ".".join([UID_ROOT, *map(str, parts)])


def result_uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120)}"  # as results.result_uid makes them: a hash as a 2.25 UID


class Site:
    """The seeded week, written through a Writer: studies with their series and instances first,
    then the jobs in the order they were created, each with its results, deliveries and events."""

    def __init__(self, writer: Writer, seed: int, now: datetime):
        self.w, self.rng, self.now = writer, random.Random(seed), now
        self.patients = 1

    # studies, series, instances

    def plan_studies(self, studies: int, instances: int, jobs: int) -> list[StudyPlan]:
        rng = self.rng
        self.patients = max(1, studies * 7 // 10)
        kinds = rng.choices(KINDS, weights=[k.weight for k in KINDS], k=studies)
        starts = sorted(self.now - WEEK * rng.random() for _ in range(studies))
        images = apportion(instances, [k.size * rng.lognormvariate(0, 0.3) for k in kinds],
                           [len(k.series) for k in kinds])
        plans = []
        for number, (kind, first, n) in enumerate(zip(kinds, starts, images, strict=True), 1):
            last = first + timedelta(seconds=n * 0.15 + rng.uniform(5, 60))
            done = last + timedelta(seconds=QUIET_S)
            plan = StudyPlan(number, uid(1, first.strftime("%Y%m%d%H%M%S"), number), kind, first, last,
                             done if done < self.now else None, 0)
            plan.images = apportion(n, [share for _, share in kind.series], [1] * len(kind.series))
            plans.append(plan)
        self._share_jobs([p for p in plans if p.completed], jobs)
        return plans

    def _share_jobs(self, complete: list[StudyPlan], jobs: int) -> None:
        """Each study's first round of jobs, one per target; the rest are later runs (reprocessing,
        retries), more of them the longer ago a study came, so that they are spread evenly in time."""
        targets = [len(p.kind.targets) for p in complete]
        noise = [self.rng.lognormvariate(0, 0.4) for _ in complete]
        if jobs < sum(targets):  # a small run: fewer than one round
            weights = [t * n for t, n in zip(targets, noise, strict=True)]
            counts = apportion(jobs, weights, [1] * len(complete))
        else:
            ages = [(self.now - (p.completed or self.now)).total_seconds() for p in complete]
            counts = apportion(jobs, [a * n for a, n in zip(ages, noise, strict=True)], targets)
        for plan, n in zip(complete, counts, strict=True):
            plan.jobs = n

    def write_study(self, plan: StudyPlan) -> None:
        rng, w, kind = self.rng, self.w, plan.kind
        reopened = plan.completed is not None and rng.random() < 0.03
        count = (2 if reopened else 1) if plan.completed else 0
        patient = rng.randrange(self.patients)  # some patients have several studies
        problem = ("series 3 of the study: 2 of its files could not be read (not DICOM)"
                   if plan.completed and rng.random() < 0.005 else None)
        w.add("studies", (
            w.new_id("studies"), plan.uid, f"P{patient:07d}",
            f"{FAMILY[patient % len(FAMILY)]}^{GIVEN[patient // 7 % len(GIVEN)]}",
            None if rng.random() < 0.01 else f"RAD{(plan.id * 7919 + 12345) % 10**9:09d}",
            plan.first.strftime("%Y%m%d"), kind.description, "complete" if plan.completed else "receiving",
            plan.first, plan.first, plan.last, plan.completed, count, count, problem))
        w.event(plan.first, f"dicom:{kind.ae}", "study.received", plan.uid)
        for index, ((description, _), n) in enumerate(zip(kind.series, plan.images, strict=True)):
            self._write_series(plan, index, description, n)
        if plan.completed:
            w.event(plan.completed, "scheduler", "study.completed", plan.uid, series=len(kind.series),
                    instances=sum(plan.images), completion_count=count)
            w.event(plan.completed + timedelta(seconds=0.2), "scheduler", "jobs.planned", plan.uid,
                    jobs=min(plan.jobs, len(kind.targets)), models=sorted({t.model for t in kind.targets}))
        w.rows_done()

    def _write_series(self, plan: StudyPlan, index: int, description: str, images: int) -> None:
        w, kind = self.w, plan.kind
        series_id = w.new_id("series")
        series_uid = uid(2, plan.first.strftime("%Y%m%d%H%M%S"), series_id)
        plan.series.append((series_id, series_uid))
        image_type = "ORIGINAL\\PRIMARY\\LOCALIZER" if description in ("SCOUT", "LOCALIZER") \
            else "ORIGINAL\\PRIMARY\\AXIAL"
        w.add("series", (series_id, plan.id, series_uid, kind.modality, index + 1, description,
                         "CHEST" if "CHEST" in kind.description else None, image_type,
                         "complete" if plan.completed else "receiving", plan.first, plan.last,
                         plan.completed))
        span = plan.last - plan.first
        size = kind.matrix * kind.matrix * 2 + 2_000
        for number in range(1, images + 1):
            instance_id = w.new_id("instances")
            sop = uid(3, plan.first.strftime("%Y%m%d%H%M%S"), instance_id)
            w.add("instances", (
                instance_id, series_id, sop, kind.sop_class, "1.2.840.10008.1.2.1", number, 1,
                kind.matrix, kind.matrix, f"studies/{plan.uid}/{series_uid}/{sop}.dcm", size, kind.ae,
                plan.first + span * (number / images), 1))

    # jobs, results, deliveries, events

    def plan_jobs(self, plans: list[StudyPlan]) -> list[tuple[datetime, StudyPlan, int]]:
        """(created, study, target index) of every job, oldest first: the first round of a study's
        targets when it completed, later ones (reprocessing, retries) at some time since."""
        jobs = []
        for plan in plans:
            if plan.completed is None:  # still receiving: no jobs yet
                continue
            for n in range(plan.jobs):
                target, round_ = n % len(plan.kind.targets), n // len(plan.kind.targets)
                since = (self.now - plan.completed).total_seconds()
                delay = 0.3 + 0.01 * n if round_ == 0 else since * self.rng.random()
                jobs.append((plan.completed + timedelta(seconds=delay), plan, target))
        jobs.sort(key=lambda j: (j[0], j[1].id, j[2]))
        return jobs

    def write_jobs(self, jobs: list[tuple[datetime, StudyPlan, int]], advance: Callable[[int], None]) -> None:
        # A job superseded by a newer one for the same series and model names it.
        later: dict[int, int] = {}
        last_of: dict[tuple[int, int], int] = {}
        for job_id in range(len(jobs), 0, -1):
            _, plan, target = jobs[job_id - 1]
            if (plan.id, target) in last_of:
                later[job_id] = last_of[plan.id, target]
            last_of[plan.id, target] = job_id
        backlog = [i for i, (created, _, _) in enumerate(jobs, 1) if self.now - created < BACKLOG]
        running, queued = set(backlog[:WORKERS]), set(backlog)
        for job_id, (created, plan, target) in enumerate(jobs, 1):
            self._write_job(job_id, created, plan, plan.kind.targets[target], later.get(job_id),
                            job_id in running, job_id in queued)
            if job_id % 1000 == 0:
                advance(1000)
        advance(len(jobs) % 1000)

    def _write_job(self, job_id: int, created: datetime, plan: StudyPlan, target: Target, newer: int | None,
                   running: bool, queued: bool) -> None:
        rng, w = self.rng, self.w
        w.new_id("jobs")  # the ids were given in order of creation: the same sequence
        series_id, _ = plan.series[target.series]
        row = dict(id=job_id, study_id=plan.id, series_id=series_id, model=target.model, rule=plan.kind.rule,
                   destinations=json.dumps(plan.kind.destinations), generation=1, status="succeeded",
                   priority=10 if plan.kind.modality == "DX" else 0, attempts=1, stops=0, not_before=None,
                   timings=None, lease_owner=None, lease_expires_at=None, error=None, superseded_by=None,
                   created_at=created, started_at=None, finished_at=None)
        draw = rng.random()
        if running:
            row.update(status="running", started_at=min(created + timedelta(seconds=2), self.now),
                       lease_owner="gpu-node-1:4242", lease_expires_at=self.now + timedelta(seconds=240))
        elif queued:
            row.update(status="queued", attempts=0)
        elif draw < 0.0015 and self.now - created < timedelta(hours=1):
            self._waiting_out_backoff(row, plan)
        elif draw < 0.04:
            self._failed(row, plan, target)
        elif draw < 0.055 and newer is not None:
            row.update(status="superseded", superseded_by=newer, attempts=0, finished_at=created)
        elif draw < 0.058:
            cancelled = min(created + timedelta(seconds=rng.uniform(60, 3600)), self.now)
            row.update(status="cancelled", attempts=0, finished_at=cancelled)
            w.event(cancelled, "cli:night-shift", "job.cancelled", plan.uid, job=job_id,
                    model=target.model)
        else:
            self._succeeded(row, plan, target)
        w.add("jobs", tuple(row[c] for c in COLUMNS["jobs"]))
        w.rows_done()

    def _run_times(self, row: dict, target: Target) -> float:
        """Sets started_at and finished_at; returns the run's seconds."""
        wait = self.rng.lognormvariate(0.5, 1.0)
        run = target.seconds * self.rng.lognormvariate(0, 0.25)
        row["started_at"] = min(row["created_at"] + timedelta(seconds=wait), self.now)
        row["finished_at"] = min(row["started_at"] + timedelta(seconds=run), self.now)
        return run

    def _waiting_out_backoff(self, row: dict, plan: StudyPlan) -> None:
        delay = self.rng.choice((30, 60, 120))
        due = self.now + timedelta(seconds=delay * self.rng.random())
        row.update(status="queued", attempts=1, not_before=due, error=f"attempt 1 failed: {TRANSIENT}")
        self.w.event(row["created_at"] + timedelta(seconds=20), "gpu-node-1:4242", "job.retry_scheduled",
                     plan.uid, job=row["id"], model=row["model"], error=TRANSIENT, attempt=1,
                     retry_in_s=delay)

    def _failed(self, row: dict, plan: StudyPlan, target: Target) -> None:
        _, attempts, reason = self.rng.choices(FAILURES, weights=[f[0] for f in FAILURES])[0]
        error = reason.format(model=target.model, job=row["id"], n=plan.images[target.series])
        self._run_times(row, target)
        stops = attempts if error.startswith("the worker stopped") else 0
        row.update(status="failed", attempts=attempts, stops=stops, error=error)
        self.w.event(row["finished_at"], "gpu-node-1:4242", "job.failed", plan.uid, job=row["id"],
                     model=target.model, error=error, attempts=attempts)

    def _succeeded(self, row: dict, plan: StudyPlan, target: Target) -> None:
        rng, w = self.rng, self.w
        run = self._run_times(row, target)
        shares = {"load_model": 0.001, "read_and_decode": 0.2, "prepare": 0.05, "inference": 0.6,
                  "encode_results": 0.1, "write_results": 0.049}
        seconds = {stage: round(run * share, 4) for stage, share in shares.items()}
        row["timings"] = json.dumps(seconds)
        finished, kinds = row["finished_at"], ("seg", "sr") if target.task == SEG else ("sr",)
        result_series = result_uid(rng)
        uids = []
        for kind in kinds:
            result_id, sop = w.new_id("results"), result_uid(rng)
            uids.append(sop)
            w.add("results", (result_id, row["id"], kind, SEG_CLASS if kind == "seg" else SR_CLASS, sop,
                              result_series, f"results/{plan.uid}/{result_series}/{sop}.dcm", finished))
            for destination in plan.kind.destinations:
                self._delivery(result_id, destination, kind, finished, plan.uid, sop)
        w.event(finished, "gpu-node-1:4242", "job.succeeded", plan.uid, job=row["id"], model=target.model,
                results=uids, destinations=list(plan.kind.destinations), seconds=seconds)

    def _delivery(self, result_id: int, destination: str, kind: str, created: datetime, study_uid: str,
                  sop: str) -> None:
        rng, w, age = self.rng, self.w, self.now - created
        delivery_id = w.new_id("deliveries")
        if destination == "archive" and age < ARCHIVE_DOWN_FOR:
            attempts = min(12, int(age.total_seconds() // 300) + 1)
            self._failing(delivery_id, result_id, destination, attempts, ARCHIVE_DOWN, study_uid, created)
        elif age < timedelta(seconds=20):
            w.add("deliveries", (delivery_id, result_id, destination, "pending", 0, created, None, None))
        elif rng.random() < 0.002:
            self._failing(delivery_id, result_id, destination, rng.randint(6, 20),
                          PACS_REFUSES.format(kind=kind.upper()), study_uid, created)
        else:
            sent = min(created + timedelta(seconds=rng.uniform(0.2, 5)), self.now)
            w.add("deliveries", (delivery_id, result_id, destination, "sent", 1 if rng.random() < 0.95 else 2,
                                 created, None, sent))
            w.event(sent, "dispatcher", "result.sent", study_uid, destination=destination,
                    sop_instance_uid=sop)

    def _failing(self, delivery_id: int, result_id: int, destination: str, attempts: int, error: str,
                 study_uid: str, created: datetime) -> None:
        """A delivery whose last attempt failed, tried again after its backoff."""
        retry_in = min(10 * 2 ** attempts, 3600)
        self.w.add("deliveries", (delivery_id, result_id, destination, "pending", attempts,
                                  self.now + timedelta(seconds=retry_in * self.rng.random()), error, None))
        tried = max(created, self.now - timedelta(seconds=retry_in * self.rng.random()))
        self.w.event(tried, "dispatcher",
                     "result.send_failed", study_uid, destination=destination, error=error, attempt=attempts,
                     retry_in_s=retry_in)


# studies.delivered_at, which dispatch sets with each send, from the deliveries written.
DELIVERED_AT = ("UPDATE studies SET delivered_at = latest.sent_at FROM (SELECT jobs.study_id AS study_id,"
                " max(deliveries.sent_at) AS sent_at FROM deliveries"
                " JOIN results ON results.id = deliveries.result_id JOIN jobs ON jobs.id = results.job_id"
                " GROUP BY jobs.study_id) AS latest WHERE latest.study_id = studies.id")


def fill(url: str, jobs: int, instances: int, seed: int) -> dict:
    """Fill the migrated, empty store at `url`; returns the row counts and the seconds it took."""
    from machaon.store import make_engine, utcnow
    engine = make_engine(url)
    started = time.perf_counter()
    try:
        writer = Writer(engine)
        site = Site(writer, seed, utcnow())
        plans = site.plan_studies(max(1, instances // 100), instances, jobs)
        with progress(console, "studies, series and instances (by instance)", instances) as count:
            for plan in plans:
                site.write_study(plan)
                count.advance(sum(plan.images))
            writer.flush()
        planned = site.plan_jobs(plans)
        with progress(console, "jobs, results, deliveries and events (by job)", len(planned)) as count:
            site.write_jobs(planned, count.advance)
            writer.finish()
    finally:
        engine.dispose()
    with step(console, "when each study's results were last delivered (as dispatch records it)"):
        run_sql(url, DELIVERED_AT)
    if url.startswith("postgresql"):
        with step(console, "VACUUM ANALYZE (as autovacuum does after such a load)"):
            run_sql(url, "VACUUM ANALYZE")
    return {"seconds": round(time.perf_counter() - started, 1), "rows": writer.count}


def run_sql(url: str, sql: str) -> None:
    """One statement outside any transaction (as VACUUM must be), committed as it runs."""
    from machaon.store import make_engine
    engine = make_engine(url)
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert driver is not None  # an open connection has its driver's
        if engine.dialect.name == "postgresql":
            driver.autocommit = True  # SQLite's connections are already (make_engine)
        driver.execute(sql)
    finally:
        raw.close()
        engine.dispose()


# --- the store, its API and a browser ------------------------------------------------------------

def machaon(*args: str, config: Path) -> str:
    done = subprocess.run([MACHAON, *args, "--config", str(config)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"machaon {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


@contextmanager
def postgres_database(admin_url: str, keep: bool) -> Iterator[str]:
    import psycopg
    name = f"machaon_bench_ops_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        if keep:
            console.print(f"kept the PostgreSQL store: {base}/{name}", soft_wrap=True)
        else:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(workdir: Path, url: str, port: int) -> Path:
    (workdir / "spool" / "incoming").mkdir(parents=True, exist_ok=True)
    config = workdir / "machaon.toml"
    config.write_text(f"""
[database]
url = "{url}"
[spool]
path = "{workdir / 'spool'}"
min_free_mb = 0
[api]
host = "127.0.0.1"
port = {port}
[log]
level = "WARNING"
[destinations.pacs]
type = "dicom"
ae_title = "PACS"
host = "10.20.0.10"
port = 104
[destinations.archive]
type = "dicom"
ae_title = "ARCHIVE"
host = "10.20.0.15"
port = 11112
""")
    return config


@contextmanager
def api_alone(config: Path, base: str, workdir: Path) -> Iterator[None]:
    """`machaon api`, until it answers /readyz."""
    log = (workdir / "api.log").open("a")
    proc = subprocess.Popen([MACHAON, "api", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    said = workdir / "api.log"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"machaon api exited {proc.returncode}:\n{said.read_text()}")
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"machaon api was not ready within 60 s:\n{said.read_text()}")
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- what is measured ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    label: str
    path: str
    params: dict[str, Any]
    required: bool  # the brief's two; the others are extras
    operation: Callable[[Any, Any, Any], Any]  # (store, session, settings): the same work in this process


def endpoints(accession: str) -> list[Endpoint]:
    from machaon import metrics
    from machaon import operations as ops

    def dashboard(store, session, settings):  # what the page's dashboard route reads
        ops.summary(session, settings)
        ops.activity(session, hours=24)
        ops.list_jobs(session, status="failed", limit=20)

    return [
        Endpoint("GET /healthz (no database: the floor)", "/healthz", {}, False,
                 lambda store, session, settings: None),
        Endpoint("GET /api/v1/jobs?status=failed&limit=100", "/api/v1/jobs",
                 {"status": "failed", "limit": 100}, True,
                 lambda store, session, settings: ops.list_jobs(session, status="failed", limit=100)),
        Endpoint("GET /api/v1/summary", "/api/v1/summary", {}, True,
                 lambda store, session, settings: ops.summary(session, settings)),
        Endpoint(f"GET /api/v1/studies?q={accession}", "/api/v1/studies", {"q": accession}, False,
                 lambda store, session, settings: ops.list_studies(session, q=accession)),
        Endpoint("GET /metrics", "/metrics", {}, False,
                 lambda store, session, settings: metrics.exposition(store, settings)),
        Endpoint("GET / (the dashboard's HTML)", "/", {}, False, dashboard),
    ]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def time_requests(base: str, token: str, points: list[Endpoint], n: int) -> dict[str, dict]:
    """Each endpoint WARM_UP times, then n times, taking turns so that a noisy moment hurts all."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    session.cookies.set("machaon_token", token)  # the page reads the cookie
    times: dict[str, list[float]] = {p.label: [] for p in points}
    sizes: dict[str, int] = {}
    with progress(console, f"{len(points)} endpoints, {n} requests each", n) as count:
        for round_ in range(WARM_UP + n):
            for point in points:
                started = time.perf_counter()
                response = session.get(base + point.path, params=point.params, timeout=600)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise SystemExit(f"{point.label}: HTTP {response.status_code}: {response.text[:500]}")
                if round_ >= WARM_UP:
                    times[point.label].append(elapsed)
                sizes[point.label] = len(response.content)
            if round_ >= WARM_UP:
                count.advance()
    return {label: {"median_ms": round(statistics.median(t), 1), "p95_ms": round(percentile(t, 95), 1),
                    "bytes": sizes[label]} for label, t in times.items()}


def statements(store, settings, point: Endpoint) -> tuple[float, list[dict]]:
    """The endpoint's operation run in this process after a warm-up run: its milliseconds, and the
    SELECTs it ran, each timed again alone with all its rows fetched (a SQLite cursor's execute
    returns before most rows are made, so timing the execute alone would flatter it)."""
    from sqlalchemy import event
    seen: list[dict] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append({"sql": statement, "parameters": parameters})
    with store.read_session() as session:  # warms the caches, as the warm-up requests did
        point.operation(store, session, settings)
    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        started = time.perf_counter()
        with store.read_session() as session:
            point.operation(store, session, settings)
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    with store.engine.execution_options(read_only=True).connect() as conn:
        for statement in seen:
            statement["ms"] = round(min(_run(conn, statement) for _ in range(3)), 2)
    return elapsed, seen


def _run(conn, statement: dict) -> float:
    started = time.perf_counter()
    conn.exec_driver_sql(statement["sql"], statement["parameters"]).fetchall()
    return (time.perf_counter() - started) * 1000


def plan_of(store, statement: dict) -> str:
    """EXPLAIN ANALYZE (PostgreSQL) or EXPLAIN QUERY PLAN (SQLite) of a captured statement."""
    with store.engine.execution_options(read_only=True).connect() as conn:
        if conn.dialect.name == "postgresql":
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement["sql"],
                                        statement["parameters"])
            text = "\n".join(r[0] for r in rows)
        else:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement["sql"], statement["parameters"])
            depth: dict[int, int] = {}
            lines = []
            for node, parent, _, detail in rows:  # SQLite's plan is a tree: (id, parent, -, detail)
                depth[node] = depth.get(parent, -1) + 1
                lines.append("  " * depth[node] + detail)
            text = "\n".join(lines)
        conn.rollback()
    return text


def breakdown(url: str, config: Path, points: list[Endpoint], timed: dict[str, dict], explain: bool) -> None:
    """Each endpoint's statements, timed here; their plans with --explain. Printed for an endpoint
    over the target, or for every one with --explain; kept in the results either way."""
    from machaon.config import load_settings
    from machaon.store import Store
    settings, store = load_settings(config), Store(url)
    try:
        for point in points:
            elapsed, seen = statements(store, settings, point)
            shown = timed[point.label]
            slowest = sorted(seen, key=lambda s: s["ms"], reverse=True)
            shown.update(in_process_ms=round(elapsed, 1), sql_ms=round(sum(s["ms"] for s in seen), 1),
                         statements=[{"ms": s["ms"], "sql": s["sql"]} for s in slowest])
            if not (shown["p95_ms"] >= TARGET_MS or explain) or not seen:
                continue
            console.print(f"\n{point.label}: p95 over HTTP {shown['p95_ms']} ms; in this process "
                          f"{shown['in_process_ms']} ms, of which its {len(seen)} statements "
                          f"{shown['sql_ms']} ms (each run alone)", soft_wrap=True, markup=False)
            for index, statement in enumerate(slowest):
                if index and statement["ms"] < EXPLAIN_FROM_MS:
                    break
                console.print(f"  {statement['ms']:8.1f} ms  {' '.join(statement['sql'].split())}",
                              soft_wrap=True, markup=False)
                if explain:
                    shown["statements"][index]["plan"] = plan = plan_of(store, statement)
                    console.print("    " + plan.replace("\n", "\n    "), soft_wrap=True, markup=False)
    finally:
        store.dispose()


def retry_filter(url: str, target: int) -> tuple[dict, int]:
    """The (model, since) filter whose failed jobs are closest to `target` in number."""
    from machaon import operations as ops
    from machaon.store import Store, utcnow
    store = Store(url)
    try:
        with store.read_session() as session:
            failed = ops.list_jobs(session, status="failed", limit=10_000)
            now = utcnow()
            hours_ago: dict[str | None, list[float]] = {None: []}  # per model, and of all models
            for job in failed:
                age = (now - datetime.fromisoformat(job["finished_at"].rstrip("Z"))).total_seconds() / 3600
                hours_ago[None].append(age)
                hours_ago.setdefault(job["model"], []).append(age)
            best: tuple[int, dict] = (abs(len(failed) - target), {})
            for model, ages in sorted(hours_ago.items(), key=lambda item: item[0] or ""):
                ages.sort()
                for hours in range(1, 24 * 8):
                    n = bisect.bisect_left(ages, hours)
                    if abs(n - target) < best[0]:
                        best = (abs(n - target), {"since": f"{hours}h"} | ({"model": model} if model else {}))
            chosen = best[1]
            expected = ops.count_failed_jobs(session, since=ops.parse_since(chosen.get("since")),
                                             model=chosen.get("model"))
    finally:
        store.dispose()
    return chosen, expected


def time_retry(base: str, token: str, url: str, target: int) -> dict:
    chosen, expected = retry_filter(url, target)
    started = time.perf_counter()
    response = requests.post(f"{base}/api/v1/jobs/retry", json=chosen, timeout=600,
                             headers={"Authorization": f"Bearer {token}"})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"POST /api/v1/jobs/retry {chosen}: HTTP {response.status_code}: "
                         f"{response.text[:500]}")
    return {"filter": chosen, "expected": expected, "retried": len(response.json()["retried"]),
            "seconds": round(seconds, 2)}


FIRST_PAINT = """new Promise(resolve => {
    const paint = () => performance.getEntriesByName('first-contentful-paint')[0];
    if (paint()) return resolve(paint().startTime);
    new PerformanceObserver(() => paint() && resolve(paint().startTime))
        .observe({type: 'paint', buffered: true});
    setTimeout(() => resolve(null), 10000);
})"""
NAVIGATION = """(() => { const n = performance.getEntriesByType('navigation')[0];
    return {load: n.loadEventEnd - n.startTime, response: n.responseEnd - n.startTime}; })()"""


def time_page(base: str, token: str, loads: int) -> dict:
    """The dashboard in headless chromium, signed in by the token's cookie: first contentful paint,
    the HTML's arrival and the load event, in ms from navigation start (median of `loads` after one)."""
    if requests.get(f"{base}/signin", timeout=30).status_code == 404 or not CHROMIUM.exists():
        return {"available": False, "why": "page not available" if CHROMIUM.exists() else f"no {CHROMIUM}"}
    from playwright.sync_api import sync_playwright
    seen: dict[str, list[float]] = {"first_contentful_paint_ms": [], "html_ms": [], "load_ms": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context()
            context.add_cookies([{"name": "machaon_token", "value": token, "url": base}])
            for load in range(loads + 1):
                page = context.new_page()
                # A tab is open before its user types the address: its renderer's start-up must not
                # take the CPU from the server answering (two cores here).
                page.wait_for_timeout(500)
                page.goto(f"{base}/", wait_until="load", timeout=120_000)
                if page.url.rstrip("/") != base:
                    raise SystemExit(f"the dashboard sent the browser to {page.url}, not the dashboard")
                paint, navigation = page.evaluate(FIRST_PAINT), page.evaluate(NAVIGATION)
                page.close()
                if load:
                    seen["first_contentful_paint_ms"].append(paint)
                    seen["html_ms"].append(navigation["response"])
                    seen["load_ms"].append(navigation["load"])
        finally:
            browser.close()
    # A paint the browser did not report within its 10 s is left out (None if it never did).
    reported = {k: [x for x in v if x is not None] for k, v in seen.items()}
    return {"available": True,
            **{k: round(statistics.median(v), 1) if v else None for k, v in reported.items()}}


# --- one backend, all backends ---------------------------------------------------------------------

def one_backend(backend: str, args) -> dict:
    from machaon import operations as ops
    from machaon.store import Store

    from tests.harness import free_port

    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=f"machaon-ops-{backend}-"))
        if args.keep:
            console.print(f"{backend}: working in {workdir}", soft_wrap=True)
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        url = args.database if args.database else (
            f"sqlite:///{workdir}/machaon.db" if backend == "sqlite" else
            stack.enter_context(postgres_database(args.postgres, args.keep)))
        port = free_port()
        config = write_config(workdir, url, port)
        result: dict[str, Any] = {"backend": backend}
        if not args.database:
            with step(console, f"{backend}: machaon db upgrade"):
                machaon("db", "upgrade", config=config)
            result["fill"] = fill(url, args.jobs, args.instances, args.seed)
            console.print(f"{backend}: filled in {result['fill']['seconds']} s: " + ", ".join(
                f"{n:,} {table}" for table, n in result["fill"]["rows"].items()), soft_wrap=True)
        for sql in args.sql:
            with step(console, f"{backend}: {sql}"):
                run_sql(url, sql)
        token = machaon("tokens", "create", f"bench-{os.getpid()}", "--role", "operator",
                        config=config).strip()
        store = Store(url)
        with store.read_session() as session:
            studies = ops.list_studies(session, limit=10_000)
            result["counts"] = {"failed_jobs": ops.count_failed_jobs(session)}
        store.dispose()
        accession = next(s["accession_number"] for s in studies[len(studies) // 2:] if s["accession_number"])
        base = f"http://127.0.0.1:{port}"
        points = endpoints(accession)
        with api_alone(config, base, workdir):
            with step(console, f"{backend}: HTTP requests"):
                result["http"] = time_requests(base, token, points, args.requests)
            breakdown(url, config, points, result["http"], args.explain)
            with step(console, f"{backend}: the dashboard in chromium"):
                result["page"] = time_page(base, token, args.loads)
            target = min(args.retry, max(1, result["counts"]["failed_jobs"] // 2))
            with step(console, f"{backend}: retrying about {target:,} failed jobs"):
                result["retry"] = time_retry(base, token, url, target)
        return result


def print_results(results: list[dict], args) -> None:
    backends = [r["backend"] for r in results]
    rows: list[list[str]] = []
    if any("fill" in r for r in results):
        rows.append(["fill the store", *(f"{r['fill']['seconds']:.0f} s" if "fill" in r else "(given)"
                                          for r in results)])
    for i, label in enumerate(results[0]["http"]):
        cells = []
        for r in results:
            t = list(r["http"].values())[i]
            cells.append(f"{t['median_ms']:.1f} / {t['p95_ms']:.1f} ms "
                         f"{'ok' if t['p95_ms'] < TARGET_MS else 'SLOW'}")
        rows.append([label, *cells])
    rows.append(["POST /api/v1/jobs/retry", *(
        f"{r['retry']['seconds']:.2f} s ({r['retry']['retried']:,} jobs, {json.dumps(r['retry']['filter'])})"
        for r in results)])
    for key, name in (("first_contentful_paint_ms", "dashboard: first contentful paint"),
                      ("html_ms", "dashboard: HTML received"), ("load_ms", "dashboard: load event")):
        rows.append([name, *(r["page"]["why"] if not r["page"]["available"] else
                             "not reported" if r["page"][key] is None else f"{r['page'][key]:.0f} ms"
                             for r in results)])
    first = next((r for r in results if "fill" in r), None)
    if first:
        counts = first["fill"]["rows"]
        console.print(f"\n{counts['jobs']:,} jobs, {counts['instances']:,} instances ({counts['studies']:,} "
                      f"studies, {counts['series']:,} series, {counts['results']:,} results, "
                      f"{counts['deliveries']:,} deliveries, {counts['events']:,} events; "
                      f"{results[0]['counts']['failed_jobs']:,} failed jobs); seed {args.seed}",
                      soft_wrap=True, markup=False)
    console.print(f"HTTP: median / p95 of {args.requests} requests after {WARM_UP} warm-up ones, taking "
                  f"turns; ok: p95 under {TARGET_MS:.0f} ms. Page: median of {args.loads} loads after one, "
                  "in headless chromium.", soft_wrap=True, markup=False)
    print_table(console, [Column("measure"), *(Column(b) for b in backends)], rows, wide=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=1_000_000, help="studies: one per 100 instances")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per endpoint")
    parser.add_argument("--loads", type=int, default=5, help="timed loads of the dashboard")
    parser.add_argument("--retry", type=int, default=1000, help="failed jobs to retry in one call (about)")
    parser.add_argument("--explain", action="store_true", help="print the plans of the slower statements")
    parser.add_argument("--keep", action="store_true", help="keep the filled store (and its folder)")
    parser.add_argument("--sql", action="append", default=[], metavar="SQL",
                        help="run on the filled store before measuring, e.g. a proposed index")
    parser.add_argument("--database", metavar="URL", help="measure this store, filled before (--keep)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        metavar="URL", help="a PostgreSQL server's admin URL, for the throwaway database")
    args = parser.parse_args()
    if args.database:
        backends = ["postgresql" if args.database.startswith("postgresql") else "sqlite"]
    else:
        backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [one_backend(backend, args) for backend in backends]
    print_results(results, args)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "operations.json").write_text(json.dumps(
        {"jobs": args.jobs, "instances": args.instances, "seed": args.seed, "requests": args.requests,
         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
