"""Tests for pipeline.data.labels: RSNA CSV reading and validation, image folders, patient-level splits."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.labels import (
    KERMANY_PATIENT_REGEX,
    MAX_BOX_EXTENT,
    LabelError,
    PatientLabel,
    boxes_within,
    read_rsna_labels,
    scan_image_dir,
    split_patients,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_CSV = SHARED / "rsna" / "stage_2_train_labels.csv"
KERMANY = SHARED / "kermany-224" / "train"

HEADER = "patientId,x,y,width,height,Target\n"


def write_csv(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(header + body)
    return path


# --------------------------------------------------------------------------------------------------------
# read_rsna_labels


@pytest.mark.realdata
def test_real_label_file():
    if not REAL_CSV.exists():
        pytest.skip(f"real RSNA label file not found at {REAL_CSV} (../shared/data is absent in a fresh clone)")
    start = time.process_time()  # CPU time: wall time fails on a busy machine (1.58 s seen with 7 other jobs)
    labels = read_rsna_labels(REAL_CSV)
    seconds = time.process_time() - start
    assert len(labels) == 26_684
    positives = [p for p in labels.values() if p.label == 1]
    assert len(positives) == 6_012
    assert Counter(len(p.boxes) for p in positives).keys() <= {1, 2, 3, 4}
    assert all(p.boxes == () for p in labels.values() if p.label == 0)
    assert sum(len(p.boxes) for p in positives) == 9_555  # one row per box
    # Dict order is first appearance in the file.
    assert next(iter(labels)) == "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
    assert labels["00436515-870c-4b36-a041-de91049b9ab4"].boxes[0] == (264.0, 152.0, 213.0, 379.0)
    assert all(boxes_within(p, 1024, 1024) for p in positives)
    assert seconds < 1.0, f"read_rsna_labels took {seconds:.2f} s of CPU on the real file"


def test_small_file_groups_boxes_in_first_appearance_order(tmp_path):
    path = write_csv(tmp_path, "b,,,,,0\na,10.0,20.0,30.0,40.0,1\nc,,,,,0\na,50,60,70,80,1\nb,,,,,0\n")
    labels = read_rsna_labels(path)
    assert list(labels) == ["b", "a", "c"]
    assert labels["a"] == PatientLabel("a", 1, ((10.0, 20.0, 30.0, 40.0), (50.0, 60.0, 70.0, 80.0)))
    assert labels["b"] == PatientLabel("b", 0, ())


def test_extra_columns_and_bom_are_accepted(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfpatientId,x,y,width,height,Target,class\np1,,,,,0,Normal\n")
    assert read_rsna_labels(path) == {"p1": PatientLabel("p1", 0, ())}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a,,,,,0\nb,,,,,2\n", "data row 2 (line 3): Target must be 0 or 1, got '2'"),
        ("a,,,,,0\nb,,,,,yes\n", "data row 2 (line 3): Target must be 0 or 1"),
        ("a,,,,,0\nb,1,2,3,4,1\nb,,,,,0\n", "data row 3 (line 4): patient b has conflicting Targets"),
        ("ok,,,,,0\n../x,,,,,0\n", "data row 2 (line 3): patientId '../x' is not a safe file name"),
        ("a/b,,,,,0\n", "data row 1 (line 2): patientId 'a/b' is not a safe file name"),
        ("a\\b,,,,,0\n", "data row 1 (line 2): patientId"),
        (".hidden,,,,,0\n", "data row 1 (line 2): patientId '.hidden'"),
        ("a,,,,,0\n,,,,,0\n", "data row 2 (line 3): patientId '' is not a safe file name"),
        ("a,-5.0,10.0,20.0,20.0,1\n", "data row 1 (line 2): box (-5, 10, 20, 20) has a negative"),
        ("a,5.0,10.0,0.0,20.0,1\n", "data row 1 (line 2): box (5, 10, 0, 20) has a non-positive size"),
        ("a,nan,10,20,20,1\n", "data row 1 (line 2): x is not a number: 'nan'"),
        ("a,inf,10,20,20,1\n", "data row 1 (line 2): box (inf, 10, 20, 20) has a negative or non-finite"),
        (f"a,{MAX_BOX_EXTENT - 10},10,20,20,1\n", f"data row 1 (line 2): box ({MAX_BOX_EXTENT - 10}, 10, 20, 20) reaches beyond"),
        ("a,,,,,0\nb,,,,,1\n", "data row 2 (line 3): positive row (Target 1) has no box"),
        ("a,1,2,3,4,0\n", "data row 1 (line 2): negative row (Target 0) has a box"),
        ("a,1,2,,4,1\n", "data row 1 (line 2): box fields must be all empty or all filled"),
        ("a,1,two,3,4,1\n", "data row 1 (line 2): y is not a number: 'two'"),
    ],
)
def test_validation_errors_name_file_and_row(tmp_path, body, expected):
    path = write_csv(tmp_path, body)
    with pytest.raises(LabelError) as info:
        read_rsna_labels(path)
    message = str(info.value)
    assert message.startswith("labels.csv "), message
    assert expected in message
    assert "\n" not in message


def test_earliest_problem_is_reported(tmp_path):
    # Row 3 has a bad Target, row 2 an unsafe id: the reader meets row 2 first.
    path = write_csv(tmp_path, "a,,,,,0\na/b,,,,,0\nc,,,,,7\n")
    with pytest.raises(LabelError, match=r"data row 2 \(line 3\): patientId"):
        read_rsna_labels(path)


def test_missing_columns_are_named(tmp_path):
    path = write_csv(tmp_path, "a,1,2,3,1\n", header="patientId,x,y,width,Target\n")
    with pytest.raises(LabelError, match=r"labels\.csv: missing column\(s\) height"):
        read_rsna_labels(path)
    path = write_csv(tmp_path, "a,0\n", header="id,Target\n")
    with pytest.raises(LabelError, match=r"missing column\(s\) patientId, x, y, width, height"):
        read_rsna_labels(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LabelError, match="file not found"):
        read_rsna_labels(tmp_path / "nope.csv")
    with pytest.raises(LabelError, match="no label rows"):
        read_rsna_labels(write_csv(tmp_path, ""))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LabelError, match="empty.csv: not a readable CSV"):
        read_rsna_labels(tmp_path / "empty.csv")


def test_boxes_within():
    label = PatientLabel("a", 1, ((0.0, 0.0, 10.0, 10.0), (90.0, 80.0, 10.0, 20.0)))
    assert boxes_within(label, 100, 100)
    assert not boxes_within(label, 99, 100)
    assert not boxes_within(label, 100, 99)
    assert boxes_within(PatientLabel("b", 0, ()), 1, 1)
    assert not boxes_within(PatientLabel("c", 1, ((-1.0, 0.0, 5.0, 5.0),)), 100, 100)


# --------------------------------------------------------------------------------------------------------
# split_patients


def make_labels(n: int, rate: float, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"p{i:05d}": int(v) for i, v in enumerate(rng.random(n) < rate)}


def test_split_is_a_stratified_partition():
    labels = make_labels(1000, 0.25)
    split = split_patients(labels, test_frac=0.2, val_frac=0.2, seed=0)
    assert set(split) == set(labels)  # every patient in exactly one split (a dict cannot hold two)
    counts = Counter(split.values())
    assert counts == {"test": 200, "val": 160, "train": 640}
    overall = np.mean(list(labels.values()))
    for name in ("train", "val", "test"):
        rate = np.mean([labels[p] for p, s in split.items() if s == name])
        assert abs(rate - overall) < 0.02, (name, rate, overall)


def test_split_is_deterministic_and_order_free():
    labels = make_labels(500, 0.3)
    a = split_patients(labels, 0.2, 0.2, seed=7)
    assert a == split_patients(labels, 0.2, 0.2, seed=7)
    reversed_labels = dict(reversed(list(labels.items())))
    assert split_patients(reversed_labels, 0.2, 0.2, seed=7) == a
    assert split_patients(labels, 0.2, 0.2, seed=8) != a


def test_zero_fraction_leaves_split_empty():
    labels = make_labels(100, 0.3)
    assert "test" not in split_patients(labels, 0.0, 0.2, seed=0).values()
    assert "val" not in split_patients(labels, 0.2, 0.0, seed=0).values()
    assert set(split_patients(labels, 0.0, 0.0, seed=0).values()) == {"train"}


@pytest.mark.parametrize("n_pos", [0, 1, 2])
def test_tiny_inputs_do_not_crash(n_pos):
    labels = {"a": 0, "b": 0, "c": 0}
    labels.update({k: 1 for k in list(labels)[:n_pos]})
    split = split_patients(labels, 0.2, 0.2, seed=0)
    assert set(split) == set(labels)
    assert Counter(split.values()) == {"train": 1, "val": 1, "test": 1}
    assert split_patients({}, 0.2, 0.2, seed=0) == {}
    assert split_patients({"only": 1}, 0.2, 0.2, seed=0) == {"only": "train"}
    assert set(split_patients({"x": 1, "y": 0}, 0.5, 0.5, seed=0).values()) == {"train", "test"}


@pytest.mark.parametrize(("test_frac", "val_frac"), [(-0.1, 0.2), (1.0, 0.2), (0.2, 1.5), (float("nan"), 0.2), (0.2, "0.2")])
def test_bad_fractions(test_frac, val_frac):
    with pytest.raises(ValueError, match=r"_frac must be a number in \[0, 1\)"):
        split_patients(make_labels(10, 0.5), test_frac, val_frac, seed=0)


def test_bad_label_values():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        split_patients({"a": 0, "b": 2}, 0.2, 0.2, seed=0)


# --------------------------------------------------------------------------------------------------------
# scan_image_dir


def write_image(path: Path, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), 128 if mode == "L" else (10, 20, 30)).save(path)


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    write_image(root / "NORMAL" / "IM-0001-0001.jpeg")
    write_image(root / "NORMAL" / "IM-0001-0002.png")
    write_image(root / "NORMAL" / "NORMAL2-IM-0003-0001.jpeg")
    write_image(root / "PNEUMONIA" / "person1_bacteria_1.jpeg", "RGB")
    write_image(root / "PNEUMONIA" / "person1_virus_2.JPG", "RGB")  # upper-case suffix counts
    write_image(root / "PNEUMONIA" / "person2_virus_3.png", "RGB")
    (root / "PNEUMONIA" / "notes.txt").write_text("not an image")
    write_image(root / "PNEUMONIA" / "._person9_virus_9.jpeg")  # macOS metadata file: skipped
    return root


def test_scan_without_rule_makes_each_image_a_patient(image_tree):
    items, rule = scan_image_dir(image_tree)
    assert rule is False
    assert [i.patient_id for i in items] == [
        "NORMAL/IM-0001-0001",
        "NORMAL/IM-0001-0002",
        "NORMAL/NORMAL2-IM-0003-0001",
        "PNEUMONIA/person1_bacteria_1",
        "PNEUMONIA/person1_virus_2",
        "PNEUMONIA/person2_virus_3",
    ]
    assert [i.label for i in items] == [0, 0, 0, 1, 1, 1]
    assert all(Path(i.path).is_file() for i in items)


def test_scan_with_kermany_rule_groups_patients(image_tree):
    items, rule = scan_image_dir(image_tree, KERMANY_PATIENT_REGEX)
    assert rule is True
    by_patient = Counter(i.patient_id for i in items)
    assert by_patient == {"IM-0001": 2, "NORMAL2-IM-0003": 1, "person1": 2, "person2": 1}


def test_scan_errors(image_tree, tmp_path):
    with pytest.raises(LabelError, match=r"PNEUMONIA/person1_bacteria_1\.jpeg: file name does not match"):
        scan_image_dir(image_tree, r"^(NORMAL2-IM-\d+|IM-\d+)")
    with pytest.raises(LabelError, match="exactly one capture group"):
        scan_image_dir(image_tree, r"^(IM)-(\d+)")
    with pytest.raises(LabelError, match="invalid"):
        scan_image_dir(image_tree, r"^(IM")
    write_image(image_tree / "PNEUMONIA" / "IM-0001-0009.jpeg")
    with pytest.raises(LabelError, match="patient 'IM-0001' has images in both NORMAL/ and PNEUMONIA/"):
        scan_image_dir(image_tree, KERMANY_PATIENT_REGEX)
    (tmp_path / "only" / "NORMAL").mkdir(parents=True)
    with pytest.raises(LabelError, match="missing class folder PNEUMONIA/"):
        scan_image_dir(tmp_path / "only")
    (tmp_path / "only" / "PNEUMONIA").mkdir()
    with pytest.raises(LabelError, match="no .png/.jpg/.jpeg images"):
        scan_image_dir(tmp_path / "only")


@pytest.mark.realdata
def test_real_kermany_folder():
    if not KERMANY.is_dir():
        pytest.skip(f"Kermany images not found at {KERMANY} (../shared/data is absent in a fresh clone)")
    items, rule = scan_image_dir(KERMANY, KERMANY_PATIENT_REGEX)  # raises if any file does not match
    assert rule is True
    assert len(items) == 5_216
    assert sum(i.label == 0 for i in items) == 1_341
    patients = {i.patient_id for i in items}
    print(f"Kermany train: {len(items)} images, {len(patients)} patients")
    assert len(patients) == 2_846
    # The rule is specific: nothing like 'person' alone or a whole file name slips through.
    assert all(p.startswith(("person", "IM-", "NORMAL2-IM-")) and "_" not in p for p in patients)
