"""The `machaon` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

from rich.console import Console
from rich.markup import escape

from .. import __version__
from ..config import ConfigError, Settings, Unavailable, load_settings
from ..display import ELLIPSIS, Column, local_time, print_table, short_uid, table_uid, wide_flag
from ..store import StudyStatus
from . import operators

# sysexits.h EX_CONFIG: systemd units are told not to restart on it.
EXIT_CONFIG = 78
# sysexits.h EX_TEMPFAIL: what start-up needs was not there in time (the database, a port still
# held by another process); systemd restarts the service.
EXIT_UNAVAILABLE = 75
# The commands that run as services: their configuration file must keep its passwords to itself.
SERVICES = ("serve", "worker", "api")

out = Console(highlight=False)


def _fail(message: str, code: int = 1) -> int:
    """Errors go to stderr unwrapped, one line each, for logs and scripts."""
    print(f"machaon: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "models":
        # The job store, the spool and the results hold patient data: readable by this user only.
        # Model packages do not, and are built for the service's user to read.
        os.umask(0o077)
    try:
        if args.command == "doctor":  # a configuration that does not load is one of its findings
            from ..doctor import doctor
            return doctor(args.config, args.json, args.wide, out)
        settings = load_settings(args.config)
        _setup_logging(settings)
        if args.command in SERVICES:
            from ..startup import check_config_file
            check_config_file(settings)
        return args.run(settings, args) or 0
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EXIT_CONFIG)
    except Unavailable as exc:
        return _fail(f"not available: {exc}", EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="TOML configuration (default: $MACHAON_CONFIG, else the embedded default)")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON (format in README)")
    wide = wide_flag()

    parser = argparse.ArgumentParser(prog="machaon", description="DICOM AI batch processing node")
    parser.add_argument("--version", action="version", version=f"machaon {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")

    p = sub.add_parser("serve", parents=[common], help="receive studies and process them")
    p.set_defaults(run=_serve)

    p = sub.add_parser("worker", parents=[common],
                       help="run jobs only, beside a `machaon serve` sharing the job store and spool")
    p.set_defaults(run=_worker)

    db = sub.add_parser("db", help="job store maintenance").add_subparsers(required=True, metavar="ACTION")
    p = db.add_parser("upgrade", parents=[common], help="create or migrate the job store's tables")
    p.set_defaults(run=_db_upgrade)

    studies = sub.add_parser("studies", help="studies received").add_subparsers(required=True,
                                                                                 metavar="ACTION")
    p = studies.add_parser("list", parents=[common, json_flag, wide], help="list studies, newest first")
    p.add_argument("--status", choices=[s.value for s in StudyStatus])
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.set_defaults(run=_studies_list)
    p = studies.add_parser("show", parents=[common, json_flag, wide],
                           help="one study, its series and history")
    p.add_argument("study_uid", metavar="STUDY_UID",
                   help=f"the whole UID, or its end as the tables show it ({ELLIPSIS}1234.5678)")
    p.set_defaults(run=_studies_show)

    models = sub.add_parser("models", help="model packages").add_subparsers(required=True, metavar="ACTION")
    p = models.add_parser("build", parents=[common],
                          help="convert models/*/ to ONNX packages in models.path (from a checkout)")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every model in --source")
    p.add_argument("--source", default="models", metavar="DIR", help="source model folders (default: models)")
    p.add_argument("--envs", default="build/envs", metavar="DIR",
                   help="where the Keras and MXNet environments live (default: build/envs)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even the models whose sources, manifest and converter are unchanged")
    p.set_defaults(run=_models_build)
    p = models.add_parser("train", parents=[common], help="train a demo model on phantoms (slow)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--studies", type=int, default=60, help="phantom studies to train on (default 60)")
    p.add_argument("--holdout", type=int, default=12, help="phantom studies held out (default 12)")
    p.add_argument("--source", default="models", metavar="DIR")
    p.add_argument("--envs", default="build/envs", metavar="DIR")
    p.set_defaults(run=_models_train)
    p = models.add_parser("list", parents=[common, json_flag, wide], help="built packages in models.path")
    p.set_defaults(run=_models_list)
    p = models.add_parser("check", parents=[common],
                          help="load a package, run a dummy input, show providers and timing")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="default: inference.precision")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.set_defaults(run=_models_check)

    rules = sub.add_parser("rules", help="routing rules").add_subparsers(required=True, metavar="ACTION")
    p = rules.add_parser("test", parents=[common], help="which rules match a study: a folder or file "
                         "of DICOM, or a received study's UID")
    p.add_argument("target", metavar="PATH_OR_STUDY_UID")
    p.set_defaults(run=_rules_test)

    p = sub.add_parser("demo", parents=[common],
                       help="serve, send a phantom cardiac MR study to ourselves, show the job's results")
    p.add_argument("--send-only", metavar="AET@HOST:PORT", help="only send the phantom study to this node")
    p.add_argument("--calling-ae", metavar="AET", type=_ae_title,
                   help="our AE title on the association (default: dicom.ae_title with --send-only, "
                        "else DEMO)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM node (AET@HOST:PORT), or a configured "
                       "DICOM destination by name (with its TLS settings)")
    p.add_argument("target", metavar="AET@HOST:PORT|DESTINATION")
    p.add_argument("--timeout", type=float, help="seconds (default 10, or the destination's timeout)")
    p.set_defaults(run=_echo)

    p = sub.add_parser("doctor", parents=[common, json_flag, wide],
                       help="check the configuration, job store, spool, TLS files, models and destinations")

    operators.add_commands(sub, studies, common, json_flag)
    return parser


def _ae_title(text: str) -> str:
    """An AE title given on the command line, checked as the configuration checks them."""
    from pydantic import TypeAdapter, ValidationError

    from ..senders.dicom import AETitle
    try:
        return TypeAdapter(AETitle).validate_python(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _setup_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log.level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # Their INFO lines are per PDU and per scheduler tick; ours summarise them.
    quiet = logging.DEBUG if level == logging.DEBUG else logging.WARNING
    for noisy in ("pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(quiet)
    # pynetdicom logs a peer's bad bytes with tracebacks: machaon's own lines say what a peer did.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == logging.DEBUG else logging.CRITICAL)


def _serve(settings: Settings, _args) -> None:
    from ..serve import serve
    serve(settings)


def _worker(settings: Settings, _args) -> None:
    from ..serve import work
    work(settings)


def _db_upgrade(settings: Settings, _args) -> None:
    import sqlalchemy.exc

    from ..startup import database_problem, database_url
    from ..store import instances_without_facts, make_engine, upgrade
    engine = make_engine(database_url(settings).render_as_string(hide_password=False))
    recorded, unreadable = 0, list[str]()
    try:
        before, after = upgrade(engine)
        with engine.connect() as conn:
            missing = bool(instances_without_facts(conn, 0, 1))
        if missing:  # rows kept before header facts were recorded at ingest: read from the spool
            from ..scp import record_missing_facts
            from ..spool import Spool
            if not (settings.spool.path / "studies").is_dir():
                raise settings.error("spool.path", f"{settings.spool.path} holds no studies/ folder, yet "
                                     "the job store has instances kept there: is this their spool?")
            recorded, unreadable = record_missing_facts(engine, Spool(settings.spool.path))
    except sqlalchemy.exc.OperationalError as exc:
        raise database_problem(settings, exc) from None
    finally:
        engine.dispose()
    if before == after:
        out.print(f"job store is up to date (revision {after})")
    else:
        out.print(f"job store upgraded from {before or 'empty'} to revision {after}")
    if recorded:
        out.print(f"recorded the header facts of {recorded} instance(s) from their files in the spool")
    if unreadable:
        out.print(f"[yellow]{len(unreadable)} instance(s) kept without header facts[/]: their files cannot "
                  f"be read from {settings.spool.path}; planning names them on their studies, and "
                  "`machaon db upgrade` tries again:", soft_wrap=True)
        for line in unreadable[:20]:
            out.print(f"  {line}", soft_wrap=True, markup=False)
        if len(unreadable) > 20:
            out.print(f"  and {len(unreadable) - 20} more")


def _studies_list(settings: Settings, args) -> None:
    from .. import operations as ops
    from ..startup import open_store
    store = open_store(settings)
    with store.read_session() as session:
        rows = ops.list_studies(session, status=args.status, limit=args.limit)
    store.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no studies")
        return
    # Date and Series are left out first on a narrow terminal (--wide shows them).
    columns = [Column("Study Instance UID"), Column("Patient ID", cut=True), Column("Date", optional=True),
               Column("Series", "right", optional=True), Column("Images", "right"),
               Column("Status", cut=True), Column("Last received")]
    table = []
    for r in rows:
        status = r["status"] + (f" ({r['completion_count']}x)" if r["completion_count"] > 1 else "")
        if r["planning_error"]:
            status += ", [red]planning problem[/]"  # `studies show` says which files
        table.append([table_uid(r["study_uid"], args.wide), escape(r["patient_id"] or ""),
                      r["study_date"] or "", str(r["series_count"]), str(r["instance_count"]), status,
                      local_time(r["last_received_at"])])
    print_table(out, columns, table, args.wide)


def _studies_show(settings: Settings, args) -> int:
    from .. import operations as ops
    from ..startup import open_store
    store = open_store(settings)
    try:
        with store.read_session() as session:
            study = ops.find_study(session, args.study_uid)
    except ops.OperationError as exc:
        return _fail(f"{exc} (`machaon studies list` shows the known ones)")
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(study, indent=2))
        return 0
    # The UID whole on its own line, to copy; the tables below fit the terminal.
    out.print(f"[bold]Study[/] {study['study_uid']}", soft_wrap=True)
    out.print(f"  status: [bold]{study['status']}[/]")
    for key in ("patient_id", "patient_name", "accession_number", "study_date", "study_description",
                "first_received_at", "last_received_at", "completed_at", "completion_count"):
        value = local_time(study[key]) if key.endswith("_at") else study[key]
        out.print(f"  {key.replace('_', ' ')}: {value if value is not None else ''}", markup=False)
    if study["planning_error"]:
        out.print(f"  [red]planning problem[/]: {study['planning_error']}")
    wide = args.wide
    series = [[table_uid(s["series_uid"], wide), escape(s["modality"] or ""), str(s["series_number"] or ""),
               escape(s["series_description"] or ""), str(s["instance_count"]), s["status"]]
              for s in study["series"]]
    jobs = []
    for j in study["jobs"]:
        superseded = j["superseded_by"] and f"superseded by job {j['superseded_by']}"
        detail = j["error"] or superseded or ", ".join(f"{r['kind']} -> " + ", ".join(
            f"{d['destination']} {d['status']}" for d in r["deliveries"]) for r in j["results"])
        jobs.append([str(j["id"]), escape(j["model"]), escape(j["rule"] or ""), j["status"],
                     str(j["attempts"]), escape(detail)])
    events = [[local_time(e["at"]), escape(e["actor"]), e["action"],
               escape(", ".join(f"{k}={_detail_value(v, wide)}" for k, v in e["detail"].items()))]
              for e in study["events"]]
    cut = False

    def table(columns: list[Column], rows: list[list[str]]) -> None:
        nonlocal cut
        if rows:
            out.print()
            cut |= print_table(out, columns, rows, wide)

    table([Column("Series Instance UID"), Column("Modality"), Column("No.", "right"),
           Column("Description", cut=True), Column("Images", "right"), Column("Status")], series)
    table([Column("Job", "right"), Column("Model"), Column("Rule", cut=True), Column("Status"),
           Column("Attempts", "right"), Column("Error / results", cut=True)], jobs)
    failed = [j for j in study["jobs"] if j["error"]]
    if failed and not wide:  # why a job failed is worth reading whole, on as many lines as it takes
        out.print()
        for j in failed:
            out.print(f"job {j['id']}: {j['error']}", markup=False, highlight=False)
    table([Column("When"), Column("Who", cut=True), Column("What"), Column("Detail", cut=True)], events)
    if cut:
        out.print("\n(values cut short to fit the terminal: --wide or --json prints them whole)", style="dim")
    return 0


def _detail_value(value, wide: bool):
    """An event's detail value; a UID in it shortened like the UID columns."""
    uid = isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)+", value)
    return short_uid(value) if uid and not wide else value


def _builder(settings: Settings, args):
    from pathlib import Path

    from ..tools.build import Builder
    return Builder(Path(args.source), settings.models.path, Path(args.envs), out)


def _build_extra_missing() -> str | None:
    """Why `machaon models` cannot build here: the build's own dependencies are an extra."""
    import importlib.util
    missing = [m for m in ("onnx", "ml_dtypes", "tomli_w") if importlib.util.find_spec(m) is None]
    return (f"building models needs {', '.join(missing)}: install machaon with its build extra "
            "(pip install 'machaon[build]')") if missing else None


def _models_build(settings: Settings, args) -> int:
    if problem := _build_extra_missing():
        return _fail(problem)
    from ..manifest import PackageError
    from ..tools.build import BuildError
    builder = _builder(settings, args)
    names = args.names or builder.names()
    if not names:
        return _fail(f"no models in {args.source}/ (each needs a manifest.toml): run from a checkout")
    failed = []
    for name in names:
        try:
            builder.build(name, force=args.force)
        except (BuildError, PackageError) as exc:
            failed.append(name)
            out.print(f"  [red]failed[/] {name}")
            print(f"machaon: {name}: {exc}", file=sys.stderr)
    if failed:
        return _fail(f"{len(failed)} of {len(names)} models failed to build: {', '.join(failed)}")
    return 0


def _models_train(settings: Settings, args) -> int:
    if problem := _build_extra_missing():
        return _fail(problem)
    from ..manifest import PackageError
    from ..tools.build import BuildError
    try:
        _builder(settings, args).train(args.name, args.studies, args.holdout)
    except (BuildError, PackageError) as exc:
        return _fail(str(exc))
    return 0


def _models_list(settings: Settings, args) -> int:
    from ..manifest import find_packages
    packages, errors = find_packages(settings.models.path)
    rows = [_package_row(p) for p in packages]
    if args.json:
        print(json.dumps({"path": str(settings.models.path), "models": rows, "errors": errors}, indent=2))
    else:
        # The least needed last: a narrow terminal leaves them out (--wide shows them).
        columns = [Column("Name"), Column("Version"), Column("Task"), Column("Input", cut=True),
                   Column("Evaluation"), Column("Variants", optional=True), Column("Demo", optional=True),
                   Column("Parity", optional=True)]
        table = []
        for r in rows:
            scored = r["evaluation"]
            # Without a score, say why: its weights are random.
            evaluation = (f"{scored['metric']} {scored['value']:.3f}" if scored
                          else "random weights" if r["demo"] == "random-weights" else "")
            table.append([r["name"], r["version"], r["task"], r["input"], evaluation,
                          ", ".join(r["variants"]), r["demo"] or "", f"{r['parity_max_abs_diff']:.1e}"])
        if rows:
            print_table(out, columns, table, args.wide)
        else:
            out.print(f"no model packages in {settings.models.path} (build them with `machaon models build`)")
    for error in errors:
        print(f"machaon: {error}", file=sys.stderr)
    return 1 if errors else 0


def _package_row(package) -> dict:
    m = package.manifest
    return {
        "name": m.name, "version": m.version, "task": m.task, "demo": m.demo, "path": str(package.folder),
        "input": f"{'/'.join(m.input.modalities)} {'x'.join(map(str, m.input.size))}x{m.input.channels} "
                 f"{m.input.layout}",
        "variants": ["fp32"] + [v.precision for v in m.variants],
        "parity_max_abs_diff": m.provenance.parity_max_abs_diff,
        "evaluation": m.evaluation.model_dump() if m.evaluation else None,
        "sha256": m.provenance.sha256,
    }


def _models_check(settings: Settings, args) -> int:
    import numpy as np

    from ..inference import OrtModel
    from ..manifest import PackageError, load_package
    precision = args.precision or settings.inference.precision
    try:
        package = load_package(settings.models.path, args.name)
        model = OrtModel(package, precision, settings.inference.runtime_options())
    except PackageError as exc:
        return _fail(str(exc))
    x = np.random.default_rng(0).standard_normal(package.manifest.input.shape(args.batch)).astype(np.float32)
    started = time.perf_counter()
    y = model.run(x)
    first = time.perf_counter() - started
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - started)
    out.print(f"{package.name} {package.manifest.version} ({precision}) from {package.folder}")
    out.print(f"  providers asked for: {', '.join(settings.inference.providers)}")
    out.print(f"  providers in use:    {', '.join(model.providers)}")
    out.print(f"  input {x.shape} -> output {y.shape}")
    out.print(f"  session created in {model.load_seconds * 1000:.0f} ms; first run {first * 1000:.1f} ms; "
              f"median of {args.runs} runs {np.median(times) * 1000:.1f} ms "
              f"({args.batch / np.median(times):.1f} images/s at batch {args.batch})")
    return 0


def _rules_test(settings: Settings, args) -> int:
    from pathlib import Path

    from ..planner import series_in_store
    from ..rules import explain, series_in_folder
    if Path(args.target).exists():
        found, problems = series_in_folder(Path(args.target))
    else:
        from ..startup import open_store
        store = open_store(settings)
        with store.read_session() as session:  # the facts recorded at ingest, as planning sees them
            in_store = series_in_store(session, args.target)
        store.dispose()
        if in_store is None:
            return _fail(f"{args.target} is neither a path nor a received study's UID")
        found, problems = in_store
    for problem in problems:  # named, and the other files still tested
        out.print(f"[yellow]skipped[/] {problem}")
    if not found:
        return _fail(f"no readable DICOM series in {args.target}")
    if not settings.rules:
        out.print("no rules are configured ([[rules]] in the configuration)")
    for facts in found:
        out.print(f"[bold]series[/] {facts.series_uid}: {facts.modality}, {facts.series_description!r}, "
                  f"{facts.slices} images of {facts.rows}x{facts.columns}")
        matched = False
        for rule in sorted(settings.rules, key=lambda r: -r.priority):
            why = explain(rule, facts)
            matched = matched or not why
            if why:
                out.print(f"  [red]no[/]    {rule.name}: {'; '.join(why)}")
            else:
                out.print(f"  [green]match[/] {rule.name} (priority {rule.priority}): models "
                          f"{', '.join(rule.models)} -> {', '.join(rule.destinations) or 'no destination'}")
        if not matched:
            out.print("  no rule matched: nothing will run on this series")
    return 0


def _demo(settings: Settings, args) -> int:
    from ..tools.demo import run_demo, send_only
    console = Console(highlight=False, soft_wrap=True)  # paths and UIDs stay whole, to copy and paste
    if args.send_only:
        return send_only(args.send_only, args.calling_ae or settings.dicom.ae_title, console)
    from ..serve import serve
    from ..store import make_engine, upgrade
    engine = make_engine(settings.database.url)
    try:
        upgrade(engine)  # the demo starts from nothing
    finally:
        engine.dispose()
    calling_ae = args.calling_ae or "DEMO"
    serve(settings, on_ready=lambda stopping: run_demo(settings, console, stopping, calling_ae))
    return 0


def _echo(settings: Settings, args) -> int:
    from ..senders import SendError
    from ..senders.dicom import DicomClient, DicomDestination

    verification = "1.2.840.10008.1.1"  # the Verification SOP Class
    destination = settings.destinations.get(args.target)
    match = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", args.target)
    if isinstance(destination, DicomDestination):  # as the dispatcher calls it, TLS included
        client = DicomClient.of(destination, settings.dicom.ae_title)
        client.timeout = args.timeout or destination.timeout
    elif match:
        client = DicomClient(match.group(1), match.group(2), int(match.group(3)),
                             calling_ae=settings.dicom.ae_title, timeout=args.timeout or 10)
    else:
        dicom = ", ".join(n for n, d in settings.destinations.items() if isinstance(d, DicomDestination))
        return _fail(f"{args.target!r} is neither AET@HOST:PORT (e.g. ORTHANC@pacs.local:4242) nor a "
                     f"configured DICOM destination ({dicom or 'none configured'})", 2)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # we say what went wrong
    start = time.monotonic()
    try:
        with client.association([(verification, None)]) as assoc:
            status = assoc.send_c_echo()
    except SendError as exc:
        return _fail(str(exc))
    ms = (time.monotonic() - start) * 1000
    if status and status.Status == 0:
        out.print(f"C-ECHO {settings.dicom.ae_title} -> {client.where}: success ({ms:.0f} ms)")
        return 0
    return _fail(f"C-ECHO to {client.where} failed: "
                 f"{'no response' if not status else f'status 0x{status.Status:04X}'}")


if __name__ == "__main__":
    sys.exit(main())
