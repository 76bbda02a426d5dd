"""One inference runner for benchmarks/inference.py, in its own process.

    python -m benchmarks.inference_worker ort PACKAGE PRECISION  (machaon's environment: its own session code)
    python -m benchmarks.inference_worker keras-predict MODEL  (the Keras build environment: model.predict)
    python -m benchmarks.inference_worker keras-function MODEL  (the Keras build environment: a tf.function)
    ... [--providers tensorrt,cuda,cpu]           (ort only; default: cpu)

Reads "BATCH SECONDS" lines on stdin; for each, runs the model on random input
of that batch size (after two warm-up calls) until SECONDS have passed, and
answers with one JSON line: {"calls": N, "per_call": [seconds, ...]}.
Each runner is its own process because TensorFlow in the same process slows
ONNX Runtime down.
"""

import json
import os
import sys
import time
from pathlib import Path


def ort_runner(package: str, precision: str, providers: str):
    """machaon's own session (machaon.inference.OrtModel), as `machaon serve` runs it."""
    import numpy as np
    from machaon.inference import OrtModel, RuntimeOptions
    from machaon.manifest import Package

    model = OrtModel(Package(Path(package)), precision, RuntimeOptions(tuple(providers.split(","))))
    print(json.dumps({"providers": model.providers}), flush=True)
    return model.run, list(model.package.manifest.input.shape(1)[1:]), np


def keras_runner(path: str, mode: str):
    """The source model in TensorFlow: model.predict, or a tf.function around the model."""
    from converters.keras_to_onnx import keras_major

    legacy = keras_major(Path(path)) == 2
    if legacy:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow as tf
    if legacy:
        import tf_keras as keras
    else:
        import keras
    model = keras.models.load_model(path, compile=False)
    print(json.dumps({"providers": [f"tensorflow {tf.__version__} {mode}"]}), flush=True)
    if mode == "keras-predict":
        def run(x):
            return model.predict(x, batch_size=len(x), verbose=0)
    else:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])

        def run(x):
            return forward(tf.constant(x)).numpy()
    return run, list(model.input_shape[1:]), np


def main() -> int:
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "ort":
        providers = sys.argv[5] if sys.argv[4:5] == ["--providers"] else "cpu"
        run, shape, np = ort_runner(path, sys.argv[3], providers)
    else:
        run, shape, np = keras_runner(path, kind)
    rng = np.random.default_rng(0)
    for line in sys.stdin:
        batch, seconds = int(line.split()[0]), float(line.split()[1])
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        run(x)
        run(x)
        per_call, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(per_call) < 3:
            started = time.perf_counter()
            run(x)
            per_call.append(time.perf_counter() - started)
        print(json.dumps({"calls": len(per_call), "per_call": per_call}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
