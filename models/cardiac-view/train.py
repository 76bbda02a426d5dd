"""Train the demo cardiac-view CNN on phantom images of the four views.

Run by `machaon models train cardiac-view` in the Keras build environment:

    train.py TRAIN.npz HOLDOUT.npz OUT.keras EVALUATION.json

Each .npz holds "x" (normalised 64x64 images, NHWC) and "labels" (view index:
0 short axis, 1 two-chamber, 2 three-chamber, 3 four-chamber). Saved in the
Keras 3 format. Fixed seeds; CPU only.
"""

import json
import sys

import keras
import numpy as np
from keras import layers

SEED, EPOCHS = 7, 30


def cnn(shape=(64, 64, 1), classes=4) -> keras.Model:
    inputs = keras.Input(shape, name="image")
    x = inputs
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(classes, activation="softmax", name="views")(x)
    return keras.Model(inputs, outputs, name="cardiac_view")


def main(train_path, holdout_path, out_path, evaluation_path) -> int:
    keras.utils.set_random_seed(SEED)
    train, holdout = np.load(train_path), np.load(holdout_path)
    model = cnn(train["x"].shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train["x"], train["labels"], batch_size=32, epochs=EPOCHS, shuffle=True, verbose=2)
    predicted = model.predict(holdout["x"], batch_size=32, verbose=0).argmax(-1)
    accuracy = float((predicted == holdout["labels"]).mean())
    print(f"held-out accuracy {accuracy:.4f} on {len(predicted)} images")
    model.save(out_path)
    with open(evaluation_path, "w") as f:
        json.dump({"data": "held-out phantom images of the four views (seed differs from training)",
                   "metric": "accuracy", "value": round(accuracy, 4), "samples": len(predicted),
                   "seed": SEED, "epochs": EPOCHS}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
