"""Shared fixtures: one synthetic DICOM set and its TFRecords per test session (the suite's main cost is
training, so the data is made once), plus per-test MLflow/Optuna stores in tmp folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path in ../shared/data, or skip the test with the reason when it is not there (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (tests that need ../shared/data skip)")
    return path


def repo_env(**extra: str) -> dict:
    """A subprocess environment that imports the repository (and `tests.`) from REPO, with `extra` set."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_postgres(reason: str):
    """Skip a PostgreSQL test when no server answers, except under CI (`CI=true`, set by .ci/run, which starts
    the server): there a missing server fails the test, so the suite cannot go green without its scale-out
    tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}: .ci/run starts PostgreSQL and should have failed first", pytrace=False)
    pytest.skip(reason)


def wait_for(predicate, timeout: float, what: str, launcher: subprocess.Popen | None = None,
             log: Path | None = None):
    """Poll `predicate` until it returns something truthy; fail fast (with the log's tail) if the launched
    process ended first, rather than waiting out the timeout."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if launcher is not None and launcher.poll() is not None:
            raise AssertionError(f"the launch ended (exit {launcher.returncode}) before {what}:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def server_group(port: int) -> int | None:
    """The process group of the `mlflow server` listening on `port`: its leader's pid (pipeline/ui.py starts
    it in its own session), or None when there is none."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"server" in cmd and str(port).encode() in cmd and int(stat[2]) == int(name):
            return int(name)
    return None


def stop_launcher(proc: subprocess.Popen, port: int) -> None:
    """A test's cleanup of a `pneumo ui` it started: if the launcher has not exited, SIGKILL its group and the
    server's own group too (killed, the launcher cannot stop its server), so a failed test leaves nothing running."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if (pgid := server_group(port)) is not None:
        os.killpg(pgid, signal.SIGKILL)


# The test files that take longest, the heaviest first (pytest --junitxml, per-file sums of a `make test` run
# on 2026-12-07: 242 s down to 28 s; together about 94% of the suite's 1,546 s). `make test` runs
# `--dist loadfile --no-loadscope-reorder`, so xdist hands out whole files in collection order; this hook puts
# these first. xdist's default order (the files with the most tests first) started the few-test, minute-long
# files last, and one worker ran the PostgreSQL scale-out file alone for the suite's last four minutes. A
# file not named here keeps its place after them: a stale list costs balance, never a test.
HEAVIEST_FIRST = ("test_scale_out", "test_tune", "test_registry", "test_train", "test_backend", "test_shift",
                  "test_ensemble", "test_backbone", "test_distributed", "test_serve", "test_cli",
                  "test_servers_auth", "test_legacy_models", "test_explain", "test_serving", "test_ui")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept


# `mlflow.set_tracking_uri` (called by pipeline.artifact.tracking.setup) also writes $MLFLOW_TRACKING_URI, so one test's
# store would leak into every later test and the subprocesses they start: an order-dependent coupling. Each test
# starts from the environment (and MLflow URI) it had before the previous one ran.
_PROCESS_GLOBALS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KERAS_BACKEND")


@pytest.fixture(autouse=True)
def _restore_process_globals():
    saved = {k: os.environ.get(k) for k in _PROCESS_GLOBALS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "mlflow" in sys.modules:
        # MLflow keeps both URIs in module globals too; a registry URI left behind sends a later test's
        # `MlflowClient()` registry calls into an earlier test's store (it once made a test's model "already exist")
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = saved["MLFLOW_TRACKING_URI"]
        registry_utils._registry_uri = saved["MLFLOW_REGISTRY_URI"]


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """240 RSNA-like synthetic DICOMs at 128 px (25% positive) in the real layout."""
    from pipeline.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth-raw")
    make_synthetic_dataset(out, n=240, size=128, seed=0, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_data(synth_raw, tmp_path_factory) -> Path:
    """Those DICOMs converted at 64 px: the TFRecords every training test reads."""
    from pipeline.data.convert import convert_rsna

    out = tmp_path_factory.mktemp("synth-tfrecords") / "data"
    convert_rsna(synth_raw / "stage_2_train_images", synth_raw / "stage_2_train_labels.csv", out,
                 image_size=64, workers=2, progress=False)
    return out


@pytest.fixture()
def tracking_uri(tmp_path) -> str:
    """A fresh embedded MLflow store for one test."""
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.fixture()
def smoke_config(tmp_path):
    """experiments/smoke.toml with checkpoints kept in the test's tmp folder."""
    from pipeline.config import load_config

    def make(*overrides: str):
        return load_config(REPO / "experiments" / "smoke.toml",
                           [f"train.checkpoint_dir={tmp_path}/ckpt", *overrides])

    return make
