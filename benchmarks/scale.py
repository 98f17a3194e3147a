"""A full-scale rehearsal: the RSNA training set's size in synthetic DICOMs -> `pneumo convert` at 256 px ->
one training epoch of the default CNN at 256 px, at N = 2,000, 8,000 and 26,684 images; is the cost linear?

    .venv/bin/python benchmarks/scale.py                      # < 1 h on 2 CPU cores once the DICOMs exist
    .venv/bin/python benchmarks/scale.py --ns 2000,8000       # the smaller sizes only
    .venv/bin/python benchmarks/scale.py --generate-only      # make the DICOMs (the long part), then stop

Data: RSNA-like synthetic DICOMs (pipeline.data.synth: 1024 x 1024, JPEG Baseline, 22.5% positive, as RSNA's 26,684
training images), generated ONCE into a cache folder outside the repository (--cache, default
$PNEUMO_BENCH_CACHE/scale, else ../cache/scale beside the checkout) and reused by every later run. They are made
in nested chunks, one per step of the N list (images 0-2,000, 2,000-8,000, 8,000-26,684, each its own
`pneumo synth` set with its own seed, 22.5% positive each), so N = 8,000 is N = 2,000 plus 6,000 more and a
smaller N list never waits for the largest. Generation is timed and reported but is not part of the rehearsal.

For each N, one after the other:
1. `pneumo convert --dicom-dir <N images> --labels <their CSV> --image-size 256 --workers 2`, run as a
   subprocess under the process-tree wrapper of benchmarks/common.py: wall time (start-up included), img/s,
   CPU seconds of the whole tree, peak memory (ru_maxrss of the reaped children: the largest single process,
   not the sum of the pool), disk (bytes of the shards + manifest).
2. One epoch of the default CNN (pipeline/config.py defaults, float32, batch 32, Adam 1e-3) over the train
   split, in a fresh subprocess: `pipeline.data.tfdata.train_dataset` (cache "auto", so the first epoch reads the
   shards), `train_on_batch` per step. The first step (tracing) is timed apart; img/s and the share of time
   spent waiting inside `next()` on the input iterator are over the other steps; the pipeline's start-up
   (manifest, sha256 check of every shard) is reported apart too.
Then a least-squares line (scipy.stats.linregress) of seconds against N for each stage: the slope is the
per-image cost, the intercept the fixed cost, and r^2 with the residuals says whether it is linear.

The shards are deleted after each N (--keep-records keeps them); the DICOMs stay in the cache. The machine is
shared: the load average is printed beside every figure. Ends with one line `total_minutes=<the rehearsal's
wall minutes, generation excluded> target=60`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, check_converted, load_average, run_wrapped  # noqa: E402

SIZE, BATCH, POSITIVE_RATE, SOURCE = 256, 32, 0.225, 1024
DEFAULT_NS = "2000,8000,26684"
DEFAULT_CACHE = CACHE / "scale"

# One epoch of the default CNN over a converted folder (argv[1]); prints one JSON line on stdout and a tqdm-like
# "done/total [" progress line on stderr every few steps (the wrapper timestamps those).
EPOCH_CODE = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, sys.argv[2])
import keras
from pipeline.config import Config
from pipeline.data.tfdata import split_count, train_dataset
from pipeline.net.model import apply_precision, build_model
data, batch, size = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
apply_precision("float32")
cfg = Config()
steps = split_count(data, "train") // batch
model = build_model(cfg.model, cfg.augment, size, seed=0)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
t = time.perf_counter()
it = iter(train_dataset(data, cfg.data, seed=0, batch_size=batch))  # manifest, sha256 of every shard, graph
setup = time.perf_counter() - t
t = time.perf_counter()
x, y = next(it)
first_wait = time.perf_counter() - t
model.train_on_batch(x, y)  # traces the step
first = time.perf_counter() - t
waited, t0, cpu0 = 0.0, time.perf_counter(), time.process_time()
for s in range(1, steps):
    t = time.perf_counter()
    x, y = next(it)
    waited += time.perf_counter() - t
    loss = model.train_on_batch(x, y)  # synchronous on the CPU: returns when the step is done
    if s % 25 == 0:
        print(f"{s}/{steps} [", file=sys.stderr, flush=True)
wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(json.dumps({"steps": steps, "setup": setup, "first": first, "first_wait": first_wait, "wall": wall,
                  "cpu": cpu, "waited": waited, "loss": float(loss)}))
"""


# --- data: nested chunks -------------------------------------------------------------------------------------
def chunk_dirs(cache: Path, ns: list[int]) -> list[tuple[int, int, Path]]:
    """(start, end, folder) of the chunks that make up the largest N: one per step of the sorted N list."""
    bounds = [0, *sorted(set(ns))]
    return [(a, b, cache / f"chunk-{a}-{b}") for a, b in zip(bounds, bounds[1:], strict=False)]


def generate(cache: Path, ns: list[int]) -> None:
    from pipeline.data.synth import LABELS_CSV, make_synthetic_dataset

    for start, end, folder in chunk_dirs(cache, ns):
        done = folder / "synth.json"
        if done.exists() and (folder / LABELS_CSV).exists():
            s = json.loads(done.read_text())
            print(f"chunk {start}-{end}: cached ({s['n']} DICOMs, {s['positives']} positive, generated in "
                  f"{s['seconds']:.0f} s at load {s.get('load', '?')})", flush=True)
            continue
        print(f"chunk {start}-{end}: generating {end - start} DICOMs ({SOURCE}^2 JPEG Baseline) into {folder}, "
              f"load {load_average()} ...", flush=True)
        # the chunk's first image index is its seed: chunks never share a patient id or an image
        s = make_synthetic_dataset(folder, n=end - start, positive_rate=POSITIVE_RATE, size=SOURCE, seed=start,
                                   workers=2, progress=False)
        s["load"] = load_average()
        s["disk_mb"] = sum(p.stat().st_size for p in folder.rglob("*.dcm")) / 2**20
        done.write_text(json.dumps(s))
        print(f"chunk {start}-{end}: {s['n']} DICOMs in {s['seconds']:.0f} s ({s['disk_mb']:.0f} MB), "
              f"load {load_average()}", flush=True)


def view(cache: Path, ns: list[int], n: int) -> tuple[Path, Path, float]:
    """A folder of links to the first n images (the chunks up to n) and their merged label CSV."""
    from pipeline.data.synth import IMAGES_DIR, LABELS_CSV

    out = cache / f"n{n}"
    images, labels = out / "images", out / "labels.csv"
    shutil.rmtree(out, ignore_errors=True)
    images.mkdir(parents=True)
    rows, header, disk = [], None, 0
    for _start, end, folder in chunk_dirs(cache, ns):
        if end > n:
            break
        for p in (folder / IMAGES_DIR).glob("*.dcm"):
            (images / p.name).symlink_to(p)
            disk += p.stat().st_size
        with open(folder / LABELS_CSV, newline="") as f:
            r = csv.reader(f)
            header = next(r)
            rows += list(r)
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    found = sum(1 for _ in images.iterdir())
    if found != n:
        raise SystemExit(f"{images}: {found} DICOMs, expected {n}")
    return images, labels, disk / 2**20


# --- one N ---------------------------------------------------------------------------------------------------
def rehearse(cache: Path, ns: list[int], n: int, keep: bool) -> dict:
    images, labels, dicom_mb = view(cache, ns, n)
    out = cache / f"tfrecords-n{n}"
    shutil.rmtree(out, ignore_errors=True)
    script = Path(sys.executable).with_name("pneumo")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    load_before = load_average()
    c = run_wrapped(head + ["convert", "--dicom-dir", str(images), "--labels", str(labels), "--out", str(out),
                            "--image-size", str(SIZE), "--workers", "2"])
    manifest = check_converted(out, n)
    disk_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    load_mid = load_average()
    print(f"N={n}: convert {c['wall']:.0f} s ({n / c['wall']:.0f} img/s), peak {c['maxrss_mb']:.0f} MB, "
          f"{disk_mb:.0f} MB of shards; load {load_mid}", flush=True)
    e = run_wrapped([sys.executable, "-c", EPOCH_CODE, str(out), str(REPO), str(BATCH), str(SIZE)])
    r = json.loads([ln for ln in e["stdout"].splitlines() if ln.startswith("{")][-1])
    train_images = (r["steps"] - 1) * BATCH
    res = {
        "n": n, "dicom_mb": dicom_mb, "train": manifest["splits"]["train"]["count"],
        "convert_s": c["wall"], "convert_cpu": c["cpu"], "convert_rss": c["maxrss_mb"], "disk_mb": disk_mb,
        "epoch_s": e["wall"], "epoch_rss": e["maxrss_mb"], "setup_s": r["setup"], "first_s": r["first"],
        "steps_s": r["wall"], "train_rate": train_images / r["wall"], "train_cpu_rate": train_images / r["cpu"],
        "wait_pct": 100 * r["waited"] / r["wall"], "loss": r["loss"],
        "load": f"{load_before} / {load_mid} / {load_average()}",
    }
    print(f"N={n}: epoch {e['wall']:.0f} s in all, {res['train_rate']:.1f} img/s, input wait {res['wait_pct']:.1f}%, "
          f"peak {e['maxrss_mb']:.0f} MB; load {load_average()}", flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache / f"n{n}", ignore_errors=True)
    return res


def linearity(rows: list[dict], key: str, label: str) -> None:
    ns = [r["n"] for r in rows]
    secs = [r[key] for r in rows]
    per = ", ".join(f"N={n}: {1000 * s / n:.1f}" for n, s in zip(ns, secs, strict=True))
    if len(rows) < 3:
        print(f"{label}: ms per image {per} (a line through 2 points proves nothing: run 3 sizes to test it)")
        return
    from scipy.stats import linregress

    fit = linregress(ns, secs)
    worst = max(abs(s - (fit.intercept + fit.slope * n)) / s for n, s in zip(ns, secs, strict=True))
    print(f"{label}: seconds = {fit.intercept:.1f} + {1000 * fit.slope:.2f} ms x N; r^2 = {fit.rvalue ** 2:.4f}, "
          f"largest residual {100 * worst:.1f}% of the measured time; ms per image {per}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default=DEFAULT_NS, help=f"comma-separated sizes (default {DEFAULT_NS})")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"DICOM cache (default {DEFAULT_CACHE})")
    ap.add_argument("--generate-only", action="store_true", help="make the cached DICOMs, then stop")
    ap.add_argument("--keep-records", action="store_true", help="keep each N's converted shards in the cache")
    a = ap.parse_args()
    try:
        ns = sorted({int(x) for x in a.ns.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--ns {a.ns!r}: expected comma-separated whole numbers") from None
    if not ns or ns[0] < 100:
        raise SystemExit(f"--ns {a.ns!r}: every size must be at least 100")

    print(f"machine: {os.cpu_count()} cores, load average {load_average()} (1/5/15 min; shared: other users count too)")
    generate(a.cache, ns)
    if a.generate_only:
        return
    t0 = time.perf_counter()
    rows = [rehearse(a.cache, ns, n, a.keep_records) for n in ns]
    total = time.perf_counter() - t0

    print(f"\nscale rehearsal: synthetic {SOURCE}^2 JPEG Baseline DICOMs, {POSITIVE_RATE:.1%} positive -> {SIZE} px; "
          f"default CNN, batch {BATCH}, float32, one epoch; load average (1/5/15 min) before convert / before "
          "training / after, per row")
    hdr = (f"{'N':>6} {'DICOM MB':>8} {'conv s':>7} {'img/s':>6} {'CPU s':>6} {'peak MB':>7} {'shard MB':>8} "
           f"{'train n':>7} {'epoch s':>7} {'setup s':>7} {'1st s':>5} {'img/s':>6} {'img/CPU-s':>9} {'wait %':>6} "
           f"{'peak MB':>7}  load")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['n']:>6} {r['dicom_mb']:8.0f} {r['convert_s']:7.1f} {r['n'] / r['convert_s']:6.0f} "
              f"{r['convert_cpu']:6.0f} {r['convert_rss']:7.0f} {r['disk_mb']:8.0f} {r['train']:>7} "
              f"{r['epoch_s']:7.1f} {r['setup_s']:7.1f} {r['first_s']:5.1f} {r['train_rate']:6.1f} {r['train_cpu_rate']:9.1f} "
              f"{r['wait_pct']:6.1f} {r['epoch_rss']:7.0f}  {r['load']}")
    print("-" * len(hdr))
    print("conv s: whole `pneumo convert` process; epoch s: the whole training subprocess (imports, set-up, "
          "tracing, the epoch); img/s and wait % of training: steps 2..end")
    linearity(rows, "convert_s", "convert (wall)")
    linearity(rows, "convert_cpu", "convert (CPU s of the process tree: the load-independent cost)")
    linearity(rows, "epoch_s", "training epoch (whole process)")
    print(f"total_minutes={total / 60:.1f} target=60")


if __name__ == "__main__":
    main()
