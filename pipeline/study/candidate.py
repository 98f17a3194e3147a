"""A fitted network -> a registered candidate: the one path a training run and an ensemble both take.

`make_candidate` runs these steps, on the validation split only (the test split belongs to the gate):
1. `validate`: predictions with patient ids and subgroup fields, the shift battery (when asked), the operating
   threshold (`decide_threshold`, the experiment's policy), the temperature (`fit_calibration`), then metrics
   and subgroups on the calibrated scale with intervals clustered by patient;
2. `log_model`: the serving pyfunc with the network inside, registered under a model name when given;
3. `log_validation`: metrics (linked to the logged model and the validation split), tags, tables and figures
   to the active MLflow run.
Training (`pipeline.study.train`) calls it after `fit`; `pneumo promote --ensemble` (`pipeline.promote.ensemble`)
after averaging its members, so both decide the threshold and the calibration the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from pipeline.artifact import tag_keys, tracking
from pipeline.config import Config
from pipeline.errors import PneumoError
from pipeline.evaluate import metrics, plots, shift
from pipeline.evaluate.scoring import predict_split
from pipeline.net.calibration import apply_temperature, expected_calibration_error, fit_temperature, nll


class DivergedError(PneumoError):
    """The network's validation outputs are not finite: training diverged (its loss went to nan or inf)."""


@dataclass
class Validation:
    """Everything decided and measured on validation for one network."""

    labels: np.ndarray
    raw: np.ndarray  # the network's probabilities
    calibrated: np.ndarray  # after the temperature: the scale every stored number is on
    info: dict  # per record: patient_id, view_position, sex, age, boxes
    threshold: float  # on the calibrated scale (the `threshold` tag)
    threshold_raw: float
    threshold_policy: str  # how it was decided, in words (the `threshold_policy` tag)
    temperature: float  # 1.0 when validation has one class (no finite optimum)
    ece: tuple[float, float]  # before, after calibration (in-sample: fitted on this split)
    ece_heldout: float  # after calibration, on validation patients the temperature was not fitted on
    metrics: dict
    subgroups: dict
    shifted: shift.ShiftResult | None = None
    battery_s: float = 0.0  # the shift battery's cost, paid once per candidate
    robust: dict | None = None  # the robust threshold's evidence (kept / left-out conditions, held-out half)

    def shift_metrics(self) -> dict:
        """The battery's AUCs, and the stored threshold's operating point on the held-out families."""
        if self.shifted is None:
            return {}
        return {**self.shifted.metrics(), **self.shifted.held_out_operating(self.threshold_raw)}


@dataclass
class LoggedCandidate:
    validation: Validation
    model_uri: str | None = None
    version: str | None = None  # the registered version, when registered


def single_replica(model):
    """The network to score with. Under MirroredStrategy Keras 3.15's predict_on_batch runs the whole batch on
    every replica and concatenates the results (2 replicas: twice the predictions); the same layers as a model
    built outside the strategy predict each record once."""
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow backend only
    return tracking.inference_copy(model) if strategy and strategy.num_replicas_in_sync > 1 else model


def shift_battery(model, cfg: Config, data_dir: str | Path) -> shift.ShiftResult:
    """The model's AUC under the shift battery on validation's fixed subset (pipeline/evaluate/shift.py)."""
    sample = shift.load_sample(data_dir, "val", cfg.train.shift_max_images, cfg.train.shift_seed,
                               with_meta=cfg.model.metadata_inputs)
    return shift.score_battery(model, sample, seed=cfg.train.shift_seed, batch_size=cfg.data.batch_size,
                               held_out=tuple(cfg.train.shift_held_out))


def decide_threshold(cfg: Config, y, p, shifted: shift.ShiftResult | None) -> tuple[float, str, dict | None]:
    """THE place the stored operating threshold is decided, on validation only -> (threshold, how, the robust
    policy's evidence or None).

    The threshold is on the model's raw probability scale; a calibration step that rescales probabilities must
    move it with them (a monotone map keeps the same decisions)."""
    policy = cfg.train.threshold_policy
    if policy == "robust":
        if shifted is None:
            raise ValueError("train.threshold_policy = 'robust' needs the shift battery (train.shift_battery)")
        t = cfg.train
        chosen = shift.robust_threshold(shifted.labels, shifted.clean, shifted.selection_probabilities(),
                                        auc_floor=t.robust_auc_floor, tail=t.robust_tail,
                                        min_sensitivity=t.robust_min_sensitivity, seed=t.shift_seed)
        evidence = {"kept": chosen.kept, "left_out_below_auc_floor": chosen.dropped, "objective": chosen.objective,
                    "held_out_half": chosen.report, "auc_floor": t.robust_auc_floor, "tail": t.robust_tail,
                    "min_sensitivity": t.robust_min_sensitivity}
        return chosen.threshold, chosen.describe(), evidence
    if policy == "sensitivity":
        return (metrics.choose_threshold(y, p, cfg.train.target_sensitivity),
                f"sensitivity >= {cfg.train.target_sensitivity:g} on validation", None)
    return metrics.choose_threshold(y, p), "youden (max J on validation)", None


def fit_calibration(y, p_raw) -> float:
    """Temperature scaling on validation (pipeline.net.calibration); 1.0 when one class leaves no optimum."""
    try:
        return fit_temperature(y, p_raw)
    except ValueError:
        return 1.0


def heldout_ece(y, p_raw, patients, seed: int = 0) -> float:
    """ECE of temperature scaling on patients it was not fitted on: validation's patients in two random halves,
    a temperature fitted on each half and the ECE measured on the other, pooled (two-fold cross-fitting).
    The stored temperature is fitted on all of validation; this is the held-out evidence beside it, since the
    in-sample ECE after calibration flatters it (it is measured on the data the temperature was fitted on)."""
    y, p_raw, patients = np.asarray(y), np.asarray(p_raw, dtype=np.float64), np.asarray(patients)
    ids = np.unique(patients)
    if len(ids) < 4:
        return float("nan")
    half = np.isin(patients, np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    calibrated = np.empty_like(p_raw)
    for fit_on in (half, ~half):
        calibrated[~fit_on] = apply_temperature(p_raw[~fit_on], fit_calibration(y[fit_on], p_raw[fit_on]))
    return expected_calibration_error(y, calibrated)


def validate(model, cfg: Config, data_dir: str | Path, *, with_shift: bool) -> Validation:
    """Step 1: score validation, decide threshold and temperature, measure (module docstring)."""
    scorer = single_replica(model)
    y, p_raw, info = predict_split(scorer, data_dir, "val", cfg.data.batch_size, with_meta=cfg.model.metadata_inputs)
    bad = int((~np.isfinite(p_raw)).sum())
    if bad:  # nothing downstream (AUC, threshold, calibration) means anything; said here, not as sklearn's traceback
        raise DivergedError(f"training diverged: {bad} of {len(p_raw)} validation probabilities are not finite "
                            f"(train.learning_rate = {cfg.train.learning_rate:g}; a lower one may train)")
    t_shift = time.perf_counter()
    shifted = shift_battery(scorer, cfg, data_dir) if with_shift else None
    battery_s = time.perf_counter() - t_shift
    threshold_raw, policy, robust = decide_threshold(cfg, y, p_raw, shifted)
    temperature = fit_calibration(y, p_raw)
    # Everything below is on the calibrated scale, the one model_store.LoadedModel.probabilities reports.
    # Temperature scaling is monotone: the moved threshold makes exactly the raw threshold's decisions.
    p = apply_temperature(p_raw, temperature)
    threshold = float(apply_temperature(threshold_raw, temperature))
    clusters = info["patient_id"]
    measured = metrics.compute_metrics(y, p, threshold, n_boot=cfg.train.bootstrap, seed=cfg.train.seed,
                                       clusters=clusters)
    # Plain binary cross-entropy of the network on the whole val split (no label smoothing, no class weights,
    # before calibration: the temperature is fitted on this split, so its NLL would flatter it):
    # `tune.metric = "val_loss"` and the promotion rank by it (logged as final_val_loss).
    measured["loss"] = nll(y, p_raw)
    groups = {"view_position": info["view_position"], "sex": info["sex"],
              "age_band": [metrics.age_band(a) for a in info["age"]]}
    subgroups = metrics.subgroup_metrics(y, p, threshold, groups, n_boot=200, seed=cfg.train.seed, clusters=clusters)
    ece = (expected_calibration_error(y, p_raw), expected_calibration_error(y, p))
    return Validation(labels=y, raw=p_raw, calibrated=p, info=info, threshold=threshold,
                      threshold_raw=float(threshold_raw), threshold_policy=policy, temperature=temperature, ece=ece,
                      ece_heldout=heldout_ece(y, p_raw, clusters, cfg.train.seed),
                      metrics=measured, subgroups=subgroups, shifted=shifted, battery_s=battery_s if with_shift else 0.0,
                      robust=robust)


def _finite(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and np.isfinite(v)}


def log_validation(v: Validation, history: dict | None = None, title: str = "validation", *,
                   model_id: str | None = None, dataset=None) -> None:
    """Step 3: what `validate` decided and measured, to the active run; with `model_id` (and the validation
    split as `dataset`) the metrics are linked to the logged model too: MLflow 3's Models tab compares them."""
    tracking.log_metrics_racing({**{f"final_val_{k}": val for k, val in _finite(v.metrics).items()},
                                 "threshold": v.threshold, "threshold_uncalibrated": v.threshold_raw,
                                 "temperature": v.temperature, "val_ece": v.ece[0], "val_ece_calibrated": v.ece[1],
                                 **_finite({"val_ece_heldout": v.ece_heldout})}, model_id=model_id, dataset=dataset)
    mlflow.set_tags({tag_keys.THRESHOLD: repr(float(v.threshold)),  # full precision: a case at it must not flip
                     tag_keys.THRESHOLD_POLICY: v.threshold_policy,
                     tag_keys.TEMPERATURE: repr(float(v.temperature))})
    if v.shifted is not None:
        tracking.log_metrics_racing({**_finite(v.shift_metrics()), "shift_battery_s": v.battery_s},
                                    model_id=model_id, dataset=dataset)
        mlflow.log_text(shift.format_table(v.shifted, v.shifted.operating(v.threshold_raw)),
                        "evaluation/val_shift.txt")
    if v.robust is not None:
        mlflow.log_dict(v.robust, "evaluation/robust_threshold.json")
        mlflow.log_metrics({f"robust_heldout_{k}": val for k, val in _finite(v.robust["held_out_half"]).items()}
                           | {"robust_left_out": float(len(v.robust["left_out_below_auc_floor"]))})
    mlflow.log_dict({"metrics": v.metrics, "subgroups": v.subgroups}, "evaluation/val.json")
    mlflow.log_text(metrics.format_table(v.metrics, v.subgroups), "evaluation/val.txt")
    y, p = v.labels, v.calibrated
    figures = {
        "val_roc.png": plots.plot_roc(y, p, title=f"ROC ({title})", threshold=v.threshold,
                                      clusters=v.info["patient_id"]),
        "val_pr.png": plots.plot_pr(y, p, title=f"Precision-recall ({title})"),
        "val_confusion.png": plots.plot_confusion(y, p, v.threshold),
        "val_calibration.png": plots.plot_calibration(y, v.raw, y_prob_calibrated=p, temperature=v.temperature),
    }
    if history is not None:
        figures["history.png"] = plots.plot_history(history)
    if v.shifted is not None:
        figures["val_shift.png"] = shift.plot_shift(v.shifted)
    for name, fig in figures.items():  # object-API figures (pipeline.evaluate.plots): no pyplot, nothing to close
        mlflow.log_figure(fig, f"plots/{name}")


def log_model(model, image_size: int, cfg: Config, v: Validation,
              register_as: str | None) -> tuple[str, str]:
    """Step 2: the serving pyfunc -> (model URI, logged-model id). MLflow 3's model view: the model carries the
    run's configuration and what validation decided as its params. Registered later (`register`), with its
    tags, so no version ever exists without them."""
    params = {**cfg.flat(), "threshold": v.threshold, "temperature": v.temperature,
              "threshold_policy": v.threshold_policy[:250]}
    info = tracking.log_keras_model(model, image_size, cfg.model.metadata_inputs, registered_model_name=None,
                                    params=params, threshold=v.threshold, temperature=v.temperature)
    return info.model_uri, info.model_id


def register(uri: str, name: str, v: Validation, manifest: dict, extra: dict | None = None) -> str:
    """Step 4: the logged model as a new version of `name`, its tags given at creation: a process killed while
    logging leaves no version at all, never one without its study, trial, threshold or digest (a SIGKILLed
    trial once left an untagged version behind). -> the version."""
    run = mlflow.active_run()
    tags = {tag_keys.THRESHOLD: repr(float(v.threshold)), tag_keys.TEMPERATURE: repr(float(v.temperature)),
            tag_keys.THRESHOLD_POLICY: v.threshold_policy[:250], tag_keys.DATASET_DIGEST: manifest["digest"],
            **({tag_keys.RUN_ID: run.info.run_id} if run else {}), **(extra or {})}
    return str(mlflow.register_model(uri, name, tags={k: str(x) for k, x in tags.items()}).version)


def make_candidate(model, cfg: Config, data_dir: str | Path, manifest: dict, *, with_shift: bool,
                   history: dict | None = None, register_as: str | None = None, log_network: bool = True,
                   title: str = "validation", version_tags=None) -> LoggedCandidate:
    """Steps 1-4 in the active MLflow run; `log_network=False` (`train.log_model = false`) skips steps 2 and 4.
    `version_tags(validation) -> dict`: more tags the registered version is created with (a study's trial)."""
    validation = validate(model, cfg, data_dir, with_shift=with_shift)
    if not log_network:
        log_validation(validation, history, title)
        return LoggedCandidate(validation)
    uri, model_id = log_model(model, manifest["image_size"], cfg, validation, register_as)
    log_validation(validation, history, title, model_id=model_id,
                   dataset=tracking.dataset_entity(manifest, data_dir, "val"))
    version = None
    if register_as:
        version = register(uri, register_as, validation, manifest, version_tags(validation) if version_tags else None)
    return LoggedCandidate(validation, model_uri=uri, version=version)
