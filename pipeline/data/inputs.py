"""Input files for predict, explain and the served model: finding them, and their side-input vectors.

Decoding itself is `pipeline.data.dicom` (the converter's own), so a file gets the same pixels at prediction time
as its record got at conversion time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}  # in folders; a file named on the command line is always read
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def collect_paths(paths: Iterable[str | Path], suffixes: set[str] = DICOM_SUFFIXES, what: str = "DICOM",
                  error: type[Exception] = InputError) -> list[Path]:
    """Files as given, and the files with `suffixes` under folders (recursive, sorted, hidden files and
    DICOMDIR skipped). A path that does not exist is an error: a typo must not pass as an empty prediction."""
    out: list[Path] = []
    paths = list(paths)
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                          and f.name.upper() != "DICOMDIR" and f.suffix.lower() in suffixes)
        elif p.exists():
            out.append(p)
        else:
            raise error(f"{p}: no such file or folder")
    if not out:
        raise error(f"no {what} files under {', '.join(map(str, paths))}")
    return out


def meta_batch(meta: list[tuple[str, str, int]]) -> np.ndarray:
    """The model's side inputs (B, META_DIM) from (view position, sex, age) tuples, by the same function that
    builds them from the TFRecords (`records.metadata_vector`); unknown values are "", "" and -1."""
    from pipeline.data.records import metadata_vector

    view, sex, age = (np.array(col) for col in zip(*meta, strict=True))
    return metadata_vector(view.astype(str), sex.astype(str), age.astype(np.int64)).numpy()
