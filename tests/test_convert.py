"""Each model family converts to ONNX in its real build environment, with the parity check.

These run TensorFlow and MXNet in the virtual environments `machaon models build`
creates (build/envs in the checkout, or $MACHAON_TEST_ENVS); the first run
creates them. Large inputs are shrunk where the architecture allows, for speed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from machaon.inference import OrtSessions, RuntimeOptions
from machaon.manifest import Package, read_manifest
from machaon.preprocess import normalise, to_layout
from machaon.tools import phantom
from machaon.tools.build import Builder, BuildError, sample_inputs
from rich.console import Console

from tests.harness import ENVS, REPO, copy_model, run_machaon

pytestmark = pytest.mark.converters


@pytest.fixture
def builder(tmp_path):
    def make(sources: Path) -> Builder:
        return Builder(sources, tmp_path / "built", ENVS, Console(quiet=True))
    return make


def test_keras2_h5_unet_converts_and_still_segments(tmp_path, builder):
    """lv-segmentation: Keras 2 .h5 through tf-keras; fp16 and int8 variants measured."""
    package = builder(copy_model(tmp_path / "src", "lv-segmentation")).build("lv-segmentation")
    provenance = package.manifest.provenance
    assert provenance.converter == "tf2onnx" and provenance.source_framework == "keras (tf-keras, Keras 2 format)"
    assert provenance.parity_max_abs_diff <= provenance.parity_tolerance == 1e-4
    assert package.manifest.evaluation.metric == "dice" and package.manifest.evaluation.value >= 0.9

    # The converted model segments an unseen phantom as well as its manifest says.
    images, labels = phantom.sax_dataset(3, seed=99)
    x = to_layout(normalise(images, package.manifest.input.normalisation), package.manifest.input)
    sessions = OrtSessions(RuntimeOptions(providers=("cpu",)))
    truth = labels == phantom.CAVITY
    for precision in ("fp32", "fp16", "int8"):
        predicted = sessions.get(package, precision).run(x).argmax(-1) == 1
        dice = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())
        assert dice >= 0.9, f"{precision}: Dice {dice:.3f}"
    variants = {v.precision: v for v in package.manifest.variants}
    assert set(variants) == {"fp16", "int8"}
    assert all(v.metric == "dice_vs_fp32" and v.value >= 0.95 for v in variants.values())


def test_keras3_model_builds_through_the_cli(tmp_path):
    """cardiac-view: a Keras 3 .keras file, built and listed by the commands a user runs."""
    sources = copy_model(tmp_path / "src", "cardiac-view", **{"source.variants": []})
    env = {"MACHAON_MODELS_PATH": str(tmp_path / "built")}
    done = run_machaon("models", "build", "cardiac-view", "--source", str(sources), "--envs", str(ENVS),
                       env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "parity: max |source - onnx|" in done.stdout
    listing = json.loads(run_machaon("models", "list", "--json", env=env, check=True).stdout)
    [row] = listing["models"]
    assert row["name"] == "cardiac-view" and row["evaluation"]["metric"] == "accuracy"

    package = Package(tmp_path / "built" / "cardiac-view")
    images, views = phantom.view_dataset(10, seed=99, matrix=64)
    x = to_layout(normalise(images, package.manifest.input.normalisation), package.manifest.input)
    predicted = OrtSessions(RuntimeOptions(providers=("cpu",))).get(package).run(x).argmax(-1)
    assert (predicted == views).mean() >= 0.9


def test_gluon_model_converts(tmp_path, builder):
    """myo-segmentation: an exported HybridBlock through mx.onnx, with a dynamic batch axis."""
    package = builder(copy_model(tmp_path / "src", "myo-segmentation", **{"source.variants": []})) \
        .build("myo-segmentation")
    provenance = package.manifest.provenance
    assert provenance.converter == "mx.onnx" and provenance.opset >= 13
    assert provenance.parity_max_abs_diff <= 1e-4
    model = OrtSessions(RuntimeOptions(providers=("cpu",))).get(package)
    for batch in (1, 5):  # the batch axis is dynamic
        x = np.random.default_rng(batch).standard_normal(package.manifest.input.shape(batch))
        assert model.run(x).shape == (batch, 2, 128, 128)


@pytest.mark.parametrize("name, size, findings", [("cxr-findings", [64, 64], 14), ("retina-findings", [96, 96], 7)])
def test_random_weight_recipes_convert(tmp_path, builder, name, size, findings):
    """cxr-findings (DenseNet121, Keras 3) and retina-findings (AlexNet-style, Keras 2 .h5) from their recipes."""
    package = builder(copy_model(tmp_path / "src", name, **{"input.size": size, "source.variants": []})).build(name)
    assert package.manifest.demo == "random-weights"
    assert package.manifest.provenance.parity_max_abs_diff <= 1e-4
    x = np.random.default_rng(5).standard_normal(package.manifest.input.shape(3))
    out = OrtSessions(RuntimeOptions(providers=("cpu",))).get(package).run(x)
    assert out.shape == (3, findings) and ((0 <= out) & (out <= 1)).all()


def test_parity_failure_stops_the_build_and_keeps_the_old_package(tmp_path, builder):
    sources = copy_model(tmp_path / "src", "cardiac-view", **{"source.variants": []})
    good = builder(sources).build("cardiac-view")
    manifest = tomllib.loads((sources / "cardiac-view" / "manifest.toml").read_text())
    manifest["source"]["parity_tolerance"] = 1e-12
    (sources / "cardiac-view" / "manifest.toml").write_text(tomli_w.dumps(manifest))
    with pytest.raises(BuildError, match=r"parity check failed: maximum absolute difference [0-9.e-]+ exceeds "
                                         r"source.parity_tolerance 1e-12"):
        builder(sources).build("cardiac-view")
    assert Package(good.folder).onnx_path()  # the last good build is still there, intact
    assert not [p for p in good.folder.parent.iterdir() if p.name.startswith(".")]  # no half-built leftovers


def test_missing_and_broken_source_models_are_named(tmp_path, builder):
    sources = copy_model(tmp_path / "src", "cardiac-view", **{"source.variants": []})
    source = sources / "cardiac-view" / "cardiac_view.keras"
    source.write_bytes(b"not a keras file")
    with pytest.raises(BuildError, match=r"converting cardiac_view.keras to ONNX failed \(keras_to_onnx.py exited 1\)"):
        builder(sources).build("cardiac-view")
    source.unlink()
    with pytest.raises(BuildError, match=r"source.file 'cardiac_view.keras': .*cardiac_view.keras does not exist"):
        builder(sources).build("cardiac-view")


def test_sample_inputs_follow_the_manifest():
    manifest = read_manifest(REPO / "models" / "myo-segmentation" / "manifest.toml")
    x = sample_inputs(manifest, 4, seed=1)
    assert x.shape == (4, 1, 128, 128) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-3  # z-scored per image


def test_train_writes_weights_and_evaluation_that_the_build_records(tmp_path):
    """`machaon models train` on a copy: fresh phantoms, the model's own script, its score in the package."""
    sources = copy_model(tmp_path / "src", "cardiac-view", **{"source.variants": []})
    (sources / "cardiac-view" / "cardiac_view.keras").unlink()
    (sources / "cardiac-view" / "evaluation.json").unlink()
    done = run_machaon("models", "train", "cardiac-view", "--studies", "4", "--holdout", "2",
                       "--source", str(sources), "--envs", str(ENVS), timeout=900)
    assert done.returncode == 0, done.stderr
    evaluation = json.loads((sources / "cardiac-view" / "evaluation.json").read_text())
    assert evaluation["metric"] == "accuracy" and evaluation["samples"] == 2 * len(phantom.VIEWS)
    package = Builder(sources, tmp_path / "built", ENVS, Console(quiet=True)).build("cardiac-view")
    assert package.manifest.evaluation.value == evaluation["value"]
