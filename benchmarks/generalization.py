"""Generalization report of one model: the internal split beside the shift battery, and calibration.

    .venv/bin/python benchmarks/generalization.py                        # the champion on tfrecords/kermany-128
    .venv/bin/python benchmarks/generalization.py --model models:/pneumonia-cnn/3 --data tfrecords/kermany-128
    .venv/bin/python benchmarks/generalization.py --study kermany-s0      # which selection metric predicts
                                                                          # the held-out battery families

What it prints (the same as `pneumo evaluate --shift`, pipeline/evaluate/scoring.py): the internal split's AUC and
accuracy with 95% CIs beside the majority baseline; the AUC under every perturbation of the shift battery
(pipeline/evaluate/shift.py) on the same split, their mean and the worst; the ECE before and after the model's stored
temperature. The internal split is in-distribution (a patient-level split of one hospital's folder): the battery
is the part of this report that speaks to other hospitals and devices, and even it only simulates them.
Ends with one line: auc_shift_min=<worst AUC> internal_auc=<AUC> (no target: a report, not a race).
~1-2 min for the 1,049-image Kermany test split at 128 px on 2 CPU cores.

`--study NAME` reads no images: over the study's completed trials (trained with `train.shift_held_out`), the
rank correlation of each candidate selection metric with the AUC on the held-out battery families
(pipeline/study/proxy.py), best predictor first. Ends with: proxy_choice=<metric> spearman=<rho>.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, as benchmarks/common.py does

from pipeline.artifact.model_store import champion_uri  # noqa: E402
from pipeline.errors import PneumoError, one_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=champion_uri(), help="model URI (default: the champion)")
    ap.add_argument("--data", default="tfrecords/kermany-128", help="converted data folder")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--shift-max-images", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--out", default=None, help="JSON report (default: <data>/generalization-<split>.json)")
    ap.add_argument("--study", default=None, help="report the selection metrics' rank correlation with the "
                    "held-out battery families over this study's trials (no images read)")
    a = ap.parse_args(argv)
    if a.study:
        return study_proxy(a.study, a.tracking_uri)
    if not (Path(a.data) / "manifest.json").exists():
        print(f"error: {a.data}/manifest.json not found: convert the data first (README, Kermany section)",
              file=sys.stderr)
        return 2
    from pipeline.evaluate.scoring import evaluate_model

    t0 = time.perf_counter()
    try:
        report = evaluate_model(a.model, a.data, a.split, tracking_uri=a.tracking_uri, shift=True,
                                shift_max_images=a.shift_max_images, ledger="benchmarks/generalization.py",
                                out=a.out or Path(a.data) / f"generalization-{a.split}.json")
    except PneumoError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    print(f"model {a.model} on {a.data} ({a.split} split)")
    print(report["table"])
    print(f"wrote {report['path']} in {time.perf_counter() - t0:.0f} s")
    print(f"auc_shift_min={report['shift']['worst']:.4f} internal_auc={report['metrics']['auc']:.4f}")
    return 0


def study_proxy(study: str, tracking_uri: str | None) -> int:
    from pipeline.artifact import tracking
    from pipeline.study import proxy

    trials = proxy.trial_metrics(tracking.setup(tracking.resolve_tracking_uri(tracking_uri)), study)
    if len(trials) < 4:
        print(f"error: study {study!r} has {len(trials)} completed trial(s) with {proxy.TARGET}: it needs at least "
              "4, trained with train.shift_held_out (experiments/kermany.toml sets it)", file=sys.stderr)
        return 2
    rows = proxy.correlations(trials)
    print(proxy.format_table(rows, study))
    print(f"proxy_choice={rows[0].metric} spearman={rows[0].rho:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
