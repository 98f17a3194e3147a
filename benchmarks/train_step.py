"""Training throughput: the seed CNN against the default CNN, 128 px, batch 32, float32, on this machine.

    .venv/bin/python benchmarks/train_step.py        # ~3 min on 2 CPU cores

Both models get the same default augmentation and the same in-memory tf.data pipeline of uint8 images, and
run interleaved in one process (seed, default, seed, default, ...), because throughput on this CPU is bimodal
between identical runs: a comparison across runs or processes measures the machine, not the model. CPU
seconds (time.process_time: all threads of the process, the tf.data threads included) are shown beside wall
seconds for the same reason.

Input wait is measured directly, not inferred: the loop hands Keras' own compiled train step
(`model.train_function`, the function `fit` runs) an iterator wrapper that adds up the time spent inside
`next()` on the prefetching tf.data iterator. wait % = that time / the repeat's wall time. Keras runs a
non-tf.data iterator one batch per call in Python, and a tf.function call on CPU returns when the step is
done, so the two clocks do not overlap.

Extra rows (not in the ratio) measure the XLA-compatible augmentation (augment.xla_safe = true) with
jit_compile off and on. Ends with one line: ratio=<default img/s / seed img/s> target=4.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.config import AugmentConfig, ModelConfig  # noqa: E402
from pipeline.model import apply_precision, build_model  # noqa: E402

IMAGE_SIZE, BATCH, N_IMAGES = 128, 32, 512
WARMUP_STEPS, STEPS, REPEATS = 3, 20, 5
SEED_MODEL = ModelConfig(blocks=4, filters=32, growth=2.0, max_filters=128, padding="valid", stem_filters=0,
                         batch_norm=False, residual=False, dropout=0.5, dense_units=512, pooling="flatten")


def dataset() -> tf.data.Dataset:
    """Synthetic 'X-rays': a bright disc (positive) or none on smooth noise, uint8, held in memory."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    labels = rng.integers(0, 2, N_IMAGES).astype("float32")
    images = rng.normal(100, 20, (N_IMAGES, IMAGE_SIZE, IMAGE_SIZE))
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(30, IMAGE_SIZE - 30, 2)
        images[i] += 80 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 15**2)
    images = np.clip(images, 0, 255).astype("uint8")[..., None]
    ds = tf.data.Dataset.from_tensor_slices(({"image": images}, labels))
    return (ds.shuffle(N_IMAGES, seed=0)  # a true shuffle of the whole (small) set
            .repeat()  # endless: the loop decides how many steps
            .batch(BATCH, drop_remainder=True)  # fixed shapes: one trace of the train step
            .prefetch(tf.data.AUTOTUNE))  # the next batch is ready while this step trains


class TimedIterator:
    """Wraps an iterator; `waited` accumulates the seconds spent inside next()."""

    def __init__(self, it):
        self.it, self.waited = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        batch = next(self.it)
        self.waited += time.perf_counter() - t
        return batch


def compiled(model_cfg: ModelConfig, augment: AugmentConfig, jit: bool) -> keras.Model:
    m = build_model(model_cfg, augment, IMAGE_SIZE, seed=0)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=jit)
    return m


def run(model: keras.Model, it: TimedIterator, steps: int) -> tuple[float, float, float]:
    """(wall s, CPU s, input-wait s) for `steps` train steps."""
    waited0, wall0, cpu0 = it.waited, time.perf_counter(), time.process_time()
    for _ in range(steps):
        logs = model.train_function(it)  # one batch per call from a Python iterator
    float(logs["loss"])  # fetch a value: the steps are surely done
    return time.perf_counter() - wall0, time.process_time() - cpu0, it.waited - waited0


def main() -> None:
    tf.get_logger().setLevel("ERROR")  # warm-up traces the step twice (train_on_batch, then the loop): expected
    apply_precision("float32")
    aug = AugmentConfig()
    variants = {
        "seed": (SEED_MODEL, aug, False),
        "default": (ModelConfig(), aug, False),
        "default, xla_safe aug": (ModelConfig(), dataclasses.replace(aug, xla_safe=True), False),
        "default, xla_safe aug + XLA": (ModelConfig(), dataclasses.replace(aug, xla_safe=True), True),
    }
    models, iters, results = {}, {}, {name: [] for name in variants}
    for name, (mcfg, acfg, jit) in variants.items():
        models[name] = compiled(mcfg, acfg, jit)
        iters[name] = TimedIterator(iter(dataset()))
        x, y = next(iters[name])
        models[name].train_on_batch(x, y)  # builds the optimizer and traces the step
        run(models[name], iters[name], WARMUP_STEPS)
    for _ in range(REPEATS):
        for name in variants:  # interleaved, so a slow phase of the machine hits every model
            results[name].append(run(models[name], iters[name], STEPS))

    images = STEPS * BATCH
    print(f"\n{IMAGE_SIZE} px, batch {BATCH}, float32, {REPEATS} repeats x {STEPS} steps after "
          f"{WARMUP_STEPS} warm-up steps; medians (min-max of img/s)")
    print(f"{'model':30} {'params':>9} {'XLA':>5} {'img/s wall':>18} {'img/CPU-s':>10} {'CPU/wall':>9} {'wait %':>7}")
    rates = {}
    for name, rows in results.items():
        walls = [images / w for w, _, _ in rows]
        rates[name] = statistics.median(walls)
        cpu = statistics.median(images / c for _, c, _ in rows)
        load = statistics.median(c / w for w, c, _ in rows)
        wait = statistics.median(100 * s / w for w, _, s in rows)
        m = models[name]
        print(f"{name:30} {m.count_params():>9,} {str(m.jit_compile):>5} "
              f"{rates[name]:>7.1f} ({min(walls):.0f}-{max(walls):.0f}) {cpu:>10.1f} {load:>9.2f} {wait:>6.1f}%")
    cpu_ratio = statistics.median(c for _, c, _ in results["seed"]) / statistics.median(
        c for _, c, _ in results["default"])
    print(f"CPU-time ratio (seed CPU s / default CPU s for the same images): {cpu_ratio:.2f}")
    print(f"ratio={rates['default'] / rates['seed']:.2f} target=4")


if __name__ == "__main__":
    main()
