"""`pneumo doctor`: what this host would train and serve with, one line each, and whether the stores answer.

Versions, the Keras backend, the GPUs TensorFlow sees (and CUDA_VISIBLE_DEVICES), what `train.precision =
"auto"` and `train.jit_compile = "auto"` pick here (pipeline/net/devices.py), the MLflow and Optuna stores the
other commands would use (pipeline/stores.py) and whether each answers. The probes only read: an embedded
SQLite store is opened read-only (a missing one is reported, never created), a tracking server is asked for
`/health`, a database server for `SELECT 1`. Exit 1 when a store does not answer.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sqlite3
import sys
import urllib.error
import urllib.request

from pipeline.errors import PneumoError, one_line
from pipeline.stores import masked, resolve_optuna_storage, resolve_tracking_uri, sqlite_path

PACKAGES = ("pneumo", "tensorflow", "keras", "jax", "mlflow", "optuna", "pydicom", "numpy")
PROBE_TIMEOUT = 5  # seconds: a store that takes longer than this to say hello is reported as not answering


class DoctorError(PneumoError):
    """A store did not answer (exit 1): the one line names which."""


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def probe_sqlite(url: str) -> tuple[bool, str]:
    """(answers, detail) for `sqlite:///path`, opened read-only: a missing file is not created."""
    path = sqlite_path(url)
    if not path.exists():
        return True, f"not created yet ({path.resolve()}; the first command that writes to it creates it)"
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT) as db:
            tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
    except sqlite3.Error as e:
        return False, f"cannot read {path}: {e}"
    return True, f"answers ({tables} tables in {path})"


def probe_http(url: str) -> tuple[bool, str]:
    """A tracking server's `/health` (MLflow answers 200 "OK")."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=PROBE_TIMEOUT) as r:
            return r.status == 200, f"answers (/health {r.status})"
    except (urllib.error.URLError, OSError) as e:
        return False, f"does not answer: {getattr(e, 'reason', e)}"


def probe_database(url: str) -> tuple[bool, str]:
    """`SELECT 1` on a database server through SQLAlchemy (what MLflow and Optuna use); creates nothing."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": PROBE_TIMEOUT}
                                          if url.startswith("postgresql") else {})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # driver missing, refused, auth: the reason is the line
        return False, f"does not answer: {one_line(e)[:200]}"
    return True, "answers (SELECT 1)"


def probe(url: str) -> tuple[bool, str]:
    if url.startswith("sqlite:///"):
        return probe_sqlite(url)
    if url.startswith(("http://", "https://")):
        return probe_http(url)
    if "://" in url:
        return probe_database(url)
    return False, "not a store URL"


def report(tracking_uri: str | None = None, storage: str | None = None) -> tuple[list[str], list[str]]:
    """(lines, names of the stores that did not answer)."""
    from pipeline.net import devices

    lines = [f"python        {platform.python_version()} ({sys.executable})"]
    lines += [f"{name:<13} {_version(name)}" for name in PACKAGES]
    lines.append(f"keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')} (train.backend picks it)")
    try:
        gpus = devices.physical_gpus()
        names = ", ".join(g.name for g in gpus) or "none"
        # what training will pick, asked of the functions training asks (they consult JAX under KERAS_BACKEND=jax)
        precision, jit = devices.auto_precision(), devices.auto_jit()
    except Exception as e:  # a broken CUDA install still gets the rest of the report
        names = f"unknown ({type(e).__name__}: {str(e)[:120]})"
        precision, jit = "float32", False
    lines.append(f"GPUs          {names}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; "
                 f"tune --workers default {devices.default_workers()}")
    try:
        cuda = devices.cuda_build()
    except Exception as e:  # noqa: BLE001 (a broken install still gets the rest of the report)
        cuda = f"unknown ({type(e).__name__}: {str(e)[:120]})"
    lines.append(f"CUDA          {cuda}; {devices.nvidia_driver()}")
    lines.append(f"precision     auto -> {precision}")
    lines.append(f"XLA           auto -> {'on' if jit else 'off'}"
                 + (" (with augment.xla_safe = true for rotation/zoom/translation)" if jit else ""))
    failed = []
    for what, url in (("MLflow store", resolve_tracking_uri(tracking_uri)),
                      ("Optuna store", resolve_optuna_storage(storage))):
        ok, detail = probe(url)
        lines.append(f"{what:<13} {masked(url)}: {detail}")
        if not ok:
            failed.append(f"{what} {masked(url)}")
    return lines, failed


def run_doctor(tracking_uri: str | None = None, storage: str | None = None, stdout=None) -> list[str]:
    lines, failed = report(tracking_uri, storage)
    print("\n".join(lines), file=stdout or sys.stdout, flush=True)
    if failed:
        raise DoctorError(f"{' and '.join(failed)} did not answer")
    return lines
