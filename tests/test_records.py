"""The hand-written Example/TFRecord encoder against TensorFlow's own parser (eagerly and in tf.data)."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data.records import Record, encode_example, frame_record, iter_records, parse_batch


def _records():
    rng = np.random.default_rng(0)
    return [
        Record(rng.integers(0, 256, (32, 32), dtype=np.uint8), 1, "p-1", (0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.2, 0.1),
               "AP", "F", 45),
        Record(np.zeros((32, 32), np.uint8), 0, "p-2", (), "PA", "M", -1),
        Record(np.full((32, 32), 255, np.uint8), 0, "ünïcode", (), "", "", 0),
    ]


def test_encoding_matches_tensorflows_example_proto():
    for rec in _records():
        ex = tf.train.Example.FromString(encode_example(rec))
        f = ex.features.feature
        assert f["image"].bytes_list.value[0] == rec.image.tobytes()
        assert f["label"].int64_list.value[0] == rec.label
        assert f["age"].int64_list.value[0] == rec.age  # -1 survives the varint encoding
        assert f["patient_id"].bytes_list.value[0].decode() == rec.patient_id
        assert np.allclose(f["boxes"].float_list.value, rec.boxes)
        assert (f["height"].int64_list.value[0], f["width"].int64_list.value[0]) == (32, 32)
        # Same record, same bytes (sorted keys): the converter's output is reproducible.
        assert encode_example(rec) == encode_example(rec)


def _write(path, recs):
    with open(path, "wb") as f:
        for r in recs:
            f.write(frame_record(encode_example(r)))


def test_framing_reads_back_in_tfrecorddataset_and_parses_batched(tmp_path):
    recs = _records()
    path = tmp_path / "x.tfrecord"
    _write(path, recs)
    assert len(list(iter_records(path))) == 3

    def check(features, labels):
        assert features["image"].shape == (3, 32, 32, 1) and features["image"].dtype == tf.uint8
        for i, r in enumerate(recs):
            assert np.array_equal(features["image"][i, :, :, 0].numpy(), r.image)
        assert labels.numpy().tolist() == [1.0, 0.0, 0.0]
        assert features["meta"].numpy()[0].tolist() == pytest.approx([1, 0, 0, 1, 0.45, 1])
        assert features["meta"].numpy()[1].tolist() == pytest.approx([0, 1, 1, 0, 0, 0])
        assert features["boxes"].numpy()[0].tolist() == pytest.approx(list(recs[0].boxes))
        assert features["boxes"].numpy()[1].tolist() == [-1.0] * 8
        assert [p.decode() for p in features["patient_id"].numpy()] == [r.patient_id for r in recs]

    serialized = tf.constant(list(iter_records(path)))
    check(*parse_batch(serialized, 32, with_info=True))  # eagerly
    ds = tf.data.TFRecordDataset(str(path)).batch(3).map(lambda s: parse_batch(s, 32, with_info=True))
    check(*next(iter(ds)))  # and inside the pipeline (every preprocessing op is tested eagerly and in a graph)


def test_damaged_files_are_named(tmp_path):
    path = tmp_path / "bad.tfrecord"
    _write(path, _records())
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.tfrecord.*checksum"):
        list(iter_records(path))
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="bad.tfrecord"):
        list(iter_records(path))
