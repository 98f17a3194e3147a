"""One file a request sent (the served model's `dicom` or `image` cell) -> the network's pixels, or the reason
it is refused: run inside a decode worker (pipeline/data/isolation.py), so it imports the decoders only."""

from __future__ import annotations

import tempfile
from pathlib import Path

IMAGE_FORMATS = ("PNG", "JPEG")  # what the `image` column opens; Pillow knows ~40 more, none needed here


def decode_file(task: tuple) -> dict:
    """(kind, file bytes, size, max pixels, timeout) -> {"pixels", "meta"} or {"status", "error"}; never raises.
    Runs in a DecodePool worker: through a private temp file, as `pneumo predict` reads one."""
    from pipeline.data.dicom import ImageError, load_image_file, screen_dicom
    from pipeline.data.isolation import TimeLimitExceeded, time_limit

    kind, data, size, max_pixels, timeout = task
    try:
        with tempfile.TemporaryDirectory(prefix="pneumo-row-") as tmp, time_limit(timeout):
            path = Path(tmp) / ("row.dcm" if kind == "dicom" else "row.img")
            path.write_bytes(data)
            if kind == "dicom":
                screened = screen_dicom(path, size, max_pixels=max_pixels)
                if screened.error:
                    return {"status": "error", "error": f"dicom: {screened.error}"}
                if screened.out_of_scope:
                    return {"status": "out_of_scope", "error": screened.out_of_scope}
                img = screened.image
                return {"pixels": img.pixels, "meta": (img.view_position, img.sex, img.age)}
            try:
                return {"pixels": load_image_file(path, size, max_pixels=max_pixels, formats=IMAGE_FORMATS),
                        "meta": ("", "", -1)}
            except ImageError as e:
                return {"status": "error", "error": f"image: {e}"}
    except TimeLimitExceeded:
        return {"status": "error", "error": f"{kind}: decoding took longer than {timeout:g} s: refused"}
    except MemoryError:
        return {"status": "error", "error": f"{kind}: decoding needs more memory than a request may use: refused"}
