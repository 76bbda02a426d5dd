"""Train the demo lv-segmentation U-Net on phantom short-axis slices.

Run by `machaon models train lv-segmentation` in the Keras build environment,
which passes phantom data it generated (see service/machaon/tools/phantom.py):

    train.py TRAIN.npz HOLDOUT.npz OUT.h5 EVALUATION.json

Each .npz holds "x" (normalised slices, NHWC) and "labels" (0 background,
1 LV cavity, 2 myocardium). The model is saved in the Keras 2 format through
tf-keras, as the original research code saved it. Fixed seeds; CPU only.
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from tf_keras import layers  # noqa: E402

SEED, EPOCHS, BASE = 7, 5, 16


def unet(shape=(256, 256, 1), base=BASE, depth=4) -> keras.Model:
    inputs = keras.Input(shape, name="image")
    x, skips = inputs, []
    for level in range(depth):
        x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(base * 2**depth, 3, padding="same", activation="relu")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2**level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
    outputs = layers.Conv2D(2, 1, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="lv_unet")


def loss(y_true, y_pred):
    """Cross-entropy plus soft Dice on the cavity: the cavity is about 1% of a slice."""
    ce = keras.losses.categorical_crossentropy(y_true, y_pred)
    t, p = y_true[..., 1], y_pred[..., 1]
    dice = (2 * tf.reduce_sum(t * p) + 1) / (tf.reduce_sum(t) + tf.reduce_sum(p) + 1)
    return tf.reduce_mean(ce) + (1 - dice)


def dice(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(2 * (truth & predicted).sum() / max(1, truth.sum() + predicted.sum()))


def main(train_path, holdout_path, out_path, evaluation_path) -> int:
    keras.utils.set_random_seed(SEED)
    train, holdout = np.load(train_path), np.load(holdout_path)
    y = keras.utils.to_categorical(train["labels"] == 1, 2)
    model = unet(train["x"].shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    model.fit(train["x"], y, batch_size=8, epochs=EPOCHS, shuffle=True, verbose=2)
    predicted = model.predict(holdout["x"], batch_size=8, verbose=0).argmax(-1) == 1
    score = dice(holdout["labels"] == 1, predicted)
    print(f"held-out Dice {score:.4f} on {len(predicted)} slices")
    model.save(out_path, include_optimizer=False)
    with open(evaluation_path, "w") as f:
        json.dump({"data": "held-out phantom short-axis slices (seed differs from training)",
                   "metric": "dice", "value": round(score, 4), "samples": len(predicted),
                   "seed": SEED, "epochs": EPOCHS}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
