"""`machaon models build`: source models in models/<name>/ to ONNX packages.

Each framework runs in its own virtual environment, created on first use from
converters/requirements-<framework>.txt and reused while that file is
unchanged; the service process never imports TensorFlow or MXNet. This module
drives those environments through files, then checks the ONNX model in this
process's ONNX Runtime: the source framework and ONNX Runtime see the same
inputs, and the build fails when they differ by more than the manifest allows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np
import tomli_w
from rich.console import Console

from .. import __version__
from ..display import step
from ..manifest import MANIFEST, Evaluation, Manifest, Package, PackageError, Source, read_manifest, sha256_of
from ..preprocess import normalise, to_layout
from . import phantom

EVALUATION_FILE = "evaluation.json"  # written by a model's training script, beside its weights
BUILD_INPUTS = "build-inputs.json"  # in a package: the sha256 of everything it was built from
PARITY_SAMPLES, CALIBRATION_SAMPLES, EVALUATION_SAMPLES = 8, 32, 16


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def converters_dir() -> Path:
    return Path(str(resources.files("machaon.converters")))


def _source_sha256(source_file: Path) -> str:
    """The source model's sha256: of its file, or for an MXNet prefix, of its symbol and its
    weights together (retraining changes only the weights)."""
    if source_file.is_file():
        return sha256_of(source_file)
    parts = [source_file.with_name(f"{source_file.name}-symbol.json"),
             *sorted(source_file.parent.glob(f"{source_file.name}-*.params"))]
    return hashlib.sha256("".join(sha256_of(p) for p in parts).encode()).hexdigest()


def build_inputs(folder: Path, source: Source) -> dict:
    """What a package is made from, for telling whether it must be rebuilt: the sha256 of each
    file in the model's folder (manifest, weights, recipe, evaluation) and of the framework's
    converter and requirements, and the machaon version (its build code makes the sample inputs
    and the variants)."""
    files = {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}
    for tool in (f"{source.framework}_to_onnx.py", f"requirements-{source.framework}.txt"):
        files[f"converters/{tool}"] = sha256_of(converters_dir() / tool)
    return {"machaon": __version__, "files": files}


def _why_rebuild(target: Path, inputs: dict) -> str | None:
    """Why the package in `target` must be rebuilt from `inputs`, or None when it is up to date."""
    if not target.is_dir():
        return "no package yet"
    try:
        package = Package(target)
        for precision in ["fp32"] + [v.precision for v in package.manifest.variants]:
            package.onnx_path(precision)  # checks each file against its sha256 in the manifest
        built = json.loads((target / BUILD_INPUTS).read_text())
    except PackageError as exc:
        return f"the built package is broken: {exc}"
    except (OSError, ValueError):
        return f"{target / BUILD_INPUTS} is missing or unreadable"
    if built.get("machaon") != inputs["machaon"]:
        return f"built by machaon {built.get('machaon')}, this is {inputs['machaon']}"
    old, new = built.get("files", {}), inputs["files"]
    changed = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
    return f"changed since the last build: {', '.join(changed)}" if changed else None


class Environments:
    """The build's virtual environments, one per framework, under `root`."""

    def __init__(self, root: Path, console: Console):
        self.root = root
        self.console = console

    def python(self, framework: str) -> Path:
        """The environment's interpreter, creating or refreshing the environment if needed."""
        requirements = converters_dir() / f"requirements-{framework}.txt"
        digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
        env = self.root / framework
        marker = env / "machaon-requirements.sha256"
        if marker.is_file() and marker.read_text() == digest:
            return env / "bin" / "python"
        if env.exists():
            shutil.rmtree(env)
        log = self.root / f"{framework}-install.log"
        self.root.mkdir(parents=True, exist_ok=True)
        with step(self.console, f"creating the {framework} build environment in {env} "
                  f"(first time only; pip output in {log})"):
            with log.open("w") as out:
                for command in ([sys.executable, "-m", "venv", str(env)],
                                [str(env / "bin" / "python"), "-m", "pip", "install",
                                 "--disable-pip-version-check", "-r", str(requirements)]):
                    if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                        raise BuildError(f"creating the {framework} environment failed: "
                                         f"{' '.join(command[:4])}...; see {log}")
        marker.write_text(digest)
        self.console.print(f"  {framework} build environment ready: {env}")
        return env / "bin" / "python"

    def run(self, framework: str, script: Path, *args, what: str, live: bool = False) -> None:
        """Run `script` in the framework's environment; on failure, show the end of its output.

        `live` passes the script's output through, for long steps that report their own progress.
        """
        python = self.python(framework)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
        env.pop("TF_USE_LEGACY_KERAS", None)  # the converter decides from the file
        if live:
            self.console.print(f"  {what}...")
            if subprocess.run([str(python), str(script), *map(str, args)], env=env).returncode:
                raise BuildError(f"{what} failed ({script.name}); its output is above")
            return
        with step(self.console, f"  {what}"):
            done = subprocess.run([str(python), str(script), *map(str, args)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:  # inside the step, which then says it failed
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
                raise BuildError(f"{what} failed ({script.name} exited {done.returncode}):\n{tail}")


def _source_of(manifest: Manifest) -> Source:
    """The manifest's [source]; only source manifests (models/<name>/) have one."""
    if manifest.source is None:
        raise BuildError(f"{manifest.name}: the manifest has no [source]: say how to build the model")
    return manifest.source


def training_data(manifest: Manifest, studies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom images prepared as model input, with their labels (label maps, or view indices)."""
    rows, columns = manifest.input.size[-2:]
    if rows != columns:
        raise BuildError(f"{manifest.name}: phantom images are square; input.size is {rows}x{columns}")
    data = _source_of(manifest).data
    if data == "phantom-sax":
        images, labels = phantom.sax_dataset(studies, seed, matrix=rows)
    elif data == "phantom-views":
        images, labels = phantom.view_dataset(studies, seed, matrix=rows)
    else:
        raise BuildError(f"{manifest.name}: source.data is {data!r}: "
                         "there is nothing to train on")
    return to_layout(normalise(images, manifest.input.normalisation), manifest.input), labels


def sample_inputs(manifest: Manifest, count: int, seed: int) -> np.ndarray:
    """Model inputs for parity, calibration and evaluation, prepared as the manifest says."""
    data = _source_of(manifest).data
    if data == "random":
        rows, columns = manifest.input.size[-2:]
        shape = (count, rows, columns) + ((3,) if manifest.input.channels == 3 else ())
        images = np.random.default_rng(seed).uniform(0, 4095, shape)
        return to_layout(normalise(images, manifest.input.normalisation), manifest.input)
    per_study = len(phantom.VIEWS) if data == "phantom-views" else 6
    x, labels = training_data(manifest, max(1, count // per_study), seed)
    if data == "phantom-sax":
        x = x[(labels == phantom.CAVITY).any(axis=(1, 2))]  # slices through the LV
    return x[:count]


def _session(path: Path):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its warnings about the graph are for the model's authors
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output for x, on the CPU, in batches of 8."""
    session = _session(path)
    name = session.get_inputs()[0].name
    batches = [session.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)]
    return np.concatenate(batches).astype(np.float32)


class Builder:
    def __init__(self, sources: Path, out: Path, envs: Path, console: Console | None = None):
        self.sources, self.out = sources, out
        self.console = console or Console(highlight=False)
        self.envs = Environments(envs, self.console)

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.sources.glob(f"*/{MANIFEST}"))

    def build(self, name: str, force: bool = False) -> Package:
        """Build one package into out/<name>, replacing the old one only when every check passed.

        A package built from the same inputs (see `build_inputs`) is kept as it is unless `force`.
        """
        folder = self.sources / name
        manifest = read_manifest(folder / MANIFEST)
        if manifest.source is None:
            raise BuildError(f"{folder / MANIFEST} has no [source]: say how to build the model")
        if manifest.name != name:
            raise BuildError(f"{folder / MANIFEST}: name is {manifest.name!r} but the folder is {name!r}")
        target = self.out / name
        inputs = build_inputs(folder, manifest.source)
        self.console.print(f"[bold]{name}[/] {manifest.version} ({manifest.source.framework})")
        reason = "--force given" if force else _why_rebuild(target, inputs)
        if reason is None:
            self.console.print(f"  [green]up to date[/] {target}")
            return Package(target)
        self.console.print(f"  building: {reason}", markup=False)
        self.out.mkdir(parents=True, exist_ok=True)
        # Work inside out/ so the finished package is moved into place by a rename.
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=self.out) as tmp:
            work = Path(tmp)
            source_file = self._source_model(folder, manifest, work)
            fields = self._convert(manifest, source_file, work)
            fields["variants"] = [self._variant(manifest, work, p) for p in manifest.source.variants]
            if (folder / EVALUATION_FILE).is_file():
                evaluation = Evaluation.model_validate_json((folder / EVALUATION_FILE).read_text())
                fields["evaluation"] = evaluation.model_dump()
            package_dir = self._assemble(manifest, fields, work)
            # What it was built from, which the next build compares to skip an unchanged model.
            (package_dir / BUILD_INPUTS).write_text(json.dumps(inputs, indent=2) + "\n")
            if target.exists():
                os.replace(target, work / "previous")  # removed with the work folder
            os.replace(package_dir, target)
        self.console.print(f"  [green]built[/] {target}")
        return Package(target)

    @staticmethod
    def _assemble(manifest: Manifest, fields: dict, work: Path) -> Path:
        """The package folder: ONNX files and the built manifest, which must read back as valid."""
        package_dir = work / "package"
        package_dir.mkdir()
        for file in ["model.onnx"] + [v["file"] for v in fields["variants"]]:
            os.replace(work / file, package_dir / file)
        built = manifest.model_dump(mode="json", exclude_none=True, exclude={"source"}) | fields
        built["output"] = {key: value for key, value in built["output"].items() if value != []}
        (package_dir / MANIFEST).write_text(_header(manifest) + tomli_w.dumps(built))
        Package(package_dir)
        return package_dir

    def train(self, name: str, studies: int, holdout: int) -> None:
        """Train a demo model on phantoms with its source.train script; writes its weights and evaluation."""
        folder = self.sources / name
        manifest = read_manifest(folder / MANIFEST)
        if manifest.source is None or not manifest.source.train:
            raise BuildError(f"{folder / MANIFEST} names no source.train script")
        assert manifest.source.file  # Source's validator requires it
        with tempfile.TemporaryDirectory(prefix="machaon-train-") as tmp:
            work = Path(tmp)
            with step(self.console, f"  generating phantoms: {studies} for training, {holdout} held out"):
                for file, count, seed in (("train.npz", studies, 10), ("holdout.npz", holdout, 20)):
                    x, labels = training_data(manifest, count, seed)
                    np.savez(work / file, x=x, labels=labels)
            self.envs.run(manifest.source.framework, folder / manifest.source.train, work / "train.npz",
                          work / "holdout.npz", folder / manifest.source.file, folder / EVALUATION_FILE,
                          what=f"training {name}", live=True)
        self.console.print(f"  [green]trained[/] {folder / manifest.source.file}: "
                           f"{(folder / EVALUATION_FILE).read_text()}")

    def _source_model(self, folder: Path, manifest: Manifest, work: Path) -> Path:
        """The committed source model, or the one its recipe makes (random-weight models)."""
        source = _source_of(manifest)
        assert source.file  # Source's validator requires it
        if source.recipe:
            made = work / source.file
            rows, columns = manifest.input.size[-2:]
            self.envs.run(source.framework, folder / source.recipe, made, rows, columns,
                          manifest.input.channels, what=f"making {source.file} with {source.recipe}")
            return made
        path = folder / source.file
        wanted = path.with_name(f"{path.name}-symbol.json") if source.framework == "mxnet" else path
        if not wanted.is_file():
            raise BuildError(f"{folder / MANIFEST}: source.file {source.file!r}: {wanted} does not exist")
        return path

    def _convert(self, manifest: Manifest, source_file: Path, work: Path) -> dict:
        source = _source_of(manifest)
        x = sample_inputs(manifest, PARITY_SAMPLES, seed=1)
        np.savez(work / "inputs.npz", x=x)
        script = converters_dir() / f"{source.framework}_to_onnx.py"
        self.envs.run(source.framework, script, source_file, work / "inputs.npz", work,
                      "--opset", source.opset, what=f"converting {source_file.name} to ONNX")
        info = json.loads((work / "info.json").read_text())
        reference = np.load(work / "reference.npz")["y"]
        with step(self.console, "  parity check: source framework against ONNX Runtime"):
            got = run_onnx(work / "model.onnx", x)
        if got.shape != reference.shape:
            raise BuildError(f"parity check failed: ONNX output shape {got.shape}, "
                             f"source model {reference.shape}")
        diff = float(np.abs(got - reference).max())
        if not diff <= source.parity_tolerance:
            raise BuildError(f"parity check failed: maximum absolute difference {diff:.3g} exceeds "
                             f"source.parity_tolerance {source.parity_tolerance:g}")
        self.console.print(f"  parity: max |source - onnx| = {diff:.3g} "
                           f"(tolerance {source.parity_tolerance:g}) on {len(x)} inputs")
        source_hash = _source_sha256(source_file)
        return {"provenance": info | {
            "parity_max_abs_diff": diff, "parity_tolerance": source.parity_tolerance,
            "sha256": sha256_of(work / "model.onnx"),
            "built": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_file": source.file, "source_sha256": source_hash}}

    def _variant(self, manifest: Manifest, work: Path, precision: str) -> dict:
        """An fp16 or static-int8 copy of model.onnx, with how far its output moves from fp32's."""
        fp32, path = work / "model.onnx", work / f"model.{precision}.onnx"
        with step(self.console, f"  making the {precision} variant"):
            if precision == "fp16":
                _to_fp16(fp32, path)
            else:
                _to_int8(fp32, path, sample_inputs(manifest, CALIBRATION_SAMPLES, seed=2), work)
            x = sample_inputs(manifest, EVALUATION_SAMPLES, seed=3)
            metric, value, diff = compare_outputs(manifest, run_onnx(fp32, x), run_onnx(path, x))
        self.console.print(f"  {precision}: max |fp32 - {precision}| = {diff:.3g}, {metric} = {value:.4f}")
        return {"precision": precision, "file": path.name, "sha256": sha256_of(path),
                "max_abs_diff": diff, "metric": metric, "value": value}


def _header(manifest: Manifest) -> str:
    lines = [f"# {manifest.name} {manifest.version}: built by `machaon models build`; do not edit.",
             f"# {manifest.intended_use}"]
    return "\n".join(lines) + "\n\n"


def compare_outputs(manifest: Manifest, reference: np.ndarray, other: np.ndarray) -> tuple[str, float, float]:
    """(metric, value, max abs diff) of `other` against `reference` as the output spec reads them."""
    diff = float(np.abs(reference - other).max())
    output = manifest.output
    if manifest.task == "segmentation":
        axis = 1 if output.layout == "NCHW" else -1
        a, b = reference.argmax(axis=axis) > 0, other.argmax(axis=axis) > 0
        denominator = a.sum() + b.sum()
        return "dice_vs_fp32", float(2 * (a & b).sum() / denominator) if denominator else 1.0, diff
    if manifest.task == "classification" and output.activation == "sigmoid":
        thresholds = np.array([f.threshold for f in sorted(output.findings, key=lambda f: f.index)])
        same = (reference[:, :len(thresholds)] >= thresholds) == (other[:, :len(thresholds)] >= thresholds)
        return "decision_agreement_vs_fp32", float(same.mean()), diff
    if manifest.task == "classification":
        return "top1_agreement_vs_fp32", float((reference.argmax(-1) == other.argmax(-1)).mean()), diff
    return "max_abs_diff_vs_fp32", diff, diff


def _to_fp16(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Inputs and outputs stay float32, so callers feed every variant the same way.
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))


def _to_int8(fp32: Path, out: Path, calibration: np.ndarray, work: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _session(fp32).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    prepared = work / "model.prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns once per 1-D weight that per-channel does not apply to
    try:
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
