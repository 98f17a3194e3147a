"""Accelerators: which GPUs a process may use, how much of their memory it takes, and what `auto` picks.

- `configure_gpus()` runs in every process that trains or serves (train, tune workers, predict/serve loading a
  model) before TensorFlow's first op. TensorFlow otherwise maps nearly all of a GPU's memory at its first op,
  so a second process on the same GPU fails to allocate; with memory growth each takes what it uses.
  `PNEUMO_GPU_MEMORY_MB` caps each process instead (a hard per-worker limit, for GPUs shared on purpose).
- `visible_gpus()` lists the GPUs the launcher may hand out without importing TensorFlow: the user's own
  `CUDA_VISIBLE_DEVICES` list when it is set (ids or UUIDs, kept as written), else what `nvidia-smi -L` lists.
  `worker_gpu()` places worker w on one entry of that list (never `w % n` as a bare index, which would
  ignore the user's list), `workers_per_gpu` workers on each.
- `auto_precision()` / `auto_jit()`: mixed_float16 and XLA with a GPU, float32 and no XLA on the CPU.

Light at import (no TensorFlow): the launcher and `pneumo doctor` use it before deciding to import anything.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

MEMORY_ENV = "PNEUMO_GPU_MEMORY_MB"


def _tf():
    import tensorflow as tf

    return tf


def physical_gpus() -> list:
    """TensorFlow's physical GPU devices (empty on a CPU-only host or a CPU build)."""
    return list(_tf().config.list_physical_devices("GPU"))


def has_gpu() -> bool:
    """A GPU for the Keras backend in use: JAX's own device list under KERAS_BACKEND=jax (TensorFlow then only
    feeds data and may be a CPU build), TensorFlow's otherwise."""
    if os.environ.get("KERAS_BACKEND") == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return bool(physical_gpus())


def configure_gpus() -> str:
    """Memory growth (or the `PNEUMO_GPU_MEMORY_MB` cap) on every visible GPU; -> what was set, one line.

    Idempotent. TensorFlow refuses the setting once a GPU is initialised (RuntimeError): then this process
    already ran an op, the setting it had stays, and that is reported rather than raised."""
    tf = _tf()
    gpus = physical_gpus()
    if not gpus:
        return "no GPU"
    limit = os.environ.get(MEMORY_ENV, "").strip()
    try:
        for gpu in gpus:
            if limit:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=int(limit))])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:  # "Physical devices cannot be modified after being initialized"
        return f"GPU memory settings unchanged (already initialised: {e})"
    except ValueError:
        from pipeline.errors import InputError

        raise InputError(f"{MEMORY_ENV}={limit!r} is not a whole number of MiB") from None
    what = f"memory limit {int(limit)} MiB" if limit else "memory growth"
    return f"{len(gpus)} GPU(s), {what}"


def auto_precision() -> str:
    """What `train.precision = "auto"` picks: mixed_float16 with a GPU, float32 without (mixed_bfloat16 is ~10x
    slower on this CPU)."""
    return "mixed_float16" if has_gpu() else "float32"


def auto_jit() -> bool:
    """What `train.jit_compile = "auto"` picks: XLA on a GPU (where fusing the small convs pays), not on the CPU
    (compilation time is not repaid in a few epochs there, and Keras' image layers have no XLA kernel)."""
    return has_gpu()


def resolve_jit(setting: str) -> bool:
    """`train.jit_compile`: "auto" | "true" | "false" -> bool."""
    if setting == "auto":
        return auto_jit()
    return setting == "true"


@functools.cache
def _nvidia_smi_gpus() -> tuple[str, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU ")))


def visible_gpus(environ: dict | None = None) -> list[str]:
    """The GPU ids a launcher may give its workers, as CUDA_VISIBLE_DEVICES entries, without TensorFlow."""
    environ = os.environ if environ is None else environ
    user = environ.get("CUDA_VISIBLE_DEVICES")
    if user is not None:
        # CUDA stops at the first invalid entry ("-1" hides every GPU): so do we.
        out = []
        for entry in (e.strip() for e in user.split(",")):
            if not entry or entry.startswith("-"):
                break
            out.append(entry)
        return out
    return list(_nvidia_smi_gpus())


def default_workers(workers_per_gpu: int = 1, environ: dict | None = None) -> int:
    """`pneumo tune --workers` default: one per visible GPU (times the explicit sharing), 1 without a GPU."""
    return max(1, len(visible_gpus(environ)) * max(1, workers_per_gpu))


def worker_gpu(worker: int, gpus: list[str], workers_per_gpu: int = 1) -> str | None:
    """The CUDA_VISIBLE_DEVICES value of worker `worker`: consecutive workers share a GPU `workers_per_gpu` at
    a time, then the next GPU of the user's list; None without GPUs (the environment is left alone)."""
    if not gpus:
        return None
    return gpus[(worker // max(1, workers_per_gpu)) % len(gpus)]


def check_placement(workers: int, gpus: list[str], workers_per_gpu: int) -> None:
    """More workers than GPUs x sharing would put unplanned TensorFlow processes on one GPU: refuse."""
    from pipeline.errors import InputError

    if workers_per_gpu < 1:
        raise InputError(f"--workers-per-gpu must be >= 1, got {workers_per_gpu}")
    if gpus and workers > len(gpus) * workers_per_gpu:
        raise InputError(f"--workers {workers} on {len(gpus)} GPU(s) ({','.join(gpus)}) puts more than "
                         f"{workers_per_gpu} worker(s) on a GPU: pass --workers-per-gpu "
                         f"{-(-workers // len(gpus))} to share them on purpose, or fewer workers")
