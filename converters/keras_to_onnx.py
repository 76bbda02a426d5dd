"""Convert a Keras model to ONNX with tf2onnx, and record Keras's own outputs.

Runs in the Keras build environment (TensorFlow, tf2onnx, tf-keras):

    keras_to_onnx.py MODEL INPUTS.npz OUT_DIR [--opset N]

MODEL is a Keras 3 `.keras` file or a `.h5` file; a `.h5` saved by Keras 2 is
loaded through tf-keras (TF_USE_LEGACY_KERAS=1), since Keras 3 cannot read
those of U-Nets and DenseNets. Writes OUT_DIR/model.onnx, OUT_DIR/reference.npz
(the model's outputs for INPUTS.npz's "x", for the parity check) and
OUT_DIR/info.json (versions). The graph gets one input named "input" with a
dynamic batch axis.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def keras_major(path: Path) -> int:
    """3 for a .keras file; for .h5, the major version of the Keras that saved it."""
    if path.suffix == ".keras":
        return 3
    import h5py

    with h5py.File(path, "r") as f:
        version = f.attrs.get("keras_version", b"2")
    version = version.decode() if isinstance(version, bytes) else str(version)
    return int(version.split(".")[0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args()

    legacy = keras_major(args.model) == 2
    if legacy:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # must be set before TensorFlow is imported
    import numpy as np
    import onnx
    import tensorflow as tf
    import tf2onnx

    if legacy:
        import tf_keras as keras
    else:
        import keras

    model = keras.models.load_model(args.model, compile=False)
    x = np.load(args.inputs)["x"]
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)

    @tf.function(input_signature=spec)
    def forward(input):  # noqa: A002 - the name becomes the ONNX input's name
        return model(input, training=False)

    args.out.mkdir(parents=True, exist_ok=True)
    tf2onnx.convert.from_function(forward, input_signature=spec, opset=args.opset,
                                  output_path=str(args.out / "model.onnx"))
    reference = model.predict(x, batch_size=8, verbose=0)
    np.savez(args.out / "reference.npz", y=reference)
    info = {
        "source_framework": "keras (tf-keras, Keras 2 format)" if legacy else "keras",
        "source_framework_version": f"keras {keras.__version__}, tensorflow {tf.__version__}",
        "converter": "tf2onnx",
        "converter_version": tf2onnx.__version__,
        "opset": onnx.load(str(args.out / "model.onnx")).opset_import[0].version,
    }
    (args.out / "info.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
