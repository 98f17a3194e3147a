"""Generalization report of one model: the internal split beside the shift battery, and calibration.

    .venv/bin/python benchmarks/generalization.py                        # the champion on tfrecords/kermany-128
    .venv/bin/python benchmarks/generalization.py --model models:/pneumonia-cnn/3 --data tfrecords/kermany-128

What it prints (the same as `pneumo evaluate --shift`, pipeline/evaluate/scoring.py): the internal split's AUC and
accuracy with 95% CIs beside the majority baseline; the AUC under every perturbation of the shift battery
(pipeline/evaluate/shift.py) on the same split, their mean and the worst; the ECE before and after the model's stored
temperature. The internal split is in-distribution (a patient-level split of one hospital's folder): the battery
is the part of this report that speaks to other hospitals and devices, and even it only simulates them.
Ends with one line: auc_shift_min=<worst AUC> internal_auc=<AUC> (no target: a report, not a race).
~1-2 min for the 1,049-image Kermany test split at 128 px on 2 CPU cores.
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
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
