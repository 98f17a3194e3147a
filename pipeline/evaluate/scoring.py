"""Model outputs over a whole split, every record exactly once, with the fields evaluation needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifact.model_store import load, model_uses_meta
from pipeline.data.tfdata import eval_dataset, load_manifest, split_count


def predict_split(model, data_dir: str | Path, split: str, batch_size: int = 64,
                  with_meta: bool | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (labels, probabilities, info) for every record of `split`; info holds patient_id, view_position,
    sex, age and boxes per record. The count is checked against the manifest: evaluation is exact."""
    if with_meta is None:
        with_meta = model_uses_meta(model)
    # The last, partial batch and every new model retrace the predict function; TF warns about each one.
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    ys, ps = [], []
    info: dict[str, list] = {"patient_id": [], "view_position": [], "sex": [], "age": [], "boxes": []}
    for features, labels in eval_dataset(data_dir, split, batch_size, with_info=True, with_meta=True):
        # NumPy, not the reader's TensorFlow tensors: under the JAX backend a jitted predict step
        # (`train.jit_compile`, on by default with a GPU) cannot take a TensorFlow tensor as an argument.
        inputs = {"image": features["image"].numpy()}
        if with_meta:
            inputs["meta"] = features["meta"].numpy()
        ps.append(np.asarray(model.predict_on_batch(inputs), dtype=np.float64).reshape(-1))
        ys.append(labels.numpy().astype(np.int64))
        for key in ("patient_id", "view_position", "sex"):
            info[key] += [v.decode() for v in features[key].numpy()]
        info["age"] += [int(a) for a in features["age"].numpy()]
        info["boxes"] += [b[b >= 0].reshape(-1, 4) for b in features["boxes"].numpy()]
    y, p = np.concatenate(ys), np.concatenate(ps)
    expected = split_count(data_dir, split)
    if len(y) != expected:
        raise RuntimeError(f"{data_dir}: read {len(y)} {split} records, manifest.json says {expected}")
    return y, p, info


def predict_splits(model, data_dir: str | Path, splits: list[str], batch_size: int = 64,
                   with_meta: bool | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """`predict_split` over several splits, concatenated (an external set is evaluated whole: all its splits)."""
    parts = [predict_split(model, data_dir, s, batch_size, with_meta) for s in splits]
    info = {k: [v for part in parts for v in part[2][k]] for k in parts[0][2]}
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), info


def split_names(data_dir: str | Path, split: str) -> list[str]:
    """`all` -> every non-empty split of the dataset (an external evaluation set); else just `split`."""
    if split != "all":
        return [split]
    splits = load_manifest(data_dir).get("splits", {})
    return [name for name in ("train", "val", "test") if splits.get(name, {}).get("count")]


def evaluate_model(uri: str, data_dir: str | Path, split: str = "val", *, tracking_uri: str | None = None,
                   out: str | Path | None = None, n_boot: int = 1000, shift: bool = False,
                   shift_max_images: int = 0, shift_seed: int = 0, ledger: str | None = "evaluate") -> dict:
    """`pneumo evaluate`: metrics with patient-clustered CIs, the majority baseline and subgroups; written as
    JSON. `split="all"` scores every split (an external set that no model was trained on). A read of `test` or
    `all` is charged, before anything is scored, as one query of that split's budget (pipeline/evaluate/holdout.py:
    refused when spent) and recorded in the test ledger as `ledger`; only a caller that charges the read itself
    passes None (`pneumo promote`, which charges under its lock).

    `shift` adds the generalization report (`pneumo evaluate --shift`): the model's AUC on the same split under
    every perturbation of the shift battery (pipeline/evaluate/shift.py; `shift_max_images` caps it, 0 = the whole
    split), mean and worst, and the expected calibration error before and after the model's stored
    temperature (T = 1, i.e. no change, for a version without one)."""
    from pipeline.evaluate.metrics import (
        age_band,
        choose_threshold,
        compute_metrics,
        format_table,
        subgroup_metrics,
        write_json,
    )

    lm = load(uri, tracking_uri, require_threshold=False)
    manifest = load_manifest(data_dir)
    if ledger and split in ("test", "all"):  # a read of a test split (or a whole external set): charged first
        charge_read(uri, lm.version, data_dir, manifest["digest"], split, ledger, tracking_uri)
    threshold = lm.threshold
    threshold_source = "stored with the model (chosen on validation)"
    if threshold is None:
        if split == "all":
            from pipeline.artifact.model_store import ModelError

            raise ModelError(f"model {uri} has no stored threshold: an external set has no validation split "
                             "of the model's own to choose one on")
        yv, pv, _ = predict_split(lm.model, data_dir, "val")
        threshold = choose_threshold(yv, lm.calibrate(pv))
        threshold_source = "chosen now on the val split (Youden's J)"
    y, p_raw, info = predict_splits(lm.model, data_dir, split_names(data_dir, split))
    p = lm.calibrate(p_raw)
    patients = info["patient_id"]
    metrics = compute_metrics(y, p, threshold, n_boot=n_boot, clusters=patients)
    groups = {"view_position": info["view_position"], "sex": info["sex"],
              "age_band": [age_band(a) for a in info["age"]]}
    subgroups = subgroup_metrics(y, p, threshold, groups, clusters=patients)
    path = Path(out) if out else Path(data_dir) / f"evaluation-{split}.json"
    payload = {"model": uri, "version": lm.version, "split": split, "dataset_digest": manifest["digest"],
               "threshold_source": threshold_source, "metrics": metrics, "subgroups": subgroups}
    table = format_table(metrics, subgroups) + f"\nthreshold {threshold:.4f}: {threshold_source}"
    if shift:
        report = shift_report(lm, data_dir, split, y, p_raw, p, threshold, max_images=shift_max_images,
                              seed=shift_seed)
        payload["shift"] = {k: v for k, v in report.items() if k != "table"}
        table += "\n\n" + report["table"]
    write_json(path, payload)
    return {**payload, "table": table, "path": str(path), "probabilities": p, "labels": y,
            "patient_id": patients}


def charge_read(uri: str, version, data_dir: str | Path, digest: str, split: str, command: str,
                tracking_uri: str | None) -> None:
    """One query of the test split's budget for this read (the budget a split has, or the default one)."""
    from pipeline.artifact import tracking
    from pipeline.config import PromoteConfig
    from pipeline.evaluate import holdout

    resolved = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(resolved)
    c = holdout.charge(client, resolved, digest=digest, split=split, command=command,
                       versions=[str(version)], data_dir=str(data_dir), queries=PromoteConfig().test_queries)
    holdout.settle(client, c, f"evaluated {uri}")


def shift_report(lm, data_dir: str | Path, split: str, y, raw, p_calibrated, threshold: float, *,
                 max_images: int = 0, seed: int = 0) -> dict:
    """The generalization part of `pneumo evaluate --shift`: battery AUCs on `split`, the sensitivity and
    specificity at `threshold` (calibrated scale) under each perturbation, and ECE before/after calibration
    (`raw` and `p_calibrated`: the split's probabilities before and after the model's temperature; `lm` a
    model_store.LoadedModel)."""
    from pipeline.evaluate import shift as sh
    from pipeline.net.calibration import expected_calibration_error

    sample = sh.load_sample(data_dir, split, max_images, seed, with_meta=lm.uses_meta)
    result = sh.score_battery(lm.model, sample, seed=seed)
    operating = result.operating(threshold, lm.calibrate)
    ece_before, ece_after = expected_calibration_error(y, raw), expected_calibration_error(y, p_calibrated)
    lines = [f"shift battery on the {split} split ({len(sample.labels)} images, seed {seed}; AUC is unchanged "
             f"by calibration; sensitivity and specificity at the threshold {threshold:.4f})",
             sh.format_table(result, operating), "",
             f"ECE ({split}, 15 bins): {ece_before:.4f} before calibration, {ece_after:.4f} after "
             f"(temperature {lm.temperature:.3f})"]
    return {"images": int(len(sample.labels)), "seed": seed, "clean_auc": result.clean_auc, "auc": result.auc,
            "mean": result.mean, "worst": result.worst, "worst_name": result.worst_name,
            "operating": {k: {"sensitivity": sens, "specificity": spec} for k, (sens, spec) in operating.items()},
            "temperature": lm.temperature, "ece_before": ece_before, "ece_after": ece_after,
            "table": "\n".join(lines)}
