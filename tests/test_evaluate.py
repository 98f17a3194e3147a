"""pipeline.evaluate.metrics and pipeline.evaluate.plots against scikit-learn on simulated data with known answers.

Binormal model: negative scores ~ N(0, 1), positive ~ N(d, 1), so the true AUC is Phi(d / sqrt(2)).
Scores go through a sigmoid to be probabilities (monotone: the AUC is unchanged).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import pipeline.evaluate.metrics as evaluation_metrics
from pipeline.evaluate import plots


def binormal(n: int, d: float = 1.0, prevalence: float = 0.225, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    score = rng.normal(size=n) + d * y
    return y, 1.0 / (1.0 + np.exp(-score))


def true_auc(d: float) -> float:
    return NormalDist().cdf(d / math.sqrt(2))


# --- metrics --------------------------------------------------------------------------------------------
def test_metrics_match_sklearn():
    y, p = binormal(2000, seed=1)
    m = evaluation_metrics.compute_metrics(y, p, 0.4, n_boot=200)
    pred = (p >= 0.4).astype(int)
    assert m["n"] == 2000 and m["positives"] == int(y.sum())
    assert m["prevalence"] == pytest.approx(y.mean())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auc_pr"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 2000
    assert m["auc_ci_low"] < m["auc"] < m["auc_ci_high"]
    assert m["accuracy_ci_low"] < m["accuracy"] < m["accuracy_ci_high"]
    # JSON-ready Python types, not numpy scalars
    assert all(type(v) in (int, float) for v in m.values())
    json.dumps(m)


def test_majority_baseline_and_all_negative_predictor():
    y = np.zeros(1000, dtype=int)
    y[:225] = 1  # 22.5% prevalence: "negative for everyone" scores 77.5%
    m = evaluation_metrics.compute_metrics(y, np.full(1000, 0.1), threshold=0.5, n_boot=0)
    assert m["majority_baseline_accuracy"] == pytest.approx(0.775)
    assert m["accuracy"] == pytest.approx(m["majority_baseline_accuracy"])
    assert m["accuracy_minus_baseline"] == pytest.approx(0.0)
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0 and math.isnan(m["precision"])
    assert m["auc"] == pytest.approx(0.5)  # constant score: every pair is a tie
    # majority class positive: the baseline is the prevalence
    m = evaluation_metrics.compute_metrics(1 - y, np.full(1000, 0.9), threshold=0.5, n_boot=0)
    assert m["majority_baseline_accuracy"] == pytest.approx(0.775) == m["accuracy"]


def test_wilson_interval_known_value():
    # Wilson 95% interval for 8/10 (a textbook value: 0.490 to 0.943)
    low, high = evaluation_metrics._wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert evaluation_metrics._wilson(0, 20)[0] == 0.0 and evaluation_metrics._wilson(20, 20)[1] == 1.0


def test_probabilities_outside_unit_interval_rejected():
    with pytest.raises(ValueError):
        evaluation_metrics.compute_metrics([0, 1], [0.2, 1.3], 0.5)
    with pytest.raises(ValueError):
        evaluation_metrics.compute_metrics([0, 2], [0.2, 0.3], 0.5)
    with pytest.raises(ValueError):
        evaluation_metrics.compute_metrics([0, 1, 1], [0.2, 0.3], 0.5)


# --- bootstrap AUC --------------------------------------------------------------------------------------
def test_resampled_auc_fast_path_equals_sklearn():
    y, p = binormal(300, seed=2)
    p = np.round(p, 2)  # plenty of ties, across classes too
    idx = np.random.default_rng(0).integers(0, 300, size=(20, 300))
    fast = evaluation_metrics._resampled_aucs(y, p, idx)
    slow = [roc_auc_score(y[i], p[i]) for i in idx]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    # a resample with one class has no AUC
    neg = np.flatnonzero(y == 0)
    assert np.isnan(evaluation_metrics._resampled_aucs(y, p, neg[None, :10]))[0]


def test_ci_contains_true_auc_and_narrows_with_n():
    d = 1.0
    low_small, high_small = evaluation_metrics.bootstrap_auc_ci(*binormal(500, d, seed=3))
    low_big, high_big = evaluation_metrics.bootstrap_auc_ci(*binormal(5000, d, seed=3))
    assert low_small < true_auc(d) < high_small
    assert low_big < true_auc(d) < high_big
    assert high_big - low_big < 0.5 * (high_small - low_small)  # width ~ 1/sqrt(n): 10x cases, ~0.32x
    # reproducible by seed
    assert evaluation_metrics.bootstrap_auc_ci(*binormal(500, d, seed=3), seed=7) == evaluation_metrics.bootstrap_auc_ci(
        *binormal(500, d, seed=3), seed=7)


def test_ci_coverage_is_near_nominal():
    """1000 simulated test sets of 200 cases (drawn in one call): the 95% interval covers the true AUC in
    92.5-96.5% of them. The binomial s.d. of the rate at 1000 sets is 0.007: on these sets the 95% interval
    covers 0.947, while a 90% one (alpha=0.1, the kind of slip this guards) covers 0.908 and fails. ~3-5 s."""
    d, reps, cases = 1.0, 1000, 200
    rng = np.random.default_rng(100)
    y = (rng.random((reps, cases)) < 0.225).astype(int)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=(reps, cases)) + d * y)))
    cis = np.array([evaluation_metrics.bootstrap_auc_ci(y[r], p[r], n=200, seed=r) for r in range(reps)])
    coverage = np.mean((cis[:, 0] <= true_auc(d)) & (true_auc(d) <= cis[:, 1]))
    assert 0.925 <= coverage <= 0.965, coverage


def test_bootstrap_speed_1000_resamples_of_5000_cases():
    y, p = binormal(5000, seed=4)
    evaluation_metrics.bootstrap_auc_ci(y, p, n=50)  # warm-up (first-touch allocations)
    # CPU time of this process, not wall time: on a loaded CI box the wall clock also counts the time other
    # processes held the cores (measured here: 1.07 s wall for 0.21 s of CPU at load 14 on 2 cores).
    t0 = time.process_time()
    evaluation_metrics.bootstrap_auc_ci(y, p, n=1000)
    assert time.process_time() - t0 < 1.0


def test_one_class_resamples_are_skipped():
    y = np.array([0] * 30 + [1])  # most resamples miss the only positive
    p = np.linspace(0, 1, 31)
    low, high = evaluation_metrics.bootstrap_auc_ci(y, p, n=300)
    assert low == high == 1.0  # every resample that has a positive ranks it on top


# --- thresholds -----------------------------------------------------------------------------------------
def test_youden_on_constructed_case():
    # separable: any threshold in (0.3, 0.6] gives J = 1; the highest candidate is the lowest positive
    assert evaluation_metrics.choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]) == 0.6
    # worked by hand: J = 5/6 - 1/5 = 0.633 at 0.5; next best J = 1 - 2/5 = 0.6 at 0.4
    neg = [0.1, 0.2, 0.3, 0.45, 0.7]
    pos = [0.4, 0.5, 0.55, 0.6, 0.8, 0.9]
    assert evaluation_metrics.choose_threshold([0] * 5 + [1] * 6, neg + pos) == 0.5


def test_youden_matches_brute_force():
    y, p = binormal(400, seed=5)
    t = evaluation_metrics.choose_threshold(y, p)

    def youden(th):
        pred = p >= th
        return pred[y == 1].mean() - pred[y == 0].mean()

    assert youden(t) == pytest.approx(max(youden(th) for th in np.unique(p)))


def test_target_sensitivity_reached_on_validation():
    y, p = binormal(2000, seed=6)
    t = evaluation_metrics.choose_threshold(y, p, target_sensitivity=0.9)
    sens = (p[y == 1] >= t).mean()
    assert sens >= 0.9
    higher = p[p > t].min()  # the next candidate up must miss the target: t is the highest that meets it
    assert (p[y == 1] >= higher).mean() < 0.9
    assert evaluation_metrics.choose_threshold(y, p, target_sensitivity=1.0) == p[y == 1].min()


def test_threshold_degenerate_and_bad_input():
    assert evaluation_metrics.choose_threshold([0, 0, 0], [0.1, 0.7, 0.9]) == 0.5
    assert evaluation_metrics.choose_threshold([1, 1], [0.1, 0.9], target_sensitivity=0.8) == 0.5
    assert evaluation_metrics.choose_threshold([], []) == 0.5
    with pytest.raises(ValueError):
        evaluation_metrics.choose_threshold([0, 1], [0.2, 0.8], target_sensitivity=1.5)
    # a ranking that is no better than chance anywhere: "predict nobody", still a finite float
    t = evaluation_metrics.choose_threshold([1, 0], [0.2, 0.8])
    assert math.isfinite(t) and t > 0.8


# --- subgroups ------------------------------------------------------------------------------------------
def test_subgroup_rows_and_counts_add_up():
    y, p = binormal(1000, seed=7)
    rng = np.random.default_rng(7)
    view = rng.choice(["AP", "PA", ""], size=1000).tolist()
    view[0] = None  # missing tag is the same as an empty one
    ages = rng.integers(-1, 95, size=1000)
    groups = {"view_position": view, "sex": rng.choice(["M", "F"], size=1000),
              "age_band": [evaluation_metrics.age_band(a) for a in ages]}
    rows = evaluation_metrics.subgroup_metrics(y, p, 0.5, groups, n_boot=50)
    for name in groups:
        mine = [r for r in rows if r["group"] == name]
        assert sum(r["n"] for r in mine) == 1000
        assert sum(r["positives"] for r in mine) == int(y.sum())
    assert [r["value"] for r in rows if r["group"] == "view_position"] == ["", "AP", "PA"]
    assert {r["value"] for r in rows if r["group"] == "age_band"} <= set(evaluation_metrics.AGE_BANDS)
    # an AP row is exactly compute_metrics on the AP cases
    ap = next(r for r in rows if r["value"] == "AP")
    mask = np.array([v == "AP" for v in view])
    ref = evaluation_metrics.compute_metrics(y[mask], p[mask], 0.5, n_boot=50)
    for key in ("n", "positives", "auc", "auc_ci_low", "sensitivity", "specificity", "accuracy",
                "majority_baseline_accuracy"):
        assert ap[key] == ref[key]


def test_subgroup_min_count_and_bad_length():
    y, p = binormal(100, seed=8)
    groups = {"sex": ["M"] * 97 + ["F"] * 3}
    rows = evaluation_metrics.subgroup_metrics(y, p, 0.5, groups, n_boot=20, min_count=10)
    small = next(r for r in rows if r["value"] == "F")
    assert small["n"] == 3 and math.isnan(small["accuracy"]) and math.isnan(small["auc"])
    assert not math.isnan(next(r for r in rows if r["value"] == "M")["accuracy"])
    with pytest.raises(ValueError):
        evaluation_metrics.subgroup_metrics(y, p, 0.5, {"sex": ["M"] * 99})


@pytest.mark.parametrize(("age", "band"), [(-1, "unknown"), (0, "0-17"), (17, "0-17"), (18, "18-39"),
                                           (39, "18-39"), (40, "40-59"), (59, "40-59"), (60, "60+"),
                                           (92, "60+"), (148, "unknown"), (None, "unknown"),
                                           (float("nan"), "unknown"), (np.int64(45), "40-59")])
def test_age_band(age, band):
    assert evaluation_metrics.age_band(age) == band


# --- paired comparison ----------------------------------------------------------------------------------
def test_paired_identical_predictors():
    y, p = binormal(1000, seed=9)
    r = evaluation_metrics.paired_auc_difference(y, p, p, n=500)
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["p_value"] == pytest.approx(1.0)
    d = evaluation_metrics.delong_test(y, p, p)
    assert (d["diff"], d["z"], d["p"], d["ci_low"], d["ci_high"]) == (0.0, 0.0, 1.0, 0.0, 0.0)


def test_paired_clearly_better_and_delong_agrees():
    rng = np.random.default_rng(10)
    n = 2000
    y = (rng.random(n) < 0.3).astype(int)
    latent = rng.normal(size=n) + 1.5 * y
    good = latent + 0.3 * rng.normal(size=n)
    worse = latent + 1.5 * rng.normal(size=n)  # same cases, noisier: lower AUC, correlated with `good`
    r = evaluation_metrics.paired_auc_difference(y, good, worse, n=2000)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, good))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, worse))
    assert r["ci_low"] > 0 and r["p_value"] < 0.01
    d = evaluation_metrics.delong_test(y, good, worse)
    diff, z, p_delong = d["diff"], d["z"], d["p"]
    assert diff == pytest.approx(r["diff"], abs=1e-12)
    assert p_delong < 0.01 and z > 0 and d["ci_low"] > 0
    assert d["se"] == pytest.approx(r["se"], rel=0.15)  # DeLong's SE vs the bootstrap's spread
    # reversed order flips the sign only
    d2 = evaluation_metrics.delong_test(y, worse, good)
    assert d2["diff"] == pytest.approx(-diff) and d2["z"] == pytest.approx(-z) and d2["p"] == pytest.approx(p_delong)


def test_delong_matches_bootstrap_when_no_real_difference():
    rng = np.random.default_rng(11)
    n = 1500
    y = (rng.random(n) < 0.4).astype(int)
    latent = rng.normal(size=n) + y
    a, b = latent + rng.normal(size=n), latent + rng.normal(size=n)  # same quality, different noise
    d = evaluation_metrics.delong_test(y, a, b)
    r = evaluation_metrics.paired_auc_difference(y, a, b, n=2000)
    assert d["se"] == pytest.approx(r["se"], rel=0.15)
    assert r["ci_low"] < 0 < r["ci_high"] or r["p_value"] > 0.01


# --- one class, JSON, table -----------------------------------------------------------------------------
def test_one_class_gives_nan_and_json_null(tmp_path):
    y, p = np.zeros(50, dtype=int), np.linspace(0.01, 0.99, 50)
    m = evaluation_metrics.compute_metrics(y, p, 0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["auc_ci_low"]) and math.isnan(m["auc_pr"])
    assert math.isnan(m["sensitivity"]) and m["specificity"] == pytest.approx(25 / 50)
    assert m["majority_baseline_accuracy"] == 1.0
    assert all(math.isnan(v) for v in evaluation_metrics.bootstrap_auc_ci(y, p))
    assert math.isnan(evaluation_metrics.paired_auc_difference(y, p, p)["diff"])
    assert all(math.isnan(v) for v in evaluation_metrics.delong_test(y, p, p).values())
    rows = evaluation_metrics.subgroup_metrics(y, p, 0.5, {"view_position": ["AP"] * 50})
    path = tmp_path / "out" / "metrics.json"
    evaluation_metrics.write_json(path, {"test": m, "subgroups": rows, "arr": np.array([1.5, np.nan]), "i": np.int64(3)})
    text = path.read_text()
    assert "NaN" not in text and "null" in text
    data = json.loads(text)
    assert data["test"]["auc"] is None and data["arr"] == [1.5, None] and data["i"] == 3
    assert data["subgroups"][0]["auc"] is None
    assert [f.name for f in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind
    assert "n/a" in evaluation_metrics.format_table(m, rows)


def test_empty_split_does_not_crash():
    m = evaluation_metrics.compute_metrics([], [], 0.5)
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["majority_baseline_accuracy"])


def test_format_table_shows_auc_and_baseline():
    y, p = binormal(1000, seed=12)
    m = evaluation_metrics.compute_metrics(y, p, 0.5, n_boot=100)
    rows = evaluation_metrics.subgroup_metrics(y, p, 0.5, {"view_position": ["AP", "PA"] * 500}, n_boot=50)
    text = evaluation_metrics.format_table(m, rows)
    assert "AUC" in text and "Majority baseline" in text
    assert f"{m['majority_baseline_accuracy']:.3f}" in text and f"{m['auc']:.3f}" in text
    assert "AP" in text and "PA" in text and "AUC-PR" in text and "Brier" in text
    assert "Subgroups" not in evaluation_metrics.format_table(m)


# --- plots ----------------------------------------------------------------------------------------------
def test_plots_make_figures_and_png_files(tmp_path):
    from matplotlib.figure import Figure

    y, p = binormal(600, seed=13)
    one = np.zeros(20, dtype=int)
    figures = {
        "roc": plots.plot_roc(y, p, threshold=0.5),
        "pr": plots.plot_pr(y, p),
        "confusion": plots.plot_confusion(y, p, 0.5),
        "calibration": plots.plot_calibration(y, p),
        "history": plots.plot_history({"loss": [0.7, 0.6, 0.5], "val_loss": [0.7, 0.65, 0.6], "auc": [0.6, 0.7]}),
        "history_empty": plots.plot_history({}),
        "comparison": plots.plot_auc_comparison({
            "champion": {"auc": 0.80, "auc_ci_low": 0.77, "auc_ci_high": 0.83},
            "candidate": {"auc": 0.84, "auc_ci_low": 0.81, "auc_ci_high": 0.87},
            "broken": {"auc": math.nan}}),
        # one class only: a figure that says so, not an exception
        "roc_one": plots.plot_roc(one, np.linspace(0, 1, 20)),
        "pr_one": plots.plot_pr(one, np.linspace(0, 1, 20)),
        "cal_one": plots.plot_calibration(one, np.linspace(0, 1, 20)),
        "conf_one": plots.plot_confusion(one, np.linspace(0, 1, 20), 0.5),
    }
    _assert_figures_show_the_data(figures, y, p)
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        path = tmp_path / "plots" / f"{name}.png"
        size = tuple(round(v * 110) for v in fig.get_size_inches())  # save_figure's dpi
        plots.save_figure(fig, path)
        with Image.open(path) as png:  # a real PNG of the figure's size, with something drawn on it
            assert png.format == "PNG" and png.size == size, (name, png.size, size)
            pixels = np.asarray(png.convert("L"))
        assert pixels.std() > 5 and (pixels < 128).mean() > 0.005, name
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == sorted(f"{n}.png" for n in figures)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _assert_figures_show_the_data(figures, y, p):
    """Read each figure's artists back (before saving) and compare them with scikit-learn on the same data."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    ax = figures["roc"].axes[0]
    chance, curve, point = ax.get_lines()
    np.testing.assert_array_equal(chance.get_xydata(), [[0, 0], [1, 1]])
    fpr, tpr, _ = roc_curve(y, p)
    np.testing.assert_allclose(curve.get_xydata(), np.column_stack([fpr, tpr]))
    low, high = evaluation_metrics.bootstrap_auc_ci(y, p)
    assert curve.get_label() == f"AUC {roc_auc_score(y, p):.3f} [95% CI {low:.3f}-{high:.3f}]"
    pred = p >= 0.5
    np.testing.assert_allclose(point.get_xydata(), [[pred[y == 0].mean(), pred[y == 1].mean()]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.get_lines()]

    ax = figures["pr"].axes[0]
    step, prevalence = ax.get_lines()
    precision, recall, _ = precision_recall_curve(y, p)
    np.testing.assert_allclose(step.get_xydata(), np.column_stack([recall, precision]))
    assert step.get_drawstyle() == "steps-post" and f"{average_precision_score(y, p):.3f}" in step.get_label()
    np.testing.assert_allclose(prevalence.get_ydata(), [y.mean()] * 2)

    ax = figures["confusion"].axes[0]
    tn, fp, fn, tp = (int(((y == a) & (pred == b)).sum()) for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
    assert [t.split("\n")[:2] for t in _texts(ax)] == [["TN", str(tn)], ["FP", str(fp)], ["FN", str(fn)],
                                                       ["TP", str(tp)]]
    np.testing.assert_allclose(ax.images[0].get_array(), [[tn / (tn + fp), fp / (tn + fp)],
                                                          [fn / (fn + tp), tp / (fn + tp)]])

    ax, hist = figures["calibration"].axes[:2]
    observed, predicted = calibration_curve(y, p, n_bins=10)
    np.testing.assert_allclose(ax.get_lines()[1].get_xydata(), np.column_stack([predicted, observed]))
    np.testing.assert_array_equal([bar.get_height() for bar in hist.patches],
                                  np.histogram(p, bins=10, range=(0, 1))[0])

    loss, auc = figures["history"].axes[:2]
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in loss.get_lines()] == [
        ("loss", [1, 2, 3], [0.7, 0.6, 0.5]), ("val_loss", [1, 2, 3], [0.7, 0.65, 0.6])]
    assert [(line.get_label(), list(line.get_ydata())) for line in auc.get_lines()] == [("auc", [0.6, 0.7])]
    assert [_texts(a) for a in figures["history_empty"].axes[:2]] == [["no loss recorded"], ["no AUC recorded"]]

    ax = figures["comparison"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["champion", "candidate", "broken"]
    assert _texts(ax) == ["0.800", "0.840", "AUC n/a"]
    points = [line.get_xydata().tolist() for line in ax.get_lines() if line.get_marker() == "o"]
    assert points == [[[0.80, 0.0]], [[0.84, 1.0]]]
    for name in ("roc_one", "pr_one"):
        assert any("one class only" in t for t in _texts(figures[name].axes[0])), name


def test_import_is_cheap():
    """Importing the metrics must not pull in matplotlib, scikit-learn, TensorFlow or MLflow."""
    code = ("import sys, pipeline.evaluate.metrics; "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'tensorflow', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
