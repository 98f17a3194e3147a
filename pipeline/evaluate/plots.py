"""Figures for a binary classifier's predictions: ROC, precision-recall, confusion, calibration, training
history, AUC with confidence intervals per model or subgroup.

Built with matplotlib's object API (`matplotlib.figure.Figure`), never pyplot: no GUI backend is ever
selected and figures are not held in pyplot's global registry, so nothing leaks in long studies, and nothing
needs closing. The numbers come from `pipeline.evaluate.metrics`; this module only draws them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.evaluate.metrics import _both_classes, _check, bootstrap_auc_ci
from pipeline.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(*args, **kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(*args, layout="constrained", **kwargs)


def save_figure(fig: Figure, path) -> None:
    """Save a figure atomically (format from the suffix, PNG by default)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=110))


def _one_class_note(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} undefined:\none class only", ha="center", va="center",
            transform=ax.transAxes)


def plot_roc(y_true, y_prob, title: str = "ROC", threshold: float | None = None, clusters=None) -> Figure:
    """ROC curve with AUC and its bootstrap 95% CI in the legend, the chance diagonal, and optionally the
    operating point at `threshold`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = _check(y_true, y_prob)
    fig = _figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC 0.5)")
    if _both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        low, high = bootstrap_auc_ci(y, p, clusters=clusters)
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
    after, each labelled with its Brier score and ECE (pipeline.net.calibration)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from pipeline.net.calibration import expected_calibration_error

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
