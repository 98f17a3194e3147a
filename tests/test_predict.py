"""`pneumo predict`: a row per file, bad files reported, out-of-scope headers guarded, and the same
probabilities as `pneumo evaluate` on the same images."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest

pytest_plugins = ["fixtures_registry"]
MODEL, META_MODEL, STUDY = "pneumonia-cnn", "pneumonia-cnn-meta", "regstudy"  # as in fixtures_registry
pytestmark = pytest.mark.slow


def _test_patients(data) -> list[str]:
    with open(data / "splits.csv") as f:
        return [r["patient_id"] for r in csv.DictReader(f) if r["split"] == "test"]


def _dicom(store, pid):
    return store.raw / "stage_2_train_images" / f"{pid}.dcm"


@pytest.fixture()
def folder(registry_store, tmp_path):
    """5 good DICOMs (one in a subfolder), a truncated one, a CT by its header, and a text file."""
    s = registry_store
    pids = _test_patients(s.data)[:6]
    root = tmp_path / "incoming"
    (root / "nested").mkdir(parents=True)
    for pid in pids[:4]:
        shutil.copy(_dicom(s, pid), root / f"{pid}.dcm")
    shutil.copy(_dicom(s, pids[4]), root / "nested" / f"{pids[4]}.dcm")
    (root / "corrupt.dcm").write_bytes(_dicom(s, pids[5]).read_bytes()[:400])
    ds = pydicom.dcmread(_dicom(s, pids[5]))
    ds.Modality = "CT"
    ds.save_as(root / "ct.dcm")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_with_a_corrupt_file_gets_a_row_per_file(registry_store, folder, tmp_path, capsys):
    from pipeline.cli import main

    s = registry_store
    v = s.versions[1]
    out = tmp_path / "out" / "predictions.csv"
    code = main(["predict", str(folder), "--model", f"models:/{MODEL}/{v}", "--out", str(out),
                 "--tracking-uri", s.uri, "--with-patient-id"])
    err = capsys.readouterr().err
    assert code == 2  # a file failed: non-zero, after writing every row
    assert "predicted 5 of 7 files" in err and "1 skipped as out of scope" in err and "1 failed to read" in err
    assert "pneumo predict: error: 1 of 7 files could not be read" in err
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df.columns) == ["path", "patient_id", "probability", "prediction", "model_version",
                                "dataset_digest", "status", "warning", "error"]
    assert len(df) == 7 and not any(p.endswith("notes.txt") for p in df["path"])
    assert any("nested" in p for p in df["path"])  # folders are read recursively
    rows = {p.rsplit("/", 1)[-1]: r for p, r in zip(df["path"], df.to_dict("records"), strict=True)}
    bad = rows["corrupt.dcm"]
    assert bad["status"] == "error" and bad["error"] and bad["probability"] == ""
    ct = rows["ct.dcm"]
    assert ct["status"] == "skipped" and "Modality CT is not a radiograph" in ct["warning"]
    assert ct["probability"] == "" and ct["prediction"] == ""
    good = df[df["status"] == "ok"]
    assert len(good) == 5
    # Each probability is the model's own output for that file (decoded at its input size), calibrated with
    # the version's temperature: what the CSV says is what the network says.
    np.testing.assert_allclose(good["probability"].astype(float), _model_output(s, v, good["path"]), atol=2e-6)
    threshold = _threshold(s, v)
    assert ((good["probability"].astype(float) >= threshold).astype(int) == good["prediction"].astype(int)).all()
    digest = json.loads((s.data / "manifest.json").read_text())["digest"]
    assert (good["model_version"].astype(str) == v).all() and (good["dataset_digest"] == digest).all()
    assert all(pid == p.rsplit("/", 1)[-1].removesuffix(".dcm") for pid, p in zip(good["patient_id"],
                                                                                   good["path"], strict=True))
    # --force predicts the out-of-scope file anyway and keeps its warning.
    code = main(["predict", str(folder / "ct.dcm"), "--model", f"models:/{MODEL}/{v}", "--out", str(out),
                 "--force", "--tracking-uri", s.uri])
    assert code == 0
    forced = pd.read_csv(out, keep_default_na=False).iloc[0]
    assert forced["status"] == "ok" and forced["warning"]
    assert float(forced["probability"]) == pytest.approx(_model_output(s, v, [folder / "ct.dcm"])[0], abs=2e-6)


def _model_output(store, version, paths) -> np.ndarray:
    """The registered Keras model's prediction for these DICOMs, through `model.predict` (not predict's
    batching), with the version's temperature applied (T=1 when the version has no temperature tag)."""
    from pipeline.artifact.model_store import load
    from pipeline.data.dicom import read_dicom

    lm = load(f"models:/{MODEL}/{version}", store.uri)
    assert lm.temperature == float(lm.tags.get("temperature", 1.0))
    images = np.stack([read_dicom(p, lm.image_size).pixels[..., None] for p in paths])
    raw = lm.model.predict({"image": images}, verbose=0).reshape(-1)
    return lm.calibrate(raw)


def _threshold(store, version) -> float:
    from mlflow import MlflowClient

    return float(MlflowClient(store.uri, store.uri).get_model_version(MODEL, version).tags["threshold"])


@pytest.mark.parametrize("which", ["champion", "meta"])
def test_probabilities_equal_pneumo_evaluate(registry_store, tmp_path, which):
    """Every test-split DICOM through `predict` gets the probability its record gets from `evaluate`
    (the default model URI is the champion; the meta model also feeds view, sex and age)."""
    from mlflow import MlflowClient

    from pipeline.evaluate.scoring import evaluate_model
    from pipeline.predict import run_predict

    s = registry_store
    if which == "champion":
        MlflowClient(s.uri, s.uri).set_registered_model_alias(MODEL, "champion", s.versions[2])
        uri, model_arg = f"models:/{MODEL}@champion", None
    else:
        uri = model_arg = f"models:/{META_MODEL}/{s.meta_version}"
    files = [str(_dicom(s, pid)) for pid in _test_patients(s.data)]
    out = tmp_path / "p.csv"
    result = run_predict(files, model_arg, str(out), tracking_uri=s.uri, batch_size=16, with_patient_id=True)
    assert result["failed"] == 0
    df = pd.read_csv(out, dtype={"patient_id": str})
    report = evaluate_model(uri, s.data, "test", tracking_uri=s.uri, out=tmp_path / "eval.json", n_boot=10)
    expected = dict(zip(report["patient_id"], report["probabilities"], strict=True))
    assert len(df) == len(expected) == report["metrics"]["n"]
    got = np.array([expected[p] for p in df["patient_id"]])
    np.testing.assert_allclose(df["probability"].to_numpy(), got, atol=2e-6)  # CSV keeps 6 decimals
    # ... and the same decisions at the same stored threshold.
    threshold = report["metrics"]["threshold"]
    assert (df["prediction"].to_numpy() == (got >= threshold).astype(int)).all()


def test_predict_reports_a_missing_path_and_a_model_without_champion(registry_store, tmp_path, capsys):
    from pipeline.cli import main

    s = registry_store
    assert main(["predict", str(tmp_path / "missing.dcm"), "--tracking-uri", s.uri]) == 2
    assert "missing.dcm: no such file or folder" in capsys.readouterr().err
    one = _dicom(s, _test_patients(s.data)[0])
    assert main(["predict", str(one), "--tracking-uri", s.uri]) == 2  # no champion in this store yet
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pneumo predict: error: model models:/pneumonia-cnn@champion")


def test_csv_to_stdout_when_piped(registry_store, capsys):
    from pipeline.predict import run_predict

    s = registry_store
    files = [str(_dicom(s, pid)) for pid in _test_patients(s.data)[:3]]
    run_predict(files, f"models:/{MODEL}/{s.versions[0]}", None, tracking_uri=s.uri)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("path,probability,prediction")  # no PatientID unless asked
    rows = pd.read_csv(io.StringIO(out))
    assert list(rows["path"]) == files and "patient_id" not in rows  # one row per file, in order
    np.testing.assert_allclose(rows["probability"], _model_output(s, s.versions[0], files), atol=2e-6)  # 6 decimals


def test_every_formula_start_is_escaped_and_nothing_else_is():
    """csv_text, the writer behind every predictions CSV: each character a spreadsheet reads as a formula start
    gets the apostrophe; plain text and numbers (a negative one included) are written as they are; a line break
    inside a cell (a file name can hold one) stays in its cell, so no row starts with an unchecked fragment."""
    from pipeline.predict import csv_text

    cells = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "PAT-7", "a=b", "/in/a\r=1+1.dcm", "/in/b\n@x.dcm"]
    df = pd.DataFrame({"patient_id": cells, "score": [-0.5] * len(cells), "prediction": [1] * len(cells)})
    back = pd.read_csv(io.StringIO(csv_text(df)), keep_default_na=False)
    assert list(back["patient_id"]) == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "PAT-7", "a=b",
                                        "/in/a\r=1+1.dcm", "/in/b\n@x.dcm"]
    assert list(back["score"]) == [-0.5] * len(cells) and list(back["prediction"]) == [1] * len(cells)


def test_a_patient_id_that_looks_like_a_formula_is_written_as_text(registry_store, tmp_path):
    """CSV injection: a PatientID from outside starting with =, +, - or @ would run as a formula in a spreadsheet;
    the CSV cell starts with an apostrophe instead (numbers are untouched)."""
    from pipeline.cli import main

    s = registry_store
    pid = sorted(p.stem for p in (s.raw / "stage_2_train_images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(_dicom(s, pid))
    ds.PatientID = '=HYPERLINK("http://example.invalid","x")'
    folder = tmp_path / "in"
    folder.mkdir()
    ds.save_as(folder / "f.dcm")
    out = tmp_path / "p.csv"
    assert main(["predict", str(folder), "--model", f"models:/{MODEL}/{s.versions[0]}", "--out", str(out),
                 "--tracking-uri", s.uri, "--with-patient-id"]) == 0
    row = next(csv.DictReader(out.open()))
    assert row["patient_id"] == "'" + ds.PatientID and float(row["probability"]) > 0
