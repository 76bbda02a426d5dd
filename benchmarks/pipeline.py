"""End-to-end latency of the main job, and its overhead over pure ONNX Runtime.

A 20-slice phantom cardiac MR study is sent by DCMTK's storescu to `machaon serve`
(SQLite, one worker, lv-segmentation) whose rule delivers to a real Orthanc by
C-STORE. Measured per study, from the moment the last image was acknowledged
to the moment Orthanc holds both the SEG and the SR, minus the quiet period
that completion waits for by design:

- detection: from the end of the quiet period to the study's completion;
- queue wait: from completion to the job starting (planning included);
- load and decode, prepare, inference, encode results, write results: the job's
  own stages, from its job.succeeded event;
- sending: from the job's end to the last result acknowledged by Orthanc.

The overhead ratio is the job's whole time over pure ONNX Runtime time for the
same slices (the same model_input, the same batch size, in this process).

    .venv/bin/machaon models build lv-segmentation
    .venv/bin/python benchmarks/pipeline.py [--rounds 3] [--slices 20]

Writes benchmarks/out/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import Orthanc, Server, run_machaon, storescu  # noqa: E402

QUIET = 1.0
RULE = '''
[[rules]]
name = "lv"
models = ["lv-segmentation"]
destinations = ["pacs"]
match = {{ modality = ["MR"], series_description = "sax" }}
[destinations.pacs]
type = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
'''


def at(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def pure_onnxruntime(models: Path, files: list[Path], batch: int, repeats: int = 5) -> float:
    """Seconds ONNX Runtime alone takes for the study's slices (median of repeats)."""
    import numpy as np
    from machaon.inference import RuntimeOptions, Sessions
    from machaon.manifest import Package
    from machaon.preprocess import model_input, read_series

    package = Package(models / "lv-segmentation")
    model = Sessions(RuntimeOptions(providers=("cpu",))).get(package)
    x = model_input(read_series(files), package.manifest.input)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        np.concatenate([model.run(x[i:i + batch]) for i in range(0, len(x), batch)])
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def one_study(server: Server, orthanc: Orthanc, workdir: Path, seed: int, slices: int) -> dict:
    from machaon import phantom

    study = phantom.write_study(workdir / f"study{seed}", seed=seed, views=False, slices=slices)
    sent = storescu(server.port, *study.sax_files)
    acked = time.time()
    assert sent.returncode == 0, sent.stderr
    while True:
        found = []
        if _has(orthanc, study.study_uid):
            found = orthanc.get(f"/dicom-web/studies/{study.study_uid}/series")
        if len(found) == 2:
            arrived = time.time()
            break
        if time.time() - acked > 120:
            raise SystemExit(f"no results in Orthanc after 120 s:\n{server.log()[-3000:]}")
        time.sleep(0.02)
    shown = server.study(study.study_uid)
    events = {e["action"]: e for e in shown["events"]}
    [job] = shown["jobs"]
    stages = events["job.succeeded"]["detail"]["seconds"]
    completed = at(events["study.completed"]["at"])
    return {
        "files": [str(p) for p in study.sax_files],
        "total_minus_quiet": arrived - acked - QUIET,
        "detection": completed - (acked + QUIET),
        "queue_wait": at(job["started_at"]) - completed,
        **stages,
        "sending": arrived - at(job["finished_at"]),
        "job": at(job["finished_at"]) - at(job["started_at"]),
    }


def _has(orthanc: Orthanc, study_uid: str) -> bool:
    return bool(orthanc.get(f"/dicom-web/studies?StudyInstanceUID={study_uid}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--models", default="build/models")
    args = parser.parse_args()
    models = Path(args.models).resolve()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        orthanc = Orthanc(work / "orthanc").start()
        (work / "server").mkdir()
        db = f"sqlite:///{work}/server/machaon.db"
        run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": db}, check=True)
        server = Server(work / "server", db, {
            "models": {"path": str(models)},
            "completion": {"complete_after": QUIET, "check_every": 0.25},
            "dispatch": {"check_every": 0.25}, "worker": {"batch_size": 8},
        }, RULE.format(port=orthanc.dicom_port))
        server.start()
        try:
            one_study(server, orthanc, work, seed=999, slices=args.slices)  # warm-up: the session is created
            rounds = [one_study(server, orthanc, work, seed=1000 + r, slices=args.slices)
                      for r in range(args.rounds)]
        finally:
            server.stop()
            orthanc.stop()
        ort = pure_onnxruntime(models, [Path(p) for p in rounds[-1]["files"]], batch=8)
    keys = ["total_minus_quiet", "detection", "queue_wait", "load_model", "read_and_decode", "prepare",
            "inference", "encode_results", "write_results", "sending", "job"]
    medians = {k: statistics.median(r[k] for r in rounds) for k in keys}
    medians["pure_onnxruntime"] = ort
    medians["outside_inference"] = medians["total_minus_quiet"] - medians["inference"]
    medians["overhead_ratio"] = medians["job"] / ort
    for k, v in medians.items():
        print(f"{k:<20} {v:8.3f}{'' if k == 'overhead_ratio' else ' s'}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "pipeline.json").write_text(json.dumps({"medians": medians, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
