"""tf.data pipelines over the converter's shards.

Train: shuffled, repeated, batched, parsed per batch, prefetched. Eval: exact, every record once, the last
partial batch kept. Images leave the pipeline as uint8 and become float inside the model, so the host moves
bytes, not floats (4x less memory traffic).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from pipeline.config import DataConfig
from pipeline.data.manifest import DataError, load_manifest  # noqa: F401  (re-exported)
from pipeline.data.records import parse_batch
from pipeline.files import sha256_file


def shard_paths(data_dir: str | Path, manifest: dict, split: str, verify: bool = True) -> list[str]:
    """The split's shard files; with `verify`, each one's sha256 is checked so a damaged shard is named up
    front (a truncated TFRecord otherwise fails mid-epoch with an error that does not say which file)."""
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} in manifest.json")
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        p = Path(data_dir) / shard["file"]
        if not p.exists():
            raise DataError(f"{p}: shard listed in manifest.json is missing")
        if verify and sha256_file(p) != shard["sha256"]:
            raise DataError(f"{p}: shard is damaged (sha256 differs from manifest.json); re-run `pneumo convert`")
        paths.append(str(p))
    return paths


def _drop_meta(features, label):
    """Models without side inputs get the image alone (Keras refuses inputs it does not declare)."""
    return {k: v for k, v in features.items() if k != "meta"}, label


def _label_of(serialized):
    return tf.io.parse_single_example(serialized, {"label": tf.io.FixedLenFeature([], tf.int64)})["label"]


def train_dataset(data_dir: str | Path, cfg: DataConfig, *, seed: int = 0, with_meta: bool = False,
                  balance: bool = False, batch_size: int | None = None, verify: bool = True) -> tf.data.Dataset:
    """Infinite, shuffled batches of ({"image": uint8 (B,S,S,1)[, "meta"]}, label) for `model.fit`."""
    manifest = load_manifest(data_dir)
    files = shard_paths(data_dir, manifest, "train", verify)
    count = manifest["splits"]["train"]["count"]
    if count == 0:
        raise DataError(f"{data_dir}: the train split is empty")
    size = manifest["image_size"]
    batch_size = batch_size or cfg.batch_size
    options = tf.data.Options()
    options.deterministic = cfg.deterministic

    # 1. Shard order shuffled with the seed: each epoch's first records do not always come from one file.
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # 2. Read several shards at once; parallel reads hide file latency on network storage.
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cfg.interleave_cycle, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic)
    # 3. Cache the serialised records (not decoded tensors: 1 byte a pixel either way, and parsing is cheap);
    #    from epoch 2 on, no file is read.
    ds = _cache(ds, cfg, sum(Path(f).stat().st_size for f in files))
    # 4. Shuffle records before batching, buffer = the split: a true reshuffle every epoch. Shuffling parsed
    #    batches instead would keep the same images together for the whole run.
    ds = ds.shuffle(cfg.shuffle_buffer or count, seed=seed, reshuffle_each_iteration=True)
    # 5. Repeat after shuffling, so epoch boundaries stay clean; then optionally balance the classes.
    ds = ds.repeat()
    if balance:
        by_class = [ds.filter(lambda s, k=k: tf.equal(_label_of(s), k)) for k in (0, 1)]
        ds = tf.data.Dataset.sample_from_datasets(by_class, weights=[0.5, 0.5], seed=seed)
    # 6. Batch the serialised strings, then parse the whole batch in one vectorised call.
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda s: parse_batch(s, size), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=cfg.deterministic)
    if not with_meta:
        ds = ds.map(_drop_meta)
    # 7. Prefetch so the next batch is ready while the accelerator runs this one.
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _cache(ds: tf.data.Dataset, cfg: DataConfig, nbytes: int) -> tf.data.Dataset:
    if cfg.cache == "none":
        return ds
    if cfg.cache == "memory" or (cfg.cache == "auto" and nbytes <= cfg.cache_budget_mb * 2**20):
        return ds.cache()
    if cfg.cache == "auto":
        return ds  # too big for the RAM budget: read from disk every epoch
    Path(cfg.cache).parent.mkdir(parents=True, exist_ok=True)
    return ds.cache(cfg.cache)  # a file prefix: one read of the shards, then a local sequential file


def eval_dataset(data_dir: str | Path, split: str, batch_size: int, *, with_meta: bool = False,
                 with_info: bool = False, verify: bool = True) -> tf.data.Dataset:
    """Every record of the split exactly once, in file order, the last partial batch kept."""
    manifest = load_manifest(data_dir)
    files = shard_paths(data_dir, manifest, split, verify)
    if not files:
        raise DataError(f"{data_dir}: the {split} split is empty")
    size = manifest["image_size"]
    ds = tf.data.TFRecordDataset(files)  # sequential: order is reproducible and every record is read once
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda s: parse_batch(s, size, with_info=with_info), num_parallel_calls=tf.data.AUTOTUNE)
    if not with_meta:
        ds = ds.map(_drop_meta)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_count(data_dir: str | Path, split: str) -> int:
    return load_manifest(data_dir)["splits"][split]["count"]
