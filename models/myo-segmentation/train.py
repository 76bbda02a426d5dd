"""Train the demo Gluon myocardium segmenter on phantom short-axis slices.

Run by `machaon models train myo-segmentation` in the MXNet build environment:

    train.py TRAIN.npz HOLDOUT.npz OUT_PREFIX EVALUATION.json

Each .npz holds "x" (normalised 128x128 slices, NCHW) and "labels" (0
background, 1 LV cavity, 2 myocardium). The HybridBlock is exported as
OUT_PREFIX-symbol.json + OUT_PREFIX-0000.params, what a Gluon user hands over.
Fixed seeds; CPU only.
"""

import json
import random
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

SEED, EPOCHS, BASE = 7, 6, 16


def block(filters: int) -> nn.HybridSequential:
    seq = nn.HybridSequential()
    for _ in range(2):
        seq.add(nn.Conv2D(filters, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"))
    return seq


class Body(gluon.HybridBlock):
    """The encoder-decoder up to the class scores (logits)."""

    def __init__(self, base: int = BASE, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.enc1, self.enc2, self.enc3 = block(base), block(base * 2), block(base * 4)
            self.pool = nn.MaxPool2D()
            self.up2, self.dec2 = nn.Conv2DTranspose(base * 2, 2, strides=2), block(base * 2)
            self.up1, self.dec1 = nn.Conv2DTranspose(base, 2, strides=2), block(base)
            self.head = nn.Conv2D(2, 1)

    def hybrid_forward(self, F, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(F.concat(self.up2(e3), e2, dim=1))
        d1 = self.dec1(F.concat(self.up1(d2), e1, dim=1))
        return self.head(d1)


class MyoNet(gluon.HybridBlock):
    """What is exported: the body with a softmax over the two classes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = Body()

    def hybrid_forward(self, F, x):
        return F.softmax(self.body(x), axis=1)


cross_entropy = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)


def loss(logits, y):
    """Cross-entropy plus soft Dice on the myocardium, a thin ring."""
    p = nd.softmax(logits, axis=1)[:, 1]
    dice = (2 * (y * p).sum() + 1) / (y.sum() + p.sum() + 1)
    return cross_entropy(logits, y).mean() + (1 - dice)


def main(train_path, holdout_path, out_prefix, evaluation_path) -> int:
    random.seed(SEED)
    np.random.seed(SEED)
    mx.random.seed(SEED)
    train, holdout = np.load(train_path), np.load(holdout_path)
    x, y = train["x"], (train["labels"] == 2).astype(np.float32)
    net = MyoNet()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-3})
    for epoch in range(EPOCHS):
        order, total = np.random.permutation(len(x)), 0.0
        for i in range(0, len(x), 16):
            batch = order[i:i + 16]
            with autograd.record():
                value = loss(net.body(nd.array(x[batch])), nd.array(y[batch]))
            value.backward()
            trainer.step(1)
            total += value.asscalar() * len(batch)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / len(x):.4f}", flush=True)
    predicted = np.concatenate([net(nd.array(holdout["x"][i:i + 16])).asnumpy().argmax(1)
                                for i in range(0, len(holdout["x"]), 16)]) == 1
    truth = holdout["labels"] == 2
    score = float(2 * (truth & predicted).sum() / max(1, truth.sum() + predicted.sum()))
    print(f"held-out Dice {score:.4f} on {len(predicted)} slices")
    net.export(out_prefix, epoch=0)
    with open(evaluation_path, "w") as f:
        json.dump({"data": "held-out phantom short-axis slices (seed differs from training)",
                   "metric": "dice", "value": round(score, 4), "samples": int(len(predicted)),
                   "seed": SEED, "epochs": EPOCHS}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
