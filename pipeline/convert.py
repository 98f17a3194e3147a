"""Labelled images -> sharded TFRecords + manifest.json + splits.csv (offline, deterministic, resumable).

The plan comes first and fixes everything but the pixels: which patient goes to which split, the record order
inside each split (shuffled at write time, seeded) and which shard each record lands in. Decoding then runs in
a process pool in plan order, so the same command on the same inputs writes the same bytes whatever the
worker count. Each shard is written under a temp name and renamed; a small sidecar in `.parts/` records its
count, digest and rejected inputs, so rerunning the command skips finished shards. manifest.json comes last.

Decode workers import pydicom, Pillow and numpy only: this module keeps its heavier imports (pandas through
labels, tqdm) inside the functions that run in the parent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dicom import DicomError, load_image_file, read_dicom
from pipeline.errors import PneumoError
from pipeline.files import atomic_write_text, sha256_file
from pipeline.records import SCHEMA_VERSION, Record, encode_example, frame_record

SPLITS = ("train", "val", "test")
SHARD_TARGET_BYTES = 64 * 2**20  # tens of MB per shard: large sequential reads, enough files to interleave


class ConvertError(PneumoError):
    """A one-line reason the conversion cannot run (bad inputs, a foreign output folder, nothing written)."""


@dataclass(frozen=True)
class Item:
    """One input image and what is known about it before decoding."""

    path: str
    patient_id: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...] = ()


# --- decode worker (runs in the pool) -----------------------------------------------------------------
def decode_item(task: tuple[Item, str, int]) -> tuple[str, bytes | str, int]:
    """-> ("ok", framed TFRecord bytes, label) or ("rejected", reason, label). Never raises for bad inputs."""
    item, kind, size = task
    try:
        if kind == "dicom":
            img = read_dicom(item.path, size)
            h, w = img.original_height, img.original_width
            if any(x < 0 or y < 0 or x + bw > w or y + bh > h for x, y, bw, bh in item.boxes):
                return "rejected", f"a label box lies outside the {w}x{h} image", item.label
            boxes = tuple(v for x, y, bw, bh in item.boxes for v in (x / w, y / h, bw / w, bh / h))
            rec = Record(img.pixels, item.label, item.patient_id, boxes, img.view_position, img.sex, img.age)
        else:
            rec = Record(load_image_file(item.path, size), item.label, item.patient_id)
    except (DicomError, ValueError, OSError) as e:
        return "rejected", " ".join(str(e).split()) or type(e).__name__, item.label
    return "ok", frame_record(encode_example(rec)), item.label


# --- planning --------------------------------------------------------------------------------------------
def shard_count(n: int, image_size: int, workers: int) -> int:
    """At least one shard per worker (parallel reads), about SHARD_TARGET_BYTES each, never more than records."""
    if n == 0:
        return 0
    return min(n, max(workers, math.ceil(n * image_size * image_size / SHARD_TARGET_BYTES)))


def make_plan(items: list[Item], split_of: dict[str, str], image_size: int, seed: int, workers: int) -> dict:
    """split -> list of shards, each a list of item indices in write order (seeded shuffle per split)."""
    plan = {}
    for k, split in enumerate(SPLITS):
        members = sorted((i for i, it in enumerate(items) if split_of[it.patient_id] == split),
                         key=lambda i: (items[i].patient_id, items[i].path))
        order = np.random.default_rng([seed, k]).permutation(len(members))
        members = [members[j] for j in order]
        n_shards = shard_count(len(members), image_size, workers)
        plan[split] = [[int(i) for i in part] for part in np.array_split(members, n_shards)] if n_shards else []
    return plan


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


# --- writing ---------------------------------------------------------------------------------------------
def _open_plan(out: Path, identity: dict, plan: dict) -> dict:
    """Create `out/.plan.json`, or reuse the one there when it describes the same inputs and settings."""
    plan_path = out / ".plan.json"
    if plan_path.exists():
        stored = json.loads(plan_path.read_text())
        if stored["identity"] != identity:
            diff = [k for k in identity if stored["identity"].get(k) != identity[k]]
            raise ConvertError(
                f"{out} already holds a conversion with different {', '.join(diff)}; "
                "refusing to mix them (use another --out or delete the folder)"
            )
        return stored["plan"]  # the stored shard layout wins: resuming with another --workers changes nothing
    if any(out.glob("*.tfrecord")) or (out / "manifest.json").exists():
        raise ConvertError(f"{out} holds TFRecords this converter did not plan; use another --out")
    atomic_write_text(plan_path, json.dumps({"identity": identity, "plan": plan}, sort_keys=True))
    return plan


def _decode_chunk(tasks: list) -> list:
    return [decode_item(t) for t in tasks]


def _pool_map(tasks: list, workers: int, chunk: int = 4, window: int = 4):
    """Ordered results of decode_item from a forkserver process pool (workers never inherit the caller's
    TensorFlow state), at most `window` chunks per worker in flight so memory stays bounded.

    ProcessPoolExecutor rather than multiprocessing.Pool.imap: Pool's worker-handler thread spins on the
    result pipe while large results sit in it, burning ~0.36 ms of parent CPU per image on the same two cores
    the decoders need (measured in benchmarks/convert.py). A dead worker raises BrokenProcessPool, not a hang.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(decode_item, tasks)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.convert"])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: collections.deque = collections.deque()
        for i in range(0, len(tasks), chunk):
            pending.append(pool.submit(_decode_chunk, tasks[i:i + chunk]))
            if len(pending) >= window * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def write_shards(out: Path, items: list[Item], kind: str, image_size: int, plan: dict, workers: int,
                 progress: bool) -> None:
    from tqdm import tqdm

    parts = out / ".parts"
    parts.mkdir(exist_ok=True)
    todo = []  # (shard file, item indices) not finished by an earlier run
    for split in SPLITS:
        shards = plan[split]
        for s, indices in enumerate(shards):
            name = shard_name(split, s, len(shards))
            if not ((out / name).exists() and (parts / f"{name}.json").exists()):
                todo.append((name, indices))
    tasks = [(items[i], kind, image_size) for _, indices in todo for i in indices]
    results = _pool_map(tasks, workers)
    total = sum(len(s) for shards in plan.values() for s in shards)
    done = total - len(tasks)
    with tqdm(total=total, initial=done, unit="img", disable=not progress, desc="convert", smoothing=0.1) as bar:
        for name, indices in todo:
            tmp = out / f".{name}.tmp-{os.getpid()}"
            digest, count, positives, rejected = hashlib.sha256(), 0, 0, []
            with open(tmp, "wb") as f:
                for i in indices:
                    status, payload, label = next(results)
                    if status == "ok":
                        f.write(payload)
                        digest.update(payload)
                        count += 1
                        positives += label
                    else:
                        rejected.append({"path": items[i].path, "reason": payload})
                    bar.update()
            part = {"file": name, "count": count, "positives": positives, "sha256": digest.hexdigest(),
                    "rejected": rejected}
            atomic_write_text(parts / f"{name}.json", json.dumps(part, sort_keys=True))
            os.replace(tmp, out / name)


def build_manifest(out: Path, identity: dict, plan: dict, source: dict, unlabelled: list[str],
                   unmatched: int) -> dict:
    parts = out / ".parts"
    splits, rejected = {}, []
    for split in SPLITS:  # fixed order: the digest concatenates shard digests in this order
        shards = plan[split]
        entries = [json.loads((parts / f"{shard_name(split, s, len(shards))}.json").read_text())
                   for s in range(len(shards))]
        rejected += [r for e in entries for r in e["rejected"]]
        splits[split] = {
            "count": sum(e["count"] for e in entries),
            "positives": sum(e["positives"] for e in entries),
            "shards": [{"file": e["file"], "count": e["count"], "sha256": e["sha256"]} for e in entries],
        }
    digest = hashlib.sha256("".join(s["sha256"] for sp in splits.values() for s in sp["shards"]).encode())
    return {
        "schema_version": SCHEMA_VERSION,
        "image_size": identity["image_size"],
        "seed": identity["seed"],
        "source": source,
        "splits": splits,
        "rejected": sorted(rejected, key=lambda r: r["path"]),
        "unlabelled_inputs": unlabelled,
        "unmatched_labels": unmatched,
        "digest": digest.hexdigest(),
    }


def run_conversion(items: list[Item], source: dict, out: str | Path, image_size: int, seed: int,
                   test_frac: float, val_frac: float, workers: int | None, progress: bool,
                   unlabelled: list[str] = (), unmatched: int = 0) -> dict:
    """Split by patient, plan, decode and write; returns the manifest (with a `seconds` figure beside it)."""
    from pipeline.labels import split_patients

    if not items:
        raise ConvertError("no labelled inputs to convert")
    if not 16 <= image_size <= 4096:
        raise ConvertError(f"--image-size must be between 16 and 4096, got {image_size}")
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # half-written files of a run that died
        stale.unlink()
    patient_labels = {it.patient_id: it.label for it in items}
    split_of = split_patients(patient_labels, test_frac, val_frac, seed)
    identity = {
        "kind": source["kind"],
        "inputs_sha256": hashlib.sha256(
            "\n".join(f"{it.path}\t{it.patient_id}\t{it.label}\t{it.boxes}" for it in items).encode()
        ).hexdigest(),
        "labels_sha256": source["labels_sha256"],
        "image_size": image_size,
        "seed": seed,
        "test_frac": test_frac,
        "val_frac": val_frac,
    }
    plan = _open_plan(out, identity, make_plan(items, split_of, image_size, seed, workers))
    write_shards(out, items, source["kind"], image_size, plan, workers, progress)
    manifest = build_manifest(out, identity, plan, source, list(unlabelled), unmatched)
    rejected_paths = {r["path"] for r in manifest["rejected"]}
    rows = sorted({(it.patient_id, split_of[it.patient_id], it.label) for it in items if it.path not in rejected_paths})
    atomic_write_text(out / "splits.csv", "patient_id,split,label\n" + "".join(f"{p},{s},{y}\n" for p, s, y in rows))
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    total = sum(sp["count"] for sp in manifest["splits"].values())
    if total == 0:
        raise ConvertError(f"no record could be written: all {len(manifest['rejected'])} inputs were rejected "
                           f"(first: {manifest['rejected'][0]['path']}: {manifest['rejected'][0]['reason']})")
    return {**manifest, "seconds": time.perf_counter() - start}


# --- entry points ----------------------------------------------------------------------------------------
def convert_rsna(dicom_dir: str | Path, labels_csv: str | Path, out: str | Path, *, image_size: int = 256,
                 workers: int | None = None, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.2,
                 limit: int | None = None, progress: bool = True) -> dict:
    """RSNA layout: `<dicom_dir>/<patientId>.dcm` + the label CSV (one row per box)."""
    from pipeline.labels import read_rsna_labels

    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise ConvertError(f"{dicom_dir}: DICOM folder not found")
    labels = read_rsna_labels(labels_csv)
    files = sorted(str(p) for p in dicom_dir.rglob("*.dcm"))
    if not files:
        raise ConvertError(f"{dicom_dir}: no .dcm files")
    matched = [f for f in files if Path(f).stem in labels]
    if limit is not None:
        matched = matched[:limit]
    found = {Path(f).stem for f in files}
    items = [Item(f, Path(f).stem, labels[Path(f).stem].label, labels[Path(f).stem].boxes) for f in matched]
    source = {
        "kind": "dicom",
        "labels_sha256": sha256_file(labels_csv),
        "n_inputs": len(files),
    }
    return run_conversion(items, source, out, image_size, seed, test_frac, val_frac, workers, progress,
                          unlabelled=[f for f in files if Path(f).stem not in labels],
                          unmatched=sum(1 for p in labels if p not in found))


def convert_image_dir(image_dir: str | Path, out: str | Path, *, patient_regex: str | None = None,
                      image_size: int = 256, workers: int | None = None, seed: int = 0, test_frac: float = 0.2,
                      val_frac: float = 0.2, limit: int | None = None, progress: bool = True) -> dict:
    """Class folders NORMAL/ and PNEUMONIA/ of PNG/JPEG; a patient-id regex keeps a patient's images together."""
    from pipeline.labels import scan_image_dir

    found, rule_applied = scan_image_dir(image_dir, patient_regex)
    chosen = found[:limit] if limit is not None else found
    items = [Item(it.path, it.patient_id, it.label) for it in chosen]
    listing = "".join(f"{os.path.relpath(it.path, image_dir)}\t{it.label}\n" for it in found)
    source = {
        "kind": "image_dir",
        "labels_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "n_inputs": len(found),
        "patient_rule": patient_regex if rule_applied else None,
        "patients": len({it.patient_id for it in items}),
    }
    return run_conversion(items, source, out, image_size, seed, test_frac, val_frac, workers, progress)


def summary(manifest: dict) -> str:
    """The end-of-run report: counts per split and class, rejected inputs, time and rate."""
    lines = [f"{'split':<6} {'records':>8} {'positive':>9} {'negative':>9} {'shards':>7}"]
    for split, sp in manifest["splits"].items():
        lines.append(f"{split:<6} {sp['count']:>8} {sp['positives']:>9} {sp['count'] - sp['positives']:>9} "
                     f"{len(sp['shards']):>7}")
    total = sum(sp["count"] for sp in manifest["splits"].values())
    secs = manifest.get("seconds", 0.0)
    lines.append(f"{total} records in {secs:.1f} s ({total / secs if secs else 0:.0f} img/s); "
                 f"rejected {len(manifest['rejected'])}; unlabelled inputs {len(manifest['unlabelled_inputs'])}; "
                 f"labels without an image {manifest['unmatched_labels']}; digest {manifest['digest'][:12]}")
    for r in manifest["rejected"][:10]:
        lines.append(f"  rejected {r['path']}: {r['reason']}")
    if len(manifest["rejected"]) > 10:
        lines.append(f"  ... and {len(manifest['rejected']) - 10} more in manifest.json")
    return "\n".join(lines)
