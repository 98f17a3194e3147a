"""The model is backend-neutral: the default CNN with its augmentation trains under JAX, fed by tf.data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# experiments/smoke.toml's [model] back to the default CNN (config.py's ModelConfig), a few steps.
DEFAULT_CNN = ["model.blocks=3", "model.filters=32", "model.stem_filters=32", "model.dense_units=64",
               "model.dropout=0.2"]


def test_default_cnn_trains_under_jax(synth_data, tmp_path):
    pytest.importorskip("jax", reason="the CPU build of jax is in the dev extras (pip install '.[dev]')")
    import mlflow
    from mlflow import MlflowClient

    from pipeline.artifact.model_store import load_keras
    from pipeline.config import load_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [*DEFAULT_CNN, "train.backend=jax", "train.epochs=4", "train.steps_per_epoch=5", "train.bootstrap=50",
            f"train.checkpoint_dir={tmp_path}/ckpt", "train.learning_rate=0.003"]
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the CLI must pick it from the config
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(REPO / "experiments" / "smoke.toml"),
           "--data", str(synth_data), "--tracking-uri", uri] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    assert run.data.tags["keras_backend"] == "jax" and run.data.params["train.backend"] == "jax"
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 4 and all(np.isfinite(loss)) and loss[-1] < loss[0], loss

    # The network trained under JAX, loaded here under TensorFlow (the .keras format is backend-neutral):
    # finite predictions, different from the same seed's untrained network.
    from pipeline.net.model import apply_precision, build_model

    mlflow.set_tracking_uri(uri)
    trained = load_keras(f"runs:/{run.info.run_id}/model")
    cfg = load_config(REPO / "experiments" / "smoke.toml", sets[:-2] + ["train.backend=tensorflow"])
    apply_precision("float32")
    init = build_model(cfg.model, cfg.augment, 64, seed=cfg.train.seed)
    x = {"image": np.random.default_rng(0).integers(0, 256, (8, 64, 64, 1), dtype=np.uint8)}
    after, before = trained.predict(x, verbose=0).reshape(-1), init.predict(x, verbose=0).reshape(-1)
    assert np.all(np.isfinite(after)) and np.max(np.abs(after - before)) > 1e-3


def test_swa_batch_norm_recompute_runs_under_jax():
    """SWA's batch-norm recompute assigns the layers' statistics eagerly, which differs by backend (JAX cannot
    take a Keras variable where an array is expected): tests/test_train.py's exact check, run under JAX."""
    pytest.importorskip("jax", reason="the CPU build of jax is in the dev extras (pip install '.[dev]')")
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = ("import keras; assert keras.backend.backend() == 'jax'\n"
              "from test_train import check_batch_norm_recompute; check_batch_norm_recompute()")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
