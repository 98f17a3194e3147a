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

`--study NAME` (repeatable) reads no images: over the study's completed trials (trained with `train.shift_held_out`), the
rank correlation of each candidate selection metric with the AUC on the held-out battery families
(pipeline/study/proxy.py), best predictor first; with several studies, also the correlations pooled over them
(Fisher z, fixed effect). Ends with: proxy_choice=<metric> spearman=<rho> (the pooled one with several).
`--held-out crop,letterbox,...` re-chooses the held-out families after the fact, from every trial's logged AUC
under each perturbation (the target and the battery's selection metrics recomputed; pipeline/study/proxy.py:
retarget): does the choice hold when a family that costs specificity is held out?

`--candidates` (with `--study NAME --ensemble K`, or `--versions 4,5,6`) compares ways to build the promoted
candidate on the proxy, validation only (no test read, nothing logged or registered): each member alone, the
members' mean, and with `--tta mild` the best member and the mean under the test-time views
(pipeline/net/tta.py). Each is validated as `pneumo promote` would build it (pipeline/study/candidate.py:
validate, with the members' own threshold policy), and reported with the validation AUC and loss, the battery's
selection mean, the held-out families' AUC (mean, worst) and, at the candidate's own stored threshold,
sensitivity and specificity on clean validation and on the held-out families (does the threshold hold?); then,
for the last candidate (the fullest construction), which way each battery family moves its decision: the change
of sensitivity and specificity at its threshold (pipeline/study/proxy.py: directions); and, when the members were
trained with the robust threshold policy, whether its threshold holds on a family it was not fitted on: each
family scored at a threshold fitted without it, for the stored policy and for other settings of its tail and
clean-sensitivity floor (pipeline/study/threshold_proxy.py), ending threshold_policy_choice=<the best setting>.
Ends with: candidate_choice=<row> heldout_auc=<its held-out mean AUC>. ~5 min for K = 3 with --tta at 128 px.
`--metric M --within val_loss` ranks by M among the study's better half by validation loss only
(pipeline/promote/ensemble.py: select_members), so no badly calibrated member enters the mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one download bar per member otherwise
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
    ap.add_argument("--study", action="append", default=[], help="report the selection metrics' rank correlation "
                    "with the held-out battery families over this study's trials (no images read); repeat it to "
                    "pool studies")
    ap.add_argument("--held-out", default=None, help="with --study: re-choose the held-out families after the fact "
                    "(comma-separated battery families, e.g. crop,letterbox,gamma,zoom_out), from each trial's logged "
                    "AUC under every perturbation")
    ap.add_argument("--candidates", action="store_true", help="compare candidate constructions (single, the "
                    "members' mean, test-time views) on the proxy, over --study's top --ensemble or --versions")
    ap.add_argument("--ensemble", type=int, default=3, help="with --candidates --study: members, the top K by the "
                    "study's metric (default 3)")
    ap.add_argument("--versions", default=None, help="with --candidates: comma-separated versions as members")
    ap.add_argument("--metric", default=None, help="with --candidates --study: rank the members by this metric "
                    "(a version tag or run metric, e.g. val_auc_shift_mean; default: the study's own)")
    ap.add_argument("--within", default=None, help="with --candidates --study: rank by --metric only the study's "
                    "better half by this metric (e.g. val_loss: no badly calibrated member; README, \"A proxy for "
                    "travels\")")
    ap.add_argument("--tta", default="none", choices=["none", "mild"], help="with --candidates: add the "
                    "test-time-view rows")
    ap.add_argument("--model-name", default="pneumonia-cnn")
    a = ap.parse_args(argv)
    if a.held_out is not None and (a.candidates or not a.study):
        print("error: --held-out goes with --study (and not --candidates)", file=sys.stderr)
        return 2
    if a.within is not None and not (a.candidates and len(a.study) == 1 and not a.versions):
        print("error: --within goes with --candidates and one --study (not --versions)", file=sys.stderr)
        return 2
    if a.candidates:
        return compare_candidates(a)
    if a.study:
        return study_proxy(a.study, a.tracking_uri, a.held_out)
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


def study_proxy(studies: list[str], tracking_uri: str | None, held_out: str | None = None) -> int:
    from pipeline.artifact import tracking
    from pipeline.study import proxy

    client = tracking.setup(tracking.resolve_tracking_uri(tracking_uri))
    families = tuple(f.strip() for f in held_out.split(",") if f.strip()) if held_out is not None else None
    if families is not None:
        print(f"held-out families re-chosen after the fact: {', '.join(families)} (pipeline/study/proxy.py: retarget)")
    per_study = []
    for study in studies:
        if families is None:
            trials = proxy.trial_metrics(client, study)
        else:
            try:
                trials = proxy.retarget(proxy.trial_metrics(client, study, needs="val_auc_shift_mean"), families)
            except PneumoError as e:
                print(f"error: --held-out: {one_line(e)}", file=sys.stderr)
                return e.exit_code
        if len(trials) < 4:
            what = (f"with {proxy.TARGET}: it needs at least 4, trained with train.shift_held_out "
                    "(experiments/kermany.toml sets it)" if families is None else
                    "with the AUC under every battery perturbation: --held-out needs at least 4, trained with "
                    "train.shift_battery")
            print(f"error: study {study!r} has {len(trials)} completed trial(s) {what}", file=sys.stderr)
            return 2
        per_study.append(proxy.correlations(trials))
        print(proxy.format_table(per_study[-1], study))
    rows = per_study[0]
    if len(studies) > 1:  # independent studies: their Fisher z pooled (pipeline/study/proxy.py: pooled)
        rows = proxy.pooled(per_study)
        print(proxy.format_table(rows, ", ".join(studies), pooled_over=len(studies)))
    print(f"proxy_choice={rows[0].metric} spearman={rows[0].rho:.3f}")
    return 0


def compare_candidates(a) -> int:
    from pipeline.artifact import tracking
    from pipeline.artifact.model_store import load_keras
    from pipeline.net.tta import with_views
    from pipeline.promote.ensemble import build_model, members_dataset, members_recipe, select_members
    from pipeline.promote.promotion import Candidate, rank_candidates, study_metric, versions
    from pipeline.study import proxy, threshold_proxy
    from pipeline.study.candidate import validate

    client = tracking.setup(tracking.resolve_tracking_uri(a.tracking_uri))
    try:
        if a.versions:
            wanted = [v.strip() for v in a.versions.split(",") if v.strip()]
            ranked, _ = rank_candidates(client, a.model_name, "val_auc")
            by_version: dict[str, Candidate] = {c.version: c for c in ranked}
            missing = [v for v in wanted if v not in by_version]
            if missing:
                print(f"error: --versions: {', '.join(missing)}: not ranked versions of {a.model_name}", file=sys.stderr)
                return 2
            members, how = [by_version[v] for v in wanted], f"versions {','.join(wanted)}"
        elif len(a.study) == 1:
            study = a.study[0]
            metric = a.metric or study_metric(versions(client, a.model_name), study)
            members, _ = select_members(client, a.model_name, study, a.ensemble, metric, single=True,
                                        within=a.within)
            how = f"the top {a.ensemble} of study {study} by {metric}" + (
                f" among its better half by {a.within}" if a.within else "")
        else:
            print("error: --candidates needs one --study NAME or --versions", file=sys.stderr)
            return 2
        data_dir, _ = members_dataset(members, None)  # the members' own dataset, as `pneumo promote` uses
    except PneumoError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    recipe = members_recipe(client, members[0].run_id)
    nets = {c.version: load_keras(f"models:/{a.model_name}/{c.version}") for c in members}
    labels = [c.version for c in members]
    builds = [(f"v{v}", nets[v]) for v in labels]
    if len(labels) > 1:
        builds.append((f"mean of {len(labels)}", build_model([nets[v] for v in labels], labels)))
    if a.tta != "none":
        builds += [(f"v{labels[0]} + tta", with_views(nets[labels[0]], a.tta))]
        if len(labels) > 1:
            builds.append((f"mean of {len(labels)} + tta", with_views(builds[len(labels)][1], a.tta)))
    print(f"candidates built from {how}, on {data_dir}'s validation split (load {os.getloadavg()[0]:.1f})")
    cols = ("val AUC", "val loss", "battery", "held-out", "ho worst", "thr", "sens", "spec", "ho sens", "ho spec")
    print(f"{'candidate':<18}" + "".join(f"{c:>10}" for c in cols) + f"{'s':>6}")
    rows, last = [], None
    for name, net in builds:
        t0 = time.perf_counter()
        v = last = validate(net, recipe, data_dir, with_shift=True)
        sm = v.shift_metrics()
        row = (v.metrics["auc"], v.metrics["loss"], sm["val_auc_shift_mean"], sm.get("val_auc_heldout_mean", float("nan")),
               sm.get("val_auc_heldout_min", float("nan")), v.threshold, v.metrics["sensitivity"],
               v.metrics["specificity"], sm.get("val_heldout_sensitivity", float("nan")),
               sm.get("val_heldout_specificity", float("nan")))
        rows.append((name, row))
        print(f"{name:<18}" + "".join(f"{x:>10.4f}" for x in row) + f"{time.perf_counter() - t0:>6.0f}", flush=True)
    at = last.shifted.operating(last.threshold_raw)
    print(proxy.format_directions(proxy.directions(last.shifted, at), at["clean"], rows[-1][0]))
    if recipe.train.threshold_policy == "robust":
        t = recipe.train
        stored = threshold_proxy.Policy(t.robust_tail, t.robust_min_sensitivity)
        try:
            checks = threshold_proxy.compare_policies(last.shifted, threshold_proxy.grid(stored),
                                                      auc_floor=t.robust_auc_floor)
            print(threshold_proxy.format_families(next(c for c in checks if c.policy == stored), rows[-1][0]))
            print(threshold_proxy.format_policies(checks, stored))
        except PneumoError as e:  # a battery subset too small to halve: the rest of the report stands
            print(f"threshold check skipped: {one_line(e)}")
    best = max(rows, key=lambda r: r[1][3])
    print(f"candidate_choice={best[0].replace(' ', '_')} heldout_auc={best[1][3]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
