"""The served model: an MLflow pyfunc that takes what a hospital sends and answers one row per image.

Every model the project logs (`pipeline.artifact.tracking.log_keras_model`) is this pyfunc, with the Keras network
inside it as the artifact `keras_model` (a `.keras` file). `mlflow models serve -m models:/pneumonia-cnn@champion
--env-manager local` serves it; `pipeline.artifact.model_store.load_keras` takes the inner Keras model out for predict,
evaluate, explain and Grad-CAM.

Input, per row of a DataFrame (JSON `dataframe_records` / `dataframe_split`):
- `dicom`: the DICOM file's bytes, base64 (decoded by `pipeline.data.dicom.read_dicom`, as `pneumo predict` does);
- `image`: a PNG/JPEG file's bytes, base64 (`pipeline.data.dicom.load_image_file`; no header, so no scope check);
and one row out each: `probability` (calibrated), `prediction` (0/1 at the stored threshold), `model_version`,
`status` (`ok` | `error` | `out_of_scope`) and `error` (the reason, one line). A corrupt row gets its own
`error`; the other rows of the request are still answered. A header that is not a chest radiograph
(`pipeline.data.dicom.scope_warning`, as `pneumo predict` applies it) or a multi-frame file is `out_of_scope`, with no probability.

Raw tensors still work for callers that preprocess themselves: `{"inputs": {"image": uint8 (B, H, W, 1)}}`
(plus `meta` for a metadata model) gets the same five columns.

Threshold and temperature: read from the registered version's tags (over its training run's) when the model
is loaded, not frozen into the artifact. Promotion may re-fit the calibration and re-tag the version after the
model was logged (pipeline/promote/promotion.py), and `pneumo predict` reads the tags by the same rule
(`pipeline.artifact.version_tags`, shared with `pipeline.artifact.model_store.load`), so the server and the CLI give the same
answer for the same version. The values the training run had when the model was logged travel inside the
pyfunc (`model_config`) as the fallback for a server that cannot reach the registry. The tags are read once,
at load: after a promotion re-tags a version (or moves `@champion`), restart the server.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from pipeline.artifact import tag_keys

KERAS_ARTIFACT = "keras_model"
KERAS_FILE = "model.keras"
OUTPUT_COLUMNS = ["probability", "prediction", "model_version", "status", "error"]


def _decode_b64(value) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty value: expected base64 file bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def _present(value) -> bool:
    """A cell holds something (pandas fills a missing column of a row with None or NaN)."""
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and not value)


class PneumoniaModel(mlflow.pyfunc.PythonModel):
    """The pyfunc. State comes from `model_config` (set at log time) and the registry (read at load)."""

    def load_context(self, context):
        from pipeline.artifact import version_tags
        from pipeline.net.model import load_network, uses_meta

        cfg = dict(context.model_config or {})
        self.model = load_network(context.artifacts[KERAS_ARTIFACT])
        self.image_size = int(self.model.inputs[0].shape[1])
        self.uses_meta = uses_meta(self.model)
        run_id = cfg.get("run_id")
        version, tags = None, {}
        try:
            found = version_tags.of_run(run_id, cfg.get("registered_model_name"))
            version, tags = found.version, found.tags
        except Exception as e:  # registry unreachable: the values logged with the model
            print(f"pneumo serving: registry tags not read ({type(e).__name__}: {str(e)[:200]}); "
                  "using the threshold and temperature stored with the model", flush=True)
        # The tamper check predict/evaluate/explain get from model_store.load_keras: the files being served must
        # be the ones whose sha256 promotion recorded on the version (ModelIntegrityError stops the server).
        from pipeline.artifact.integrity import verify

        if tags.get(tag_keys.MODEL_SHA256):
            root = next(p for p in Path(context.artifacts[KERAS_ARTIFACT]).parents if (p / "MLmodel").exists())
            verify(f"version {version}", str(root), tags[tag_keys.MODEL_SHA256])
        threshold = tags.get(tag_keys.THRESHOLD, cfg.get("threshold"))
        self.threshold = float(threshold) if threshold not in (None, "") else None
        self.temperature = float(tags.get(tag_keys.TEMPERATURE, cfg.get("temperature")) or 1.0)
        self.version = version or (f"run:{run_id}" if run_id else "unregistered")

    # ------------------------------------------------------------------ scoring

    def _score(self, images: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
        from pipeline.net.calibration import apply_temperature

        inputs = {"image": images}
        if self.uses_meta:
            if meta is None:
                raise ValueError("this model takes metadata inputs: send `meta` beside `image`")
            inputs["meta"] = meta
        raw = np.asarray(self.model.predict_on_batch(inputs), dtype=np.float64).reshape(-1)
        return apply_temperature(raw, self.temperature)

    def _row(self, probability=None, status="ok", error="") -> dict:
        prediction = None
        if probability is not None and self.threshold is not None:
            prediction = int(probability >= self.threshold)
        return {"probability": probability, "prediction": prediction, "model_version": self.version,
                "status": status, "error": error}

    def _decode_row(self, record: dict, folder: Path, index: int) -> dict:
        """One input row -> {"pixels", "meta"} or {"status", "error"} (never raises)."""
        from pipeline.data.dicom import ImageError, load_image_file, screen_dicom

        dicom, image = record.get("dicom"), record.get("image")
        try:
            if _present(dicom):
                # Through a file, as `pneumo predict` reads one: the same decoder, the same pixels.
                path = folder / f"row-{index}.dcm"
                path.write_bytes(_decode_b64(dicom))
                screened = screen_dicom(path, self.image_size)
                if screened.error:
                    return {"status": "error", "error": f"dicom: {screened.error}"}
                if screened.out_of_scope:
                    return {"status": "out_of_scope", "error": screened.out_of_scope}
                img = screened.image
                return {"pixels": img.pixels, "meta": (img.view_position, img.sex, img.age)}
            if _present(image):
                path = folder / f"row-{index}.img"
                path.write_bytes(_decode_b64(image))
                try:
                    return {"pixels": load_image_file(path, self.image_size), "meta": ("", "", -1)}
                except ImageError as e:
                    return {"status": "error", "error": f"image: {e}"}
            return {"status": "error", "error": "no `dicom` or `image` value in this row"}
        except ValueError as e:
            return {"status": "error", "error": f"{'dicom' if _present(dicom) else 'image'}: {e}"}

    def _predict_rows(self, frame) -> list[dict]:
        from pipeline.data.inputs import meta_batch

        records = frame.to_dict("records")
        rows: list[dict] = [{} for _ in records]
        with tempfile.TemporaryDirectory(prefix="pneumo-serve-") as tmp:
            decoded = [self._decode_row(r, Path(tmp), i) for i, r in enumerate(records)]
        ready = [i for i, d in enumerate(decoded) if "pixels" in d]
        for i, d in enumerate(decoded):
            if "pixels" not in d:
                rows[i] = self._row(status=d["status"], error=d["error"])
        if ready:
            images = np.stack([decoded[i]["pixels"] for i in ready])[..., None]
            meta = meta_batch([decoded[i]["meta"] for i in ready]) if self.uses_meta else None
            try:
                probs = self._score(images, meta)
            except Exception as e:  # the model itself failed: every decoded row says so, none is lost
                for i in ready:
                    rows[i] = self._row(status="error", error=f"model: {type(e).__name__}: {str(e)[:200]}")
                return rows
            for i, p in zip(ready, probs, strict=True):
                rows[i] = self._row(float(p))
        return rows

    def _predict_tensors(self, model_input) -> list[dict]:
        """Raw tensors from a caller that preprocessed itself: a uint8 (B, H, W, 1) array or {"image", "meta"}."""
        if isinstance(model_input, dict):
            images, meta = model_input.get("image"), model_input.get("meta")
        else:
            images, meta = model_input, None
        if images is None:
            raise ValueError("tensor input needs an `image` array (B, H, W, 1) uint8")
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        want = (self.image_size, self.image_size, 1)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"tensor `image` must be (B, {want[0]}, {want[1]}, 1), got {images.shape}")
        meta = np.asarray(meta, dtype=np.float32) if meta is not None else None
        probs = self._score(images.astype(np.uint8), meta)
        return [self._row(float(p)) for p in probs]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame) and ({"dicom", "image"} & set(model_input.columns)):
            rows = self._predict_rows(model_input)
        elif isinstance(model_input, pd.DataFrame):
            raise ValueError("send rows with a `dicom` (base64 DICOM bytes) or `image` (base64 PNG/JPEG) "
                             f"column, or tensors as `inputs`; got columns {list(model_input.columns)[:10]}")
        else:
            rows = self._predict_tensors(model_input)
        # Object columns keep None where nothing was predicted: JSON `null` in the server's answer (a float
        # column would send NaN, which strict JSON parsers reject).
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def model_config(registered_model_name: str | None) -> dict:
    """What the pyfunc needs to find its tags at load, and the fallback values of the active run."""
    import mlflow

    run = mlflow.active_run()
    cfg: dict = {"registered_model_name": registered_model_name or ""}
    if run is None:
        return cfg
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    cfg["run_id"] = run.info.run_id
    for key in (tag_keys.THRESHOLD, tag_keys.TEMPERATURE):  # the config's keys have the tags' names
        if key in tags:
            cfg[key] = tags[key]
    return cfg

