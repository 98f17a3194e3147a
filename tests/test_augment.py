"""Augmentation layers: identity at inference, random in training, eagerly and inside tf.data.Dataset.map.

Every preprocessing op runs twice, eagerly and in a tf.data graph, because the two differ
more often than one expects (Keras' preprocessing layers even switch backend inside tf.data).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import AugmentConfig
from pipeline.net.augment import RandomAffine, augmentation_block

SIZE = 32
MODES = ["eager", "dataset_map"]
KINDS = [pytest.param(False, id="keras_layers"), pytest.param(True, id="xla_safe")]


def images(n: int = 4) -> tf.Tensor:
    """Smooth float images in [0, 1]: a bright disc on a gradient, so every transform shows."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1)
    base = 0.2 + 0.3 * xx + 0.5 * (((yy - 0.4) ** 2 + (xx - 0.6) ** 2) < 0.05)
    return tf.constant(np.repeat(base[None, ..., None], n, axis=0), tf.float32)


def apply(block, x, training: bool, mode: str) -> np.ndarray:
    if mode == "eager":
        return block(x, training=training).numpy()
    ds = tf.data.Dataset.from_tensors(x).map(lambda t: block(t, training=training))
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("xla_safe", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_inference_is_exact_identity(mode, xla_safe):
    x = images()
    block = augmentation_block(AugmentConfig(xla_safe=xla_safe, horizontal_flip=True), seed=0)
    np.testing.assert_array_equal(apply(block, x, training=False, mode=mode), x.numpy())


@pytest.mark.parametrize("xla_safe", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_training_changes_batch_and_keeps_range(mode, xla_safe):
    x = images()
    out = apply(augmentation_block(AugmentConfig(xla_safe=xla_safe), seed=0), x, training=True, mode=mode)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.abs(out - x.numpy()).mean() > 1e-3
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Each image draws its own transform.
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("xla_safe", KINDS)
def test_layers_follow_config(xla_safe):
    block = augmentation_block(AugmentConfig(xla_safe=xla_safe), seed=0)
    geometric = ["affine"] if xla_safe else ["rotation", "zoom", "translation"]
    assert [layer.name for layer in block.layers] == [*geometric, "contrast", "brightness"]
    flip = augmentation_block(AugmentConfig(xla_safe=xla_safe, horizontal_flip=True), seed=0)
    assert flip.layers[0].name == "flip"
    only_contrast = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, brightness=0.0, xla_safe=xla_safe)
    assert [layer.name for layer in augmentation_block(only_contrast, seed=0).layers] == ["contrast"]


def test_all_zero_means_no_block():
    off = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0)
    assert augmentation_block(off, seed=0) is None


@pytest.mark.parametrize("key,value", [("rotation", -0.1), ("rotation", 0.5), ("zoom", 1.0), ("contrast", 1.0),
                                       ("brightness", -1.0)])
def test_bad_strength_names_the_key(key, value):
    """The ranges of pipeline/config.py:BOUNDS, for an AugmentConfig built in code as for one read from a file."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=f"'augment.{key}' must be in"):
        augmentation_block(dataclasses.replace(AugmentConfig(), **{key: value}), seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_random_affine_zero_strength_is_identity(mode):
    x = images()
    np.testing.assert_allclose(apply(RandomAffine(0.0, 0.0, 0.0, seed=0), x, True, mode), x.numpy(), atol=1e-6)


def test_random_affine_geometry():
    """A constant image stays constant near the centre (a small rotation/zoom/shift moves only the borders),
    and pure translation by a fraction t moves content by at most t * size pixels."""
    ones = tf.ones((8, SIZE, SIZE, 1))
    out = RandomAffine(0.02, 0.1, 0.05, seed=1)(ones, training=True).numpy()
    np.testing.assert_allclose(out[:, 8:-8, 8:-8], 1.0, atol=1e-5)
    assert out.min() < 0.5  # something came from outside the image: black fill
    dot = np.zeros((1, SIZE, SIZE, 1), np.float32)
    dot[0, 16, 16] = 1.0
    shifted = RandomAffine(0.0, 0.0, 0.1, seed=2)(tf.constant(np.repeat(dot, 8, 0)), training=True).numpy()
    for img in shifted:
        ys, xs = np.nonzero(img[..., 0] > 1e-6)
        assert np.abs(ys - 16).max() <= 0.1 * SIZE + 1 and np.abs(xs - 16).max() <= 0.1 * SIZE + 1
        assert img.sum() == pytest.approx(1.0, abs=1e-5)  # bilinear weights sum to one: mass is kept


def test_random_affine_compiles_under_xla():
    layer = RandomAffine(0.02, 0.1, 0.05, seed=0)
    x = images()
    out = tf.function(lambda t: layer(t, training=True), jit_compile=True)(x)
    assert out.shape == x.shape and np.abs(out.numpy() - x.numpy()).mean() > 1e-3


@pytest.mark.parametrize("xla_safe,expect_jit", [(False, False), (True, True)])
def test_model_jit_compile_effective_value(xla_safe, expect_jit):
    """Keras' rotation/zoom/translation layers turn jit_compile off; the xla_safe block keeps it on."""
    inp = keras.Input((SIZE, SIZE, 1))
    x = augmentation_block(AugmentConfig(xla_safe=xla_safe), seed=0)(inp)
    m = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(x)))
    if expect_jit:
        m.compile(optimizer="sgd", loss="mse", jit_compile=True)
    else:
        with pytest.warns(UserWarning, match="jit_compile=False"):
            m.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert m.jit_compile is expect_jit
    m.fit(images(8), np.zeros((8, 1), np.float32), epochs=1, verbose=0)  # and it actually runs
