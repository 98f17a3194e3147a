"""One home for loading a model: an MLflow model URI -> the Keras model and what travels with its version.

What travels with a registered version (tags on the version, else on its training run): the operating
`threshold` chosen on validation, the calibration `temperature` fitted on validation (`pipeline.net.calibration`),
the `dataset_digest` it was trained on. `LoadedModel.probabilities` returns calibrated probabilities, and the
threshold applies to them, so predict, evaluate, explain and the served model make the same decision.

Integrity: `pneumo promote` records the sha256 of the model's artifact files as the version tag
`model_sha256`; `load_keras` (so predict, explain, evaluate and the served model) recomputes it before
loading and refuses a changed artifact with a one-line reason.

Imports MLflow and Keras lazily: the CLI's `--help` and the converter never pay for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.artifact import tag_keys
from pipeline.artifact.integrity import ModelIntegrityError, artifact_sha256, verify  # noqa: F401  (re-exported)
from pipeline.errors import InputError, PneumoError
from pipeline.stores import FILLED_BY

MODEL_NAME = "pneumonia-cnn"
CHAMPION = "champion"


class ModelError(InputError):
    """The model asked for is not there or lacks what it needs (not found, no threshold): exit 2."""


class ModelStoreError(PneumoError):
    """The store holding the model failed (unreachable, broken artifact): exit 1."""


def champion_uri(model: str = MODEL_NAME) -> str:
    return f"models:/{model}@{CHAMPION}"


def local_artifacts(uri: str) -> str:
    """The model's files on this machine (a local artifact store answers with its own folder, not a copy)."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


def load_keras(uri: str, found=None):
    """The Keras model behind an MLflow URI: the `keras_model` artifact inside the serving pyfunc
    (`pipeline.artifact.serving`), or a model logged with MLflow's Keras flavour before the pyfunc existed; its files
    verified against the version's `model_sha256` tag (recorded at promotion) when it has one. `found` (a
    `version_tags.VersionTags` already looked up) pins an alias to the version whose tags the caller holds."""
    import mlflow
    from mlflow.models import Model

    import pipeline.net.augment  # noqa: F401  (registers RandomAffine, should the model use it)
    from pipeline.artifact import version_tags
    from pipeline.artifact.serving import KERAS_ARTIFACT
    from pipeline.net.model import load_network

    found = found or version_tags.of_uri(uri)
    local = Path(local_artifacts(found.uri or uri))  # the version found, even if the alias has moved since
    verify(uri, str(local), found.own.get(tag_keys.MODEL_SHA256))
    flavors = Model.load(local / "MLmodel").flavors
    if "keras" in flavors:
        return mlflow.keras.load_model(str(local))
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if KERAS_ARTIFACT not in artifacts:
        raise ModelError(f"model {uri} has neither a Keras flavour nor a `{KERAS_ARTIFACT}` artifact: "
                         "not a pneumo model")
    return load_network(str(local / artifacts[KERAS_ARTIFACT]["path"]))


def model_uses_meta(model) -> bool:
    from pipeline.net.model import uses_meta

    return uses_meta(model)


@dataclass
class LoadedModel:
    model: object
    uri: str
    version: str  # "3" for a registered version, "run:<id>" otherwise
    threshold: float | None  # on the calibrated scale; None when the version carries none
    temperature: float  # 1.0 = uncalibrated
    digest: str
    image_size: int
    uses_meta: bool
    run_id: str | None = None
    tags: dict = field(default_factory=dict)  # the version's tags over its run's

    def calibrate(self, raw) -> np.ndarray:
        from pipeline.net.calibration import apply_temperature

        return apply_temperature(raw, self.temperature)

    def raw_probabilities(self, images, meta=None) -> np.ndarray:
        """The network's own sigmoid output for a batch of uint8 images (B, H, W, 1)."""
        inputs = {"image": images}
        if self.uses_meta:
            if meta is None:
                raise ModelError(f"model {self.uri} takes metadata inputs: pass the meta vectors")
            inputs["meta"] = meta
        return np.asarray(self.model.predict_on_batch(inputs), dtype=np.float64).reshape(-1)

    def probabilities(self, images, meta=None) -> np.ndarray:
        """Calibrated probabilities for a batch: what every output of the system reports."""
        return self.calibrate(self.raw_probabilities(images, meta))


def load(uri: str, tracking_uri: str | None = None, threshold: float | None = None,
         require_threshold: bool = True) -> LoadedModel:
    """The model behind `uri` with its threshold, temperature and dataset digest; `threshold` overrides the
    stored one. ModelError (one line, naming the URI and the store) when anything is missing."""
    from mlflow.exceptions import MlflowException

    from pipeline.artifact import tracking, version_tags

    resolved = tracking.resolve_tracking_uri(tracking_uri)
    tracking.setup(tracking_uri)
    try:
        found = version_tags.of_uri(uri)  # once: the network, threshold and temperature of one version
        model = load_keras(uri, found)
    except MlflowException as e:
        # No such model, version or alias (MLflow answers RESOURCE_DOES_NOT_EXIST, or INVALID_PARAMETER_VALUE
        # for an unknown alias) is the caller's choice of URI; anything else is the store failing.
        missing = e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        error = ModelError if missing else ModelStoreError
        hint = f" ({FILLED_BY['tracking']} registers models)" if missing else ""
        raise error(f"model {uri} in store {tracking.masked(resolved)}: "
                    f"{' '.join(str(e.message).split())[:300]}{hint}") from None
    if threshold is None:
        stored = found.get(tag_keys.THRESHOLD)
        threshold = float(stored) if stored is not None else None
    if threshold is None and require_threshold:
        raise ModelError(f"model {uri} has no stored threshold (tag `threshold` on its version or run): "
                         "pass --threshold")
    temperature = float(found.get(tag_keys.TEMPERATURE) or 1.0)
    run_id = found.run_id
    return LoadedModel(model=model, uri=uri, version=found.version or (f"run:{run_id}" if run_id else uri),
                       threshold=threshold, temperature=temperature, digest=found.get(tag_keys.DATASET_DIGEST) or "",
                       image_size=int(model.inputs[0].shape[1]), uses_meta=model_uses_meta(model),
                       run_id=run_id, tags=found.tags)
