"""Ensembles: the output is the mean of the members' outputs, mixed members are refused, and
`pneumo promote --ensemble 2` registers one calibrated version that predict and Grad-CAM work with."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.conftest import load_benchmark

pytest_plugins = ["fixtures_registry"]
MODEL, META_MODEL, STUDY = "pneumonia-cnn", "pneumonia-cnn-meta", "regstudy"  # as in fixtures_registry
pytestmark = pytest.mark.slow


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


def _val_images(data, n: int = 40):
    from pipeline.data.tfdata import eval_dataset

    features, _ = next(iter(eval_dataset(data, "val", n, with_meta=True)))
    return features["image"].numpy(), features["meta"].numpy()


def _raw(model, inputs) -> np.ndarray:
    return np.asarray(model.predict_on_batch(inputs), dtype=np.float64).reshape(-1)


def test_ensemble_output_is_the_mean_of_its_members(registry_store):
    from pipeline.artifact.model_store import load_keras, model_uses_meta
    from pipeline.artifact.tracking import setup
    from pipeline.promote.ensemble import build_model

    s = registry_store
    setup(s.uri)
    members = [load_keras(f"models:/{MODEL}/{v}") for v in s.versions]
    ensemble = build_model(members, list(s.versions))
    images, _ = _val_images(s.data)
    each = np.stack([_raw(m, {"image": images}) for m in members])
    assert np.ptp(each, axis=0).max() > 1e-3  # the members disagree: the mean is not any one of them
    assert _raw(ensemble, {"image": images}) == pytest.approx(each.mean(axis=0), abs=1e-6)
    assert [t.name.split(":")[0] for t in ensemble.inputs] == ["image"] and not model_uses_meta(ensemble)


def test_mixed_members_are_refused(registry_store):
    from pipeline.artifact.model_store import load_keras
    from pipeline.artifact.tracking import setup
    from pipeline.config import Config
    from pipeline.net.model import build_model as build_cnn
    from pipeline.promote.ensemble import EnsembleError, build_model

    s = registry_store
    setup(s.uri)
    plain = load_keras(f"models:/{MODEL}/{s.versions[0]}")
    with_meta = load_keras(f"models:/{META_MODEL}/{s.meta_version}")
    with pytest.raises(EnsembleError, match=r"mixed members: v2 take metadata inputs"):
        build_model([plain, with_meta], ["1", "2"])
    small = build_cnn(Config(name="x").model, Config(name="x").augment, 32, seed=0)
    with pytest.raises(EnsembleError, match=r"different image sizes \(v1: 64 px, v2: 32 px\)"):
        build_model([plain, small], ["1", "2"])
    with pytest.raises(EnsembleError, match="at least 2 members"):
        build_model([plain], ["1"])
    # Two metadata models make a metadata ensemble: the same signature as its members, the mean output.
    pair = build_model([with_meta, with_meta], ["a", "b"])
    images, meta = _val_images(s.data, 8)
    assert _raw(pair, {"image": images, "meta": meta}) == pytest.approx(
        _raw(with_meta, {"image": images, "meta": meta}), abs=1e-6)


def test_promote_ensemble_registers_one_calibrated_version_that_predicts(registry_store, tmp_path, capsys):
    from pipeline.artifact.model_store import load_keras
    from pipeline.cli import main
    from pipeline.net.calibration import apply_temperature
    from pipeline.predict import run_predict
    from pipeline.promote.ensemble import select_members

    s = registry_store
    client = _client(s.uri)
    before = {mv.version for mv in client.search_model_versions(f"name='{MODEL}'")}
    top2 = sorted(s.versions, key=lambda v: (-s.val_auc[v], -int(v)))[:2]

    # The tiny synthetic models cannot clear the real floor (AUC lower bound 0.7): gate on the point estimate,
    # as tests/test_registry.py does; --log-images: synthetic data, so the Grad-CAM grid may be logged.
    rule = tmp_path / "promote.toml"
    rule.write_text("[promote]\nalpha = 0.999\nfloor_auc = 0.0\nfloor_accuracy_margin = -1.0\nbootstrap = 200\n")
    code = main(["promote", "--study", STUDY, "--ensemble", "2", "--tracking-uri", s.uri, "--config", str(rule),
                 "--log-images"])
    out = capsys.readouterr().out
    assert code == 0, out
    after = {mv.version: mv for mv in client.search_model_versions(f"name='{MODEL}'")}
    (new,) = set(after) - before  # exactly one new version
    tags = after[new].tags
    assert tags["ensemble_members"] == ",".join(top2)
    digest = client.get_model_version(MODEL, s.versions[0]).tags["dataset_digest"]
    assert tags["dataset_digest"] == digest and tags["study"] == STUDY
    t, threshold = float(tags["temperature"]), float(tags["threshold"])
    assert 0.05 < t < 20 and 0 < threshold < 1 and float(tags["val_auc"]) > 0.5
    assert f"ensemble   v{new}: mean probability of v{top2[0]}" in out and f"candidate  {MODEL} v{new}" in out

    # Logged in the study's experiment, members listed, metrics on validation.
    run = client.get_run(tags["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == STUDY
    assert run.data.params["ensemble.members"] == ",".join(top2)
    # Its calibration was fitted on validation: the temperature minimises the ensemble's validation NLL (it
    # need not lower ECE: temperature scaling optimises NLL; the ECE drop on a deliberately over-confident
    # model is tests/test_calibration.py's), and the logged ECEs are those of its raw and calibrated outputs.
    from pipeline.evaluate.scoring import predict_split
    from pipeline.net.calibration import expected_calibration_error, fit_temperature

    yv, pv, _ = predict_split(load_keras(f"models:/{MODEL}/{new}"), s.data, "val")
    assert t == pytest.approx(fit_temperature(yv, pv), rel=1e-3)
    assert run.data.metrics["val_ece"] == pytest.approx(expected_calibration_error(yv, pv), abs=1e-6)
    assert run.data.metrics["val_ece_calibrated"] == pytest.approx(
        expected_calibration_error(yv, apply_temperature(pv, t)), abs=1e-6)
    assert run.data.metrics["final_val_auc"] == pytest.approx(float(tags["val_auc"]), abs=1e-6)
    # Ranked by the study's own metric (no --metric given), thresholded by the members' policy (Youden in the
    # smoke recipe): decided on raw validation probabilities and moved onto the calibrated scale.
    from pipeline.evaluate.metrics import choose_threshold

    assert run.data.params["ensemble.metric"] == "val_auc" and run.data.tags["threshold_policy"].startswith("youden")
    assert threshold == pytest.approx(float(apply_temperature(choose_threshold(yv, pv), t)), abs=1e-9)

    # The gate treated it like any candidate: no champion yet, so it was promoted, with its card.
    assert "PROMOTED" in out
    mv = client.get_model_version(MODEL, new)
    assert f"ensemble of versions (mean probability): {','.join(top2)}" in mv.description
    assert "pointing_game" in mv.tags  # Grad-CAM ran on the ensemble after the promotion

    # Predict with it: the calibrated mean of the members' probabilities.
    with open(s.data / "splits.csv") as f:
        pids = [r["patient_id"] for r in csv.DictReader(f) if r["split"] == "test"][:5]
    dicoms = [str(s.raw / "stage_2_train_images" / f"{pid}.dcm") for pid in pids]
    df = run_predict(dicoms, f"models:/{MODEL}/{new}", str(tmp_path / "p.csv"), tracking_uri=s.uri)["frame"]
    from pipeline.data.dicom import read_dicom

    images = np.stack([read_dicom(d, 64).pixels for d in dicoms])[..., None]
    mean = np.mean([_raw(load_keras(f"models:/{MODEL}/{v}"), {"image": images}) for v in top2], axis=0)
    assert df["probability"].to_numpy() == pytest.approx(apply_temperature(mean, t), abs=1e-6)
    assert list(df["model_version"].astype(str)) == [str(new)] * len(dicoms)

    # A later ensemble is built from single models only, never from this one.
    chosen, _ = select_members(client, MODEL, STUDY, 3, "val_auc")
    assert new not in [c.version for c in chosen] and len(chosen) == 3


def test_members_within_the_better_half_by_another_metric(registry_store, capsys):
    """`within="val_loss"`: members ranked by the battery mean come from the better half by validation loss
    only (max(k, ceil(n / 2)) of the n versions), so the best-ranked but worst-calibrated version stays out; a
    version without the metric is not eligible; too few eligible is a one-line refusal."""
    from pipeline.promote.ensemble import EnsembleError, select_members

    s = registry_store
    client = _client(s.uri)
    a, b, c = s.versions
    for version, loss, mean in ((a, 0.10, 0.970), (b, 0.12, 0.980), (c, 0.40, 0.990)):
        client.set_model_version_tag(MODEL, version, "val_loss", str(loss))
        client.set_model_version_tag(MODEL, version, "val_auc_shift_mean", str(mean))
    by_mean = [m.version for m in select_members(client, MODEL, STUDY, 2, "val_auc_shift_mean")[0]]
    assert by_mean == [c, b]
    within = [m.version for m in select_members(client, MODEL, STUDY, 2, "val_auc_shift_mean", within="val_loss")[0]]
    assert within == [b, a]  # c, the best by the mean, has the worst loss: out of the better half (2 of 3)
    assert [m.version for m in select_members(client, MODEL, STUDY, 1, "val_auc_shift_mean", single=True,
                                              within="val_loss")[0]] == [b]  # the half is 2 even for k = 1
    everyone = select_members(client, MODEL, STUDY, 3, "val_auc_shift_mean", within="val_loss")[0]
    assert [m.version for m in everyone] == [c, b, a]  # k = 3 of 3: the half is at least k
    for version in (b, c):  # a version without the metric (tag or run metric) is not eligible: a has none
        client.set_model_version_tag(MODEL, version, "calibration_loss", "0.2")
    with pytest.raises(EnsembleError, match=r"only 2 ranked version\(s\) .* in the better half by calibration_loss"):
        select_members(client, MODEL, STUDY, 3, "val_auc_shift_mean", within="calibration_loss")

    module = load_benchmark("generalization")
    assert module.main(["--candidates", "--versions", f"{a},{b}", "--within", "val_loss", "--tracking-uri", s.uri]) == 2
    assert "--within goes with --candidates and one --study" in capsys.readouterr().err


def test_promote_ensemble_refusals(registry_store, capsys):
    from pipeline.cli import main

    s = registry_store
    cases = [
        (["--study", STUDY, "--ensemble", "4"], "--ensemble 4: study 'regstudy' has only 3 ranked version(s)"),
        (["--ensemble", "2"], "--ensemble and --tta need --study"),
        (["--study", STUDY, "--ensemble", "2", "--dry-run"], "cannot go with --dry-run"),
        # checked before the ensemble is built and registered, not after
        (["--study", STUDY, "--ensemble", "2", "--config", "no-such.toml"], "no-such.toml: experiment file not found"),
        (["--study", STUDY, "--ensemble", "2", "--set", "promote.alpha=0.1"], "--set needs --config"),
    ]
    for args, reason in cases:
        assert main(["promote", *args, "--tracking-uri", s.uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pneumo promote: error: ") and reason in err[0], err
    assert len(_client(s.uri).search_model_versions(f"name='{MODEL}'")) == 3  # nothing was registered


def test_the_experiment_file_sets_the_ensemble_and_the_command_line_overrides_it(registry_store, tmp_path, capsys):
    """`[promote] ensemble = 2`: a plain `promote --study` builds and gates the top-2 ensemble; `--ensemble 1`
    gates the best single version; a dry run gates a single version and says the ensemble was not built."""
    from pipeline.cli import main

    s = registry_store
    client = _client(s.uri)
    rule = tmp_path / "promote.toml"
    rule.write_text("[promote]\nalpha = 0.999\nfloor_auc = 0.0\nfloor_accuracy_margin = -1.0\nbootstrap = 200\n"
                    "ensemble = 2\n")
    args = ["promote", "--study", STUDY, "--tracking-uri", s.uri, "--config", str(rule)]

    def versions() -> set[str]:
        return {mv.version for mv in client.search_model_versions(f"name='{MODEL}'")}

    before = versions()
    assert main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "[promote] ensemble = 2, tta = 'none' is not built with --dry-run" in captured.err and versions() == before
    assert main([*args, "--ensemble", "1"]) == 0
    assert versions() == before and "ensemble   v" not in capsys.readouterr().out  # the best single version
    assert main(args) == 0
    out = capsys.readouterr().out
    (new,) = versions() - before
    assert client.get_model_version(MODEL, new).tags["ensemble_members"].count(",") == 1  # two members
    assert f"ensemble   v{new}: mean probability of" in out and f"candidate  {MODEL} v{new}" in out


def test_test_time_views_wrap_the_candidate_that_predict_and_serving_score(registry_store, tmp_path, capsys):
    """`--tta mild`: alone, the best version under the views (K = 1); with `--ensemble 2`, the views around the
    members' mean. The registered model is that wrapper, calibrated on its own averaged validation output, and
    `pneumo predict` and the served pyfunc answer its probabilities."""
    import mlflow
    import pandas as pd

    from pipeline.artifact.model_store import load_keras
    from pipeline.cli import main
    from pipeline.net.calibration import apply_temperature
    from pipeline.net.tta import VIEWS, with_views
    from pipeline.promote.ensemble import build_model
    from pipeline.study.candidate import fit_calibration

    s = registry_store
    client = _client(s.uri)
    rule = tmp_path / "promote.toml"
    rule.write_text("[promote]\nalpha = 0.999\nfloor_auc = 0.0\nfloor_accuracy_margin = -1.0\nbootstrap = 200\n")
    images, _ = _val_images(s.data, 12)
    mlflow.set_tracking_uri(s.uri)
    for extra, k in (([], 1), (["--ensemble", "2"], 2)):
        before = {mv.version for mv in client.search_model_versions(f"name='{MODEL}'")}
        code = main(["promote", "--study", STUDY, "--tta", "mild", *extra, "--tracking-uri", s.uri,
                     "--config", str(rule)])
        assert code == 0, capsys.readouterr()
        assert "over the 'mild' test-time views" in capsys.readouterr().out
        (new,) = {mv.version for mv in client.search_model_versions(f"name='{MODEL}'")} - before
        tags = client.get_model_version(MODEL, new).tags
        members = tags["ensemble_members"].split(",")
        assert len(members) == k
        plain = [load_keras(f"models:/{MODEL}/{v}") for v in members]
        expected = with_views(build_model(plain) if k > 1 else plain[0], "mild")
        logged = load_keras(f"models:/{MODEL}/{new}")
        assert sum(type(layer).__name__ == "FixedAffine" for layer in logged.layers) == len(VIEWS["mild"])
        want = _raw(expected, {"image": images})
        assert np.abs(want - _raw(plain[0], {"image": images})).max() > 1e-6  # the views change the score
        np.testing.assert_allclose(_raw(logged, {"image": images}), want, atol=1e-6)
        # The temperature was fitted on the averaged validation output, not taken from a member.
        from pipeline.evaluate.scoring import predict_split

        yv, pv, _ = predict_split(expected, s.data, "val")
        t = float(tags["temperature"])
        assert t == pytest.approx(fit_calibration(yv, pv), rel=1e-3)
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{new}").predict(
            pd.DataFrame({"pixels": list(images[..., 0])}))
        np.testing.assert_allclose(served["probability"].to_numpy(float), apply_temperature(want, t), atol=1e-6)


def test_the_candidates_benchmark_validates_each_construction_and_registers_nothing(registry_store, capsys,
                                                                                   monkeypatch):
    """`benchmarks/generalization.py --candidates --versions a,b --tta mild`: one row per construction (each
    member, their mean, the best under the views, the mean under the views), each validated as promotion builds
    it: the mean's row is the mean model's validation AUC; nothing is registered or logged. Members trained
    with the robust policy (their recipe stood in for) add the leave-one-family-out threshold check."""
    from sklearn.metrics import roc_auc_score

    from pipeline.artifact.model_store import load_keras
    from pipeline.config import Config
    from pipeline.evaluate import shift
    from pipeline.evaluate.scoring import predict_split
    from pipeline.promote import ensemble
    from pipeline.promote.ensemble import build_model

    robust = Config().with_values({"train.threshold_policy": "robust", "train.robust_tail": 0.5,
                                   "train.robust_min_sensitivity": 0.9,
                                   "train.shift_held_out": ["jpeg"], "train.shift_max_images": 48})
    monkeypatch.setattr(ensemble, "members_recipe", lambda client, run_id: robust)

    s = registry_store
    client = _client(s.uri)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    module = load_benchmark("generalization")
    a, b = s.versions[0], s.versions[1]
    assert module.main(["--candidates", "--versions", f"{a},{b}", "--tta", "mild", "--tracking-uri", s.uri]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line[:18].strip(): line[18:].split() for line in out if line.startswith(("v", "mean"))}
    assert list(rows) == [f"v{a}", f"v{b}", "mean of 2", f"v{a} + tta", "mean of 2 + tta"]
    y, p, _ = predict_split(build_model([load_keras(f"models:/{MODEL}/{v}") for v in (a, b)]), s.data, "val")
    assert float(rows["mean of 2"][0]) == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert out[-1].startswith("candidate_choice=")
    families = out.index(next(line for line in out if line.startswith("does ")))
    assert out[families].startswith("does mean of 2 + tta's threshold (tail 0.5, min sens 0.9) hold on each")
    assert [line.split()[0] for line in out[families + 3:families + 3 + len(shift.FAMILIES)]].count("jpeg") == 1
    policies = [line for line in out if line.startswith("tail ")]
    assert len(policies) == 16 and sum("(stored)" in line for line in policies) == 1
    assert out[-2].startswith("threshold_policy_choice=tail:")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before
    assert module.main(["--candidates", "--versions", "99", "--tracking-uri", s.uri]) == 2
    assert "99: not ranked versions of" in capsys.readouterr().err


def test_the_ensemble_follows_its_members_threshold_policy(tmp_path):
    """members_recipe reads the policy a member was trained with from its run's params (strings in MLflow)."""
    from mlflow import MlflowClient

    from pipeline.promote.ensemble import members_recipe

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    for key, value in {"train.threshold_policy": "robust", "train.shift_max_images": "64", "train.shift_seed": "7",
                       "model.metadata_inputs": "True", "train.epochs": "3"}.items():
        client.log_param(run.info.run_id, key, value)
    recipe = members_recipe(client, run.info.run_id)
    assert (recipe.train.threshold_policy, recipe.train.shift_max_images, recipe.train.shift_seed) == ("robust", 64, 7)
    assert recipe.model.metadata_inputs is True
    bare = client.create_run(client.get_experiment_by_name("x").experiment_id)  # a run that logged no recipe
    assert members_recipe(client, bare.info.run_id).train.threshold_policy == "youden"  # the built-in default
