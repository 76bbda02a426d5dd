"""The operators' commands: jobs, deliveries, events, tokens, reprocessing and completing studies,
and the API alone. Each is a thin shell over operations.py; actions are recorded as `cli:<user>`."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime

from rich.console import Console
from rich.markup import escape

from ..config import Settings
from ..display import Column, local_time, print_table, progress, table_uid, wide_flag
from ..store import JobStatus, Role

out = Console(highlight=False)


def add_commands(sub, studies, common: argparse.ArgumentParser, json_flag: argparse.ArgumentParser) -> None:
    """Add the operators' commands to the `machaon` parser (`studies` is its `studies` actions)."""
    wide = wide_flag()
    jobs = sub.add_parser("jobs", help="jobs: list, show, retry, cancel").add_subparsers(
        required=True, metavar="ACTION")
    p = jobs.add_parser("list", parents=[common, json_flag, wide], help="jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--model", metavar="NAME")
    p.add_argument("--since", metavar="T",
                   help="created or finished since: 30m, 2h, 7d, or a date (local time)")
    p.add_argument("--study", metavar="STUDY_UID")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(run=_jobs_list)
    p = jobs.add_parser("show", parents=[common, json_flag],
                        help="one job: attempts, error, stage timings, results and their deliveries")
    p.add_argument("job_id", type=int, metavar="ID")
    p.set_defaults(run=_jobs_show)
    p = jobs.add_parser("retry", parents=[common], help="queue failed or cancelled jobs again")
    p.add_argument("job_ids", type=int, nargs="*", metavar="ID")
    p.add_argument("--all-failed", action="store_true",
                   help="every failed job (narrowed by --since, --model)")
    p.add_argument("--since", metavar="T", help="with --all-failed: failed since (30m, 2h, 7d, a date)")
    p.add_argument("--model", metavar="NAME", help="with --all-failed: only this model's")
    p.set_defaults(run=_jobs_retry)
    p = jobs.add_parser("cancel", parents=[common], help="cancel queued jobs")
    p.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    p.set_defaults(run=_jobs_cancel)

    p = studies.add_parser("reprocess", parents=[common],
                           help="queue a study's jobs again, as today's rules and models say")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--model", metavar="NAME", help="only this model's jobs")
    p.set_defaults(run=_studies_reprocess)
    p = studies.add_parser("complete", parents=[common], help="complete a study still receiving, now")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(run=_studies_complete)

    deliveries = sub.add_parser("deliveries", help="results on their way to destinations").add_subparsers(
        required=True, metavar="ACTION")
    p = deliveries.add_parser("list", parents=[common, json_flag, wide], help="deliveries, newest first")
    p.add_argument("--status", choices=["pending", "failed", "sent"],
                   help="pending: not tried yet; failed: tried, retried after a backoff; sent")
    p.add_argument("--destination", metavar="NAME")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(run=_deliveries_list)
    p = deliveries.add_parser("retry", parents=[common],
                              help="send pending deliveries now, whatever their backoff says")
    p.add_argument("delivery_ids", type=int, nargs="*", metavar="ID")
    p.add_argument("--destination", metavar="NAME", help="every pending delivery to this destination")
    p.set_defaults(run=_deliveries_retry)

    p = sub.add_parser("events", parents=[common, json_flag, wide], help="the audit trail, newest first")
    p.add_argument("--study", metavar="STUDY_UID")
    p.add_argument("--actor", metavar="WHO", help="e.g. cli:alice, api:night-shift, scheduler")
    p.add_argument("--since", metavar="T", help="30m, 2h, 7d, or a date (local time)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(run=_events)

    tokens = sub.add_parser("tokens", help="API and web page tokens").add_subparsers(
        required=True, metavar="ACTION")
    p = tokens.add_parser("create", parents=[common], help="create a token (printed once)")
    p.add_argument("name", metavar="NAME", help="who or what uses it: alice, night-shift, grafana")
    p.add_argument("--role", required=True, choices=[r.value for r in Role],
                   help="viewer: reads; operator: also retries, cancels, reprocesses")
    p.set_defaults(run=_tokens_create)
    p = tokens.add_parser("list", parents=[common, json_flag], help="tokens (never the tokens themselves)")
    p.set_defaults(run=_tokens_list)
    p = tokens.add_parser("revoke", parents=[common], help="revoke a token at once")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_tokens_revoke)

    p = sub.add_parser("api", parents=[common], help="the REST API and web page alone, against a shared "
                       "job store (`machaon serve` runs them too)")
    p.set_defaults(run=_api)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _with_store(settings: Settings, act: Callable) -> int:
    """Run `act(store)`; an operation's refusal is printed as a one-line error, exit status 1."""
    from .. import operations as ops
    from ..startup import open_store
    store = open_store(settings)
    try:
        return act(store) or 0
    except ops.OperationError as exc:
        print(f"machaon: {exc}", file=sys.stderr)
        return 1
    finally:
        store.dispose()


def _query(settings: Settings, query: Callable) -> int:
    """`query(session)` in a read session, through _with_store."""
    def act(store):
        with store.read_session() as session:
            return query(session)
    return _with_store(settings, act)


def _since(text: str | None) -> datetime | None:
    from .. import operations as ops
    return ops.parse_since(text)


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


# --- jobs -------------------------------------------------------------------------------

def _jobs_list(settings: Settings, args) -> int:
    from .. import operations as ops

    def query(session):
        jobs = ops.list_jobs(session, status=args.status, model=args.model, since=_since(args.since),
                             study_uid=args.study, limit=args.limit)
        if args.json:
            return _print_json(jobs)
        if not jobs:
            return out.print("no jobs")
        print_table(out, [Column("Job", "right"), Column("Status"), Column("Model", cut=True),
                          Column("When"), Column("Patient ID", cut=True, optional=True),
                          Column("Study", optional=True), Column("Error", cut=True)],
                    [[str(j["id"]), _status(j), escape(j["model"]),
                      local_time(j["finished_at"] or j["created_at"]), escape(j["patient_id"] or ""),
                      table_uid(j["study_uid"], args.wide), escape(j["error"] or "")] for j in jobs],
                    wide=args.wide)
    return _query(settings, query)


def _status(job: dict) -> str:
    colour = {"failed": "red", "succeeded": "green", "running": "cyan"}.get(job["status"])
    text = job["status"] + (f" ({job['attempts']}x)" if job["attempts"] > 1 else "")
    return f"[{colour}]{text}[/]" if colour else text


def _jobs_show(settings: Settings, args) -> int:
    from .. import operations as ops

    def query(session):
        job = ops.show_job(session, args.job_id)
        if args.json:
            return _print_json(job)
        out.print(f"[bold]Job {job['id']}[/] {job['model']} ({job['rule'] or 'no rule'}): "
                  f"[bold]{job['status']}[/], attempt {job['attempts']}")
        for key in ("study_uid", "patient_id", "accession_number", "study_description", "series_uid",
                    "series_description", "created_at", "started_at", "finished_at", "not_before"):
            if job[key]:
                value = local_time(job[key]) if key.endswith(("_at", "before")) else job[key]
                out.print(f"  {key.replace('_', ' ')}: {value}", markup=False, soft_wrap=True)
        if job["error"]:
            out.print(f"  [red]error[/]: {escape(job['error'])}", soft_wrap=True)
        if job["timings"]:
            out.print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in job["timings"].items()))
        for r in job["results"]:
            sends = ", ".join(f"{d['destination']} {d['status']}" for d in r["deliveries"])
            sends = sends or "no destination"
            out.print(f"  {r['kind']} {r['sop_instance_uid']}: {sends}", markup=False, soft_wrap=True)
        for e in job["history"]:
            detail = ", ".join(f"{k}={v}" for k, v in e["detail"].items() if k not in ("job", "model"))
            out.print(f"  {local_time(e['at'])} {e['actor']} {e['action']} {detail}", markup=False,
                      soft_wrap=True)
    return _query(settings, query)


def _jobs_retry(settings: Settings, args) -> int:
    from .. import operations as ops
    if bool(args.job_ids) == args.all_failed:
        print("machaon: name the jobs to retry (IDs), or --all-failed", file=sys.stderr)
        return 2
    if args.job_ids and (args.since or args.model):
        print("machaon: --since and --model narrow --all-failed; with job IDs, leave them out",
              file=sys.stderr)
        return 2

    def act(store):
        if args.job_ids:
            done = ops.retry_jobs(store, args.job_ids, _actor())
        else:
            since = _since(args.since)
            with store.read_session() as session:
                total = ops.count_failed_jobs(session, since=since, model=args.model)
            if not total:
                return out.print("no failed jobs match: nothing to retry")
            with progress(out, "queueing failed jobs again", total) as count:
                done = ops.retry_failed_jobs(store, _actor(), since=since, model=args.model,
                                             progress=lambda n, _total: count.advance(n - count.done))
        retried = done["retried"]
        out.print(f"queued again: {len(retried)} job(s)" + (f" ({_ids(retried)})" if retried else ""))
    return _with_store(settings, act)


def _ids(ids: list[int], shown: int = 20) -> str:
    text = ", ".join(map(str, ids[:shown]))
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _jobs_cancel(settings: Settings, args) -> int:
    from .. import operations as ops

    def act(store):
        done = ops.cancel_jobs(store, args.job_ids, _actor())
        out.print(f"cancelled: {_ids(done['cancelled'])}")
    return _with_store(settings, act)


# --- studies ----------------------------------------------------------------------------

def _studies_reprocess(settings: Settings, args) -> int:
    from .. import operations as ops

    def act(store):
        done = ops.reprocess_study(store, settings.rules, args.study_uid, _actor(), model=args.model)
        again = f"; {done['already_queued']} already queued" if done["already_queued"] else ""
        out.print(f"queued: {len(done['jobs'])} job(s) ({_ids(done['jobs']) or 'none'}){again}")
    return _with_store(settings, act)


def _studies_complete(settings: Settings, args) -> int:
    from .. import operations as ops

    def act(store):
        done = ops.complete_study(store, args.study_uid, _actor())
        out.print(f"study {args.study_uid} complete ({done['series']} series, {done['instances']} "
                  "instances): its jobs are planned at the service's next look", soft_wrap=True)
    return _with_store(settings, act)


# --- deliveries -------------------------------------------------------------------------

def _deliveries_list(settings: Settings, args) -> int:
    from .. import operations as ops

    def query(session):
        rows = ops.list_deliveries(session, status=args.status, destination=args.destination,
                                   limit=args.limit)
        if args.json:
            return _print_json(rows)
        if not rows:
            return out.print("no deliveries")
        print_table(out, [Column("ID", "right"), Column("Destination", cut=True), Column("Status"),
                          Column("Tries", "right"), Column("Kind", optional=True),
                          Column("Result", optional=True), Column("Sent / next try"),
                          Column("Last error", cut=True)],
                    [[str(d["id"]), escape(d["destination"]), d["status"], str(d["attempts"]), d["kind"],
                      table_uid(d["sop_instance_uid"], args.wide),
                      local_time(d["sent_at"] or d["next_attempt_at"]),
                      escape(d["last_error"] or "")] for d in rows], wide=args.wide)
    return _query(settings, query)


def _deliveries_retry(settings: Settings, args) -> int:
    from .. import operations as ops
    if bool(args.delivery_ids) == bool(args.destination):
        print("machaon: name the deliveries to retry (IDs), or --destination NAME", file=sys.stderr)
        return 2

    def act(store):
        done = ops.retry_deliveries(store, _actor(), ids=args.delivery_ids or None,
                                    destination=args.destination)
        out.print(f"due now: {len(done['retried'])} delivery(ies); the service sends them within "
                  f"{settings.dispatch.check_every:g} s")
    return _with_store(settings, act)


# --- events and tokens ------------------------------------------------------------------

def _events(settings: Settings, args) -> int:
    from .. import operations as ops

    def query(session):
        events = ops.list_events(session, study_uid=args.study, actor=args.actor, since=_since(args.since),
                                 limit=args.limit)
        if args.json:
            return _print_json(events)
        if not events:
            return out.print("no events")
        print_table(out, [Column("When"), Column("Who", cut=True), Column("What"),
                          Column("Study", optional=True), Column("Detail", cut=True)],
                    [[local_time(e["at"]), escape(e["actor"]), e["action"],
                      table_uid(e["study_uid"], args.wide),
                      escape(", ".join(f"{k}={v}" for k, v in e["detail"].items()))] for e in events],
                    wide=args.wide)
    return _query(settings, query)


def _tokens_create(settings: Settings, args) -> int:
    from .. import operations as ops

    def act(store):
        token = ops.create_token(store, args.name, args.role, _actor())
        if sys.stdout.isatty():
            out.print(f"token for {args.name} ({args.role}); it is shown only this once:", soft_wrap=True)
        print(token)  # alone on stdout when piped, for scripts
    return _with_store(settings, act)


def _tokens_list(settings: Settings, args) -> int:
    from .. import operations as ops

    def query(session):
        tokens = ops.list_tokens(session)
        if args.json:
            return _print_json(tokens)
        if not tokens:
            return out.print("no tokens (`machaon tokens create NAME --role viewer|operator`)")
        print_table(out, [Column("Name", cut=True), Column("Role"), Column("Created"),
                          Column("By", cut=True, optional=True), Column("Last used"), Column("Revoked")],
                    [[t["name"], t["role"], local_time(t["created_at"]), escape(t["created_by"]),
                      local_time(t["last_used_at"]), local_time(t["revoked_at"])] for t in tokens])
    return _query(settings, query)


def _tokens_revoke(settings: Settings, args) -> int:
    from .. import operations as ops

    def act(store):
        ops.revoke_token(store, args.name, _actor())
        out.print(f"revoked the token {args.name}: it is refused from now on")
    return _with_store(settings, act)


def _api(settings: Settings, _args) -> None:
    from ..api.server import serve_api
    serve_api(settings)
