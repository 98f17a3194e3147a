"""Metrics, threshold choice, confidence intervals and tests for a binary classifier's predictions.

Pure numpy + scikit-learn/scipy: the caller runs the model and passes arrays in, so this module never imports
TensorFlow, MLflow or matplotlib (figures live in `pipeline.evaluate.plots`). scikit-learn is imported inside the
functions that use it, so importing this module stays cheap (sklearn.metrics alone costs ~0.9 s here).
It is also the one home of number and interval formatting (`fmt`, `fmt_ci`) for tables, cards and reports.

Honesty rules this module encodes:
- every headline number carries AUC, a 95% confidence interval and the majority-class baseline beside it
  (the project this grew from reported 78.96% accuracy against a 77.5% "everyone is negative" baseline);
- intervals and tests resample / sum over PATIENTS when a patient has several images (`clusters`);
- thresholds are chosen on *validation* predictions (`choose_threshold`); the test split only evaluates.

Convention: a case is predicted positive when `y_prob >= threshold` (scikit-learn's `roc_curve` convention,
so a threshold taken from its output reproduces the same operating point).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from pipeline.files import jsonable, write_json  # noqa: F401  (re-exported for the report writers)

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


# --- AUC: vectorised (cluster) bootstrap, (clustered) DeLong ------------------------------------------------
# Patients, not images, are the independent units: Kermany patients have several images each, and images of one
# patient share anatomy, scanner and disease. Every interval and test below takes `clusters` (a patient id per
# case); resampling or summing per patient keeps the intervals honest. Without it each case is its own patient.
def clusters_of(clusters, n: int) -> np.ndarray:
    """One integer cluster id per case (0..K-1); `None` = every case its own cluster."""
    if clusters is None:
        return np.arange(n, dtype=np.int64)
    labels = np.asarray(clusters, dtype=object).ravel()
    if labels.size != n:
        raise ValueError(f"clusters has {labels.size} values for {n} cases")
    _, first, cid = np.unique(labels.astype(str), return_index=True, return_inverse=True)
    # Numbered in order of first appearance: with one case per cluster this is arange(n), so the bootstrap
    # draws exactly what it draws without clusters (same seed, same interval).
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[cid.ravel()]


def _weighted_aucs(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample given as case multiplicities `weights[b, i]` (NaN where a resample has one class).

    Hand-written for speed instead of calling roc_auc_score B times (~1 ms each): AUC equals the
    Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(tie). With cases grouped by distinct score
    (ascending), each resample only needs how many positives and negatives it drew per group; one weighted
    bincount gives those for a whole chunk of resamples, and a cumulative sum the negatives below each group.
    The tests check it against sklearn's roc_auc_score on explicit resamples, ties included.
    """
    _, gid = np.unique(p, return_inverse=True)  # group id = rank of the distinct score
    n_groups = int(gid.max()) + 1
    code = 2 * gid + y  # (group, class) of each case in one integer
    n_res = weights.shape[0]
    offsets = (np.arange(n_res, dtype=np.int64) * 2 * n_groups)[:, None]
    counts = np.bincount((code[None, :] + offsets).ravel(), weights=weights.ravel().astype(np.float64),
                         minlength=n_res * 2 * n_groups).reshape(n_res, n_groups, 2)
    neg, pos = counts[:, :, 0], counts[:, :, 1]
    neg_below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
    twice_wins = (pos * (2 * neg_below + neg)).sum(axis=1)  # a tie counts half
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = twice_wins / (2.0 * n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _resampled_aucs(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample `y[idx[b]], p[idx[b]]` (explicit index rows; NaN with one class)."""
    n_res, n = idx.shape[0], y.size
    offsets = (np.arange(n_res, dtype=np.int64) * n)[:, None]
    weights = np.bincount((idx + offsets).ravel(), minlength=n_res * n).reshape(n_res, n)
    return _weighted_aucs(y, p, weights)


def _bootstrap_weights(cid: np.ndarray, n: int, seed: int):
    """Yield chunks of bootstrap case weights, resampling CLUSTERS with replacement (the cluster bootstrap:
    Davison & Hinkley, Bootstrap Methods and their Application, 1997, sec. 3.8; Field & Welsh, JRSS B 2007).
    A drawn patient brings all of its images; with one case per cluster this is the ordinary bootstrap.
    Reproducible by seed; chunks bound the memory whatever the split size."""
    rng = np.random.default_rng(seed)
    k = int(cid.max()) + 1 if cid.size else 0
    chunk = max(1, _CHUNK_CELLS // max(cid.size, 1))
    done = 0
    while done < n:
        rows = min(chunk, n - done)
        drawn = rng.integers(0, k, size=(rows, k))
        offsets = (np.arange(rows, dtype=np.int64) * k)[:, None]
        per_cluster = np.bincount((drawn + offsets).ravel(), minlength=rows * k).reshape(rows, k)
        yield per_cluster[:, cid]
        done += rows


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_auc_ci(y_true, y_prob, n: int = 1000, seed: int = 0, alpha: float = 0.05,
                     clusters=None) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) confidence interval of the ROC AUC, resampling patients (`clusters`)
    or, without them, cases. Resamples holding one class only have no AUC and are skipped. (NaN, NaN) when the
    data have one class."""
    y, p = _check(y_true, y_prob)
    if not _both_classes(y) or n < 1:
        return math.nan, math.nan
    cid = clusters_of(clusters, y.size)
    aucs = np.concatenate([_weighted_aucs(y, p, w) for w in _bootstrap_weights(cid, n, seed)])
    return _percentile_ci(aucs, alpha)


def paired_auc_difference(y_true, prob_a, prob_b, n: int = 2000, seed: int = 0, alpha: float = 0.05,
                          clusters=None) -> dict:
    """AUC(a) - AUC(b) on the same cases, with a paired (cluster) bootstrap (1 - alpha) CI and two-sided p.

    Paired: each resample draws the same patients for both models, so the case-mix noise they share cancels
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

    cid = clusters_of(clusters, y.size)
    auc_a, auc_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    diffs = np.concatenate([_weighted_aucs(y, pa, w) - _weighted_aucs(y, pb, w)
                            for w in _bootstrap_weights(cid, n, seed)])
    diffs = diffs[np.isfinite(diffs)]
    out.update(auc_a=auc_a, auc_b=auc_b, diff=auc_a - auc_b, n_boot=int(diffs.size))
    if diffs.size:
        low, high = _percentile_ci(diffs, alpha)
        k = diffs.size
        p_le = (np.count_nonzero(diffs <= 0) + 1) / (k + 1)
        p_ge = (np.count_nonzero(diffs >= 0) + 1) / (k + 1)
        out.update(ci_low=low, ci_high=high, p_value=float(min(1.0, 2 * min(p_le, p_ge))),
                   se=float(diffs.std(ddof=1)) if k > 1 else math.nan)
    return out


def _placements(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10 per positive, V01 per negative): DeLong's placement values from mid-ranks, O(n log n)
    (Sun & Xu 2014, IEEE Signal Process. Lett. 21:1389)."""
    from scipy.stats import rankdata  # scipy is a scikit-learn dependency

    m, k = int(y.sum()), int(y.size - y.sum())
    x, z = p[y == 1], p[y == 0]  # positives, negatives
    tx, tz, t = rankdata(x), rankdata(z), rankdata(np.concatenate([x, z]))
    auc = (t[:m].sum() - m * (m + 1) / 2) / (m * k)
    return float(auc), (t[:m] - tx) / k, 1.0 - (t[m:] - tz) / m


def auc_covariance(y_true, probs: list, clusters=None) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs, their covariance matrix) for several scorers on the same cases.

    Clustered DeLong (Obuchowski, Biometrics 53:567, 1997): placement values are summed per patient, so
    images of one patient are not counted as independent evidence. Per cluster i with m_i positives and n_i
    negatives: S10 = I10 / ((I10 - 1) M) sum_i (V10_i - m_i A)(V10_i - m_i A)', S01 likewise over negatives,
    S11 = I / (I - 1) sum_i (V10_i - m_i A)(V01_i - n_i A)', and cov = S10 / M + S01 / N + (S11 + S11') / (M N).
    With one case per patient it equals DeLong, DeLong & Clarke-Pearson (Biometrics 44:837, 1988) exactly.
    """
    y, _ = _check(y_true, probs[0])
    cid = clusters_of(clusters, y.size)
    ps = [_check(y_true, p)[1] for p in probs]
    pos, neg = y == 1, y == 0
    big_m, big_n = int(pos.sum()), int(neg.sum())
    k = int(cid.max()) + 1
    aucs, v10, v01 = [], [], []
    for p in ps:
        a, x, z = _placements(y, p)
        aucs.append(a)
        v10.append(np.bincount(cid[pos], weights=x, minlength=k))  # per-cluster sums
        v01.append(np.bincount(cid[neg], weights=z, minlength=k))
    aucs_arr = np.array(aucs)
    m_i = np.bincount(cid[pos], minlength=k).astype(np.float64)
    n_i = np.bincount(cid[neg], minlength=k).astype(np.float64)
    d10 = np.array(v10) - m_i[None, :] * aucs_arr[:, None]  # (scorers, clusters)
    d01 = np.array(v01) - n_i[None, :] * aucs_arr[:, None]
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    s10 = i10 / ((i10 - 1) * big_m) * (d10 @ d10.T) if i10 > 1 else np.full((len(ps),) * 2, np.nan)
    s01 = i01 / ((i01 - 1) * big_n) * (d01 @ d01.T) if i01 > 1 else np.full((len(ps),) * 2, np.nan)
    s11 = k / (k - 1) * (d10 @ d01.T)
    cov = s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n)
    return aucs_arr, cov


def delong_test(y_true, prob_a, prob_b, clusters=None, alpha: float = 0.05) -> dict:
    """DeLong's test for two correlated ROC AUCs, clustered by patient when `clusters` is given (Obuchowski
    1997): {diff, se, z, p, ci_low, ci_high} with a Wald (1 - alpha) CI of the difference. Deterministic, no
    resampling: the promotion rule reads it. NaNs with one class."""
    y, pa = _check(y_true, prob_a)
    _, pb = _check(y_true, prob_b)
    out = dict.fromkeys(("diff", "se", "z", "p", "ci_low", "ci_high"), math.nan)
    if not _both_classes(y):
        return out
    aucs, cov = auc_covariance(y, [pa, pb], clusters)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    zq = NormalDist().inv_cdf(1 - alpha / 2)
    if not math.isfinite(var):
        out["diff"] = diff
        return out
    if var <= 1e-15:  # e.g. identical rankings: no variance, so only "no difference" can be said
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
        return {"diff": diff, "se": 0.0, "z": z, "p": p, "ci_low": diff, "ci_high": diff}
    se = math.sqrt(var)
    z = diff / se
    return {"diff": diff, "se": se, "z": float(z), "p": float(2 * NormalDist().cdf(-abs(z))),
            "ci_low": diff - zq * se, "ci_high": diff + zq * se}


# --- metrics --------------------------------------------------------------------------------------------
def wilson(successes: float, total: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion: closed form, deterministic, sane near 0 and 1. `total` may be
    an effective sample size (not an integer) for clustered data (see `clustered_proportion_ci`)."""
    if total <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - alpha / 2)
    phat = successes / total
    den = 1 + z * z / total
    centre = (phat + z * z / (2 * total)) / den
    half = z / den * math.sqrt(max(phat * (1 - phat), 0.0) / total + z * z / (4 * total * total))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


_wilson = wilson  # the name the tests and older callers use


def design_effect(hits: np.ndarray, cid: np.ndarray) -> float:
    """Kish's design effect of a proportion over clustered cases (Kish, Survey Sampling, 1965): the ratio of
    the cluster-robust variance of the ratio estimator sum(hits_i) / sum(n_i) (Donner & Klar, Design and
    Analysis of Cluster Randomization Trials, 2000) to the binomial one; never below 1 (no credit is taken
    for a negative intra-patient correlation)."""
    n = hits.size
    k = int(cid.max()) + 1 if n else 0
    p = hits.mean() if n else math.nan
    if k < 2 or k == n or not 0 < p < 1:
        return 1.0
    per_hits = np.bincount(cid, weights=hits.astype(np.float64), minlength=k)
    per_n = np.bincount(cid, minlength=k).astype(np.float64)
    robust = k / (k - 1) * float(((per_hits - p * per_n) ** 2).sum()) / n**2
    return max(1.0, robust / (p * (1 - p) / n))


def clustered_proportion_ci(hits, clusters=None, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson interval of a proportion at the effective sample size n / design effect (patients, not images)."""
    hits = np.asarray(hits, dtype=np.float64).ravel()
    if hits.size == 0:
        return math.nan, math.nan
    deff = design_effect(hits, clusters_of(clusters, hits.size))
    n_eff = hits.size / deff
    return wilson(hits.mean() * n_eff, n_eff, alpha)


def compute_metrics(y_true, y_prob, threshold: float, *, n_boot: int = 1000, seed: int = 0,
                    clusters=None) -> dict:
    """All headline metrics at one threshold, as JSON-ready Python floats/ints (NaN where undefined).

    AUC carries a bootstrap 95% CI, accuracy a Wilson 95% CI, and accuracy always sits beside the majority
    baseline max(prevalence, 1 - prevalence): the accuracy of answering the commoner class for everyone.
    With `clusters` (a patient id per image) the AUC interval resamples patients and the accuracy interval
    uses the effective sample size; `n` counts images and `patients` patients.
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
    cid = clusters_of(clusters, n)
    acc_low, acc_high = clustered_proportion_ci(pred == (y == 1), cid) if n else (math.nan, math.nan)
    auc_low, auc_high = bootstrap_auc_ci(y, p, n=n_boot, seed=seed, clusters=cid) if both else (math.nan, math.nan)
    return {
        "n": n,
        "patients": int(cid.max()) + 1 if n else 0,
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
                     min_count: int = 1, clusters=None) -> list[dict]:
    """One row per (group, value), e.g. view_position AP next to PA, sex, age band, at the given threshold.

    A chest X-ray model can learn the view (AP films come from sicker, bedside patients) instead of the
    disease; per-view AUC and baselines side by side show it. Every value gets a row so counts add up to n;
    a value with fewer than `min_count` cases keeps its n/positives but its metrics are NaN (too few cases
    to say anything).
    """
    y, p = _check(y_true, y_prob)
    cid = clusters_of(clusters, y.size)
    rows = []
    for name, values in groups.items():
        labels = _as_labels(values)
        if labels.size != y.size:
            raise ValueError(f"group {name!r} has {labels.size} values for {y.size} cases")
        for value in sorted(set(labels.tolist())):
            mask = labels == value
            m = compute_metrics(y[mask], p[mask], threshold, n_boot=n_boot, seed=seed, clusters=cid[mask])
            row = {"group": name, "value": value, "n": m["n"], "patients": m["patients"], "positives": m["positives"],
                   "prevalence": m["prevalence"]}
            row.update({k: (m[k] if m["n"] >= min_count else math.nan) for k in _SUBGROUP_KEYS})
            rows.append(row)
    return rows


# --- text and JSON --------------------------------------------------------------------------------------
def lower_is_better(metric: str) -> bool:
    """The direction of a metric by its name (a loss or a Brier score falls as a model improves): the one rule
    the study's direction (pipeline/study/tune.py) and the registry's ranking (pipeline/promote/promotion.py) share."""
    return metric.endswith(("loss", "brier"))


def fmt(x, digits: int = 3, sign: bool = False) -> str:
    """A number for a table or card: fixed digits, "n/a" for None/NaN/inf (the one home of this rule)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_ci(value, low, high, digits: int = 3, sign: bool = False) -> str:
    """`value [low, high]`."""
    return f"{fmt(value, digits, sign)} [{fmt(low, digits, sign)}, {fmt(high, digits, sign)}]"


def fmt_metric_ci(m: dict, key: str, digits: int = 3) -> str:
    """`m[key] [m[key_ci_low], m[key_ci_high]]` from a compute_metrics-like dict."""
    return fmt_ci(m.get(key), m.get(key + "_ci_low"), m.get(key + "_ci_high"), digits)


def fmt_difference(c: dict) -> str:
    """A paired AUC comparison (`compare_aucs`-like dict): the difference with its clustered-DeLong interval and
    p, and the paired cluster bootstrap's interval and p. The one wording the gate, the card and the record use."""
    return (f"difference {fmt_ci(c['diff'], c.get('delong_ci_low'), c.get('delong_ci_high'), sign=True)} "
            f"(clustered DeLong, p={fmt(c.get('delong_p'))}; paired cluster bootstrap "
            f"{fmt_ci(c['diff'], c.get('ci_low'), c.get('ci_high'), sign=True)}, p={fmt(c.get('p_value'))})")


_f, _ci = fmt, fmt_ci  # short names used below


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
        f"{'images / patients / positives':<34}{metrics['n']} / {metrics.get('patients', metrics['n'])} / "
        f"{metrics['positives']}",
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


