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

import contextlib
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


def store_error(e, uri: str, resolved: str, after: str = ""):
    """MLflow's exception -> ours, one line ending with `after`: no such model, version or alias
    (RESOURCE_DOES_NOT_EXIST, or INVALID_PARAMETER_VALUE for an unknown alias) is the caller's choice of URI
    (ModelError); anything else is the store failing (ModelStoreError)."""
    from pipeline.artifact import tracking

    missing = e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
    after = after or (f" ({FILLED_BY['tracking']} registers models)" if missing else "")
    return (ModelError if missing else ModelStoreError)(
        f"model {uri} in store {tracking.masked(resolved)}: {' '.join(str(e.message).split())[:300]}{after}")


def champion_uri(model: str = MODEL_NAME) -> str:
    return f"models:/{model}@{CHAMPION}"


def local_artifacts(uri: str) -> str:
    """The model's files on this machine (a local artifact store answers with its own folder, not a copy; a
    remote one downloads into a new temporary folder that the caller owns: prefer `downloaded`)."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


@contextlib.contextmanager
def downloaded(uri: str):
    """The model's files in a private temporary folder, deleted on exit (every load once left a copy of the
    model behind in the system's temporary folder)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="pneumo-model-") as tmp:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))


def load_keras(uri: str, found=None, local: Path | None = None):
    """The Keras model behind an MLflow URI: the `keras_model` artifact inside the serving pyfunc
    (`pipeline.artifact.serving`), or a model logged with MLflow's Keras flavour before the pyfunc existed; its files
    verified against the version's `model_sha256` tag (recorded at promotion) when it has one. `found` (a
    `version_tags.VersionTags` already looked up) pins an alias to the version whose tags the caller holds."""
    import mlflow
    from mlflow.models import Model

    import pipeline.net.augment  # noqa: F401  (registers RandomAffine, should the model use it)
    from pipeline.artifact import version_tags
    from pipeline.artifact.serving import KERAS_ARTIFACT, KERAS_FILE, data_dir_of
    from pipeline.net.model import load_network

    found = found or version_tags.of_uri(uri)
    if local is None:  # the version found, even if the alias has moved since
        with downloaded(found.uri or uri) as folder:
            return load_keras(uri, found, folder)
    verify(uri, str(local), found.own.get(tag_keys.MODEL_SHA256))
    flavors = Model.load(local / "MLmodel").flavors
    if "keras" in flavors:
        return mlflow.keras.load_model(str(local))
    data = data_dir_of(local)
    if data is not None:  # the loader_module form (pipeline/artifact/serving.py)
        return load_network(str(data / KERAS_FILE))
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if KERAS_ARTIFACT not in artifacts:
        raise ModelError(f"model {uri} has neither a Keras flavour nor a `{KERAS_ARTIFACT}` artifact: "
                         "not a pneumo model")
    return load_network(str(local / artifacts[KERAS_ARTIFACT]["path"]))


def artifact_decision(uri: str, found, local: str | Path) -> tuple[float | None, float | None]:
    """(threshold, temperature) a model of the loader_module form carries in its files (None, None for older
    forms, whose decision lives only in tags). The served model answers with these; a version tag that
    disagrees was edited after the model was logged, and is refused rather than silently obeyed."""
    from pipeline.artifact.serving import TEMPERATURE_KEY, THRESHOLD_KEY, settings_of

    settings = settings_of(local)
    if settings is None:
        return None, None
    out = []
    for key in (THRESHOLD_KEY, TEMPERATURE_KEY):
        carried, tagged = settings.get(key), found.get(key)
        if carried is not None and tagged not in (None, "") and float(tagged) != float(carried):
            raise ModelIntegrityError(f"model {uri}: tag {key}={tagged} differs from the {carried!r} its artifact "
                                      "carries (the tag was edited after logging): refusing it")
        out.append(None if carried is None else float(carried))
    return out[0], out[1]


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
        with downloaded(found.uri or uri) as local:
            model = load_keras(uri, found, local)
            carried_threshold, carried_temperature = artifact_decision(uri, found, local)
    except MlflowException as e:
        raise store_error(e, uri, resolved) from None
    if threshold is None:
        stored = found.get(tag_keys.THRESHOLD)
        threshold = carried_threshold if carried_threshold is not None else (
            float(stored) if stored is not None else None)
    if threshold is None and require_threshold:
        raise ModelError(f"model {uri} has no stored threshold (tag `threshold` on its version or run): "
                         "pass --threshold")
    temperature = (carried_temperature if carried_temperature is not None
                   else float(found.get(tag_keys.TEMPERATURE) or 1.0))
    run_id = found.run_id
    return LoadedModel(model=model, uri=uri, version=found.version or (f"run:{run_id}" if run_id else uri),
                       threshold=threshold, temperature=temperature, digest=found.get(tag_keys.DATASET_DIGEST) or "",
                       image_size=int(model.inputs[0].shape[1]), uses_meta=model_uses_meta(model),
                       run_id=run_id, tags=found.tags)


@dataclass
class VerifiedModel:
    """A registered version downloaded into a private folder and checked, file by file, before any of it is
    read: what `pneumo serve` loads (pipeline/serve.py). `close()` deletes the folder."""
    uri: str  # models:/<name>/<version>: the alias resolved once
    name: str
    version: str
    folder: Path
    threshold: float
    temperature: float
    _tmp: object = None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def verified_copy(uri: str, tracking_uri: str | None = None) -> VerifiedModel:
    """Resolve `uri` to one registered version, download it into a fresh 0700 folder, and refuse it (fail
    closed) unless: its tags could be read; promotion recorded its `model_sha256`; the files hash to it (the
    code, the network and the settings.json holding the threshold and temperature alike); it is in the
    loader_module form (no pickle); its threshold is in (0, 1) and temperature finite and > 0; and no version
    tag contradicts them. ModelError (exit 2) or ModelIntegrityError / ModelStoreError (exit 1), one line."""
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.artifact import tracking, version_tags
    from pipeline.artifact.serving import check_settings, settings_of

    resolved = tracking.resolve_tracking_uri(tracking_uri)
    tracking.setup(tracking_uri)
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        raise ModelError(f"pneumo serve serves a registered version (models:/<name>@<alias> or "
                         f"models:/<name>/<version>), not {uri}")
    try:
        found = version_tags.of_uri(uri)
    except MlflowException as e:
        raise store_error(e, uri, resolved, "; its version and tags could not be read: refusing to serve") from None
    except Exception as e:  # the store unreachable: nothing can be checked, so nothing is served
        raise ModelStoreError(f"model {uri} in store {tracking.masked(resolved)}: tags not readable "
                              f"({type(e).__name__}: {str(e)[:200]}): refusing to serve") from None
    expected = found.own.get(tag_keys.MODEL_SHA256)
    if not expected:
        raise ModelIntegrityError(f"model {found.uri}: no `{tag_keys.MODEL_SHA256}` recorded on the version (it "
                                  "was never promoted): refusing to serve an artifact nothing can verify")
    tmp = tempfile.TemporaryDirectory(prefix="pneumo-serve-")  # mkdtemp: mode 0700, this user only
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.uri, dst_path=tmp.name))
        for cache in sorted(local.rglob("__pycache__"), reverse=True):  # never run bytecode the hash skips
            shutil.rmtree(cache)
        verify(found.uri, str(local), expected)
        settings = settings_of(local)
        if settings is None or any(local.rglob("*.pkl")):
            raise ModelIntegrityError(f"model {found.uri} is not in the loader_module form (a pickled pyfunc, "
                                      "logged before it): pneumo serve refuses pickles; register it anew")
        try:
            threshold, temperature = check_settings(settings, f"model {found.uri}")
        except ValueError as e:
            raise ModelIntegrityError(str(e)) from None
        artifact_decision(found.uri, found, local)
    except BaseException:
        tmp.cleanup()
        raise
    name = found.uri.removeprefix("models:/").rsplit("/", 1)[0]
    return VerifiedModel(uri=found.uri, name=name, version=str(found.version), folder=local, threshold=threshold,
                         temperature=temperature, _tmp=tmp)
