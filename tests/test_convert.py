"""The converter: patient-level splits, exact counts, determinism, resumability, rejected inputs."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.convert import ConvertError, convert_image_dir, convert_rsna
from pipeline.data.records import iter_records
from tests.conftest import REPO, shared_data


def _convert(raw, out, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 2)
    return convert_rsna(raw / "stage_2_train_images", raw / "stage_2_train_labels.csv", out, progress=False, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_counts_splits_and_manifest(synth_raw, tmp_path):
    m = _convert(synth_raw, tmp_path / "out")
    total = sum(s["count"] for s in m["splits"].values())
    assert total == 240 and m["rejected"] == [] and m["unmatched_labels"] == 0
    assert m["splits"]["test"]["count"] == 48 and m["splits"]["val"]["count"] == 39  # 20%, then 20% of the rest (rounded up)
    rows = list(csv.DictReader(open(tmp_path / "out" / "splits.csv")))
    assert len(rows) == 240 and len({r["patient_id"] for r in rows}) == 240  # no patient in two splits
    for split, s in m["splits"].items():
        assert s["positives"] == sum(int(r["label"]) for r in rows if r["split"] == split)
        assert len(s["shards"]) >= 2  # at least one shard per worker
        for shard in s["shards"]:
            assert shard["file"].startswith(f"{split}-") and shard["file"].endswith(f"-of-{len(s['shards']):05d}.tfrecord")
            assert len(list(iter_records(tmp_path / "out" / shard["file"]))) == shard["count"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["digest"] == m["digest"] and on_disk["source"]["kind"] == "dicom"
    assert set(on_disk) >= {"schema_version", "image_size", "seed", "source", "splits", "rejected",
                            "unlabelled_inputs", "unmatched_labels", "digest"}


def test_same_command_same_bytes(synth_raw, tmp_path):
    _convert(synth_raw, tmp_path / "a", workers=2)
    _convert(synth_raw, tmp_path / "b", workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    # Resuming with another pool size keeps the stored shard layout: still the same bytes.
    (tmp_path / "a" / "manifest.json").unlink()
    for shard in (tmp_path / "a").glob("val-*.tfrecord"):
        shard.unlink()
    _convert(synth_raw, tmp_path / "a", workers=1)
    assert _files(tmp_path / "a") == b
    other = _convert(synth_raw, tmp_path / "c", seed=1)
    assert other["digest"] != json.loads(a["manifest.json"])["digest"]


def test_rerun_resumes_and_rebuilds_identically(synth_raw, tmp_path):
    out = tmp_path / "out"
    first = _convert(synth_raw, out)
    before = _files(out)
    victim = first["splits"]["train"]["shards"][0]["file"]
    (out / victim).unlink()  # a run killed after renaming some shards but not this one
    (out / f".{victim}.tmp-999").write_bytes(b"half-written")
    again = _convert(synth_raw, out)
    assert _files(out) == before and again["digest"] == first["digest"]
    assert not list(out.glob(".*.tmp-*"))


def test_a_different_input_set_or_size_is_refused(synth_raw, tmp_path):
    out = tmp_path / "out"
    _convert(synth_raw, out)
    with pytest.raises(ConvertError, match="image_size"):
        _convert(synth_raw, out, image_size=48)
    with pytest.raises(ConvertError, match="inputs"):
        _convert(synth_raw, out, limit=100)


def test_bad_inputs_are_rejected_and_the_rest_converted(synth_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synth_raw, raw)
    images = sorted((raw / "stage_2_train_images").glob("*.dcm"))
    images[0].write_bytes(b"not a dicom at all")
    images[1].write_bytes(images[1].read_bytes()[:2000])  # truncated
    (raw / "stage_2_train_images" / "stranger.dcm").write_bytes(images[2].read_bytes())  # no label row
    images[3].unlink()  # a label row without a file
    m = _convert(raw, tmp_path / "out")
    reasons = {Path(r["path"]).name: r["reason"] for r in m["rejected"]}
    assert set(reasons) == {images[0].name, images[1].name}
    assert all(reason and "\n" not in reason for reason in reasons.values())
    assert sum(s["count"] for s in m["splits"].values()) == 240 - 3
    assert [Path(p).name for p in m["unlabelled_inputs"]] == ["stranger.dcm"]
    assert m["unmatched_labels"] == 1


def test_nothing_convertible_is_an_error(tmp_path):
    raw = tmp_path / "raw" / "stage_2_train_images"
    raw.mkdir(parents=True)
    (raw / "a.dcm").write_bytes(b"junk")
    (tmp_path / "raw" / "labels.csv").write_text("patientId,x,y,width,height,Target\na,,,,,0\n")
    with pytest.raises(ConvertError, match="no record could be written"):
        convert_rsna(raw, tmp_path / "raw" / "labels.csv", tmp_path / "out", image_size=32, workers=1,
                     progress=False)


def test_zero_fraction_leaves_a_split_empty(synth_raw, tmp_path):
    m = _convert(synth_raw, tmp_path / "out", test_frac=0.0)
    assert m["splits"]["test"] == {"count": 0, "positives": 0, "shards": []}
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 240


def _shard_records(out: Path, manifest: dict) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """split -> (patient_id, label, image) of every record, read back from the shard files themselves."""
    import tensorflow as tf  # only to decode tf.train.Example payloads

    found = {}
    for split, s in manifest["splits"].items():
        found[split] = []
        for shard in s["shards"]:
            for payload in iter_records(out / shard["file"]):
                f = tf.train.Example.FromString(payload).features.feature
                size = f["height"].int64_list.value[0]
                image = np.frombuffer(f["image"].bytes_list.value[0], np.uint8).reshape(size, size)
                found[split].append((f["patient_id"].bytes_list.value[0].decode(), f["label"].int64_list.value[0],
                                     image))
    return found


def test_image_folders_with_a_patient_rule_keep_each_patient_in_one_split(tmp_path):
    """24 patients with 2-5 PNGs each (the patient id in the file name, Kermany-style): read back from the
    shards, every patient's images sit in one split, under that patient's id (each image is painted with
    its patient's grey level, so the id is checked against the pixels, not only against splits.csv)."""
    rng = np.random.default_rng(0)
    images_of, grey = {}, {}
    for n, cls in enumerate(["NORMAL"] * 12 + ["PNEUMONIA"] * 12):
        pid = f"person{n}{cls[0]}"
        grey[pid] = 20 + 9 * n
        images_of[pid] = int(rng.integers(2, 6))
        (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        for k in range(images_of[pid]):
            shape = (40 + 4 * k, 50)  # not square, and different per image
            Image.fromarray(np.full(shape, grey[pid], np.uint8)).save(tmp_path / "imgs" / cls / f"{pid}_{k}.png")
    m = convert_image_dir(tmp_path / "imgs", tmp_path / "out", patient_regex=r"^(person\d+[NP])_",
                          image_size=32, workers=2, progress=False, test_frac=0.25, val_frac=0.25)
    assert m["source"]["patients"] == 24 and m["source"]["patient_rule"] and m["rejected"] == []
    records = _shard_records(tmp_path / "out", m)
    split_of: dict[str, set[str]] = {}
    for split, recs in records.items():
        assert recs, f"{split} is empty"
        assert len(recs) == m["splits"][split]["count"]
        for pid, label, image in recs:
            split_of.setdefault(pid, set()).add(split)
            assert label == int(pid.endswith("P")) and image[16, 16] == grey[pid]
    assert {pid: len(s) for pid, s in split_of.items()} == {pid: 1 for pid in images_of}  # no patient in two
    count = {pid: sum(r[0] == pid for recs in records.values() for r in recs) for pid in images_of}
    assert count == images_of  # every image of every patient, once
    rows = {r["patient_id"]: r["split"] for r in csv.DictReader(open(tmp_path / "out" / "splits.csv"))}
    assert rows == {pid: next(iter(s)) for pid, s in split_of.items()}


def test_cli_is_light_and_reports_one_line_errors(synth_raw, tmp_path):
    # convert must never load TensorFlow or MLflow (6 s of imports), in the parent or in its workers.
    code = (
        "import sys; from pipeline.cli import main; "
        f"rc = main(['convert', '--dicom-dir', r'{synth_raw}/stage_2_train_images', '--labels', "
        f"r'{synth_raw}/stage_2_train_labels.csv', '--out', r'{tmp_path}/out', '--image-size', '32', '--quiet']); "
        "assert rc == 0; assert 'tensorflow' not in sys.modules and 'mlflow' not in sys.modules, 'heavy import'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "240 records" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "convert", "--dicom-dir", str(tmp_path),
                          "--labels", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "missing.csv" in bad.stderr


def test_real_rsna_sample():
    """The issue's acceptance command on the 12 real DICOMs and the full label file."""
    images = shared_data("rsna", "stage_2_train_images")
    labels = shared_data("rsna", "stage_2_train_labels.csv")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = convert_rsna(images, labels, Path(tmp) / "rsna-sample", image_size=256, workers=2, progress=False)
    assert sum(s["count"] for s in m["splits"].values()) == 12
    assert sum(s["positives"] for s in m["splits"].values()) == 3
    assert m["unmatched_labels"] == 26_672 and m["rejected"] == [] and m["unlabelled_inputs"] == []
