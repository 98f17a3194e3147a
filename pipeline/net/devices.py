"""Accelerators: which GPUs a process may use, how much of their memory it takes, and what `auto` picks.

- `configure_gpus()` runs in every process that trains or serves (train, tune workers, predict/serve loading a
  model) before TensorFlow's first op. TensorFlow otherwise maps nearly all of a GPU's memory at its first op,
  so a second process on the same GPU fails to allocate; with memory growth each takes what it uses.
  `PNEUMO_GPU_MEMORY_MB` caps each process instead (a hard per-worker limit, for GPUs shared on purpose).
- `visible_gpus()` lists the GPUs the launcher may hand out without importing TensorFlow: the user's own
  `CUDA_VISIBLE_DEVICES` list when it is set (ids or UUIDs, kept as written), else what `nvidia-smi -L` lists.
  `worker_gpu()` places worker w on one entry of that list (never `w % n` as a bare index, which would
  ignore the user's list), `workers_per_gpu` workers on each.
- `auto_precision()` / `auto_jit()`: mixed_bfloat16 (compute capability >= 8.0) or mixed_float16 and XLA with a
  GPU, float32 and no XLA on the CPU.

Light at import (no TensorFlow): the launcher and `pneumo doctor` use it before deciding to import anything.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

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


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of every GPU the Keras backend sees (JAX's devices under KERAS_BACKEND=jax, TensorFlow's
    otherwise); GPUs that do not report one are left out."""
    if os.environ.get("KERAS_BACKEND") == "jax":
        import jax

        found = [str(getattr(d, "compute_capability", "") or "") for d in jax.devices() if d.platform == "gpu"]
        return [tuple(int(x) for x in cc.split(".")[:2]) for cc in found if cc]
    tf = _tf()
    out = []
    for gpu in physical_gpus():
        try:
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except (ValueError, RuntimeError):  # a device TensorFlow cannot describe: no capability known
            cc = None
        if cc:
            out.append((int(cc[0]), int(cc[1])))
    return out


def precision_for(capabilities: list[tuple[int, int]]) -> str:
    """The mixed policy for these GPUs: bfloat16 from compute capability 8.0 (A100, H100, H200: bfloat16 tensor
    cores, and float32's exponent range, so no loss scaling), float16 below (Volta, Turing), float32 with none.
    The oldest GPU decides: one policy runs on all of them."""
    if not capabilities:
        return "float32"
    return "mixed_bfloat16" if min(capabilities) >= (8, 0) else "mixed_float16"


def auto_precision() -> str:
    """What `train.precision = "auto"` picks: `precision_for` the GPUs, float32 without one (mixed_bfloat16 is
    ~10x slower on this CPU); mixed_float16 on a GPU that reports no compute capability (it runs on any)."""
    if not has_gpu():
        return "float32"
    capabilities = gpu_compute_capabilities()
    return precision_for(capabilities) if capabilities else "mixed_float16"


def auto_jit() -> bool:
    """What `train.jit_compile = "auto"` picks: XLA on a GPU (where fusing the small convs pays), not on the CPU
    (compilation time is not repaid in a few epochs there, and Keras' image layers have no XLA kernel)."""
    return has_gpu()


def resolve_jit(setting: str) -> bool:
    """`train.jit_compile`: "auto" | "true" | "false" -> bool."""
    if setting == "auto":
        return auto_jit()
    return setting == "true"


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up log kept off the terminal: absl lines written before logging is
    set up (oneDNN notes, "Could not find cuda drivers", a cuInit error on a CPU host), which
    TF_CPP_MIN_LOG_LEVEL does not reach in TensorFlow 2.21, and which users read as faults. Stderr (fd 2) goes
    to a temporary file for the import and the first device query; it is replayed if the import fails, and
    nothing is hidden when PNEUMO_VERBOSE=1 (or TensorFlow is already imported)."""
    if "tensorflow" in sys.modules or os.environ.get("PNEUMO_VERBOSE") == "1":
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # where the CUDA probe logs
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            os.write(2, log.read())  # a failed import keeps every word of why
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cuda_build() -> str:
    """Whether TensorFlow is a CUDA build, and which CUDA and cuDNN it was built against (one line): a CPU build
    on a GPU host is the usual reason for "no GPUs" (a forgotten `[gpu]` extra)."""
    info = dict(_tf().sysconfig.get_build_info())
    if not info.get("is_cuda_build"):
        return "TensorFlow is a CPU build: it will use no GPU (the CUDA build: pip install 'pneumo[gpu]')"
    return (f"TensorFlow CUDA build: CUDA {info.get('cuda_version', '?')}, cuDNN {info.get('cudnn_version', '?')}"
            f", kernels for {', '.join(info.get('cuda_compute_capabilities', [])) or '?'}")


def nvidia_driver() -> str:
    """The NVIDIA driver version nvidia-smi reports, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver (nvidia-smi not found)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"
    versions = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return f"NVIDIA driver {', '.join(versions)}" if out.returncode == 0 and versions else \
        f"nvidia-smi answered no driver ({(out.stderr or out.stdout).strip()[:120]})"


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
