"""The study summary on the parent MLflow run: trials table, best trial, Optuna's matplotlib plots.

Every ranking here is by the study's own metric and direction (`tune.metric`, kept in the study's user attribute
`metric`), the same one the objective returned and the promotion ranks by.

Refreshed by whichever worker finishes a trial, so the parent run in the MLflow UI is always current.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def metric(study: optuna.Study) -> str:
    """The study's objective (`tune.metric`, stored by the launcher); val_auc for studies made before it."""
    return study.user_attrs.get("metric", "val_auc")


def ranked(study: optuna.Study) -> list:
    """Completed trials best first, in the study's own direction (val_loss: lowest first)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lowest_first = study.direction == optuna.study.StudyDirection.MINIMIZE
    return sorted(complete, key=lambda t: t.value, reverse=not lowest_first)


def best_line(study: optuna.Study) -> str:
    trials = ranked(study)
    if not trials:
        return "no completed trial yet"
    return f"best {metric(study)} {trials[0].value:.4f} (trial {trials[0].number})"


def summary_table(study: optuna.Study, top: int = 5) -> str:
    """The best completed trials by the study's metric, then the count of trials per state."""
    complete = ranked(study)[:top]
    name = metric(study)
    lines = [f"study {study.study_name} ({study.direction.name.lower()} {name}): "
             + ", ".join(f"{k} {v}" for k, v in counts(study).items() if v)]
    if complete:
        w = max(7, len(name))
        lines.append(f"{'trial':>5}  {name:>{w}}  {'seconds':>7}  params")
        for t in complete:
            secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else float("nan")
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
            lines.append(f"{t.number:>5}  {t.value:>{w}.4f}  {secs:>7.1f}  {params}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _figures(study: optuna.Study) -> dict:
    """Optuna's matplotlib plots; each is skipped when the study cannot support it yet (too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    makers = {
        "optimization_history.png": ovm.plot_optimization_history,
        "param_importances.png": ovm.plot_param_importances,
        "parallel_coordinate.png": ovm.plot_parallel_coordinate,
    }
    figs = {}
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n_complete < 2:
        makers.pop("param_importances.png")  # importances need at least two completed trials
    if n_complete < 1:
        return figs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is experimental in Optuna
        for name, make in makers.items():
            try:
                ax = make(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            figs[name] = ax.get_figure()
    return figs


def refresh(study: optuna.Study, parent_run_id: str, client: MlflowClient | None = None) -> None:
    import matplotlib.pyplot as plt

    client = client or MlflowClient()
    c = counts(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(path, index=False)
        client.log_artifact(parent_run_id, str(path), "study")
        (Path(tmp) / "summary.txt").write_text(summary_table(study, top=20) + "\n")
        client.log_artifact(parent_run_id, str(Path(tmp) / "summary.txt"), "study")
    for name, fig in _figures(study).items():
        client.log_figure(parent_run_id, fig, f"study/{name}")
        plt.close(fig)
    step = c["COMPLETE"] + c["PRUNED"]
    client.log_metric(parent_run_id, "trials_complete", c["COMPLETE"], step=step)
    client.log_metric(parent_run_id, "trials_pruned", c["PRUNED"], step=step)
    client.log_metric(parent_run_id, "trials_failed", c["FAIL"], step=step)
    if complete:
        best = ranked(study)[0]
        client.log_metric(parent_run_id, f"best_{metric(study)}", best.value, step=step)
        client.set_tag(parent_run_id, "best_trial", str(best.number))
        client.set_tag(parent_run_id, "mlflow.note.content",
                       f"Optuna study `{study.study_name}`: {best_line(study)}; "
                       f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed trials. "
                       "Trials are the nested runs; `study/` holds the table and plots.")
