"""tf.data pipelines: exact evaluation, shuffled infinite training, damaged shards named."""

import json
from collections import Counter

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, eval_dataset, train_dataset


def _manifest(data):
    return json.loads((data / "manifest.json").read_text())


@pytest.mark.parametrize("batch", [7, 64])
def test_eval_reads_every_record_exactly_once(synth_data, batch):
    m = _manifest(synth_data)
    ids, sizes = [], []
    for features, labels in eval_dataset(synth_data, "test", batch, with_info=True):
        ids += [p.decode() for p in features["patient_id"].numpy()]
        sizes.append(len(labels))
        assert features["image"].dtype.name == "uint8" and features["image"].shape[1:] == (64, 64, 1)
    assert len(ids) == m["splits"]["test"]["count"] == len(set(ids))
    assert sizes[-1] == m["splits"]["test"]["count"] - batch * (len(sizes) - 1)  # last partial batch kept


def test_train_batches_are_shuffled_repeated_and_uint8(synth_data):
    cfg = DataConfig(batch_size=16, deterministic=True, cache="memory")
    n = _manifest(synth_data)["splits"]["train"]["count"]
    steps = n // 16
    ds = train_dataset(synth_data, cfg, seed=3, verify=False)
    batches = list(ds.take(3 * steps))  # three epochs from an infinite dataset
    features, labels = batches[0]
    assert set(features) == {"image"} and features["image"].dtype.name == "uint8"
    assert features["image"].shape == (16, 64, 64, 1) and labels.dtype.name == "float32"
    epoch = [np.concatenate([b[0]["image"].numpy().reshape(16, -1).sum(1) for b in batches[e * steps:(e + 1) * steps]])
             for e in range(2)]
    assert not np.array_equal(epoch[0], epoch[1])  # a new order every epoch (records, not batches, shuffled)
    again = list(train_dataset(synth_data, cfg, seed=3, verify=False).take(2))
    assert np.array_equal(again[1][0]["image"].numpy(), batches[1][0]["image"].numpy())  # seeded


def test_meta_and_balanced_sampling(synth_data):
    cfg = DataConfig(batch_size=32, cache="none")
    features, _ = next(iter(train_dataset(synth_data, cfg, with_meta=True)))
    assert features["meta"].shape == (32, 6)
    labels = np.concatenate([lab.numpy() for _, lab in train_dataset(synth_data, cfg, balance=True).take(20)])
    assert 0.4 < labels.mean() < 0.6  # 25% positive in the data, 50/50 in the batches


def test_cache_to_file(synth_data, tmp_path):
    cfg = DataConfig(batch_size=8, cache=str(tmp_path / "cache" / "train"))
    list(train_dataset(synth_data, cfg).take(30))
    assert list((tmp_path / "cache").iterdir())


def test_damaged_or_missing_shards_are_named(synth_data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    shard = copy / _manifest(copy)["splits"]["val"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=shard.name):
        eval_dataset(copy, "val", 8)
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard.name}.*missing"):
        eval_dataset(copy, "val", 8)
    with pytest.raises(DataError, match="pneumo convert"):
        eval_dataset(tmp_path / "nowhere", "val", 8)


def test_eval_labels_match_the_split_file(synth_data):
    import csv

    truth = {r["patient_id"]: int(r["label"]) for r in csv.DictReader(open(synth_data / "splits.csv"))
             if r["split"] == "val"}
    seen = Counter()
    for features, labels in eval_dataset(synth_data, "val", 10, with_info=True):
        for pid, lab in zip(features["patient_id"].numpy(), labels.numpy(), strict=True):
            assert truth[pid.decode()] == lab
            seen[pid.decode()] += 1
    assert set(seen) == set(truth) and set(seen.values()) == {1}
