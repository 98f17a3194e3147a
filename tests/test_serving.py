"""The served champion (pipeline/artifact/serving.py): DICOM / PNG rows in, one answer per row out, in-process and through
a real `mlflow models serve` process; the same probabilities as `pneumo predict`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import urllib.request

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SHARED_DATA

pytest_plugins = ["fixtures_registry"]
MODEL = "pneumonia-cnn"
pytestmark = pytest.mark.slow
TEMPERATURE = 1.7  # a version tag the pyfunc must apply (not 1.0, so a skipped calibration shows)


def _real_dicom(store):
    """A real RSNA DICOM when ../shared/data is here, else a synthetic one (the reason is printed)."""
    folder = SHARED_DATA / "rsna" / "stage_2_train_images"
    files = sorted(folder.glob("*.dcm")) if folder.exists() else []
    if files:
        return files[0]
    print(f"real data absent ({folder}): using a synthetic DICOM")
    return sorted((store.raw / "stage_2_train_images").glob("*.dcm"))[0]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture()
def champion(registry_store):
    """The store with @champion on version 3, carrying a threshold and a temperature tag as promotion sets."""
    from mlflow import MlflowClient

    s = registry_store
    client = MlflowClient(s.uri, s.uri)
    v = s.versions[2]
    client.set_registered_model_alias(MODEL, "champion", v)
    client.set_model_version_tag(MODEL, v, "temperature", str(TEMPERATURE))
    return s, v


@pytest.fixture()
def rows(champion, tmp_path):
    """A real DICOM, the same file truncated, a CT by its header, bad base64, and a PNG."""
    from PIL import Image

    s, _ = champion
    real = _real_dicom(s)
    ds = pydicom.dcmread(real)
    ds.Modality = "CT"
    ct = tmp_path / "ct.dcm"
    ds.save_as(ct)
    png = io.BytesIO()
    ramp = np.add.outer(np.arange(80), np.arange(100)).astype(np.uint8)
    Image.fromarray(ramp).save(png, format="PNG")
    (tmp_path / "x.png").write_bytes(png.getvalue())
    data = real.read_bytes()
    return {"real": real, "png": tmp_path / "x.png", "records": [
        {"dicom": _b64(data)},
        {"dicom": _b64(data[:400])},
        {"dicom": _b64(ct.read_bytes())},
        {"dicom": "%%% not base64"},
        {"image": _b64(png.getvalue())},
    ]}


def _expected(uri: str, tracking_uri: str, real, png):
    """Probabilities computed the long way: the Keras model, the converter's decoder, the version's tags."""
    from pipeline.artifact.model_store import load
    from pipeline.data.dicom import load_image_file, read_dicom
    from pipeline.net.calibration import apply_temperature

    lm = load(uri, tracking_uri)
    size = lm.image_size
    images = np.stack([read_dicom(real, size).pixels, load_image_file(png, size)])[..., None]
    raw = np.asarray(lm.model.predict_on_batch({"image": images})).reshape(-1)
    return lm, apply_temperature(raw, TEMPERATURE)


def test_pyfunc_answers_every_row(champion, rows):
    import mlflow

    from pipeline.artifact import tracking

    s, v = champion
    tracking.setup(s.uri)
    uri = f"models:/{MODEL}@champion"
    served = mlflow.pyfunc.load_model(uri)
    out = served.predict(pd.DataFrame(rows["records"]))
    assert list(out.columns) == ["probability", "prediction", "model_version", "status", "error"]
    assert list(out["status"]) == ["ok", "error", "out_of_scope", "error", "ok"]
    assert (out["model_version"] == v).all()
    assert out.loc[1, "error"].startswith("dicom: ") and out.loc[3, "error"] == "dicom: not valid base64"
    assert "Modality CT is not a radiograph" in out.loc[2, "error"]
    assert out.loc[[1, 2, 3], "probability"].isna().all() and out.loc[[1, 2, 3], "prediction"].isna().all()

    lm, want = _expected(uri, s.uri, rows["real"], rows["png"])
    assert lm.temperature == TEMPERATURE  # the version's tag, as the pyfunc read it
    np.testing.assert_allclose(out.loc[[0, 4], "probability"].to_numpy(float), want, rtol=1e-5, atol=1e-6)
    assert list(out.loc[[0, 4], "prediction"]) == [int(p >= lm.threshold) for p in want]

    # Raw tensors for callers that preprocess themselves: the same calibrated answer.
    from pipeline.data.dicom import read_dicom

    pixels = read_dicom(rows["real"], lm.image_size).pixels[None, :, :, None]
    tensor = served.predict({"image": pixels})
    assert list(tensor["status"]) == ["ok"]
    assert tensor.loc[0, "probability"] == pytest.approx(out.loc[0, "probability"], rel=1e-5)
    with pytest.raises(Exception, match=r"must be \(B, 64, 64, 1\)"):
        served.predict({"image": np.zeros((1, 32, 32, 1), np.uint8)})


def test_load_keras_returns_the_inner_network(registry_store):
    """predict/explain/evaluate still get a Keras model out of the pyfunc."""
    import keras

    from pipeline.artifact import tracking
    from pipeline.artifact.model_store import load_keras

    tracking.setup(registry_store.uri)
    m = load_keras(f"models:/{MODEL}/{registry_store.versions[0]}")
    assert isinstance(m, keras.Model) and m.inputs[0].shape[1:] == (64, 64, 1)


class _ModelServer:
    """`mlflow models serve` in its own process group (pipeline.ui.ManagedServer waits on /ping)."""

    def __new__(cls, uri: str, tracking_uri: str, log):
        from pipeline.ui import ManagedServer

        class Server(ManagedServer):
            name = "mlflow models serve"
            health_path = "/ping"

            def command(self):
                return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                        "-h", self.host, "-p", str(self.port), "-w", "1"]

            def env(self):
                # Both URIs: an earlier test's `mlflow.set_registry_uri` may have left another store in the env.
                # MLflow execs `uvicorn` by name: the venv's bin first on PATH, as an activated venv has it.
                path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
                return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
                        "TF_CPP_MIN_LOG_LEVEL": "2"}

        return Server(startup_timeout=300, log_file=log)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_a_dicom_post_like_pneumo_predict(champion, rows, tmp_path):
    from pipeline.cli import main

    s, v = champion
    real = rows["real"]
    server = _ModelServer(f"models:/{MODEL}@champion", s.uri, tmp_path / "serve.log")
    try:
        server.start()
        status, body = _post(server.url, {"dataframe_records": rows["records"][:2]})
        assert status == 200, body
        answers = body["predictions"]
        assert [a["status"] for a in answers] == ["ok", "error"]
        assert answers[0]["model_version"] == v and answers[1]["error"].startswith("dicom: ")
        assert answers[1]["probability"] is None
        split = {"columns": ["dicom"], "data": [[rows["records"][0]["dicom"]]]}
        status, body2 = _post(server.url, {"dataframe_split": split})
        assert status == 200 and body2["predictions"][0]["probability"] == pytest.approx(answers[0]["probability"])
    finally:
        server.stop()
    assert server.proc is None

    incoming = tmp_path / "in"
    incoming.mkdir()
    shutil.copy(real, incoming / real.name)
    csv = tmp_path / "p.csv"
    assert main(["predict", str(incoming), "--out", str(csv), "--tracking-uri", s.uri]) == 0
    cli = pd.read_csv(csv)
    assert cli.loc[0, "probability"] == pytest.approx(answers[0]["probability"], abs=2e-6)  # CSV keeps 6 digits
    assert int(cli.loc[0, "prediction"]) == answers[0]["prediction"]


def test_the_served_model_refuses_an_artifact_that_is_not_the_promoted_one(champion):
    """The tamper check predict/evaluate/explain get from model_store also guards the server: with the sha256
    promotion recorded, the pyfunc loads; with another one (the files changed since), it refuses to load."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.artifact import tag_keys, tracking
    from pipeline.artifact.integrity import ModelIntegrityError
    from pipeline.promote.promotion import model_sha256

    s, v = champion
    tracking.setup(s.uri)
    client = MlflowClient(s.uri, s.uri)
    client.set_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256, model_sha256(MODEL, v))  # as promotion records it
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert list(served.predict({"image": np.zeros((1, 64, 64, 1), np.uint8)})["status"]) == ["ok"]
    # The shared artifacts stay untouched (other tests read them): a recorded hash that no longer matches the
    # files is the same situation as files changed after promotion.
    client.set_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256, "0" * 64)
    with pytest.raises(ModelIntegrityError, match="changed since promotion"):
        mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
