"""`pneumo predict`: DICOM files -> one CSV row each with the model's probability and decision.

Decoding is the converter's own (`pipeline.data.dicom.read_dicom` at the model's input size), so a file gets the same
probability here as its record gets from `pneumo evaluate`. Every input gets a row:
- `ok`: predicted; `prediction` applies the threshold stored with the model (chosen on validation);
- `skipped`: out of scope by its header (Modality not CR/DX/DR, BodyPartExamined present and not CHEST, or
  more than one frame): a `warning` and no probability, unless `force` (then predicted, warning kept; a
  multi-frame file cannot be decoded at all and stays skipped);
- `error`: unreadable (not DICOM, corrupt pixels, no decoder...): the reason in `error`; the others still run.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.artifact.model_store import LoadedModel, champion_uri, load
from pipeline.data.dicom import screen_dicom
from pipeline.data.inputs import collect_paths, meta_batch
from pipeline.errors import InputError

COLUMNS = ["path", "patient_id", "probability", "prediction", "model_version", "dataset_digest", "status",
           "warning", "error"]
PROGRESS_MIN = 50  # files: fewer finish before a progress bar would be worth drawing


class PredictError(InputError):
    """A one-line reason prediction could not run (or that some files failed)."""


def _decode(path: Path, size: int, force: bool) -> dict:
    row = {"path": str(path), "patient_id": "", "status": "ok", "warning": "", "error": ""}
    screened = screen_dicom(path, size)
    img = screened.image
    if screened.error:
        row.update(status="error", error=screened.error)
        return row
    if img is None:  # multi-frame: out of scope, and nothing to score even with --force
        row.update(status="skipped", warning=screened.out_of_scope)
        return row
    row["patient_id"] = img.patient_id
    row["warning"] = screened.out_of_scope
    if row["warning"] and not force:
        row["status"] = "skipped"
    if row["status"] == "ok":
        row["_pixels"], row["_meta"] = img.pixels, (img.view_position, img.sex, img.age)
    return row


def predict_files(files: list[Path], lm: LoadedModel, *, force: bool = False, batch_size: int = 64,
                  progress: bool | None = None, workers: int = 2):
    """-> pandas DataFrame with one row per file (COLUMNS), in input order."""
    import pandas as pd
    from tqdm import tqdm

    show = progress if progress is not None else len(files) >= PROGRESS_MIN
    rows: list[dict] = []
    bar = tqdm(total=len(files), unit="file", desc="predict", disable=None if show else True, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow and pydicom release the GIL
        for start in range(0, len(files), batch_size):
            chunk = list(pool.map(lambda p: _decode(p, lm.image_size, force), files[start:start + batch_size]))
            ready = [r for r in chunk if "_pixels" in r]
            if ready:
                images = np.stack([r.pop("_pixels") for r in ready])[..., None]
                meta = [r.pop("_meta") for r in ready]
                probs = lm.probabilities(images, meta_batch(meta) if lm.uses_meta else None)
                for r, p in zip(ready, probs, strict=True):
                    r.update(probability=float(p), prediction=int(p >= lm.threshold))
            rows += chunk
            bar.update(len(chunk))
    bar.close()
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    df["model_version"], df["dataset_digest"] = lm.version, lm.digest
    df["prediction"] = df["prediction"].astype("Int64")  # blank, not NaN-as-float, where nothing was predicted
    return df


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP): a PatientID or
# a file name from outside is text, so it is written with a leading apostrophe, which spreadsheets hide.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(df) -> str:
    """The predictions as CSV with every text cell that could start a formula escaped (numbers untouched).

    Lines end in CRLF (RFC 4180). Python's csv writer quotes a cell only for the characters of its own line
    terminator, so with pandas' "\n" a file name holding a bare CR went out unquoted, and a spreadsheet, which
    ends rows at a CR, read the rest as a new row whose first cell was never checked for a formula."""
    import pandas as pd

    safe = df.copy()
    for col in safe.columns:
        if safe[col].dtype == object or pd.api.types.is_string_dtype(safe[col]):
            safe[col] = safe[col].map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v)
    return safe.to_csv(index=False, float_format="%.6f", lineterminator="\r\n")


def write_csv(df, path: str | Path) -> None:
    """Atomic (temp file + rename, via evaluate.atomic_write): a reader never sees half a CSV."""
    from pipeline.files import atomic_write

    atomic_write(path, lambda fh: fh.write(csv_text(df).encode("utf-8")))


def format_table(df, limit: int = 20) -> str:
    """A short terminal table: file, probability, prediction, status and the first words of any problem."""
    lines = [f"{'file':<40} {'probability':>11} {'pred':>4}  {'status':<8} note"]
    for r in df.head(limit).itertuples():
        name = Path(r.path).name
        name = name if len(name) <= 40 else "..." + name[-37:]
        prob = f"{r.probability:.4f}" if r.probability == r.probability else "-"
        pred = "-" if r.prediction is None or str(r.prediction) == "<NA>" else str(r.prediction)
        note = str(r.error or r.warning or "")
        lines.append(f"{name:<40} {prob:>11} {pred:>4}  {r.status:<8} {note[:60]}")
    if len(df) > limit:
        lines.append(f"... {len(df) - limit} more rows")
    return "\n".join(lines)


def summary(df, lm: LoadedModel, out: str | None) -> str:
    counts = df["status"].value_counts()
    ok, skipped, failed = (int(counts.get(k, 0)) for k in ("ok", "skipped", "error"))
    positives = int((df["prediction"] == 1).sum())
    text = (f"predicted {ok} of {len(df)} files with {lm.uri} (version {lm.version}, threshold "
            f"{lm.threshold:.4f}): {positives} flagged positive")
    if skipped:
        text += f"; {skipped} skipped as out of scope (--force predicts them)"
    if failed:
        text += f"; {failed} failed to read"
    return text + (f"; wrote {out}" if out else "")


def run_predict(paths: list[str], model_uri: str | None = None, out: str | None = None, *,
                tracking_uri: str | None = None, force: bool = False, threshold: float | None = None,
                batch_size: int = 64, progress: bool | None = None, stdout=None,
                with_patient_id: bool = False) -> dict:
    """`pneumo predict`: the CSV to `out` (or to stdout when it is not a terminal) and a summary line.

    The header's PatientID is PHI: the output carries it only with `with_patient_id` (`--with-patient-id`).

    Raises PredictError after writing everything when any file failed, so the exit code is non-zero.
    """
    stdout = stdout or sys.stdout
    if out and Path(out).is_dir():
        raise PredictError(f"--out {out} is a folder: name a CSV file")
    files = collect_paths(paths, error=PredictError)
    lm = load(model_uri or champion_uri(), tracking_uri, threshold)
    df = predict_files(files, lm, force=force, batch_size=batch_size, progress=progress)
    if not with_patient_id:
        df = df.drop(columns=["patient_id"])
    tty = hasattr(stdout, "isatty") and stdout.isatty()
    if out:
        write_csv(df, out)
        if tty:
            print(format_table(df, limit=10), file=stdout)
    elif tty:
        print(format_table(df, limit=len(df)), file=stdout)
    else:
        stdout.write(csv_text(df))
    line = summary(df, lm, out)
    print(line, file=sys.stderr)
    failed = int((df["status"] == "error").sum())
    if failed:
        raise PredictError(f"{failed} of {len(df)} files could not be read (see the error column"
                           + (f" in {out})" if out else ")"))
    return {"frame": df, "summary": line, "failed": failed}
