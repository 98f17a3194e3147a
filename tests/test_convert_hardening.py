"""The converter under faults: damaged shards, worker counts, crashes, killed workers, FIFOs, slow decodes,
deflate bombs, awkward patient ids, patient data (issue 13), and the converter/synth CLI's bad input (issue 12)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

import pipeline.data.convert as convert
import pipeline.data.dicom as dicom
from pipeline.data.convert import ConvertError, convert_image_dir, convert_rsna, read_splits_csv
from pipeline.data.records import Record, encode_example
from tests import convert_hooks
from tests.conftest import REPO, wait_for

N = 40


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """40 synthetic RSNA-like DICOMs at 64 px."""
    from pipeline.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("hard-raw")
    make_synthetic_dataset(out, n=N, size=64, seed=3, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> tuple[dict, dict[str, bytes]]:
    """The reference: an uninterrupted conversion with 2 workers (manifest, published files)."""
    out = tmp_path_factory.mktemp("hard-clean") / "out"
    return _convert(raw, out, workers=2), _files(out)


def _convert(raw: Path, out: Path, **kw) -> dict:
    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 2)
    return convert_rsna(raw / "stage_2_train_images", raw / "stage_2_train_labels.csv", out, progress=False, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in [*out.glob(".*tmp*"), *out.glob(".parts/*tmp*"), *out.glob(".parts/.*")])


def _copy(raw: Path, dest: Path) -> Path:
    shutil.copytree(raw, dest)
    return dest


def _add_label(raw: Path, patient: str, target: int = 0) -> None:
    with open(raw / "stage_2_train_labels.csv", "a") as f:
        f.write(f"{patient},,,,,{target}\n")


# --- identity and resume --------------------------------------------------------------------------------
def test_shards_and_digest_do_not_depend_on_workers(raw, clean, tmp_path):
    manifest, files = clean
    one = _convert(raw, tmp_path / "one", workers=1)
    assert _files(tmp_path / "one") == files
    assert one["digest"] == manifest["digest"]
    # the shard count follows the data: MIN_SHARDS per split here (each split has >= 4 records)
    assert all(len(sp["shards"]) == convert.MIN_SHARDS for sp in manifest["splits"].values())


def test_resume_repairs_a_damaged_shard(raw, clean, tmp_path):
    manifest, files = clean
    out = tmp_path / "out"
    _convert(raw, out)
    victim = out / manifest["splits"]["val"]["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of a record: same size, wrong bytes
    victim.write_bytes(bytes(data))
    assert _files(out) != files
    again = _convert(raw, out)
    assert _files(out) == files and again["digest"] == manifest["digest"]
    truncated = out / manifest["splits"]["train"]["shards"][0]["file"]
    truncated.write_bytes(truncated.read_bytes()[:100])
    _convert(raw, out)
    assert _files(out) == files


def test_publishing_fsyncs_before_rename_and_leaves_no_temp_files(raw, clean, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    _convert(raw, out, workers=1)
    monkeypatch.undo()
    replaced = [e for e in events if e[0] == "replace"]
    assert {Path(e[2]).name for e in replaced} >= set(clean[1])  # every published file went through a rename
    for k, event in enumerate(events):
        if event[0] == "replace":
            assert ("fsync", event[1]) in events[:k], f"{event[2]} renamed before its bytes were fsync'ed"
    assert _leftovers(out) == []

    # A failure mid-run (a decode raising) leaves no temporary file either, and a rerun completes.
    calls = {"n": 0}

    def failing(task):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk gone")
        return convert.decode_item(task)

    out2 = tmp_path / "out2"
    monkeypatch.setattr(convert, "DECODE", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        _convert(raw, out2, workers=1)
    monkeypatch.undo()
    assert _leftovers(out2) == [] and any(out2.glob("*.tfrecord"))
    _convert(raw, out2)
    assert _files(out2) == clean[1]


def test_sigkill_of_the_convert_process_then_rerun_is_byte_identical(raw, clean, tmp_path):
    out = tmp_path / "out"
    args = ["convert", "--dicom-dir", str(raw / "stage_2_train_images"), "--labels",
            str(raw / "stage_2_train_labels.csv"), "--out", str(out), "--image-size", "32", "--workers", "2",
            "--quiet"]
    # The slow decoder (50 ms a file) leaves time to kill the run between its first and last shard.
    code = ("import sys, pipeline.data.convert as c, tests.convert_hooks as h; c.DECODE = h.slow; "
            f"from pipeline.cli import main; sys.exit(main({args!r}))")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(out.glob("*.tfrecord")), 120, "a first published shard", launcher=proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the converter, its forkserver and its workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # it really died mid-run
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _files(out) == clean[1]
    assert _leftovers(out) == []


# --- faults inside one file -----------------------------------------------------------------------------
def test_a_killed_worker_rejects_its_file_and_the_rest_converts(raw, tmp_path, monkeypatch):
    r = _copy(raw, tmp_path / "raw")
    images = sorted((r / "stage_2_train_images").glob("*.dcm"))
    shutil.copy(images[0], r / "stage_2_train_images" / f"{convert_hooks.VICTIM}.dcm")
    _add_label(r, convert_hooks.VICTIM)
    monkeypatch.setattr(convert, "DECODE", convert_hooks.die_on_victim)
    m = _convert(r, tmp_path / "out", workers=2)
    assert [x["path"] for x in m["rejected"]] == [f"{convert_hooks.VICTIM}.dcm"]
    assert m["rejected"][0]["reason"].startswith("worker died (killed by SIGKILL)")
    assert sum(sp["count"] for sp in m["splits"].values()) == N


def test_a_fifo_is_skipped_and_a_slow_decode_times_out(raw, tmp_path, monkeypatch):
    r = _copy(raw, tmp_path / "raw")
    os.mkfifo(r / "stage_2_train_images" / "x.dcm")  # opening it for reading would block forever
    _add_label(r, "x")
    m = _convert(r, tmp_path / "out", workers=2)
    assert m["rejected"] == [{"path": "x.dcm", "reason": "not a regular file (a FIFO): skipped"}]
    assert sum(sp["count"] for sp in m["splits"].values()) == N

    # A decode that hangs is cut off by the per-file timeout (here 1 s), inline (1 worker) as in the pool.
    slow_name = sorted((raw / "stage_2_train_images").glob("*.dcm"))[5].name
    real = convert._decode

    def hang(item, kind, size):
        if Path(item.path).name == slow_name:
            time.sleep(600)
        return real(item, kind, size)

    monkeypatch.setattr(convert, "_decode", hang)
    start = time.monotonic()
    m = _convert(raw, tmp_path / "out2", workers=1, decode_timeout=1.0)
    assert time.monotonic() - start < 120
    assert m["rejected"] == [{"path": slow_name, "reason": "decode took longer than 1 s (decode timeout): skipped"}]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_a_time_limit_alarm_swallowed_by_a_finaliser_still_ends_the_block():
    """Python drops an exception raised inside `__del__` ("Exception ignored"): the deadline's alarm lands in
    one here, and a single alarm would let the block sleep on for 30 s. The repeating alarm ends it."""
    from pipeline.data.isolation import TimeLimitExceeded, time_limit

    swallowed = []

    class SlowFinaliser:
        def __del__(self):
            try:
                time.sleep(2)  # the alarm at 0.3 s interrupts this sleep and raises here...
            except BaseException as e:
                swallowed.append(type(e))
                raise  # ...and Python drops it on the way out of __del__

    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded), time_limit(0.3):
        SlowFinaliser()  # dropped at once: __del__ runs inside the block
        time.sleep(30)
    assert swallowed == [TimeLimitExceeded]
    assert time.monotonic() - start < 5

    # Left in time, the block leaves no alarm behind it: nothing fires in the code that follows.
    with time_limit(0.2):
        pass
    time.sleep(0.5)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _deflated_bomb(path: Path, inflated_bytes: int) -> None:
    """A valid Deflated Explicit VR Little Endian file whose data set is a private OB element of zeros:
    a few KB on disk, `inflated_bytes` once inflated. Written as a stream (the test never holds it whole)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(buf), meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(b"\x29\x00\x10\x10OB\0\0" + inflated_bytes.to_bytes(4, "little"))]
    zeros = bytes(1 << 20)
    for _ in range(inflated_bytes >> 20):
        body.append(deflater.compress(zeros))
    body.append(deflater.flush())
    path.write_bytes(buf.getvalue() + b"".join(body))


def test_deflate_bomb_memory_is_bounded(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.dcm"
    _deflated_bomb(bomb, 256 << 20)  # 256 MiB once inflated
    assert bomb.stat().st_size < 400_000
    limit = 8 << 20
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", limit)
    tracemalloc.start()
    try:
        with pytest.raises(dicom.DicomError, match="MAX_INFLATED_BYTES=8388608"):
            dicom.read_dicom(bomb, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # pydicom alone inflates all 256 MiB; the guard stops after the limit plus one 1 MiB step (and the
    # bytearray's over-allocation on growth)
    assert peak < limit * 2.5, peak


def test_a_legitimate_deflated_dicom_still_decodes(tmp_path):
    arr = (np.arange(48 * 60) % 251).astype(np.uint8).reshape(48, 60)
    paths = {}
    for name, ts in (("plain", ExplicitVRLittleEndian), ("deflated", DeflatedExplicitVRLittleEndian)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 48, 60, 8, 8, 7
        ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, "MONOCHROME2"
        ds.PatientAge, ds.ViewPosition = "097Y", "PA"
        ds.PixelData = arr.tobytes()
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    plain, deflated = (dicom.read_dicom(paths[k], 32) for k in ("plain", "deflated"))
    np.testing.assert_array_equal(deflated.pixels, plain.pixels)
    assert deflated.view_position == "PA"
    # HIPAA Safe Harbor: 97 years is stored as 90
    assert deflated.age == plain.age == 90


def test_ages_over_89_are_stored_as_90():
    img = np.zeros((4, 4), np.uint8)
    assert encode_example(Record(img, 0, "p", (), "PA", "F", 104)) == encode_example(Record(img, 0, "p", (), "PA",
                                                                                            "F", 90))
    assert encode_example(Record(img, 0, "p", age=89)) != encode_example(Record(img, 0, "p", age=90))
    assert dicom._age("089Y") == 89 and dicom._age("090Y") == 90 and dicom._age("120") == 90
    assert dicom._age("155") == -1  # a data-entry error stays unknown


# --- image folders: patient ids, rules, limits ------------------------------------------------------------
def _image_folders(root: Path, names: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(0)
    for cls, files in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in files:
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / cls / name)
    return root


def test_patient_ids_with_commas_and_quotes_survive_splits_csv(tmp_path):
    odd = ['smith, "jr"', 'o"neil', "a,b", "plain"]
    imgs = _image_folders(tmp_path / "imgs", {
        "NORMAL": [f"{p}_{k}.png" for p in odd[:2] for k in range(2)],
        "PNEUMONIA": [f"{p}_{k}.png" for p in odd[2:] for k in range(2)],
    })
    m = convert_image_dir(imgs, tmp_path / "out", patient_regex=r"^(.+)_\d\.png$", image_size=16, workers=1,
                          progress=False, test_frac=0.0, val_frac=0.0)
    assert m["source"]["patients"] == 4
    assert read_splits_csv(tmp_path / "out" / "splits.csv") == dict.fromkeys(odd, "train")
    with open(tmp_path / "out" / "splits.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert all(len(row) == 3 for row in rows) and len(rows) == 5


def test_a_fifo_in_an_image_folder_is_rejected_with_a_reason(tmp_path):
    imgs = _image_folders(tmp_path / "imgs", {"NORMAL": ["a_0.png", "b_0.png"], "PNEUMONIA": ["c_0.png", "d_0.png"]})
    os.mkfifo(imgs / "PNEUMONIA" / "e_0.png")
    m = convert_image_dir(imgs, tmp_path / "out", patient_regex=r"^(\w)_", image_size=16, workers=2, progress=False)
    assert m["rejected"] == [{"path": "PNEUMONIA/e_0.png", "reason": "not a regular file (a FIFO): skipped"}]
    assert sum(sp["count"] for sp in m["splits"].values()) == 4


def test_image_folder_without_a_rule_warns_and_limit_keeps_both_classes(tmp_path, capsys):
    imgs = _image_folders(tmp_path / "imgs", {"NORMAL": [f"n{k}.png" for k in range(4)],
                                              "PNEUMONIA": [f"p{k}.png" for k in range(16)]})
    m = convert_image_dir(imgs, tmp_path / "out", image_size=16, workers=1, progress=False, limit=5)
    assert "no patient rule" in capsys.readouterr().err
    assert m["warnings"] == [convert.NO_PATIENT_RULE]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["warnings"] == [convert.NO_PATIENT_RULE]
    counts = [sp["count"] for sp in m["splits"].values()]
    positives = sum(sp["positives"] for sp in m["splits"].values())
    assert sum(counts) == 5 and positives == 4  # 1 NORMAL + 4 PNEUMONIA: the 20/80 share, both classes
    with pytest.raises(ConvertError, match="--limit must be a positive integer, got 0"):
        convert_image_dir(imgs, tmp_path / "o2", image_size=16, workers=1, progress=False, limit=0)


def test_convert_takes_the_patient_rule_from_the_experiment_file(tmp_path):
    imgs = _image_folders(tmp_path / "imgs", {"NORMAL": [f"person{k}_{j}.png" for k in range(3) for j in range(2)],
                                              "PNEUMONIA": [f"person{k}_{j}.png" for k in (7, 8, 9)
                                                            for j in range(2)]})
    exp = tmp_path / "exp.toml"
    exp.write_text(f'name = "x"\n[data]\ndir = "{tmp_path / "out"}"\npatient_regex = \'^(person\\d+)_\'\n')
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "convert", "--image-dir", str(imgs), "--config",
                          str(exp), "--image-size", "16", "--workers", "1", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "WARNING" not in run.stderr + run.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["patient_rule"] == r"^(person\d+)_" and m["source"]["patients"] == 6
    assert "warnings" not in m


def test_manifest_names_files_relative_to_the_input_folder(raw, tmp_path):
    r = _copy(raw, tmp_path / "raw")
    sub = r / "stage_2_train_images" / "sub"
    sub.mkdir()
    (sub / "stranger.dcm").write_bytes(b"x")
    images = sorted((r / "stage_2_train_images").glob("*.dcm"))
    images[0].write_bytes(b"not a dicom")
    m = _convert(r, tmp_path / "out")
    assert m["unlabelled_inputs"] == ["sub/stranger.dcm"]
    assert [x["path"] for x in m["rejected"]] == [images[0].name]
    assert str(tmp_path) not in (tmp_path / "out" / "manifest.json").read_text()


# --- CLI: one line, exit 2 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["synth", "--out", "{tmp}/s", "--n", "0"], "--n must be a positive integer, got 0"),
    (["synth", "--out", "{tmp}/s", "--image-size", "8"], "--image-size must be an integer in [32, 8192], got 8"),
    (["convert", "--dicom-dir", "{raw}/stage_2_train_images", "--labels", "{raw}/stage_2_train_labels.csv",
      "--out", "{tmp}/o", "--test-frac", "1.5"], "--test-frac must be a number in [0, 1), got 1.5"),
    (["convert", "--dicom-dir", "{raw}/stage_2_train_images", "--labels", "{raw}/stage_2_train_labels.csv",
      "--out", "{tmp}/o", "--limit", "-3"], "argument --limit: must be >= 1, got -3 (see pneumo convert --help)"),
])
def test_cli_bad_values_are_one_line_exit_2(raw, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path, raw=raw) for a in argv]
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip() == f"pneumo {argv[0]}: error: {message}"


def test_synth_image_size_alias_and_quiet(tmp_path):
    for flag, quiet in (("--image-size", ["--quiet"]), ("--size", [])):
        out = tmp_path / flag.strip("-")
        run = subprocess.run([sys.executable, "-m", "pipeline.cli", "synth", "--out", str(out), "--n", "3",
                              flag, "40", "--workers", "1", *quiet], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        first = next((out / "stage_2_train_images").glob("*.dcm"))
        assert pydicom.dcmread(first).Rows == 40
        assert ("synth" in run.stderr) is (not quiet)  # the progress bar is drawn unless --quiet


# --- files on disk ----------------------------------------------------------------------------------------
def test_shards_are_private_and_a_second_convert_on_one_out_is_refused(raw, tmp_path):
    """Shards hold patient ids: 0600 like their sidecars and splits.csv. Two converts on one --out once deleted
    each other's temp files; the second now stops at once with one line while the first holds the folder."""
    out = tmp_path / "out"
    _convert(raw, out, workers=1)
    for path in [*out.glob("*.tfrecord"), out / "splits.csv", *out.glob(".parts/*.json")]:
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    with convert.exclusive(out):  # another convert is running on this folder
        with pytest.raises(ConvertError, match=r"another `pneumo convert` is writing to this folder"):
            _convert(raw, out, workers=1)
    assert _convert(raw, out, workers=1)["splits"]  # and once it is done, the folder is free again


def test_a_limit_that_expires_before_the_block_starts_leaves_no_timer_behind():
    """`--decode-timeout 1e-7`: the alarm is due before the block's first line. It once fired between arming
    the repeating timer and the `try` that disarms it, so the timer outlived the block and the process died of
    SIGALRM. Each attempt now ends in TimeLimitExceeded, or in the block, with the timer off and the handler
    restored."""
    from pipeline.data.isolation import TimeLimitExceeded, time_limit

    before = signal.getsignal(signal.SIGALRM)
    expired = 0
    for _ in range(200):
        try:
            with time_limit(1e-7):
                time.sleep(0.001)
        except TimeLimitExceeded:
            expired += 1
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is before
    assert expired == 200
