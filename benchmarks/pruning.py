"""Pruning pays: the same study (seed, trial budget, search space) with no pruner, the median pruner and
Hyperband (Li et al. 2018, Optuna's HyperbandPruner: successive halving over brackets of epochs), for several
study seeds.

For each seed (tune.seed and train.seed), both arms run on the same synthetic data; prints per seed the epochs
spent, wall time and best val AUC of each arm, then the mean and spread (sample standard deviation, min-max)
over the seeds of the epochs saved and of the best-AUC difference. One seed's saving is one draw of the TPE
sampler and the pruner's startup trials: it moves by tens of percentage points between seeds.
Prints every pair of arms (epochs and wall time saved, best-AUC gap) and ends with
`hyperband_vs_median_epoch_saving=<mean over seeds> target=0.4 best_gap=<median minus hyperband> target<=0.005`
and the verdict (issue 21: Hyperband replaces the median pruner only when it saves 40% of the epochs at the same
best value within 0.005).

    .venv/bin/python benchmarks/pruning.py            # 5 seeds x 3 arms, ~50 min on 2 idle CPU cores
    .venv/bin/python benchmarks/pruning.py --seeds 0,1 --trials 6 --epochs 4   # quicker look
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
    parser.add_argument("--seeds", default="0,1,2,3,4", help="study seeds, comma-separated (default 0-4)")
    parser.add_argument("--arms", default="none,median,hyperband",
                        help="pruners to run per seed, comma-separated (default none,median,hyperband)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - {"none", "median", "hyperband"})
    if unknown or len(arms) < 2:
        raise SystemExit(f"--arms {args.arms!r}: give two or more of none, median, hyperband")

    from pipeline.data.convert import convert_rsna
    from pipeline.data.synth import make_synthetic_dataset

    runs: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "raw", n=args.n, size=128, seed=0, workers=2, progress=False)
        convert_rsna(tmp / "raw" / "stage_2_train_images", tmp / "raw" / "stage_2_train_labels.csv", tmp / "data",
                     image_size=64, workers=2, progress=False)
        for seed in seeds:
            runs[seed] = {p: run_arm(p, tmp / "data", tmp, args.trials, args.epochs, seed) for p in arms}
            print(f"seed {seed} done; load average {load_average()}", flush=True)

    print(f"\n{args.trials} trials x up to {args.epochs} epochs per study, {args.n} synthetic patients at 64 px")
    hdr = (f"{'seed':>4} {'pruner':<9} {'trials':>6} {'pruned':>6} {'epochs':>6} {'wall s':>8} {'cpu s':>8} "
           f"{'best val AUC':>12}")
    print(hdr)
    print("-" * len(hdr))
    for seed in seeds:
        for a in runs[seed].values():
            print(f"{a['seed']:>4} {a['pruner']:<9} {a['trials']:>6} {a['pruned']:>6} {a['epochs']:>6} "
                  f"{a['wall_s']:>8.1f} {a['cpu_s']:>8.1f} {a['best_val_auc']:>12.4f}")
    print("-" * len(hdr))

    def summary(values, fmt) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return (f"mean {format(statistics.mean(values), fmt)} (sd {format(sd, fmt)}, "
                f"min {format(min(values), fmt)}, max {format(max(values), fmt)})")

    def compare(reference: str, arm: str) -> tuple[float, float]:
        """Epochs `arm` saves against `reference` and the best-AUC gap (reference minus arm), over the seeds."""
        saved = [1 - runs[s][arm]["epochs"] / runs[s][reference]["epochs"] for s in seeds]
        wall = [1 - runs[s][arm]["wall_s"] / runs[s][reference]["wall_s"] for s in seeds]
        gaps = [runs[s][reference]["best_val_auc"] - runs[s][arm]["best_val_auc"] for s in seeds]
        print(f"{arm} vs {reference} over {len(seeds)} seeds: epochs saved {summary(saved, '.0%')}; wall time "
              f"saved {summary(wall, '.0%')}; best val AUC, {reference} minus {arm}, {summary(gaps, '+.4f')}")
        return statistics.mean(saved), statistics.mean(gaps)

    for reference in arms:
        for arm in arms[arms.index(reference) + 1:]:
            compare(reference, arm)
    print(f"load average {load_average()}")
    # The rule: a multi-fidelity pruner replaces the median one when it spends >= 40% fewer epochs at the
    # same best value (within 0.005) -- else the median stays.
    if {"median", "hyperband"} <= set(arms):
        saving, gap = compare("median", "hyperband")
        verdict = "switch to hyperband" if saving >= 0.4 and gap <= 0.005 else "keep median"
        print(f"hyperband_vs_median_epoch_saving={saving:.3f} target=0.4 best_gap={gap:+.4f} target<=0.005 "
              f"-> {verdict}")


if __name__ == "__main__":
    main()
