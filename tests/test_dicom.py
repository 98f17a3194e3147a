"""pipeline.data.dicom: fidelity on real files, pydicom's corpus, synthetic bad inputs, the geometry policy."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import pipeline.data.dicom as dicom
from pipeline.data.dicom import (
    MAX_PIXELS,
    DicomError,
    DicomImage,
    ImageError,
    load_image_file,
    read_dicom,
    to_square_uint8,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RSNA_DIR = DATA / "rsna" / "stage_2_train_images"
NIH_DIR = DATA / "nih-dicom"


def _files(folder: Path, pattern: str) -> list[Path]:
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if not files:
        pytest.skip(f"real data not found: {folder} (../shared/data beside the checkout)")
    return files


def _assert_reason(err: Exception, *words: str, forbid: str | os.PathLike | None = None) -> str:
    """A rejection reason is one non-empty line, mentions `words`, and leaves the path out."""
    reason = str(err)
    assert reason.strip(), "empty reason"
    assert "\n" not in reason and "\r" not in reason, reason
    for word in words:
        assert word.lower() in reason.lower(), f"{word!r} not in {reason!r}"
    if forbid is not None:
        assert os.fspath(forbid) not in reason, reason
    return reason


def _assert_image(img: DicomImage, size: int) -> None:
    assert isinstance(img, DicomImage)
    assert img.pixels.shape == (size, size)
    assert img.pixels.dtype == np.uint8
    assert img.pixels.flags.c_contiguous and img.pixels.flags.writeable


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------------------------------ builders


def _dataset(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    pixel_bytes: bytes | None = None,
    tsyntax=ExplicitVRLittleEndian,
    **elements,
) -> Dataset:
    """A minimal single-frame image dataset around `pixels` (or no pixel module when None)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "synthetic-1"
    ds.Modality = "OT"
    if pixels is not None:
        bits = pixels.dtype.itemsize * 8
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = bits_stored or bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = pixels.tobytes() if pixel_bytes is None else pixel_bytes
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _jpeg_dataset(pixels: np.ndarray, frame: bytes | None = None, **elements) -> Dataset:
    """An RSNA-like JPEG Baseline dataset; `frame` overrides the encoded JPEG (for corrupt frames)."""
    ds = _dataset(pixels, tsyntax=JPEGBaseline8Bit, **elements)
    ds.PixelData = encapsulate([_jpeg_bytes(pixels) if frame is None else frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _gradient(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 3 + y * 5) % 256).astype(np.uint8)


def _smooth(rows: int, cols: int) -> np.ndarray:
    """A smooth image that JPEG keeps nearly exact (so decoder differences stay tiny)."""
    y, x = np.mgrid[0:rows, 0:cols]
    return (128 + 100 * np.sin(x / cols * 3.1) * np.cos(y / rows * 2.3)).astype(np.uint8)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_rsna_fast_path_matches_pydicom_reference(monkeypatch):
    files = _files(RSNA_DIR, "*.dcm")
    assert len(files) == 12
    size = 256
    for path in files:
        ds = pydicom.dcmread(path)
        reference = to_square_uint8(ds.pixel_array, size)
        fast = read_dicom(path, size)
        generic = read_dicom(path, size, fast_path=False)
        _assert_image(fast, size)
        _assert_image(generic, size)
        assert _mae(fast.pixels, reference) <= 2.0, path.name
        # The generic path is pydicom's decoder + the same policy: identical to the reference.
        np.testing.assert_array_equal(generic.pixels, reference)

        assert fast.view_position in {"AP", "PA"}
        assert fast.view_position == ds.ViewPosition
        assert fast.sex in {"M", "F"}
        assert fast.age >= 0 and fast.age == int(ds.PatientAge)
        assert fast.patient_id == path.stem
        assert (fast.modality, fast.body_part) == ("CR", "CHEST")
        assert (fast.original_height, fast.original_width) == (1024, 1024)

    # The RSNA files really take the fast path: with the generic decoder broken they still convert.
    def broken(*args, **kwargs):
        raise RuntimeError("generic path used")

    monkeypatch.setattr(dicom, "_decode_generic", broken)
    _assert_image(read_dicom(files[0], 128), 128)
    with pytest.raises(DicomError, match="generic path used"):
        read_dicom(files[0], 128, fast_path=False)


@pytest.mark.realdata
@pytest.mark.parametrize("size", [224, 64, 300])
def test_rsna_fast_path_other_sizes(size):
    path = _files(RSNA_DIR, "*.dcm")[0]
    reference = to_square_uint8(pydicom.dcmread(path).pixel_array, size)
    fast = read_dicom(path, size)
    _assert_image(fast, size)
    assert _mae(fast.pixels, reference) <= 2.0


@pytest.mark.realdata
def test_nih_uncompressed_dicom_without_view_position():
    path = _files(NIH_DIR, "*.dcm")[0]
    img = read_dicom(path, 128)
    _assert_image(img, 128)
    assert img.view_position == ""
    assert (img.modality, img.sex, img.age) == ("DX", "M", 81)
    # 8-bit, no rescale/VOI: stored values are kept, so it equals pixel_array + the geometry policy.
    np.testing.assert_array_equal(img.pixels, to_square_uint8(pydicom.dcmread(path).pixel_array, 128))


# ------------------------------------------------------------------------------------------ pydicom corpus

_CORPUS = sorted(get_testdata_files())
_CORPUS_ROOT = Path(get_testdata_file("CT_small.dcm")).parent


def _corpus_expectation(path: str) -> str:
    """'convert', 'reject:<word>' or 'either', derived from pydicom alone (not from pipeline.data.dicom)."""
    if os.path.isdir(path):
        return "reject:"
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        return "reject:"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "reject:pixel data"
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return "either"
    if frames > 1:
        return "reject:frame"
    try:
        arr = ds.pixel_array
    except Exception:
        return "either"  # pydicom itself cannot decode it (no plugin, broken data, no transfer syntax)
    single_rgb = arr.ndim == 3 and arr.shape[-1] == 3 and ds.get("SamplesPerPixel") == 3
    return "convert" if arr.ndim == 2 or single_rgb else "either"


# Files pydicom alone cannot classify ('either' above), pinned to what read_dicom does with them, with the
# words its one-line reason must hold. Measured with the pinned pydicom and no pylibjpeg/gdcm installed
# (pyproject.toml): installing a decoder turns the "no decoder" and "JPEG Extended" rows into conversions,
# and the test then asks for the pin to be updated.
_NO_JPEG_LS = ("no decoder", "JPEG-LS", "pip install pylibjpeg-libjpeg")
_PINNED = {
    "JPEG-lossy.dcm": ("JPEG Extended", "12-bit"),
    "JPGExtended.dcm": ("JPEG Extended", "12-bit"),
    "JPEG2000-embedded-sequence-delimiter.dcm": ("JPEG 2000", "Rows x Columns"),  # a frame length of 3.7e9
    "JPEGLSNearLossless_08.dcm": _NO_JPEG_LS,
    "JPEGLSNearLossless_16.dcm": _NO_JPEG_LS,
    "MR_small_jpeg_ls_lossless.dcm": _NO_JPEG_LS,
    "SC_rgb_jls_lossy_line.dcm": _NO_JPEG_LS,
    "SC_rgb_jls_lossy_sample.dcm": _NO_JPEG_LS,
    "SC_rgb_jpeg_gdcm.dcm": ("no decoder", "JPEG Lossless", "1.2.840.10008.1.2.4.70"),
    "MR_truncated.dcm": ("cannot decode", "less than expected"),  # 8130 of 8192 pixel bytes
    "badVR.dcm": ("invalid NumberOfFrames", "1A"),
    "meta_missing_tsyntax.dcm": ("missing required image element Rows",),
    "nested_priv_SQ.dcm": ("missing required image element Rows",),
}


def _corpus_id(path: str) -> str:
    return str(Path(path).relative_to(_CORPUS_ROOT))


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the corpus's deliberately odd files
@pytest.mark.parametrize("path", _CORPUS, ids=_corpus_id)
def test_pydicom_corpus_converts_or_rejects_cleanly(path):
    expectation = _corpus_expectation(path)
    if expectation == "either":
        assert _corpus_id(path) in _PINNED, "pydicom cannot decode this file: pin what read_dicom does in _PINNED"
        words = _PINNED[_corpus_id(path)]
        with pytest.raises(DicomError) as info:
            read_dicom(path, 64)
        _assert_reason(info.value, *words, forbid=path)
        return
    try:
        img = read_dicom(path, 64)
    except DicomError as e:
        assert expectation != "convert", f"decodable single frame rejected: {e}"
        _assert_reason(e, expectation.split(":", 1)[1], forbid=path)
        return
    assert not expectation.startswith("reject"), f"expected a rejection ({expectation})"
    _assert_image(img, 64)


@pytest.mark.filterwarnings("ignore")
def test_corpus_sanity_counts():
    """The corpus exercises both outcomes broadly, and every pin names a file pydicom cannot decode."""
    outcomes = {_corpus_id(p): _corpus_expectation(p) for p in _CORPUS}
    assert len(_CORPUS) > 150
    assert list(outcomes.values()).count("convert") >= 60
    assert list(outcomes.values()).count("reject:frame") >= 5
    assert list(outcomes.values()).count("reject:pixel data") >= 20
    assert {k for k, v in outcomes.items() if v == "either"} == set(_PINNED)  # no stale or missing pin


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_missing_decoder_names_the_package():
    with pytest.raises(DicomError) as info:
        read_dicom(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), 32)
    _assert_reason(info.value, "JPEG-LS", "1.2.840.10008.1.2.4.80", "pip install pylibjpeg-libjpeg")


def test_corpus_colour_and_windowed_files_look_right():
    # RLE and native copies of the same MR image give the same picture.
    native = read_dicom(get_testdata_file("MR_small.dcm"), 64).pixels
    np.testing.assert_array_equal(native, read_dicom(get_testdata_file("MR_small_RLE.dcm"), 64).pixels)
    np.testing.assert_array_equal(native, read_dicom(get_testdata_file("MR_small_bigendian.dcm"), 64).pixels)
    # YBR JPEG, RGB RLE and the RGB native encoding of one test picture agree after luma.
    rgb = read_dicom(get_testdata_file("SC_rgb_rle.dcm"), 100).pixels
    assert _mae(read_dicom(get_testdata_file("SC_rgb_dcmtk_+eb+cy+np.dcm"), 100).pixels, rgb) < 3
    assert _mae(read_dicom(get_testdata_file("SC_rgb_rle_16bit.dcm"), 100).pixels, rgb) <= 1


# ------------------------------------------------------------------------------------------ synthetic inputs


def test_not_a_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file\nwith two lines\n")
    with pytest.raises(DicomError) as info:
        read_dicom(path, 32)
    _assert_reason(info.value, "not a DICOM", forbid=path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DicomError) as info:
        read_dicom(tmp_path / "absent.dcm", 32)
    _assert_reason(info.value, "no such file", forbid=tmp_path)
    with pytest.raises(DicomError) as info:
        read_dicom(tmp_path, 32)
    _assert_reason(info.value, "directory", forbid=tmp_path)


def test_bare_dataset_without_file_meta_is_read(tmp_path):
    """No preamble, no file meta (old producers): accepted because it holds native pixel data."""
    pixels = _gradient(20, 30)
    ds = _dataset(pixels)
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)
    img = read_dicom(path, 30)
    np.testing.assert_array_equal(img.pixels, to_square_uint8(pixels, 30))


def test_no_pixel_data(tmp_path):
    path = _save(_dataset(None), tmp_path / "nopix.dcm")
    with pytest.raises(DicomError) as info:
        read_dicom(path, 32)
    _assert_reason(info.value, "pixel data", forbid=path)


def test_truncated_pixel_data(tmp_path):
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = _dataset(pixels, pixel_bytes=pixels.tobytes()[: 64 * 64])  # half the bytes
    path = _save(ds, tmp_path / "short.dcm")
    with pytest.raises(DicomError) as info:
        read_dicom(path, 32)
    _assert_reason(info.value, "less than expected", forbid=path)


@pytest.mark.parametrize("jpeg", [False, True], ids=["native", "jpeg"])
def test_decompression_bomb_rejected_before_decoding(tmp_path, monkeypatch, jpeg):
    small = _gradient(16, 16)
    ds = _jpeg_dataset(small) if jpeg else _dataset(small)
    ds.Rows, ds.Columns = 20_000, 10_001  # 200 M pixels declared, a few bytes of data
    assert ds.Rows * ds.Columns > MAX_PIXELS
    path = _save(ds, tmp_path / "bomb.dcm")
    calls = []
    monkeypatch.setattr(dicom, "get_decoder", lambda *a, **k: calls.append("pydicom"))
    monkeypatch.setattr(dicom, "get_frame", lambda *a, **k: calls.append("frame"))
    with pytest.raises(DicomError) as info:
        read_dicom(path, 32)
    _assert_reason(info.value, "MAX_PIXELS", "20000 x 10001")
    assert calls == [], "decoding started before the size check"


@pytest.mark.parametrize("fast_path", [True, False])
def test_jpeg_frame_larger_than_header_is_rejected(tmp_path, fast_path):
    ds = _jpeg_dataset(_gradient(32, 32), frame=_jpeg_bytes(_gradient(256, 256)))
    with pytest.raises(DicomError) as info:
        read_dicom(_save(ds, tmp_path / "liar.dcm"), 32, fast_path=fast_path)
    _assert_reason(info.value, "JPEG", "frame is 256 x 256", "Rows x Columns is 32 x 32")


def test_jpeg2000_codestream_bomb_rejected_before_decoding(tmp_path, monkeypatch):
    """A corrupt SIZ marker (512 x 12 M pixels in a 512 x 512 file) made openjpeg exhaust memory."""
    ds = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    at = frame.find(b"\xff\x4f\xff\x51")
    frame[at + 12 : at + 16] = (12_255_744).to_bytes(4, "big")  # Ysiz
    ds.PixelData = encapsulate([bytes(frame)])
    path = _save(ds, tmp_path / "j2k-bomb.dcm")

    real_get_decoder = dicom.get_decoder

    class NoDecode:  # the real decoder's checks, but decoding here would be the bug
        def __init__(self, uid):
            self._real = real_get_decoder(uid)
            self.is_available, self.missing_dependencies = self._real.is_available, []

        def as_array(self, *args, **kwargs):
            raise RuntimeError("decoder called")

    monkeypatch.setattr(dicom, "get_decoder", NoDecode)
    with pytest.raises(DicomError) as info:
        read_dicom(path, 32)
    _assert_reason(info.value, "frame is 12255744 x 512", "Rows x Columns is 512 x 512")


def test_empty_and_multiframe_and_bad_photometric(tmp_path):
    pixels = _gradient(8, 8)
    cases = {
        "empty": (_dataset(pixels, Rows=0), "empty image"),
        "frames": (_dataset(np.zeros((24, 8), np.uint8), Rows=8, NumberOfFrames=3), "3 frames"),
        "ybr420": (_dataset(pixels, photometric="YBR_PARTIAL_420"), "photometric"),
        "samples": (_dataset(pixels, photometric="RGB"), "SamplesPerPixel"),
    }
    for name, (ds, word) in cases.items():
        path = _save(ds, tmp_path / f"{name}.dcm")
        with pytest.raises(DicomError) as info:
            read_dicom(path, 16)
        _assert_reason(info.value, word, forbid=path)


@pytest.mark.parametrize("fast_path", [True, False])
def test_corrupt_jpeg_frame(tmp_path, fast_path):
    good = _jpeg_bytes(_gradient(64, 64))
    for name, frame in {
        "truncated": good[: len(good) // 2],
        "garbage": b"\xff\xd8" + bytes(range(256)) * 2,
    }.items():
        path = _save(_jpeg_dataset(_gradient(64, 64), frame=frame), tmp_path / f"{name}.dcm")
        with pytest.raises(DicomError) as info:
            read_dicom(path, 32, fast_path=fast_path)
        reason = _assert_reason(info.value, "JPEG", forbid=path)
        assert " at 0x" not in reason and "pip install" not in reason  # reproducible, no misleading hint


def test_jpeg_fast_path_non_square_letterbox(tmp_path):
    pixels = _smooth(256, 512)
    path = _save(_jpeg_dataset(pixels), tmp_path / "wide.dcm")
    fast = read_dicom(path, 128).pixels
    generic = read_dicom(path, 128, fast_path=False).pixels
    assert _mae(fast, generic) <= 2.0
    # 512 wide -> 128: the 256 rows become 64, centred; the 32 padding rows above and below are black.
    assert not fast[:32].any() and not fast[96:].any()
    assert fast[32:96].min() > 0


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.zeros((16, 16), np.uint8)
    pixels[:, 8:] = 250  # high stored value = dark in MONOCHROME1
    path = _save(_dataset(pixels, photometric="MONOCHROME1"), tmp_path / "mono1.dcm")
    out = read_dicom(path, 16).pixels
    assert (out[:, :8] == 255).all() and (out[:, 8:] == 5).all()
    # The same through a window: still inverted after the VOI.
    wide = np.where(pixels > 0, 4095, 0).astype(np.uint16)  # 12-bit extremes
    ds = _dataset(wide, photometric="MONOCHROME1", bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    out = read_dicom(_save(ds, tmp_path / "mono1w.dcm"), 16).pixels
    assert (out[:, :8] == 255).all() and (out[:, 8:] == 0).all()


def test_rescale_then_window_on_known_values(tmp_path):
    """Stored -> HU = 2*s - 1024 -> LINEAR window c=0.5, w=201 -> 0..255 (PS3.3 C.11.2.1.2.1)."""
    hu = np.array([-1000, -100, -50, 0.25, 50, 100, 1000])
    stored = ((hu + 1024) / 2).round().astype(np.uint16)
    hu = stored * 2.0 - 1024  # the HU actually representable
    pixels = np.repeat(stored[None, :], 7, axis=0)  # 7 x 7, one value per column
    ds = _dataset(
        pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0.5, WindowWidth=201
    )
    out = read_dicom(_save(ds, tmp_path / "ct.dcm"), 7).pixels
    c, w = 0.5 - 0.5, 201 - 1.0
    expected = np.clip(np.rint(((hu - c) / w + 0.5) * 255), 0, 255)
    expected[hu <= c - w / 2] = 0
    expected[hu > c + w / 2] = 255
    np.testing.assert_array_equal(out[0], expected.astype(np.uint8))
    assert out[0].tolist() == [0, 0, 64, 128, 191, 255, 255]


def test_16bit_without_voi_is_stretched_min_max(tmp_path):
    pixels = np.array([[100, 1100], [2100, 4095]], np.uint16)
    out = read_dicom(_save(_dataset(pixels, bits_stored=12), tmp_path / "mm.dcm"), 2).pixels
    assert out.tolist() == [[0, 64], [128, 255]]


def test_rgb_to_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0] = (255, 0, 0)
    rgb[1] = (0, 255, 0)
    rgb[2] = (0, 0, 255)
    rgb[3] = (255, 255, 255)
    out = read_dicom(_save(_dataset(rgb, photometric="RGB"), tmp_path / "rgb.dcm"), 4).pixels
    assert out[:, 0].tolist() == [76, 150, 29, 255]


def test_non_square_dicom_letterbox(tmp_path):
    pixels = np.full((40, 80), 200, np.uint8)
    out = read_dicom(_save(_dataset(pixels), tmp_path / "wide.dcm"), 40).pixels
    assert not out[:10].any() and not out[30:].any()
    assert (out[10:30] == 200).all()


def test_float_pixel_data_ignores_non_finite(tmp_path):
    values = np.array([[0.0, 1.0], [np.nan, 0.5]], np.float32)
    ds = _dataset(None)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 2, 2, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = values.tobytes()
    out = read_dicom(_save(ds, tmp_path / "float.dcm"), 2).pixels
    assert out.tolist() == [[0, 255], [0, 128]]


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("058Y", 58),
        ("58", 58),
        ("6M", 0),
        ("18M", 1),
        ("3W", 0),
        ("10D", 0),
        ("", -1),
        ("abc", -1),
        ("155", -1),
        (" 51 ", 51),
    ],
)
def test_age_parsing(text, years):
    assert dicom._age(text) == years


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case / spaces on purpose
def test_metadata_is_normalised(tmp_path):
    ds = _dataset(_gradient(8, 8), ViewPosition=" ap ", PatientSex="F", BodyPartExamined="chest")
    img = read_dicom(_save(ds, tmp_path / "meta.dcm"), 8)
    assert (img.view_position, img.sex, img.age, img.body_part) == ("AP", "F", -1, "CHEST")
    assert (img.patient_id, img.modality) == ("synthetic-1", "OT")


def test_invalid_size_is_a_programming_error():
    with pytest.raises(ValueError, match="positive integer"):
        read_dicom("whatever.dcm", 0)


# ------------------------------------------------------------------------------------------ geometry


def test_to_square_letterbox_centres_and_pads_with_black():
    image = np.full((3, 6), 9, np.uint8)
    out = to_square_uint8(image, 6)  # no resize: the padding itself is visible
    assert out.tolist()[:1] == [[0] * 6] and not out[5].any() and not out[4].any()
    assert (out[1:4] == 9).all()  # odd remainder (3 rows) goes 1 above, 2 below
    tall = to_square_uint8(np.full((6, 2), 7, np.uint8), 6)
    assert (tall[:, 2:4] == 7).all() and not tall[:, :2].any() and not tall[:, 4:].any()


def test_to_square_resizes_both_ways():
    image = _gradient(100, 100)
    small = to_square_uint8(image, 50)
    # BOX at an integer factor is the exact 2x2 mean
    expected = image.reshape(50, 2, 50, 2).astype(float).mean(axis=(1, 3))
    assert np.abs(small - expected).max() <= 1
    big = to_square_uint8(image, 173)
    assert (
        big.shape == (173, 173) and big.dtype == np.uint8 and big.flags.c_contiguous and big.flags.writeable
    )
    same = to_square_uint8(image, 100)
    np.testing.assert_array_equal(same, image)


def test_to_square_rejects_bad_input():
    with pytest.raises(ValueError):
        to_square_uint8(np.zeros((4, 4, 3), np.uint8), 4)
    with pytest.raises(ValueError):
        to_square_uint8(np.zeros((4, 4), np.float32), 4)
    with pytest.raises(ValueError):
        to_square_uint8(np.zeros((4, 4), np.uint8), 0)


# ------------------------------------------------------------------------------------------ image files


def test_load_image_file_rgb_jpeg_to_grey(tmp_path):
    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: luma 76
    path = tmp_path / "red.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = load_image_file(path, 50)
    assert out.shape == (50, 50) and out.dtype == np.uint8
    assert not out[:12].any() and not out[38:].any()  # letterboxed like a DICOM
    assert abs(float(out[14:36].mean()) - 76) < 3


def test_load_image_file_modes(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = load_image_file(tmp_path / "g16.png", 8)
    # Stretched min..max onto 0..255, linearly: clipping at 255 would leave two levels (0 and 255), not 64.
    np.testing.assert_allclose(out, grey16 / 63000 * 255, atol=0.5)
    rgba = np.full((8, 8, 4), 200, np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (load_image_file(tmp_path / "rgba.png", 8) == 200).all()


def test_load_image_file_unreadable(tmp_path):
    text = tmp_path / "x.png"
    text.write_text("not an image")
    good = _jpeg_bytes(_gradient(64, 64))
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    for path in (text, truncated, tmp_path / "absent.png"):
        with pytest.raises(ImageError) as info:
            load_image_file(path, 32)
        _assert_reason(info.value, "cannot read image", forbid=path)


@pytest.mark.realdata
def test_load_image_file_kermany():
    path = _files(DATA / "kermany-224" / "train" / "NORMAL", "*.jp*g")[0]
    out = load_image_file(path, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and out.std() > 10
