"""The served champion (pipeline/artifact/serving.py, pipeline/serve.py): DICOM / PNG rows in, one answer per row
out, in-process, in a Python where the project is not installed, through `mlflow models serve` and through
`pneumo serve`, which verifies every file before it loads any; the same probabilities as `pneumo predict`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SHARED_DATA

pytest_plugins = ["fixtures_registry"]
MODEL = "pneumonia-cnn"
pytestmark = pytest.mark.slow


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
    """The store with @champion on version 3 and the artifact hash promotion records on it."""
    from mlflow import MlflowClient

    from pipeline.artifact import tag_keys, tracking
    from pipeline.promote.promotion import model_sha256

    s = registry_store
    tracking.setup(s.uri)  # model_sha256 reads the store MLflow is pointed at
    client = MlflowClient(s.uri, s.uri)
    v = s.versions[2]
    client.set_registered_model_alias(MODEL, "champion", v)
    client.set_model_version_tag(MODEL, v, tag_keys.MODEL_SHA256, model_sha256(MODEL, v))
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


def _expected(uri: str, tracking_uri: str, *files: Path):
    """Probabilities computed the long way: the Keras model, the converter's decoder (a DICOM by its `.dcm`
    suffix, else an image file), the run's temperature."""
    from mlflow import MlflowClient

    from pipeline.artifact.model_store import load
    from pipeline.data.dicom import load_image_file, read_dicom
    from pipeline.net.calibration import apply_temperature

    lm = load(uri, tracking_uri)
    size = lm.image_size
    images = np.stack([read_dicom(f, size).pixels if f.suffix == ".dcm" else load_image_file(f, size)
                       for f in files])[..., None]
    raw = np.asarray(lm.model.predict_on_batch({"image": images})).reshape(-1)
    temperature = float(MlflowClient(tracking_uri).get_run(lm.run_id).data.tags["temperature"])
    assert temperature != 1.0 and lm.temperature == temperature  # a skipped calibration would show
    return lm, apply_temperature(raw, temperature)


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
    np.testing.assert_allclose(out.loc[[0, 4], "probability"].to_numpy(float), want, rtol=1e-5, atol=1e-6)
    assert list(out.loc[[0, 4], "prediction"]) == [int(p >= lm.threshold) for p in want]

    # Preprocessed images as `pixels` (integers 0..255 at the model's size): the same calibrated answer; a wrong
    # size or floats are refused per row (floats in [0, 1] were once cast to black images answered `ok`).
    from pipeline.data.dicom import read_dicom

    pixels = read_dicom(rows["real"], lm.image_size).pixels
    tensor = served.predict(pd.DataFrame({"pixels": [pixels, np.zeros((32, 32), np.uint8)]}))
    assert list(tensor["status"]) == ["ok", "error"]
    assert tensor.loc[0, "probability"] == pytest.approx(out.loc[0, "probability"], rel=1e-5)
    assert tensor.loc[1, "error"] == "pixels: pixels must be 64 x 64 integers 0..255, got shape (32, 32)"
    raw = served._model_impl  # the Scorer behind the pyfunc, without MLflow's schema check in front
    wrong = raw.predict(pd.DataFrame({"pixels": [np.full((64, 64), 300, np.int64)]}))
    assert wrong.loc[0, "error"] == "pixels: pixels must be integers 0..255, got values 300..300"


def test_a_request_past_its_limits_is_refused_whole_and_other_formats_are_not_opened(champion, rows, tmp_path):
    """More rows than Limits.max_rows or a row over max_row_bytes: the request is refused with one line. The
    `image` column opens PNG and JPEG only: a TIFF (which Pillow reads) is refused per row."""
    import mlflow
    from PIL import Image

    from pipeline.artifact import tracking
    from pipeline.artifact.serving import Limits, RequestError

    s, _ = champion
    tracking.setup(s.uri)
    scorer = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")._model_impl
    one = rows["records"][0]
    with pytest.raises(RequestError, match=r"^65 rows in one request, over the limit of 64"):
        scorer.predict(pd.DataFrame([one] * 65))
    scorer.limits = Limits(max_row_bytes=1000)
    with pytest.raises(RequestError, match=r"over the per-row limit of 1000 bytes"):
        scorer.predict(pd.DataFrame([one]))
    scorer.limits = Limits()
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tiff, format="TIFF")
    out = scorer.predict(pd.DataFrame([{"image": _b64(tiff.getvalue())}, one]))
    assert list(out["status"]) == ["error", "ok"] and out.loc[0, "error"] == "image: not a PNG or JPEG file"


def test_the_logged_model_has_a_signature_and_an_input_example_it_answers(champion, tmp_path):
    import mlflow
    from mlflow.models import Model
    from mlflow.types import DataType

    from pipeline.artifact import tracking

    s, v = champion
    tracking.setup(s.uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v}")
    meta = Model.load(local)
    cols = {c.name: c for c in meta.signature.inputs.inputs}
    assert set(cols) == {"dicom", "image", "pixels", "meta"} and not any(c.required for c in cols.values())
    assert cols["dicom"].type == DataType.string and cols["image"].type == DataType.string
    assert meta.flavors["python_function"]["loader_module"] == "pipeline.artifact.serving"
    assert not list(Path(local).rglob("*.pkl"))  # no pickled object anywhere in the artifact
    pins = (Path(local) / "requirements.txt").read_text().split()
    assert {p.split("==")[0] for p in pins if "==" in p} >= {"mlflow", "tensorflow", "keras", "pydicom", "pillow",
                                                             "pylibjpeg", "pylibjpeg-openjpeg"}
    example = meta.load_input_example(local)
    answer = mlflow.pyfunc.load_model(local).predict(example)
    assert list(answer["status"]) == ["ok"]
    dicom = tmp_path / "example.dcm"  # the example is a DICOM: answered as the long way answers it
    dicom.write_bytes(base64.b64decode(example.loc[0, "dicom"]))
    lm, want = _expected(f"models:/{MODEL}/{v}", s.uri, dicom)
    assert answer.loc[0, "probability"] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    assert answer.loc[0, "prediction"] == int(want[0] >= lm.threshold)


# The child interpreter with the project's package made unimportable: the editable install's finder dropped and
# the checkout off the path. It must fail to import `pipeline` first; then the model brings its own copy.
NO_PROJECT = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", {repo!r}) and "__editable__" not in p]  # its path hook too
def main():
    try:
        import pipeline
        print("RESULT " + json.dumps({{"importable": pipeline.__file__}}))
        return
    except ModuleNotFoundError:
        pass
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import pipeline
    out = model.predict(pd.DataFrame([{{"dicom": open(sys.argv[2]).read()}}]))
    print("RESULT " + json.dumps({{"pipeline": pipeline.__file__, "rows": out.to_dict("records")}}))
if __name__ == "__main__":
    main()
"""


def test_the_model_loads_and_answers_a_dicom_where_the_project_is_not_installed(champion, rows, tmp_path):
    import subprocess

    import mlflow

    from pipeline.artifact import tracking

    s, v = champion
    tracking.setup(s.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v}", dst_path=str(tmp_path)))
    script = tmp_path / "child.py"
    script.write_text(NO_PROJECT.format(repo=str(Path(__file__).resolve().parents[1])))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "KERAS_BACKEND": "tensorflow", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/elsewhere.db"}
    request = tmp_path / "row.b64"
    request.write_text(rows["records"][0]["dicom"])
    proc = subprocess.run([sys.executable, str(script), str(local), str(request)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert "importable" not in result, f"the project is importable in the child: {result}"
    assert Path(result["pipeline"]).is_relative_to(local / "code")  # the model's own copy of the package
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{v}").predict(pd.DataFrame([rows["records"][0]]))
    assert result["rows"][0]["status"] == "ok"
    assert result["rows"][0]["probability"] == pytest.approx(served.loc[0, "probability"], rel=1e-6)


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
