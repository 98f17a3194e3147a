"""Does the stored threshold hold on a shift it was not fitted on? Leave one battery family out at a time.

The robust threshold (pipeline/evaluate/shift.py: robust_threshold) is fitted over the clean validation subset
and the battery's selection families, so its sensitivity and specificity under those families are in-sample.
The external failure this project answers is one side of the threshold (a new site's normal films scoring
higher: specificity), and the recipe's held-out families (jpeg, gamma, letterbox, zoom-out) do not push scores
that way (README, "Which way a shift moves the decision"). So each family is held out in turn: the threshold is
fitted without it, by the same policy, on the fitting half of the battery's images, and its sensitivity and
specificity are read under that family on the other half (the images the fit never saw), averaged over the
family's severities and over several random halves. The recipe's own held-out families are never in the fit,
so their rows are the stored policy as it is. This is cross-validation over perturbation families (the
leave-one-group-out design of Gulrajani & Lopez-Paz, ICLR 2021, for model selection under domain shift), applied
to the operating threshold; like the rest of the proxy, a simulation of other sites, not one.

`compare_policies` runs it for several settings of the policy (`robust_tail`, `robust_min_sensitivity`) on the
same predictions, so the setting whose threshold holds best where it was not fitted can be chosen, with the
clean operating point it costs beside it. Read by `benchmarks/generalization.py --candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.shift import ShiftError, ShiftResult, family, fitting_half, j_table, operating_point


@dataclass(frozen=True)
class Policy:
    """The robust policy's settings that `compare_policies` varies (`train.robust_tail`, `robust_min_sensitivity`)."""

    tail: float
    min_sensitivity: float

    def describe(self) -> str:
        return f"tail {self.tail:g}, min sens {self.min_sensitivity:g}"


@dataclass(frozen=True)
class FamilyHeldOut:
    """One battery family under a threshold fitted without it (report halves, means over severities and splits)."""

    family: str
    recipe_held_out: bool  # a `train.shift_held_out` family: never in the fit, even of the stored threshold
    sensitivity: float
    specificity: float
    in_fit: tuple[float, float]  # (sensitivity, specificity) at the threshold fitted with every selection family

    @property
    def j(self) -> float:
        return self.sensitivity + self.specificity - 1.0


@dataclass(frozen=True)
class PolicyCheck:
    policy: Policy
    clean: tuple[float, float]  # (sensitivity, specificity) on clean report halves, all selection families fitted
    families: list[FamilyHeldOut]  # the family that keeps least specificity first

    @property
    def mean_j(self) -> float:
        return float(np.mean([f.j for f in self.families]))

    @property
    def mean_specificity(self) -> float:
        return float(np.mean([f.specificity for f in self.families]))

    @property
    def mean_sensitivity(self) -> float:
        return float(np.mean([f.sensitivity for f in self.families]))


def compare_policies(result: ShiftResult, policies: list[Policy], *, auc_floor: float = 0.6, splits: int = 5,
                     candidates: int = 1024) -> list[PolicyCheck]:
    """Each battery family at the threshold each policy fits without it (module docstring), best mean J over the
    families first (ties keep the order given, so the stored policy, listed first, wins a tie). The thresholds
    are on the scale of `result`'s probabilities (the network's own, before any temperature). Per split, one
    `JTable` per left-out family serves every policy: a fit is `robust_threshold`'s, on the same fitting half,
    with the same AUC floor (tested against it)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(result.labels).astype(bool)
    clean = np.asarray(result.clean, dtype=np.float64)
    by_family = result.by_family()
    selection = result.selection_probabilities()
    clean_rates = {p: [] for p in policies}
    rates = {(p, fam): [] for p in policies for fam in by_family}
    in_fit = {(p, fam): [] for p in policies for fam in by_family}
    for seed in range(splits):
        fit = fitting_half(y, seed)
        report = ~fit
        if not (0 < y[fit].sum() < fit.sum() and 0 < y[report].sum() < report.sum()):
            raise ShiftError(f"the threshold check needs both classes in both halves of the battery's "
                             f"{len(y)} images ({int(y.sum())} positive)")
        kept = [k for k, p in selection.items() if roc_auc_score(y[fit], p[fit]) >= auc_floor]
        for left_out in [None, *(f for f in by_family if f not in result.held_out)]:
            conditions = [clean] + [np.asarray(result.probabilities[k], dtype=np.float64) for k in kept
                                    if family(k) != left_out]
            table = j_table(y[fit], [c[fit] for c in conditions], candidates)
            for policy in policies:
                t, _ = table.choose(policy.tail, policy.min_sensitivity)
                if left_out is not None:
                    rates[policy, left_out] += [operating_point(y[report], result.probabilities[n][report], t)
                                                for n in by_family[left_out]]
                    continue
                # Nothing left out: the stored threshold, on clean and every family (in the fit or not); it is
                # the left-out threshold of the recipe's held-out families, which no fit sees.
                clean_rates[policy].append(operating_point(y[report], clean[report], t))
                for fam, names in by_family.items():
                    got = [operating_point(y[report], result.probabilities[n][report], t) for n in names]
                    in_fit[policy, fam] += got
                    if fam in result.held_out:
                        rates[policy, fam] += got
    checks = []
    for policy in policies:
        rows = [FamilyHeldOut(fam, fam in result.held_out, *(float(v) for v in np.mean(rates[policy, fam], axis=0)),
                              tuple(float(v) for v in np.mean(in_fit[policy, fam], axis=0))) for fam in by_family]
        checks.append(PolicyCheck(policy, tuple(float(v) for v in np.mean(clean_rates[policy], axis=0)),
                                  sorted(rows, key=lambda f: (f.specificity, f.family))))
    order = sorted(range(len(checks)), key=lambda i: (-round(checks[i].mean_j, 6), i))
    return [checks[i] for i in order]


def grid(stored: Policy, tails=(0.1, 0.25, 0.5, 1.0), floors=(0.0, 0.85, 0.9, 0.95)) -> list[Policy]:
    """The stored policy first, then the other settings of tail and clean-sensitivity floor."""
    others = [Policy(t, f) for t in tails for f in floors]
    return [stored] + [p for p in others if p != stored]


def format_families(check: PolicyCheck, title: str) -> str:
    lines = [f"does {title}'s threshold ({check.policy.describe()}) hold on each battery family, fitted without "
             f"it? (report halves; clean: sensitivity {check.clean[0]:.3f}, specificity {check.clean[1]:.3f})",
             f"{'':<12}{'fitted without it':>24}{'stored threshold':>20}",
             f"{'family':<12}{'sens':>8}{'spec':>8}{'J':>8}{'sens':>10}{'spec':>10}"]
    for f in check.families:
        stored = ("  (held out of every fit)" if f.recipe_held_out
                  else f"{f.in_fit[0]:>10.3f}{f.in_fit[1]:>10.3f}")
        lines.append(f"{f.family:<12}{f.sensitivity:>8.3f}{f.specificity:>8.3f}{f.j:>8.3f}{stored}")
    return "\n".join(lines)


def format_policies(checks: list[PolicyCheck], stored: Policy) -> str:
    lines = ["threshold policies, each family held out of the fit in turn (means over families; best first)",
             f"{'policy':<34}{'clean sens':>11}{'clean spec':>11}{'ho sens':>9}{'ho spec':>9}{'ho J':>8}"
             f"  worst spec (family)"]
    for c in checks:
        w = c.families[0]  # the family that keeps least specificity
        mark = " (stored)" if c.policy == stored else ""
        lines.append(f"{c.policy.describe() + mark:<34}{c.clean[0]:>11.3f}{c.clean[1]:>11.3f}{c.mean_sensitivity:>9.3f}"
                     f"{c.mean_specificity:>9.3f}{c.mean_j:>8.3f}  {w.specificity:.3f} ({w.family})")
    best = checks[0]
    lines.append(f"threshold_policy_choice=tail:{best.policy.tail:g},min_sensitivity:{best.policy.min_sensitivity:g} "
                 f"heldout_j={best.mean_j:.4f} stored_j={next(c for c in checks if c.policy == stored).mean_j:.4f}")
    return "\n".join(lines)
