"""Real-world input never stalls the pipeline: a folder of real and deliberately damaged files
(tests/corpus.py), sent by storescu and pushed by Orthanc with a good cardiac study among them.
Every file is acknowledged or refused with a reason, every job ends with a reason an operator
can act on, the good study's SEG and SR reach the PACS, and the server log holds no traceback.

All problems are gathered and reported together: one damaged file should not hide the next."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from machaon.tools import phantom

from tests.corpus import ORTHANC, STORESCU, CorpusFile, build_corpus
from tests.harness import Orthanc, acknowledged, storescu

# lv-segmentation on short-axis stacks from anyone; for what the corpus senders send besides,
# lv-segmentation on other MR images and the chest model on every image, so that most corpus
# files get a job (most of those fail, and must say why). The good study's long-axis views,
# sent as MRI1, match no rule. `^(?!.*sax)` is "a description without sax".
RULES = '''
[[rules]]
name = "sax"
models = ["lv-segmentation"]
destinations = ["pacs"]
priority = 10
match = {{ modality = ["MR"], series_description = "sax", min_slices = 3 }}

[[rules]]
name = "other-mr"
models = ["lv-segmentation"]
destinations = ["pacs"]
match = {{ modality = ["MR"], series_description = "^(?!.*sax)", min_size = 1, calling_aet = ["CORPUS", "ORTHANC"] }}

[[rules]]
name = "any-image"
models = ["cxr-findings"]
destinations = ["pacs"]
match = {{ series_description = "^(?!.*sax)", min_size = 1, calling_aet = ["CORPUS", "ORTHANC"] }}

[destinations.pacs]
type = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
timeout = 5
'''

# storescu proposes uncompressed transfer syntaxes unless told otherwise, and cannot decode
# to them: each file goes in an association proposing its own (as a modality would send it).
STORESCU_OPTION = {
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.102": "-xn",
}
STANDARD_STORAGE = "1.2.840.10008.5.1.4.1.1."  # every storage SOP class, retired ones included
PLANNED = {"jobs.planned", "study.no_rule_matched", "study.planning_failed"}
COMPLETED = {"study.completed", "study.force_completed"}


@dataclass(frozen=True)
class Answer:
    """What became of one file: "stored", "refused" (with the reason its sender reports), "not sent"
    (the sender would not send it: not machaon's doing) or "no answer"."""

    outcome: str
    detail: str = ""


def test_real_and_damaged_files_never_stall_the_pipeline(serve, built_models, orthanc, tmp_path):
    started = time.monotonic()
    corpus = build_corpus(tmp_path / "corpus")
    good = phantom.write_study(tmp_path / "good", seed=950)
    good_files = [*good.sax_files, *good.view_files.values()]
    orthanc.start()
    server = serve(models={"path": str(built_models)}, extra=RULES.format(port=orthanc.dicom_port),
                   dispatch={"check_every": 0.5, "retry_initial": 1, "retry_max": 4})
    # The same Orthanc pushes corpus files to machaon and is the PACS its results go to.
    _orthanc(orthanc, "PUT", "/modalities/machaon", {"AET": "MACHAON", "Host": "127.0.0.1", "Port": server.port})

    groups = _storescu_groups([f for f in corpus if f.via == STORESCU])
    answers: dict[Path, Answer] = {}
    for group in groups[: len(groups) // 2]:
        answers |= send_by_storescu(server.port, group)
    good_sent = storescu(server.port, *good_files, aet="MRI1")  # the good study, amid the corpus
    for group in groups[len(groups) // 2:]:
        answers |= send_by_storescu(server.port, group)
    answers |= push_from_orthanc(orthanc, [f for f in corpus if f.via == ORTHANC])

    studies = settle(server, timeout=100)
    problems = [
        *answer_problems(corpus, answers),
        *([f"the good study: {acknowledged(good_sent.stderr)} of its {len(good_files)} files acknowledged"]
          if acknowledged(good_sent.stderr) != len(good_files) else []),
        *study_problems(studies, corpus, answers),
        *expectation_problems(studies, corpus),
        *good_study_problems(studies.get(good.study_uid), orthanc, good.study_uid),
        *log_problems(server.log()),
    ]
    print(report(corpus, answers, studies, good.study_uid, time.monotonic() - started))
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(f"- {p}" for p in problems)


# --- sending ----------------------------------------------------------------------------------------

def _storescu_groups(files: list[CorpusFile]) -> list[list[CorpusFile]]:
    """The files by the storescu option their transfer syntax needs, in corpus order."""
    groups: dict[str, list[CorpusFile]] = {}
    for f in files:
        groups.setdefault(STORESCU_OPTION.get(f.transfer_syntax or "", ""), []).append(f)
    return list(groups.values())


def send_by_storescu(port: int, files: list[CorpusFile]) -> dict[Path, Answer]:
    """One association for the files: -R proposes exactly their SOP classes (SEG and 3D SR need
    it), -nh goes on after a refusal, -d prints each response's Error Comment."""
    option = STORESCU_OPTION.get(files[0].transfer_syntax or "")
    sent = storescu(port, *(f.path for f in files), aet="CORPUS",
                    extra=("-d", "-nh", "-R", *([option] if option else [])))
    return storescu_answers(sent.stdout + sent.stderr, [f.path for f in files])


def storescu_answers(output: str, paths: list[Path]) -> dict[Path, Answer]:
    blocks = dict(re.findall(r"^I: Sending file: (\S+)\n(.*?)(?=^I: Sending file: |\Z)", output, re.M | re.S))
    answers = {}
    for path in paths:
        ignored = re.search(rf"^\w: (.*){re.escape(str(path))}.*ignoring file", output, re.M)
        if ignored:
            answers[path] = Answer("not sent", f"storescu: {ignored.group(1).strip(' :')}")
        elif str(path) in blocks:
            answers[path] = _storescu_answer(blocks[str(path)])
        else:  # never reached: the association was refused or broke off before it
            failure = re.findall(r"^[EF]: (.*)$", output, re.M)
            answers[path] = Answer("no answer", "; ".join(failure) or "storescu said nothing about it")
    return answers


def _storescu_answer(block: str) -> Answer:
    status = re.search(r"DIMSE Status\s*: (0x[0-9a-f]{4}): (.*)", block)
    comment = re.search(r"\(0000,0902\) LO \[(.*?)\]", block)
    if status and _stored(int(status.group(1), 16)):
        return Answer("stored", status.group(2))
    if status:
        return Answer("refused", f"{status.group(1)} {status.group(2)}: {comment.group(1) if comment else ''}")
    context = re.search(r"No presentation context for: (.*)", block)
    if context:
        return Answer("refused", f"not accepted at association negotiation: {context.group(1)}")
    failed = re.findall(r"^[EW]: (.*)$", block, re.M)
    if any("unable to convert" in line for line in failed):  # storescu cannot decode this file
        return Answer("not sent", "storescu: " + "; ".join(failed))
    return Answer("no answer", "; ".join(failed) or block[-300:])


def _stored(status: int) -> bool:
    """Success, or one of the warnings (PS3.4 B.2.3): the instance was kept."""
    return status == 0 or status & 0xF000 == 0xB000 or status in (0x0107, 0x0116)


def push_from_orthanc(orthanc: Orthanc, files: list[CorpusFile]) -> dict[Path, Answer]:
    """Each file uploaded to Orthanc, then sent by Orthanc to machaon on its own, so that
    every file gets its own answer."""
    answers = {}
    for f in files:
        try:
            uploaded = _orthanc(orthanc, "POST", "/instances", f.path.read_bytes())
        except urllib.error.HTTPError as exc:
            answers[f.path] = Answer("not sent", f"Orthanc would not take it: {_error(exc)}")
            continue
        try:
            _orthanc(orthanc, "POST", "/modalities/machaon/store",
                     {"Resources": [uploaded["ID"]], "Synchronous": True, "Timeout": 60})
            answers[f.path] = Answer("stored", "Orthanc's C-STORE succeeded")
        except urllib.error.HTTPError as exc:
            answers[f.path] = Answer("refused", f"Orthanc's C-STORE: {_error(exc)}")
    return answers


def _orthanc(orthanc: Orthanc, method: str, path: str, body) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{orthanc.url}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=90) as response:
        text = response.read()
    return json.loads(text) if text.strip() else {}


def _error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return f"{body.get('Message')}: {body.get('Details', '')}".strip(": ")
    except ValueError:
        return str(exc)


# --- waiting --------------------------------------------------------------------------------------------

# `machaon studies show` costs a second of start-up per call; one process calls the same CLI
# for every study at once.
SNAPSHOT = """
import contextlib, io, json, sys
from machaon.cli import main

def run(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([*args, "--json", "--config", sys.argv[1]])
    return json.loads(out.getvalue())

print(json.dumps([run("studies", "show", s["study_uid"]) for s in run("studies", "list")]))
"""


def snapshot(server) -> dict[str, dict]:
    """`machaon studies show --json` of every study `machaon studies list` knows."""
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT, str(server.config)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {s["study_uid"]: s for s in json.loads(proc.stdout)}


def settled(study: dict) -> bool:
    """Complete, planned since its last completion, no job waiting or running, and every
    result either sent or tried at least once."""
    actions = [e["action"] for e in study["events"]]
    completions = [i for i, a in enumerate(actions) if a in COMPLETED]
    return (study["status"] == "complete" and bool(completions)
            and any(a in PLANNED for a in actions[completions[-1]:])
            and not any(j["status"] in ("queued", "running") for j in study["jobs"])
            and all(d["status"] == "sent" or d["attempts"]
                    for j in study["jobs"] for r in j["results"] for d in r["deliveries"]))


def settle(server, timeout: float) -> dict[str, dict]:
    """Every study once all of them have settled, or as they are when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        studies = snapshot(server)
        if studies and all(settled(s) for s in studies.values()) or time.monotonic() > deadline:
            return studies
        time.sleep(1)


# --- judging --------------------------------------------------------------------------------------------

def answer_problems(corpus: list[CorpusFile], answers: dict[Path, Answer]) -> list[str]:
    problems = []
    for f in corpus:
        answer = answers.get(f.path, Answer("no answer"))
        name = f"{f.kind} ({f.path.name}, by {f.via})"
        if answer.outcome == "no answer":
            problems.append(f"{name}: neither acknowledged nor refused: {answer.detail}")
        elif answer.outcome == "refused" and not answer.detail.split(":", 1)[-1].strip():
            problems.append(f"{name}: refused without a reason ({answer.detail})")
        elif "negotiation" in answer.detail and (f.sop_class_uid or "").startswith(STANDARD_STORAGE):
            problems.append(f"{name}: a standard storage SOP class refused: {answer.detail}")
    return problems


def study_problems(studies: dict[str, dict], corpus: list[CorpusFile], answers: dict[Path, Answer]) -> list[str]:
    problems = []
    kinds = _kinds(corpus)
    for f in corpus:
        if answers.get(f.path, Answer("")).outcome == "stored" and f.study_uid not in studies:
            problems.append(f"{f.kind} ({f.path.name}): acknowledged, but its study is not listed")
    for uid, study in studies.items():
        what = kinds.get(uid, f"study {uid}")
        if not settled(study):
            jobs = ", ".join(f"{j['model']} {j['status']}" for j in study["jobs"]) or "no jobs"
            problems.append(f"{what}: not settled after the wait ({study['status']}; {jobs})")
        for event in study["events"]:
            error = str(event["detail"].get("error", ""))
            if event["action"] == "study.planning_failed" and error.lower().startswith("internal error"):
                problems.append(f"{what}: planning failed: {error}")
        for job in study["jobs"]:
            problems += _job_problems(what, job)
    return problems


def expectation_problems(studies: dict[str, dict], corpus: list[CorpusFile]) -> list[str]:
    """Where the issue says what becomes of a study (its files' `expect`), its jobs did that."""
    expected = {f.study_uid: (f.kind, f.expect) for f in corpus if f.expect}
    problems = []
    for uid, (kind, expect) in expected.items():
        status, _, error_start = expect.partition(": ")
        jobs = [j for j in studies.get(uid, {}).get("jobs", []) if j["status"] != "superseded"]
        if not jobs:
            problems.append(f"{kind}: expected a job that {status}, got none")
        for job in jobs:
            if (job["error"] or "").lower().startswith("internal error"):
                continue  # reported as such already
            error = re.sub(r"^instance \S+:? ", "", job["error"] or "")  # the reason, after the UID
            if job["status"] != status or not error.startswith(error_start):
                problems.append(f"{kind}: {job['model']} job expected to be {expect}, "
                                f"was {job['status']}" + (f": {job['error']}" if job["error"] else ""))
    return problems


def _job_problems(what: str, job: dict) -> list[str]:
    name = f"{what}: {job['model']} job ({job['rule']})"
    if job["status"] not in ("succeeded", "failed", "superseded", "queued", "running"):
        return [f"{name}: status {job['status']}"]
    if job["status"] == "failed" and not (job["error"] or "").strip():
        return [f"{name}: failed without a reason"]
    if job["status"] == "failed" and job["error"].lower().startswith("internal error"):
        return [f"{name}: {job['error']}"]
    return [f"{name}: {r['kind']} not accepted by {d['destination']}: {d['last_error']}"
            for r in job["results"] for d in r["deliveries"] if d["status"] != "sent" and d["attempts"]]


def good_study_problems(study: dict | None, orthanc: Orthanc, study_uid: str) -> list[str]:
    if study is None:
        return ["the good study never arrived"]
    problems = [f"the good study: {j['model']} job {j['status']}: {j['error']}"
                for j in study["jobs"] if j["status"] != "succeeded"]
    if not any(j["status"] == "succeeded" and j["model"] == "lv-segmentation" for j in study["jobs"]):
        problems.append("the good study: no lv-segmentation job succeeded")
    try:
        series = orthanc.get(f"/dicom-web/studies/{study_uid}/series")
    except urllib.error.HTTPError as exc:  # 404: nothing of the study in the PACS
        series = []
        problems.append(f"the good study: not in the PACS ({exc})")
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    if modalities != ["SEG", "SR"]:
        problems.append(f"the good study: the PACS holds {modalities}, not its SEG and SR")
    return problems


def log_problems(log: str) -> list[str]:
    """Each log record that carries a traceback, by its first line and the exception it ends
    with (a chained traceback is one record)."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)
    problems = []
    for record in records:
        if "Traceback" not in record:
            continue
        lines = record.splitlines()
        raised = [line for line in lines[1:] if line and not line.startswith(
            (" ", "Traceback", "During handling", "The above exception"))]
        frames = re.findall(r'File "(.+?)", line (\d+), in (\S+)', record)
        ours = [f for f in frames if "site-packages" not in f[0]] or frames  # machaon's last frame
        where = " at {}:{} in {}".format(Path(ours[-1][0]).name, *ours[-1][1:]) if ours else ""
        problems.append(f"traceback in the server log: {raised[-1] if raised else '?'}{where}  "
                        f"(logged as: {lines[0][:160]})")
    return problems


# --- reporting ------------------------------------------------------------------------------------------

def _kinds(corpus: list[CorpusFile]) -> dict[str, str]:
    """Each study's description: the kinds of the corpus files in it."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for f in corpus:
        if f.study_uid and f.kind not in kinds[f.study_uid]:
            kinds[f.study_uid].append(f.kind)
    return {uid: " + ".join(k) for uid, k in kinds.items()}


def report(corpus, answers, studies, good_uid: str, seconds: float) -> str:
    """What became of every file and study: printed, for the reader of a failed run."""
    lines = [f"corpus of {len(corpus)} files, {len(studies)} studies, {seconds:.0f} s", "", "files:"]
    for f in corpus:
        answer = answers.get(f.path, Answer("no answer"))
        lines.append(f"  {answer.outcome:9} {f.via:8} {f.kind}: {answer.detail}"[:300])
    lines += ["", "studies:"]
    kinds = _kinds(corpus) | {good_uid: "the good phantom study"}
    for uid, study in studies.items():
        jobs = "; ".join(f"{j['model']} {j['status']}" + (f" ({j['error']})" if j["error"] else "")
                         + "".join(f" {r['kind']}:{d['status']}" for r in j["results"] for d in r["deliveries"])
                         for j in study["jobs"])
        planning = [str(e["detail"].get("error")) for e in study["events"] if e["action"] == "study.planning_failed"]
        lines.append(f"  {kinds.get(uid, uid)}: {jobs or 'no jobs'}"
                     + (f" [planning failed: {'; '.join(planning)}]" if planning else ""))
    return "\n".join(lines)
