"""The promotion gate's statistics and its decision: pure functions of two models' predictions on the same cases.

No MLflow and no TensorFlow here: `pipeline.promote.promotion` scores the models and records the outcome; this module
says whether a candidate may replace the champion, and why, in numbers.

The rule (configured in `[promote]` of the experiment file, `pipeline.config.PromoteConfig`):
- `superiority`: promote only when the lower bound of the (1 - alpha) confidence interval of the paired AUC
  difference (candidate - champion) is above 0. A tie, or a gain inside the noise, keeps the champion.
- `non_inferiority`: promote when that lower bound is above `-margin` AND the candidate's study metric (the
  validation metric that ranked it) is strictly better than the champion's: a model at least as good on the
  test split, and better where the study looked.
- A first champion (no champion yet) has nothing to be compared with, so it must clear a floor instead: its
  AUC's lower confidence bound above `floor_auc` and its accuracy's lower bound above the majority baseline
  (the accuracy of answering the commoner class for everyone).
- `require_external = [NAME, ...]`: on each named external set the candidate must also be non-inferior to the
  champion (paired lower bound above `-margin`); for a first champion, each set's AUC must clear the floor.

The paired interval is DeLong's, clustered by patient (Obuchowski 1997, `pipeline.evaluate.metrics.delong_test`):
deterministic, so re-running a promotion cannot flip its decision; the paired cluster bootstrap is reported
beside it. Every test is two-sided at `alpha`; for non-inferiority that is the usual one-sided alpha/2 bound
(CONSORT extension for non-inferiority trials, Piaggio et al., JAMA 2012).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from pipeline.evaluate.metrics import (
    auc_covariance,
    clustered_proportion_ci,
    delong_test,
    fmt,
    fmt_difference,
    paired_auc_difference,
)

POLICIES = ("superiority", "non_inferiority")


@dataclass(frozen=True)
class Rule:
    policy: str = "superiority"
    alpha: float = 0.05
    margin: float = 0.02
    floor_auc: float = 0.7
    floor_accuracy_margin: float = 0.0
    require_external: tuple[str, ...] = ()

    def describe(self) -> str:
        level = f"{100 * (1 - self.alpha):g}%"
        head = (f"superiority: the {level} CI of the paired test-AUC difference (clustered DeLong) lies above 0"
                if self.policy == "superiority" else
                f"non-inferiority: the {level} CI of the paired test-AUC difference lies above -{self.margin:g} "
                "and the study metric is better")
        ext = (f"; non-inferior (margin {self.margin:g}) on external {', '.join(self.require_external)}"
               if self.require_external else "")
        return (f"{head}{ext}; a first champion needs its AUC's lower {level} bound above {self.floor_auc:g} "
                "and its accuracy's lower bound above the majority baseline"
                + (f" {self.floor_accuracy_margin:+g}" if self.floor_accuracy_margin else ""))


@dataclass
class Evaluation:
    """One version's predictions and metrics on one dataset (the internal test split, or an external set)."""
    version: str
    metrics: dict
    subgroups: list
    threshold: float
    threshold_source: str
    labels: object  # np.ndarray
    probabilities: object  # np.ndarray
    patient_id: list
    report: dict  # the JSON `pneumo evaluate` writes


def compare(candidate: Evaluation, champion: Evaluation, alpha: float = 0.05, n_boot: int = 2000) -> dict:
    """Paired comparison on the same cases, clustered by patient: clustered DeLong (the rule's interval) and
    the paired cluster bootstrap (a check on it)."""
    if candidate.patient_id != champion.patient_id:
        raise ValueError("candidate and champion were scored on different records: cannot pair them")
    out = paired_auc_difference(candidate.labels, candidate.probabilities, champion.probabilities, n=n_boot,
                                alpha=alpha, clusters=candidate.patient_id)
    d = delong_test(candidate.labels, candidate.probabilities, champion.probabilities,
                    clusters=candidate.patient_id, alpha=alpha)
    out.update(delong_z=d["z"], delong_p=d["p"], delong_se=d["se"], delong_ci_low=d["ci_low"],
               delong_ci_high=d["ci_high"], alpha=alpha, n_images=len(candidate.patient_id),
               n_patients=len(set(candidate.patient_id)))
    return out


def floor_bounds(e: Evaluation, alpha: float) -> tuple[float, float]:
    """(AUC lower bound, accuracy lower bound) of one evaluation at level `alpha`, clustered by patient: the
    AUC's from clustered DeLong (the variance the paired test uses), the accuracy's a Wilson interval at the
    effective sample size (pipeline.evaluate.metrics). At the decision's level, not the report's 95%."""
    y, p = np.asarray(e.labels), np.asarray(e.probabilities, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return math.nan, math.nan
    aucs, cov = auc_covariance(y, [p], e.patient_id)
    se = math.sqrt(max(float(cov[0, 0]), 0.0)) if math.isfinite(cov[0, 0]) else math.nan
    auc_low = float(aucs[0]) - NormalDist().inv_cdf(1 - alpha / 2) * se
    hits = (p >= e.threshold) == (y == 1)
    acc_low, _ = clustered_proportion_ci(hits, e.patient_id, alpha)
    return auc_low, acc_low


def floor_check(e: Evaluation, rule: Rule) -> tuple[bool, str]:
    """A first champion's floor: AUC's lower bound above floor_auc, accuracy's lower bound above the baseline,
    both at the rule's level (`rule.alpha`: alpha / test_queries when the promotion decides)."""
    metrics = e.metrics
    low, acc_low = floor_bounds(e, rule.alpha)
    base = metrics.get("majority_baseline_accuracy")
    ok_auc = math.isfinite(low) and low > rule.floor_auc
    bar = base + rule.floor_accuracy_margin if base is not None else None
    ok_acc = math.isfinite(acc_low) and bar is not None and acc_low > bar
    level = f"{100 * (1 - rule.alpha):.4g}%"
    words = (f"AUC {fmt(metrics.get('auc'))} (lower {level} bound {fmt(low)} {'above' if ok_auc else 'NOT above'} "
             f"the floor {rule.floor_auc:g}), accuracy {fmt(metrics.get('accuracy'))} (lower {level} bound "
             f"{fmt(acc_low)} {'above' if ok_acc else 'NOT above'} the majority baseline {fmt(base)}"
             + (f" {rule.floor_accuracy_margin:+g}" if rule.floor_accuracy_margin else "") + ")")
    return ok_auc and ok_acc, words


@dataclass
class Verdict:
    outcome: str  # "promoted" | "rejected"
    reason: str
    checks: list = field(default_factory=list)  # [(name, passed, words)]


def decide(rule: Rule, candidate: Evaluation, champion: Evaluation | None, comparison: dict | None, *,
           study_metric: str, candidate_value: float, champion_value: float | None, lower_is_better: bool,
           externals: dict | None = None) -> Verdict:
    """Apply the rule. `externals`: NAME -> (candidate Evaluation, champion Evaluation | None, comparison | None).
    Every check is kept with its numbers, so the decision run and the model card can show all of them."""
    auc = candidate.metrics.get("auc")
    if auc is None or not math.isfinite(auc):
        raise ValueError("the test split holds one class only: AUC is undefined, the gate cannot decide")
    checks = []
    if champion is None:
        ok, words = floor_check(candidate, rule)
        checks.append(("floor (internal test)", ok, words))
    else:
        c = comparison
        low = c["delong_ci_low"]
        if rule.policy == "superiority":
            ok = math.isfinite(low) and low > 0
            checks.append(("superiority (internal test)", ok,
                           f"{fmt_difference(c)}: lower bound {'above' if ok else 'NOT above'} 0"))
        else:
            ok = math.isfinite(low) and low > -rule.margin
            checks.append(("non-inferiority (internal test)", ok,
                           f"{fmt_difference(c)}: lower bound {'above' if ok else 'NOT above'} "
                           f"-{rule.margin:g}"))
            better = (champion_value is not None and math.isfinite(candidate_value)
                      and math.isfinite(champion_value)
                      and (candidate_value < champion_value if lower_is_better else candidate_value > champion_value))
            checks.append((f"study metric {study_metric}", better,
                           f"candidate {fmt(candidate_value, 4)} vs champion {fmt(champion_value, 4)}: "
                           f"{'better' if better else 'NOT better'}"))
    for name in rule.require_external:
        if not externals or name not in externals:
            checks.append((f"external {name}", False, f"required external set {name!r} was not given "
                                                      f"(--external {name}=DATA)"))
            continue
        ce, he, cmp = externals[name]
        if he is None:
            ok, words = floor_check(ce, rule)
        else:
            low = cmp["delong_ci_low"]
            ok = math.isfinite(low) and low > -rule.margin
            words = f"{fmt_difference(cmp)}: lower bound {'above' if ok else 'NOT above'} -{rule.margin:g}"
        checks.append((f"external {name}", ok, words))
    failed = [f"{n}: {w}" for n, ok, w in checks if not ok]
    if not failed:
        what = "no champion yet; clears the floor" if champion is None else f"passes {rule.policy}"
        return Verdict("promoted", f"{what}: " + "; ".join(f"{n}: {w}" for n, _, w in checks), checks)
    return Verdict("rejected", "not promoted: " + "; ".join(failed), checks)
