"""Training: the seed CNN against the default CNN at an equal wall-clock budget, and the default CNN's train
step across Keras backends, precisions and XLA.

    .venv/bin/python benchmarks/train_step.py                       # ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/train_step.py --budget 30 --matrix-steps 10   # a quicker look
    .venv/bin/python benchmarks/train_step.py --skip-matrix         # part 1 only

Part 1, equal budget. Data: the Kermany training folder (kermany-224/train in the real-data folder of
benchmarks/common.py, or $PNEUMO_KERMANY) converted once at 128 px with the patient rule of experiments/kermany.toml
into a cache folder outside the repository (--cache, default $PNEUMO_BENCH_CACHE, else ../cache beside the
checkout); without it, `pneumo synth` data converted the same way. Both models:
the recipe of their experiment file (the seed: experiments/seed.toml, no augmentation; the default: the
built-in defaults of pipeline/config.py, with its augmentation), Adam 1e-3, plain cross-entropy, batch 32,
float32, fed by `pipeline.data.tfdata.train_dataset`. They train in turns of --slice seconds (seed, default,
seed, ...) until each has had --budget seconds of training, so a busy phase of this shared machine hits both;
then each is scored once on the validation split (sklearn's roc_auc_score; scoring is not charged to the
budget). Reported: images trained, img/s, epochs reached, val AUC. The speed claim ("default >= 4x the
seed's img/s") is printed only together with the AUC comparison ("at equal or better val AUC").

Part 2, the matrix: the default CNN at 128 px, batch 32, one subprocess per arm with KERAS_BACKEND set before
Keras is imported (tensorflow | jax) x precision (float32 | mixed_float16; --precisions adds mixed_bfloat16)
x XLA (jit_compile off | on). Each arm: build, one warm-up step (tracing / compilation), then --matrix-steps
`train_on_batch` steps on in-memory uint8 batches, img/s of those steps. An arm that fails prints its
one-line error in the table instead of a number (under JAX, jit_compile=False runs the step un-jitted).
Arms run one after the other, so compare rows as ratios against the tensorflow/float32/no-XLA arm of the
same run (printed), and read the load average beside them.

Ends with one line: ratio=<default img/s / seed img/s at equal budget> target=4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, DATA, REPO, load_average  # noqa: E402

SIZE, BATCH, LR = 128, 32, 1e-3
KERMANY = Path(os.environ.get("PNEUMO_KERMANY", DATA / "kermany-224" / "train"))


def load() -> str:
    return f"load average {load_average()}"


# --- data ----------------------------------------------------------------------------------------------------
def kermany_regex() -> str:
    """The recipe's patient rule: `[data] patient_regex` of experiments/kermany.toml (the same rule `pneumo convert
    --image-dir ... --config experiments/kermany.toml` applies), so no patient crosses the splits."""
    from pipeline.config import load_config

    return load_config(REPO / "experiments" / "kermany.toml").data.patient_regex


def prepare_data(cache: Path) -> tuple[Path, str]:
    """(converted folder, description); converted once and reused while its manifest records the same rule."""
    from pipeline.data.convert import convert_image_dir, convert_rsna
    from pipeline.data.manifest import load_manifest

    if KERMANY.is_dir():
        out = cache / f"kermany-{SIZE}"
        rule = kermany_regex()
        if (out / "manifest.json").exists() and load_manifest(out)["source"].get("patient_rule") != rule:
            shutil.rmtree(out)  # converted under another (or no) patient rule: its splits may share patients
        if not (out / "manifest.json").exists():
            convert_image_dir(KERMANY, out, patient_regex=rule, image_size=SIZE, workers=2, progress=False)
        return out, f"Kermany {KERMANY} at {SIZE} px, patient rule {rule!r}"
    out = cache / f"synth-{SIZE}"
    if not (out / "manifest.json").exists():
        from pipeline.data.synth import make_synthetic_dataset

        make_synthetic_dataset(cache / "synth-raw", n=2000, size=512, seed=0, workers=2, progress=False)
        convert_rsna(cache / "synth-raw" / "stage_2_train_images", cache / "synth-raw" / "stage_2_train_labels.csv",
                     out, image_size=SIZE, workers=2, progress=False)
    return out, f"synthetic (pneumo synth, 2000 patients; {KERMANY} absent) at {SIZE} px"


# --- part 1: equal wall-clock budget -------------------------------------------------------------------------
class Arm:
    def __init__(self, name: str, cfg, data: Path, train_count: int):
        import keras

        from pipeline.data.tfdata import train_dataset
        from pipeline.net.model import build_model

        self.name, self.train_count = name, train_count
        self.model = build_model(cfg.model, cfg.augment, SIZE, seed=0)
        self.model.compile(optimizer=keras.optimizers.Adam(LR), loss="binary_crossentropy")
        self.it = iter(train_dataset(data, cfg.data, seed=0, batch_size=BATCH))
        self.steps, self.wall, self.cpu = 0, 0.0, 0.0
        x, y = next(self.it)
        self.model.train_on_batch(x, y)  # builds the optimizer and traces the step: not charged to the budget

    def train_for(self, seconds: float) -> None:
        """Whole steps until `seconds` of wall time have passed (the last step may overrun it slightly)."""
        wall, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            x, y = next(self.it)
            self.model.train_on_batch(x, y)  # returns when the step is done (CPU, synchronous)
            self.steps += 1
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    def val_auc(self, data: Path) -> float:
        import numpy as np
        from sklearn.metrics import roc_auc_score

        from pipeline.data.tfdata import eval_dataset

        ys, ps = [], []
        for x, y in eval_dataset(data, "val", 128):
            ps.append(self.model.predict_on_batch(x).ravel())
            ys.append(np.asarray(y).ravel())
        return float(roc_auc_score(np.concatenate(ys), np.concatenate(ps)))


def equal_budget(data: Path, budget: float, slice_s: float) -> dict:
    from pipeline.config import Config, load_config
    from pipeline.data.tfdata import split_count
    from pipeline.net.model import apply_precision

    apply_precision("float32")
    train_count = split_count(data, "train")
    arms = [Arm("seed", load_config(REPO / "experiments" / "seed.toml"), data, train_count),
            Arm("default", Config(), data, train_count)]
    while any(a.wall < budget for a in arms):
        for a in arms:  # turns: a slow phase of the machine hits both
            if a.wall < budget:
                a.train_for(min(slice_s, budget - a.wall))
    out = {}
    for a in arms:
        images = a.steps * BATCH
        out[a.name] = {"params": a.model.count_params(), "images": images, "wall": a.wall, "cpu": a.cpu,
                       "rate": images / a.wall, "cpu_rate": images / a.cpu, "epochs": images / train_count,
                       "val_auc": a.val_auc(data)}
    return out


# --- part 2: backend x precision x XLA ----------------------------------------------------------------------
ARM_CODE = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["PNEUMO_REPO"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
precision, jit, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
try:
    import keras, numpy as np
    from pipeline.config import AugmentConfig, ModelConfig
    from pipeline.net.model import apply_precision, build_model
    apply_precision(precision)
    # XLA needs the XLA-compilable augmentation (Keras' rotation/zoom layers do not compile)
    m = build_model(ModelConfig(), AugmentConfig(xla_safe=jit), 128, seed=0)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=jit)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 256, (32, 128, 128, 1), dtype=np.uint8) for _ in range(4)]
    ys = [rng.integers(0, 2, 32).astype("float32") for _ in range(4)]
    t = time.perf_counter()
    m.train_on_batch({"image": xs[0]}, ys[0])
    first = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = m.train_on_batch({"image": xs[i % 4]}, ys[i % 4])
    float(np.asarray(loss).ravel()[0])
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(json.dumps({"ok": True, "backend": keras.backend.backend(), "first": first, "wall": wall, "cpu": cpu,
                      "loss_finite": bool(np.isfinite(np.asarray(loss)).all())}))
except Exception as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}))
"""


def matrix_arm(backend: str, precision: str, jit: bool, steps: int, timeout: float) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PNEUMO_REPO": str(REPO),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", ARM_CODE, precision, "1" if jit else "0", str(steps)],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:  # a result too: e.g. float16 convolutions are emulated on this CPU
        return {"ok": False, "error": f"not done after {timeout:.0f} s (import + build + {steps + 1} steps)",
                "process_s": time.perf_counter() - t, "load": os.getloadavg()[0]}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    r = json.loads(lines[-1]) if lines else {"ok": False, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    r.update(process_s=time.perf_counter() - t, load=os.getloadavg()[0])
    if r.get("ok") and r.get("backend") != backend:
        r = {**r, "ok": False, "error": f"asked for {backend}, Keras ran {r['backend']}"}
    return r


def matrix(steps: int, backends: list[str], precisions: list[str], timeout: float) -> int:
    rows = []
    for backend in backends:
        for precision in precisions:
            for jit in (False, True):
                r = matrix_arm(backend, precision, jit, steps, timeout)
                rows.append((backend, precision, jit, r))
                status = f"{BATCH * steps / r['wall']:.1f} img/s" if r["ok"] else r["error"]
                print(f"  matrix {backend} {precision} xla={jit}: {status} ({load()})", flush=True)
    base = next((r for b, p, j, r in rows if (b, p, j) == ("tensorflow", "float32", False) and r["ok"]), None)
    print(f"\nmatrix: default CNN, {SIZE} px, batch {BATCH}, {steps} train_on_batch steps after 1 warm-up step; "
          f"one subprocess per arm, run one after the other")
    hdr = (f"{'backend':10} {'precision':14} {'XLA':>5} {'img/s':>8} {'img/CPU-s':>9} {'x tf/f32':>8} "
           f"{'1st step s':>10} {'load':>5}  note")
    print(hdr)
    print("-" * len(hdr))
    for backend, precision, jit, r in rows:
        if not r["ok"]:
            print(f"{backend:10} {precision:14} {str(jit):>5} {'-':>8} {'-':>9} {'-':>8} {'-':>10} {r['load']:5.2f}  "
                  f"FAILED: {r['error']}")
            continue
        rate = BATCH * steps / r["wall"]
        rel = f"{rate / (BATCH * steps / base['wall']):8.2f}" if base else f"{'-':>8}"
        note = "" if r["loss_finite"] else "loss not finite"
        print(f"{backend:10} {precision:14} {str(jit):>5} {rate:8.1f} {BATCH * steps / r['cpu']:9.1f} {rel} "
              f"{r['first']:10.1f} {r['load']:5.2f}  {note}")
    print("-" * len(hdr))
    return sum(r["ok"] for *_, r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=60, help="training seconds per model in part 1 (default 60)")
    ap.add_argument("--slice", type=float, default=10, help="seconds per turn (default 10)")
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"converted-data cache (default {CACHE})")
    ap.add_argument("--matrix-steps", type=int, default=10, help="timed steps per matrix arm (default 10)")
    ap.add_argument("--backends", default="tensorflow,jax", help="matrix backends (default tensorflow,jax)")
    ap.add_argument("--precisions", default="float32,mixed_float16",
                    help="matrix precisions (default float32,mixed_float16; mixed_bfloat16 also accepted)")
    ap.add_argument("--arm-timeout", type=float, default=300, help="seconds per matrix arm (default 300)")
    ap.add_argument("--skip-matrix", action="store_true")
    ap.add_argument("--skip-budget", action="store_true", help="matrix only; ends with matrix_arms_ok=<k>")
    a = ap.parse_args()

    backends = [b for b in a.backends.split(",") if b]
    precisions = [p for p in a.precisions.split(",") if p]
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    print(f"machine: {os.cpu_count()} cores, {load()} (shared: other users count too)", flush=True)
    t = time.perf_counter()
    data, what = prepare_data(a.cache)
    print(f"data: {what} -> {data} (ready in {time.perf_counter() - t:.0f} s)", flush=True)
    if a.skip_budget:
        ok = matrix(a.matrix_steps, backends, precisions, a.arm_timeout)
        print(f"matrix_arms_ok={ok} target={2 * len(backends) * len(precisions)}")
        return
    load_before = load()
    r = equal_budget(data, a.budget, a.slice)
    print(f"\nequal budget: {a.budget:.0f} s of training each, in turns of {a.slice:.0f} s; batch {BATCH}, float32; "
          f"{load_before} before, {load()} after")
    hdr = f"{'model':8} {'params':>10} {'images':>8} {'epochs':>6} {'img/s':>7} {'img/CPU-s':>9} {'val AUC':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, x in r.items():
        print(f"{name:8} {x['params']:>10,} {x['images']:>8} {x['epochs']:6.2f} {x['rate']:7.1f} {x['cpu_rate']:9.1f} "
              f"{x['val_auc']:8.4f}")
    print("-" * len(hdr))
    seed, default = r["seed"], r["default"]
    ratio = default["rate"] / seed["rate"]
    auc_ok = default["val_auc"] >= seed["val_auc"]
    print(f"default / seed: {ratio:.2f}x img/s (target >= 4) at val AUC {default['val_auc']:.4f} vs "
          f"{seed['val_auc']:.4f} ({'equal or better' if auc_ok else 'WORSE'}): the claim "
          f"'default >= 4x faster at equal or better AUC' {'holds' if ratio >= 4 and auc_ok else 'does NOT hold'} "
          "in this run")
    if not a.skip_matrix:
        matrix(a.matrix_steps, backends, precisions, a.arm_timeout)
    print(f"ratio={ratio:.2f} target=4")


if __name__ == "__main__":
    main()
