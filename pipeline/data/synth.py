"""`pneumo synth`: a synthetic RSNA-like DICOM dataset for demos and tests.

Writes `OUT/stage_2_train_images/<patientId>.dcm` (8-bit MONOCHROME2, JPEG Baseline, Secondary Capture,
Modality CR, like the real RSNA files) and `OUT/stage_2_train_labels.csv` in the real format.

The images are chest-like (body, dark lung fields, bright mediastinum and heart, ribs, noise) with per-image
variation in position, shape, contrast and brightness. Positives carry one to three soft opacities (Gaussian
blobs brighter than the lung) inside the lung fields, boxed at their 2-sigma extent. Negatives (and positives
alike, so they carry no signal) get distractors: small faint blobs in the lungs and bright artefacts outside
them. A CNN can learn the task at 32-64 px, but not trivially.

Deterministic: image i is drawn from `np.random.default_rng([seed, i])` and UIDs are derived from
(seed, i), so the same seed gives byte-identical files for any worker count. Only numpy, pydicom and Pillow
are imported (never TensorFlow or MLflow).
"""

from __future__ import annotations

import io
import numbers
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from pipeline.errors import InputError
from pipeline.files import atomic_write_bytes

__all__ = ["make_synthetic_dataset", "IMAGES_DIR", "LABELS_CSV"]

IMAGES_DIR = "stage_2_train_images"
LABELS_CSV = "stage_2_train_labels.csv"
CSV_HEADER = "patientId,x,y,width,height,Target\n"

# Anatomy is drawn at this resolution and upsampled with Pillow: smooth shapes lose nothing, and drawing at
# 256 px instead of 1024 px makes the float work 16x cheaper. Noise is added at full resolution.
BASE_SIZE = 256
JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Case:
    """What one generated image contributes to the CSV."""

    patient_id: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...]


# --------------------------------------------------------------------------------------------------------
# Image


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _fractal_noise(rng: np.random.Generator, b: int, octaves=(4, 8, 16, 32)) -> np.ndarray:
    """Smooth random texture (~unit variance) at b x b: coarse grids upsampled bicubically and summed."""
    out = np.zeros((b, b), np.float32)
    for k, grid in enumerate(octaves):
        g = rng.standard_normal((grid, grid)).astype(np.float32)
        out += np.asarray(Image.fromarray(g).resize((b, b), Image.BICUBIC)) * 0.7**k
    return out / 1.6


def _draw_image(rng: np.random.Generator, positive: bool, size: int, ap_view: bool = False):
    """One chest-like image (uint8, size x size) and its opacity boxes in pixels at `size`.

    Intensities are built in arbitrary units (air ~0, soft tissue ~0.55, bone brighter, lungs darker),
    then mapped to grey levels with a random exposure.
    """
    b = min(size, BASE_SIZE)
    # Pixel-centre coordinates in [0, 1] at the base resolution.
    c = (np.arange(b, dtype=np.float32) + 0.5) / b
    xx, yy = c[None, :], c[:, None]

    # Patient placement and build: shift and scale per image.
    cx = 0.5 + rng.uniform(-0.05, 0.05)
    cy = 0.47 + rng.uniform(-0.04, 0.04)
    s = rng.uniform(0.9, 1.05)
    dx = xx - cx

    img = np.full((b, b), rng.uniform(0.0, 0.08), np.float32)  # air around the patient
    # Torso: a boxy superellipse whose top (shoulders) runs off the image.
    torso = (np.abs(dx) / (rng.uniform(0.46, 0.54) * s)) ** 4 + (np.abs(yy - cy - 0.3 * s) / (0.8 * s)) ** 4
    img += _smoothstep((1 - torso) / 0.35) * rng.uniform(0.45, 0.6)

    # Heart: an ellipse low in the chest, mostly on the patient's left (image right); wider on AP films
    # (the heart is further from the detector), as on real bedside images.
    hw = (0.15 if ap_view else 0.125) * s * rng.uniform(0.92, 1.1)
    heart_d = (((dx - 0.05 * s) / hw) ** 2 + ((yy - cy - 0.08 * s) / (0.13 * s)) ** 2)
    heart = _smoothstep((1 - heart_d) / 0.6)

    # Lungs: tall ellipses with a rounded apex, cut at the bottom by the diaphragm domes (lower laterally:
    # the costophrenic angles) and medially by the mediastinum; the heart sits in front of the left base.
    lung = np.zeros((b, b), np.float32)
    for side in (-1, 1):
        lcx = cx + side * rng.uniform(0.19, 0.22) * s
        lax = rng.uniform(0.15, 0.18) * s
        lay = rng.uniform(0.4, 0.45) * s
        lcy = cy - 0.37 * s + lay  # apex at cy - 0.37 s
        d = ((xx - lcx) / lax) ** 2 + ((yy - lcy) / lay) ** 2
        dome = cy + rng.uniform(0.15, 0.2) * s + 2.5 * (xx - lcx + side * 0.02) ** 2 / s
        one = _smoothstep((1 - d) / 0.15) * _smoothstep((dome - yy) / 0.03)
        lung = np.maximum(lung, one)
    lung *= _smoothstep((np.abs(dx) - 0.045 * s) / 0.03)
    lung *= 1 - 0.85 * heart

    # Lung fields: dark, with vessel-like texture that fades towards the periphery and a brighter hilum.
    texture = _fractal_noise(rng, b, (8, 16, 32, 64))
    hilum = np.exp(-((np.abs(dx) - 0.1 * s) ** 2 / 0.006 + (yy - cy + 0.02) ** 2 / 0.01))
    img -= lung * rng.uniform(0.28, 0.36)
    img += lung * (0.035 * texture + 0.12 * hilum)

    # Ribs: curved bands across each hemithorax (bright in the lungs, faint over soft tissue).
    freq = rng.uniform(8.5, 11.0)
    ribs = np.sin(2 * np.pi * freq * (yy - 0.35 * np.abs(dx) + 1.2 * dx**2) + rng.uniform(0, 2 * np.pi))
    rib_band = _smoothstep((ribs - 0.3) / 0.5) * _smoothstep((np.abs(dx) - 0.05) / 0.05)
    rib_band *= _smoothstep((cy + 0.3 * s - yy) / 0.08)  # the rib cage ends above the abdomen
    img += rib_band * (0.35 * lung + 0.1) * rng.uniform(0.15, 0.3)
    # Clavicles: two bright bars near the apices, rising laterally.
    clav_y = cy - 0.36 * s - 0.25 * (np.abs(dx) - 0.05)
    clav = np.exp(-(((yy - clav_y) / 0.013) ** 2)) * _smoothstep((np.abs(dx) - 0.04) / 0.03)
    clav *= _smoothstep((0.38 * s - np.abs(dx)) / 0.05)
    img += clav * rng.uniform(0.1, 0.2)

    # Mediastinum (soft, wide) with the spine faintly through it (vertebral bodies), then the heart shadow:
    # both are bright mostly because they hide the lungs, so they add little themselves.
    img += np.exp(-((dx / (0.08 * s)) ** 2)) * rng.uniform(0.08, 0.14)
    spine = np.exp(-((dx / (0.035 * s)) ** 4)) * (0.7 + 0.3 * np.sin(2 * np.pi * 13 * (yy - cy)) ** 2)
    img += spine * rng.uniform(0.06, 0.12)
    img += heart * rng.uniform(0.03, 0.08)

    def blob(bx, by, sx, sy):
        return np.exp(-0.5 * (((xx - bx) / sx) ** 2 + ((yy - by) / sy) ** 2))

    core = np.flatnonzero(lung.ravel() > 0.9)  # well inside the lung fields

    def point_in_lung():
        k = core[rng.integers(core.size)]
        return c[k % b], c[k // b]

    # Opacities: 1-3 patchy soft blobs in the lungs; 2-sigma radius 6-15 % of the image, box at +-2 sigma.
    boxes = []
    if positive:
        patch = _fractal_noise(rng, b, (16, 32))
        placed = []  # (centre x, centre y, half width, half height) of the opacities so far
        for _ in range(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])):
            for _try in range(10):  # keep opacities apart: RSNA boxes of one patient rarely overlap
                bx, by = point_in_lung()
                if all(abs(bx - px) > (pw + 0.02) or abs(by - py) > (ph + 0.02) for px, py, pw, ph in placed):
                    break
            sx = rng.uniform(0.03, 0.075)
            sy = sx * rng.uniform(1.0, 1.5)  # consolidations tend to be taller than wide
            amp = rng.uniform(0.25, 0.42)
            img += amp * blob(bx, by, sx, sy) * (1 + 0.35 * patch) * (0.3 + 0.7 * lung)
            x0, y0 = max(bx - 2 * sx, 0.0), max(by - 2 * sy, 0.0)
            x1, y1 = min(bx + 2 * sx, 1.0), min(by + 2 * sy, 1.0)
            boxes.append(tuple(float(round(v * size)) for v in (x0, y0, x1 - x0, y1 - y0)))
            placed.append((bx, by, 2 * sx, 2 * sy))

    # Distractors, drawn with the same odds for both classes so that they carry no signal.
    if rng.random() < 0.6:  # a small, faint nodule-like blob in the lung
        bx, by = point_in_lung()
        r = rng.uniform(0.012, 0.03)
        img += rng.uniform(0.06, 0.14) * blob(bx, by, r, r)
    if rng.random() < 0.5:  # a bright artefact outside the lungs (marker, ECG lead, clip)
        ax = rng.choice([rng.uniform(0.03, 0.2), rng.uniform(0.8, 0.97)])
        ay = rng.uniform(0.05, 0.95)
        hx, hy = rng.uniform(0.005, 0.02, size=2)
        img += (np.abs(xx - ax) < hx) * (np.abs(yy - ay) < hy) * rng.uniform(0.4, 0.8)

    # Exposure: random gamma, gain and offset, so absolute brightness carries no label.
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(260, 340) + rng.uniform(-20, 10)

    if b != size:
        img = np.asarray(Image.fromarray(img.astype(np.float32)).resize((size, size), Image.BICUBIC))
    # Quantum noise at full resolution (what a radiograph looks like up close). Triangular noise from two
    # random bytes per pixel (sd 104.5 before scaling) looks the same as Gaussian and costs ~1.5 ms
    # instead of ~9 ms at 1024 px; the arithmetic is in place to spare 4 MB temporaries.
    u = np.frombuffer(rng.bytes(2 * size * size), np.uint8).reshape(2, size, size)
    noise = u[0].astype(np.float32)
    noise += u[1]
    noise -= 255.0
    noise *= rng.uniform(1.5, 4.0) / 104.5
    noise += img
    np.clip(noise, 0, 255, out=noise)
    return noise.astype(np.uint8), tuple(boxes)


# --------------------------------------------------------------------------------------------------------
# DICOM


def _uid(seed: int, i: int, what: str) -> str:
    # A UUID-derived UID (2.25.<uuid as integer>, ISO/IEC 9834-8) from a name-based UUID: fixed for a seed,
    # unique per (seed, image, kind). Not pydicom's generate_uid(prefix=None, entropy_srcs=...): with
    # prefix=None it ignores the entropy and returns a random uuid4 (pydicom 3.0), breaking determinism.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'pneumo-synth/{seed}/{i}/{what}').int}"


def _dicom_bytes(pixels: np.ndarray, patient_id: str, seed: int, i: int, view: str, sex: str, age: int) -> bytes:
    """Encode `pixels` as an RSNA-like JPEG Baseline DICOM file."""
    frame = io.BytesIO()
    Image.fromarray(pixels).save(frame, format="JPEG", quality=JPEG_QUALITY)
    frame = frame.getvalue()
    # Drop Pillow's JFIF APP0 segment: the real RSNA frames (DCMTK/libijg) start SOI then DQT, and a reader's
    # fast path should meet the same bytes here as there. The APP0 length field counts itself, not the marker.
    if frame[2:4] == b"\xff\xe0":
        frame = frame[:2] + frame[4 + int.from_bytes(frame[4:6], "big"):]
    rows, cols = pixels.shape

    sop_uid = _uid(seed, i, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    # The real RSNA header, with synthetic values: dummy date like RSNA's, no real names anywhere.
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "pneumo synth"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    # RSNA writes plain numbers ('51', '6'), not the standard AS form '051Y'; copy RSNA (readers must cope
    # with both) and skip pydicom's AS validation, which would warn on every file.
    ds.add(DataElement(0x00101010, "AS", str(age), validation_mode=pydicom.config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = _uid(seed, i, "study")
    ds.SeriesInstanceUID = _uid(seed, i, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    spacing = f"{0.168 * 1024 / cols:.6f}"  # ~17 cm wide field of view at any size
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = f"{rows * cols / len(frame):.2f}"
    ds.PixelData = encapsulate([frame], has_bot=False)  # empty Basic Offset Table, as in RSNA
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated pixel data must have undefined length

    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def example_dicom_bytes(size: int = 64) -> bytes:
    """One small synthetic chest radiograph as a DICOM (the served model's input example): fixed bytes."""
    rng = np.random.default_rng([0, 0])
    pixels, _ = _draw_image(rng, False, size)
    return _dicom_bytes(pixels, "example-patient", 0, 0, "PA", "F", 50)


def _patient_id(rng: np.random.Generator) -> str:
    """A uuid4-shaped id from the seeded RNG (uuid.uuid4() would break determinism)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)  # temp file, fsync, rename, folder fsync: never half a file after a crash


def _make_one(args) -> _Case:
    """Generate and write image i. Top-level so that a process pool can pickle it."""
    images_dir, i, positive, size, seed = args
    rng = np.random.default_rng([seed, i])
    patient_id = _patient_id(rng)
    view = "AP" if rng.random() < 0.5 else "PA"
    sex = "M" if rng.random() < 0.55 else "F"
    age = int(np.clip(round(rng.normal(47, 16)), 1, 92))  # RSNA: mean ~47, range 1-92
    pixels, boxes = _draw_image(rng, positive, size, ap_view=view == "AP")
    data = _dicom_bytes(pixels, patient_id, seed, i, view, sex, age)
    _write_atomic(Path(images_dir) / f"{patient_id}.dcm", data)
    return _Case(patient_id, int(positive), boxes)


def _csv_text(cases: list[_Case]) -> str:
    lines = [CSV_HEADER]
    for c in cases:
        if c.label:
            lines += [f"{c.patient_id},{x:.1f},{y:.1f},{w:.1f},{h:.1f},1\n" for x, y, w, h in c.boxes]
        else:
            lines.append(f"{c.patient_id},,,,,0\n")
    return "".join(lines)


class SynthError(InputError):
    """A bad argument to the synthetic generator (a ValueError too, for callers that catch that)."""


def make_synthetic_dataset(
    out_dir,
    n: int = 200,
    positive_rate: float = 0.25,
    size: int = 1024,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write an RSNA-like dataset of `n` patients to `out_dir`; return {n, positives, seconds, out}.

    Exactly round(n * positive_rate) patients are positive, chosen by a seeded permutation. Each DICOM is
    written atomically (temp name, then os.replace) and the CSV last, so a CSV on disk means a complete
    dataset. Files of earlier runs with other seeds are left alone (they would show as unlabelled inputs).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SynthError(f"--n must be a positive integer, got {n!r}")
    if isinstance(positive_rate, bool) or not isinstance(positive_rate, numbers.Real) or not 0 <= positive_rate <= 1:
        raise SynthError(f"--positive-rate must be in [0, 1], got {positive_rate!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 8192:
        raise SynthError(f"--image-size must be an integer in [32, 8192], got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SynthError(f"--workers must be a positive integer, got {workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthError(f"--seed must be a non-negative integer, got {seed!r}")

    start = time.perf_counter()
    out = Path(out_dir)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    # A CSV on disk must mean a complete dataset: drop an earlier run's CSV before rewriting its images.
    (out / LABELS_CSV).unlink(missing_ok=True)

    n_pos = round(n * positive_rate)
    positives = set(np.random.default_rng([seed, 2**31]).permutation(n)[:n_pos].tolist())
    jobs = [(str(images_dir), i, i in positives, size, seed) for i in range(n)]

    from tqdm import tqdm  # lazy: only needed here

    with tqdm(total=n, desc="synth", unit="img", disable=not progress) as bar:
        if workers == 1:
            cases = []
            for job in jobs:
                cases.append(_make_one(job))
                bar.update()
        else:
            import multiprocessing

            # spawn: workers start clean (no inherited TensorFlow/threads from the caller) and import only
            # this module. imap keeps generation order, so the CSV does not depend on the worker count.
            with multiprocessing.get_context("spawn").Pool(min(workers, n)) as pool:
                cases = []
                for case in pool.imap(_make_one, jobs, chunksize=max(1, min(16, n // (4 * workers)))):
                    cases.append(case)
                    bar.update()

    _write_atomic(out / LABELS_CSV, _csv_text(cases).encode())
    return {"n": n, "positives": n_pos, "seconds": round(time.perf_counter() - start, 3), "out": str(out)}
