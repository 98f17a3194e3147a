"""The model is backend-neutral: the default CNN with its augmentation trains under JAX, fed by tf.data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, repo_env

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
    # With XLA, as `train.jit_compile = "auto"` picks on a GPU (the device path: the GPU machines run the model
    # under JAX), and the augmentation XLA compiles. Its predict step once crashed on the reader's TensorFlow
    # tensors, which the un-jitted step (the CPU's default, tested with EMA below) took.
    sets = [*DEFAULT_CNN, "train.backend=jax", "train.jit_compile=true", "augment.xla_safe=true", "train.epochs=4",
            "train.steps_per_epoch=5", "train.bootstrap=50", f"train.checkpoint_dir={tmp_path}/ckpt",
            "train.learning_rate=0.003"]
    env = repo_env()
    env.pop("KERAS_BACKEND", None)  # the CLI must pick it from the config
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(REPO / "experiments" / "smoke.toml"),
           "--data", str(synth_data), "--tracking-uri", uri] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    assert run.data.tags["keras_backend"] == "jax" and run.data.params["train.backend"] == "jax"
    assert run.data.tags["jit_compile_effective"] == "True", run.data.tags
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
    env = repo_env(KERAS_BACKEND="jax")
    script = ("import keras; assert keras.backend.backend() == 'jax'\n"
              "from tests.test_train import check_batch_norm_recompute; check_batch_norm_recompute()")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


EMA_SCRIPT = r'''
import json, sys
import keras

from pipeline.config import load_config
from pipeline.study.train import train
from tests.test_train import WeightRecorder, gap, keras_ema, weights

data_dir, out_dir, config = sys.argv[1:4]
cfg = load_config(config, [f"train.checkpoint_dir={out_dir}/ckpt", "train.backend=jax", "train.weight_averaging=ema",
                           "train.ema_momentum=0.9", "train.epochs=2", "train.steps_per_epoch=4",
                           "train.log_model=false", "train.shift_battery=false", "train.bootstrap=0"])
record = WeightRecorder()
result = train(cfg, data_dir, tracking_uri=f"sqlite:///{out_dir}/mlflow.db", callbacks=[record], verbose=0)
raw = record.raw
print("REPORT " + json.dumps({"backend": keras.backend.backend(), "steps": len(raw),
                              "final_vs_ema": gap(weights(result.model), keras_ema(raw)),
                              "first_validation_vs_ema": gap(record.validated[0], keras_ema(raw[:4])),
                              "final_vs_last_raw": gap(weights(result.model), raw[-1]),
                              "second_epoch_start_vs_raw": gap(record.at_start[1], raw[3])}), flush=True)
'''


def test_ema_is_the_average_of_the_raw_weights_under_jax(synth_data, tmp_path):
    """JAX's trainer keeps the weights outside the model between steps, so the EMA swap has its own code path
    there: the model still ends with the step-by-step EMA of the raw weights, and the second epoch trains on
    from the raw weights, not the average, and validation sees the average (tests/test_train.py checks the same
    and more under TensorFlow)."""
    pytest.importorskip("jax", reason="the CPU build of jax is in the dev extras (pip install '.[dev]')")
    env = repo_env(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", EMA_SCRIPT, str(synth_data), str(tmp_path),
                           str(REPO / "experiments" / "smoke.toml")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["backend"] == "jax" and report["steps"] == 8, report
    assert report["final_vs_ema"] < 1e-5 and report["first_validation_vs_ema"] < 1e-5, report
    assert report["second_epoch_start_vs_raw"] == 0.0, report
    assert report["final_vs_last_raw"] > 1e-4, report  # the average is not the last weights: the check can fail
