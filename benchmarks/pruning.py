"""Pruning pays: the same study (seed, trial budget, search space) with the median pruner and without, for
several study seeds.

For each seed (tune.seed and train.seed), both arms run on the same synthetic data; prints per seed the epochs
spent, wall time and best val AUC of each arm, then the mean and spread (sample standard deviation, min-max)
over the seeds of the epochs saved and of the best-AUC difference. One seed's saving is one draw of the TPE
sampler and the pruner's startup trials: it moves by tens of percentage points between seeds.
Ends with `epoch_saving=<mean over seeds of 1 - epochs_pruned/epochs_unpruned> target=0.4` (target also:
mean best val AUC within 0.01 of the unpruned study's).

    .venv/bin/python benchmarks/pruning.py            # 3 seeds, ~20 min on 2 idle CPU cores
    .venv/bin/python benchmarks/pruning.py --seeds 0,1,2 --trials 6 --epochs 4   # quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average  # noqa: E402


def run_arm(pruner: str, data: Path, tmp: Path, trials: int, epochs: int, seed: int) -> dict:
    from optuna.trial import TrialState

    from pipeline.config import load_config
    from pipeline.study.tune import run_tune

    # The smoke study on the default CNN: the smoke file's tiny CNN barely learns in a few epochs, and a
    # pruner only shows its worth where curves separate.
    cfg = load_config(REPO / "experiments" / "smoke.toml", [
        "model.blocks=3", "model.filters=16", "model.stem_filters=16", "model.dense_units=64",
        f"tune.pruner={pruner}", f"tune.seed={seed}", f"train.epochs={epochs}", "train.log_model=false",
        "tune.startup_trials=3", "tune.warmup_epochs=1", f"train.checkpoint_dir={tmp}/ckpt-{pruner}-{seed}",
        f"train.seed={seed}",
    ])
    # A wider learning-rate range than the smoke file: some trials must be worth stopping early.
    space = {**cfg.tune.space, "train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}
    cfg = cfg.with_values({"tune.space": space})
    start, cpu = time.perf_counter(), time.process_time()
    study = run_tune(cfg, f"bench-{pruner}-{seed}", data_dir=str(data), trials=trials,
                     storage=f"sqlite:///{tmp}/optuna-{pruner}-{seed}.db",
                     tracking_uri=f"sqlite:///{tmp}/mlflow-{pruner}-{seed}.db")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {
        "pruner": pruner,
        "seed": seed,
        "trials": len(finished),
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "epochs": sum(len(t.intermediate_values) for t in finished),
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "best_val_auc": study.best_value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="trials per study (default 8)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per unpruned trial (default 6)")
    parser.add_argument("--n", type=int, default=400, help="synthetic patients (default 400)")
    parser.add_argument("--seeds", default="0,1,2", help="study seeds, comma-separated (default 0,1,2)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")

    from pipeline.data.convert import convert_rsna
    from pipeline.data.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "raw", n=args.n, size=128, seed=0, workers=2, progress=False)
        convert_rsna(tmp / "raw" / "stage_2_train_images", tmp / "raw" / "stage_2_train_labels.csv", tmp / "data",
                     image_size=64, workers=2, progress=False)
        pairs = []
        for seed in seeds:
            pairs.append([run_arm(p, tmp / "data", tmp, args.trials, args.epochs, seed) for p in ("none", "median")])
            print(f"seed {seed} done; load average {load_average()}", flush=True)

    print(f"\n{args.trials} trials x up to {args.epochs} epochs per study, {args.n} synthetic patients at 64 px")
    hdr = (f"{'seed':>4} {'pruner':<8} {'trials':>6} {'pruned':>6} {'epochs':>6} {'wall s':>8} {'cpu s':>8} "
           f"{'best val AUC':>12}")
    print(hdr)
    print("-" * len(hdr))
    savings, gaps, wall_savings = [], [], []
    for off, on in pairs:
        for a in (off, on):
            print(f"{a['seed']:>4} {a['pruner']:<8} {a['trials']:>6} {a['pruned']:>6} {a['epochs']:>6} "
                  f"{a['wall_s']:>8.1f} {a['cpu_s']:>8.1f} {a['best_val_auc']:>12.4f}")
        savings.append(1 - on["epochs"] / off["epochs"])
        wall_savings.append(1 - on["wall_s"] / off["wall_s"])
        gaps.append(off["best_val_auc"] - on["best_val_auc"])
    print("-" * len(hdr))

    def summary(values, fmt) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return (f"mean {format(statistics.mean(values), fmt)} (sd {format(sd, fmt)}, "
                f"min {format(min(values), fmt)}, max {format(max(values), fmt)})")

    print(f"over {len(seeds)} seeds: epochs saved {summary(savings, '.0%')}; wall time saved "
          f"{summary(wall_savings, '.0%')}; best val AUC, unpruned minus pruned, {summary(gaps, '+.4f')} "
          f"(targets: saving >= 40%, difference <= 0.01); load average "
          f"{load_average()}")
    print(f"epoch_saving={statistics.mean(savings):.3f} target=0.4")


if __name__ == "__main__":
    main()
