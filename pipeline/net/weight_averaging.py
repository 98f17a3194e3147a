"""Stochastic weight averaging (SWA; Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018): the mean of the weights at the end of each of the last epochs, trained at a constant
learning rate, then the batch-norm statistics recomputed for that mean (statistics gathered under the epochs'
own weights do not describe their average: the paper's `bn_update`).

Written here because Keras 3 has no SWA: TensorFlow Addons' `SWA` optimizer is archived and Keras-2 only. The
procedure follows PyTorch's reference (`torch.optim.swa_utils`: AveragedModel, SWALR's constant rate, update_bn
with a cumulative average over one pass of the training data). The learning-rate side lives in
pipeline/study/train.py (`compile_model`): the cosine decay ends where averaging starts, at
`train.swa_lr_fraction` of the initial rate, and stays there. `train.weight_averaging = "ema"` (Keras' own
averaging, pipeline/study/train.py: fit) ends with the same batch-norm recompute, since Keras averages the
trainable weights only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Snapshot the trainable weights at the end of every epoch from `first_epoch` (0-based) on, and when
    training ends put their mean into the model and recompute its batch-norm statistics over `bn_batches`
    batches of `bn_data`.

    Each epoch's snapshot is its own file under `state_dir`, written before BackupAndRestore records the epoch
    (this callback is placed first): an interrupted run resumed by the same command keeps the epochs it had,
    and an epoch run twice overwrites its own file instead of counting twice."""

    def __init__(self, first_epoch: int, state_dir: str | Path, bn_data, bn_batches: int):
        super().__init__()
        self.first_epoch, self.state_dir = first_epoch, Path(state_dir)
        self.bn_data, self.bn_batches = bn_data, bn_batches
        self.averaged_epochs: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.first_epoch:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".epoch-{epoch:04d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, *[keras.ops.convert_to_numpy(v.value) for v in self.model.trainable_weights])
        tmp.replace(self.state_dir / f"epoch-{epoch:04d}.npz")

    def on_train_end(self, logs=None):
        snapshots = sorted(self.state_dir.glob("epoch-*.npz"))  # none when the folder was never made
        if not snapshots:
            return  # training ended before the averaging window: the last weights stand
        weights = self.model.trainable_weights
        total = [np.zeros(v.shape, dtype=np.float64) for v in weights]
        for path in snapshots:
            with np.load(path) as saved:
                for acc, key in zip(total, saved.files, strict=True):
                    acc += saved[key]
        for variable, acc in zip(weights, total, strict=True):
            variable.assign((acc / len(snapshots)).astype(variable.dtype))
        self.averaged_epochs = [int(p.stem.split("-")[1]) for p in snapshots]
        recompute_batch_norm(self.model, self.bn_data, self.bn_batches)


def batch_norm_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.BatchNormalization]:
    """Every BatchNormalization inside `layer`, nested models (a keras.applications backbone) included."""
    if isinstance(layer, keras.layers.BatchNormalization):
        yield layer
    for child in getattr(layer, "layers", ()):
        yield from batch_norm_layers(child)


def recompute_batch_norm(model: keras.Model, data, batches: int) -> int:
    """Replace every batch-norm layer's moving mean and variance by the average of their batch statistics
    over `batches` batches of `data` (inputs first in each element), with the model in training mode (its
    augmentation on, as when the statistics were first gathered). Keras' update is
    moving = momentum * moving + (1 - momentum) * batch; a momentum of (k - 1) / k at the k-th batch makes it
    the cumulative mean. Returns the number of batches used (0: no batch-norm layer, nothing changed)."""
    layers = list(batch_norm_layers(model))
    if not layers:
        return 0
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        # From shapes, not zeros_like(variable): JAX cannot read a Keras variable's dtype
        bn.moving_mean.assign(keras.ops.zeros(bn.moving_mean.shape, bn.moving_mean.dtype))
        bn.moving_variance.assign(keras.ops.ones(bn.moving_variance.shape, bn.moving_variance.dtype))
    seen = 0
    try:
        for element in data:  # a tf.data pipeline or any iterable; the training one is endless
            inputs = element[0] if isinstance(element, tuple) else element
            seen += 1
            for bn in layers:
                bn.momentum = (seen - 1) / seen
            model(inputs, training=True)
            if seen >= batches:
                break
    finally:
        for bn, momentum in zip(layers, momenta, strict=True):
            bn.momentum = momentum
    return seen
