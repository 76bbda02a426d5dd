"""Convert an MXNet/Gluon model to ONNX with mx.onnx, and record MXNet's own outputs.

Runs in the MXNet build environment (mxnet 1.9.1, numpy 1.23, onnx 1.18):

    mxnet_to_onnx.py PREFIX INPUTS.npz OUT_DIR

PREFIX names what a HybridBlock's export() writes: PREFIX-symbol.json and
PREFIX-NNNN.params (the highest epoch is taken). The input shape comes from
INPUTS.npz's "x" and the batch axis is exported as dynamic. Writes
OUT_DIR/model.onnx, OUT_DIR/reference.npz and OUT_DIR/info.json.
"""

import argparse
import json
import sys
from pathlib import Path


def _weights_are_not_inputs(path: Path) -> None:
    """mx.onnx lists every weight as a graph input too; ONNX Runtime then cannot fold
    constants (BatchNorm into Conv, say). Keep only the real inputs."""
    import onnx

    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--opset", type=int, help="ignored: mx.onnx picks the opset from its own op table")
    args = parser.parse_args()

    import mxnet as mx
    import numpy as np
    import onnx

    symbol = Path(f"{args.prefix}-symbol.json")
    params = sorted(symbol.parent.glob(f"{Path(args.prefix).name}-*.params"))
    if not symbol.is_file() or not params:
        print(f"{args.prefix}: expected {symbol.name} and {Path(args.prefix).name}-NNNN.params",
              file=sys.stderr)
        return 2
    x = np.load(args.inputs)["x"]
    net = mx.gluon.SymbolBlock.imports(str(symbol), ["data"], str(params[-1]))
    reference = np.concatenate([net(mx.nd.array(x[i:i + 8])).asnumpy() for i in range(0, len(x), 8)])

    args.out.mkdir(parents=True, exist_ok=True)
    shape = tuple(x.shape[1:])
    mx.onnx.export_model(str(symbol), str(params[-1]), in_shapes=[(1, *shape)], in_types=[np.float32],
                         onnx_file_path=str(args.out / "model.onnx"),
                         dynamic=True, dynamic_input_shapes=[(None, *shape)])
    _weights_are_not_inputs(args.out / "model.onnx")
    np.savez(args.out / "reference.npz", y=reference)
    info = {
        "source_framework": "mxnet (gluon)",
        "source_framework_version": f"mxnet {mx.__version__}",
        "converter": "mx.onnx",
        "converter_version": f"mxnet {mx.__version__}, onnx {onnx.__version__}",
        "opset": onnx.load(str(args.out / "model.onnx")).opset_import[0].version,
    }
    (args.out / "info.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
