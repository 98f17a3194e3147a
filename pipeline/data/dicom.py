"""One DICOM (or PNG/JPEG) file -> one 2-D uint8 image of `size` x `size`.

This is the converter's hot loop and runs in its decode workers: it imports numpy, pydicom and Pillow only
(never TensorFlow or MLflow).

Two decode paths give the same picture (mean absolute difference on the real RSNA files: 0.23 grey levels at
256 px, 0.46 at 64, 1.2 at 224 where DCT scaling stops at 256 and BOX does the rest):

* Fast path, for the real RSNA files: JPEG Baseline (1.2.840.10008.1.2.4.50), 8-bit unsigned, MONOCHROME2,
  one sample, one frame, and no Modality LUT / rescale or VOI that would change the stored values. The JPEG
  frame is handed straight to Pillow with ``draft("L", ...)``, so libjpeg decodes at 1/2, 1/4 or 1/8 scale
  (DCT scaling) whenever the target is at most half the stored size; the geometry policy does the rest.
* Generic path, for everything else: pydicom's decoders (native, deflated, RLE, JPEG, JPEG 2000, and JPEG-LS
  / lossless JPEG when a plugin such as pylibjpeg-libjpeg is installed), then the DICOM value pipeline:

  - grey images: Modality LUT (RescaleSlope/Intercept or Modality LUT Sequence), then the first VOI (VOI LUT
    Sequence, else WindowCenter/Width, as pydicom's ``apply_voi_lut`` prefers), mapped from the VOI's output
    range to 0..255. Without a VOI the image is stretched min..max (non-finite float values ignored; a
    constant image becomes 0). Exception: unsigned data of at most 8 stored bits with no Modality/VOI
    transform keeps its stored values (scaled to 0..255 when BitsStored < 8), which is what a viewer shows
    and what the fast path returns.
  - MONOCHROME1 is inverted after that mapping (so high attenuation is bright, as in MONOCHROME2).
  - colour: YBR is converted to RGB by pydicom, PALETTE COLOR through its LUT; grey = ITU-R 601 luma
    (0.299 R + 0.587 G + 0.114 B, the weights Pillow's "L" conversion uses) of values scaled by BitsStored.

Geometry policy (``to_square_uint8``, shared with image files): letterbox. The short side is padded
symmetrically with 0 (black) to a square - an odd remainder goes to the bottom/right - and the square is
resized to `size` x `size` with Pillow: BOX (area average, which is what JPEG DCT scaling approximates) when
shrinking, BILINEAR when enlarging. The aspect ratio is never changed, content is centred.

Rejections raise ``DicomError`` (``ImageError`` for PNG/JPEG) whose str() is a one-line, specific reason
without the path (the caller adds it): not DICOM, no pixel data, multi-frame, absurd dimensions, truncated or
corrupt pixel data, no installed decoder (naming the package to install), unsupported photometric
interpretation. No other exception type escapes ``read_dicom`` for a bad input.

Dimensions are checked against ``MAX_PIXELS`` before any pixel is decoded (a decompression-bomb guard: a
tiny compressed file can declare a huge image); on the fast path the JPEG frame's own header must also agree
with Rows/Columns before decoding.

Only ViewPosition, PatientSex, PatientAge, Modality, BodyPartExamined and the image size are kept from the
header. PatientID is returned for ``predict`` only and must never be written to shards (PHI).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    RLELossless,
)

from pipeline.errors import InputError

__all__ = [
    "MAX_PIXELS",
    "DicomError",
    "DicomImage",
    "ImageError",
    "load_image_file",
    "read_dicom",
    "to_square_uint8",
]

# Rows*Columns above this is rejected before decoding (decompression-bomb guard: a few KB of compressed data
# can declare any size). 100 M pixels is several times the largest radiographs (~4300 x 3500 = 15 M) and
# costs 100 MB at 8 bits, 200 MB at 16, in a worker.
MAX_PIXELS = 100_000_000
# A Deflated Explicit VR Little Endian file is inflated in 1 MiB steps and refused once its data set would
# exceed this many bytes (pydicom itself inflates the whole file in one call, before any size check: a 408 KB
# file of zeros reached 857 MB). 2 bytes x MAX_PIXELS (the largest 16-bit image the pixel guard lets through)
# plus 8 MiB of header. Peak memory of a worker refusing a bomb is this limit plus one step and the buffer's
# growth slack: a 1.0 MB file inflating to 1 GiB is refused after 0.96 s at a tracemalloc peak of 225 MiB
# (ru_maxrss +200 MiB); pydicom.dcmread alone took 20 s and 2.1 GB for it. A decode worker therefore needs at
# most ~230 MiB for the inflate plus the decoded pixels (<= 200 MB at MAX_PIXELS, 16 bit). The test
# tests/test_convert_hardening.py::test_deflate_bomb_memory_is_bounded checks the bound with a small limit.
MAX_INFLATED_BYTES = 2 * MAX_PIXELS + 8 * 2**20
_INFLATE_STEP = 2**20

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_LUMA = np.array([0.299, 0.587, 0.114])
_MAX_AGE = 130  # older is a data-entry error (RSNA's headers reportedly hold a few up to 155): unknown
# HIPAA Safe Harbor (45 CFR 164.514(b)(2)(i)(C)): ages over 89 are aggregated into one category "90 or older".
SAFE_HARBOR_AGE = 90
_AGE_RE = re.compile(r"(\d{1,3})\s*([DWMY]?)", re.IGNORECASE)
_AGE_DIVISOR = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}
# SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); F7 is JPEG-LS's SOF55
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_ENCAPSULATED_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: first item of encapsulated data


class DicomError(InputError):
    """One-line reason an input could not be turned into an image; str(e) is that reason (no newlines)."""

    def __init__(self, reason: str):
        # Reasons quote header values and library messages: enforce the one-line contract here, once.
        super().__init__(_clean(reason))


class MultiFrameError(DicomError):
    """A multi-frame DICOM (a cine, a tomosynthesis stack): valid, but not the single 2-D frame the model reads."""


class ImageError(InputError):
    """One-line reason a PNG/JPEG file could not be turned into an image (same contract as DicomError)."""

    def __init__(self, reason: str):
        super().__init__(_clean(reason))


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # (size, size) uint8, C-contiguous
    view_position: str  # "AP" / "PA" / "" when absent (upper-cased, stripped)
    sex: str  # "M" / "F" / "O" / "" when absent
    age: int  # years, -1 when absent/unparseable ("058Y" -> 58, "6M" -> 0, "58" -> 58); over 89 -> 90
    patient_id: str  # header PatientID or "" (used by `predict` only; never stored in shards)
    modality: str  # e.g. "CR", "DX", "" when absent
    body_part: str  # BodyPartExamined upper-cased or ""
    original_height: int  # Rows
    original_width: int  # Columns


# ----------------------------------------------------------------------------------------------- geometry


def to_square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Letterbox a 2-D uint8 image to (size, size): pad the short side with 0 symmetrically, then resize.

    BOX (area average) when shrinking, BILINEAR when enlarging; see the module docstring. Returns a new
    C-contiguous, writeable array.
    """
    size = _check_size(size)
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"to_square_uint8 needs a 2-D uint8 array, got shape {image.shape} dtype {image.dtype}"
        )
    h, w = image.shape
    if h == 0 or w == 0:
        raise ValueError(f"to_square_uint8 got an empty image {h}x{w}")
    side = max(h, w)
    if h != w:
        top, left = (side - h) // 2, (side - w) // 2
        square = np.zeros((side, side), np.uint8)
        square[top : top + h, left : left + w] = image
        image = square
    if side == size:
        return np.array(image, dtype=np.uint8, order="C")  # always a new, writeable array
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    # np.array (not asarray) so the result is writeable and owns its memory
    return np.array(Image.fromarray(image).resize((size, size), resample))


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def _draft_request(width: int, height: int, size: int) -> tuple[int, int]:
    """The size to pass to Pillow's draft so the long side stays >= `size` after DCT scaling.

    Pillow picks the largest scale s in {8, 4, 2, 1} with s <= min(W // w, H // h); proportional requests make
    that min equal to long_side // size, so the letterboxed square is never smaller than the target.
    """
    long_side = max(width, height)
    return max(1, width * size // long_side), max(1, height * size // long_side)


# ----------------------------------------------------------------------------------------------- DICOM


def read_dicom(path: str | os.PathLike, size: int, *, fast_path: bool = True,
               max_pixels: int = MAX_PIXELS) -> DicomImage:
    """Read one single-frame DICOM and return its image letterboxed to (size, size) uint8 plus metadata.

    Raises DicomError (one line, no path) for any input that cannot be turned into an image. `max_pixels`
    lowers the decompression-bomb guard (the served model uses a lower one than the converter).
    """
    size = _check_size(size)
    try:
        return _read_dicom(path, size, fast_path, max_pixels)
    except DicomError:
        raise
    except MemoryError:
        raise DicomError("out of memory while decoding the image") from None
    except Exception as e:  # last resort: the contract is "DicomError or an image", never a crash
        raise DicomError(f"unexpected {type(e).__name__}: {_one_line(e, path)}") from e


def _read_dicom(path: str | os.PathLike, size: int, fast_path: bool, max_pixels: int) -> DicomImage:
    ds = _dcmread(path, max_pixels)
    try:
        rows, cols = _check_pixel_module(ds, max_pixels)
    except DicomError:
        raise
    except Exception as e:  # pydicom parses elements lazily: a corrupt one fails on first access
        raise DicomError(f"malformed DICOM header: {_one_line(e, path)}") from None
    meta = _metadata(ds, rows, cols)
    pixels = None
    if fast_path and _fast_path_eligible(ds):
        pixels = _decode_jpeg_frame(ds, rows, cols, size)
    if pixels is None:
        pixels = to_square_uint8(_decode_generic(ds, rows, cols, path), size)
    return DicomImage(pixels=pixels, **meta)


def _dcmread(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Dataset:
    try:
        deflated = _read_deflated(path, min(MAX_INFLATED_BYTES, 2 * max_pixels + 8 * 2**20))
    except DicomError:
        raise
    except Exception:  # not a DICOM with a readable file meta: the paths below say why
        deflated = None
    if deflated is not None:
        return deflated
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except OSError as e:
        if e.errno is not None:  # missing file, directory, permission: strerror has no path in it
            raise DicomError(f"cannot read file: {e.strerror or e.errno}") from None
        raise DicomError(f"not a readable DICOM file: {_one_line(e, path)}") from None  # pydicom parse error
    except Exception as e:
        raise DicomError(f"not a readable DICOM file: {_one_line(e, path)}") from None
    # No 'DICM' preamble/file meta. Some producers write the bare data set; accept it only when forcing the
    # parse finds an image in it (a text file force-parses into junk elements without pixel data).
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        ds = None
    if ds is None or not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DicomError(
            "not a DICOM file: no 'DICM' file header, and no pixel data when parsed as a bare data set"
        )
    return ds


def _read_deflated(path: str | os.PathLike, limit: int) -> Dataset | None:
    """A Deflated Explicit VR Little Endian file, inflated incrementally under MAX_INFLATED_BYTES; None when
    the file is not deflated (the caller reads it with pydicom as usual)."""
    import zlib

    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(path, "rb") as fp:
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 specifies
        inflated = bytearray()
        while True:
            block = inflater.unconsumed_tail or fp.read(_INFLATE_STEP)
            if not block:
                break
            try:
                inflated += inflater.decompress(block, _INFLATE_STEP)
            except zlib.error as e:
                raise DicomError(f"corrupt deflated data set: {e}") from None
            if len(inflated) > limit:
                raise DicomError(f"deflated data set inflates past MAX_INFLATED_BYTES={limit} "
                                 "(decompression-bomb guard): refused")
            if inflater.eof:
                break
    ds = read_dataset(DicomBytesIO(bytes(inflated)), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(os.fspath(path), ds, preamble=preamble, file_meta=meta, is_implicit_VR=False,
                       is_little_endian=True)


def _check_pixel_module(ds: Dataset, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Cheap header checks done before any pixel is decoded; returns (Rows, Columns)."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop = UID(str(ds.get("SOPClassUID") or ""))
        kind = f" ({sop.name})" if sop.is_valid and sop.name != str(sop) else ""  # known classes only
        raise DicomError(f"no pixel data element (7FE0,0010): not an image{kind}")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise DicomError(f"missing required image element {keyword}")
    rows, cols = _int_element(ds, "Rows"), _int_element(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise DicomError(f"empty image: Rows x Columns = {rows} x {cols}")
    if rows * cols > max_pixels:
        raise DicomError(
            f"image too large: {rows} x {cols} = {rows * cols} pixels exceeds MAX_PIXELS={max_pixels} "
            "(decompression-bomb guard)"
        )
    frames = _number_of_frames(ds)
    if frames > 1:
        raise MultiFrameError(f"multi-frame image ({frames} frames) not supported: expected a single 2-D frame")
    samples = _int_element(ds, "SamplesPerPixel")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _GREY or photometric == "PALETTE COLOR":
        expected_samples = 1
    elif photometric in _COLOUR:
        expected_samples = 3
    else:
        raise DicomError(f"unsupported photometric interpretation {_show(photometric)}")
    if samples != expected_samples:
        raise DicomError(
            f"{_show(photometric)} needs SamplesPerPixel {expected_samples}, header says {samples}"
        )
    return rows, cols


def _int_element(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(f"invalid {keyword} {_show(value)}") from None


def _number_of_frames(ds: Dataset) -> int:
    try:
        value = ds.get("NumberOfFrames")
    except Exception:  # a malformed IS string fails on access when pydicom is strict
        value = ds["NumberOfFrames"].value
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise DicomError(f"invalid NumberOfFrames {_show(value)}") from None
    if frames < 1:
        raise DicomError(f"invalid NumberOfFrames {frames}")
    return frames


def _metadata(ds: Dataset, rows: int, cols: int) -> dict:
    return {
        "view_position": _text(ds, "ViewPosition").upper(),
        "sex": _sex(_text(ds, "PatientSex")),
        "age": _age(_text(ds, "PatientAge")),
        "patient_id": _text(ds, "PatientID"),
        "modality": _text(ds, "Modality").upper(),
        "body_part": _text(ds, "BodyPartExamined").upper(),
        "original_height": rows,
        "original_width": cols,
    }


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as a stripped one-line string; "" when absent or unreadable (metadata never rejects)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    elif not isinstance(value, str) and hasattr(value, "__iter__"):  # multi-valued: first value
        value = next(iter(value), "")
    return _clean(str(value), 256)


def _sex(value: str) -> str:
    value = value.upper()
    return value[0] if value in ("M", "F", "O", "MALE", "FEMALE", "OTHER") else ""


def _age(value: str) -> int:
    """PatientAge (AS "nnnD/W/M/Y", or a bare number as RSNA writes it) in whole years; -1 if unknown."""
    m = _AGE_RE.fullmatch(value.strip())
    if not m:
        return -1
    years = int(m[1]) // _AGE_DIVISOR[m[2].upper()]
    return min(years, SAFE_HARBOR_AGE) if years <= _MAX_AGE else -1


# ------------------------------------------------------------------------------------------ fast path


def _fast_path_eligible(ds: Dataset) -> bool:
    """JPEG Baseline grey 8-bit with nothing that changes the stored values (RSNA's files)."""
    try:
        return (
            ds.file_meta.get("TransferSyntaxUID") == JPEGBaseline8Bit
            and "PixelData" in ds
            and str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME2"
            and ds.get("BitsAllocated") == 8
            and ds.get("BitsStored", 8) == 8
            and ds.get("PixelRepresentation", 0) == 0
            and not _has_modality_transform(ds)
            and _voi_kind(ds) is None
        )
    except Exception:  # odd header values: let the generic path produce the precise error
        return False


def _decode_jpeg_frame(ds: Dataset, rows: int, cols: int, size: int) -> np.ndarray | None:
    """Decode the encapsulated JPEG frame with Pillow at reduced DCT scale; None to fall back."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as e:
        raise DicomError(f"cannot read the encapsulated JPEG frame: {_one_line(e)}") from None
    try:
        img = Image.open(io.BytesIO(frame), formats=["JPEG"])  # parses the header only
    except Exception as e:
        raise DicomError(f"corrupt JPEG frame: {_one_line(e)}") from None
    if img.size != (cols, rows):  # checked before decoding: a lying frame header could be a bomb
        raise DicomError(f"JPEG frame is {img.size[1]} x {img.size[0]} but Rows x Columns is {rows} x {cols}")
    if img.mode != "L":  # a colour JPEG labelled MONOCHROME2: let pydicom's pipeline decide
        return None
    try:
        img.draft("L", _draft_request(cols, rows, size))
        pixels = np.asarray(img)  # decodes here (at 1/1, 1/2, 1/4 or 1/8 scale)
    except Exception as e:
        raise DicomError(f"corrupt JPEG frame: {_one_line(e)}") from None
    return to_square_uint8(pixels, size)


# ------------------------------------------------------------------------------------------ generic path


def _decode_generic(ds: Dataset, rows: int, cols: int, path: str | os.PathLike) -> np.ndarray:
    """pydicom decode + value pipeline -> 2-D uint8 at the stored size."""
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomError(f"unsupported transfer syntax {_uid_text(tsyntax)}") from None
    if not decoder.is_available:
        raise DicomError(f"no decoder for {_uid_text(tsyntax)}: {_install_hint(decoder)}")
    if tsyntax.is_compressed and tsyntax != RLELossless:
        _check_codestream_size(ds, tsyntax, rows, cols)
    try:
        arr, props = decoder.as_array(ds, index=0)
    except Exception as e:
        # Point at other plugins only for "not supported" failures (e.g. Pillow and 12-bit JPEG), not for
        # corrupt data that no decoder would read.
        unsupported = "support" in str(e).lower() and decoder.missing_dependencies
        hint = f" (more decoders: {_install_hint(decoder)})" if unsupported else ""
        raise DicomError(f"cannot decode {tsyntax.name} pixel data: {_one_line(e, path)}{hint}") from None
    if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
        raise DicomError(f"decoded array has shape {arr.shape}, expected {rows} x {cols}")

    photometric = str(props.get("photometric_interpretation", ds.PhotometricInterpretation)).strip().upper()
    bits_stored = int(props.get("bits_stored") or props.get("bits_allocated") or 8)
    signed = bool(props.get("pixel_representation", 0))
    try:
        if photometric in _GREY:
            grey = _grey_to_uint8(arr, ds, bits_stored, signed)
            return 255 - grey if photometric == "MONOCHROME1" else grey
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            return _rgb_to_uint8(rgb, 8 * rgb.dtype.itemsize)
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # pydicom normally converted already
            arr = convert_color_space(arr, photometric, "RGB")
        # RGB, or YBR_ICT/YBR_RCT whose inverse transform the JPEG 2000 codec applies itself
        return _rgb_to_uint8(arr, bits_stored)
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(f"cannot map {photometric} values to grey: {_one_line(e, path)}") from None


def _check_codestream_size(ds: Dataset, tsyntax: UID, rows: int, cols: int) -> None:
    """Reject a JPEG / JPEG-LS / JPEG 2000 frame whose own header disagrees with Rows x Columns.

    Decoders size their buffers from the codestream, not from the DICOM header: a corrupt J2K SIZ marker
    claiming 512 x 12 M pixels made openjpeg allocate tens of GB (the process was OOM-killed). Unparseable
    headers pass: the decoder then reports the error.
    """
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as e:
        raise DicomError(f"cannot read the encapsulated frame: {_one_line(e)}") from None
    dims = _j2k_size(frame) if tsyntax in JPEG2000TransferSyntaxes else _jpeg_size(frame)
    if dims is not None and dims[0] > 0 and dims != (rows, cols):  # JPEG height 0: set later by a DNL marker
        raise DicomError(
            f"{tsyntax.name} frame is {dims[0]} x {dims[1]} but Rows x Columns is {rows} x {cols}"
        )


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from the SIZ marker segment (ISO 15444-1 A.5.1); JP2 boxes before it are skipped."""
    at = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ, always the first two markers of a codestream
    if at < 0 or len(frame) < at + 24:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", frame, at + 8)
    return ysiz - y0, xsiz - x0


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from the SOF segment of a JPEG (SOF0..15) or JPEG-LS (SOF55) stream."""
    if frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", frame, at + 5)
            return height, width
        at += 2 + struct.unpack_from(">H", frame, at + 2)[0]  # skip this segment
    return None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = ds.get("file_meta") or FileMetaDataset()
    tsyntax = meta.get("TransferSyntaxUID")
    if tsyntax:
        return UID(str(tsyntax))
    # No file meta (bare data set, or a broken header): native pixel data can be decoded with the encoding
    # the parser found; compressed data cannot be identified.
    pixel = ds.get("PixelData")
    if isinstance(pixel, bytes) and pixel[:4] == _ENCAPSULATED_ITEM:
        raise DicomError("compressed pixel data but no Transfer Syntax UID (0002,0010) to say how")
    implicit, little = ds.original_encoding
    if little is None:
        raise DicomError("no Transfer Syntax UID (0002,0010) and the encoding cannot be inferred")
    tsyntax = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    meta.TransferSyntaxUID = tsyntax
    ds.file_meta = meta
    return tsyntax


def _install_hint(decoder) -> str:
    """'pip install X' for the pylibjpeg route (pure wheels) when pydicom lists one, else its own list."""
    from importlib import metadata  # error path only

    options = list(decoder.missing_dependencies)
    for option in options:
        if not option.startswith("pylibjpeg"):
            continue
        needed = []
        for requirement in option.split("requires", 1)[-1].split(" and "):
            name = re.split(r"[<>=! ]", requirement.strip(), maxsplit=1)[0]
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                needed.append(name)
        if needed:
            return "pip install " + " ".join(needed)
    return "install one of: " + "; ".join(options) if options else "no plugin known to pydicom"


def _has_modality_transform(ds: Dataset) -> bool:
    if ds.get("ModalityLUTSequence"):
        return True
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None:  # pydicom applies a rescale only when both are present
        return False
    return float(slope) != 1.0 or float(intercept) != 0.0


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI pydicom's apply_voi_lut would apply: "lut" (preferred), "window" or None."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _grey_to_uint8(arr: np.ndarray, ds: Dataset, bits_stored: int, signed: bool) -> np.ndarray:
    modality = _has_modality_transform(ds)
    voi = _voi_kind(ds)
    if not modality and voi is None and not signed and arr.dtype.kind == "u" and bits_stored <= 8:
        if bits_stored == 8 and arr.dtype == np.uint8:
            return arr
        top = 2**bits_stored - 1  # e.g. 1-bit masks -> 0/255; 8 stored bits in 16 allocated -> as is
        return _scale(np.minimum(arr, top), 0.0, float(top))

    values = apply_modality_lut(arr, ds) if modality else arr
    if voi == "lut":
        # The LUT is indexed by integers; its own entries give the output range.
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        lut = apply_voi(np.arange(first, first + entries), ds)
        values = apply_voi(np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values, ds)
        return _scale(values, float(lut.min()), float(lut.max()))
    if voi == "window":
        # The window's output range [y_min, y_max] (pydicom derives it from BitsStored and the rescale):
        # probe it with -inf/+inf rather than re-deriving it here.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return _scale(apply_windowing(values, ds), float(lo), float(hi))
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise DicomError("pixel data has no finite values")
        values = np.where(finite, values, values[finite].min())
    return _scale(values, float(values.min()), float(values.max()))


def _rgb_to_uint8(rgb: np.ndarray, bits: int) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DicomError(f"expected an RGB array, got shape {rgb.shape}")
    luma = rgb.astype(np.float64) @ _LUMA
    return _scale(luma, 0.0, float(2**bits - 1))


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255], rounded and clipped; a flat range maps to 0."""
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    out = (values.astype(np.float64, copy=False) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ image files


# The header guard of `pneumo predict` and the served model (pipeline/artifact/serving.py): one home for both.
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR"}


def scope_warning(img: DicomImage) -> str:
    """Why a decoded DICOM is not a chest radiograph by its header ("" when it is)."""
    problems = []
    if img.modality not in RADIOGRAPH_MODALITIES:
        problems.append(f"Modality {img.modality or '(absent)'} is not a radiograph (CR/DX/DR)")
    if img.body_part and img.body_part != "CHEST":
        problems.append(f"BodyPartExamined {img.body_part} is not CHEST")
    return "; ".join(problems)


@dataclass(frozen=True)
class Screened:
    """A DICOM read for scoring (`pneumo predict` and the served model make the same call)."""
    image: DicomImage | None  # None when there is nothing to score
    out_of_scope: str = ""  # why it is not a single-frame chest radiograph ("" when it is)
    error: str = ""  # why it could not be read at all ("" when it could)


def screen_dicom(path: str | os.PathLike, size: int, max_pixels: int = MAX_PIXELS) -> Screened:
    """read_dicom, then the scope check: a multi-frame file is out of scope (no image); a header that is not a
    chest radiograph is out of scope with its image (`pneumo predict --force` still scores it); a file that
    cannot be decoded is an error. Never raises DicomError."""
    try:
        img = read_dicom(path, size, max_pixels=max_pixels)
    except MultiFrameError as e:
        return Screened(None, out_of_scope=f"not a single 2-D frame: {e}")
    except DicomError as e:
        return Screened(None, error=str(e))
    return Screened(img, out_of_scope=scope_warning(img))


def load_image_file(path: str | os.PathLike, size: int, *, max_pixels: int = MAX_PIXELS,
                    formats: tuple[str, ...] | None = None) -> np.ndarray:
    """A PNG/JPEG (any mode, RGB included) -> grey uint8 (size, size) through the same geometry policy.

    Raises ImageError (one line, no path) when the file cannot be read. `formats` (Pillow's names, e.g.
    ("PNG", "JPEG")) restricts the decoders tried: the served model opens no other format.
    """
    size = _check_size(size)
    try:
        with Image.open(path, formats=list(formats) if formats else None) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {h} x {w} exceeds MAX_PIXELS={max_pixels}")
            if w == 0 or h == 0:
                raise ImageError(f"empty image: {h} x {w}")
            # JPEG: decode straight to luma at reduced DCT scale (no-op for other formats)
            img.draft("L", _draft_request(w, h, size))
            img = ImageOps.exif_transpose(img)  # camera rotation tag, if any
            grey = _pil_to_grey(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a {' or '.join(formats)} file" if formats else "cannot read image: not an image "
                         "file Pillow can identify") from None
    except OSError as e:  # truncated files and the like
        reason = e.strerror if e.filename is not None and e.strerror else _one_line(e, path)
        raise ImageError(f"cannot read image: {reason}") from None
    except MemoryError:
        raise ImageError("out of memory while decoding the image") from None
    except Exception as e:
        raise ImageError(f"cannot read image: {type(e).__name__}: {_one_line(e, path)}") from None
    return to_square_uint8(grey, size)


def _pil_to_grey(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float greys: stretch min..max as for a DICOM without VOI (Pillow's "L" would clip at 255)
        values = np.asarray(img, dtype=np.float64)
        return _scale(values, float(values.min()), float(values.max()))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # ignore alpha rather than fail
    if img.mode not in ("L", "RGB", "P", "1", "YCbCr"):
        img = img.convert("RGB")
    return np.asarray(img.convert("L"))


# ------------------------------------------------------------------------------------------ helpers


def _one_line(e: BaseException, path: str | os.PathLike | None = None, limit: int = 300) -> str:
    """The exception's message on one line, without the file path, at most `limit` characters."""
    message = str(e)
    if path is not None:
        message = message.replace(os.fspath(path), "<file>")
    message = _OBJECT_REPR.sub("", message)  # "<_io.BytesIO object at 0x7f...>": noise, and not reproducible
    return _clean(message, limit) or type(e).__name__


def _clean(text: str, limit: int = 400) -> str:
    """Control characters to spaces, runs of whitespace to one space, at most `limit` characters."""
    text = " ".join(_CONTROL.sub(" ", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uid_text(uid: UID) -> str:
    return f"{uid.name} ({uid})" if uid.name != str(uid) else _show(uid)


def _show(value, limit: int = 40) -> str:
    """A header value quoted for a reason: repr (escapes junk bytes), shortened (never a PHI-sized dump)."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"
