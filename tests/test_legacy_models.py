"""Models logged before the layout change (issue 19) still load and predict after it.

`fixtures/legacy_model_52498cd/` is a pyfunc logged by commit 52498cd, the last one before `pipeline/` was
grouped into subpackages (`pipeline.tracking.log_keras_model` on a smoke-sized CNN with the gamma, noise, blur
and affine augmentation layers, 32 px). Its `python_model.pkl` names `pipeline.serving.PneumoniaModel` and its
`model.keras` names the module `pipeline.augment` for the custom layers: the paths that `pipeline/serving.py`
and `pipeline/augment.py` keep alive. Each check runs in a fresh interpreter, so nothing the test process
imported earlier can stand in for the shim; the control runs block the shim and must fail.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_model_52498cd"

# Blocks one module path in the child interpreter: the control that shows the fixture really needs the shim.
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
sys.meta_path.insert(0, Block())
"""

PYFUNC = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame([{"image": sys.argv[2]}]))
print("RESULT " + json.dumps({"cls": type(model.unwrap_python_model()).__module__,
                              "rows": out.to_dict("records")}))
"""

KERAS = """
import sys
from pipeline.net.model import load_network
net = load_network(sys.argv[1])
augment = net.get_layer("augment")
print("RESULT " + ",".join(sorted({type(l).__module__ for l in augment.layers
                                   if type(l).__module__.startswith("pipeline")})))
"""


def _png(size: int = 32) -> str:
    from PIL import Image

    pixels = (np.arange(size * size, dtype=np.uint32).reshape(size, size) * 7 % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _child(code: str, *args: str, tmp_path: Path, blocked: str | None = None) -> subprocess.CompletedProcess:
    prelude = BLOCK.format(blocked=blocked) if blocked else ""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
           "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)


def _result(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return lines[-1].removeprefix("RESULT ")


@pytest.fixture
def legacy(tmp_path) -> Path:
    folder = tmp_path / "legacy_model"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_the_fixture_names_the_old_module_paths():
    import zipfile

    assert b"pipeline.serving" in (FIXTURE / "python_model.pkl").read_bytes()
    config = zipfile.ZipFile(FIXTURE / "artifacts" / "model.keras").read("config.json").decode()
    for layer in ("RandomAffine", "RandomBlur", "RandomGamma", "RandomNoise"):  # nested in the augment block
        assert f'"module": "pipeline.augment", "class_name": "{layer}"' in config


def test_a_pyfunc_logged_before_the_move_loads_and_predicts(legacy, tmp_path):
    import keras

    from pipeline.net.model import load_network

    image = _png()
    got = json.loads(_result(_child(PYFUNC, str(legacy), image, tmp_path=tmp_path)))
    assert got["cls"] == "pipeline.artifact.serving"  # the old path resolved to today's class
    (row,) = got["rows"]
    assert row["status"] == "ok", row
    # The same network, loaded by today's code, gives the same probability (no threshold or temperature was
    # tagged on the legacy run: temperature 1, no prediction).
    net = load_network(str(legacy / "artifacts" / "model.keras"))
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image))))[None, ..., None]
    expected = float(np.asarray(net.predict_on_batch({"image": pixels})).reshape(-1)[0])
    assert row["probability"] == pytest.approx(expected, abs=1e-6)
    assert row["prediction"] is None
    keras.backend.clear_session()


def test_without_the_serving_shim_the_legacy_pyfunc_does_not_load(legacy, tmp_path):
    proc = _child(PYFUNC, str(legacy), _png(), tmp_path=tmp_path, blocked="pipeline.serving")
    assert proc.returncode != 0
    assert "pipeline.serving" in proc.stderr


def test_a_keras_file_saved_before_the_move_loads_its_custom_layers(legacy, tmp_path):
    path = str(legacy / "artifacts" / "model.keras")
    # Found by registered name: the old module path is not imported (blocking it changes nothing).
    assert _result(_child(KERAS, path, tmp_path=tmp_path, blocked="pipeline.augment")) == "pipeline.net.augment"
