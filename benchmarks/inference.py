"""Inference throughput: ONNX Runtime as machaon runs it, against the same model in TensorFlow/Keras.

For lv-segmentation (256x256) and cxr-findings (320x320), at batch 1 and 8:
ONNX Runtime on the built fp32, fp16 and int8 packages, against the source
Keras model served by `model.predict` (as the original work served it) and by
a `tf.function`. Every runner is its own long-lived process (TensorFlow in the
same process slows ONNX Runtime down); they take turns, round after round, so
a noisy machine hurts them alike.

    .venv/bin/machaon models build lv-segmentation cxr-findings
    .venv/bin/python -m benchmarks.inference [--rounds 3] [--seconds 2] [--providers cpu]
        [--no-tensorflow]   # e.g. on a GPU machine, to time only ONNX Runtime's providers

Prints images/s and each runner's ratio to model.predict, with the variants'
accuracy against fp32 from their manifests; writes benchmarks/out/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = ("lv-segmentation", "cxr-findings")
BATCHES = (1, 8)


class Runner:
    def __init__(self, label: str, command: list[str]):
        self.label = label
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO)
        self.providers = self._answer()["providers"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: the runner exited ({self.proc.wait()})")
        return json.loads(line)

    def images_per_second(self, batch: int, seconds: float) -> float:
        self.proc.stdin.write(f"{batch} {seconds}\n")
        self.proc.stdin.flush()
        return batch / statistics.median(self._answer()["per_call"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def keras_source(name: str, keras_python: Path, workdir: Path) -> Path:
    """The model's source Keras file: committed, or made by its recipe (same seed as the build)."""
    from machaon.manifest import read_manifest

    folder = REPO / "models" / name
    manifest = read_manifest(folder / "manifest.toml")
    if not manifest.source.recipe:
        return folder / manifest.source.file
    made = workdir / manifest.source.file
    rows, columns = manifest.input.size
    recipe = folder / manifest.source.recipe
    command = [keras_python, recipe, made, rows, columns, manifest.input.channels]
    subprocess.run(list(map(str, command)), check=True, capture_output=True)
    return made


def runners_for(name: str, args, workdir: Path) -> list[Runner]:
    from machaon.manifest import Package

    package = Package(Path(args.models) / name)
    worker = ["-m", "benchmarks.inference_worker"]
    precisions = ("fp32", *[v.precision for v in package.manifest.variants])
    runners = [Runner(f"onnxruntime {p}", [sys.executable, *worker, "ort", str(package.folder), p,
                                           "--providers", args.providers]) for p in precisions]
    if not args.no_tensorflow:
        keras_python = Path(args.envs) / "keras" / "bin" / "python"
        source = keras_source(name, keras_python, workdir)
        runners += [Runner("keras model.predict", [str(keras_python), *worker, "keras-predict", str(source)]),
                    Runner("tf.function", [str(keras_python), *worker, "keras-function", str(source)])]
    return runners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    parser.add_argument("--providers", default="cpu", help="ONNX Runtime providers, e.g. tensorrt,cuda,cpu")
    parser.add_argument("--models", default="build/models", help="built packages (default build/models)")
    parser.add_argument("--envs", default="build/envs", help="build environments (default build/envs)")
    parser.add_argument("--no-tensorflow", action="store_true", help="time ONNX Runtime only")
    args = parser.parse_args()

    from machaon.manifest import Package

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            runners = runners_for(name, args, Path(tmp))
            timings = {(batch, r.label): [] for batch in BATCHES for r in runners}
            for round_ in range(args.rounds):
                first = round_ % len(runners)  # each round, another runner goes first
                order = runners[first:] + runners[:first]
                for batch in BATCHES:
                    for runner in order:
                        timings[batch, runner.label].append(runner.images_per_second(batch, args.seconds))
                print(f"{name}: round {round_ + 1}/{args.rounds} done", file=sys.stderr)
            variants = {v.precision: v for v in Package(Path(args.models) / name).manifest.variants}
            results[name] = {
                "providers": {r.label: r.providers for r in runners},
                "variants": {p: {"metric": v.metric, "value": v.value, "max_abs_diff": v.max_abs_diff}
                             for p, v in variants.items()},
                "images_per_second": {f"batch {batch}": {label: statistics.median(timings[batch, label])
                                                         for (b, label) in timings if b == batch}
                                      for batch in BATCHES},
                "rounds": {f"batch {b} {label}": values for (b, label), values in timings.items()},
            }
            for runner in runners:
                runner.close()
    report(results)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict) -> None:
    print(f"{'model':<16} {'batch':>5}  {'runner':<22} {'images/s':>9}  {'/ predict':>9}  "
          f"{'/ tf.function':>13}  accuracy vs fp32")
    for name, result in results.items():
        for batch, row in result["images_per_second"].items():
            predict, function = row.get("keras model.predict"), row.get("tf.function")
            for label, rate in row.items():
                precision = label.removeprefix("onnxruntime ")
                variant = result["variants"].get(precision)
                accuracy = (f"{variant['metric']} {variant['value']:.4f}, "
                            f"max diff {variant['max_abs_diff']:.2g}") if variant else ""
                print(f"{name:<16} {batch.split()[1]:>5}  {label:<22} {rate:9.1f}  "
                      f"{rate / predict if predict else float('nan'):9.2f}  "
                      f"{rate / function if function else float('nan'):13.2f}  {accuracy}")
        providers = {label: p for label, p in result["providers"].items() if label.startswith("onnxruntime")}
        print(f"{name}: ONNX Runtime providers in use: {sorted({', '.join(p) for p in providers.values()})}")


if __name__ == "__main__":
    sys.exit(main())
