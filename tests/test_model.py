"""The CNN family: shapes and dtypes, the seed as one exact configuration, mixed precision, learning, errors."""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import AugmentConfig, ModelConfig
from pipeline.net.model import apply_precision, build_model, count_params, resolve_precision

SIZE = 32
TINY = ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=8)
NO_AUG = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0)
# The seed project's CNN, exactly (the [model] table of experiments/seed.toml).
SEED = ModelConfig(blocks=4, filters=32, growth=2.0, max_filters=128, kernel_size=3, convs_per_block=1,
                   padding="valid", stem_stride=2, stem_filters=0, batch_norm=False, residual=False,
                   dropout=0.5, dense_units=512, pooling="flatten", metadata_inputs=False)


@pytest.fixture
def float32_after():
    """Whatever a test sets, the global dtype policy is float32 again afterwards (it leaks across tests)."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def batch(n: int = 8, seed: int = 0, meta: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"image": rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)}
    if meta:
        out["meta"] = rng.random((n, 6), dtype=np.float32)
    return out


CONFIGS = {
    "gap": TINY,
    "flatten": dataclasses.replace(TINY, pooling="flatten"),
    "residual_bn": dataclasses.replace(TINY, residual=True, convs_per_block=2),
    "residual_no_bn": dataclasses.replace(TINY, residual=True, batch_norm=False),
    "no_bn_no_stem_no_dense": dataclasses.replace(TINY, batch_norm=False, stem_filters=0, dense_units=0),
    "metadata": dataclasses.replace(TINY, metadata_inputs=True),
    "metadata_flatten_residual": dataclasses.replace(TINY, metadata_inputs=True, pooling="flatten", residual=True),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_output_shape_dtype_range(cfg):
    m = build_model(cfg, AugmentConfig(), SIZE)
    assert [i.name for i in m.inputs] == (["image", "meta"] if cfg.metadata_inputs else ["image"])
    assert m.inputs[0].dtype == "uint8"
    x = batch(meta=cfg.metadata_inputs)
    y = m(x, training=False)
    assert tuple(y.shape) == (8, 1) and y.dtype == "float32"
    assert np.all((y.numpy() > 0) & (y.numpy() < 1))
    assert tuple(m(x, training=True).shape) == (8, 1)  # the augmentation path too


def _parents(model, name: str) -> list[str]:
    """The names of the layers whose outputs feed layer `name`."""
    return [t._keras_history.operation.name for t in model.get_layer(name)._inbound_nodes[0].input_tensors]


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_each_option_builds_its_layers(cfg):
    """The graph each option promises, not only its output's shape: a residual block adds its last conv to a 1x1
    projection of the block's input; batch_norm, pooling, dense_units, metadata each show up as their layers."""
    m = build_model(cfg, AugmentConfig(), SIZE)
    names = {layer.name for layer in m.layers}
    kinds = {type(layer).__name__ for layer in m.layers}
    bn = "_bn" if cfg.batch_norm else ""
    for b in range(1, cfg.blocks + 1):
        if cfg.residual:
            stem = "stem_conv_relu" if cfg.batch_norm else "stem_conv"  # without BN the ReLU is the conv's own
            block_input = f"block{b - 1}_pool" if b > 1 else (stem if cfg.stem_filters else "center")
            assert _parents(m, f"block{b}_add") == [f"block{b}_conv{cfg.convs_per_block}{bn}", f"block{b}_proj{bn}"]
            assert _parents(m, f"block{b}_proj") == [block_input]
            assert _parents(m, f"block{b}_relu") == [f"block{b}_add"]
        else:
            assert not {f"block{b}_add", f"block{b}_proj"} & names
    assert ("BatchNormalization" in kinds) == cfg.batch_norm
    assert ({"gap", "flatten"} & names) == {cfg.pooling}
    assert ("dense" in names) == bool(cfg.dense_units)
    assert ("meta_dense" in names and "concat_meta" in names) == cfg.metadata_inputs


def test_seed_configuration_is_the_seed_cnn():
    m = build_model(SEED, AugmentConfig(), 128)
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds == ["InputLayer", "Rescaling", "Sequential", "Rescaling",
                     "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                     "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                     "Flatten", "Dropout", "Dense", "Dense"]
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 128]
    assert {(c.kernel_size, c.padding, c.activation.__name__) for c in convs} == {((3, 3), "valid", "relu")}
    dropout, hidden, head = m.layers[-3:]
    assert dropout.rate == 0.5
    assert (hidden.units, hidden.activation.__name__) == (512, "relu")
    assert (head.units, head.activation.__name__) == (1, "sigmoid")
    assert m.get_layer("flatten").output.shape[1] == 6 * 6 * 128
    assert count_params(m) == 2_600_577


def test_default_is_small_and_fast_shaped():
    """The default: a strided stem (the first layer works at 1/4 resolution), global average pooling, BN."""
    m = build_model(ModelConfig(), AugmentConfig(), 128)
    assert m.get_layer("stem_conv").strides == (4, 4)
    assert m.get_layer("stem_conv").output.shape[1] == 32
    assert m.get_layer("gap") is not None and m.get_layer("stem_conv_bn").momentum == 0.9
    assert count_params(m) == 113_313


def test_same_seed_same_weights():
    a, b, c = (build_model(TINY, NO_AUG, SIZE, seed=s) for s in (1, 1, 2))
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_layer("block1_conv1").get_weights()[0],
                              c.get_layer("block1_conv1").get_weights()[0])


@pytest.mark.parametrize("devices,expected", [
    ([], "float32"),
    ([tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")], "mixed_float16"),
])
def test_resolve_precision(monkeypatch, devices, expected):
    """Both branches of `auto` on any host: the device list is faked at the TF API, so the test holds on a GPU
    machine too and survives device detection moving to another module."""
    seen = []

    def fake(device_type=None):
        seen.append(device_type)
        return list(devices) if device_type in ("GPU", None) else []

    monkeypatch.setattr(tf.config, "list_physical_devices", fake)
    assert resolve_precision("auto") == expected
    assert seen, "resolve_precision did not ask TensorFlow for its devices (a cached answer?)"
    assert resolve_precision("float32") == "float32"  # an explicit choice ignores the devices
    assert resolve_precision("mixed_float16") == "mixed_float16"
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("float16")


@pytest.mark.slow
def test_mixed_float16_computes_in_half_and_outputs_float32(float32_after):
    assert apply_precision("mixed_float16") == "mixed_float16"
    cfg = dataclasses.replace(TINY, residual=True, metadata_inputs=True)
    m = build_model(cfg, AugmentConfig(), SIZE)
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(c.compute_dtype == "float16" for c in convs)
    assert m.get_layer("prob").compute_dtype == "float32"
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras adds loss scaling itself
    x, y = batch(16), np.tile([0.0, 1.0], 8).astype(np.float32)
    history = m.fit(x, y, batch_size=8, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    out = m.predict(x, verbose=0)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(w)) for w in m.get_weights())


@pytest.mark.slow
def test_learns_a_separable_dataset():
    """Dark images are 0, bright images are 1: a working model drives the loss down in a few steps."""
    rng = np.random.default_rng(0)
    labels = np.tile([0.0, 1.0], 16).astype(np.float32)
    images = (60 + 120 * labels[:, None, None, None] + rng.normal(0, 10, (32, SIZE, SIZE, 1)))
    x = {"image": np.clip(images, 0, 255).astype(np.uint8)}
    m = build_model(dataclasses.replace(TINY, dropout=0.0), NO_AUG, SIZE, seed=0)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    before = m.evaluate(x, labels, verbose=0)
    m.fit(x, labels, batch_size=16, epochs=10, verbose=0)
    after = m.evaluate(x, labels, verbose=0)
    assert after < 0.5 * before
    assert np.all((m.predict(x, verbose=0)[:, 0] > 0.5) == (labels > 0.5))


def test_metadata_changes_the_prediction():
    m = build_model(dataclasses.replace(TINY, metadata_inputs=True), NO_AUG, SIZE)
    x = batch(4)
    ap = {"image": x["image"], "meta": np.tile([[1, 0, 1, 0, 0.7, 1]], (4, 1)).astype(np.float32)}
    pa = {"image": x["image"], "meta": np.tile([[0, 1, 0, 1, 0.2, 1]], (4, 1)).astype(np.float32)}
    assert not np.allclose(m(ap, training=False), m(pa, training=False))


def test_extra_meta_key_is_ignored_by_an_image_only_model():
    """Keras 3.15 accepts a dict with an extra key (it warns once per trace) and ignores it."""
    m = build_model(TINY, NO_AUG, SIZE)
    x = batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with_meta = m(x, training=False)
    np.testing.assert_array_equal(with_meta, m({"image": x["image"]}, training=False))


@pytest.mark.parametrize("change,key", [
    ({"pooling": "max"}, "model.pooling"),
    ({"padding": "full"}, "model.padding"),
    ({"blocks": 0}, "model.blocks"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"growth": 0.0}, "model.growth"),
    ({"stem_filters": -1}, "model.stem_filters"),
    ({"residual": True, "padding": "valid"}, "model.residual"),
    ({"blocks": 6}, "model.blocks"),  # 32 px / stem 2 / 2**6: nothing left
])
def test_bad_values_name_the_key(change, key):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        build_model(dataclasses.replace(TINY, **change), AugmentConfig(), SIZE)


@pytest.mark.slow
def test_mixed_precision_model_loads_and_predicts_in_float32_on_the_cpu(float32_after, tmp_path):
    """Trained a few steps under mixed_float16 and logged as the project logs models (the serving pyfunc), the
    model loads on this CPU-only host with float32 layers and predicts what the float16 network predicted."""
    import mlflow

    from pipeline.artifact import tracking
    from pipeline.artifact.model_store import load_keras

    apply_precision("mixed_float16")
    cfg = dataclasses.replace(TINY, metadata_inputs=False)
    m = build_model(cfg, AugmentConfig(), SIZE)  # with augmentation layers: nested configs convert too
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    x, y = batch(32, meta=False), np.tile([0.0, 1.0], 16).astype(np.float32)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0)
    mixed = m.predict(x, verbose=0).reshape(-1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = tracking.ensure_experiment("mixed", uri)
    with mlflow.start_run(experiment_id=experiment):
        info = tracking.log_keras_model(m, SIZE, with_meta=False)

    keras.mixed_precision.set_global_policy("float32")  # a fresh CPU process's policy
    loaded = load_keras(info.model_uri)
    convs = [layer for layer in loaded.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(c.compute_dtype == "float32" and c.dtype_policy.name == "float32" for c in convs)
    nested = [layer for s in loaded.layers if hasattr(s, "layers") for layer in s.layers]
    assert nested and all(layer.dtype_policy.name == "float32" for layer in nested)
    full = loaded.predict(x, verbose=0).reshape(-1)
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, mixed, atol=5e-3)  # float16 activations round at ~1e-3
    assert np.ptp(full) > 1e-3  # a trained network, not a constant: the comparison means something
    # The float32 reference: the same weights in a network built under float32 from the start.
    ref = build_model(cfg, AugmentConfig(), SIZE)
    ref.set_weights(loaded.get_weights())
    np.testing.assert_allclose(full, ref.predict(x, verbose=0).reshape(-1), rtol=1e-5, atol=1e-6)
