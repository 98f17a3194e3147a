"""tf.data pipelines: exact evaluation, shuffled infinite training, damaged shards named."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.tfdata import DataError, eval_dataset, train_dataset


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


@pytest.mark.parametrize("cache", ["file", "none"])
def test_later_epochs_read_the_cache_file_not_the_shards(synth_data, tmp_path, cache):
    """With a file cache, the first epoch writes it and later epochs read it: the shards are deleted once the
    cache is complete and three more epochs still come, the same records. The control, without a cache,
    shows that deleting the shards does stop a pipeline that still needs them."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    prefix = tmp_path / "cache" / "train"
    cfg = DataConfig(batch_size=8, deterministic=True, cache=str(prefix) if cache == "file" else "none")
    n = _manifest(copy)["splits"]["train"]["count"]
    shards = [copy / s["file"] for s in _manifest(copy)["splits"]["train"]["shards"]]
    it = iter(train_dataset(copy, cfg, seed=1))
    first = next(it)
    if cache == "none":
        for shard in shards:
            shard.unlink()
        with pytest.raises(Exception, match="No such file|NotFound|not found"):
            for _ in range(4 * n // 8):  # the next epochs reopen the deleted shards
                next(it)
        return
    # The shuffle buffer holds the whole split, so the first batch read every record and the end of the
    # input, which completes the cache (its index file is written last).
    assert Path(f"{prefix}.index").exists(), sorted(p.name for p in prefix.parent.iterdir())
    for shard in shards:
        shard.unlink()
    sums = [first[0]["image"].numpy().reshape(8, -1).sum(1)]
    for _ in range(4 * n // 8 - 1):  # four epochs in all, three of them after the shards are gone
        sums.append(next(it)[0]["image"].numpy().reshape(8, -1).sum(1))
    sums = np.concatenate(sums)
    # Epoch by epoch, the same records come back (as a multiset of image sums), only in another order.
    epochs = [np.sort(sums[e * n:(e + 1) * n]) for e in range(len(sums) // n)]
    assert len(epochs) >= 3 and all(np.array_equal(epochs[0], e) for e in epochs[1:])


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
