"""What "more signal per image" costs (issue 21 item 4): the train step of the recipe's CNN at larger image sizes,
wider and deeper, and of the keras.applications backbones, against the recipe as it is (128 px).

Every arm: experiments/kermany.toml's [model] and [augment] with one change, float32, batch 32, Adam 1e-3; build,
one warm-up step, then --steps `train_on_batch` steps on in-memory uint8 batches. Arms run in turns for --rounds
rounds (recipe, 160 px, ..., recipe, 160 px, ...), so a busy phase of this shared machine hits them all; each
arm's figure is its median over the rounds. Prints params, img/s and the cost per image relative to the recipe
at 128 px (its img/s over the arm's) and ends with `cost_224=<that ratio for 224 px>`. A speed figure only:
which of these is worth its cost is for the proxy (benchmarks/generalization.py) to say, and a pretrained
backbone's accuracy cannot be measured here without its ImageNet weights (README).

    .venv/bin/python benchmarks/model_cost.py                 # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/model_cost.py --steps 3 --rounds 1 --arms recipe,224   # quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average  # noqa: E402

BATCH = 32
# name -> (image size, [model] overrides)
ARMS = {
    "recipe": (128, {}),
    "160": (160, {}),
    "192": (192, {}),
    "224": (224, {}),
    "wider": (128, {"model.filters": 48}),
    "deeper": (128, {"model.blocks": 4}),
    "densenet121": (128, {"model.backbone": "densenet121"}),
    "efficientnetb0": (128, {"model.backbone": "efficientnetb0"}),
}


def time_arm(cfg, size: int, steps: int) -> tuple[int, float]:
    """-> (params, img/s of `steps` train steps after one warm-up step)."""
    import keras
    import numpy as np

    from pipeline.net.model import build_model

    keras.backend.clear_session()
    m = build_model(cfg.model, cfg.augment, size, seed=0)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 256, (BATCH, size, size, 1), dtype=np.uint8) for _ in range(2)]
    ys = [rng.integers(0, 2, BATCH).astype("float32") for _ in range(2)]
    m.train_on_batch({"image": xs[0]}, ys[0])  # tracing
    start = time.perf_counter()
    for i in range(steps):
        loss = m.train_on_batch({"image": xs[i % 2]}, ys[i % 2])
    float(np.asarray(loss).ravel()[0])  # the last step has finished
    return m.count_params(), BATCH * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm and round (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the arms (default 2)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "recipe" not in arms:
        raise SystemExit(f"--arms {args.arms!r}: give 'recipe' and any of {', '.join(ARMS)}")
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1")

    from pipeline.config import load_config

    rates: dict[str, list[float]] = {a: [] for a in arms}
    params: dict[str, int] = {}
    print(f"load average before {load_average()}", flush=True)
    for r in range(args.rounds):
        for arm in arms:
            size, overrides = ARMS[arm]
            cfg = load_config(REPO / "experiments" / "kermany.toml", [f"{k}={v}" for k, v in overrides.items()])
            params[arm], rate = time_arm(cfg, size, args.steps)
            rates[arm].append(rate)
            print(f"  round {r + 1} {arm}: {rate:.1f} img/s (load {load_average()})", flush=True)

    base = statistics.median(rates["recipe"])
    print(f"\nexperiments/kermany.toml's model, one change per arm; float32, batch {BATCH}, {args.steps} steps x "
          f"{args.rounds} rounds (median); load average after {load_average()}")
    hdr = f"{'arm':<16} {'px':>4} {'params':>10} {'img/s':>8} {'cost / image':>13}"
    print(hdr)
    print("-" * len(hdr))
    for arm in arms:
        rate = statistics.median(rates[arm])
        print(f"{arm:<16} {ARMS[arm][0]:>4} {params[arm]:>10,} {rate:>8.1f} {base / rate:>12.2f}x")
    print("-" * len(hdr))
    if "224" in arms:
        print(f"cost_224={base / statistics.median(rates['224']):.2f}")


if __name__ == "__main__":
    main()
