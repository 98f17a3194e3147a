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

from pipeline.config import AugmentConfig, check_section

# Out-of-image pixels become black, like a collimated or shifted film; "reflect" (Keras' default) would
# mirror ribs and lung edges into the border, shapes a model could mistake for opacities.
FILL_MODE = "constant"
VALUE_RANGE = (0.0, 1.0)


def augmentation_block(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """The augmentation layers `cfg` asks for (a strength of 0 leaves its layer out); None if there are none.

    Each layer gets its own seed (seed, seed+1, ...) so two layers never draw the same random numbers.
    """
    check_section("augment", cfg)  # the ranges of pipeline/config.py:BOUNDS (a config built in code too)
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
    # Acquisition-style intensity changes (the shift battery's kinds, pipeline/evaluate/shift.py), after the photometric
    # layers so the noise is not rescaled by them.
    if cfg.gamma:
        layers.append(RandomGamma(cfg.gamma, seed=next(seeds), name="gamma"))
    if cfg.blur:
        layers.append(RandomBlur(cfg.blur, seed=next(seeds), name="blur"))
    if cfg.noise:
        layers.append(RandomNoise(cfg.noise, seed=next(seeds), name="noise"))
    return keras.Sequential(layers, name="augment") if layers else None


class _RandomIntensity(keras.layers.Layer):
    """Base of the intensity layers: keras.ops only (backend-neutral: TF, JAX), float32 maths under any dtype
    policy, identity when `training` is false, output clipped to [0, 1]."""

    def __init__(self, strength: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.seed = float(strength), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or not self.strength:
            return images
        dtype = images.dtype
        x = ops.cast(images, "float32")
        out = ops.clip(self.transform(x, ops.shape(x)[0]), 0.0, 1.0)
        return ops.cast(out, dtype)

    def per_image(self, b, low, high):
        return keras.random.uniform((b, 1, 1, 1), low, high, seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


@keras.saving.register_keras_serializable(package="pneumo")
class RandomGamma(_RandomIntensity):
    """x ** gamma with log(gamma) ~ U(-strength, strength) per image: another detector response curve."""

    def transform(self, x, b):
        gamma = ops.exp(self.per_image(b, -self.strength, self.strength))
        return ops.power(ops.maximum(x, 1e-6), gamma)


@keras.saving.register_keras_serializable(package="pneumo")
class RandomNoise(_RandomIntensity):
    """Additive Gaussian noise with a per-image std ~ U(0, strength) (grey units of [0, 1]): a lower dose."""

    def transform(self, x, b):
        std = self.per_image(b, 0.0, self.strength)
        return x + std * keras.random.normal(ops.shape(x), seed=self.seed_generator)


@keras.saving.register_keras_serializable(package="pneumo")
class RandomBlur(_RandomIntensity):
    """x + w (blur(x) - x) with w ~ U(-strength, strength) per image: w > 0 blurs (a softer detector), w < 0 is
    unsharp masking (a device's sharpening). The blur is a fixed 5-tap Gaussian (sigma 1 px), separable, with
    reflected borders, so one pair of convolutions serves every image whatever its weight."""

    KERNEL = (0.05448868, 0.24420134, 0.40261995, 0.24420134, 0.05448868)  # sigma 1, normalised

    def transform(self, x, b):
        k = ops.convert_to_tensor(self.KERNEL, dtype="float32")
        c = x.shape[-1] or 1
        padded = ops.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="reflect")
        kv = ops.tile(ops.reshape(k, (5, 1, 1, 1)), (1, 1, c, 1))
        kh = ops.tile(ops.reshape(k, (1, 5, 1, 1)), (1, 1, c, 1))
        blurred = ops.depthwise_conv(ops.depthwise_conv(padded, kv, padding="valid"), kh, padding="valid")
        w = self.per_image(b, -self.strength, self.strength)
        return x + w * (blurred - x)


def affine_resample(images, angle, scale, tx, ty):
    """float32 images (B, H, W, C) -> each rotated by `angle` (radians), scaled by `scale` (the output -> input
    scale: > 1 samples a larger area, i.e. zooms out) and shifted by (`tx`, `ty`) pixels about its centre, all
    (B,) tensors; bilinear interpolation, black outside the image. Gathers only, so XLA compiles it (Keras'
    ImageProjectiveTransformV3 has no XLA kernel). Shared by `RandomAffine` (training) and `FixedAffine` (the
    test-time views, pipeline/net/tta.py)."""
    b, h, w, c = ops.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
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
    return ops.reshape(out, (b, h, w, c))


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
        b, h, w = ops.shape(images)[0], images.shape[1], images.shape[2]

        def draw(strength):
            return keras.random.uniform((b,), -strength, strength, seed=self.seed_generator)

        angle = draw(self.rotation) * 2.0 * math.pi
        scale = 1.0 + draw(self.zoom)  # output -> input scale: > 1 samples a larger area (zoom out)
        tx, ty = draw(self.translation) * w, draw(self.translation) * h
        return ops.cast(affine_resample(images, angle, scale, tx, ty), dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "seed": self.seed}


@keras.saving.register_keras_serializable(package="pneumo")
class FixedAffine(keras.layers.Layer):
    """One fixed zoom and shift of every image, in training and inference alike: a test-time view
    (pipeline/net/tta.py). `scale` is the output -> input scale (< 1 zooms in, > 1 zooms out with black margins);
    `shift_x`, `shift_y` fractions of the width and height (positive moves the content right and down). Takes and
    returns the model's uint8 images (rounded), so the network it feeds sees the same input type as ever."""

    def __init__(self, scale: float = 1.0, shift_x: float = 0.0, shift_y: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.shift_x, self.shift_y = float(scale), float(shift_x), float(shift_y)

    def call(self, images):
        dtype = images.dtype
        x = ops.cast(images, "float32")
        b, h, w = ops.shape(x)[0], x.shape[1], x.shape[2]
        per_image = ops.ones((b,), "float32")
        out = affine_resample(x, per_image * 0.0, per_image * self.scale, per_image * (self.shift_x * w),
                              per_image * (self.shift_y * h))
        if dtype == "uint8":
            out = ops.round(ops.clip(out, 0.0, 255.0))
        return ops.cast(out, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "shift_x": self.shift_x, "shift_y": self.shift_y}


@keras.saving.register_keras_serializable(package="pneumo")
class HistogramEqualization(keras.layers.Layer):
    """Global histogram equalization per image (Gonzalez & Woods, Digital Image Processing, 4th ed., sec. 3.3),
    over the image's unsaturated pixels: each pixel strictly between black and white becomes the fraction of
    those pixels darker than it (the mid-rank empirical CDF over `levels` grey levels); black stays black and
    white stays white. The result is mapped to [-1, 1].

    Any strictly increasing change of the grey scale (exposure, contrast, gamma) leaves the ranks and so the
    output unchanged, as long as it neither clips nor merges 8-bit levels: a film's intensity profile no longer
    reaches the convs. Saturated pixels are left out of the histogram because on a film they are mostly not
    anatomy: a black margin (a collimated or zoomed-out film, letterbox bars) or a white frame (a scanned film)
    would otherwise shift every other pixel's rank by its area (measured, one seed: with them counted, the white-frame family's AUC was 0.935 and specificity at
    the stored threshold fell by 0.54; left out, 0.964 and 0.03; README, "A proxy for travels"). Preprocessing,
    active in training and inference alike; keras.ops only (TensorFlow and JAX; XLA-safe: the histogram is a
    segment sum of static size)."""

    def __init__(self, levels: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.levels = int(levels)

    def call(self, x):
        x = ops.cast(x, "float32")  # [0, 1]
        shape = ops.shape(x)
        top = self.levels - 1
        n = x.shape[1] * x.shape[2] * x.shape[3]
        flat = ops.reshape(ops.cast(ops.clip(ops.round(x * top), 0, top), "int32"), (-1, n))
        images = shape[0]
        counted = ops.cast((flat > 0) & (flat < top), "float32")
        # One histogram per image: image i's level l is segment i * levels + l; saturated pixels weigh 0.
        segment = flat + ops.expand_dims(ops.arange(images, dtype="int32") * self.levels, 1)
        counts = ops.segment_sum(ops.reshape(counted, (-1,)), ops.reshape(segment, (-1,)),
                                 num_segments=images * self.levels)
        counts = ops.reshape(counts, (-1, self.levels))
        total = ops.maximum(ops.sum(counts, axis=1, keepdims=True), 1.0)
        # Mid-rank: the counted pixels below a level plus half of its own, so a flat image maps to 0, not 1.
        cdf = (ops.cumsum(counts, axis=1) - 0.5 * counts) / total
        ranked = ops.take_along_axis(cdf, flat, axis=1) * 2.0 - 1.0
        out = ops.where(flat == 0, -1.0, ops.where(flat == top, 1.0, ranked))
        return ops.reshape(out, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "levels": self.levels}


@keras.saving.register_keras_serializable(package="pneumo")
class PerImageStandardization(keras.layers.Layer):
    """(x - mean) / max(std, 1/sqrt(N)) per image, as tf.image.per_image_standardization but in keras.ops (so
    the model stays backend-neutral): a film's overall exposure and contrast no longer reach the convs. Active
    in training and inference alike (it is preprocessing, not augmentation). It lives here because
    pipeline.artifact.model_store imports this module to register the project's custom layers before loading.

    `window` < 1 takes the mean and std from the central `window` fraction of each side only, and
    `unsaturated_only` from pixels strictly between black and white: a white frame, black letterbox bars or
    the black margin of a zoomed-out film then leave the statistics alone (over the whole image, a white
    frame's pixels dominate them: experiments/kermany.toml's ablation). The defaults are the whole-image form,
    so models saved before these arguments existed load unchanged.

    `saturated_to_zero` outputs 0 (the mean) for black and white pixels of the whole image: a black margin is
    then as flat as under the fixed [-1, 1] map, instead of 2-4 standard deviations below the mean."""

    def __init__(self, window: float = 1.0, unsaturated_only: bool = False, saturated_to_zero: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < window <= 1.0:
            raise ValueError(f"PerImageStandardization window must be in (0, 1], got {window!r}")
        self.window = float(window)
        self.unsaturated_only = bool(unsaturated_only)
        self.saturated_to_zero = bool(saturated_to_zero)

    @staticmethod
    def _unsaturated(x):
        # Half a grey level from either end: 0 and 255 after the model's 1/255 rescale, whatever rounding.
        return ops.cast((x > 0.5 / 255) & (x < 254.5 / 255), "float32")

    def call(self, x):
        x = ops.cast(x, "float32")
        h, w = x.shape[1], x.shape[2]
        n = h * w * x.shape[3]
        top, left = int(round(h * (1 - self.window) / 2)), int(round(w * (1 - self.window) / 2))
        window = (slice(None), slice(top, h - top), slice(left, w - left), slice(None))
        unsaturated = self._unsaturated(x) if self.unsaturated_only or self.saturated_to_zero else None
        region = x[window]
        weight = unsaturated[window] if self.unsaturated_only else ops.ones_like(region)
        count = ops.maximum(ops.sum(weight, axis=(1, 2, 3), keepdims=True), 1.0)
        mean = ops.sum(region * weight, axis=(1, 2, 3), keepdims=True) / count
        std = ops.sqrt(ops.sum(weight * ops.square(region - mean), axis=(1, 2, 3), keepdims=True) / count)
        out = (x - mean) / ops.maximum(std, 1.0 / n**0.5)
        return out * unsaturated if self.saturated_to_zero else out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "window": self.window, "unsaturated_only": self.unsaturated_only,
                "saturated_to_zero": self.saturated_to_zero}
