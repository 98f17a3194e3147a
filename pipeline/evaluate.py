"""Metrics, threshold choice, confidence intervals and plots for a binary classifier's predictions.

Pure numpy + scikit-learn (+ matplotlib for plots): the caller runs the model and passes arrays in, so this
module never imports TensorFlow or MLflow. scikit-learn and matplotlib are imported inside the functions
that use them, so importing this module stays cheap (sklearn.metrics alone costs ~0.9 s here).

Honesty rules this module encodes:
- every headline number carries AUC, a 95% confidence interval and the majority-class baseline beside it
  (the project this grew from reported 78.96% accuracy against a 77.5% "everyone is negative" baseline);
- thresholds are chosen on *validation* predictions (`choose_threshold`); the test split only evaluates.

Convention: a case is predicted positive when `y_prob >= threshold` (scikit-learn's `roc_curve` convention,
so a threshold taken from its output reproduces the same operating point).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from pipeline.files import atomic_write, jsonable, write_json  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Resamples are processed in chunks of at most this many (resample, case) cells (~200 x 5,000): the
# vectorised bootstrap then peaks at a few tens of MB whatever the split size, at no cost in speed here.
_CHUNK_CELLS = 1_000_000

AGE_BANDS = ("0-17", "18-39", "40-59", "60+", "unknown")


# --- input checks ---------------------------------------------------------------------------------------
def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """1-D int labels in {0, 1} and finite float scores of the same length (clear errors, not odd NaNs)."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("y_prob contains NaN or infinite values")
    return y.astype(np.int64), p


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when undefined (e.g. sensitivity with no positives)."""
    return float(num) / float(den) if den else math.nan


# --- threshold ------------------------------------------------------------------------------------------
def choose_threshold(y_true, y_prob, target_sensitivity: float = 0.0) -> float:
    """Operating threshold from VALIDATION predictions (never from test).

    target_sensitivity == 0: Youden's J, the ROC threshold maximising tpr - fpr (the highest such threshold
    on ties, i.e. the fewer false positives). Otherwise: the highest threshold whose sensitivity on these
    data is >= target (screening use: "catch at least 90% of pneumonias", at the fewest false alarms).
    One class only (or no data): no ROC exists, so 0.5.
    """
    from sklearn.metrics import roc_curve

    if not 0.0 <= target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in [0, 1], got {target_sensitivity}")
    y, p = _check(y_true, y_prob)
    if not _both_classes(y):
        return 0.5
    # drop_intermediate=False: every distinct score is a candidate, so the first threshold reaching a target
    # sensitivity is never skipped for lying on a straight piece of the curve.
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thresholds descending; thr[0] = +inf
    if target_sensitivity > 0:
        # tpr is non-decreasing as the threshold falls: the first index reaching the target is the highest
        # threshold; the 1e-12 only absorbs float rounding of k / n_pos.
        i = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    else:
        i = int(np.argmax(tpr - fpr))  # argmax takes the first (= highest) threshold on ties
    if not np.isfinite(thr[i]):
        # J is never above 0 (a useless ranking): the "predict nobody" point. A finite value just above the
        # highest score keeps the threshold JSON-serialisable.
        return float(np.nextafter(p.max(), np.inf))
    return float(thr[i])


# --- AUC: vectorised bootstrap, DeLong --------------------------------------------------------------------
def _resampled_aucs(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample `y[idx[b]], p[idx[b]]` (NaN where a resample has one class only).

    Hand-written for speed instead of calling roc_auc_score B times (~1 ms each): AUC equals the
    Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(tie). With cases grouped by distinct score
    (ascending), each resample only needs how many positives and negatives it drew per group; one bincount
    gives those for a whole chunk of resamples, and a cumulative sum gives the negatives below each group.
    The tests check it against sklearn's roc_auc_score on explicit resamples, ties included.
    """
    _, gid = np.unique(p, return_inverse=True)  # group id = rank of the distinct score
    n_groups = int(gid.max()) + 1
    code = 2 * gid + y  # (group, class) of each case in one integer
    n_res = idx.shape[0]
    offsets = (np.arange(n_res, dtype=np.int64) * 2 * n_groups)[:, None]
    counts = np.bincount((code[idx] + offsets).ravel(), minlength=n_res * 2 * n_groups)
    counts = counts.reshape(n_res, n_groups, 2)
    neg, pos = counts[:, :, 0], counts[:, :, 1]
    neg_below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
    twice_wins = (pos * (2 * neg_below + neg)).sum(axis=1)  # a tie counts half: exact in integers
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = twice_wins / (2.0 * n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _bootstrap_indices(n_cases: int, n: int, seed: int):
    """Yield chunks of bootstrap index rows (resampling cases with replacement), reproducible by seed."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n_cases, 1))
    done = 0
    while done < n:
        rows = min(chunk, n - done)
        yield rng.integers(0, n_cases, size=(rows, n_cases))
        done += rows


def bootstrap_auc_ci(y_true, y_prob, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) confidence interval of the ROC AUC, resampling cases.

    Resamples holding one class only have no AUC and are skipped. (NaN, NaN) when the data have one class.
    """
    y, p = _check(y_true, y_prob)
    if not _both_classes(y) or n < 1:
        return math.nan, math.nan
    aucs = np.concatenate([_resampled_aucs(y, p, idx) for idx in _bootstrap_indices(y.size, n, seed)])
    aucs = aucs[np.isfinite(aucs)]
    if aucs.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_auc_difference(y_true, prob_a, prob_b, n: int = 2000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same cases, with a paired bootstrap 95% CI and two-sided p-value.

    Paired: each resample draws the same cases for both models, so the case-mix noise they share cancels
    (much narrower than comparing two separate CIs). p = 2 * min(share of resampled differences <= 0,
    share >= 0), with the +1 correction so a finite bootstrap never claims p = 0. Identical predictors give
    diff 0 and p = 1. `se` is the bootstrap standard deviation of the difference.
    """
    y, pa = _check(y_true, prob_a)
    _, pb = _check(y_true, prob_b)
    out = {"auc_a": math.nan, "auc_b": math.nan, "diff": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "p_value": math.nan, "se": math.nan, "n_boot": 0}
    if not _both_classes(y):
        return out
    from sklearn.metrics import roc_auc_score

    auc_a, auc_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    diffs = np.concatenate([_resampled_aucs(y, pa, idx) - _resampled_aucs(y, pb, idx)
                            for idx in _bootstrap_indices(y.size, n, seed)])
    diffs = diffs[np.isfinite(diffs)]
    out.update(auc_a=auc_a, auc_b=auc_b, diff=auc_a - auc_b, n_boot=int(diffs.size))
    if diffs.size:
        low, high = np.percentile(diffs, [2.5, 97.5])
        k = diffs.size
        p_le = (np.count_nonzero(diffs <= 0) + 1) / (k + 1)
        p_ge = (np.count_nonzero(diffs >= 0) + 1) / (k + 1)
        out.update(ci_low=float(low), ci_high=float(high), p_value=float(min(1.0, 2 * min(p_le, p_ge))),
                   se=float(diffs.std(ddof=1)) if k > 1 else math.nan)
    return out


def delong_test(y_true, prob_a, prob_b) -> tuple[float, float, float]:
    """DeLong's test for two correlated ROC AUCs: (AUC_a - AUC_b, z, two-sided p).

    Fast O(n log n) form (Sun & Xu 2014, IEEE Signal Process. Lett. 21:1389) built from mid-ranks: no
    resampling, deterministic; checked against the paired bootstrap in the tests. NaNs with one class.
    """
    from scipy.stats import rankdata  # scipy is a scikit-learn dependency

    y, pa = _check(y_true, prob_a)
    _, pb = _check(y_true, prob_b)
    if not _both_classes(y):
        return math.nan, math.nan, math.nan
    m, k = int(y.sum()), int(y.size - y.sum())
    v10, v01, aucs = [], [], []
    for p in (pa, pb):
        x, z = p[y == 1], p[y == 0]  # positives, negatives
        tx, tz, t = rankdata(x), rankdata(z), rankdata(np.concatenate([x, z]))
        aucs.append((t[:m].sum() - m * (m + 1) / 2) / (m * k))
        v10.append((t[:m] - tx) / k)  # per positive: share of negatives it outranks
        v01.append(1.0 - (t[m:] - tz) / m)  # per negative: share of positives that outrank it
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / m + s01 / k  # 2 x 2 covariance of the two AUC estimates
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # e.g. identical rankings: no variance, so only "no difference" can be said
        if abs(diff) < 1e-12:
            return diff, 0.0, 1.0
        return diff, math.copysign(math.inf, diff), 0.0
    z_stat = diff / math.sqrt(var)
    return diff, float(z_stat), float(2 * NormalDist().cdf(-abs(z_stat)))


# --- metrics --------------------------------------------------------------------------------------------
def _wilson(successes: int, total: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion: closed form, deterministic, sane near 0 and 1."""
    if total == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - alpha / 2)
    phat = successes / total
    den = 1 + z * z / total
    centre = (phat + z * z / (2 * total)) / den
    half = z / den * math.sqrt(phat * (1 - phat) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def compute_metrics(y_true, y_prob, threshold: float, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """All headline metrics at one threshold, as JSON-ready Python floats/ints (NaN where undefined).

    AUC carries a bootstrap 95% CI, accuracy a Wilson 95% CI, and accuracy always sits beside the majority
    baseline max(prevalence, 1 - prevalence): the accuracy of answering the commoner class for everyone.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y, p = _check(y_true, y_prob)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("y_prob must be probabilities in [0, 1]")
    n, positives = int(y.size), int(y.sum())
    pred = p >= threshold
    tp = int(np.count_nonzero(pred & (y == 1)))
    fp = int(np.count_nonzero(pred & (y == 0)))
    fn, tn = positives - tp, n - positives - fp
    both = _both_classes(y)

    prevalence = _ratio(positives, n)
    accuracy = _ratio(tp + tn, n)
    baseline = max(prevalence, 1 - prevalence) if n else math.nan
    sensitivity, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    acc_low, acc_high = _wilson(tp + tn, n)
    auc_low, auc_high = bootstrap_auc_ci(y, p, n=n_boot, seed=seed) if both else (math.nan, math.nan)
    return {
        "n": n,
        "positives": positives,
        "prevalence": prevalence,
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
        "auc_ci_low": auc_low,
        "auc_ci_high": auc_high,
        # average precision = area under the PR curve without the optimistic linear interpolation
        "auc_pr": float(average_precision_score(y, p)) if positives else math.nan,
        "accuracy": accuracy,
        "accuracy_ci_low": acc_low,
        "accuracy_ci_high": acc_high,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        # F1 from counts (= sklearn's f1_score); undefined when there is nothing to find and nothing found
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": float(brier_score_loss(y, p, pos_label=1)) if n else math.nan,
        "threshold": float(threshold),
        "majority_baseline_accuracy": baseline,
        "accuracy_minus_baseline": accuracy - baseline,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def age_band(age) -> str:
    """Age in years -> "0-17", "18-39", "40-59", "60+" or "unknown" (-1, missing, or implausible).

    RSNA's labels hold a few ages above 140: data-entry errors, so "unknown" rather than "60+".
    """
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(a) or a < 0 or a > 120:
        return "unknown"
    return "0-17" if a < 18 else "18-39" if a < 40 else "40-59" if a < 60 else "60+"


def _as_labels(values) -> np.ndarray:
    """Group values as strings; None/NaN (pandas' missing) become "" like an absent DICOM tag."""
    def one(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return str(v)

    return np.array([one(v) for v in np.asarray(values, dtype=object).ravel()], dtype=object)


_SUBGROUP_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "auc_pr", "accuracy", "accuracy_ci_low",
                  "accuracy_ci_high", "sensitivity", "specificity", "precision", "f1", "brier",
                  "majority_baseline_accuracy", "accuracy_minus_baseline")


def subgroup_metrics(y_true, y_prob, threshold, groups: dict, *, n_boot: int = 200, seed: int = 0,
                     min_count: int = 1) -> list[dict]:
    """One row per (group, value), e.g. view_position AP next to PA, sex, age band, at the given threshold.

    A chest X-ray model can learn the view (AP films come from sicker, bedside patients) instead of the
    disease; per-view AUC and baselines side by side show it. Every value gets a row so counts add up to n;
    a value with fewer than `min_count` cases keeps its n/positives but its metrics are NaN (too few cases
    to say anything).
    """
    y, p = _check(y_true, y_prob)
    rows = []
    for name, values in groups.items():
        labels = _as_labels(values)
        if labels.size != y.size:
            raise ValueError(f"group {name!r} has {labels.size} values for {y.size} cases")
        for value in sorted(set(labels.tolist())):
            mask = labels == value
            m = compute_metrics(y[mask], p[mask], threshold, n_boot=n_boot, seed=seed)
            row = {"group": name, "value": value, "n": m["n"], "positives": m["positives"],
                   "prevalence": m["prevalence"]}
            row.update({k: (m[k] if m["n"] >= min_count else math.nan) for k in _SUBGROUP_KEYS})
            rows.append(row)
    return rows


# --- text and JSON --------------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ci(value, low, high) -> str:
    return f"{_f(value)} [{_f(low)}, {_f(high)}]"


def format_table(metrics: dict, subgroups: list[dict] | None = None) -> str:
    """Plain-text report: the headline metrics, accuracy beside the majority baseline, then subgroups."""
    prev = metrics.get("prevalence", math.nan)
    majority = "all negative" if not (isinstance(prev, float) and prev > 0.5) else "all positive"
    lines = [
        f"{'metric':<34}value",
        f"{'AUC [95% CI]':<34}{_ci(metrics['auc'], metrics['auc_ci_low'], metrics['auc_ci_high'])}",
        f"{'AUC-PR (chance = prevalence)':<34}{_f(metrics['auc_pr'])} (prevalence {_f(prev)})",
        f"{'Accuracy [95% CI]':<34}"
        f"{_ci(metrics['accuracy'], metrics['accuracy_ci_low'], metrics['accuracy_ci_high'])}",
        f"{f'Majority baseline ({majority})':<34}{_f(metrics['majority_baseline_accuracy'])}"
        f"  (accuracy - baseline: {_f(metrics['accuracy_minus_baseline'])})",
        f"{'Sensitivity':<34}{_f(metrics['sensitivity'])}",
        f"{'Specificity':<34}{_f(metrics['specificity'])}",
        f"{'Precision':<34}{_f(metrics['precision'])}",
        f"{'F1':<34}{_f(metrics['f1'])}",
        f"{'Brier':<34}{_f(metrics['brier'], 4)}",
        f"{'Threshold':<34}{_f(metrics['threshold'], 4)}",
        f"{'n / positives':<34}{metrics['n']} / {metrics['positives']}",
    ]
    if subgroups:
        head = (f"{'group':<14}{'value':<10}{'n':>7}{'pos':>6}  {'AUC [95% CI]':<24}"
                f"{'sens':>7}{'spec':>7}{'acc':>7}{'base':>7}")
        lines += ["", "Subgroups (same threshold)", head, "-" * len(head)]
        for r in subgroups:
            lines.append(
                f"{str(r['group']):<14}{(r['value'] or '(blank)'):<10}{r['n']:>7}{r['positives']:>6}  "
                f"{_ci(r['auc'], r['auc_ci_low'], r['auc_ci_high']):<24}{_f(r['sensitivity']):>7}"
                f"{_f(r['specificity']):>7}{_f(r['accuracy']):>7}{_f(r['majority_baseline_accuracy']):>7}"
            )
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------
# Figures are built with matplotlib's object API (matplotlib.figure.Figure), never pyplot: no GUI backend
# is ever selected, and figures are not held in pyplot's global registry, so nothing leaks in long studies.
def _figure(*args, **kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(*args, layout="constrained", **kwargs)


def save_figure(fig: Figure, path) -> None:
    """Save a figure atomically (format from the suffix, PNG by default) and release it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=110))
    plt = sys.modules.get("matplotlib.pyplot")  # only a pyplot-made figure needs closing
    if plt is not None and getattr(fig.canvas, "manager", None) is not None:
        plt.close(fig)


def _one_class_note(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} undefined:\none class only", ha="center", va="center",
            transform=ax.transAxes)


def plot_roc(y_true, y_prob, title: str = "ROC", threshold: float | None = None) -> Figure:
    """ROC curve with AUC and its bootstrap 95% CI in the legend, the chance diagonal, and optionally the
    operating point at `threshold`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = _check(y_true, y_prob)
    fig = _figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC 0.5)")
    if _both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        low, high = bootstrap_auc_ci(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, p):.3f} [95% CI {low:.3f}-{high:.3f}]")
        if threshold is not None:
            pred = p >= threshold
            ax.plot([pred[y == 0].mean()], [pred[y == 1].mean()], "o", color="C3",
                    label=f"threshold {threshold:.3f}")
    else:
        _one_class_note(ax, "ROC")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pr(y_true, y_prob, title: str = "Precision-recall") -> Figure:
    """Precision-recall curve with average precision, and the prevalence line (a random ranker's AUC-PR)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, p = _check(y_true, y_prob)
    fig = _figure(figsize=(5, 5))
    ax = fig.add_subplot()
    if y.sum() > 0:
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", lw=2,
                label=f"AUC-PR (AP) {average_precision_score(y, p):.3f}")
        prevalence = y.mean()
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence {prevalence:.3f} (chance)")
    else:
        _one_class_note(ax, "Precision-recall")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_confusion(y_true, y_prob, threshold: float) -> Figure:
    """2 x 2 confusion matrix at `threshold`: counts and the share of each actual class (row rates)."""
    y, p = _check(y_true, y_prob)
    pred = (p >= threshold).astype(np.int64)
    counts = np.array([[np.sum((y == a) & (pred == b)) for b in (0, 1)] for a in (0, 1)])
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    names = [["TN", "FP"], ["FN", "TP"]]
    for a in (0, 1):
        for b in (0, 1):
            ax.text(b, a, f"{names[a][b]}\n{counts[a, b]}\n{rates[a, b]:.1%}", ha="center", va="center",
                    color="white" if rates[a, b] > 0.5 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["negative", "positive"],
           yticklabels=["negative", "positive"], xlabel="predicted", ylabel="actual",
           title=f"Confusion at threshold {threshold:.3f}\nn={y.size}")
    fig.colorbar(im, ax=ax, label="share of actual class")
    return fig


def plot_calibration(y_true, y_prob, n_bins: int = 10, *, y_prob_calibrated=None,
                     temperature: float | None = None) -> Figure:
    """Reliability diagram (observed positive rate per predicted-probability bin) above a histogram of the
    predictions: a model can rank well (high AUC) and still give probabilities that mean nothing.

    With `y_prob_calibrated` (the same cases after temperature scaling) both curves are drawn, before and
    after, each labelled with its Brier score and ECE (pipeline.calibration)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from pipeline.calibration import expected_calibration_error

    y, p = _check(y_true, y_prob)
    series = [("model" if y_prob_calibrated is None else "uncalibrated", p)]
    if y_prob_calibrated is not None:
        series.append((f"calibrated (T={temperature:.3f})" if temperature is not None else "calibrated",
                       _check(y_true, y_prob_calibrated)[1]))
    fig = _figure(figsize=(5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for k, (name, q) in enumerate(series):
        if y.size:
            observed, predicted = calibration_curve(y, q, n_bins=n_bins, pos_label=1)
            ax.plot(predicted, observed, "o-", color=f"C{k}",
                    label=f"{name} (Brier {brier_score_loss(y, q, pos_label=1):.4f}, "
                          f"ECE {expected_calibration_error(y, q):.4f})")
        hist.hist(q, bins=n_bins, range=(0, 1), color=f"C{k}", alpha=0.7 if len(series) == 1 else 0.5,
                  label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive rate", title="Calibration (reliability)")
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="predicted probability", ylabel="cases")
    return fig


def plot_history(history: dict) -> Figure:
    """Per-epoch loss/val_loss and auc/val_auc curves (Keras History.history); missing keys are skipped."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=(9, 3.8))
    panels = fig.subplots(1, 2)
    for ax, keys, name in ((panels[0], ("loss", "val_loss"), "loss"), (panels[1], ("auc", "val_auc"), "AUC")):
        drawn = False
        for colour, key in enumerate(keys):  # train always C0, validation always C1
            values = history.get(key) or []
            if len(values):
                ax.plot(range(1, len(values) + 1), values, "o-", ms=3, color=f"C{colour}", label=key)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return fig


def plot_auc_comparison(results: dict) -> Figure:
    """AUC with its 95% CI per model (e.g. candidate vs champion), one horizontal bar each.

    `results` maps a model name to a compute_metrics-like dict with auc, auc_ci_low, auc_ci_high.
    """
    names = list(results)
    fig = _figure(figsize=(6, 1.2 + 0.6 * max(len(names), 1)))
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        r = results[name]
        auc = r.get("auc", math.nan)
        low, high = r.get("auc_ci_low", math.nan), r.get("auc_ci_high", math.nan)
        if auc is None or not math.isfinite(auc):
            ax.text(0.5, i, "AUC n/a", va="center")
            continue
        err = None
        if all(v is not None and math.isfinite(v) for v in (low, high)):
            err = [[auc - low], [high - auc]]
        ax.errorbar([auc], [i], xerr=err, fmt="o", capsize=4, color=f"C{i % 10}")
        ax.annotate(f"{auc:.3f}", (auc, i), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8)
    ax.axvline(0.5, ls="--", color="grey", lw=1)
    ax.set(yticks=range(len(names)), yticklabels=names, xlim=(0.4, 1.0), ylim=(-0.7, len(names) - 0.3),
           xlabel="ROC AUC (95% CI)", title="AUC by model")
    return fig
