"""Pruning pays: the same study (seed, trial budget, search space) with the median pruner and without.

Prints epochs spent, wall time and best val AUC of each, and ends with
`epoch_saving=<1 - epochs_pruned/epochs_unpruned> target=0.4` (target also: best val AUC within 0.01).

    .venv/bin/python benchmarks/pruning.py            # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/pruning.py --trials 8 --epochs 4   # quicker look
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def run_arm(pruner: str, data: Path, tmp: Path, trials: int, epochs: int, seed: int) -> dict:
    from optuna.trial import TrialState

    from pipeline.config import load_config
    from pipeline.tune import run_tune

    # The smoke study on the default CNN: the smoke file's tiny CNN barely learns in a few epochs, and a
    # pruner only shows its worth where curves separate.
    cfg = load_config(REPO / "experiments" / "smoke.toml", [
        "model.blocks=3", "model.filters=16", "model.stem_filters=16", "model.dense_units=64",
        f"tune.pruner={pruner}", f"tune.seed={seed}", f"train.epochs={epochs}", "train.log_model=false",
        "tune.startup_trials=3", "tune.warmup_epochs=1", f"train.checkpoint_dir={tmp}/ckpt-{pruner}",
    ])
    # A wider learning-rate range than the smoke file: some trials must be worth stopping early.
    space = {**cfg.tune.space, "train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}
    cfg = cfg.with_values({"tune.space": space})
    start, cpu = time.perf_counter(), time.process_time()
    study = run_tune(cfg, f"bench-{pruner}", data_dir=str(data), trials=trials,
                     storage=f"sqlite:///{tmp}/optuna-{pruner}.db", tracking_uri=f"sqlite:///{tmp}/mlflow-{pruner}.db")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {
        "pruner": pruner,
        "trials": len(finished),
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "epochs": sum(len(t.intermediate_values) for t in finished),
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "best_val_auc": study.best_value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n", type=int, default=500, help="synthetic patients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pipeline.convert import convert_rsna
    from pipeline.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "raw", n=args.n, size=128, seed=args.seed, workers=2, progress=False)
        convert_rsna(tmp / "raw" / "stage_2_train_images", tmp / "raw" / "stage_2_train_labels.csv", tmp / "data",
                     image_size=64, workers=2, progress=False)
        arms = [run_arm(p, tmp / "data", tmp, args.trials, args.epochs, args.seed) for p in ("none", "median")]

    print(f"\n{'pruner':<8} {'trials':>6} {'pruned':>6} {'epochs':>6} {'wall s':>8} {'cpu s':>8} {'best val AUC':>12}")
    for a in arms:
        print(f"{a['pruner']:<8} {a['trials']:>6} {a['pruned']:>6} {a['epochs']:>6} {a['wall_s']:>8.1f} "
              f"{a['cpu_s']:>8.1f} {a['best_val_auc']:>12.4f}")
    off, on = arms
    saving = 1 - on["epochs"] / off["epochs"]
    gap = off["best_val_auc"] - on["best_val_auc"]
    print(f"epochs saved {saving:.0%}, wall time saved {1 - on['wall_s'] / off['wall_s']:.0%}, "
          f"best val AUC difference {gap:+.4f} (target: saving >= 40%, difference <= 0.01)")
    print(f"epoch_saving={saving:.3f} target=0.4")


if __name__ == "__main__":
    main()
