"""The registry's tamper check: one sha256 over a model's artifact files, recorded on the version at promotion
(tag `model_sha256`) and verified by every loader (pipeline/artifact/model_store.py for predict, evaluate and explain;
pipeline/artifact/serving.py for the served model), which refuses a changed artifact with a one-line reason.

Below both loaders on purpose: it needs only hashing, so the serving pyfunc and the model store can share it
without importing each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import PneumoError
from pipeline.files import sha256_file


class ModelIntegrityError(PneumoError):
    """A registered model's artifact files no longer match the sha256 recorded at promotion: exit 1."""


def artifact_sha256(folder) -> str:
    """One sha256 over a model folder: each file's relative path and content hash, in sorted order."""
    root = Path(folder)
    # MLflow itself writes `registered_model_meta` (name, version) into the folder when a models:/ URI is
    # loaded, and Python writes `__pycache__` when `mlflow models serve` imports the model's code in place:
    # bookkeeping, not the model, so both are left out. The verified copy `pneumo serve` loads deletes any
    # `__pycache__` before loading (pipeline/artifact/model_store.py: verified_copy), so no unhashed byte runs.
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "registered_model_meta"
                   and "__pycache__" not in p.relative_to(root).parts)
    lines = "".join(f"{p.relative_to(root).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def verify(uri: str, local: str, expected: str | None) -> None:
    """ModelIntegrityError when a recorded sha256 does not match the files (nothing recorded: nothing to check)."""
    if expected and artifact_sha256(local) != expected:
        raise ModelIntegrityError(f"model {uri}: its artifact files changed since promotion (sha256 recorded "
                                  f"{expected[:12]}, now {artifact_sha256(local)[:12]} in {local}): refusing "
                                  "to score a tampered model; restore it or register and promote a new version")
