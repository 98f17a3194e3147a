"""Helpers shared by benchmarks/convert.py and benchmarks/input_pipeline.py: the seed-style decode, timing."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, *args, **kwargs):
    """(result, wall s, CPU s of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def spread(values) -> str:
    """'median (min-max)' of rates."""
    return f"{statistics.median(values):7.1f} ({min(values):.0f}-{max(values):.0f})"


def seed_style_image(path, size: int):
    """The seed's decode: pydicom's default plugins -> pixel_array -> PIL resize (Pillow's default filter)."""
    import pydicom
    from PIL import Image

    return Image.fromarray(pydicom.dcmread(path).pixel_array).resize((size, size))


def pydicom_plugin_used(path) -> str:
    """Which of pydicom's plugins its default order actually decodes `path` with (spied on one file)."""
    import pydicom
    from pydicom.pixels.decoders.base import DecodeRunner

    used, original = [], DecodeRunner._decode_frame

    def spy(self, src):
        frame = original(self, src)
        used.append(self._previous[0])
        return frame

    DecodeRunner._decode_frame = spy
    try:
        ds = pydicom.dcmread(path)
        ds.pixel_array  # noqa: B018
    finally:
        DecodeRunner._decode_frame = original
    from pydicom.pixels import get_decoder

    dec = get_decoder(ds.file_meta.TransferSyntaxUID)
    missing = ", ".join(m.split(" - ")[0] for m in dec.missing_dependencies) or "none"
    return (f"{used[0] if used else '?'} (pydicom {pydicom.__version__}; available in order: "
            f"{', '.join(dec.available_plugins)}; not installed: {missing})")


def make_dicoms(out: Path, n: int, size: int = 1024) -> tuple[Path, Path]:
    """At least `n` synthetic RSNA-like DICOMs in `out` (made unless a complete set is there): (images, CSV)."""
    from pipeline.synth import IMAGES_DIR, LABELS_CSV, make_synthetic_dataset

    if not (out / LABELS_CSV).exists():
        make_synthetic_dataset(out, n=n, size=size, workers=2, progress=False)
    files = sorted((out / IMAGES_DIR).glob("*.dcm"))
    if len(files) < n:
        raise SystemExit(f"{out}: {len(files)} DICOMs, need {n}")
    return out / IMAGES_DIR, out / LABELS_CSV
