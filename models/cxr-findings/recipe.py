"""Make the cxr-findings source model: DenseNet121 with random weights.

No chest X-ray weights can be shipped or downloaded here, so this model exists
for tests and benchmarks only (its manifest says demo = "random-weights"). The
architecture is the one of the original work: DenseNet121 on one-channel
images, global max pooling, Dense(14) with sigmoid.

Run by `machaon models build` in the Keras build environment:

    recipe.py OUT.keras ROWS COLUMNS CHANNELS
"""

import sys

import keras
from keras import layers

SEED, FINDINGS = 7, 14


def main(out_path, rows, columns, channels) -> int:
    keras.utils.set_random_seed(SEED)
    base = keras.applications.DenseNet121(include_top=False, weights=None, pooling="max",
                                          input_shape=(int(rows), int(columns), int(channels)))
    outputs = layers.Dense(FINDINGS, activation="sigmoid", name="findings")(base.output)
    keras.Model(base.input, outputs, name="cxr_densenet121").save(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
