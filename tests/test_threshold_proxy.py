"""pipeline/study/threshold_proxy.py: each battery family scored at a threshold fitted without it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import shift
from pipeline.study import threshold_proxy as tp


def _battery(seed: int = 0, n: int = 120):
    """Scores of n images under clean and five perturbations of four families: exposure pushes the normal films
    up (the external failure's side), blur blurs the ranking a little, jpeg (held out) changes nothing."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 != 0).astype(int)  # 75% positive, like Kermany
    logit = rng.normal(0.0, 1.0, n) + 2.5 * (2 * y - 1)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    probs = {"exposure_0.6": sigmoid(logit + 2.5 * (y == 0) + rng.normal(0, 0.3, n)),
             "exposure_1.25": sigmoid(logit + 1.5 * (y == 0) + rng.normal(0, 0.3, n)),
             "blur_1": sigmoid(logit + rng.normal(0, 0.8, n)),
             "blur_2": sigmoid(logit + rng.normal(0, 1.2, n)),
             "jpeg_30": sigmoid(logit + rng.normal(0, 0.1, n))}
    return shift.ShiftResult(labels=y, clean=sigmoid(logit), probabilities=probs, held_out=("jpeg",))


def _rates(y, p, t):
    y = np.asarray(y).astype(bool)
    called = np.asarray(p) >= t
    return called[y].mean(), 1.0 - called[~y].mean()


def test_each_family_is_scored_at_robust_thresholds_fitted_without_it():
    """Recomputed through `shift.robust_threshold` itself: for a selection family, the threshold it fits over the
    other selection families, on each split's fitting half, read on the other half; for a held-out family and for
    clean, the stored threshold (all the selection families); means over splits and severities."""
    r = _battery()
    policies = [tp.Policy(0.25, 0.9), tp.Policy(1.0, 0.0)]
    checks = {c.policy: c for c in tp.compare_policies(r, policies, auc_floor=0.6, splits=3)}
    assert set(checks) == set(policies)
    y = r.labels.astype(bool)
    selection = {k: v for k, v in r.probabilities.items() if shift.family(k) != "jpeg"}
    for policy in policies:
        def fit(shifted, seed, policy=policy):
            return shift.robust_threshold(y, r.clean, shifted, auc_floor=0.6, tail=policy.tail,
                                          min_sensitivity=policy.min_sensitivity, seed=seed).threshold

        want = {fam: [] for fam in ("exposure", "blur", "jpeg")}
        want_in_fit = {fam: [] for fam in want}
        clean = []
        for seed in range(3):
            report = ~shift.fitting_half(y, seed)
            stored = fit(selection, seed)
            clean.append(_rates(y[report], r.clean[report], stored))
            for name, p in r.probabilities.items():
                fam = shift.family(name)
                t = stored if fam == "jpeg" else fit({k: v for k, v in selection.items()
                                                      if shift.family(k) != fam}, seed)
                want[fam].append(_rates(y[report], p[report], t))
                want_in_fit[fam].append(_rates(y[report], p[report], stored))
        got = {f.family: f for f in checks[policy].families}
        for fam, rates in want.items():
            assert (got[fam].sensitivity, got[fam].specificity) == pytest.approx(np.mean(rates, axis=0), abs=1e-12)
            assert got[fam].in_fit == pytest.approx(np.mean(want_in_fit[fam], axis=0), abs=1e-12)
        assert got["jpeg"].in_fit == (got["jpeg"].sensitivity, got["jpeg"].specificity)
        assert checks[policy].clean == pytest.approx(np.mean(clean, axis=0), abs=1e-12)
        assert got["jpeg"].recipe_held_out and not got["exposure"].recipe_held_out


def test_a_family_that_pushes_normal_films_up_keeps_less_specificity_once_it_leaves_the_fit():
    """The point of the check: in the fit, the robust threshold rises to keep exposure's normal films below it;
    fitted without exposure, it does not, and exposure's specificity is what a site nobody fitted on would get."""
    r = _battery()
    stored = tp.Policy(0.25, 0.9)
    check = tp.compare_policies(r, [stored], splits=5)[0]
    exposure = check.families[0]
    assert exposure.family == "exposure"  # the least specificity kept comes first
    assert exposure.specificity < exposure.in_fit[1] - 0.05 and exposure.sensitivity >= exposure.in_fit[0]
    assert check.mean_j == pytest.approx(np.mean([f.sensitivity + f.specificity - 1 for f in check.families]))


def test_policies_are_ranked_by_held_out_j_and_the_stored_one_wins_ties():
    r = _battery(seed=1)
    stored = tp.Policy(0.25, 0.9)
    policies = tp.grid(stored, tails=(0.25, 1.0), floors=(0.0, 0.9))
    assert policies[0] == stored and len(policies) == 4 and len(set(policies)) == 4
    checks = tp.compare_policies(r, policies, splits=2)
    js = [round(c.mean_j, 6) for c in checks]
    assert js == sorted(js, reverse=True)
    # Two floors that bind nothing fit the same thresholds: the order given decides.
    a, b = tp.Policy(0.25, 0.0), tp.Policy(0.25, -1.0)
    assert [c.policy for c in tp.compare_policies(r, [a, b], splits=2)] == [a, b]
    assert [c.policy for c in tp.compare_policies(r, [b, a], splits=2)] == [b, a]
    table = tp.format_policies(checks, stored).splitlines()
    assert any("(stored)" in line for line in table)
    best = checks[0].policy
    assert table[-1].startswith(f"threshold_policy_choice=tail:{best.tail:g},min_sensitivity:{best.min_sensitivity:g} ")
    assert table[-1].endswith(f"stored_j={next(c for c in checks if c.policy == stored).mean_j:.4f}")
    families = tp.format_families(checks[0], "mean of 3 + tta").splitlines()
    first = checks[0].families[0]
    assert families[3].split() == [first.family] + [f"{v:.3f}" for v in (first.sensitivity, first.specificity,
                                                                         first.j, *first.in_fit)]
    assert sum("(held out of every fit)" in line for line in families) == 1


def test_a_battery_too_small_to_halve_is_a_one_line_error():
    y = np.array([1, 1, 1, 0])  # one normal film: one half of it has none
    r = shift.ShiftResult(labels=y, clean=np.array([0.9, 0.8, 0.7, 0.1]), probabilities={"blur_1": np.ones(4) / 2})
    with pytest.raises(shift.ShiftError, match="both classes in both halves of the battery's 4 images"):
        tp.compare_policies(r, [tp.Policy(0.25, 0.9)])
