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
- sending: from the job's end to the last result acknowledged by Orthanc; beside
  it, DCMTK's storescu sending the same two files to the same Orthanc (the peer).

The overhead ratio is the job's whole time over pure ONNX Runtime time for the
same slices (the same model_input, the same batch size, in this process),
measured right after each study so that both see the machine in the same state;
the figures are medians over the rounds.

    .venv/bin/machaon models build lv-segmentation
    .venv/bin/python -m benchmarks.pipeline [--rounds 3] [--slices 20]

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

from tests.harness import Orthanc, Server, run_machaon, storescu

HERE = Path(__file__).resolve().parent

QUIET = 1.0
BATCH = 8
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


class PureOnnxRuntime:
    """The peer: ONNX Runtime alone on a study's slices, in this process, with the session options
    the service uses (the same model_input, the same batch size)."""

    def __init__(self, models: Path, batch: int):
        from machaon.inference import OrtSessions, RuntimeOptions
        from machaon.manifest import Package

        self.package = Package(models / "lv-segmentation")
        self.model = OrtSessions(RuntimeOptions(providers=("cpu",))).get(self.package)
        self.batch = batch

    def seconds(self, files: list[Path], repeats: int = 3) -> float:
        """Median of `repeats` runs after one warm-up run."""
        import numpy as np
        from machaon.preprocess import model_input, read_series

        x = model_input(read_series(files), self.package.manifest.input)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            np.concatenate([self.model.run(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])


def shown(store, study_uid: str) -> dict | None:
    from machaon.operations import NotFound, show_study

    with store.read_session() as session:
        try:
            return show_study(session, study_uid)
        except NotFound:
            return None


def one_study(server: Server, store, orthanc: Orthanc, peer: PureOnnxRuntime, workdir: Path, seed: int,
              slices: int) -> dict:
    from machaon.tools import phantom

    study = phantom.write_study(workdir / f"study{seed}", seed=seed, views=False, slices=slices)
    sent = storescu(server.port, *study.sax_files)
    acked = time.time()
    assert sent.returncode == 0, sent.stderr
    while True:  # polled gently, in this process: a busy poll would take CPU from the job it measures
        study_now = shown(store, study.study_uid)
        sends = [e for e in study_now["events"] if e["action"] == "result.sent"] if study_now else []
        if len(sends) == 2:
            break
        if time.time() - acked > 120:
            raise SystemExit(f"no results in Orthanc after 120 s:\n{server.log()[-3000:]}")
        time.sleep(0.5)
    # Orthanc acknowledged each result at the moment its result.sent event was recorded.
    arrived = max(at(e["at"]) for e in sends)
    assert len(orthanc.get(f"/dicom-web/studies/{study.study_uid}/series")) == 2
    events = {e["action"]: e for e in study_now["events"]}
    [job] = study_now["jobs"]
    stages = events["job.succeeded"]["detail"]["seconds"]
    completed = at(events["study.completed"]["at"])
    # Measured right after the job, while the service sits idle: the peers see the same machine.
    pure = peer.seconds(study.sax_files)
    job_seconds = at(job["finished_at"]) - at(job["started_at"])
    results = sorted(server.spool.glob(f"results/{study.study_uid}/*/*.dcm"))
    started = time.perf_counter()
    resent = storescu(orthanc.dicom_port, *results, aet="MACHAON", aec="ORTHANC", extra=("-R",))
    storescu_sending = time.perf_counter() - started
    assert resent.returncode == 0 and len(results) == 2, resent.stderr
    return {
        "total_minus_quiet": arrived - acked - QUIET,
        "detection": completed - (acked + QUIET),
        "queue_wait": at(job["started_at"]) - completed,
        **stages,
        "sending": arrived - at(job["finished_at"]),
        "storescu_sending": storescu_sending,
        "job": job_seconds,
        "pure_onnxruntime": pure,
        "overhead_ratio": job_seconds / pure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--models", default="build/models")
    args = parser.parse_args()
    models = Path(args.models).resolve()
    from machaon.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        orthanc = Orthanc(work / "orthanc").start()
        (work / "server").mkdir()
        db = f"sqlite:///{work}/server/machaon.db"
        run_machaon("db", "upgrade", env={"MACHAON_DATABASE_URL": db}, check=True)
        server = Server(work / "server", db, {
            "models": {"path": str(models)},
            "completion": {"complete_after": QUIET, "check_every": 1},  # the embedded default
            "worker": {"batch_size": BATCH},
        }, RULE.format(port=orthanc.dicom_port))
        server.start()
        store = Store(db)
        peer = PureOnnxRuntime(models, batch=BATCH)
        try:
            # The first study is a warm-up: the service creates its session then.
            rounds = [one_study(server, store, orthanc, peer, work, seed=999 + r, slices=args.slices)
                      for r in range(args.rounds + 1)][1:]
        finally:
            store.dispose()
            server.stop()
            orthanc.stop()
    for r in rounds:
        r["outside_inference"] = r["total_minus_quiet"] - r["inference"]
    keys = ["total_minus_quiet", "detection", "queue_wait", "load_model", "read_and_decode", "prepare",
            "inference", "encode_results", "write_results", "sending", "storescu_sending",
            "outside_inference", "job", "pure_onnxruntime", "overhead_ratio"]
    medians = {k: statistics.median(r[k] for r in rounds) for k in keys}
    for k, v in medians.items():
        print(f"{k:<20} {v:8.3f}{'' if k == 'overhead_ratio' else ' s'}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "pipeline.json").write_text(json.dumps({"medians": medians, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
