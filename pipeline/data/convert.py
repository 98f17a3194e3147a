"""Labelled images -> sharded TFRecords + manifest.json + splits.csv (offline, deterministic, resumable).

The plan comes first and fixes everything but the pixels: which patient goes to which split, the record order
inside each split (shuffled at write time, seeded) and which shard each record lands in. Decoding then runs in
a process pool in plan order, so the same command on the same inputs writes the same bytes whatever the
worker count. The shard count depends on the data only (records and image size, never on `--workers`), so
the same inputs and seed give the same shards and dataset digest on any machine. Each shard is written under a
temp name in `.parts/`, fsync'ed, and renamed into place (then the folder is fsync'ed); a small sidecar in
`.parts/` records its count, sha256 and rejected inputs. A rerun verifies every finished shard against its
recorded sha256 and rewrites the ones that differ (a damaged shard is repaired, not kept); manifest.json
comes last.

Faults a decode can meet, and what happens (each a `rejected` entry with its reason; the rest converts):
* not a regular file (a FIFO, a device, a folder named `x.dcm`): rejected before it is opened;
* a decode slower than `decode_timeout` seconds (DECODE_TIMEOUT_S by default): interrupted by SIGALRM in the
  worker and rejected;
* a worker killed by the kernel (out of memory, SIGKILL): the pool is rebuilt, the files that were in flight
  are retried one at a time, each in its own process, so only the culprit is rejected ("worker died ...").
  With `--workers 1` decoding runs in the converter's own process (no pool to rebuild): a kill ends the run,
  and the rerun resumes from the finished shards.
The SIGALRM timeout interrupts Python code and blocking system calls; a C decoder stuck without returning to
the interpreter is bounded by MAX_PIXELS / MAX_INFLATED_BYTES in pipeline/data/dicom.py rather than by the timer.

Decode workers import pydicom, Pillow and numpy only: this module keeps its heavier imports (pandas through
labels, tqdm) inside the functions that run in the parent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dicom import DicomError, load_image_file, read_dicom
from pipeline.data.isolation import TimeLimitExceeded, time_limit
from pipeline.data.records import SCHEMA_VERSION, Record, encode_example, frame_record
from pipeline.errors import InputError, PneumoError, one_line
from pipeline.files import atomic_write_text, fsync_dir, sha256_file

SPLITS = ("train", "val", "test")
SHARD_TARGET_BYTES = 64 * 2**20  # tens of MB per shard: large sequential reads, enough files to interleave
MIN_SHARDS = 4  # per split (fewer when it has fewer records): enough files for the reader to interleave
# Seconds one file may take to decode before it is rejected (a FIFO that never opens, a pathological file).
# The slowest legitimate decode measured is ~0.3 s (a 4300 x 3500 16-bit native DICOM); 60 s leaves room
# for a machine loaded many times over. `--decode-timeout` changes it.
DECODE_TIMEOUT_S = 60.0
MAX_DECODE_TIMEOUT_S = 86_400  # a day: "no limit" in practice, and within what the SIGALRM timer can hold


class ConvertError(PneumoError):
    """A one-line reason the conversion cannot run (bad inputs, a foreign output folder, nothing written)."""


class ConvertValueError(ConvertError, InputError):
    """A bad flag value (--limit, --test-frac, ...): the user's mistake, exit status 2."""


@dataclass(frozen=True)
class Item:
    """One input image and what is known about it before decoding."""

    path: str
    patient_id: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...] = ()


# --- decode worker (runs in the pool) -----------------------------------------------------------------
def decode_item(task: tuple) -> tuple[str, bytes | str, int]:
    """-> ("ok", framed TFRecord bytes, label) or ("rejected", reason, label). Never raises for bad inputs.

    `task` is (item, kind, size) or (item, kind, size, timeout seconds). The timeout is a SIGALRM timer (the
    decode runs in the worker's main thread): it interrupts Python code and blocking system calls such as
    opening a FIFO. Outside the main thread (no signals there) the decode runs without a time limit."""
    item, kind, size = task[:3]
    timeout = task[3] if len(task) > 3 else DECODE_TIMEOUT_S
    try:
        mode = os.stat(item.path).st_mode
    except OSError as e:
        return "rejected", f"cannot read file: {e.strerror or e}", item.label
    if not stat.S_ISREG(mode):
        what = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "special")
        return "rejected", f"not a regular file ({what}): skipped", item.label
    try:
        with time_limit(timeout):
            return _decode(item, kind, size)
    except TimeLimitExceeded:
        return "rejected", f"decode took longer than {timeout:g} s (decode timeout): skipped", item.label


def _decode(item: Item, kind: str, size: int) -> tuple[str, bytes | str, int]:
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
        return "rejected", one_line(e), item.label
    return "ok", frame_record(encode_example(rec)), item.label


# --- planning --------------------------------------------------------------------------------------------
def shard_count(n: int, image_size: int) -> int:
    """About SHARD_TARGET_BYTES per shard, at least MIN_SHARDS, never more than records: a function of the data
    only, so the dataset digest does not depend on the machine that converted it (it once took the worker
    count into account, and two hosts converting the same data got different digests)."""
    if n == 0:
        return 0
    return min(n, max(MIN_SHARDS, math.ceil(n * image_size * image_size / SHARD_TARGET_BYTES)))


def make_plan(items: list[Item], split_of: dict[str, str], image_size: int, seed: int) -> dict:
    """split -> list of shards, each a list of item indices in write order (seeded shuffle per split)."""
    plan = {}
    for k, split in enumerate(SPLITS):
        members = sorted((i for i, it in enumerate(items) if split_of[it.patient_id] == split),
                         key=lambda i: (items[i].patient_id, items[i].path))
        order = np.random.default_rng([seed, k]).permutation(len(members))
        members = [members[j] for j in order]
        n_shards = shard_count(len(members), image_size)
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


# The decode function the pool runs, looked up at submit time and pickled by reference, so a test can swap in
# a module-level wrapper (e.g. one that SIGKILLs its own worker on one file) without touching the workers.
DECODE = decode_item


def _decode_chunk(decode, tasks: list) -> list:
    return [decode(t) for t in tasks]


def _decode_to_pipe(decode, task, conn) -> None:
    conn.send(decode(task))
    conn.close()


def _isolated(decode, task, ctx) -> tuple[str, bytes | str, int]:
    """Decode one task in a process of its own; a death of that process rejects this file only."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_decode_to_pipe, args=(decode, task, send), daemon=True)
    proc.start()
    send.close()
    try:
        result = recv.recv()  # before join: a large result must not wait on a full pipe
    except EOFError:  # the process died without answering
        result = None
    finally:
        recv.close()
        proc.join()
    if result is not None:
        return result
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
    return ("rejected", f"worker died ({how}) while decoding this file (out of memory?); the rest converted",
            task[0].label)


def _pool_map(tasks: list, workers: int, chunk: int = 4, window: int = 4):
    """Ordered results of DECODE from a forkserver process pool (workers never inherit the caller's
    TensorFlow state), at most `window` chunks per worker in flight so memory stays bounded.

    ProcessPoolExecutor rather than multiprocessing.Pool.imap: Pool's worker-handler thread spins on the
    result pipe while large results sit in it, burning ~0.36 ms of parent CPU per image on the same two cores
    the decoders need (measured in benchmarks/convert.py). A dead worker (the kernel's OOM killer, a SIGKILL)
    breaks the whole executor: every task not yet returned is then retried one at a time in its own process
    (`_isolated`) until the culprits are found, and a fresh pool takes the rest.
    """
    decode = DECODE
    if workers <= 1 or len(tasks) <= 1:
        yield from map(decode, tasks)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.data.convert"])
    done = 0  # tasks whose results were yielded
    while done < len(tasks):
        pending: collections.deque = collections.deque()
        submitted = done  # end of the last submitted chunk
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for i in range(done, len(tasks), chunk):
                    pending.append((i, pool.submit(_decode_chunk, decode, tasks[i:i + chunk])))
                    submitted = min(i + chunk, len(tasks))
                    if len(pending) >= window * workers:
                        _, future = pending.popleft()
                        results = future.result()
                        done += len(results)
                        yield from results
                while pending:
                    _, future = pending.popleft()
                    results = future.result()
                    done += len(results)
                    yield from results
        except concurrent.futures.process.BrokenProcessPool:
            # Which chunk killed its worker is unknown: retry every task that was in flight, one per process.
            for task in tasks[done:submitted]:
                yield _isolated(decode, task, ctx)
                done += 1


def _verified(out: Path, parts: Path, name: str) -> bool:
    """The shard and its sidecar exist and the shard's bytes match the sha256 the sidecar recorded."""
    shard, sidecar = out / name, parts / f"{name}.json"
    if not (shard.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    return sha256_file(shard) == recorded


def write_shards(out: Path, items: list[Item], kind: str, image_size: int, plan: dict, workers: int,
                 progress: bool, decode_timeout: float = DECODE_TIMEOUT_S, root: str | None = None) -> None:
    from tqdm import tqdm

    parts = out / ".parts"
    parts.mkdir(exist_ok=True)
    todo = []  # (shard file, item indices) not finished by an earlier run, or finished but damaged since
    for split in SPLITS:
        shards = plan[split]
        for s, indices in enumerate(shards):
            name = shard_name(split, s, len(shards))
            if not _verified(out, parts, name):
                todo.append((name, indices))
    tasks = [(items[i], kind, image_size, decode_timeout) for _, indices in todo for i in indices]
    results = _pool_map(tasks, workers)
    total = sum(len(s) for shards in plan.values() for s in shards)
    done = total - len(tasks)
    with tqdm(total=total, initial=done, unit="img", disable=not progress, desc="convert", smoothing=0.1) as bar:
        for name, indices in todo:
            tmp = parts / f"{name}.tmp-{os.getpid()}"
            digest, count, positives, rejected = hashlib.sha256(), 0, 0, []
            try:
                # 0600 like the sidecars and splits.csv: a shard holds patient ids (atomic_write's mkstemp mode)
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    for i in indices:
                        status, payload, label = next(results)
                        if status == "ok":
                            f.write(payload)
                            digest.update(payload)
                            count += 1
                            positives += label
                        else:
                            rejected.append({"path": _relative(items[i].path, root), "reason": payload})
                        bar.update()
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the rename publishes them
                part = {"file": name, "count": count, "positives": positives, "sha256": digest.hexdigest(),
                        "rejected": rejected}
                atomic_write_text(parts / f"{name}.json", json.dumps(part, sort_keys=True))
                os.replace(tmp, out / name)
                fsync_dir(out)
            finally:
                tmp.unlink(missing_ok=True)
    results.close()


def _relative(path: str, root: str | None) -> str:
    """A path as the manifest names it: relative to the input folder (no absolute paths of the host)."""
    if root is None:
        return path
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else Path(rel).as_posix()


def build_manifest(out: Path, identity: dict, plan: dict, source: dict, unlabelled: list[str],
                   unmatched: int, warnings: list[str] = ()) -> dict:
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
    manifest = {
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
    if warnings:
        manifest["warnings"] = list(warnings)
    return manifest


def splits_csv_text(rows) -> str:
    """patient_id,split,label rows as CSV text (csv module quoting: ids may hold commas and quotes)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["patient_id", "split", "label"])
    writer.writerows(rows)
    return buf.getvalue()


def read_splits_csv(path: str | Path) -> dict[str, str]:
    """splits.csv -> {patient_id: split}, parsed with the csv module (the inverse of `splits_csv_text`)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["patient_id"]: row["split"] for row in csv.DictReader(fh)}


def run_conversion(items: list[Item], source: dict, out: str | Path, image_size: int, seed: int,
                   test_frac: float, val_frac: float, workers: int | None, progress: bool,
                   unlabelled: list[str] = (), unmatched: int = 0, *, root: str | Path | None = None,
                   decode_timeout: float = DECODE_TIMEOUT_S, warnings: list[str] = ()) -> dict:
    """Split by patient, plan, decode and write; returns the manifest (with a `seconds` figure beside it).

    `root` is the input folder: the manifest names rejected and unlabelled files relative to it."""
    if not items:
        raise ConvertError("no labelled inputs to convert")
    if not 16 <= image_size <= 4096:
        raise ConvertValueError(f"--image-size must be between 16 and 4096, got {image_size}")
    for name, value in (("--test-frac", test_frac), ("--val-frac", val_frac)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ConvertValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if workers is not None and workers < 1:
        raise ConvertValueError(f"--workers must be at least 1, got {workers}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConvertValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if (isinstance(decode_timeout, bool) or not isinstance(decode_timeout, int | float)
            or not 0 < decode_timeout <= MAX_DECODE_TIMEOUT_S):  # nan fails too; inf would overflow the timer
        raise ConvertValueError(f"--decode-timeout must be a number of seconds in (0, {MAX_DECODE_TIMEOUT_S}], "
                                f"got {decode_timeout!r}")
    workers = workers or os.cpu_count() or 1
    root = None if root is None else os.fspath(root)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _convert_locked(items, source, out, image_size, seed, test_frac, val_frac, workers, progress,
                               unlabelled, unmatched, root, decode_timeout, warnings, start)


@contextlib.contextmanager
def exclusive(out: Path):
    """One converter per --out at a time: an flock on `out/.convert.lock`, held for the whole run. A second
    convert on the same folder stops at once with one line (they once deleted each other's temp files: each
    run's start-up clears the temp files a dead run left, which is only safe while no other run writes)."""
    fd = os.open(out / ".convert.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvertError(f"{out}: another `pneumo convert` is writing to this folder; wait for it to "
                               "finish (or use another --out)") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _convert_locked(items, source, out: Path, image_size, seed, test_frac, val_frac, workers, progress,
                    unlabelled, unmatched, root, decode_timeout, warnings, start) -> dict:
    for stale in [*out.glob(".*.tmp-*"), *out.glob(".parts/*.tmp-*"), *out.glob(".parts/.*.tmp")]:
        stale.unlink()  # half-written files of a run that died (killed, power loss): no other run is writing
    from pipeline.data.labels import split_patients

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
    plan = _open_plan(out, identity, make_plan(items, split_of, image_size, seed))
    write_shards(out, items, source["kind"], image_size, plan, workers, progress, decode_timeout, root)
    manifest = build_manifest(out, identity, plan, source, [_relative(p, root) for p in unlabelled], unmatched,
                              warnings)
    rejected_paths = {r["path"] for r in manifest["rejected"]}
    rows = sorted({(it.patient_id, split_of[it.patient_id], it.label) for it in items
                   if _relative(it.path, root) not in rejected_paths})
    atomic_write_text(out / "splits.csv", splits_csv_text(rows))
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    total = sum(sp["count"] for sp in manifest["splits"].values())
    if total == 0:
        raise ConvertError(f"no record could be written: all {len(manifest['rejected'])} inputs were rejected "
                           f"(first: {manifest['rejected'][0]['path']}: {manifest['rejected'][0]['reason']})")
    return {**manifest, "seconds": time.perf_counter() - start}


# --- entry points ----------------------------------------------------------------------------------------
NO_PATIENT_RULE = ("no patient rule: every image is treated as its own patient, so a patient with several "
                   "images can land in more than one split and every internal figure is inflated; pass "
                   "--patient-regex or set [data] patient_regex in the experiment file (--config)")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConvertValueError(f"--limit must be a positive integer, got {limit!r}")


def stratified_take(found: list, limit: int) -> list:
    """The first `limit` inputs in path order, shared between the classes in proportion to their counts
    (largest remainder; at least one of each class when `limit` allows), so a small sample keeps both classes.
    The result stays in path order."""
    by_class: dict[int, list] = {}
    for it in found:
        by_class.setdefault(it.label, []).append(it)
    if limit >= len(found):
        return list(found)
    labels = sorted(by_class)
    exact = {c: len(by_class[c]) * limit / len(found) for c in labels}
    quota = {c: int(exact[c]) for c in labels}
    for c in sorted(labels, key=lambda c: -(exact[c] - quota[c]))[: limit - sum(quota.values())]:
        quota[c] += 1
    if limit >= len(labels):  # never drop a class entirely: take one from the largest quota
        for c in labels:
            if quota[c] == 0:
                donor = max(labels, key=lambda k: quota[k])
                quota[donor] -= 1
                quota[c] = 1
    chosen = {id(it) for c in labels for it in by_class[c][: quota[c]]}
    return [it for it in found if id(it) in chosen]


def convert_rsna(dicom_dir: str | Path, labels_csv: str | Path, out: str | Path, *, image_size: int = 256,
                 workers: int | None = None, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.2,
                 limit: int | None = None, progress: bool = True, decode_timeout: float = DECODE_TIMEOUT_S) -> dict:
    """RSNA layout: `<dicom_dir>/<patientId>.dcm` + the label CSV (one row per box)."""
    from pipeline.data.labels import read_rsna_labels

    _check_limit(limit)
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
                          unmatched=sum(1 for p in labels if p not in found), root=dicom_dir,
                          decode_timeout=decode_timeout)


def convert_image_dir(image_dir: str | Path, out: str | Path, *, patient_regex: str | None = None,
                      image_size: int = 256, workers: int | None = None, seed: int = 0, test_frac: float = 0.2,
                      val_frac: float = 0.2, limit: int | None = None, progress: bool = True,
                      decode_timeout: float = DECODE_TIMEOUT_S) -> dict:
    """Class folders NORMAL/ and PNEUMONIA/ of PNG/JPEG; a patient-id regex keeps a patient's images together.

    Without a rule every image is its own patient: that is allowed (some datasets have one image per
    patient) but warned about on stderr and recorded in the manifest's `warnings`. `limit` takes a
    stratified sample (`stratified_take`), so both classes stay."""
    from pipeline.data.labels import scan_image_dir

    _check_limit(limit)
    found, rule_applied = scan_image_dir(image_dir, patient_regex or None)
    chosen = stratified_take(found, limit) if limit is not None else found
    items = [Item(it.path, it.patient_id, it.label) for it in chosen]
    listing = "".join(f"{os.path.relpath(it.path, image_dir)}\t{it.label}\n" for it in found)
    source = {
        "kind": "image_dir",
        "labels_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "n_inputs": len(found),
        "patient_rule": patient_regex if rule_applied else None,
        "patients": len({it.patient_id for it in items}),
    }
    warnings = []
    if not rule_applied:
        warnings.append(NO_PATIENT_RULE)
        print(f"WARNING: {image_dir}: {NO_PATIENT_RULE}", file=sys.stderr, flush=True)
    return run_conversion(items, source, out, image_size, seed, test_frac, val_frac, workers, progress,
                          root=image_dir, decode_timeout=decode_timeout, warnings=warnings)


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
    for w in manifest.get("warnings", []):
        lines.append(f"WARNING: {w}")
    for r in manifest["rejected"][:10]:
        lines.append(f"  rejected {r['path']}: {r['reason']}")
    if len(manifest["rejected"]) > 10:
        lines.append(f"  ... and {len(manifest['rejected']) - 10} more in manifest.json")
    return "\n".join(lines)
