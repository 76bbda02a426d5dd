"""The web page operators use, at / beside the REST API: the queue at a glance, failed jobs and
their retry, study search and timelines, result downloads, and the models in use.

Pages are rendered on the server (Jinja2); the dashboard refreshes its figures by itself with
htmx (vendored in static/), and every action is a plain HTML form, so the page works without a
build step. Like the API, every route only calls machaon.operations.

Signing in: the token (`machaon tokens create NAME --role operator`) is kept in an HttpOnly,
SameSite=Strict cookie. Reading needs a viewer's or an operator's token (unless
`api.read_requires_token = false`), acting an operator's. A form posted from another site is
refused: the cookie is not sent with it, and the Origin (or Referer) must name this host.
Times are shown in the server's local time, which the footer names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import operations as ops
from ..store import JobStatus, Role, Store
from . import auth, formats
from .charts import latency_chart, studies_chart
from .formats import duration, parse, zone_name

if TYPE_CHECKING:
    from .app import Hooks

log = logging.getLogger("machaon.api")

NOTICE_COOKIE = "machaon_notice"
SIGNED_IN_FOR = timedelta(hours=12)  # about a shift; the token itself stays valid until revoked
REFRESH_EVERY_S = 5
FAILED_ON_DASHBOARD = 20
HOW_TO_GET_A_TOKEN = "machaon tokens create NAME --role operator"
WHY_DISABLED = ("Your token is a viewer's: it can look but not act. Sign in with an operator token "
                f"(whoever runs machaon makes one with `{HOW_TO_GET_A_TOKEN}`).")
WHY_SIGN_IN = ("You are not signed in: sign in with an operator token to act (whoever runs machaon "
               f"makes one with `{HOW_TO_GET_A_TOKEN}`).")


# --- errors and sign-in, for every page route --------------------------------------------------

class _SignInFirst(Exception):
    """No valid token: the page sends the browser to the sign-in form."""


class _Refused(Exception):
    """A request the page refuses, with what to do instead."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


class PageRoute(APIRoute):
    """A page route: errors become pages (the app's handlers answer JSON, for the API)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except _SignInFirst:
                return _to_sign_in(request)
            except (_Refused, ops.OperationError) as exc:
                status_code, message = exc.status_code, str(exc)
            except RequestValidationError:
                if request.method == "GET":
                    status_code, message = 404, (f"there is no page {request.url.path}: a job is named by "
                                                 "its number, a study by its Study Instance UID")
                else:
                    status_code, message = 400, ("the form was incomplete, so nothing was done: reload "
                                                 "the page and try again")
            except HTTPException:
                raise
            except Exception as exc:
                # The exception's text may quote SQL and its values: only its type is shown.
                log.exception("%s %s failed", request.method, request.url.path)
                status_code, message = 500, (f"internal error: {type(exc).__name__} while showing "
                                             f"{request.url.path} (details in the service log)")
            return await run_in_threadpool(_problem, request, status_code, message)
        return page_handler


router = APIRouter(route_class=PageRoute, include_in_schema=False)

_env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                   trim_blocks=True, lstrip_blocks=True)
templates = Jinja2Templates(env=_env)


def _store(request: Request) -> Store:
    return request.app.state.store


def _hooks(request: Request) -> Hooks:
    return request.app.state.hooks


def _reader(request: Request) -> ops.Principal:
    """Who is looking: the cookie's token holder, anyone when reading needs no token, else the
    browser goes to the sign-in form."""
    token = request.cookies.get(auth.TOKEN_COOKIE)
    principal = ops.authenticate(_store(request), token) if token else None
    if principal is not None:
        return principal
    if not request.app.state.settings.api.read_requires_token:
        return auth.ANONYMOUS
    raise _SignInFirst


def _operator(request: Request) -> ops.Principal:
    """Who is acting: a form from this site, sent by an operator."""
    if not _same_origin(request):
        raise _Refused(403, "this form was not sent from machaon's own page, so it was refused (a "
                            "protection against other sites acting in your name): open the page and "
                            "press the button there")
    principal = _reader(request)
    if principal is auth.ANONYMOUS:
        raise _SignInFirst
    if principal.role != Role.OPERATOR:
        raise _Refused(403, f"token {principal.name!r} is a viewer's: this needs an operator token "
                            f"(whoever runs machaon makes one with `{HOW_TO_GET_A_TOKEN}`)")
    return principal


Reader = Annotated[ops.Principal, Depends(_reader)]
Operator = Annotated[ops.Principal, Depends(_operator)]


def _same_origin(request: Request) -> bool:
    """Does the browser say the form comes from a page of this host? (Browsers send Origin with
    every POST; Referer is the fallback. Neither can be set by another site's page.)"""
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    host = urlsplit(source).netloc if source != "null" else ""
    return bool(host) and host in {request.headers.get("host"), request.headers.get("x-forwarded-host")}


def _local_path(target: str | None, default: str = "/") -> str:
    """A path on this site to go back to; anything else (another site) becomes `default`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def _to_sign_in(request: Request) -> Response:
    """The sign-in form, which then returns to this page (or, after a form, to the page it was on)."""
    htmx = bool(request.headers.get("hx-request"))  # a refresh by htmx: the page it refreshes must go
    if request.method == "GET" and not htmx:
        here = _here(request)
    else:
        page = urlsplit(request.headers.get("hx-current-url" if htmx else "referer", ""))
        ours = page.netloc == request.url.netloc
        here = page.path + (f"?{page.query}" if page.query else "") if ours else "/"
    here = _local_path(here)
    target = "/signin" + (f"?{urlencode({'next': here})}" if here != "/" else "")
    if htmx:
        return Response(status_code=200, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _problem(request: Request, status_code: int, message: str) -> Response:
    """A page saying what went wrong, with the menu if the browser is signed in."""
    titles = {400: "That did not work", 403: "Not allowed", 404: "Not found", 409: "Not now",
              500: "Something went wrong in machaon"}
    token = request.cookies.get(auth.TOKEN_COOKIE)
    try:
        who = ops.authenticate(_store(request), token) if token else None
    except Exception:  # the store itself may be what failed: the page is shown without the menu
        who = None
    return _render(request, "problem.html", who, status_code=status_code,
                   title=titles.get(status_code, "That did not work"), message=message)


# --- rendering ---------------------------------------------------------------------------------

def _render(request: Request, template: str, who: ops.Principal | None, status_code: int = 200,
            **context: Any) -> Response:
    """A page with its layout's context; a notice left by the last action is shown once, by the
    next whole page (not by a fragment htmx fetches)."""
    notice = None if template.startswith("_") else _read_notice(request)
    signed_in = who is not None and who is not auth.ANONYMOUS
    response = templates.TemplateResponse(request, template, status_code=status_code, context={
        **context, "who": who, "signed_in": signed_in,
        "can_act": signed_in and who is not None and who.role == Role.OPERATOR,
        "why_disabled": WHY_DISABLED if signed_in else WHY_SIGN_IN, "notice": notice, "zone": zone_name(),
        "refresh_every_s": REFRESH_EVERY_S, "current": _menu_entry(request),
    })
    if notice:
        response.delete_cookie(NOTICE_COOKIE, path="/")
    return response


def _menu_entry(request: Request) -> str:
    """The menu's entry for this page, marked as the current one."""
    path = request.url.path
    if path == "/jobs" and request.query_params.get("status") == "failed":
        return "/jobs?status=failed"
    return "/" + path.strip("/").split("/")[0] if path != "/" and path.count("/") == 1 else path


def _done(request: Request, back: str | None, text: str, ok: bool = True) -> Response:
    """After an action: back to the page it was taken on, which says what happened."""
    response = RedirectResponse(_local_path(back), status_code=303)
    value = quote(("ok:" if ok else "error:") + text[:1500])
    response.set_cookie(NOTICE_COOKIE, value, max_age=120, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


def _read_notice(request: Request) -> dict | None:
    raw = request.cookies.get(NOTICE_COOKIE)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return {"ok": kind == "ok", "text": text}


def _act(request: Request, back: str | None, action: Callable[[], str]) -> Response:
    """Run an action; a refusal (a job retried meanwhile, ...) is shown on the page it came from."""
    try:
        return _done(request, back, action())
    except ops.OperationError as exc:
        return _done(request, back, str(exc), ok=False)


# --- signing in and out ------------------------------------------------------------------------

@router.get("/signin", response_class=HTMLResponse)
def sign_in_form(request: Request, next: str = "/"):
    return _render(request, "signin.html", None, next=_local_path(next), how_to=HOW_TO_GET_A_TOKEN)


@router.post("/signin", response_class=HTMLResponse)
def sign_in(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
    if not _same_origin(request):
        raise _Refused(403, "the sign-in form was not sent from machaon's own page: open /signin and "
                            "sign in there")
    token = token.strip()
    principal = ops.authenticate(_store(request), token) if token else None
    if principal is None:
        message = ("That token is not valid: it is unknown or was revoked. Check that it was copied "
                   "whole (it starts with mch_), or ask whoever runs machaon for a new one."
                   if token else "Paste your token into the field, then press Sign in.")
        return _render(request, "signin.html", None, status_code=401, next=_local_path(next),
                       how_to=HOW_TO_GET_A_TOKEN, error=message)
    response = RedirectResponse(_local_path(next), status_code=303)
    response.set_cookie(auth.TOKEN_COOKIE, token, max_age=int(SIGNED_IN_FOR.total_seconds()), path="/",
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/signout")
def sign_out(request: Request):
    if not _same_origin(request):
        raise _Refused(403, "the sign-out form was not sent from machaon's own page")
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(auth.TOKEN_COOKIE, path="/")
    return response


# --- the dashboard -----------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, who: Reader):
    return _render(request, "dashboard.html", who, **_dashboard(request))


@router.get("/dashboard/live", response_class=HTMLResponse)
def dashboard_live(request: Request, who: Reader):
    """The part of the dashboard htmx fetches again every few seconds."""
    return _render(request, "_live.html", who, **_dashboard(request))


def _dashboard(request: Request) -> dict:
    with _store(request).read_session() as session:
        summary = ops.summary(session, request.app.state.settings)
        activity = ops.activity(session, hours=24)
        failed = ops.list_jobs(session, status=JobStatus.FAILED, limit=FAILED_ON_DASHBOARD)
    return {"summary": summary, "failed": failed,
            "studies_chart": studies_chart(activity), "latency_chart": latency_chart(activity),
            "activity": activity, "back": "/"}


# --- jobs --------------------------------------------------------------------------------------

@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, who: Reader, status: str = "", model: str = "", since: str = "",
         study: str = ""):
    with _store(request).read_session() as session:
        rows = ops.list_jobs(session, status=status or None, model=model or None,
                             since=ops.parse_since(since), study_uid=study or None)
    return _render(request, "jobs.html", who, jobs=rows, statuses=list(JobStatus), status=status,
                   model=model, since=since, study=study, limit=ops.DEFAULT_LIMIT,
                   back=_here(request))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, who: Reader, job_id: int):
    with _store(request).read_session() as session:
        shown = ops.show_job(session, job_id)
    return _render(request, "job.html", who, job=shown, back=_here(request),
                   history=[_describe(e) for e in shown["history"]])


@router.post("/jobs/retry")
def retry_jobs(request: Request, who: Operator, ids: Annotated[list[int], Form()],
               back: Annotated[str, Form()] = "/"):
    """"Retry all shown": the jobs the operator saw, not whatever failed since."""
    def retry() -> str:
        done = ops.retry_jobs(_store(request), ids, who.actor)
        _hooks(request).call(_hooks(request).jobs_queued)
        return f"{_jobs_named(done['retried'])} queued again: they run in turn and show their outcome here."
    return _act(request, back, retry)


@router.post("/jobs/{job_id}/retry")
def retry_job(request: Request, who: Operator, job_id: int, back: Annotated[str, Form()] = "/"):
    def retry() -> str:
        ops.retry_jobs(_store(request), [job_id], who.actor)
        _hooks(request).call(_hooks(request).jobs_queued)
        return f"Job {job_id} is queued again: it runs in turn and shows its outcome here."
    return _act(request, back, retry)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, who: Operator, job_id: int, back: Annotated[str, Form()] = "/"):
    def cancel() -> str:
        ops.cancel_jobs(_store(request), [job_id], who.actor)
        return f"Job {job_id} is cancelled: it will not run (Retry queues it again)."
    return _act(request, back, cancel)


def _jobs_named(ids: list[int]) -> str:
    return f"Job {ids[0]} is" if len(ids) == 1 else f"{len(ids)} jobs ({', '.join(map(str, ids))}) are"


# --- deliveries --------------------------------------------------------------------------------

@router.post("/deliveries/retry")
def retry_deliveries(request: Request, who: Operator, destination: Annotated[str, Form()],
                     back: Annotated[str, Form()] = "/"):
    def send_now() -> str:
        done = ops.retry_deliveries(_store(request), who.actor, destination=destination)
        _hooks(request).call(_hooks(request).deliveries_due)
        count = len(done["retried"])
        return (f"{count} result(s) waiting for {destination} will be sent now." if count
                else f"Nothing is waiting for {destination}.")
    return _act(request, back, send_now)


# --- studies -----------------------------------------------------------------------------------

@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request, who: Reader, q: str = ""):
    with _store(request).read_session() as session:
        rows = ops.list_studies(session, q=_search_term(q), limit=ops.DEFAULT_LIMIT)
    return _render(request, "studies.html", who, studies=rows, q=q, limit=ops.DEFAULT_LIMIT)


def _search_term(q: str) -> str | None:
    """What the study search looks for; a date typed as 2026-12-01 is the DICOM 20261201."""
    q = q.strip()
    if len(q) == 10 and q[4] == q[7] == "-" and (q[:4] + q[5:7] + q[8:]).isdigit():
        return q.replace("-", "")
    return q or None


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(request: Request, who: Reader, study_uid: str):
    with _store(request).read_session() as session:
        shown = ops.show_study(session, study_uid)
    return _render(request, "study.html", who, study=shown, back=_here(request),
                   milestones=_milestones(shown), timeline=_timeline(shown))


@router.post("/studies/{study_uid}/reprocess")
def reprocess(request: Request, who: Operator, study_uid: str, back: Annotated[str, Form()] = "/"):
    def queue() -> str:
        done = ops.reprocess_study(_store(request), request.app.state.settings.rules, study_uid,
                                   who.actor)
        _hooks(request).call(_hooks(request).jobs_queued)
        queued = f"{_jobs_named(done['jobs'])} queued" if done["jobs"] else "No new job was queued"
        already = f"; {done['already_queued']} already queued or running" if done["already_queued"] else ""
        return f"{queued}{already}."
    return _act(request, back, queue)


@router.post("/studies/{study_uid}/complete")
def complete(request: Request, who: Operator, study_uid: str, back: Annotated[str, Form()] = "/"):
    def finish() -> str:
        ops.complete_study(_store(request), study_uid, who.actor)
        _hooks(request).call(_hooks(request).studies_completed)
        return "The study is complete: its jobs are queued next."
    return _act(request, back, finish)


@router.get("/studies/{study_uid}/results/{sop_instance_uid}")
def result_file(request: Request, _: Reader, study_uid: str, sop_instance_uid: str):
    """A SEG or SR the study's jobs made, as a DICOM file: only files recorded as results."""
    with _store(request).read_session() as session:
        found = ops.find_result(session, study_uid, sop_instance_uid)
    spool = Path(request.app.state.settings.spool.path).resolve()
    path = (spool / found["path"]).resolve()
    if not path.is_relative_to(spool) or not path.is_file():
        raise _Refused(404, f"result {sop_instance_uid} is recorded but its file is no longer in the "
                            "spool: Reprocess the study to make it again")
    return FileResponse(path, media_type="application/dicom",
                        filename=f"{found['kind']}-{sop_instance_uid}.dcm")


# --- models ------------------------------------------------------------------------------------

@router.get("/models", response_class=HTMLResponse)
def models(request: Request, who: Reader):
    rows = ops.models_in_use(request.app.state.settings, ort_sessions=_hooks(request).ort_sessions)
    return _render(request, "models.html", who, models=rows)


def _here(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


# --- a study's story ---------------------------------------------------------------------------

def _milestones(study: dict) -> list[tuple[str, str | None]]:
    """First image, last image, complete, last result delivered: when each happened."""
    sent = [d["sent_at"] for j in study["jobs"] for r in j["results"] for d in r["deliveries"]
            if d["sent_at"]]
    return [("First image received", study["first_received_at"]),
            ("Last image received", study["last_received_at"]),
            ("Complete", study["completed_at"]),
            ("Last result delivered", max(sent) if sent else None)]


def _timeline(study: dict) -> list[dict]:
    """The study's events, oldest first, in words, each with the time since its first image."""
    start = parse(study["first_received_at"])
    kinds = {r["sop_instance_uid"]: r["kind"] for j in study["jobs"] for r in j["results"]}
    return [_describe(e, start, kinds) for e in study["events"]]


def _describe(event: dict, start: datetime | None = None, kinds: dict | None = None) -> dict:
    """An event in words. For an event about a job, `text` follows the words "Job N", which the
    page makes a link to the job."""
    d = event["detail"]
    model = f"({d.get('model')})"
    result = (kinds or {}).get(d.get("sop_instance_uid", ""), "result").upper()
    words: dict[str, Callable[[], str]] = {
        "study.received": lambda: "First image received",
        "study.reopened": lambda: "More images arrived after it was complete: receiving again",
        "study.completed": lambda: f"Complete: {d.get('series')} series, {d.get('instances')} images",
        "study.force_completed": lambda: f"Completed by hand: {d.get('series')} series, "
                                         f"{d.get('instances')} images",
        "jobs.planned": lambda: f"{d.get('jobs')} job(s) queued: {', '.join(d.get('models') or [])}"
                                + (f" (replacing queued job(s) {_ids(d['superseded'])})"
                                   if d.get("superseded") else ""),
        "study.no_rule_matched": lambda: "No rule matched its series: nothing to run",
        "study.planning_failed": lambda: f"Could not plan its jobs: {d.get('error')}",
        "study.reprocessed": lambda: f"Reprocess: job(s) {_ids(d.get('jobs') or [])} queued",
        "job.succeeded": lambda: f"{model} succeeded: {len(d.get('results') or [])} result(s)",
        "job.failed": lambda: f"{model} failed: {d.get('error')}",
        "job.retry_scheduled": lambda: f"{model} failed on attempt {d.get('attempt')}, tried again in "
                                       f"{duration(d.get('retry_in_s'))}: {d.get('error')}",
        "job.lease_expired": lambda: f"{model}: its worker stopped; running it again",
        "job.retried": lambda: f"{model} queued again (it was {d.get('was')})",
        "job.cancelled": lambda: f"{model} cancelled",
        "result.sent": lambda: f"{result} sent to {d.get('destination')}",
        "result.send_failed": lambda: f"{result} not sent to {d.get('destination')} (attempt "
                                      f"{d.get('attempt')}, next try in {duration(d.get('retry_in_s'))}): "
                                      f"{d.get('error')}",
        "delivery.retried": lambda: f"Deliveries {_ids(d.get('deliveries') or [])} made due now",
    }
    describe = words.get(event["action"])
    text = describe() if describe else f"{event['action']}: " + ", ".join(f"{k} {v}" for k, v in d.items())
    at = parse(event["at"])
    return {"at": event["at"], "actor": event["actor"], "action": event["action"], "text": text,
            "job": d.get("job") if event["action"].startswith("job.") else None,
            "failed": event["action"].endswith("failed"),
            "after": (at - start).total_seconds() if start and at else None}


def _ids(ids: Iterable) -> str:
    return ", ".join(map(str, ids))


_env.filters.update(when=formats.when, ago=formats.ago, duration=formats.duration, size=formats.size,
                    dicom_date=formats.dicom_date, short_uid=formats.short_uid_or_blank,
                    counted=formats.counted)
_env.globals.update(quote=quote)
