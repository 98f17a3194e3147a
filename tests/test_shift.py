"""The shift battery, the robust threshold, the shift metrics of a training run, `tune.metric`, and the
robust recipe's augmentation layers (eager, in tf.data, in a model, and under the JAX backend)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import keras  # noqa: F401  (hard dependencies, imported directly: a broken install fails, it does not skip)
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

from pipeline.config import AugmentConfig, ConfigError, load_config
from pipeline.evaluate import shift
from pipeline.net.augment import (
    HistogramEqualization,
    PerImageStandardization,
    RandomBlur,
    RandomGamma,
    RandomNoise,
    augmentation_block,
)
from tests.conftest import REPO, load_benchmark, repo_env

SMOKE = REPO / "experiments" / "smoke.toml"
SIZE = 48
BATTERY = shift.battery(SIZE)


def chest_like(n: int = 6, seed: int = 0) -> np.ndarray:
    """uint8 images with structure at every scale (gradient, a bright disc, texture) and no saturated pixels,
    so that every perturbation has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1)
    base = 40 + 120 * xx + 70 * (((yy - 0.4) ** 2 + (xx - 0.6) ** 2) < 0.05)
    return np.clip(base[None, ..., None] + rng.normal(0, 12, (n, SIZE, SIZE, 1)), 0, 255).astype(np.uint8)


# --- the battery -------------------------------------------------------------------------------------------
def test_battery_covers_every_kind_at_two_or_more_severities():
    kinds = {}
    for p in BATTERY:
        kinds.setdefault(p.kind, set()).add(p.severity)
    assert set(kinds) == {"exposure", "gamma", "contrast", "window", "blur", "sharpen", "noise", "jpeg", "zoom_out",
                          "crop", "translate", "rotate", "letterbox", "border"}
    assert all(len(s) >= 2 for s in kinds.values())
    assert len({p.name for p in BATTERY}) == len(BATTERY)


@pytest.mark.parametrize("salt,p", list(enumerate(BATTERY)), ids=[p.name for p in BATTERY])
def test_each_perturbation_changes_the_image_keeps_shape_dtype_and_is_deterministic(salt, p):
    x = chest_like()
    index = np.arange(len(x))
    out = np.asarray(shift.apply(p, x, index, seed=3, salt=salt))
    assert out.shape == x.shape and out.dtype == np.uint8
    # Every image changes, by more than rounding.
    assert (np.abs(out.astype(int) - x).mean(axis=(1, 2, 3)) > 1.0).all()
    # Same seed: the same images, also when the batch is cut differently (draws are keyed by image index).
    again = np.concatenate([np.asarray(shift.apply(p, x[:2], index[:2], 3, salt)),
                            np.asarray(shift.apply(p, x[2:], index[2:], 3, salt))])
    np.testing.assert_array_equal(out, again)


def test_random_draws_follow_the_seed():
    x = chest_like()
    index = np.arange(len(x))
    for salt, p in enumerate(BATTERY):
        if p.kind in ("noise", "rotate"):
            a = np.asarray(shift.apply(p, x, index, 0, salt))
            b = np.asarray(shift.apply(p, x, index, 1, salt))
            assert not np.array_equal(a, b), p.name


def test_subset_is_stratified_fixed_and_whole_when_small():
    y = np.array([0] * 900 + [1] * 300)
    a, b = shift.subset_indices(y, 200, seed=0), shift.subset_indices(y, 200, seed=0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 200 and y[a].sum() == 50  # the 25% prevalence kept
    assert not np.array_equal(a, shift.subset_indices(y, 200, seed=1))
    np.testing.assert_array_equal(shift.subset_indices(y[:100], 200, seed=0), np.arange(100))


def test_score_battery_reads_drops_from_the_model():
    """A 'model' that reads the mean brightness: exposure changes move its AUC, and the metrics agree."""
    x = chest_like(40)
    y = np.array([0, 1] * 20)
    x[y == 1] = np.clip(x[y == 1].astype(int) + 25, 0, 255).astype(np.uint8)  # positives brighter
    sample = shift.SplitSample(images=x, labels=y, meta=None, index=np.arange(40))

    def brightness(inputs):
        return np.asarray(inputs["image"], np.float64).mean(axis=(1, 2, 3)) / 255.0

    r = shift.score_battery(brightness, sample, seed=0, batch_size=16)
    assert r.clean_auc == 1.0 and set(r.auc) == {p.name for p in BATTERY}
    m = r.metrics()
    assert m["val_auc_shift_mean"] == pytest.approx(np.mean(list(r.auc.values())))
    assert m["val_auc_shift_min"] == min(r.auc.values()) and m["val_auc_shift/jpeg_10"] == r.auc["jpeg_10"]
    assert shift.score_battery(brightness, sample, seed=0, batch_size=7).auc == r.auc  # batch-independent


# --- robust threshold --------------------------------------------------------------------------------------
def _youden(y, p, t):
    y = np.asarray(y).astype(bool)
    return (p[y] >= t).mean() - (p[~y] >= t).mean()


def test_robust_threshold_at_the_smallest_tail_is_the_fitting_halfs_minimax():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(300, int)]
    clean = np.r_[rng.uniform(0.0, 0.5, 300), rng.uniform(0.45, 1.0, 300)]
    brighter = np.clip(clean + 0.25, 0, 1)  # a shift moves every score up
    chosen = shift.robust_threshold(y, clean, {"brighter": brighter}, auc_floor=0.0, tail=1e-9)
    fit = shift.fitting_half(y.astype(bool), 0)
    conditions = [clean[fit], brighter[fit]]
    # The exhaustive answer on the fitting half: every distinct score as a threshold.
    grid = np.unique(np.concatenate(conditions))
    best = max(min(_youden(y[fit], c, g) for c in conditions) for g in grid)
    assert chosen.objective == pytest.approx(best, abs=0.01)
    assert min(_youden(y[fit], c, chosen.threshold) for c in conditions) == pytest.approx(chosen.objective, abs=1e-9)
    # The clean split's own Youden threshold does worse on the worst case.
    from pipeline.evaluate.metrics import choose_threshold

    t_clean = choose_threshold(y[fit], clean[fit])
    assert min(_youden(y[fit], c, t_clean) for c in conditions) < chosen.objective - 0.1
    assert chosen.threshold > t_clean  # it moved up, towards where the shifted negatives no longer reach
    # Reported on the other half, not on the images it was chosen on.
    assert chosen.report["clean_j"] == pytest.approx(_youden(y[~fit], clean[~fit], chosen.threshold))


def test_one_uninformative_condition_cannot_hijack_the_threshold():
    """The review's case: 27 mild perturbations and one that carries no ranking (AUC ~0.5). The minimax
    threshold over all of them follows the bad one (clean specificity collapses); with the AUC floor it is left
    out, logged as such, and the tail average keeps the threshold where the mild ones put it."""
    rng = np.random.default_rng(1)
    n = 600
    y = (rng.random(n) < 0.4).astype(int)
    logit = 2.2 * (2 * y - 1) + rng.normal(0, 1.0, n)
    clean = 1 / (1 + np.exp(-logit))
    mild = {f"mild{i}": 1 / (1 + np.exp(-(logit + rng.normal(0, 0.4, n) + rng.normal(0, 0.2)))) for i in range(27)}
    broken = {"broken": 1 / (1 + np.exp(-rng.normal(-2.0, 1.0, n)))}  # low scores for everyone, no ranking
    guarded = shift.robust_threshold(y, clean, {**mild, **broken}, auc_floor=0.6, tail=0.25)
    without = shift.robust_threshold(y, clean, mild, auc_floor=0.6, tail=0.25)
    hijacked = shift.robust_threshold(y, clean, {**mild, **broken}, auc_floor=0.0, tail=1e-9)
    assert list(guarded.dropped) == ["broken"] and guarded.dropped["broken"] < 0.6 and len(guarded.kept) == 27
    assert guarded.threshold == without.threshold
    assert guarded.report["clean_specificity"] > 0.85
    assert hijacked.report["clean_specificity"] < guarded.report["clean_specificity"] - 0.3
    assert "1 left out below the AUC floor" in guarded.describe() and "held-out half" in guarded.describe()


def test_the_robust_threshold_honours_the_clean_sensitivity_floor():
    rng = np.random.default_rng(2)
    y = (rng.random(800) < 0.3).astype(int)
    clean = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.2, 800))))
    shifted = {"up": np.clip(clean + 0.1, 0, 1), "down": np.clip(clean - 0.1, 0, 1)}
    free = shift.robust_threshold(y, clean, shifted, min_sensitivity=0.0)
    floor = shift.robust_threshold(y, clean, shifted, min_sensitivity=0.95)
    fit = shift.fitting_half(y.astype(bool), 0)
    assert (clean[fit & (y == 1)] >= floor.threshold).mean() >= 0.95
    assert (clean[fit & (y == 1)] >= free.threshold).mean() < 0.95  # the floor binds here
    assert floor.threshold < free.threshold


# --- a training run logs the battery; threshold policies ---------------------------------------------------
@pytest.fixture(scope="module")
def robust_run(synth_data, tmp_path_factory):
    from pipeline.study.train import train

    tmp = tmp_path_factory.mktemp("robust")
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp}/ckpt", "train.threshold_policy=robust",
                              "train.shift_max_images=40", 'train.shift_held_out=["jpeg", "gamma"]'])
    return cfg, train(cfg, synth_data, tracking_uri=uri, verbose=0), uri


def test_training_logs_the_shift_metrics_and_plot(robust_run):
    cfg, result, uri = robust_run
    run = MlflowClient(uri).get_run(result.run_id)
    metrics = run.data.metrics
    per = {k: v for k, v in metrics.items() if k.startswith("val_auc_shift/")}
    assert len(per) == len(shift.battery(64))  # every perturbation is scored and logged ...
    held = {k: v for k, v in per.items() if shift.family(k.removeprefix("val_auc_shift/")) in ("jpeg", "gamma")}
    chosen = {k: v for k, v in per.items() if k not in held}
    assert len(held) == 4
    # ... but the held-out families are in no selection metric, only in their own
    assert metrics["val_auc_shift_mean"] == pytest.approx(np.mean(list(chosen.values())))
    assert metrics["val_auc_shift_min"] == pytest.approx(min(chosen.values()))
    worst_quarter = sorted(chosen.values())[: math.ceil(len(chosen) / 4)]
    assert metrics["val_auc_shift_tail"] == pytest.approx(np.mean(worst_quarter))
    assert metrics["val_auc_heldout_mean"] == pytest.approx(np.mean(list(held.values())))
    assert metrics["val_auc_heldout_min"] == pytest.approx(min(held.values()))
    assert "plots/val_shift.png" in {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "plots")}
    # the robust threshold's evidence: its held-out half's rates, and what was left out below the AUC floor
    evidence = MlflowClient(uri).download_artifacts(result.run_id, "evaluation/robust_threshold.json")
    import json

    logged = json.loads(open(evidence).read())
    # the threshold is fitted over the selection families only: the held-out ones decide nothing
    assert set(logged["kept"]) | set(logged["left_out_below_auc_floor"]) == {
        k.removeprefix("val_auc_shift/") for k in chosen}
    assert metrics["robust_left_out"] == len(logged["left_out_below_auc_floor"])
    assert metrics["robust_heldout_clean_sensitivity"] == pytest.approx(logged["held_out_half"]["clean_sensitivity"])


def test_robust_threshold_is_the_batterys(robust_run, synth_data):
    """Recomputed from scratch (same seed -> same images): the stored threshold is the battery's robust one."""
    cfg, result, uri = robust_run
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.tags["threshold_policy"].startswith("robust")
    sample = shift.load_sample(synth_data, "val", 40, cfg.train.shift_seed)
    again = shift.score_battery(result.model, sample, seed=cfg.train.shift_seed)
    selection = {k: v for k, v in again.probabilities.items() if shift.family(k) not in ("jpeg", "gamma")}
    t = shift.robust_threshold(again.labels, again.clean, selection, auc_floor=cfg.train.robust_auc_floor,
                               tail=cfg.train.robust_tail, min_sensitivity=cfg.train.robust_min_sensitivity,
                               seed=cfg.train.shift_seed).threshold
    # the stored threshold is the minimax one moved onto the calibrated scale (the same decisions)
    from pipeline.net.calibration import apply_temperature

    assert run.data.metrics["threshold_uncalibrated"] == pytest.approx(t, abs=1e-6)
    temperature = float(run.data.tags["temperature"])
    assert float(run.data.tags["threshold"]) == pytest.approx(float(apply_temperature(t, temperature)), abs=1e-9)
    assert again.metrics()["val_auc_shift/jpeg_10"] == pytest.approx(run.data.metrics["val_auc_shift/jpeg_10"],
                                                                     abs=1e-9)


def test_evaluate_shift_reports_battery_and_ece(robust_run, synth_data, tmp_path):
    """`pneumo evaluate --shift`: the battery on the test split and ECE before/after the stored temperature."""
    from pipeline.evaluate.scoring import evaluate_model, predict_split
    from pipeline.net.calibration import apply_temperature, expected_calibration_error

    cfg, result, uri = robust_run
    temperature = result.temperature  # the fitted one the model carries (a tag edited to differ is refused)
    assert temperature != 1.0
    r = evaluate_model(f"runs:/{result.run_id}/model", synth_data, "test", tracking_uri=uri, out=tmp_path / "e.json",
                       shift=True, shift_max_images=40, n_boot=50)
    rep = r["shift"]
    assert set(rep["auc"]) == {p.name for p in shift.battery(64)} and rep["images"] == 40
    assert rep["worst"] == min(rep["auc"].values()) and rep["temperature"] == pytest.approx(temperature)
    y, raw, _ = predict_split(result.model, synth_data, "test")
    assert rep["ece_before"] == pytest.approx(expected_calibration_error(y, raw), abs=1e-6)
    assert rep["ece_after"] == pytest.approx(expected_calibration_error(y, apply_temperature(raw, temperature)),
                                             abs=1e-6)
    assert "jpeg_10" in r["table"] and "ECE" in r["table"]
    # The stored decision under each perturbation: the calibrated battery probabilities at the stored threshold.
    sample = shift.load_sample(synth_data, "test", 40, 0)
    threshold, at = r["metrics"]["threshold"], rep["operating"]
    assert set(at) == {"clean", *rep["auc"]}
    calibrated = apply_temperature(np.asarray(result.model.predict_on_batch({"image": sample.images})).ravel(),
                                   temperature)
    positive = sample.labels == 1
    assert at["clean"]["sensitivity"] == pytest.approx((calibrated[positive] >= threshold).mean(), abs=1e-6)
    assert at["clean"]["specificity"] == pytest.approx((calibrated[~positive] < threshold).mean(), abs=1e-6)
    salt, jpeg = next((i, p) for i, p in enumerate(shift.battery(64)) if p.name == "jpeg_10")  # scored on its own
    perturbed = np.asarray(shift.apply(jpeg, sample.images, sample.index, 0, salt))
    scores = apply_temperature(np.asarray(result.model.predict_on_batch({"image": perturbed})).ravel(), temperature)
    assert at["jpeg_10"]["sensitivity"] == pytest.approx((scores[positive] >= threshold).mean(), abs=1e-6)
    assert at["jpeg_10"]["specificity"] == pytest.approx((scores[~positive] < threshold).mean(), abs=1e-6)
    jpeg_line = next(line for line in r["table"].splitlines() if line.startswith("jpeg_10 "))
    assert jpeg_line.split()[3:5] == [f"{at['jpeg_10']['sensitivity']:.3f}", f"{at['jpeg_10']['specificity']:.3f}"]
    import json

    assert json.loads((tmp_path / "e.json").read_text())["shift"]["worst_name"] == rep["worst_name"]


def test_policy_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="target_sensitivity"):
        load_config(SMOKE, ["train.threshold_policy=sensitivity"])
    with pytest.raises(ConfigError, match="only read by"):
        load_config(SMOKE, ["train.target_sensitivity=0.9"])
    with pytest.raises(ConfigError, match="shift_battery"):
        load_config(SMOKE, ["train.threshold_policy=robust", "train.shift_battery=false"])
    with pytest.raises(ConfigError, match="threshold_policy"):
        load_config(SMOKE, ["train.threshold_policy=median"])
    with pytest.raises(ConfigError, match="lr_plateau_patience"):
        load_config(SMOKE, ["train.lr_schedule=cosine", "train.lr_plateau_patience=2"])
    for key, bad in (("augment.gamma", 1.5), ("augment.noise", -0.1), ("train.label_smoothing", 0.5)):
        with pytest.raises(ConfigError, match=key):
            load_config(SMOKE, [f"{key}={bad}"])
    assert load_config(SMOKE, ["train.threshold_policy=sensitivity",
                               "train.target_sensitivity=0.9"]).train.threshold_policy == "sensitivity"


# --- tune.metric -------------------------------------------------------------------------------------------
def test_tune_metric_changes_what_the_study_optimises(synth_data, tmp_path):
    """The same 2-trial study under two metrics: direction, trial values, version tags, summary and the
    promotion's ranking all follow `tune.metric`."""
    from optuna.trial import TrialState

    from pipeline.promote import promotion
    from pipeline.study import study_report, tune

    results = {}
    for metric in ("val_loss", "val_auc_shift_min"):
        uri, storage = f"sqlite:///{tmp_path}/{metric}.db", f"sqlite:///{tmp_path}/{metric}-optuna.db"
        cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp_path}/ckpt", f"tune.metric={metric}",
                                  "tune.pruner=none", "train.shift_max_images=40"])
        study = tune.run_tune(cfg, "m", data_dir=str(synth_data), trials=2, storage=storage, tracking_uri=uri)
        results[metric] = (study, uri)
        client = MlflowClient(uri, uri)
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(complete) == 2
        for t in complete:
            run = client.get_run(t.user_attrs["mlflow_run_id"])
            logged = run.data.metrics["final_val_loss" if metric == "val_loss" else metric]
            assert t.value == pytest.approx(logged, abs=1e-6)
            assert t.value != pytest.approx(run.data.metrics["final_val_auc"], abs=1e-9)
            mv = client.get_model_version("pneumonia-cnn", t.user_attrs["model_version"])
            assert mv.tags["study_metric"] == metric and float(mv.tags[metric]) == pytest.approx(t.value, abs=1e-6)
        assert study_report.metric(study) == metric and metric in study_report.summary_table(study)
        ranked, _ = promotion.rank_candidates(client, "pneumonia-cnn", study="m")
        best = study_report.ranked(study)[0]
        assert ranked[0].version == best.user_attrs["model_version"] and ranked[0].source == f"version tag {metric}"
        # The pruner watches the per-epoch metric, or val_auc for the end-of-training shift metrics.
        assert set(complete[0].intermediate_values) == {0, 1}
    assert results["val_loss"][0].direction.name == "MINIMIZE"
    assert results["val_auc_shift_min"][0].direction.name == "MAXIMIZE"
    # Re-opening a study under another metric is refused rather than mixing objectives.
    study, uri = results["val_loss"]
    cfg = load_config(SMOKE, ["tune.metric=val_auc"])
    with pytest.raises(ConfigError, match="optimises 'val_loss'"):
        tune.open_study("m", f"sqlite:///{tmp_path}/val_loss-optuna.db", cfg)


def test_pruning_monitor_and_direction():
    from pipeline.study import tune

    assert [tune.pruning_monitor(m) for m in ("val_auc", "val_loss", "val_auc_shift_mean")] == \
        ["val_auc", "val_loss", "val_auc"]
    assert tune.direction("val_loss") == "minimize" and tune.direction("val_auc_shift_min") == "maximize"


# --- augmentation layers -----------------------------------------------------------------------------------
def unit_images(n: int = 4) -> tf.Tensor:
    return tf.constant(chest_like(n).astype(np.float32) / 255.0)


LAYERS = [RandomGamma(0.4, seed=1), RandomNoise(0.05, seed=2), RandomBlur(0.8, seed=3)]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda la: type(la).__name__)
@pytest.mark.parametrize("mode", ["eager", "dataset_map"])
def test_intensity_layers_train_random_eval_identity(layer, mode):
    x = unit_images()

    def run(training):
        if mode == "eager":
            return layer(x, training=training).numpy()
        return next(iter(tf.data.Dataset.from_tensors(x).map(lambda t: layer(t, training=training)))).numpy()

    np.testing.assert_array_equal(run(False), x.numpy())
    out = run(True)
    assert out.shape == x.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - x.numpy()).mean() > 1e-3
    assert not np.allclose(out[0] - x.numpy()[0], out[1] - x.numpy()[1])  # a draw per image


def test_blur_blurs_and_sharpens():
    """x + w (blur(x) - x), with blur the 5-tap Gaussian of sigma 1 and mirrored borders (scipy's reference), for
    a fixed w; drawn per image, w spans both signs, and positive weights lower the high-frequency energy while
    negative ones raise it."""
    from scipy.ndimage import correlate1d, gaussian_filter

    x = unit_images(64)
    taps = np.array(RandomBlur.KERNEL)
    assert np.allclose(taps, gaussian_filter(np.eye(5)[2], 1.0, truncate=2.0, mode="constant"), atol=1e-6)
    blurred = correlate1d(correlate1d(x.numpy(), taps, axis=1, mode="mirror"), taps, axis=2, mode="mirror")
    for w in (0.9, -0.9):
        fixed = RandomBlur(0.9, seed=0)
        fixed.per_image = lambda b, low, high, w=w: np.float32(w)
        np.testing.assert_allclose(fixed.transform(x, 64).numpy(), x.numpy() + w * (blurred - x.numpy()), atol=1e-6)

    out = RandomBlur(0.9, seed=0)(x, training=True).numpy()
    x = x.numpy()
    inside = (out > 0) & (out < 1)  # the layer clips to [0, 1]: fit each image's weight on the unclipped pixels
    d, o = np.where(inside, blurred - x, 0), np.where(inside, out - x, 0)
    w = (o * d).sum(axis=(1, 2, 3)) / (d * d).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(out, np.clip(x + w[:, None, None, None] * (blurred - x), 0, 1), atol=1e-5)
    assert np.abs(w).max() <= 0.9 and w.min() < -0.3 and w.max() > 0.3  # both ways, across the range
    lap = lambda a: np.abs(np.diff(a, axis=1)).mean(axis=(1, 2, 3))  # noqa: E731
    change, clear = lap(out) - lap(x), np.abs(w) > 0.05
    assert (np.sign(change[clear]) == -np.sign(w[clear])).all()


def test_block_orders_the_new_layers_and_a_model_leaves_eval_untouched():
    from pipeline.config import ModelConfig
    from pipeline.net.model import build_model

    cfg = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0,
                        gamma=0.3, noise=0.03, blur=0.5)
    assert [la.name for la in augmentation_block(cfg, seed=0).layers] == ["gamma", "blur", "noise"]
    m = build_model(ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, dropout=0.0,
                                standardize=True), cfg, SIZE, seed=0)
    x = {"image": chest_like(4)}
    a, b = m(x, training=False).numpy(), m(x, training=False).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(m(x, training=True).numpy(), a)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(4, np.float32))).batch(2)
    m.compile(optimizer="adam", loss="binary_crossentropy")
    m.fit(ds, epochs=1, verbose=0)  # trains with the layers inside


def test_standardization_removes_exposure_and_contrast():
    x = unit_images()
    layer = PerImageStandardization()
    np.testing.assert_allclose(layer(x).numpy(), layer(x * 0.5 + 0.2).numpy(), atol=1e-4)
    out = layer(x).numpy()
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1.0, atol=1e-3)


def center_standardized(images: np.ndarray, window: float = 0.5) -> np.ndarray:
    """Reference for PerImageStandardization(window, unsaturated_only=True), per image in float64: mean and
    std of the unsaturated pixels of the central `window` of each side, applied to the whole image."""
    h, w = images.shape[1:3]
    top, left = round(h * (1 - window) / 2), round(w * (1 - window) / 2)
    out = np.empty(images.shape, np.float64)
    for i, img in enumerate(images.astype(np.float64)):
        region = img[top:h - top, left:w - left].ravel()
        counted = region[(region > 0) & (region < 255)] / 255
        out[i] = (img / 255 - counted.mean()) / max(counted.std(), 1 / img.size**0.5)
    return out


def test_center_standardization_ignores_a_frame_margins_and_exposure(tmp_path):
    """standardize_stats = "center": the numpy reference; exposure leaves it unchanged like the whole-image
    form; a white frame or black bars (inside the outer quarter, so outside the central window) leave the
    image's own pixels' output unchanged where the whole-image form moves them by more than 0.5; the model
    builds it from the config, saves and loads it; a model config without the arguments (saved before they
    existed) loads as the whole-image form; the key is checked with one-line errors."""
    from pipeline.config import ModelConfig, check_model
    from pipeline.net.model import build_model

    images = chest_like(4)
    images[0, SIZE // 2, SIZE // 2] = 255  # saturated pixels inside the window: left out of the statistics
    images[1, SIZE // 2, : SIZE // 2] = 0
    center = PerImageStandardization(window=0.5, unsaturated_only=True)
    whole = PerImageStandardization()
    unit = images.astype(np.float32) / 255
    np.testing.assert_allclose(center(unit).numpy(), center_standardized(images), atol=1e-4)
    body = chest_like(3, seed=1)
    darker = np.round(body * 0.7).astype(np.float32) / 255
    np.testing.assert_allclose(center(darker).numpy(), center(body.astype(np.float32) / 255).numpy(), atol=0.02)
    for fill, rows in ((255, np.s_[:, :5]), (255, np.s_[:, :, -5:]), (0, np.s_[:, :8]), (0, np.s_[:, -8:])):
        framed = body.copy()
        framed[rows] = fill
        keep = np.ones(body.shape, bool)
        keep[rows] = False
        plain, marked = body.astype(np.float32) / 255, framed.astype(np.float32) / 255
        np.testing.assert_allclose(center(marked).numpy()[keep], center(plain).numpy()[keep], atol=1e-5)
        assert np.abs(whole(marked).numpy()[keep] - whole(plain).numpy()[keep]).max() > 0.5
    cfg = ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, dropout=0.0, standardize=True,
                      standardize_stats="center")
    m = build_model(cfg, AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0), SIZE, seed=0)
    layer = m.get_layer("standardize")
    assert (layer.window, layer.unsaturated_only) == (0.5, True)
    other = build_model(dataclasses.replace(cfg, standardize_stats="unsaturated"), AugmentConfig(), SIZE, seed=0)
    assert (other.get_layer("standardize").window, other.get_layer("standardize").unsaturated_only) == (1.0, True)
    x = {"image": images}
    m.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "m.keras").predict_on_batch(x),
                               m.predict_on_batch(x), atol=1e-6)
    old = PerImageStandardization.from_config({"name": "standardize", "trainable": True})
    np.testing.assert_allclose(old(unit).numpy(), whole(unit).numpy())
    check_model(dataclasses.replace(cfg, standardize=False))  # the recipe's key left as it is, for a backbone
    with pytest.raises(ConfigError, match=r"takes its ImageNet input normalisation \(--set model.standardize=false\)"):
        check_model(dataclasses.replace(cfg, backbone="densenet121"))
    with pytest.raises(ConfigError, match="'model.standardize_stats' must be one of image, unsaturated, center, got 'edges'"):
        check_model(dataclasses.replace(cfg, standardize_stats="edges"))
    with pytest.raises(ValueError, match="window must be in"):
        PerImageStandardization(window=0.0)


def test_standardization_can_output_saturated_pixels_as_the_images_mean(tmp_path):
    """standardize_saturated = "zero": black margins and white marks come out as 0, the image's mean, where the
    kept form puts a black margin several standard deviations below it; every other pixel is the kept form's;
    built from the config, saved and loaded; a config saved before the argument existed loads without it."""
    from pipeline.config import ModelConfig, check_model
    from pipeline.net.model import build_model

    images = chest_like(3)
    images[:, :10] = 0  # letterbox-like bars and a zoomed-out margin
    images[:, :, -4:] = 0
    images[:, -3:] = 255  # a white frame edge
    saturated = (images == 0) | (images == 255)
    unit = images.astype(np.float32) / 255
    zeroed = PerImageStandardization(unsaturated_only=True, saturated_to_zero=True)(unit).numpy()
    kept = PerImageStandardization(unsaturated_only=True)(unit).numpy()
    assert np.all(zeroed[saturated] == 0.0)
    assert kept[images == 0].max() < -1.5  # what the option removes: the margin far below the image's range
    np.testing.assert_allclose(zeroed[~saturated], kept[~saturated], atol=1e-6)
    cfg = ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, dropout=0.0, standardize=True,
                      standardize_stats="unsaturated", standardize_saturated="zero")
    m = build_model(cfg, AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0), SIZE, seed=0)
    assert m.get_layer("standardize").saturated_to_zero
    m.save(tmp_path / "m.keras")
    x = {"image": images}
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "m.keras").predict_on_batch(x),
                               m.predict_on_batch(x), atol=1e-6)
    old = PerImageStandardization.from_config({"name": "standardize", "trainable": True, "window": 1.0,
                                               "unsaturated_only": True})
    np.testing.assert_allclose(old(unit).numpy(), kept)
    with pytest.raises(ConfigError, match="'model.standardize_saturated' must be one of keep, zero, got 'mean'"):
        check_model(dataclasses.replace(cfg, standardize_saturated="mean"))


def mid_rank(levels: np.ndarray) -> np.ndarray:
    """Reference for HistogramEqualization, per image: over the unsaturated pixels, (pixels below + half the
    pixels equal) / their number, on [-1, 1]; black -> -1, white -> +1."""
    out = np.empty(levels.shape, np.float64)
    for i, img in enumerate(levels):
        flat = img.ravel()
        counted = np.sort(flat[(flat > 0) & (flat < 255)])
        below = np.searchsorted(counted, flat, side="left")
        equal = np.searchsorted(counted, flat, side="right") - below
        ranked = (below + 0.5 * equal) / max(len(counted), 1) * 2 - 1
        out[i] = np.where(flat == 0, -1.0, np.where(flat == 255, 1.0, ranked)).reshape(img.shape)
    return out


def test_equalization_is_the_mid_rank_cdf_and_ignores_the_grey_scale_curve_and_margins():
    """HistogramEqualization: each unsaturated pixel's mid-rank among its image's unsaturated pixels (a hand
    example, then a numpy reference per image, batch-independent); any strictly increasing grey-scale map
    (exposure, contrast, gamma) on distinct levels leaves the output unchanged, which per-image
    standardisation does not do for gamma; a white frame or black margins around the image leave the
    image's own output unchanged; a flat image maps to 0."""
    layer = HistogramEqualization()
    tiny = np.array([0, 64, 64, 128, 200, 255], np.float32).reshape(1, 2, 3, 1) / 255
    np.testing.assert_allclose(layer(tiny).numpy().ravel(), [-1.0, -0.5, -0.5, 0.25, 0.75, 1.0])
    images = chest_like(4)
    images[0, :3] = 0  # some saturated pixels, so the reference's exclusion is exercised
    images[1, -3:] = 255
    out = layer(images.astype(np.float32) / 255).numpy()
    np.testing.assert_allclose(out, mid_rank(images), atol=1e-6)
    np.testing.assert_allclose(layer(images[2:3].astype(np.float32) / 255).numpy(), out[2:3], atol=1e-6)
    # 40 distinct levels, so each map below stays one-to-one after rounding to 8 bits.
    palette = np.linspace(20, 235, 40).round()
    sparse = palette[np.random.default_rng(1).integers(0, 40, (3, SIZE, SIZE, 1))]
    for curve in (lambda v: v * 0.6, lambda v: 255 * (v / 255) ** 1.6, lambda v: (v - 128) * 0.5 + 128):
        assert len(np.unique(np.round(curve(palette)))) == 40
        shifted = np.round(curve(sparse)).astype(np.float32) / 255
        np.testing.assert_allclose(layer(shifted).numpy(), layer(sparse.astype(np.float32) / 255).numpy(), atol=1e-6)
    gamma = np.round(255 * (sparse / 255) ** 1.6).astype(np.float32) / 255
    standardize = PerImageStandardization()
    assert np.abs(standardize(gamma).numpy() - standardize(sparse.astype(np.float32) / 255).numpy()).max() > 0.1
    body = chest_like(2)[:, 4:-4, 4:-4]  # unsaturated inside
    assert 0 < body.min() and body.max() < 255
    inner = layer(body.astype(np.float32) / 255).numpy()
    for fill in (0, 255):  # black margins (zoom-out, letterbox), a white frame (a scanned film)
        framed = np.pad(body, [(0, 0), (4, 4), (4, 4), (0, 0)], constant_values=fill).astype(np.float32) / 255
        got = layer(framed).numpy()
        np.testing.assert_allclose(got[:, 4:-4, 4:-4], inner, atol=1e-6)
        assert (got[:, :4] == (1.0 if fill else -1.0)).all()
    np.testing.assert_array_equal(layer(np.full((1, 8, 8, 1), 0.3, np.float32)).numpy(), 0.0)


def test_equalization_compiles_saves_and_is_checked_in_the_config(tmp_path):
    """Inside the model under XLA (tf.function jit_compile) it gives the eager output; a model with it saves and
    loads with the same predictions; it excludes standardize and a backbone, with one-line errors."""
    from pipeline.config import ModelConfig, check_model
    from pipeline.net.model import build_model

    images = chest_like(4).astype(np.float32) / 255
    layer = HistogramEqualization()
    np.testing.assert_allclose(tf.function(layer, jit_compile=True)(images).numpy(), layer(images).numpy(),
                               atol=1e-6)
    cfg = ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, dropout=0.0, equalize=True)
    m = build_model(cfg, AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0), SIZE, seed=0)
    assert "equalize" in [la.name for la in m.layers]
    x = {"image": chest_like(4)}
    m.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "m.keras").predict_on_batch(x),
                               m.predict_on_batch(x), atol=1e-6)
    with pytest.raises(ConfigError, match="set one"):
        check_model(dataclasses.replace(cfg, standardize=True))
    with pytest.raises(ConfigError, match="model.equalize applies to the project's own CNN"):
        check_model(dataclasses.replace(cfg, backbone="densenet121"))


def test_bad_new_strengths_name_the_key():
    for key, value in (("gamma", 1.0), ("noise", 0.6), ("blur", -0.1)):
        with pytest.raises(ValueError, match=f"augment.{key}"):
            augmentation_block(dataclasses.replace(AugmentConfig(), **{key: value}), seed=0)


JAX_SCRIPT = """
import numpy as np, keras
from pipeline.config import AugmentConfig, ModelConfig
from pipeline.net.model import build_model
assert keras.backend.backend() == "jax"
aug = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, gamma=0.3, noise=0.03, blur=0.5)
m = build_model(ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, standardize=True), aug, 32)
x = {"image": np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1)).astype("uint8")}
assert np.array_equal(np.asarray(m(x, training=False)), np.asarray(m(x, training=False)))
m.compile(optimizer="adam", loss="binary_crossentropy")
m.fit(x, np.zeros(4, "float32"), epochs=1, verbose=0)
from pipeline.net.augment import HistogramEqualization
flat = x["image"][0].ravel()
inside = np.sort(flat[(flat > 0) & (flat < 255)])
below, upto = (np.searchsorted(inside, flat, side=s) for s in ("left", "right"))
want = np.where(flat == 0, -1.0, np.where(flat == 255, 1.0, (below + 0.5 * (upto - below)) / len(inside) * 2 - 1))
import jax
equalize = HistogramEqualization()
got = np.asarray(jax.jit(lambda t: equalize(t))(x["image"].astype("float32") / 255))  # XLA under JAX
assert np.allclose(got[0].ravel(), want, atol=1e-6)
e = build_model(ModelConfig(blocks=2, filters=4, stem_filters=4, dense_units=0, equalize=True), aug, 32)
e.compile(optimizer="adam", loss="binary_crossentropy")  # jit_compile="auto": XLA under JAX
e.fit(x, np.zeros(4, "float32"), epochs=1, verbose=0)
print("jax ok")
"""


def test_robust_recipe_model_runs_under_jax():
    pytest.importorskip("jax")
    env = repo_env(KERAS_BACKEND="jax")
    run = subprocess.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "jax ok" in run.stdout, run.stderr[-3000:]


def test_held_out_families_are_checked_before_training():
    from pipeline.config import ConfigError

    shift.check_held_out(["jpeg", "zoom_out"])
    with pytest.raises(ConfigError, match=r"unknown family 'jpg' \(known: exposure, gamma"):
        shift.check_held_out(["jpg"])
    with pytest.raises(ConfigError, match="nothing would be left to select on"):
        shift.check_held_out(list(shift.FAMILIES))
    assert shift.family("zoom_out_0.85") == "zoom_out" and "zoom_out" in shift.FAMILIES


def test_the_proxy_ranks_selection_metrics_by_how_they_predict_the_held_out_families():
    """Constructed trials: the battery mean tracks the held-out AUC, validation AUC does not."""
    from pipeline.study import proxy

    rng = np.random.default_rng(0)
    held = rng.uniform(0.85, 0.95, 12)
    trials = [{"val_auc_heldout_mean": h, "val_auc_shift_mean": h + rng.normal(0, 0.004),
               "final_val_auc": 0.99 + rng.normal(0, 0.003), "final_val_loss": 1.0 - h + rng.normal(0, 0.02)}
              for h in held]
    rows = proxy.correlations(trials)
    by = {r.metric: r for r in rows}
    assert rows[0].metric == "val_auc_shift_mean" and by["val_auc_shift_mean"].rho > 0.9
    assert by["val_auc_shift_mean"].low > 0.5 and by["val_auc_shift_mean"].n == 12
    assert abs(by["val_auc"].rho) < 0.7 and by["val_auc"].low < 0 < by["val_auc"].high
    assert by["val_loss"].rho > 0  # lower loss with higher held-out AUC: signed so that higher is better
    assert by["val_auc_shift_min"].n == 0 and math.isnan(by["val_auc_shift_min"].rho)  # not logged: no number
    from scipy.stats import spearmanr

    assert by["val_auc"].rho == pytest.approx(spearmanr([t["final_val_auc"] for t in trials], held)[0])


def test_correlations_pool_over_studies_by_their_fisher_z():
    """Two independent studies: the pooled rho is the inverse-variance mean of their Fisher z (Bonett-Wright
    variances), narrower than either; a study without a finite rho for a metric does not enter."""
    from pipeline.study import proxy

    a = [proxy.Correlation("val_loss", 0.6, 0, 0, 0, 9), proxy.Correlation("val_auc", math.nan, 0, 0, 0, 0)]
    b = [proxy.Correlation("val_loss", 0.2, 0, 0, 0, 23), proxy.Correlation("val_auc", 0.5, 0.1, 0.8, 0.02, 12)]
    rows = {r.metric: r for r in proxy.pooled([a, b])}
    wa, wb = 6 / (1 + 0.36 / 2), 20 / (1 + 0.04 / 2)
    z = (wa * math.atanh(0.6) + wb * math.atanh(0.2)) / (wa + wb)
    assert rows["val_loss"].rho == pytest.approx(math.tanh(z)) and rows["val_loss"].n == 32
    half = 1.959964 / math.sqrt(wa + wb)
    assert (rows["val_loss"].low, rows["val_loss"].high) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    assert 0.2 < rows["val_loss"].rho < 0.6  # between the two, nearer the larger study
    assert rows["val_auc"].rho == pytest.approx(0.5) and rows["val_auc"].n == 12  # study a had none
    assert math.isnan(rows["val_auc_shift_min"].rho)  # no study had it


def test_the_stored_threshold_is_read_on_the_held_out_families_only():
    """val_heldout_sensitivity / _specificity / _accuracy: the raw-scale threshold applied to each held-out
    perturbation's probabilities, averaged over them; the selection perturbations do not enter."""
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    probs = {"jpeg_30": np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.1, 0.6, 0.1]),  # sens 3/4, spec 3/4
             "gamma_0.6": np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6, 0.1, 0.1]),  # sens 1, spec 1/2
             "blur_1": np.zeros(8)}  # a selection family: would drag sensitivity to 0 if it counted
    r = shift.ShiftResult(labels=y, clean=np.full(8, 0.5), probabilities=probs, held_out=("jpeg", "gamma"))
    got = r.held_out_operating(0.5)
    assert got == pytest.approx({"val_heldout_sensitivity": 0.875, "val_heldout_specificity": 0.625,
                                 "val_heldout_accuracy": 0.75})
    assert r.held_out_operating(0.95)["val_heldout_sensitivity"] == 0.0  # nothing called at a higher threshold
    assert shift.ShiftResult(labels=y, clean=y, probabilities=probs).held_out_operating(0.5) == {}


def test_operating_points_and_which_side_each_family_costs():
    """`ShiftResult.operating`: sensitivity and specificity at a threshold on clean and under each perturbation
    (through `calibrate` when given); `proxy.directions`: per family, the mean change from clean, the family
    costing most specificity first, and the table names the side each one loses."""
    from pipeline.study import proxy

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    clean = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.1, 0.1])  # sens 3/4, spec 1 at 0.5
    probs = {"exposure_0.6": clean + 0.45,  # every score up: sens 1, spec 0
             "exposure_1.25": clean - 0.35,  # every score down: sens 1/4 (only 0.9 - 0.35 is called), spec 1
             "jpeg_30": clean.copy(),  # unchanged
             # one normal film pushed over: spec 3/4. Sorts before exposure by name, after it by specificity.
             "blur_1": np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.1, 0.1, 0.1])}
    aucs = {"exposure_0.6": 0.8, "exposure_1.25": 0.9, "jpeg_30": 0.95, "blur_1": 0.97}
    r = shift.ShiftResult(labels=y, clean=clean, probabilities=probs, auc=aucs, held_out=("jpeg",))
    at = r.operating(0.5)
    assert at["clean"] == (0.75, 1.0) and at["exposure_0.6"] == (1.0, 0.0) and at["exposure_1.25"] == (0.25, 1.0)
    assert r.operating(0.25, calibrate=lambda p: p / 2)["clean"] == (0.75, 1.0)  # 0.25 on the halved scale
    rows = proxy.directions(r, at)
    assert [(d.family, d.held_out) for d in rows] == [("exposure", False), ("blur", False), ("jpeg", True)]
    assert (rows[0].auc, rows[0].d_sensitivity, rows[0].d_specificity) == pytest.approx((0.85, -0.125, -0.5))
    assert (rows[1].auc, rows[1].d_sensitivity, rows[1].d_specificity) == pytest.approx((0.97, 0.0, -0.25))
    assert (rows[2].d_sensitivity, rows[2].d_specificity) == (0.0, 0.0)
    table = proxy.format_directions(rows, at["clean"], "v1").splitlines()
    assert table[2].split()[:2] == ["exposure", "0.8500"] and table[2].split()[-1] == "specificity"
    assert table[3].split()[-1] == "specificity" and table[4].split()[-3:] == ["neither", "(held", "out)"]
    assert table[-1] == "specificity_side=exposure,blur"
    pushed_down = shift.ShiftResult(labels=y, clean=clean, probabilities={"blur_1": clean - 0.35},
                                    auc={"blur_1": 0.9}, clean_auc=1.0)
    table = proxy.format_directions(proxy.directions(pushed_down, pushed_down.operating(0.5)), (0.75, 1.0), "v").splitlines()
    assert table[2].split()[-1] == "sensitivity" and table[-1] == "specificity_side=none"
    lines = shift.format_table(pushed_down, pushed_down.operating(0.5)).splitlines()
    assert lines[0].split() == ["condition", "AUC", "drop", "sens", "spec"]
    assert lines[1].split()[-2:] == ["0.750", "1.000"] and lines[2].split() == ["blur_1", "0.9000", "-0.1000",
                                                                               "0.250", "1.000"]
    assert shift.format_table(pushed_down).splitlines()[0].split() == ["condition", "AUC", "drop"]


def test_held_out_families_can_be_re_chosen_after_the_fact():
    """`proxy.retarget`: from each trial's AUC under every perturbation, the target is the mean over the newly
    held-out families and the battery's mean, worst and tail are over the rest; the original families give back
    the logged values; a trial lacking a perturbation is left out; an unknown family is a one-line ConfigError."""
    from pipeline.study import proxy

    names = [p.name for p in BATTERY]
    rng = np.random.default_rng(0)
    aucs = dict(zip(names, rng.uniform(0.9, 1.0, len(names)), strict=True))
    trial = {f"val_auc_shift/{n}": v for n, v in aucs.items()} | {"final_val_loss": 0.2}
    held = ("crop", "letterbox")
    one_short = {k: v for k, v in trial.items() if k != "val_auc_shift/crop_0.8"}  # every family, not every severity
    (got,) = proxy.retarget([trial, one_short, {"final_val_loss": 0.1, "val_auc_shift/crop_0.9": 0.9}], held)
    inside = [v for n, v in aucs.items() if shift.family(n) in held]
    rest = sorted(v for n, v in aucs.items() if shift.family(n) not in held)
    assert got[proxy.TARGET] == pytest.approx(np.mean(inside)) and len(inside) == 4
    assert got["val_auc_shift_mean"] == pytest.approx(np.mean(rest)) and got["val_auc_shift_min"] == min(rest)
    assert got["val_auc_shift_tail"] == pytest.approx(np.mean(rest[: math.ceil(len(rest) / 4)]))
    assert got["final_val_loss"] == 0.2
    logged = shift.ShiftResult(labels=np.array([0, 1]), clean=np.zeros(2), probabilities={}, auc=aucs,
                               held_out=("jpeg", "gamma", "letterbox", "zoom_out"))
    (same,) = proxy.retarget([trial], logged.held_out)
    assert same[proxy.TARGET] == pytest.approx(logged.metrics()["val_auc_heldout_mean"])
    assert same["val_auc_shift_tail"] == pytest.approx(logged.tail)
    with pytest.raises(ConfigError, match="unknown family 'glare'"):
        proxy.retarget([trial], ("glare",))
    with pytest.raises(ConfigError, match="no held-out family"):
        proxy.retarget([trial], ())


def test_generalization_study_mode_reads_the_trials_and_names_its_choice(tmp_path, capsys):
    """`benchmarks/generalization.py --study NAME` on a store holding a study's trial runs (no images read)."""

    from pipeline.artifact import tag_keys, tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.setup(uri)
    exp = tracking.ensure_experiment("s", uri)
    rng = np.random.default_rng(1)
    from mlflow.entities import Metric

    for i, held in enumerate(rng.uniform(0.8, 0.95, 6)):
        run = client.create_run(exp, tags={tag_keys.TRIAL_NUMBER: str(i), "state": "COMPLETE"})
        values = {"val_auc_heldout_mean": held, "val_auc_shift_mean": held + 0.001 * rng.random(),
                  "final_val_auc": 0.99 - 0.001 * rng.random(), "final_val_loss": 0.1 + 0.01 * i,
                  # every perturbation: crop tracks val_loss's order (lower loss, higher AUC), the rest is noise
                  **{f"val_auc_shift/{p.name}": (0.99 - 0.01 * i if p.kind == "crop" else rng.uniform(0.9, 1.0))
                     for p in BATTERY}}
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()])
    pruned = client.create_run(exp, tags={tag_keys.TRIAL_NUMBER: "9", "state": "PRUNED"})
    client.log_metric(pruned.info.run_id, "val_auc_heldout_mean", 0.5)  # not a finished trial: left out
    module = load_benchmark("generalization")
    assert module.main(["--study", "s", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("proxy_choice=val_auc_shift_mean spearman=")
    assert any(line.startswith("val_auc ") and line.rstrip().endswith("6") for line in out)
    assert module.main(["--study", "nosuch", "--tracking-uri", uri]) == 2
    assert "needs at least 4" in capsys.readouterr().err
    assert module.main(["--study", "s", "--tracking-uri", uri, "--held-out", "crop,glare"]) == 2
    assert capsys.readouterr().err.startswith("error: --held-out: train.shift_held_out: unknown family 'glare'")
    assert module.main(["--study", "s", "--tracking-uri", uri, "--held-out", ""]) == 2
    assert "no held-out family" in capsys.readouterr().err
    assert module.main(["--tracking-uri", uri, "--held-out", "crop"]) == 2  # needs --study
    assert "--held-out goes with --study" in capsys.readouterr().err
    assert module.main(["--study", "s", "--tracking-uri", uri, "--held-out", "crop"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("held-out families re-chosen after the fact: crop")
    loss = next(line for line in out if line.startswith("val_loss "))
    assert loss.split()[1] == "+1.000" and out[-1] == "proxy_choice=val_loss spearman=1.000"
