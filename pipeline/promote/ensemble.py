"""`pneumo promote --ensemble K`: one Keras model that averages the top K versions of a study, registered as a
new version and handed to the promotion gate like any candidate. With test-time views (`--tta mild`,
`[promote] tta`; pipeline/net/tta.py) the mean is also taken over the views, K = 1 included.

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

from pipeline.artifact import tag_keys
from pipeline.net.tta import with_views
from pipeline.promote.promotion import Candidate, RegistryError


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
    tta: str = "none"  # the test-time views the mean is taken over (pipeline/net/tta.py)


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


def select_members(client, model: str, study: str, k: int, metric: str, *, single: bool = False,
                   within: str | None = None) -> tuple[list[Candidate], list]:
    """The top `k` versions of `study` by `metric`, on the best one's dataset, earlier ensembles excluded
    (`single`: K = 1 is allowed, for the best version under test-time views).

    `within`: rank by `metric` only the better half by `within` (the first max(k, ceil(n / 2)) of the n versions
    on that dataset ranked by it; a version without it is out). `within="val_loss"` keeps a member whose
    probabilities are badly calibrated (a high validation loss) out of a mean ranked by another metric: such
    a member pulled the mean's threshold down in studies k10 and k14. Measured as rule R on k16-k18 and not
    adopted (README, "A proxy for travels"): the recipe's members are the top 3 by validation loss itself."""
    from pipeline.promote.promotion import rank_candidates

    if k < (1 if single else 2):
        raise EnsembleError(f"--ensemble {k}: an ensemble needs K >= 2 members")
    ranked, skipped = rank_candidates(client, model, metric, study)
    singles = [c for c in ranked if tag_keys.ENSEMBLE_MEMBERS not in c.tags]
    if not singles:
        raise EnsembleError(f"study {study!r} of {model!r} has no version with {metric} to ensemble")
    digest = singles[0].digest
    same = [c for c in singles if c.digest == digest]
    if within:
        by_within = [c.version for c in rank_candidates(client, model, within, study)[0]
                     if tag_keys.ENSEMBLE_MEMBERS not in c.tags and c.digest == digest]
        eligible = set(by_within[:max(k, math.ceil(len(by_within) / 2))])
        same = [c for c in same if c.version in eligible]
    if len(same) < k:
        among = f" in the better half by {within}" if within else ""
        raise EnsembleError(f"--ensemble {k}: study {study!r} has only {len(same)} ranked version(s) of {model!r} "
                            f"on dataset {str(digest)[:12]}{among} ({len(skipped)} without {metric})")
    return same[:k], skipped


# study metrics the ensemble's own value is computed for (the shift ones by the same battery training runs)
METRICS_HERE = ("val_auc", "val_auc_pr", "val_loss", "val_auc_shift_mean", "val_auc_shift_min", "val_auc_shift_tail")


def _metric_value(metric: str, v) -> float | None:
    """The study metric of the ensemble on validation (a candidate.Validation), where it can be computed here."""
    known = {"val_auc": v.metrics["auc"], "val_auc_pr": v.metrics["auc_pr"], "val_loss": v.metrics["loss"],
             **v.shift_metrics()}
    return known.get(metric)


def members_recipe(client, run_id: str):
    """The threshold policy of a member's training run (its logged `train.*` params) as a Config, so the
    ensemble decides its operating threshold the way its members were trained to (pipeline.study.candidate)."""
    import ast

    from pipeline.config import Config

    params = client.get_run(run_id).data.params
    cast = {"train.threshold_policy": str, "train.target_sensitivity": float, "train.shift_max_images": int,
            "train.shift_seed": int, "train.robust_auc_floor": float, "train.robust_tail": float,
            "train.robust_min_sensitivity": float, "train.shift_held_out": ast.literal_eval,
            "model.metadata_inputs": lambda v: v == "True"}
    return Config().with_values({key: f(params[key]) for key, f in cast.items() if key in params})


def members_dataset(chosen: list[Candidate], data_dir: str | Path | None) -> tuple[str, dict]:
    """The dataset the members were trained on -> (folder, manifest); refused when `data_dir` is another."""
    from pipeline.data.manifest import DataError, load_manifest

    digest = chosen[0].digest
    data_dir = str(data_dir or chosen[0].data_dir or "")
    if not data_dir:
        raise EnsembleError(f"version {chosen[0].version}: its run names no data folder; pass --data")
    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        raise EnsembleError(f"{e}; pass --data with the dataset the members were trained on") from None
    if manifest["digest"] != digest:
        raise EnsembleError(f"members were trained on dataset {str(digest)[:12]}, but {data_dir} is dataset "
                            f"{manifest['digest'][:12]}: calibrate on the members' own validation split")
    return data_dir, manifest


def build_ensemble(model: str, study: str | None, k: int, *, metric: str | None = None, tta: str = "none",
                   data_dir: str | Path | None = None, tracking_uri: str | None = None,
                   batch_size: int = 64) -> EnsembleResult:
    """Build, calibrate, log and register the ensemble of the top `k` versions of `study` by `metric` (None: the
    metric the study optimised), averaged over the test-time views `tta` (pipeline/net/tta.py; with them K = 1
    is allowed: the best version under the views); -> the new version.

    Logged as an MLflow run `ensemble-top<k>` in the study's experiment through the path a training run takes
    after its fit (pipeline.study.candidate.make_candidate: validation metrics clustered by patient, the
    members' threshold policy, the temperature, figures, the model), plus every member's study metric."""
    import mlflow

    from pipeline.artifact import tracking
    from pipeline.artifact.model_store import load_keras, model_uses_meta
    from pipeline.promote.promotion import study_metric, versions
    from pipeline.study.candidate import make_candidate

    if not study:
        raise EnsembleError("--ensemble and --tta need --study: the candidate is built from one study's versions")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(uri)
    metric = metric or study_metric(versions(client, model), study)
    chosen, _ = select_members(client, model, study, k, metric, single=tta != "none")
    data_dir, manifest = members_dataset(chosen, data_dir)
    labels = [c.version for c in chosen]
    members = [load_keras(f"models:/{model}/{v}") for v in labels]
    # The views wrap the whole mean: each view is scored once by every member.
    network = with_views(build_model(members, [f"v{v}" for v in labels]) if k > 1 else members[0], tta)
    # Validation only: the temperature and the threshold are fitted there, by the best member's policy.
    recipe = members_recipe(client, chosen[0].run_id).with_values(
        {"data.batch_size": batch_size, "model.metadata_inputs": model_uses_meta(network)})
    needs_shift = recipe.train.threshold_policy == "robust" or metric.startswith("val_auc_shift")
    members_tag = ",".join(labels)
    run_tags = {tag_keys.STUDY: study, tag_keys.KIND: "ensemble", tag_keys.ENSEMBLE_MEMBERS: members_tag}
    views = "" if tta == "none" else f"-tta-{tta}"
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(study, uri), run_name=f"ensemble-top{k}{views}",
                          tags=run_tags) as run:
        tracking.log_dataset(manifest, data_dir)
        mlflow.log_params({"data.dir": data_dir, "ensemble.k": k, "ensemble.metric": metric, "ensemble.tta": tta,
                           "ensemble.members": members_tag, "ensemble.averaging": "raw probabilities, then T"})
        candidate = make_candidate(network, recipe, data_dir, manifest, with_shift=needs_shift,
                                   register_as=model, title="validation, ensemble")
        v, value = candidate.validation, _metric_value(metric, candidate.validation)
        log_members(chosen, metric, value)
        over = "" if tta == "none" else f", over the {tta!r} test-time views"
        mlflow.set_tag("mlflow.note.content", (
            f"Ensemble (mean probability) of {model} versions {members_tag}, the top {k} of study {study} by "
            f"{metric}{over}; calibrated on validation (T={v.temperature:.3f}, ECE {v.ece[0]:.4f} -> {v.ece[1]:.4f}); "
            f"val AUC {v.metrics['auc']:.4f}"))
    tag_version(client, model, candidate, chosen, run.info.run_id, metric, value)
    return EnsembleResult(version=candidate.version, run_id=run.info.run_id, members=labels, metric=metric,
                          val_metrics=v.metrics, temperature=v.temperature, threshold=v.threshold, val_ece=v.ece[0],
                          val_ece_calibrated=v.ece[1], member_values={c.version: c.value for c in chosen}, tta=tta)


def log_members(chosen: list[Candidate], metric: str, value: float | None) -> None:
    """Every member's study metric beside the ensemble's own, to the active run."""
    import mlflow

    logged = {f"member_v{c.version}_{metric}": c.value for c in chosen}
    if value is not None and metric != "val_auc":
        logged[f"final_{metric}"] = value
    mlflow.log_metrics(logged)
    mlflow.log_dict({"members": [{"version": c.version, "run_id": c.run_id, metric: c.value} for c in chosen]},
                    "evaluation/members.json")


def tag_version(client, model: str, candidate, chosen: list[Candidate], run_id: str, metric: str,
                value: float | None) -> None:
    """The new version's tags, as a study tags its trials' versions (what ranking and loading read)."""
    v = candidate.validation
    tags = {tag_keys.STUDY: chosen[0].tags[tag_keys.STUDY],
            tag_keys.ENSEMBLE_MEMBERS: ",".join(c.version for c in chosen),
            tag_keys.THRESHOLD: repr(float(v.threshold)), tag_keys.TEMPERATURE: repr(float(v.temperature)),
            tag_keys.DATASET_DIGEST: chosen[0].digest, tag_keys.RUN_ID: run_id,
            tag_keys.VAL_AUC: f"{v.metrics['auc']:.6f}"}
    if value is not None:
        tags[metric] = f"{value:.6f}"
    optimised = {c.tags.get(tag_keys.STUDY_METRIC) for c in chosen}  # the study's metric name, as pneumo tune tags it
    if len(optimised) == 1 and None not in optimised:
        tags[tag_keys.STUDY_METRIC] = optimised.pop()
    for key, val in tags.items():
        client.set_model_version_tag(model, candidate.version, key, val)


def promote_ensemble(model: str, study: str | None, k: int, *, data_dir: str | None = None, tta: str = "none",
                     metric: str | None = None, tracking_uri: str | None = None, report=print, **promote_args):
    """`pneumo promote --ensemble K`: build and register the ensemble (`build_ensemble`), then gate it like any
    candidate (pipeline.promote.promotion.promote); -> the Decision. `promote_args` go to the gate; the ones that
    cannot go with a new version (`version`, `dry_run`) are refused before anything is registered."""
    from pipeline.promote.promotion import promote

    for name, flag in (("version", "--version"), ("dry_run", "--dry-run")):
        if promote_args.get(name):
            raise EnsembleError(f"--ensemble builds and registers a new version: it cannot go with {flag}")
    promote_args.pop("version", None)
    promote_args.pop("dry_run", None)
    built = build_ensemble(model, study, k, metric=metric, tta=tta, data_dir=data_dir, tracking_uri=tracking_uri)
    report(summary(built))
    return promote(model, data_dir, study=study, metric=gate_metric(built), version=built.version,
                   tracking_uri=tracking_uri, **promote_args)


def gate_metric(r: EnsembleResult) -> str:
    """The metric the promotion reports for the ensemble: the study's where it was computed here, else val_auc
    (a forced version is not ranked, so this only names the number shown beside it)."""
    return r.metric if r.metric in METRICS_HERE else "val_auc"


def summary(r: EnsembleResult) -> str:
    members = ", ".join(f"v{v} ({r.metric} {val:.4f})" for v, val in r.member_values.items())
    views = "" if r.tta == "none" else f", over the {r.tta!r} test-time views"
    return (f"ensemble   v{r.version}: mean probability of {members}{views}\n"
            f"validation AUC {r.val_metrics['auc']:.4f}; temperature {r.temperature:.3f} (ECE {r.val_ece:.4f} -> "
            f"{r.val_ece_calibrated:.4f}); threshold {r.threshold:.4f} on calibrated probabilities")

