"""Reading a converted dataset's `manifest.json` (written last by `pipeline.data.convert`): one reader for every
stage, with one-line errors that say what to run. No TensorFlow here: the registry and the launcher use it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError, one_line


class DataError(InputError):
    """A one-line reason a data folder cannot be read (missing manifest, damaged shard, empty split)."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: run `pneumo convert` first (or pass --data)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({one_line(e)})") from None
    if not isinstance(manifest, dict) or "splits" not in manifest or "digest" not in manifest:
        raise DataError(f"{path}: not a manifest written by `pneumo convert` (no splits or digest)")
    return manifest


def dataset_digest(data_dir: str | Path) -> str:
    return load_manifest(data_dir)["digest"]
