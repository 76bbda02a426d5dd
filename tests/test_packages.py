"""Model packages: manifests are validated field by field, and a damaged package says so."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomli_w
from machaon.inference import OrtSessions, RuntimeOptions
from machaon.manifest import Package, PackageError, find_packages, read_manifest, sha256_of
from machaon.tools.build import BUILD_INPUTS, Builder, BuildError, build_inputs
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from tests.harness import ENVS, copy_model, run_machaon

REPO = Path(__file__).resolve().parents[1]

MANIFEST = {
    "name": "tiny-views",
    "version": "1.0.0",
    "task": "classification",
    "description": "A linear classifier over 8x8 images, made by the test.",
    "intended_use": "Tests only; not for clinical use.",
    "demo": "random-weights",
    "input": {"modalities": ["MR"], "photometric": ["MONOCHROME2"], "kind": "slice", "size": [8, 8],
              "channels": 1, "layout": "NHWC", "normalisation": {"method": "zscore"}},
    "output": {"activation": "softmax", "findings": [
        {"label": "A", "index": 0, "concept": {"value": "A", "scheme": "99TEST", "meaning": "A"}},
        {"label": "B", "index": 1, "concept": {"value": "B", "scheme": "99TEST", "meaning": "B"}},
    ]},
}


def tiny_onnx(path: Path, seed: int = 0) -> None:
    """A real ONNX model: (N, 8, 8, 1) -> softmax over 2 classes."""
    weights = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((64, 2)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 8, 8, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])], [weights, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_package(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True)
    tiny_onnx(folder / "model.onnx")
    manifest = copy.deepcopy(MANIFEST) | {"provenance": {
        "source_framework": "onnx", "source_framework_version": onnx.__version__, "converter": "none",
        "converter_version": "-", "opset": 17, "parity_max_abs_diff": 0.0, "parity_tolerance": 1e-4,
        "sha256": sha256_of(folder / "model.onnx"), "built": "2026-11-22T00:00:00+00:00",
        "source_file": "model.onnx", "source_sha256": sha256_of(folder / "model.onnx")}} | changes
    (folder / "manifest.toml").write_text(tomli_w.dumps(manifest))
    return folder


def test_every_source_manifest_in_the_repository_is_valid():
    names = [read_manifest(path).name for path in sorted(REPO.glob("models/*/manifest.toml"))]
    assert names == ["cardiac-view", "cxr-findings", "lv-segmentation", "myo-segmentation", "retina-findings"]


def test_demo_models_say_so():
    for path in REPO.glob("models/*/manifest.toml"):
        manifest = read_manifest(path)
        assert manifest.demo in ("phantom", "random-weights")
        assert "not for clinical use" in manifest.intended_use.lower()


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("field, value, message", [
    ("name", None, "name: Field required"),
    ("name", "Tiny Views", "name: String should match pattern"),
    ("version", "1.0", "version: String should match pattern"),
    ("task", "detection", "task: Input should be 'segmentation', 'classification' or 'landmarks'"),
    ("inptu", {}, "inptu: unknown field"),
    ("intended_use", "Research.", "intended_use of a demo model must say 'not for clinical use'"),
    ("input.layout", "HWC", "input.layout: Input should be 'NHWC' or 'NCHW'"),
    ("input.size", [8, 8, 8], "size is [rows, columns] for a slice model"),
    ("input.normalisation", {"method": "window", "center": 40}, "input.normalisation: method 'window' needs width"),
    ("input.channel_select", "green", "channel_select picks a colour channel, but photometric lists only monochrome"),
    ("input.channels", 3, "channel_select feeds one channel"),
    ("output.findings", [], "a classification model lists its output.findings"),
    ("output.findings.1.index", 0, "output.findings: two entries share an index"),
    ("output.findings.0.threshold", 1.5, "output.findings.0.threshold: Input should be less than 1"),
    ("output.findings.0.concept.scheme", None, "output.findings.0.concept.scheme: Field required"),
])
def test_manifest_errors_name_the_field(tmp_path, field, value, message):
    data = _set(MANIFEST, field, value)
    if field == "input.channels":  # both at once: green of a three-channel input is a contradiction
        data["input"] |= {"channel_select": "green", "photometric": ["RGB"]}
    path = tmp_path / "manifest.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(PackageError) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_segmentation_needs_segments_with_colours(tmp_path):
    data = copy.deepcopy(MANIFEST) | {"task": "segmentation"}
    data["output"] = {"activation": "softmax", "layout": "NHWC", "segments": [{
        "label": "LV", "index": 1, "colour": [300, 0, 0],
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "87878005", "scheme": "SCT", "meaning": "Left ventricle"}}]}
    path = tmp_path / "manifest.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(PackageError, match=r"output\.segments\.0\.colour\.0: Input should be less than or equal to 255"):
        read_manifest(path)


def test_a_package_loads_and_its_session_is_created_once(tmp_path):
    package = Package(make_package(tmp_path / "tiny-views"))
    sessions = OrtSessions(RuntimeOptions(providers=("cpu",)))
    model = sessions.get(package)
    assert sessions.get(package) is model
    out = model.run(np.zeros((3, 8, 8, 1), np.float32))
    assert out.shape == (3, 2) and np.allclose(out.sum(axis=1), 1, atol=1e-6)


def test_a_package_rebuilt_while_serving_gets_a_new_session(tmp_path):
    folder = make_package(tmp_path / "tiny-views")
    sessions = OrtSessions(RuntimeOptions(providers=("cpu",)))
    before = sessions.get(Package(folder))
    tiny_onnx(folder / "model.onnx", seed=1)  # as `machaon models build` leaves it: new weights, new manifest
    data = tomllib.loads((folder / "manifest.toml").read_text())
    data["version"], data["provenance"]["sha256"] = "1.0.1", sha256_of(folder / "model.onnx")
    (folder / "manifest.toml").write_text(tomli_w.dumps(data))
    after = sessions.get(Package(folder))
    assert after is not before and after.package.manifest.version == "1.0.1"
    image = np.random.default_rng(2).standard_normal((1, 8, 8, 1)).astype(np.float32)
    assert not np.allclose(after.run(image), before.run(image))  # the new weights run, not the old ones
    assert sessions.get(Package(folder)) is after


def test_missing_onnx_file_is_named(tmp_path):
    folder = make_package(tmp_path / "tiny-views")
    (folder / "model.onnx").unlink()
    with pytest.raises(PackageError, match=r"model tiny-views: .*model\.onnx is missing; rebuild the package"):
        Package(folder).onnx_path()


def test_changed_onnx_file_fails_its_sha256(tmp_path):
    folder = make_package(tmp_path / "tiny-views")
    with (folder / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match=r"has sha256 [0-9a-f]{12}\.\.\., the manifest says [0-9a-f]{12}\.\.\.; "
                                           r"the file was changed or damaged after the build: rebuild it"):
        Package(folder).onnx_path()


def test_corrupt_onnx_file_is_refused_by_name(tmp_path):
    folder = tmp_path / "tiny-views"
    make_package(folder)
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    data = tomllib.loads((folder / "manifest.toml").read_text())
    data["provenance"]["sha256"] = sha256_of(folder / "model.onnx")  # as if built like this
    (folder / "manifest.toml").write_text(tomli_w.dumps(data))
    with pytest.raises(PackageError, match=r"model tiny-views: ONNX Runtime cannot load .*model\.onnx"):
        OrtSessions(RuntimeOptions(providers=("cpu",))).get(Package(folder))


def test_source_manifest_is_not_a_package(tmp_path):
    folder = tmp_path / "lv-segmentation"
    folder.mkdir()
    (folder / "manifest.toml").write_text((REPO / "models/lv-segmentation/manifest.toml").read_text())
    with pytest.raises(PackageError, match="is a source manifest, not a built package; run `machaon models build"):
        Package(folder)


def test_check_reports_the_providers_it_really_got(tmp_path):
    make_package(tmp_path / "models" / "tiny-views")
    done = run_machaon("models", "check", "tiny-views", "--runs", "3",
                       env={"MACHAON_MODELS_PATH": str(tmp_path / "models")}, check=True)
    assert "providers asked for: tensorrt, cuda, cpu" in done.stdout
    # This machine has no GPU: onnxruntime-gpu falls back to the CPU, and the log says what was missing.
    assert "providers in use:    CPUExecutionProvider" in done.stdout
    assert "not available here: TensorrtExecutionProvider, CUDAExecutionProvider" in done.stderr
    assert "input (1, 8, 8, 1) -> output (1, 2)" in done.stdout


def test_list_shows_packages_and_names_broken_ones(tmp_path):
    make_package(tmp_path / "models" / "tiny-views")
    broken = make_package(tmp_path / "models" / "broken", name="broken", version="one")
    done = run_machaon("models", "list", "--json", env={"MACHAON_MODELS_PATH": str(tmp_path / "models")})
    listing = json.loads(done.stdout)
    assert [m["name"] for m in listing["models"]] == ["tiny-views"]
    assert listing["models"][0]["variants"] == ["fp32"]
    assert listing["errors"] == [f"{broken / 'manifest.toml'}: version: String should match pattern '^\\d+\\.\\d+\\.\\d+$'"]
    assert done.returncode == 1
    assert find_packages(tmp_path / "nowhere") == ([], [])


def test_unknown_package_lists_the_known_ones(tmp_path):
    make_package(tmp_path / "models" / "tiny-views")
    done = run_machaon("models", "check", "lv-segmentaion", env={"MACHAON_MODELS_PATH": str(tmp_path / "models")})
    assert done.returncode == 1
    assert f"no model package 'lv-segmentaion' in {tmp_path / 'models'} (there are: tiny-views)" in done.stderr



def test_build_skips_an_unchanged_model_and_says_why_it_rebuilds_the_others(tmp_path, monkeypatch):
    folder = tmp_path / "src" / "tiny-views"
    folder.mkdir(parents=True)
    source = {"framework": "keras", "file": "tiny.keras", "recipe": "recipe.py"}
    (folder / "manifest.toml").write_text(tomli_w.dumps(copy.deepcopy(MANIFEST) | {"source": source}))
    (folder / "recipe.py").write_text("# writes tiny.keras\n")
    built = make_package(tmp_path / "built" / "tiny-views")

    def record() -> None:  # as a build of the sources as they are now leaves it
        inputs = build_inputs(folder, read_manifest(folder / "manifest.toml").source)
        (built / BUILD_INPUTS).write_text(json.dumps(inputs))
    record()
    out = io.StringIO()
    builder = Builder(tmp_path / "src", tmp_path / "built", tmp_path / "envs", Console(file=out, width=300))

    def building(*_args):
        raise BuildError("building")
    monkeypatch.setattr(Builder, "_source_model", building)  # the first step of a real build

    def why(**kwargs) -> str:
        out.seek(0)
        out.truncate()
        with pytest.raises(BuildError, match="building"):
            builder.build("tiny-views", **kwargs)
        return re.search(r"building: (.*)", out.getvalue())[1]

    assert builder.build("tiny-views").folder == built and "up to date" in out.getvalue()
    assert why(force=True) == "--force given"
    (folder / "recipe.py").write_text("# writes tiny.keras, differently\n")
    assert why() == "changed since the last build: recipe.py"
    record()
    with (built / "model.onnx").open("ab") as f:
        f.write(b"\0")
    assert why().startswith("the built package is broken: model tiny-views: ")
    tiny_onnx(built / "model.onnx")
    (built / BUILD_INPUTS).unlink()  # built before the inputs were recorded
    assert why() == f"{built / BUILD_INPUTS} is missing or unreadable"
    shutil.rmtree(built)
    assert why() == "no package yet"
    assert not (tmp_path / "envs").exists()  # nothing was started to find that out


@pytest.mark.converters
def test_a_second_build_of_unchanged_sources_is_quick(tmp_path):
    sources = copy_model(tmp_path / "src", "cardiac-view", **{"source.variants": []})
    env = {"MACHAON_MODELS_PATH": str(tmp_path / "built")}
    build = ("models", "build", "--source", str(sources), "--envs", str(ENVS))
    first = run_machaon(*build, env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "building: no package yet" in first.stdout and "parity check: " in first.stdout
    started = time.monotonic()
    again = run_machaon(*build, env=env, timeout=900)
    assert again.returncode == 0 and "up to date" in again.stdout and "parity" not in again.stdout
    assert time.monotonic() - started < 30
    forced = run_machaon(*build, "--force", env=env, timeout=900)
    assert "building: --force given" in forced.stdout and "built" in forced.stdout, forced.stderr
    # Not a terminal: each step is a line when it starts and one when it ends, no spinner frames.
    assert re.search(r"converting cardiac_view.keras to ONNX: done in [\d.]+ s", forced.stdout)
    assert "\r" not in forced.stdout and "\x1b" not in forced.stdout
