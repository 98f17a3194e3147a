"""`pneumo promote --ensemble K`: one Keras model that averages the top K versions of a study, registered as a
new version and handed to the promotion gate like any candidate.

The ensemble is a plain Keras Functional model with the members' input signature (`image`, and `meta` when
the members take it) and one output, the mean of the members' probabilities. So predict, evaluate, explain
(Grad-CAM: `pipeline.evaluate.explain.EnsembleCam`), the gate and the served model need no change: to all of them it is
one more model version. It is built only from Keras' own layers (nested member models and `Average`), so it
saves and loads with MLflow's Keras flavour without custom objects.

Averaging RAW member probabilities, then fitting one temperature for the ensemble on validation (Guo et al.
2017, pipeline.net.calibration), rather than averaging calibrated members:
- the ensemble's output must be calibrated as a whole anyway: a mean of calibrated probabilities is not
  calibrated (averaging pulls it towards 0.5, Lakshminarayanan et al. 2017 observe the same), so the
  temperature that is stored must be the ensemble's own;
- per-member temperatures inside the graph would need a custom layer (logit / T), which every loader would
  then have to register; raw averaging keeps the artifact loadable by `mlflow.keras.load_model` alone;
- the issue's measurement (the mean of five models' probabilities: external AUC 0.954) is this average.
Averaging probabilities (not logits) bounds each member's share of the output to 1/K, so one over-confident
member cannot dominate.

Members: the READY versions of the registered model in `--study`, ranked by the study metric (the version tag
named by `--metric`, by default the one the study optimised; any metric tag ranks, via
`registry.rank_candidates`), trained on the same dataset as the best one, never an earlier ensemble. Mixed members (image sizes, metadata inputs) are
refused with a one-line reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.promote.promotion import Candidate, RegistryError

MEMBERS_TAG = "ensemble_members"


class EnsembleError(RegistryError):
    """A one-line reason the ensemble cannot be built (too few members, mixed members...): exit 2."""


@dataclass
class EnsembleResult:
    version: str
    run_id: str
    members: list[str]
    metric: str
    val_metrics: dict
    temperature: float
    threshold: float
    val_ece: float
    val_ece_calibrated: float
    member_values: dict  # version -> its study-metric value


def _image_size(model) -> int:
    image = next(t for t in model.inputs if getattr(t, "name", "").split(":")[0] == "image")
    return int(image.shape[1])


def build_model(members: list, labels: list[str] | None = None, name: str = "ensemble"):
    """One Keras model whose output is the mean of `members`' outputs on the same inputs.

    `labels` name the nested members (`member_<label>`; default their position). EnsembleError when the
    members do not share one input signature."""
    import keras

    from pipeline.artifact.model_store import model_uses_meta
    from pipeline.data.records import META_DIM

    labels = labels or [str(i) for i in range(len(members))]
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
    sizes = {label: _image_size(m) for label, m in zip(labels, members, strict=True)}
    if len(set(sizes.values())) > 1:
        raise EnsembleError("members take different image sizes ("
                            + ", ".join(f"v{k}: {v} px" for k, v in sizes.items()) + "): cannot share one input")
    metas = {label: model_uses_meta(m) for label, m in zip(labels, members, strict=True)}
    if len(set(metas.values())) > 1:
        with_meta = [k for k, v in metas.items() if v]
        raise EnsembleError(f"mixed members: v{', v'.join(with_meta)} take metadata inputs and the others do not; "
                            "an ensemble needs one input signature")
    size, with_meta = next(iter(sizes.values())), next(iter(metas.values()))
    inputs = {"image": keras.Input((size, size, 1), dtype="uint8", name="image")}
    if with_meta:
        inputs["meta"] = keras.Input((META_DIM,), dtype="float32", name="meta")
    outputs = []
    for label, member in zip(labels, members, strict=True):
        # A new Functional over the member's own layers (no weight copy), under a unique name: Keras needs
        # unique names for the nested models, and every member was saved as `pneumo_cnn`.
        nested = keras.Model(inputs=member.input, outputs=member.output, name=f"member_{label}")
        outputs.append(nested(inputs))
    # float32 whatever the global policy: under mixed precision an Average in float16 would round the mean.
    mean = keras.layers.Average(dtype="float32", name="probability")(outputs)
    return keras.Model(inputs, mean, name=name)


def select_members(client, model: str, study: str, k: int, metric: str) -> tuple[list[Candidate], list]:
    """The top `k` versions of `study` by `metric`, on the best one's dataset, earlier ensembles excluded."""
    from pipeline.promote.promotion import rank_candidates

    if k < 2:
        raise EnsembleError(f"--ensemble {k}: an ensemble needs K >= 2 members")
    ranked, skipped = rank_candidates(client, model, metric, study)
    singles = [c for c in ranked if MEMBERS_TAG not in c.tags]
    if not singles:
        raise EnsembleError(f"study {study!r} of {model!r} has no version with {metric} to ensemble")
    digest = singles[0].digest
    same = [c for c in singles if c.digest == digest]
    if len(same) < k:
        raise EnsembleError(f"--ensemble {k}: study {study!r} has only {len(same)} ranked version(s) of {model!r} "
                            f"on dataset {str(digest)[:12]} ({len(skipped)} without {metric})")
    return same[:k], skipped


# study metrics the ensemble's own value is computed for (the shift ones by the same battery training runs)
METRICS_HERE = ("val_auc", "val_auc_pr", "val_loss", "val_auc_shift_mean", "val_auc_shift_min")


def _metric_value(metric: str, metrics: dict, y, p_raw, shifted) -> float | None:
    """The study metric of the ensemble on validation, where it can be computed here (None otherwise)."""
    from pipeline.net.calibration import nll

    known = {"val_auc": metrics["auc"], "val_auc_pr": metrics["auc_pr"], "val_loss": nll(y, p_raw),
             **(shifted.metrics() if shifted is not None else {})}
    return known.get(metric)


def members_recipe(client, run_id: str):
    """The threshold policy of a member's training run (its logged `train.*` params) as a Config, so the
    ensemble decides its operating threshold the way its members were trained to (pipeline.study.train)."""
    from pipeline.config import Config

    params = client.get_run(run_id).data.params
    cast = {"train.threshold_policy": str, "train.target_sensitivity": float, "train.shift_max_images": int,
            "train.shift_seed": int, "model.metadata_inputs": lambda v: v == "True"}
    return Config().with_values({key: f(params[key]) for key, f in cast.items() if key in params})


def build_ensemble(model: str, study: str | None, k: int, *, metric: str | None = None,
                   data_dir: str | Path | None = None, tracking_uri: str | None = None,
                   batch_size: int = 64) -> EnsembleResult:
    """Build, calibrate, log and register the ensemble of the top `k` versions of `study` by `metric` (None: the
    metric the study optimised); -> the new version.

    Logged as an MLflow run `ensemble-top<k>` in the study's experiment: validation metrics of the calibrated
    ensemble and of every member, the temperature, ECE before/after, the reliability diagram, the model."""
    import mlflow

    from pipeline.artifact import tracking
    from pipeline.artifact.model_store import load_keras, model_uses_meta
    from pipeline.data.manifest import DataError, load_manifest
    from pipeline.evaluate import metrics as ev
    from pipeline.evaluate import plots
    from pipeline.evaluate.scoring import predict_split
    from pipeline.net.calibration import apply_temperature, expected_calibration_error, fit_temperature
    from pipeline.promote.promotion import study_metric, versions
    from pipeline.study.train import decide_threshold, shift_battery

    if not study:
        raise EnsembleError("--ensemble needs --study: an ensemble is built from one study's versions")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(uri)
    metric = metric or study_metric(versions(client, model), study)
    chosen, _ = select_members(client, model, study, k, metric)
    digest = chosen[0].digest
    data_dir = str(data_dir or chosen[0].data_dir or "")
    if not data_dir:
        raise EnsembleError(f"{model} version {chosen[0].version}: its run names no data folder; pass --data")
    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        raise EnsembleError(f"{e}; pass --data with the dataset the members were trained on") from None
    if manifest["digest"] != digest:
        raise EnsembleError(f"members were trained on dataset {str(digest)[:12]}, but {data_dir} is dataset "
                            f"{manifest['digest'][:12]}: calibrate on the members' own validation split")
    labels = [c.version for c in chosen]
    members = [load_keras(f"models:/{model}/{v}") for v in labels]
    ensemble = build_model(members, [f"v{v}" for v in labels])

    # Validation only: the temperature and the threshold are fitted here; test stays for the gate.
    y, p_raw, info = predict_split(ensemble, data_dir, "val", batch_size)
    try:
        temperature = fit_temperature(y, p_raw)
    except ValueError as e:
        raise EnsembleError(f"{data_dir}: cannot calibrate the ensemble on its validation split: {e}") from None
    p = apply_temperature(p_raw, temperature)
    # The best member's threshold policy, decided where training decides it (raw scale, then moved onto the
    # calibrated one: temperature scaling is monotone, so the decisions are the same).
    recipe = members_recipe(client, chosen[0].run_id)
    needs_shift = recipe.train.threshold_policy == "robust" or metric.startswith("val_auc_shift")
    shifted = shift_battery(ensemble, recipe, Path(data_dir)) if needs_shift else None
    threshold_raw, policy_note = decide_threshold(recipe, y, p_raw, shifted)
    threshold = float(apply_temperature(threshold_raw, temperature))
    metrics = ev.compute_metrics(y, p, threshold)
    ece = (expected_calibration_error(y, p_raw), expected_calibration_error(y, p))
    value = _metric_value(metric, metrics, y, p_raw, shifted)
    members_tag = ",".join(labels)

    exp_id = tracking.ensure_experiment(study, uri)
    tags = {"study": study, "kind": "ensemble", MEMBERS_TAG: members_tag, "dataset_digest": digest,
            "temperature": repr(float(temperature)), "threshold": repr(float(threshold)),
            "threshold_policy": policy_note,
            "mlflow.note.content": (f"Ensemble (mean probability) of {model} versions {members_tag}, the top {k} "
                                    f"of study {study} by {metric}; calibrated on validation (T={temperature:.3f}, "
                                    f"ECE {ece[0]:.4f} -> {ece[1]:.4f}); val AUC {metrics['auc']:.4f}")}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"ensemble-top{k}", tags=tags) as run:
        tracking.log_dataset(manifest, data_dir)
        mlflow.log_params({"data.dir": data_dir, "ensemble.k": k, "ensemble.metric": metric,
                           "ensemble.members": members_tag, "ensemble.averaging": "raw probabilities, then T"})
        logged = {f"final_val_{key}": float(v) for key, v in metrics.items()
                  if isinstance(v, int | float) and math.isfinite(v)}
        logged.update(temperature=temperature, threshold=threshold, val_ece=ece[0], val_ece_calibrated=ece[1])
        logged.update({f"member_v{c.version}_{metric}": c.value for c in chosen})
        if shifted is not None:
            logged.update(shifted.metrics())
        if value is not None and metric != "val_auc":
            logged[f"final_{metric}"] = value
        mlflow.log_metrics(logged)
        mlflow.log_dict({"members": [{"version": c.version, "run_id": c.run_id, metric: c.value}
                                     for c in chosen], "metrics": metrics}, "evaluation/val.json")
        import matplotlib.pyplot as plt

        for name, fig in {"val_calibration.png": plots.plot_calibration(y, p_raw, y_prob_calibrated=p,
                                                                     temperature=temperature),
                          "val_roc.png": plots.plot_roc(y, p, title="ROC (validation), ensemble",
                                                     threshold=threshold)}.items():
            mlflow.log_figure(fig, f"plots/{name}")
            plt.close(fig)
        info_model = tracking.log_keras_model(ensemble, manifest["image_size"], model_uses_meta(ensemble),
                                              registered_model_name=model)
        version = str(info_model.registered_model_version)
        run_id = run.info.run_id
    version_tags = {"study": study, MEMBERS_TAG: members_tag, "threshold": repr(float(threshold)),
                    "temperature": repr(float(temperature)), "dataset_digest": digest, "run_id": run_id,
                    "val_auc": f"{metrics['auc']:.6f}"}
    if value is not None:
        version_tags[metric] = f"{value:.6f}"
    optimised = {c.tags.get("study_metric") for c in chosen}  # the study's metric name, as pneumo tune tags it
    if len(optimised) == 1 and None not in optimised:
        version_tags["study_metric"] = optimised.pop()
    for key, val in version_tags.items():
        client.set_model_version_tag(model, version, key, val)
    return EnsembleResult(version=version, run_id=run_id, members=labels, metric=metric, val_metrics=metrics,
                          temperature=temperature, threshold=float(threshold), val_ece=ece[0],
                          val_ece_calibrated=ece[1], member_values={c.version: c.value for c in chosen})


def gate_metric(r: EnsembleResult) -> str:
    """The metric the promotion reports for the ensemble: the study's where it was computed here, else val_auc
    (a forced version is not ranked, so this only names the number shown beside it)."""
    return r.metric if r.metric in METRICS_HERE else "val_auc"


def summary(r: EnsembleResult) -> str:
    members = ", ".join(f"v{v} ({r.metric} {val:.4f})" for v, val in r.member_values.items())
    return (f"ensemble   v{r.version}: mean probability of {members}\n"
            f"validation AUC {r.val_metrics['auc']:.4f}; temperature {r.temperature:.3f} (ECE {r.val_ece:.4f} -> "
            f"{r.val_ece_calibrated:.4f}); threshold {r.threshold:.4f} on calibrated probabilities")

