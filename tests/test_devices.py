"""GPU placement without a GPU: the device list is faked (TensorFlow's, and the user's CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import types

import pytest

from pipeline.net import devices


class FakeGPU:
    def __init__(self, i: int):
        self.name, self.device_type = f"/physical_device:GPU:{i}", "GPU"


@pytest.fixture()
def fake_gpus(monkeypatch):
    """Two GPUs as TensorFlow would list them; memory settings recorded instead of applied."""
    import tensorflow as tf

    calls = []
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [FakeGPU(0), FakeGPU(1)] if kind == "GPU" else real(kind))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda gpu, on: calls.append(("growth", gpu.name, on)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda gpu, cfgs: calls.append(("limit", gpu.name, cfgs[0].memory_limit)))
    # Turing cards (T4: compute capability 7.5), as TensorFlow's device details describe them
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda gpu: {"device_name": "Tesla T4", "compute_capability": (7, 5)})
    return calls


def test_memory_growth_on_every_gpu(fake_gpus, monkeypatch):
    monkeypatch.delenv(devices.MEMORY_ENV, raising=False)
    assert devices.configure_gpus() == "2 GPU(s), memory growth"
    assert fake_gpus == [("growth", "/physical_device:GPU:0", True), ("growth", "/physical_device:GPU:1", True)]


def test_memory_limit_per_worker(fake_gpus, monkeypatch):
    monkeypatch.setenv(devices.MEMORY_ENV, "2048")
    assert devices.configure_gpus() == "2 GPU(s), memory limit 2048 MiB"
    assert fake_gpus == [("limit", "/physical_device:GPU:0", 2048), ("limit", "/physical_device:GPU:1", 2048)]
    monkeypatch.setenv(devices.MEMORY_ENV, "lots")
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="PNEUMO_GPU_MEMORY_MB='lots' is not a whole number"):
        devices.configure_gpus()


def test_already_initialised_gpu_is_reported_not_raised(fake_gpus, monkeypatch):
    import tensorflow as tf

    def refuse(gpu, on):
        raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.delenv(devices.MEMORY_ENV, raising=False)
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", refuse)
    assert devices.configure_gpus().startswith("GPU memory settings unchanged (already initialised")


def test_no_gpu_here():
    assert devices.configure_gpus() == "no GPU"  # this host: nothing to set
    assert devices.auto_precision() == "float32" and devices.resolve_jit("auto") is False


def test_auto_picks_mixed_precision_and_xla_on_a_gpu(fake_gpus):
    from pipeline.net.model import resolve_precision

    assert resolve_precision("auto") == "mixed_float16" and resolve_precision("float32") == "float32"
    assert devices.resolve_jit("auto") is True
    assert devices.resolve_jit("false") is False and devices.resolve_jit("true") is True


def test_workers_index_the_users_gpu_list():
    from pipeline.study.tune import worker_env

    env = {"CUDA_VISIBLE_DEVICES": "3,5", "OTHER": "kept"}
    gpus = devices.visible_gpus(env)
    assert gpus == ["3", "5"]
    assert [worker_env(w, gpus, 1, env)["CUDA_VISIBLE_DEVICES"] for w in range(2)] == ["3", "5"]
    assert [worker_env(w, gpus, 2, env)["CUDA_VISIBLE_DEVICES"] for w in range(4)] == ["3", "3", "5", "5"]
    assert worker_env(0, gpus, 1, env)["OTHER"] == "kept"
    uuids = devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8f2a,GPU-11c0"})
    assert worker_env(1, uuids, 1, {})["CUDA_VISIBLE_DEVICES"] == "GPU-11c0"
    # No GPU (hidden with -1 or an empty list): the environment is left as the user set it.
    for hidden in ("-1", "", "-1,0"):
        assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": hidden}) == []
        assert worker_env(0, [], 1, {"CUDA_VISIBLE_DEVICES": hidden})["CUDA_VISIBLE_DEVICES"] == hidden


def test_default_workers_and_explicit_sharing(monkeypatch):
    from pipeline.errors import InputError

    assert devices.default_workers(1, {"CUDA_VISIBLE_DEVICES": "3,5"}) == 2
    assert devices.default_workers(3, {"CUDA_VISIBLE_DEVICES": "3,5"}) == 6
    assert devices.default_workers(1, {"CUDA_VISIBLE_DEVICES": ""}) == 1  # no GPU: one worker
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no nvidia-smi either
    devices._nvidia_smi_gpus.cache_clear()
    try:
        assert devices.default_workers(1, {}) == 1
    finally:
        devices._nvidia_smi_gpus.cache_clear()
    devices.check_placement(4, ["3", "5"], 2)
    devices.check_placement(4, [], 1)  # CPU workers: nothing to place
    with pytest.raises(InputError, match=r"--workers 4 on 2 GPU\(s\) \(3,5\) .* pass --workers-per-gpu 2"):
        devices.check_placement(4, ["3", "5"], 1)


def test_launcher_starts_each_worker_on_its_gpu(monkeypatch):
    """`_run_worker_processes` hands worker w the w-th entry of the user's list (not `w % gpus`)."""
    from pipeline.study import tune

    started = []

    class Proc:
        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(tune.subprocess, "Popen", lambda cmd, env: started.append(env) or Proc())
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    tune._run_worker_processes(types.SimpleNamespace(study="s"), 2, devices.visible_gpus(), 1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in started] == ["3", "5"]


def test_tune_workers_flag_defaults_to_the_gpus():
    from pipeline.cli import build_parser

    a = build_parser().parse_args(["tune", "--config", "x.toml", "--study", "s"])
    assert a.workers is None and a.workers_per_gpu == 1  # run_tune: devices.default_workers


def test_jit_compile_config_takes_auto_and_booleans(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "e.toml"
    path.write_text("[train]\njit_compile = true\nbackend = 'jax'\n")
    cfg = load_config(path)
    assert cfg.train.jit_compile == "true" and cfg.train.backend == "jax"
    assert load_config(path, ["train.jit_compile=auto"]).train.jit_compile == "auto"
    assert load_config(path, ["train.jit_compile=false"]).train.jit_compile == "false"
    with pytest.raises(ConfigError, match="train.jit_compile.*must be one of auto, true, false"):
        load_config(path, ["train.jit_compile=maybe"])
    with pytest.raises(ConfigError, match="train.backend.*must be one of tensorflow, jax"):
        load_config(path, ["train.backend=torch"])


def test_doctor_reports_and_fails_on_a_store_that_does_not_answer(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main
    from pipeline.ui import free_port

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "mlflow.db"
    optuna_db = tmp_path / "optuna.db"
    import sqlite3

    sqlite3.connect(optuna_db).execute("CREATE TABLE studies (id INTEGER)").connection.close()
    code = main(["doctor", "--tracking-uri", f"sqlite:///{missing}", "--storage", f"sqlite:///{optuna_db}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tensorflow    2.21" in out and "precision     auto -> float32" in out and "XLA           auto -> off" in out
    assert f"not created yet ({missing}; the first command that writes" in out and "answers (1 tables" in out
    assert not missing.parent.exists()  # read-only: nothing created

    port = free_port()
    code = main(["doctor", "--tracking-uri", f"http://127.0.0.1:{port}", "--storage", f"sqlite:///{optuna_db}"])
    captured = capsys.readouterr()
    assert code == 1
    assert f"MLflow store  http://127.0.0.1:{port}: does not answer" in captured.out
    assert captured.err.strip() == f"pneumo doctor: error: MLflow store http://127.0.0.1:{port} did not answer"


def test_doctor_shows_what_auto_picks_on_a_gpu(fake_gpus, tmp_path):
    from pipeline.doctor import report

    lines, failed = report(f"sqlite:///{tmp_path}/m.db", f"sqlite:///{tmp_path}/o.db")
    text = "\n".join(lines)
    assert "/physical_device:GPU:0, /physical_device:GPU:1" in text
    assert "precision     auto -> mixed_float16" in text and "XLA           auto -> on" in text
    assert failed == []


def test_doctor_asks_jax_for_the_gpu_under_the_jax_backend(tmp_path, monkeypatch):
    """Under KERAS_BACKEND=jax the GPU that counts is JAX's (a CPU TensorFlow only feeds data there): doctor
    reports what training's own `auto` rules pick, not a rule of its own."""
    import jax

    from pipeline.doctor import report

    class Gpu:
        platform = "gpu"

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [Gpu()])  # TensorFlow still sees no GPU on this host
    text = "\n".join(report(f"sqlite:///{tmp_path}/m.db", f"sqlite:///{tmp_path}/o.db")[0])
    assert "precision     auto -> mixed_float16" in text and "XLA           auto -> on" in text


@pytest.mark.parametrize("details, expected", [
    ([{"compute_capability": (9, 0)}, {"compute_capability": (9, 0)}], "mixed_bfloat16"),  # H100 / H200
    ([{"compute_capability": (8, 0)}, {"compute_capability": (8, 6)}], "mixed_bfloat16"),  # A100, A40
    ([{"compute_capability": (8, 0)}, {"compute_capability": (7, 0)}], "mixed_float16"),  # the oldest decides
    ([{"compute_capability": (7, 5)}, {"compute_capability": (7, 5)}], "mixed_float16"),  # T4
    ([{}, {}], "mixed_float16"),  # no capability reported: float16 runs on every CUDA GPU
])
def test_auto_precision_follows_the_compute_capability(fake_gpus, monkeypatch, details, expected):
    import tensorflow as tf

    by_name = {f"/physical_device:GPU:{i}": d for i, d in enumerate(details)}
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: by_name[gpu.name])
    assert devices.auto_precision() == expected
    assert devices.precision_for([]) == "float32"


def test_doctor_reports_the_cuda_build_and_the_driver(tmp_path, monkeypatch):
    """Faked descriptions: a CPU build says so with the install line; a CUDA build names CUDA, cuDNN and the
    driver nvidia-smi reports."""
    import subprocess

    import tensorflow as tf

    from pipeline.doctor import report

    def text():
        return "\n".join(report(f"sqlite:///{tmp_path}/m.db", f"sqlite:///{tmp_path}/o.db")[0])

    monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {"is_cuda_build": False})
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    cpu = text()
    assert "TensorFlow is a CPU build: it will use no GPU (the CUDA build: pip install 'pneumo[gpu]')" in cpu
    assert "no NVIDIA driver (nvidia-smi not found)" in cpu
    monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {
        "is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9", "cuda_compute_capabilities": ["sm_80"]})
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 0, stdout="550.54.15\n550.54.15\n", stderr=""))
    assert "TensorFlow CUDA build: CUDA 12.5.1, cuDNN 9, kernels for sm_80; NVIDIA driver 550.54.15" in text()
