"""The REST API under /api/v1, and the service endpoints (/healthz, /readyz, /metrics).

Each route parses its request, calls machaon.operations and returns what it returns: the JSON is
the CLI's `--json`. Reading needs a viewer's or an operator's token, acting an operator's; every
action is recorded with the actor `api:<token name>`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import sqlalchemy.exc
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from .. import metrics
from .. import operations as ops
from ..config import Settings
from ..spool import Spool
from ..store import SchemaError, Store, check_schema
from . import auth

if TYPE_CHECKING:
    from .app import Hooks

router = APIRouter(prefix="/api/v1", tags=["operations"])
service = APIRouter(tags=["service"])


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> Store:
    return request.app.state.store


def _hooks(request: Request) -> Hooks:
    return request.app.state.hooks


def _session(request: Request) -> Iterator[Session]:
    with _store(request).read_session() as session:
        yield session


# The principal is resolved first, so a request without credentials opens no session.
Reader = Annotated[ops.Principal, Depends(auth.reader)]
Actor = Annotated[ops.Principal, Depends(auth.actor)]
Db = Annotated[Session, Depends(_session)]


class Body(BaseModel):
    # A misspelt field must not widen an action (e.g. retry every failed job instead of one model's).
    model_config = ConfigDict(extra="forbid")


class ReprocessRequest(Body):
    model: str | None = None  # only this model's jobs; by default every model today's rules give


class RetryFailedRequest(Body):
    since: str | None = None  # failed since: 30m, 2h, 7d, 2026-12-01, or a date-time
    model: str | None = None


# --- studies ------------------------------------------------------------------------

@router.get("/studies", summary="Studies, most recently received first")
def list_studies(_: Reader, db: Db, status: str | None = None, q: str | None = None,
                 since: str | None = None, limit: int = ops.DEFAULT_LIMIT):
    return ops.list_studies(db, status=status, q=q, since=ops.parse_since(since), limit=limit)


@router.get("/studies/{study_uid}", summary="One study: its series, instances, jobs and history")
def show_study(_: Reader, db: Db, study_uid: str):
    return ops.show_study(db, study_uid)


@router.post("/studies/{study_uid}/reprocess", summary="Queue the jobs today's rules give a study")
def reprocess_study(who: Actor, request: Request, study_uid: str, body: ReprocessRequest | None = None):
    done = ops.reprocess_study(_store(request), _settings(request).rules, study_uid, who.actor,
                               model=body.model if body else None)
    _hooks(request).call(_hooks(request).jobs_queued)
    return done


@router.post("/studies/{study_uid}/complete", summary="Complete a study still receiving, now")
def complete_study(who: Actor, request: Request, study_uid: str):
    done = ops.complete_study(_store(request), study_uid, who.actor)
    _hooks(request).call(_hooks(request).studies_completed)
    return done


# --- jobs ---------------------------------------------------------------------------

@router.get("/jobs", summary="Jobs, newest first")
def list_jobs(_: Reader, db: Db, status: str | None = None, model: str | None = None,
              since: str | None = None, study: str | None = None, limit: int = ops.DEFAULT_LIMIT):
    return ops.list_jobs(db, status=status, model=model, since=ops.parse_since(since), study_uid=study,
                         limit=limit)


@router.get("/jobs/{job_id}", summary="One job: its destinations, timings, history and results")
def show_job(_: Reader, db: Db, job_id: int):
    return ops.show_job(db, job_id)


@router.post("/jobs/retry", summary="Queue again every failed job (since a time, of a model)")
def retry_failed_jobs(who: Actor, request: Request, body: RetryFailedRequest | None = None):
    body = body or RetryFailedRequest()
    done = ops.retry_failed_jobs(_store(request), who.actor, since=ops.parse_since(body.since),
                                 model=body.model)
    _hooks(request).call(_hooks(request).jobs_queued)
    return done


@router.post("/jobs/{job_id}/retry", summary="Queue a failed or cancelled job again")
def retry_job(who: Actor, request: Request, job_id: int):
    done = ops.retry_jobs(_store(request), [job_id], who.actor)
    _hooks(request).call(_hooks(request).jobs_queued)
    return done


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued job")
def cancel_job(who: Actor, request: Request, job_id: int):
    return ops.cancel_jobs(_store(request), [job_id], who.actor)


# --- deliveries, events, models, summary ----------------------------------------------

@router.get("/deliveries", summary="Deliveries of results to destinations, newest first")
def list_deliveries(_: Reader, db: Db, status: str | None = None, destination: str | None = None,
                    limit: int = ops.DEFAULT_LIMIT):
    return ops.list_deliveries(db, status=status, destination=destination, limit=limit)


@router.post("/deliveries/{delivery_id}/retry", summary="Send a pending or failed delivery now")
def retry_delivery(who: Actor, request: Request, delivery_id: int):
    done = ops.retry_deliveries(_store(request), who.actor, ids=[delivery_id])
    _hooks(request).call(_hooks(request).deliveries_due)
    return done


@router.get("/events", summary="The audit trail, newest first")
def list_events(_: Reader, db: Db, study: str | None = None, actor: str | None = None,
                since: str | None = None, limit: int = 200):
    return ops.list_events(db, study_uid=study, actor=actor, since=ops.parse_since(since), limit=limit)


@router.get("/models", summary="Built model packages, the rules that use them, their providers")
def list_models(_: Reader, request: Request):
    return ops.models_in_use(_settings(request), ort_sessions=_hooks(request).ort_sessions)


@router.get("/summary", summary="Counts, the last hour's throughput and latency, backlogs, disk")
def summary(_: Reader, db: Db, request: Request):
    return ops.summary(db, _settings(request))


# --- service endpoints: no token ---------------------------------------------------------

@service.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


@service.get("/readyz", summary="Ready to work: store, spool and DICOM listener", responses={503: {}})
def readyz(request: Request):
    listener = _hooks(request).listener_problem
    checks = {
        "store": _check(_store_problem(_store(request))),
        "spool": _check(_spool_problem(_settings(request))),
        # `machaon api` serves beside a `machaon serve` elsewhere, whose listener is not its own.
        "dicom_listener": _check(listener()) if listener else {"ok": True, "skipped": "not in this process"},
    }
    failed = [name for name, check in checks.items() if not check["ok"]]
    return JSONResponse({"status": "not ready" if failed else "ready", "failed": failed, "checks": checks},
                        status_code=503 if failed else 200)


@service.get("/metrics", summary="Prometheus metrics", response_class=Response)
def prometheus_metrics(request: Request):
    # No token, as is usual for Prometheus scraping; the figures are counts and times and name
    # no patient. Keep the port off untrusted networks (api.host) if even that is too much.
    body, content_type = metrics.exposition(_store(request), _settings(request))
    return Response(body, media_type=content_type)


def _check(problem: str | None) -> dict:
    return {"ok": True} if problem is None else {"ok": False, "problem": problem}


def _store_problem(store: Store) -> str | None:
    try:
        check_schema(store.engine)
    except SchemaError as exc:
        return str(exc)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot reach the database: {reason}"
    return None


def _spool_problem(settings: Settings) -> str | None:
    """Can a received image be written now? A file is made and removed where transfers land."""
    spool = Spool(settings.spool.path, settings.spool.min_free_mb)
    try:
        fd, name = tempfile.mkstemp(dir=spool.incoming, prefix=".readyz-")
        os.close(fd)
        os.unlink(name)
        free = spool.free_bytes()
    except OSError as exc:
        return f"{spool.incoming} is not writable: {exc.strerror or exc}"
    if free < spool.min_free_bytes:
        return (f"{free / 2**20:.0f} MB free, below spool.min_free_mb ({settings.spool.min_free_mb}): "
                "the listener refuses images until space is freed")
    return None
