"""The CNN family: one builder from `ModelConfig`; the seed's Conv/MaxPool/Dropout/Dense design is one member.

    image uint8 (B, H, W, 1) -> [0, 1] -> augmentation (training only) -> [-1, 1] (fixed map, per-image
      standardisation or histogram equalization: `model.standardize`, `model.equalize`)
      -> stem (optional strided conv) -> `blocks` x [conv (+BN) + ReLU, `convs_per_block` times; max-pool 2]
      -> global average pooling | flatten -> dropout -> [concat Dense(meta)] -> Dense(dense_units) -> sigmoid

The image arrives as uint8 and becomes float inside the model, so the host moves bytes, not floats. Layers take
the global Keras dtype policy when they are built, so call `apply_precision` before `build_model`; the head is
float32 under every policy so the sigmoid and the loss never round in float16.

The seed (experiments/seed.toml) is `blocks=4 filters=32 growth=2 max_filters=128 padding="valid"
stem_filters=0 batch_norm=false dropout=0.5 dense_units=512 pooling="flatten"`: at 128 px that is
Conv(32)-Pool-Conv(64)-Pool-Conv(128)-Pool-Conv(128)-Pool-Flatten(6*6*128)-Dropout-Dense(512)-Dense(1),
2,600,577 parameters (2.36 M of them in the Dense(512) after the flatten).

The default (config.py) spends its compute at low resolution instead: a 9x9 stride-4 stem (32 filters, like
ConvNeXt's stride-4 "patchify" stem but overlapping), three BN blocks of 32/64/128 filters, global average
pooling, Dense(64); 113,313 parameters. At an equal wall-clock budget on the Kermany folder at 128 px it ran
2.9x the seed's images/s (3.1x per CPU-second) and reached an equal or better validation AUC (0.994 vs 0.990;
benchmarks/train_step.py, README).

`model.backbone` replaces the stem and blocks by a keras.applications network (pipeline/net/backbone.py); the
head (pooling, dropout, metadata, dense, sigmoid) is the same.
"""

from __future__ import annotations

import itertools

import keras

from pipeline.config import AugmentConfig, ConfigError, ModelConfig, check_model
from pipeline.data.records import (
    META_DIM,  # the side-input vector's width, defined beside the code that builds it
)
from pipeline.net.augment import HistogramEqualization, PerImageStandardization, augmentation_block
from pipeline.net.backbone import backbone_features

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
META_UNITS = 16  # the small Dense the metadata passes through before it meets the image features
# Keras' default 0.99 averages over ~100 steps: with a few hundred steps per epoch the moving statistics lag
# the weights, and validation (which uses them) read AUC 0.5-0.7 after the first Kermany epoch. 0.9 tracks.
BN_MOMENTUM = 0.9


def resolve_precision(name: str) -> str:
    """`auto` -> mixed_float16 with a GPU, float32 without (`pipeline.net.devices.auto_precision`)."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    from pipeline.net.devices import auto_precision

    return auto_precision()


def apply_precision(name: str) -> str:
    """Resolve `name` and make it Keras' global dtype policy (layers built afterwards follow it)."""
    policy = resolve_precision(name)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _float32_config(obj):
    """A layer config with every mixed dtype policy replaced by float32 (variables are float32 already)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and str(obj.get("config", {}).get("name", "")).startswith("mixed"):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        # A plain `dtype: "float16"` is what a nested Sequential's input layer records under mixed_float16.
        return {k: "float32" if k == "dtype" and v in ("float16", "bfloat16") else _float32_config(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("mixed_"):
        return "float32"  # a policy written by name
    return obj


def as_float32(m: keras.Model) -> keras.Model:
    """The same network computing in float32: a model trained under mixed_float16 keeps its layers' policy when
    saved, and would compute in float16 on a CPU (slow, and less exact than the host can afford). Its weights
    are float32 variables under either policy, so they carry over unchanged. A float32 model is returned as is."""
    if all(not str(getattr(layer, "dtype_policy", "float32").name).startswith("mixed")
           for layer in _all_layers(m)):
        return m
    rebuilt = m.__class__.from_config(_float32_config(m.get_config()))
    rebuilt.set_weights(m.get_weights())
    return rebuilt


def _all_layers(m) -> list:
    out = []
    for layer in m.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out += _all_layers(layer)
    return out


def uses_meta(m) -> bool:
    """Whether a network takes the metadata input beside the image."""
    return any(getattr(t, "name", "").split(":")[0] == "meta" for t in m.inputs)


def load_network(path: str) -> keras.Model:
    """A `.keras` file -> the network, uncompiled; on a host without a GPU a mixed-precision network is rebuilt
    in float32 (`as_float32`), so a model trained on a GPU predicts here at full precision."""
    from pipeline.net.devices import has_gpu

    m = keras.saving.load_model(path, compile=False)  # RandomAffine is registered: this module imports augment
    return m if has_gpu() else as_float32(m)


def count_params(m: keras.Model) -> int:
    return int(m.count_params())


def block_filters(cfg: ModelConfig) -> list[int]:
    """Filters of each block: `filters * growth**i`, capped at `max_filters` when that is set."""
    out = [max(1, round(cfg.filters * cfg.growth**i)) for i in range(cfg.blocks)]
    return [min(f, cfg.max_filters) for f in out] if cfg.max_filters else out


def _validate(cfg: ModelConfig, image_size: int) -> None:
    """The section's own checks (pipeline/config.py: one table of ranges and choices), then the one that needs
    the image size: each block's convs (valid padding) and pool must leave at least one pixel."""
    check_model(cfg)
    if cfg.backbone != "none":
        return  # the stem and blocks are not built (pipeline.net.backbone checks its own minimum size)
    size = -(-image_size // cfg.stem_stride) if cfg.stem_filters else image_size
    for _ in range(cfg.blocks):
        if cfg.padding == "valid":
            size -= cfg.convs_per_block * (cfg.kernel_size - 1)
        size //= 2
    if size < 1:
        raise ConfigError(f"model.blocks={cfg.blocks} shrinks a {image_size} px image to nothing: use fewer blocks, "
                          f"a smaller stem_stride or 'same' padding")


def build_model(model: ModelConfig, augment: AugmentConfig, image_size: int, *, seed: int = 0) -> keras.Model:
    """The CNN `model` describes, with `augment`'s layers ahead of it, for square `image_size` px images.

    Inputs: "image" uint8 (B, H, W, 1), and "meta" float32 (B, 6) when `model.metadata_inputs`.
    Output: (B, 1) float32 probability of pneumonia. `seed` fixes the initial weights and the augmentation.
    """
    cfg = model
    _validate(cfg, image_size)
    seeds = itertools.count(seed * 1000)  # every layer its own seed: a seeded initializer repeats its draws
    layers = keras.layers

    def conv(x, filters, kernel, strides=1, name="", activation=None):
        return layers.Conv2D(filters, kernel, strides=strides, padding=cfg.padding, activation=activation,
                             use_bias=not cfg.batch_norm, name=name,
                             kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))(x)

    def conv_relu(x, filters, kernel, strides=1, name=""):
        """Conv -> BN -> ReLU, or without BN one Conv2D(activation="relu") as the seed wrote it."""
        if not cfg.batch_norm:
            return conv(x, filters, kernel, strides, name, activation="relu")
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(conv(x, filters, kernel, strides, name))
        return layers.ReLU(name=f"{name}_relu")(x)

    image = keras.Input((image_size, image_size, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255, name="to_unit")(image)
    aug = augmentation_block(augment, seed)
    if aug is not None:
        x = aug(x)
    if cfg.backbone != "none":
        x = backbone_features(cfg, x, image_size)
    elif cfg.standardize:
        stats = cfg.standardize_stats
        x = PerImageStandardization(window=0.5 if stats == "center" else 1.0, unsaturated_only=stats != "image",
                                    saturated_to_zero=cfg.standardize_saturated == "zero", name="standardize")(x)
    elif cfg.equalize:
        x = HistogramEqualization(name="equalize")(x)
    else:
        x = layers.Rescaling(2.0, offset=-1.0, name="center")(x)  # [0, 1] -> [-1, 1]: zero-centred input
    if cfg.stem_filters and cfg.backbone == "none":
        # Kernel 2*stride+1 so neighbouring windows overlap and every pixel is seen.
        x = conv_relu(x, cfg.stem_filters, 2 * cfg.stem_stride + 1, cfg.stem_stride, "stem_conv")
    for b, filters in enumerate(block_filters(cfg) if cfg.backbone == "none" else [], start=1):
        shortcut = x
        for c in range(1, cfg.convs_per_block + 1):
            name = f"block{b}_conv{c}"
            if cfg.residual and c == cfg.convs_per_block:
                # The last conv's ReLU comes after the add, as in ResNet.
                x = conv(x, filters, cfg.kernel_size, name=name)
                if cfg.batch_norm:
                    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
                # A 1x1 projection shortcut, so the channel count may change from block to block.
                shortcut = conv(shortcut, filters, 1, name=f"block{b}_proj")
                if cfg.batch_norm:
                    shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{b}_proj_bn")(shortcut)
                x = layers.ReLU(name=f"block{b}_relu")(layers.Add(name=f"block{b}_add")([x, shortcut]))
            else:
                x = conv_relu(x, filters, cfg.kernel_size, name=name)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x) if cfg.pooling == "gap" else layers.Flatten(name="flatten")(x)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, seed=next(seeds), name="dropout")(x)
    inputs = {"image": image}
    if cfg.metadata_inputs:
        # The 4th-place RSNA design: view position, sex and age join the pooled image features before the
        # penultimate layer, so the head can weigh e.g. AP films (sicker, supine patients) differently.
        inputs["meta"] = keras.Input((META_DIM,), dtype="float32", name="meta")
        meta = layers.Dense(META_UNITS, activation="relu", name="meta_dense",
                            kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))(inputs["meta"])
        x = layers.Concatenate(name="concat_meta")([x, meta])
    if cfg.dense_units:
        x = layers.Dense(cfg.dense_units, activation="relu", name="dense",
                         kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))(x)
    out = layers.Dense(1, activation="sigmoid", dtype="float32", name="prob",
                       kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))(x)
    return keras.Model(inputs, out, name="pneumo_cnn")
