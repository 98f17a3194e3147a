"""The served model: what a hospital sends in, one answer per image out, with bounds on every request.

Every model the project logs (`pipeline.artifact.tracking.log_keras_model`) is an MLflow pyfunc in the
`loader_module` form: MLflow imports this module from the model's own `code/` folder (the project's package
travels with the model, so a clean environment with only the pinned requirements serves it) and calls
`_load_pyfunc(<model>/pneumo)`, which reads the network (`model.keras`) and its decision (`settings.json`:
threshold, temperature). No pickled Python object: every file is data or source that the promotion hash covers,
so `pneumo serve` (pipeline/serve.py) checks all of it before any of it is read.

Input, per row of a DataFrame (JSON `dataframe_records` / `dataframe_split`); the MLmodel's signature says so:
- `dicom`: the DICOM file's bytes, base64 (decoded by `pipeline.data.dicom.screen_dicom`, as `pneumo predict` does);
- `image`: a PNG or JPEG file's bytes, base64 (no other format is opened; no header, so no scope check);
- `pixels`: a preprocessed image, rows of integers 0..255 at the model's size (the raw tensor path), with `meta`
  (view, sex, age as the network encodes them) for a metadata model;
and one row out each: `probability` (calibrated), `prediction` (0/1 at the stored threshold), `model_version`,
`status` (`ok` | `error` | `out_of_scope`) and `error` (the reason, one line, no server path). A bad row gets
its own `error`; the other rows of the request are still answered. A header that is not a chest radiograph
(`pipeline.data.dicom.scope_warning`) or a multi-frame file is `out_of_scope`, with no probability.

Bounds (`Limits`): at most `max_rows` rows and `max_row_bytes` file bytes per row (a larger request is refused
as a whole: ValueError, a 400 from the server); files are decoded in a `DecodePool` (pipeline/data/isolation.py:
separate processes, an address-space cap and a time limit per row, a worker death rejects only its row) under a
lower pixel cap than the converter's; the network scores `batch_size` images at a time.

Models logged before this form (a pickled `PneumoniaModel` with the network as the artifact `keras_model`)
still load: the class below is kept for them, and `pipeline/serving.py` keeps their old module path.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.artifact import tag_keys

KERAS_ARTIFACT = "keras_model"  # the network inside a legacy (pickled) pyfunc
KERAS_FILE = "model.keras"
SETTINGS_FILE = "settings.json"
DATA_DIR = "pneumo"  # the pyfunc's data_path: the network and its settings
LOADER_MODULE = "pipeline.artifact.serving"
OUTPUT_COLUMNS = ["probability", "prediction", "model_version", "status", "error"]
THRESHOLD_KEY, TEMPERATURE_KEY = tag_keys.THRESHOLD, tag_keys.TEMPERATURE  # settings.json's keys: the tags' names


@dataclass(frozen=True)
class Limits:
    """What one request may cost. The pixel cap is below the converter's 100 M (pipeline/data/dicom.py):
    the largest radiographs are ~4300 x 3500 = 15 M pixels; a 5000 x 5000 JPEG 2000 bomb of 1.5 KB cost 836 MiB
    to decode at the converter's cap."""
    max_rows: int = 64
    max_row_bytes: int = 32 * 2**20  # a CR/DX DICOM is 5-30 MB uncompressed
    max_pixels: int = 16_777_216  # 4096 x 4096
    batch_size: int = 16
    decode_timeout_s: float = 20.0  # the slowest legitimate decode measured is ~0.3 s (pipeline/data/convert.py)
    decode_memory_bytes: int = 2 * 2**30  # address space per decode worker (imports ~0.4 GB of it)
    decode_workers: int = 2


class RequestError(MlflowException):
    """The request as a whole is refused (too many rows, a row too large, no usable column): a 400 with this
    one line from the server (an MlflowException, so MLflow's scoring server keeps the reason)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def data_dir_of(model_root: str | os.PathLike) -> Path | None:
    """The data folder of a model in the loader_module form (`<model>/data/pneumo`, as MLmodel names it), None
    for any other model (the legacy pickled form, MLflow's Keras flavour)."""
    from mlflow.models import Model

    conf = Model.load(str(Path(model_root) / "MLmodel")).flavors.get("python_function", {})
    if conf.get("loader_module") != LOADER_MODULE or not conf.get("data"):
        return None
    return Path(model_root) / conf["data"]


def settings_of(model_root: str | os.PathLike) -> dict | None:
    """The decision a logged model carries (its `settings.json`), None for a model of an older form."""
    data = data_dir_of(model_root)
    return json.loads((data / SETTINGS_FILE).read_text()) if data is not None else None


def check_settings(settings: dict, where: str) -> tuple[float, float]:
    """(threshold, temperature) when both are usable; ValueError naming the value otherwise: a `nan`
    threshold answers every case negative, a negative temperature inverts every probability."""
    try:
        threshold, temperature = float(settings["threshold"]), float(settings["temperature"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: threshold and temperature must be numbers ({type(e).__name__}: {e})") from None
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{where}: threshold {threshold!r} is not in (0, 1): refusing to serve")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature {temperature!r} is not finite and > 0: refusing to serve")
    return threshold, temperature


# --- decoding, in worker processes (pipeline/data/isolation.py, pipeline/data/request_files.py) -------
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(limits: Limits):
    """One pool per process and limits, started on first use (every model loaded in a process shares it)."""
    from pipeline.data.isolation import DecodePool

    key = (limits.decode_workers, limits.decode_memory_bytes)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = DecodePool(limits.decode_workers, limits.decode_memory_bytes,
                                     preload=("pipeline.data.request_files",))
        return _POOLS[key]


def close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


# --- request cells ------------------------------------------------------------------------------------------
def _decode_b64(value, limit: int) -> bytes:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif not isinstance(value, str) or not value.strip():
        raise ValueError("empty value: expected base64 file bytes")
    elif len(value) > 4 * (limit // 3 + 1):  # before decoding: a base64 string is 4/3 of its bytes
        raise RequestError(f"a row's file is over the per-row limit of {limit} bytes: refused")
    else:
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    if len(data) > limit:
        raise RequestError(f"a row's file is over the per-row limit of {limit} bytes ({len(data)}): refused")
    return data


def _present(value) -> bool:
    """A cell holds something (pandas fills a missing column of a row with None or NaN)."""
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    if isinstance(value, np.ndarray | list | tuple):
        return len(value) > 0
    return not (isinstance(value, str) and not value)


def _pixels(value, size: int) -> np.ndarray:
    """A `pixels` cell -> uint8 (size, size); only integers 0..255 (floats in [0, 1] were once cast to black)."""
    arr = np.asarray([np.asarray(r) for r in value] if not isinstance(value, np.ndarray) else value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != (size, size):
        raise ValueError(f"pixels must be {size} x {size} integers 0..255, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pixels must be integers 0..255, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"pixels must be integers 0..255, got values {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


class Scorer:
    """The loaded model: `predict(frame)` -> one answer per row. `_load_pyfunc` makes one from a model folder;
    `pneumo serve` makes one from the folder it verified, with the version it verified."""

    def __init__(self, network, *, threshold: float, temperature: float, version: str,
                 limits: Limits | None = None):
        from pipeline.net.model import uses_meta

        self.model = network
        self.image_size = int(network.inputs[0].shape[1])
        self.uses_meta = uses_meta(network)
        self.threshold, self.temperature = threshold, temperature
        self.version = version
        self.limits = limits or Limits()
        self._predict_lock = threading.Lock()  # one network call at a time; decoding runs outside it

    def _score(self, images: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
        from pipeline.net.calibration import apply_temperature

        out = []
        for start in range(0, len(images), self.limits.batch_size):
            inputs = {"image": images[start:start + self.limits.batch_size]}
            if self.uses_meta:
                inputs["meta"] = meta[start:start + self.limits.batch_size]
            with self._predict_lock:
                out.append(np.asarray(self.model.predict_on_batch(inputs), dtype=np.float64).reshape(-1))
        return apply_temperature(np.concatenate(out), self.temperature)

    def _row(self, probability=None, status="ok", error="") -> dict:
        prediction = None
        if probability is not None and self.threshold is not None:
            prediction = int(probability >= self.threshold)
        return {"probability": probability, "prediction": prediction, "model_version": self.version,
                "status": status, "error": error}

    def _read_cells(self, records: list[dict]) -> tuple[list, list]:
        """-> (decoded rows, decode tasks): a decoded row is {"pixels", "meta"} or {"status", "error"} or the
        index of its task. Per-row faults stay per row; a row past the byte limit refuses the request."""
        decoded, tasks = [], []
        lim = self.limits
        for record in records:
            dicom, image, pixels = record.get("dicom"), record.get("image"), record.get("pixels")
            try:
                if _present(dicom):
                    tasks.append(("dicom", _decode_b64(dicom, lim.max_row_bytes)))
                    decoded.append(len(tasks) - 1)
                elif _present(image):
                    tasks.append(("image", _decode_b64(image, lim.max_row_bytes)))
                    decoded.append(len(tasks) - 1)
                elif _present(pixels):
                    meta = record.get("meta")
                    if self.uses_meta and not _present(meta):
                        raise ValueError("this model takes metadata inputs: send `meta` beside `pixels`")
                    decoded.append({"pixels": _pixels(pixels, self.image_size),
                                    "meta_vector": np.asarray(meta, np.float32) if _present(meta) else None})
                else:
                    decoded.append({"status": "error", "error": "no `dicom`, `image` or `pixels` value in this row"})
            except RequestError:
                raise
            except ValueError as e:
                kind = "dicom" if _present(dicom) else "image" if _present(image) else "pixels"
                decoded.append({"status": "error", "error": f"{kind}: {e}"})
        return decoded, tasks

    def predict_rows(self, records: list[dict]) -> list[dict]:
        from pipeline.data.inputs import meta_batch
        from pipeline.data.isolation import WorkerDied
        from pipeline.data.request_files import decode_file

        lim = self.limits
        if len(records) > lim.max_rows:
            raise RequestError(f"{len(records)} rows in one request, over the limit of {lim.max_rows}: "
                               "send them in several requests")
        decoded, tasks = self._read_cells(records)
        if tasks:
            jobs = [(kind, data, self.image_size, lim.max_pixels, lim.decode_timeout_s) for kind, data in tasks]
            results = decode_pool(lim).map(decode_file, jobs)
            for i, d in enumerate(decoded):
                if isinstance(d, int):
                    r = results[d]
                    decoded[i] = ({"status": "error", "error": f"{tasks[d][0]}: {r.reason}"}
                                  if isinstance(r, WorkerDied) else r)
        rows: list[dict] = [{} for _ in records]
        ready = [i for i, d in enumerate(decoded) if "pixels" in d]
        for i, d in enumerate(decoded):
            if "pixels" not in d:
                rows[i] = self._row(status=d["status"], error=d["error"])
        if not ready:
            return rows
        images = np.stack([decoded[i]["pixels"] for i in ready])[..., None]
        meta = None
        if self.uses_meta:
            meta = np.stack([decoded[i]["meta_vector"] if decoded[i].get("meta_vector") is not None
                             else meta_batch([decoded[i]["meta"]])[0] for i in ready])
        try:
            probs = self._score(images, meta)
        except Exception as e:  # the model itself failed: every decoded row says so, none is lost
            for i in ready:
                rows[i] = self._row(status="error", error=f"model: {type(e).__name__}: {str(e)[:200]}")
            return rows
        for i, p in zip(ready, probs, strict=True):
            rows[i] = self._row(float(p))
        return rows

    def predict(self, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, dict):  # a caller in Python with arrays: {"pixels": (B, H, W[, 1])}
            model_input = {k: list(v) if isinstance(v, np.ndarray) else v for k, v in model_input.items()}
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame) or not ({"dicom", "image", "pixels"} & set(model_input.columns)):
            got = list(model_input.columns)[:10] if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise RequestError("send rows with a `dicom` (base64 DICOM bytes), `image` (base64 PNG/JPEG) or "
                               f"`pixels` (integers 0..255) column; got {got}")
        rows = self.predict_rows(model_input.to_dict("records"))
        # Object columns keep None where nothing was predicted: JSON `null` in the server's answer (a float
        # column would send NaN, which strict JSON parsers reject).
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def _registered_version(model_root: Path) -> str | None:
    """The version MLflow wrote into the folder when it was loaded by a `models:/` URI (`registered_model_meta`)."""
    meta = model_root / "registered_model_meta"
    if not meta.is_file():
        return None
    for line in meta.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_version" and value.strip():
            return value.strip().strip("'\"")
    return None


def _load_pyfunc(data_path: str):
    """MLflow's entry point for the `loader_module` form: <model>/pneumo -> a Scorer with the model's own
    threshold and temperature (refused when unusable)."""
    import pipeline.net.augment  # noqa: F401  (registers RandomAffine, should the model use it)
    from pipeline.net.model import load_network

    folder = Path(data_path)
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    if settings.get(THRESHOLD_KEY) is None:
        raise ValueError("this model was logged without a decision threshold (none on its training run): "
                         "it cannot be served")
    threshold, temperature = check_settings(settings, f"model settings {SETTINGS_FILE}")
    run_id = settings.get("run_id")
    root = next((p for p in folder.parents if (p / "MLmodel").is_file()), folder)
    version = _registered_version(root) or (f"run:{run_id}" if run_id else "unregistered")
    return Scorer(load_network(str(folder / KERAS_FILE)), threshold=threshold, temperature=temperature,
                  version=version)


def write_data(folder: Path, network, settings: dict) -> Path:
    """The pyfunc's data folder: the network and its settings; -> the folder (`data_path` for log_model)."""
    data = folder / DATA_DIR
    data.mkdir(parents=True)
    network.save(str(data / KERAS_FILE))
    (data / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
    return data


def signature():
    """The request and answer format, for the registry and `mlflow models serve`'s schema check."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "dicom", required=False), ColSpec("string", "image", required=False),
                     ColSpec(Array(Array("long")), "pixels", required=False),
                     ColSpec(Array("double"), "meta", required=False)])
    outputs = Schema([ColSpec("double", "probability", required=False), ColSpec("long", "prediction", required=False),
                      ColSpec("string", "model_version"), ColSpec("string", "status"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> dict:
    """One row: a tiny synthetic chest radiograph as a DICOM (64 x 64, a few KB), base64."""
    from pipeline.data.synth import example_dicom_bytes

    return {"dicom": [base64.b64encode(example_dicom_bytes()).decode("ascii")]}


def settings_for(threshold: float | None, temperature: float | None) -> dict:
    """What `settings.json` holds: the decision, and the run the model was logged from (for `model_version`
    when the model is served without its registry metadata)."""
    import mlflow

    run = mlflow.active_run()
    out: dict = {"run_id": run.info.run_id} if run else {}
    for key, value in ((THRESHOLD_KEY, threshold), (TEMPERATURE_KEY, temperature)):
        if value is not None:
            out[key] = float(value)
    return out


# --- models logged before the loader_module form ------------------------------------------------------------

class PneumoniaModel(mlflow.pyfunc.PythonModel):
    """The pickled pyfunc of versions logged before the loader_module form: loads as it did (tags from the
    registry, the logged values as fallback) and scores through the same Scorer."""

    def load_context(self, context):
        from pipeline.artifact import version_tags
        from pipeline.artifact.integrity import verify
        from pipeline.net.model import load_network

        cfg = dict(context.model_config or {})
        network = load_network(context.artifacts[KERAS_ARTIFACT])
        run_id = cfg.get("run_id")
        version, tags = None, {}
        try:
            found = version_tags.of_run(run_id, cfg.get("registered_model_name"))
            version, tags = found.version, found.tags
        except Exception as e:  # registry unreachable: the values logged with the model
            print(f"pneumo serving: registry tags not read ({type(e).__name__}: {str(e)[:200]}); "
                  "using the threshold and temperature stored with the model", flush=True)
        if tags.get(tag_keys.MODEL_SHA256):
            root = next(p for p in Path(context.artifacts[KERAS_ARTIFACT]).parents if (p / "MLmodel").exists())
            verify(f"version {version}", str(root), tags[tag_keys.MODEL_SHA256])
        threshold = tags.get(tag_keys.THRESHOLD, cfg.get("threshold"))
        self.scorer = Scorer(network, threshold=float(threshold) if threshold not in (None, "") else None,
                             temperature=float(tags.get(tag_keys.TEMPERATURE, cfg.get("temperature")) or 1.0),
                             version=version or (f"run:{run_id}" if run_id else "unregistered"))

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, dict) or "image" not in model_input:
            return self.scorer.predict(model_input)
        # The legacy tensor form {"image": uint8 (B, H, W, 1)}: the same rows as `pixels`.
        return self.scorer.predict({"pixels": list(np.asarray(model_input["image"]))})
