"""MLflow stores, experiments, dataset inputs and model logging.

Embedded defaults: `sqlite:///mlruns/mlflow.db` with artifacts in `mlruns/artifacts/<experiment>` (MLflow's
plain file store is deprecated upstream). With a SQLite store MLflow would put artifacts in `<cwd>/mlruns/<id>`
unless the experiment has an explicit `artifact_location`, so we always pass one. A tracking server
(`http://...`) decides artifact locations itself.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipeline.artifact import tag_keys
from pipeline.errors import PneumoError
from pipeline.stores import (  # noqa: F401  (re-exported)
    artifact_root,
    checkout_root,
    masked,
    require_store,
    resolve_tracking_uri,
    sqlite_path,
)


class TrackingError(PneumoError):
    """A one-line reason the MLflow store cannot be used."""


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


# Retry/backoff of every MLflow REST call (runs, metrics, artifacts, registry) when the store is a tracking
# server. MLflow's client retries connection errors and 429/5xx answers itself (urllib3 Retry: sleeps of
# 0, 2f, 4f, 8f, ... s capped at 120 s, f = the backoff factor, plus up to 1 s of jitter). MLflow 3.17's
# defaults, 7 retries with f = 2, give up after ~4 min. A tuning worker that cannot log loses a trained trial,
# so workers get 10 retries (MLflow's upper limit) with f = 1: attempts at about 0, 0, 2, 6, 14, 30, 62, 126,
# 246, 366, 486 s, i.e. ~8 min of patience, with a recovered server noticed within about twice the outage (the
# same as the defaults). The client timeout stays at MLflow's 120 s: a model upload through the server may be
# slow. Settings already in the environment win; the workers a launcher starts inherit these.
# tests/test_scale_out.py restarts a server mid-study to check that nothing is lost.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _show_http_retries() -> None:
    """urllib3 logs every retry at WARNING, but into a NullHandler: a worker waiting for a lost server would be
    silent. With no logging configured, one line per retry goes to stderr ("... Retrying (Retry(total=9, ...))
    after connection broken by 'NewConnectionError(... Connection refused)': /api/2.0/mlflow/runs/log-batch")."""
    log = logging.getLogger("urllib3.connectionpool")
    if logging.getLogger().handlers or any(getattr(h, "pneumo_retries", False) for h in log.handlers):
        return  # the application's own logging shows them (or this ran before)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s MLflow client: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.pneumo_retries = True
    log.addHandler(handler)


def setup(uri: str | None = None, read_only: str | None = None) -> MlflowClient:
    """Point MLflow (tracking and registry) at the store; create the folder of an embedded SQLite store; give
    the REST client of a tracking server the retry settings above.

    `read_only="predict"` (the command's name): the store must exist already; opening a SQLite URL would
    create an empty database, so a missing one is a one-line StoreMissing naming it and what fills it."""
    uri = resolve_tracking_uri(uri)
    if read_only:
        require_store(uri, read_only)
    elif (db := sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith("postgresql"):
        _check_database(uri)
    if is_server(uri):
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)  # MLflow reads them at every request
        _show_http_retries()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


# The MLflow UI opens an experiment of this kind in its model-training view (runs, metrics, system metrics).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

# System metrics (CPU, memory, disk, network; GPU utilisation and memory when pynvml from the `gpu` extra is
# installed) sampled by MLflow's own monitor into `system/*` metrics, shown in the UI's System metrics tab.
# MLflow samples every 10 s by default and logs nothing for a run shorter than one interval; 5 s still shows a
# one-minute smoke run while a day-long run stays at ~17 000 points per metric. The environment variable wins.
SYSTEM_METRICS_INTERVAL_S = 5.0


def enable_system_metrics() -> None:
    """Configure MLflow's system-metrics monitor for runs started with `log_system_metrics=True`."""
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # "Started/Stopping system metrics monitoring" at INFO on every run is noise in a trial log.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


@functools.cache
def source_tags() -> dict[str, str]:
    """The git commit of the checkout this code runs from, and whether tracked files differ from it (a run of
    uncommitted code cannot be re-run from its commit alone). Empty for an installed package or without git.
    `mlflow.source.git.commit` is the tag the MLflow UI shows as the run's source version."""
    import subprocess

    root = checkout_root()
    if root is None or not (root / ".git").exists():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}


_checked: set[str] = set()  # database stores that answered once in this process


def _check_database(uri: str) -> None:
    """One connection attempt (10 s at most) before MLflow opens the store: MLflow itself retries a database
    that does not answer for ~100 s, printing a multi-line warning each time, before its own error."""
    import sqlalchemy as sa

    if uri in _checked:
        return
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as e:
        reason = str(e.orig if e.orig is not None else e).strip().splitlines()[0]
        raise TrackingError(f"MLflow store {masked(uri)} does not answer: {reason}") from None
    finally:
        engine.dispose()
    _checked.add(uri)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id, creating it (with an explicit artifact location on embedded stores) if needed."""
    uri = resolve_tracking_uri(uri)
    client = setup(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or pick another name")
        for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag existed get it too
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = (artifact_root(uri) / name).as_uri() if is_local(uri) else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and create: use theirs.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def dataset_entity(manifest: dict, data_dir: str | Path, split: str | None = None):
    """The converted dataset (or one of its splits) as an MLflow dataset: its manifest digest is its identity.
    The source is resolved among the local-folder kind only: resolved among every registered kind, two matched
    and MLflow warned on every run that the source "can be interpreted in multiple ways"."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    local = [s for s in get_registered_sources() if s._get_source_type() == "local"][:1]  # one candidate
    source = resolve_dataset_source(Path(data_dir).resolve().as_uri(), candidate_sources=local or None)
    name = (Path(data_dir).name or "dataset") + (f"-{split}" if split else "")
    return MetaDataset(source, name=name, digest=manifest["digest"][:36])


def lost_insert_race(error: Exception) -> bool:
    """Whether a store write failed on a unique constraint another writer had just filled (SQLite's and
    PostgreSQL's wording, as a local store raises it and as a tracking server relays it)."""
    text = str(error)
    return "UNIQUE constraint failed" in text or "duplicate key value violates unique constraint" in text


def log_inputs_racing(log_inputs, *args, **kwargs) -> None:
    """Call an MLflow log-inputs function, once more if it lost a race to create the same dataset.

    MLflow's SQL store (`SqlAlchemyStore._log_inputs_impl`) looks the run's datasets up by (experiment, name,
    digest) and inserts the missing ones in one transaction: two workers logging the same new dataset at once
    both miss it, and the later commit fails the unique constraint (seen as a failed first trial in a two-worker
    study). That transaction rolled back whole, so the call repeated finds the winner's row and links it."""
    try:
        log_inputs(*args, **kwargs)
    except mlflow.exceptions.MlflowException as e:
        if not lost_insert_race(e):
            raise
        log_inputs(*args, **kwargs)


def log_metrics_racing(metrics: dict, **kwargs) -> None:
    """`mlflow.log_metrics`; given a `dataset`, MLflow links it to the run inside the call, before it logs any
    metric, so the call can lose the same race (a failed trial in a fresh-clone CI run: two workers' first
    validations, `data-val`). The lost call logged nothing and is repeated once."""
    log_inputs_racing(mlflow.log_metrics, metrics, **kwargs)


def log_dataset(manifest: dict, data_dir: str | Path, context: str = "training") -> None:
    """The converter's manifest digest as the run's dataset input: the dataset's identity."""
    log_inputs_racing(mlflow.log_input, dataset_entity(manifest, data_dir), context=context)
    mlflow.set_tag(tag_keys.DATASET_DIGEST, manifest["digest"])


@functools.cache
def pip_requirements() -> tuple[str, ...]:
    """Computed once per process: letting MLflow infer them costs ~9 s per log_model call here."""
    from importlib.metadata import version

    import keras
    import numpy as np
    import tensorflow as tf

    # The served model's decoders too: a clean environment (a Docker image, `--env-manager virtualenv`) gets
    # the versions it was validated with, not whatever the index serves that day.
    decoders = [f"{name}=={version(name)}" for name in SERVING_DECODERS]
    return (f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}",
            f"numpy=={np.__version__}", *decoders)


SERVING_DECODERS = ("pydicom", "pillow", "pylibjpeg", "pylibjpeg-openjpeg")


def inference_copy(model):
    """The same network without optimizer state (inference needs none; it would double the artifact)."""
    import keras

    # A new, uncompiled Functional over the same layers: no optimizer, no compile config, no weight copy.
    # (`clone_model` in Keras 3.15 carries the compile config over, and with it the optimizer state.)
    return keras.Model(inputs=model.input, outputs=model.output, name=model.name)


def log_keras_model(model, image_size: int, with_meta: bool, registered_model_name: str | None = None,
                    params: dict | None = None, threshold: float | None = None, temperature: float | None = None):
    """Log the model as the serving pyfunc (pipeline/artifact/serving.py) in MLflow's `loader_module` form: the
    network and its decision (`threshold`, `temperature`) as data, the project's
    package as `code_paths`, so the model loads where the project is not installed; with its signature and a
    tiny synthetic DICOM as the input example; registered as `registered_model_name` when given -> ModelInfo.

    No pickled object goes into the artifact: `pneumo serve` hashes every file before any is read. `image_size`
    and `with_meta` are read back from the network's own inputs at load, so they only check the caller here."""
    import tempfile

    import pandas as pd

    import pipeline
    from pipeline.artifact import serving
    from pipeline.net.model import uses_meta as model_uses_meta

    network = inference_copy(model)
    if int(network.inputs[0].shape[1]) != image_size or model_uses_meta(network) != bool(with_meta):
        raise ValueError(f"log_keras_model: the network takes {network.inputs[0].shape} images"
                         f"{' and metadata' if model_uses_meta(network) else ''}, not {image_size} px "
                         f"{'with' if with_meta else 'without'} metadata")
    settings = serving.settings_for(threshold, temperature)
    # A model logged without a decision (no threshold given) cannot be served, so its example would not answer:
    # MLflow validates an input example by loading the model and predicting it.
    servable = serving.TEMPERATURE_KEY in settings and serving.THRESHOLD_KEY in settings
    with tempfile.TemporaryDirectory(prefix="pneumo-model-") as tmp:
        data = serving.write_data(Path(tmp), network, settings)
        return mlflow.pyfunc.log_model(
            name="model",
            loader_module=serving.LOADER_MODULE,
            data_path=str(data),
            code_paths=[os.path.dirname(pipeline.__file__)],  # the package travels with the model (no __pycache__)
            signature=serving.signature(),
            input_example=pd.DataFrame(serving.input_example()) if servable else None,
            pip_requirements=list(pip_requirements()),
            registered_model_name=registered_model_name,
            params={k: str(v) for k, v in (params or {}).items()},  # MLflow 3's model view compares models by them
        )
