"""Labels and patient-level splits.

Two label sources become one record per patient:

* the RSNA label CSV (`patientId,x,y,width,height,Target`, one row per box), read by `read_rsna_labels`;
* image folders `NORMAL/` and `PNEUMONIA/` (the Kermany layout), read by `scan_image_dir`.

`split_patients` then assigns every patient to exactly one of train/val/test, stratified by label, so that no
patient's images leak across splits.

The converter imports this module in its parent process only (its decode workers never do); it stays cheap
all the same: numpy and pandas, no sklearn (`_split_off` says why), TensorFlow or MLflow.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.inputs import IMAGE_SUFFIXES
from pipeline.errors import InputError

__all__ = [
    "KERMANY_PATIENT_REGEX",
    "MAX_BOX_EXTENT",
    "ImageItem",
    "LabelError",
    "PatientLabel",
    "boxes_within",
    "read_rsna_labels",
    "scan_image_dir",
    "split_patients",
]

REQUIRED_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
BOX_COLUMNS = ("x", "y", "width", "height")

# Upper bound for x+width and y+height when a box is checked at CSV time, before the image size is known.
# It only catches garbage (e.g. 1e9, or coordinates in the wrong unit); the converter checks every box against
# the real image with `boxes_within`. 8192 rather than 4096: large-detector DX images reach ~4300 px.
MAX_BOX_EXTENT = 8192

# Kermany file names -> patient: person1000_bacteria_2931.jpeg -> person1000, IM-0115-0001.jpeg -> IM-0115,
# NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427. Covers every file of kermany-224/train (see tests).
KERMANY_PATIENT_REGEX = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"

CLASS_DIRS = (("NORMAL", 0), ("PNEUMONIA", 1))
SPLITS = ("train", "val", "test")


class LabelError(InputError):
    """Bad label input, with a one-line reason naming the file and row
    (e.g. 'labels.csv data row 17 (line 18): Target must be 0 or 1, got '2'')."""


@dataclass(frozen=True)
class PatientLabel:
    patient_id: str
    label: int  # 0 or 1
    # Pixel x, y, width, height in the original image; () for negatives.
    boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass(frozen=True)
class ImageItem:
    path: str
    patient_id: str
    label: int


# --------------------------------------------------------------------------------------------------------
# RSNA CSV


def _unsafe_id_mask(ids: pd.Series) -> pd.Series:
    """True where a patient id cannot be used as a file name: ids are joined to paths (`<id>.dcm`), so an id
    like '../x' or 'a/b' would read or write outside the data folder."""
    return (
        (ids == "")
        | ids.str.contains(r"[/\\\x00-\x1f]", regex=True)  # separators, NUL and other control characters
        | ids.str.startswith(".")  # '.', '..', hidden files
        | (ids != ids.str.strip())  # ' abc' would silently name a different file
        | (ids.str.len() > 200)  # stays below the 255-byte file-name limit with '.dcm'
    )


def read_rsna_labels(csv_path) -> dict[str, PatientLabel]:
    """Read the RSNA label CSV into one `PatientLabel` per patient (dict order = first appearance).

    Every problem raises `LabelError` naming the file and the first offending row, counted as 1-based
    *data* rows (the header is not a row), with the physical line number beside it:
    missing columns, unsafe patient ids, Target not 0/1, non-numeric box fields, partly filled boxes,
    a positive row without a box or a negative row with one, negative/NaN origins, non-positive sizes,
    boxes beyond MAX_BOX_EXTENT, and a patient whose rows disagree on Target.
    Several negative rows for one patient are accepted (they carry no information beyond the label).
    Extra columns are ignored.
    """
    path = Path(csv_path)
    name = path.name
    try:
        # Everything as text: numbers are parsed below so that a bad cell is reported, not silently NaN.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelError(f"{name}: file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LabelError(f"{name}: not a readable CSV: {str(exc).splitlines()[0]}") from None

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise LabelError(f"{name}: missing column(s) {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise LabelError(f"{name}: no label rows")

    ids = df["patientId"]
    target_text = df["Target"].str.strip()
    target = pd.to_numeric(target_text, errors="coerce")
    box_text = {c: df[c].str.strip() for c in BOX_COLUMNS}
    box = {c: pd.to_numeric(box_text[c], errors="coerce") for c in BOX_COLUMNS}
    filled = pd.DataFrame({c: box_text[c] != "" for c in BOX_COLUMNS})
    n_filled = filled.sum(axis=1)
    has_box = n_filled == 4
    valid_target = target.isin([0, 1])

    # Each check: (row mask, message for a row). The error reports the earliest bad row over all checks,
    # i.e. the first problem a reader of the file would meet.
    def cell(col):
        return lambda i: repr(df[col].iat[i])

    checks = [
        (_unsafe_id_mask(ids), lambda i: f"patientId {ids.iat[i]!r} is not a safe file name"),
        (~valid_target, lambda i: f"Target must be 0 or 1, got {cell('Target')(i)}"),
    ]
    for c in BOX_COLUMNS:
        checks.append(
            ((box_text[c] != "") & box[c].isna(), lambda i, c=c: f"{c} is not a number: {cell(c)(i)}")
        )
    checks += [
        ((n_filled > 0) & (n_filled < 4), lambda i: "box fields must be all empty or all filled"),
        (valid_target & (target == 1) & (n_filled == 0), lambda i: "positive row (Target 1) has no box"),
        (valid_target & (target == 0) & (n_filled > 0), lambda i: "negative row (Target 0) has a box"),
    ]
    # Box geometry, only for fully numeric boxes (NaN compares False, so those rows drop out here).
    x, y, w, h = (box[c] for c in BOX_COLUMNS)
    box_str = lambda i: f"({x.iat[i]:g}, {y.iat[i]:g}, {w.iat[i]:g}, {h.iat[i]:g})"  # noqa: E731
    checks += [
        (has_box & ((x < 0) | (y < 0) | ~np.isfinite(x) | ~np.isfinite(y)),
         lambda i: f"box {box_str(i)} has a negative or non-finite origin"),
        (has_box & ((w <= 0) | (h <= 0) | ~np.isfinite(w) | ~np.isfinite(h)),
         lambda i: f"box {box_str(i)} has a non-positive size"),
        (has_box & ((x + w > MAX_BOX_EXTENT) | (y + h > MAX_BOX_EXTENT)),
         lambda i: f"box {box_str(i)} reaches beyond {MAX_BOX_EXTENT} px"),
    ]
    # A patient whose rows disagree on Target: flag every row that differs from the patient's first row.
    first_target = target.groupby(ids, sort=False).transform("first")
    checks.append(
        (valid_target & (target != first_target),
         lambda i: f"patient {ids.iat[i]} has conflicting Targets "
                   f"({int(first_target.iat[i])} on an earlier row, {int(target.iat[i])} here)")
    )

    first_bad = None
    for mask, message in checks:
        hits = np.flatnonzero(mask.to_numpy(dtype=bool, na_value=False))
        if hits.size and (first_bad is None or hits[0] < first_bad[0]):
            first_bad = (int(hits[0]), message)
    if first_bad is not None:
        i, message = first_bad
        raise LabelError(f"{name} data row {i + 1} (line {i + 2}): {message(i)}")

    # Group rows by patient in first-appearance order. A plain loop over numpy arrays: ~30k rows in ~20 ms.
    labels: dict[str, int] = {}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    coords = np.stack([x.to_numpy(float), y.to_numpy(float), w.to_numpy(float), h.to_numpy(float)], axis=1)
    for pid, t, ok, row in zip(ids.tolist(), target.to_numpy(int).tolist(), has_box.tolist(),
                               coords.tolist(), strict=True):
        if pid not in labels:
            labels[pid] = t
            boxes[pid] = []
        if ok:
            boxes[pid].append(tuple(row))
    return {pid: PatientLabel(pid, labels[pid], tuple(boxes[pid])) for pid in labels}


def boxes_within(label: PatientLabel, width: int, height: int) -> bool:
    """True when every box of `label` lies inside a `width` x `height` image and has a positive size."""
    return all(
        x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height
        for x, y, w, h in label.boxes
    )


# --------------------------------------------------------------------------------------------------------
# Image folders (Kermany layout)


def scan_image_dir(root, patient_regex: str | None = None) -> tuple[list[ImageItem], bool]:
    """List the images under `root/NORMAL` (label 0) and `root/PNEUMONIA` (label 1), sorted by path.

    With `patient_regex` (exactly one capture group, `re.search`ed in the file *name*) group 1 is the patient
    id; a file it does not match is a LabelError. Without it every image is its own patient, with the id
    '<CLASS>/<relative path without extension>' (so the split cannot group a patient's images: the caller
    should warn). Returns (items, whether a patient rule was applied).

    Sub-folders are searched too; hidden files (names starting with '.', e.g. macOS '._x.jpeg') are skipped.
    """
    root = Path(root)
    rule = None
    if patient_regex is not None:
        try:
            rule = re.compile(patient_regex)
        except re.error as exc:
            raise LabelError(f"patient regex {patient_regex!r} is invalid: {exc}") from None
        if rule.groups != 1:
            raise LabelError(f"patient regex {patient_regex!r} must have exactly one capture group, "
                             f"has {rule.groups}")

    items: list[ImageItem] = []
    first_seen: dict[str, ImageItem] = {}  # patient -> first image, to report label conflicts
    for class_dir, label in CLASS_DIRS:
        folder = root / class_dir
        if not folder.is_dir():
            raise LabelError(f"{root}: missing class folder {class_dir}/ (expected NORMAL/ and PNEUMONIA/)")
        paths = sorted(
            p for p in folder.rglob("*")
            # not is_dir() rather than is_file(): a FIFO or device named x.png is listed, so the converter
            # rejects it with a reason instead of it vanishing silently
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
        )
        for p in paths:
            rel = p.relative_to(root)
            if rule is None:
                patient = rel.with_suffix("").as_posix()
            else:
                m = rule.search(p.name)
                if m is None or not m.group(1):
                    raise LabelError(f"{rel.as_posix()}: file name does not match patient regex "
                                     f"{patient_regex!r}")
                patient = m.group(1)
            item = ImageItem(path=os.fspath(p), patient_id=patient, label=label)
            earlier = first_seen.setdefault(patient, item)
            if earlier.label != label:
                raise LabelError(f"{rel.as_posix()}: patient {patient!r} has images in both NORMAL/ and "
                                 f"PNEUMONIA/ (also {Path(earlier.path).relative_to(root).as_posix()}): "
                                 f"conflicting labels")
            items.append(item)
    if not items:
        raise LabelError(f"{root}: no .png/.jpg/.jpeg images in NORMAL/ or PNEUMONIA/")
    return items, rule is not None


# --------------------------------------------------------------------------------------------------------
# Splits


def _check_frac(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < 1):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _split_off(ids: list[str], y: np.ndarray, frac: float, seed: int):
    """Split `ids` into (rest, taken) with ceil(frac * n) taken, stratified by label.

    Each class gives its share of the `n_take` places (largest remainder), drawn from a seeded permutation of
    that class, so the positive rate is the same on both sides up to rounding. At least one id always stays in
    `rest`, so that e.g. 1 patient with test_frac 0.2 ends up in train rather than raising.
    Written with numpy rather than sklearn's train_test_split: importing sklearn costs ~1.2 s of CPU, a large
    share of a small conversion's start-up (benchmarks/convert.py), for what is a dozen lines here.
    """
    n = len(ids)
    n_take = min(math.ceil(frac * n - 1e-9), n - 1) if frac > 0 else 0  # 1e-9: 0.2*5 must be 1, not 2
    if n_take <= 0:
        return ids, []
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    exact = np.array([len(m) for m in members]) * n_take / n
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: n_take - quota.sum()]:
        quota[k] += 1  # largest remainders get the places rounding left over
    taken_idx = np.concatenate([rng.permutation(m)[:q] for m, q in zip(members, quota, strict=True)])
    taken_set = set(taken_idx.tolist())
    rest = [ids[i] for i in range(n) if i not in taken_set]
    return rest, [ids[i] for i in sorted(taken_idx.tolist())]


def split_patients(labels: Mapping[str, int], test_frac: float, val_frac: float, seed: int) -> dict[str, str]:
    """Assign each patient id to 'train', 'val' or 'test' (the seed's split).

    test = test_frac of all patients, val = val_frac of the rest, train = what remains; stratified by label;
    a fraction of 0 leaves that split empty. Patients are sorted before splitting so the result depends
    only on the set of patients, the fractions and `seed`. Since val is a fraction of the rest, any pair of
    fractions in [0, 1) leaves a non-empty share for train; fractions outside [0, 1) raise ValueError.
    """
    test_frac = _check_frac("test_frac", test_frac)
    val_frac = _check_frac("val_frac", val_frac)
    ids = sorted(labels)
    bad = [pid for pid in ids if labels[pid] not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 0 or 1: patient {bad[0]!r} has {labels[bad[0]]!r}")
    y_of = {pid: int(labels[pid]) for pid in ids}
    y = np.array([y_of[p] for p in ids], dtype=int)

    rest, test = _split_off(ids, y, test_frac, seed)
    train, val = _split_off(rest, np.array([y_of[p] for p in rest], dtype=int), val_frac, seed)
    split = dict.fromkeys(train, "train")
    split.update(dict.fromkeys(val, "val"))
    split.update(dict.fromkeys(test, "test"))
    # Return in sorted-id order: the output depends only on the patients, the fractions and the seed.
    return {pid: split[pid] for pid in ids}
