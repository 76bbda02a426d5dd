"""What the commands print: tables keep one line per row at 80 columns (UIDs shortened to
their end, `--wide` prints them whole), and progress is plain lines when not on a terminal."""

from __future__ import annotations

import io
import json

import pytest
from machaon.completion import complete_quiet_studies
from machaon.display import Column, print_table, progress, short_uid, step
from machaon.planner import plan_jobs
from machaon.rules import Match, Rule
from machaon.store import Job, ReceivedInstance, Store, Study, record_instance
from pydicom.uid import generate_uid
from rich.console import Console
from sqlalchemy import select, update

from tests.harness import run_machaon
from tests.test_packages import make_package

NARROW = {"COLUMNS": "80"}


def test_short_uid_keeps_the_end():
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    assert short_uid(uid) == "…" + uid[-19:] and len(short_uid(uid)) == 20
    assert short_uid(uid, width=10) == "…234567890"
    assert short_uid("1.2.3") == "1.2.3"


@pytest.fixture
def received(tmp_path):
    """A job store holding three MR studies with long UIDs, patient IDs and descriptions, each
    completed and planned; the first study's jobs failed with a long error."""
    url = f"sqlite:///{tmp_path}/machaon.db"
    run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": url}, check=True)
    store = Store(url)
    studies = [generate_uid() for _ in range(3)]
    for n, study in enumerate(studies):
        for series_number in (1, 2):
            series = generate_uid()
            with store.engine.begin() as conn:
                for _ in range(3):
                    record_instance(conn, ReceivedInstance(
                        study_uid=study, series_uid=series, sop_instance_uid=generate_uid(),
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path="unused.dcm", size_bytes=1, calling_ae="MRI1", patient_id=f"PATIENT-WITH-A-LONG-ID-{n}",
                        study_date="20261122", modality="MR", series_number=series_number,
                        series_description="SAX cine, retrospectively gated, with a long description"),
                        actor="dicom:MRI1")
    with store.session.begin() as session:
        complete_quiet_studies(session, 0, 3600)
    rule = Rule(name="a-rule-with-a-rather-long-name", models=["lv-segmentation"], destinations=["pacs"],
                match=Match(modality=["MR"]))
    plan_jobs(store, [rule])
    with store.session.begin() as session:
        first = select(Study.id).where(Study.study_uid == studies[0]).scalar_subquery()
        session.execute(update(Job).where(Job.study_id == first).values(status="failed",
                                                                         error="preprocessing: " + "x" * 200))
    store.dispose()
    return {"MACHAON_DATABASE_URL": url}, studies


def _tables(output: str) -> dict[str, list[str]]:
    """The output's blocks of lines between blank lines, by their first word."""
    return {block.split()[0]: block.splitlines() for block in output.split("\n\n") if block.strip()}


def test_studies_list_keeps_one_line_per_study_at_80_columns(received):
    env, studies = received
    done = run_machaon("studies", "list", env=env | NARROW, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + len(studies), done.stdout  # a header, then one line per study
    assert all(len(line) <= 80 for line in lines), done.stdout
    assert {line.split()[0] for line in lines[1:]} == {short_uid(uid) for uid in studies}

    wide = run_machaon("studies", "list", "--wide", env=env | NARROW, check=True).stdout.splitlines()
    assert len(wide) == 1 + len(studies) and {line.split()[0] for line in wide[1:]} == set(studies)
    assert "Series" in wide[0] and "PATIENT-WITH-A-LONG-ID-0" in "".join(wide)
    listed = json.loads(run_machaon("studies", "list", "--json", env=env | NARROW, check=True).stdout)
    assert {s["study_uid"] for s in listed} == set(studies)  # --json stays whole


def test_studies_show_keeps_one_line_per_row_at_80_columns(received):
    env, studies = received
    shown = json.loads(run_machaon("studies", "show", studies[0], "--json", env=env, check=True).stdout)
    done = run_machaon("studies", "show", studies[0], env=env | NARROW, check=True)
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
    tables = _tables(done.stdout)
    series, jobs, events = tables["Series"], tables["Job"], tables["When"]
    assert len(series) == 1 + len(shown["series"]) and len(jobs) == 1 + len(shown["jobs"])
    assert len(events) == 1 + len(shown["events"]), done.stdout
    assert " lv-segmentation " in jobs[1]  # model names are never cut
    assert studies[0] in done.stdout.splitlines()[0]  # the study's own UID whole, to copy
    errors = "".join(f"job {j['id']}: {j['error']}" for j in shown["jobs"])
    assert "".join(tables["job"]).replace(" ", "") == errors.replace(" ", "")  # whole, if wrapped

    # The shortened UID the tables show names the study; --wide prints every value whole.
    again = run_machaon("studies", "show", short_uid(studies[0]), "--wide", env=env | NARROW, check=True)
    tables = _tables(again.stdout)
    series, jobs = tables["Series"], tables["Job"]
    assert {line.split()[0] for line in series[1:]} == {s["series_uid"] for s in shown["series"]}
    assert shown["jobs"][0]["error"] in jobs[1]


def test_models_list_keeps_one_line_per_model_at_80_columns(tmp_path):
    make_package(tmp_path / "models" / "tiny-views")
    make_package(tmp_path / "models" / "a-model-with-a-long-name", name="a-model-with-a-long-name",
                 demo="random-weights")
    env = {"MACHAON_MODELS_PATH": str(tmp_path / "models")}
    lines = run_machaon("models", "list", env=env | NARROW, check=True).stdout.splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith("a-model-with-a-long-name ") and "random weights" in lines[1]
    wide = run_machaon("models", "list", "--wide", env=env | NARROW, check=True).stdout.splitlines()
    assert len(wide) == 3 and "Parity" in wide[0]


def test_a_narrow_table_cuts_long_text_then_leaves_out_optional_columns():
    columns = [Column("Name"), Column("Note", cut=True), Column("Extra", optional=True)]
    rows = [["alpha", "a long note " * 5, "x"], ["beta", "short", "y"]]
    for width, extra in ((40, True), (30, False)):
        console = Console(file=io.StringIO(), width=width)
        assert print_table(console, columns, rows) is True  # something was cut to fit
        lines = console.file.getvalue().splitlines()
        assert len(lines) == 3 and all(len(line) <= width for line in lines)
        assert ("Extra" in lines[0]) == extra and "a long note a long no" in lines[1] and "…" in lines[1]
    console = Console(file=io.StringIO(), width=40)
    assert print_table(console, columns, rows, wide=True) is False
    assert "a long note " * 5 in console.file.getvalue()


def test_steps_and_progress_are_plain_lines_off_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=80)  # not a terminal: a log file, a pipe
    with step(console, "converting"):
        pass
    with pytest.raises(RuntimeError), step(console, "checking"):
        raise RuntimeError
    with progress(console, "sending", total=3) as count:
        for _ in range(3):
            count.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "converting..." and lines[1].startswith("converting: done in ")
    assert lines[2] == "checking..." and lines[3].startswith("checking: failed after ")
    assert lines[4] == "sending: 3 to do..." and lines[5].startswith("sending: 3 of 3 done in ")
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()  # no spinner frames
