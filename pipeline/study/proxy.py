"""Which selection metric predicts "travels"? Rank correlations over a study's finished trials.

The proxy for a site nobody tuned on: battery families held out of selection (`train.shift_held_out`;
pipeline/evaluate/shift.py), scored on the same validation subset, logged as `val_auc_heldout_mean`. For each
candidate selection metric (validation AUC, the battery's mean, worst and tail over the selection families,
validation loss), Spearman's rank correlation with the held-out AUC over the study's trials says how well
selecting on it would have picked the trials that hold up there. A simulation of other sites, not one: the
held-out families are transformations of this hospital's images, on its validation patients.

`directions` answers the question the AUC cannot: at the stored threshold, does a family of perturbations cost
sensitivity (scores pushed down) or specificity (scores pushed up)? A new site can keep the ranking and still move
every score one way, and only one of the two sides fails then.

Read by `benchmarks/generalization.py --study NAME` (and `--candidates`, for `directions`). Spearman's rho and
its p-value from scipy.stats.spearmanr; a 95% interval from the Fisher z transform with the Bonett & Wright (Psychometrika 2000) variance
(1 + rho^2 / 2) / (n - 3), the usual one for Spearman's coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from pipeline.artifact import tag_keys
from pipeline.evaluate.shift import ShiftResult

TARGET = "val_auc_heldout_mean"
# candidate selection metric -> the run metric it is logged as (val_loss: lower is better, so its sign flips)
CANDIDATES = {"val_auc": "final_val_auc", "val_auc_shift_mean": "val_auc_shift_mean",
              "val_auc_shift_min": "val_auc_shift_min", "val_auc_shift_tail": "val_auc_shift_tail",
              "val_loss": "final_val_loss"}


@dataclass(frozen=True)
class Correlation:
    metric: str
    rho: float  # Spearman, signed so that higher means "selecting on it picks trials that travel"
    low: float
    high: float
    p: float
    n: int


def fisher_z(rho: float, n: int) -> tuple[float, float]:
    """(z, its variance) of a Spearman rho over n pairs: Fisher's z with the Bonett-Wright variance."""
    return math.atanh(max(min(rho, 0.999999), -0.999999)), (1 + rho**2 / 2) / (n - 3)


def spearman(xs: list[float], ys: list[float], alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(rho, CI low, CI high, p) of Spearman's rank correlation (module docstring for the interval)."""
    from scipy.stats import spearmanr

    n = len(xs)
    if n < 4:
        return (math.nan,) * 4
    rho, p = spearmanr(xs, ys)
    rho = float(rho)
    if not math.isfinite(rho):
        return (math.nan,) * 4
    z, variance = fisher_z(rho, n)
    half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(variance)
    return rho, math.tanh(z - half), math.tanh(z + half), float(p)


def trial_metrics(client, study: str, needs: str = TARGET) -> list[dict]:
    """The run metrics of every COMPLETE trial of `study` that logged `needs` (the held-out target; `retarget`'s
    callers ask for a battery metric instead, so a study run without held-out families can be re-targeted)."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.state = 'COMPLETE'", max_results=10000)
    return [dict(r.data.metrics) for r in runs
            if tag_keys.TRIAL_NUMBER in r.data.tags and needs in r.data.metrics]


def retarget(trials: list[dict], held_out: tuple[str, ...]) -> list[dict]:
    """The trials' metrics as if `held_out` had been the held-out families: from each trial's logged AUC under
    every perturbation (`val_auc_shift/<name>`), the target (their mean over `held_out`) and the battery's
    selection mean, worst and tail over the others. An analysis after the fact: training and the robust threshold
    used the families the study was run with, so it speaks for selection metrics outside the battery (val_loss,
    val_auc) and for the battery metrics as recomputed here, not for the threshold. A trial without every
    perturbation's AUC is left out. The recomputation is ShiftResult's own (mean, worst, tail, held-out mean)."""
    import numpy as np

    from pipeline.config import ConfigError
    from pipeline.evaluate.shift import battery, check_held_out

    if not held_out:
        raise ConfigError("no held-out family named: give one or more battery families")
    check_held_out(held_out)
    every = {p.name for p in battery(128)}  # the names do not depend on the image size
    out = []
    for t in trials:
        aucs = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("val_auc_shift/")}
        if set(aucs) != every:
            continue
        m = ShiftResult(labels=np.empty(0), clean=np.empty(0), probabilities={}, auc=aucs,
                        held_out=tuple(held_out)).metrics()
        out.append({**t, TARGET: m["val_auc_heldout_mean"],
                    **{k: m[k] for k in ("val_auc_shift_mean", "val_auc_shift_min", "val_auc_shift_tail")}})
    return out


def correlations(trials: list[dict]) -> list[Correlation]:
    """Each candidate metric against the held-out AUC, best predictor first."""
    out = []
    for name, key in CANDIDATES.items():
        pairs = [(t[key], t[TARGET]) for t in trials if key in t and math.isfinite(t[key])]
        sign = -1.0 if name == "val_loss" else 1.0
        rho, low, high, p = spearman([sign * x for x, _ in pairs], [y for _, y in pairs])
        out.append(Correlation(name, rho, low, high, p, len(pairs)))
    return sorted(out, key=lambda c: -c.rho if math.isfinite(c.rho) else math.inf)


def pooled(per_study: list[list[Correlation]]) -> list[Correlation]:
    """Each metric's correlation pooled over independent studies, best predictor first: the fixed-effect
    (inverse-variance) mean of the studies' Fisher z, each with the Bonett-Wright variance (Hedges & Olkin 1985,
    ch. 11), and its 95% interval and two-sided p; `n` is the trials summed. A study without a finite rho for
    the metric does not enter."""
    normal = NormalDist()
    out = []
    for name in CANDIDATES:
        weights, zs, n = [], [], 0
        for rows in per_study:
            c = next((r for r in rows if r.metric == name), None)
            if c is None or not math.isfinite(c.rho) or c.n < 4:
                continue
            z, variance = fisher_z(c.rho, c.n)
            weights.append(1 / variance)
            zs.append(z)
            n += c.n
        if not weights:
            out.append(Correlation(name, math.nan, math.nan, math.nan, math.nan, 0))
            continue
        z = sum(w * x for w, x in zip(weights, zs, strict=True)) / sum(weights)
        se = 1 / math.sqrt(sum(weights))
        half = normal.inv_cdf(0.975) * se
        p = 2 * (1 - normal.cdf(abs(z) / se))
        out.append(Correlation(name, math.tanh(z), math.tanh(z - half), math.tanh(z + half), p, n))
    return sorted(out, key=lambda c: -c.rho if math.isfinite(c.rho) else math.inf)


def format_table(rows: list[Correlation], study: str, pooled_over: int = 0) -> str:
    """The table `benchmarks/generalization.py --study` prints; `pooled_over` > 1: rows pooled over that many
    studies (`study` then names them)."""
    over = (f"Fisher z pooled over {pooled_over} studies ({study}; fixed effect)" if pooled_over > 1
            else f"over study {study}'s completed trials")
    lines = [f"Spearman rank correlation of each selection metric with {TARGET} (battery families held out of "
             f"selection), {over}",
             f"{'selection metric':<22}{'rho [95% CI]':<26}{'p':>8}{'trials':>8}"]
    for c in rows:
        lines.append(f"{c.metric:<22}{f'{c.rho:+.3f} [{c.low:+.3f}, {c.high:+.3f}]':<26}{c.p:>8.3f}{c.n:>8}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Direction:
    """One battery family at the stored threshold, beside the clean subset (means over its severities)."""

    family: str
    held_out: bool
    auc: float
    d_sensitivity: float  # change from the clean subset's sensitivity at the same threshold
    d_specificity: float


def directions(result: ShiftResult, at: dict[str, tuple[float, float]]) -> list[Direction]:
    """Each family's mean AUC and its mean change of sensitivity and specificity against clean, from `at`
    (`result.operating` at the stored threshold), the family that costs most specificity first."""
    clean_sens, clean_spec = at["clean"]
    rows = [Direction(fam, fam in result.held_out, float(sum(result.auc[n] for n in names) / len(names)),
                      sum(at[n][0] for n in names) / len(names) - clean_sens,
                      sum(at[n][1] for n in names) / len(names) - clean_spec)
            for fam, names in result.by_family().items()]
    return sorted(rows, key=lambda d: (d.d_specificity, d.family))


def format_directions(rows: list[Direction], clean: tuple[float, float], title: str) -> str:
    """The table `benchmarks/generalization.py --candidates` prints for its last candidate, and a summary line:
    the families whose perturbation costs more specificity than sensitivity (scores pushed up)."""
    lines = [f"which way each battery family moves {title}'s stored decision (clean subset: sensitivity "
             f"{clean[0]:.3f}, specificity {clean[1]:.3f}; means over each family's severities)",
             f"{'family':<12}{'AUC':>8}{'d sens':>9}{'d spec':>9}  side lost"]
    for d in rows:
        side = ("specificity" if d.d_specificity < d.d_sensitivity else "sensitivity") if min(
            d.d_specificity, d.d_sensitivity) < 0 else "neither"
        lines.append(f"{d.family:<12}{d.auc:>8.4f}{d.d_sensitivity:>+9.3f}{d.d_specificity:>+9.3f}  {side}"
                     + ("  (held out)" if d.held_out else ""))
    up = [d.family for d in rows if d.d_specificity < min(d.d_sensitivity, 0.0)]
    lines.append(f"specificity_side={','.join(up) or 'none'}")
    return "\n".join(lines)
