"""Augmentation as Keras layers placed inside the model, ahead of the CNN.

Inside the model the random transforms run in the train step, on the accelerator, and the host only moves
uint8 bytes; Keras' preprocessing layers are active only when called with `training=True`, so evaluation and
prediction see the image untouched. The block expects float images in [0, 1] (the model rescales uint8 first).

Keras 3.15's RandomRotation/RandomZoom/RandomTranslation use `ImageProjectiveTransformV3`, which has no XLA
kernel ("No registered 'ImageProjectiveTransformV3' OpKernel for XLA_CPU_JIT"), so with them in the model
`jit_compile=True` is turned off (the layers say `supports_jit = False`). `xla_safe = true` swaps the three
for `RandomAffine` below: one rotation+zoom+translation matrix per image, applied by bilinear sampling built
from gathers, which XLA compiles.
"""

from __future__ import annotations

import itertools
import math

import keras
from keras import ops

from pipeline.config import AugmentConfig

# Out-of-image pixels become black, like a collimated or shifted film; "reflect" (Keras' default) would
# mirror ribs and lung edges into the border, shapes a model could mistake for opacities.
FILL_MODE = "constant"
VALUE_RANGE = (0.0, 1.0)
# Upper bounds (exclusive): a turn, a zoom or shift by the whole size, zero contrast are not augmentations.
LIMITS = {"rotation": 0.5, "zoom": 1.0, "translation": 1.0, "contrast": 1.0, "brightness": 1.0}


def augmentation_block(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """The augmentation layers `cfg` asks for (a strength of 0 leaves its layer out); None if there are none.

    Each layer gets its own seed (seed, seed+1, ...) so two layers never draw the same random numbers.
    """
    for key, high in LIMITS.items():
        value = getattr(cfg, key)
        if not 0 <= value < high:
            raise ValueError(f"augment.{key} must be in [0, {high}), got {value!r}")
    seeds = itertools.count(seed)
    layers: list[keras.Layer] = []
    if cfg.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=next(seeds), name="flip"))
    if cfg.xla_safe:
        if cfg.rotation or cfg.zoom or cfg.translation:
            layers.append(RandomAffine(cfg.rotation, cfg.zoom, cfg.translation, seed=next(seeds), name="affine"))
    else:
        if cfg.rotation:
            layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode=FILL_MODE, seed=next(seeds),
                                                      name="rotation"))
        if cfg.zoom:
            # width_factor=None: the same zoom on both axes, so the aspect ratio is kept.
            layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode=FILL_MODE, seed=next(seeds), name="zoom"))
        if cfg.translation:
            layers.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode=FILL_MODE,
                                                         seed=next(seeds), name="translation"))
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=VALUE_RANGE, seed=next(seeds),
                                                  name="contrast"))
    if cfg.brightness:
        layers.append(keras.layers.RandomBrightness(cfg.brightness, value_range=VALUE_RANGE, seed=next(seeds),
                                                    name="brightness"))
    return keras.Sequential(layers, name="augment") if layers else None


@keras.saving.register_keras_serializable(package="pneumo")
class RandomAffine(keras.layers.Layer):
    """Random rotation, zoom and translation in one resampling, from XLA-compilable ops.

    Strengths in the units of Keras' layers: `rotation` a fraction of a full turn, `zoom` and `translation`
    fractions of the image size (zoom > 0 shows more of the image, as in RandomZoom). Bilinear interpolation,
    black outside the image. Identity when `training` is false.
    """

    def __init__(self, rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.zoom, self.translation, self.seed = rotation, zoom, translation, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images, training=None):
        if not training:
            return images
        dtype = images.dtype
        images = ops.cast(images, "float32")  # sampling weights in float32 even under a float16 policy
        b, h, w, c = ops.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]

        def draw(strength):
            return keras.random.uniform((b,), -strength, strength, seed=self.seed_generator)

        angle = draw(self.rotation) * 2.0 * math.pi
        scale = 1.0 + draw(self.zoom)  # output -> input scale: > 1 samples a larger area (zoom out)
        tx, ty = draw(self.translation) * w, draw(self.translation) * h
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale

        # Output pixel (x, y), centred, maps to input (cos*x - sin*y - tx, sin*x + cos*y - ty), re-centred.
        ys, xs = ops.meshgrid(ops.arange(h, dtype="float32") - (h - 1) / 2,
                              ops.arange(w, dtype="float32") - (w - 1) / 2, indexing="ij")
        xs, ys = ops.reshape(xs, (1, h * w)), ops.reshape(ys, (1, h * w))
        src_x = cos[:, None] * xs - sin[:, None] * ys - tx[:, None] + (w - 1) / 2
        src_y = sin[:, None] * xs + cos[:, None] * ys - ty[:, None] + (h - 1) / 2

        flat = ops.reshape(images, (b, h * w, c))
        x0, y0 = ops.floor(src_x), ops.floor(src_y)
        fx, fy = src_x - x0, src_y - y0
        out = 0.0
        for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
            for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                index = ops.cast(ops.clip(yi, 0, h - 1) * w + ops.clip(xi, 0, w - 1), "int32")
                tap = ops.take_along_axis(flat, index[:, :, None], axis=1)  # (b, h*w, 1) broadcasts over c
                out = out + tap * ops.cast(inside, "float32")[:, :, None] * (wx * wy)[:, :, None]
        return ops.cast(ops.reshape(out, (b, h, w, c)), dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "seed": self.seed}
