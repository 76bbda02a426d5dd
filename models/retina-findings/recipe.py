"""Make the retina-findings source model: an AlexNet-style CNN with random weights.

No retinal weights can be shipped or downloaded here, so this model exists for
tests and benchmarks only (its manifest says demo = "random-weights"). It keeps
the original work's shape: AlexNet's convolution stack on the green channel of
a colour fundus photograph, and a sigmoid per finding. The two dense layers
have 1024 units instead of 4096, to keep the file small.

Run by `machaon models build` in the Keras build environment:

    recipe.py OUT.h5 ROWS COLUMNS CHANNELS

Saved as a Keras 2 .h5 through tf-keras, as the original code saved it.
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tf_keras as keras  # noqa: E402
from tf_keras import layers  # noqa: E402

SEED, FINDINGS = 7, 7


def main(out_path, rows, columns, channels) -> int:
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(name="retina_alexnet", layers=[
        keras.Input((int(rows), int(columns), int(channels)), name="green"),
        layers.Conv2D(96, 11, strides=4, padding="same", activation="relu"),
        layers.MaxPooling2D(3, strides=2),
        layers.Conv2D(256, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(3, strides=2),
        layers.Conv2D(384, 3, padding="same", activation="relu"),
        layers.Conv2D(384, 3, padding="same", activation="relu"),
        layers.Conv2D(256, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(1024, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(FINDINGS, activation="sigmoid", name="findings"),
    ])
    model.save(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
