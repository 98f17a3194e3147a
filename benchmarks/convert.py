"""Converter throughput: the seed-style way against `pneumo convert --workers 2` and the decode-bound limit.

    .venv/bin/python benchmarks/convert.py                  # ~3 min on 2 CPU cores (~1 min of it: synth)
    .venv/bin/python benchmarks/convert.py --n 300 --repeats 2   # a quicker look

Data: N synthetic 1024 x 1024 JPEG Baseline DICOMs (pipeline.data.synth, RSNA-like), in a temp dir removed at the
end (--keep keeps it; --data DIR reuses a synth folder). Each repeat runs, one after the other, so that a busy
phase of this shared machine hits every row:

* seed-style: per file `pydicom.dcmread(p).pixel_array` (pydicom's default plugins), PIL resize to 256
  (Pillow's default filter), save a PNG into a folder. One process, over the SAME N files the converter
  converts (the first N by name, as `--limit N` takes them), in this process: its own start-up (imports,
  ~0.5 s) is not charged to it, which favours it slightly.
* decode-bound limit: `pipeline.data.dicom.read_dicom(p, 256)` in one process over the same N files; x2 is what
  two cores doing nothing but decoding could reach.
* `pneumo convert --image-size 256 --workers 2` over all N files, run as a subprocess (the console script
  next to this Python) under a small wrapper that:
  - times the whole process, Python start-up and imports included, until the command exits;
  - counts CPU seconds of the whole process tree: the wrapper makes itself a child subreaper
    (prctl PR_SET_CHILD_SUBREAPER) and reaps the orphaned forkserver and pool workers, whose time then shows
    in its RUSAGE_CHILDREN (plain `time` misses the workers: the forkserver is not a child it waits for);
  - timestamps the converter's own progress bar (tqdm on stderr) as the lines arrive. Steady state = the
    rate between the bar's first reading >= 20% of N and its last reading <= 80% of N: start-up,
    pool spin-up, the last shard's flush and the manifest are all outside that window.

Medians over the repeats, min-max beside them; CPU time beside wall time. Ends with one line
`ratio=<whole-process img/s / seed-style img/s> target=6`. Other targets: steady state >= 85% of the limit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    check_converted,
    load_average,
    make_dicoms,
    pydicom_plugin_used,
    run_wrapped,
    seed_style_image,
    spread,
    timed,
)

SIZE = 256
WORKERS = 2



def convert_command(images: Path, labels: Path, out: Path, n: int) -> list[str]:
    script = Path(sys.executable).with_name("pneumo")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return head + ["convert", "--dicom-dir", str(images), "--labels", str(labels), "--out", str(out),
                   "--image-size", str(SIZE), "--workers", str(WORKERS), "--limit", str(n)]


def run_convert(images: Path, labels: Path, out: Path, n: int) -> dict:
    """One whole-process run: wall, CPU of the process tree, steady rate and timeline."""
    shutil.rmtree(out, ignore_errors=True)
    r = run_wrapped(convert_command(images, labels, out, n))
    check_converted(out, n)
    samples = r["samples"]  # (s since start, records done, CPU s of the main process, CPU s of the whole tree)
    first = next(s for s in samples if s[1] >= 0.2 * n)
    last = [s for s in samples if s[1] <= 0.8 * n][-1]
    if last[1] - first[1] < 0.3 * n:
        raise SystemExit(f"too few progress readings for a steady-state rate: {samples[:5]} ... {samples[-5:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall": r["wall"], "cpu": r["cpu"], "subreaper": r["subreaper"],
        "steady": (last[1] - first[1]) / (last[0] - first[0]),
        "steady_cpu": (last[1] - first[1]) / max(1e-9, last[3] - first[3]),  # img per CPU-s of the tree
        "main_ms": 1000 * (last[2] - first[2]) / (last[1] - first[1]),  # CPU ms per image: main process
        "cores": (last[3] - first[3]) / (last[0] - first[0]),  # CPU cores the tree got meanwhile
        "first_record": next(t for t, k, *_ in samples if k >= 1),
        "last_record": next(t for t, k, *_ in samples if k >= n),
    }


def seed_style(files: list[Path], png_dir: Path) -> None:
    for p in files:
        seed_style_image(p, SIZE).save(png_dir / f"{p.stem}.png")


def decode_only(files: list[Path]) -> None:
    from pipeline.data.dicom import read_dicom

    for p in files:
        read_dicom(p, SIZE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="DICOMs every way processes per repeat (default 1000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="reuse this synth folder (made if incomplete)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        t = time.perf_counter()
        images, labels = make_dicoms(a.data or tmp / "dicom", a.n)
        print(f"synthetic data: {a.n} DICOMs 1024 x 1024 JPEG Baseline ready in {time.perf_counter() - t:.0f} s",
              flush=True)
        print(f"machine: {os.cpu_count()} cores, load average {load_average()} (other users count too)",
              flush=True)
        files = sorted(images.glob("*.dcm"))[: a.n]  # the converter's --limit takes the same first n
        plugin = pydicom_plugin_used(files[0])
        png_dir = tmp / "seed-png"
        png_dir.mkdir()
        seed_style(files[-3:], png_dir)  # warm-up: imports, first-call costs
        decode_only(files[-3:])

        rows = {"seed": [], "limit": [], "convert": []}
        for r in range(a.repeats):
            # every way gets the same N files: the same work
            _, wall, cpu = timed(seed_style, files, png_dir)
            rows["seed"].append((len(files) / wall, len(files) / cpu))
            _, wall, cpu = timed(decode_only, files)
            rows["limit"].append((len(files) / wall, len(files) / cpu))
            rows["convert"].append(run_convert(images, labels, tmp / "tfrecords", a.n))
            c = rows["convert"][-1]
            print(f"repeat {r + 1}/{a.repeats}: seed {rows['seed'][-1][0]:.1f} img/s, limit x2 "
                  f"{2 * rows['limit'][-1][0]:.0f} img/s, convert whole {a.n / c['wall']:.0f} img/s "
                  f"steady {c['steady']:.0f} img/s", flush=True)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    conv = rows["convert"]
    seed_rate = med(w for w, _ in rows["seed"])
    whole = [a.n / c["wall"] for c in conv]
    steady = [c["steady"] for c in conv]
    limit1 = [w for w, _ in rows["limit"]]
    limit2 = [2 * w for w in limit1]
    # per-repeat ratios: each against the limit measured beside it
    steady_vs_limit = [s / lim for s, lim in zip(steady, limit2, strict=True)]
    whole_ratio = med(whole) / seed_rate

    print(f"\nconvert: {a.n} synthetic 1024x1024 JPEG Baseline DICOMs -> {SIZE} px; {a.repeats} repeats, "
          "medians (min-max of img/s)")
    print(f"pydicom default-plugin decoder used by the seed-style way: {plugin}")
    hdr = f"{'way':58} {'images':>9} {'img/s wall':>17} {'img/CPU-s':>10} {'x seed':>7}"
    print(hdr)
    print("-" * len(hdr))

    def row(name, images_text, rates, cpu_rate):
        cpu_text = f"{cpu_rate:10.1f}" if cpu_rate else f"{'-':>10}"
        print(f"{name:58} {images_text:>9} {spread(rates):>17} {cpu_text} {med(rates) / seed_rate:7.1f}")

    row("seed-style: pydicom pixel_array + PIL resize + PNG, 1 proc", f"{a.n}x{a.repeats}",
        [w for w, _ in rows["seed"]], med(c for _, c in rows["seed"]))
    row(f"pneumo convert --workers {WORKERS}: whole process", f"{a.n}x{a.repeats}", whole,
        med(a.n / c["cpu"] for c in conv))
    row("pneumo convert: steady state (20%-80% of its progress)", f"{int(0.6 * a.n)}x{a.repeats}", steady,
        med(c["steady_cpu"] for c in conv))
    row("decode only: read_dicom(p, 256), 1 proc", f"{a.n}x{a.repeats}", limit1,
        med(c for _, c in rows["limit"]))
    row("decode-bound limit: the above x2 (2 cores)", "", limit2, None)
    print("-" * len(hdr))
    timeline = (f"median timeline of a convert run: first record at {med(c['first_record'] for c in conv):.1f} s, "
                f"last at {med(c['last_record'] for c in conv):.1f} s, exit at {med(c['wall'] for c in conv):.1f} s")
    print(timeline)
    cpu_per_image = med(c["cpu"] / a.n for c in conv) * 1000
    decode_cpu = med(1000 / c for _, c in rows["limit"])
    print(f"CPU per image: convert {cpu_per_image:.2f} ms (whole process tree, start-up included; "
          f"{'subreaper accounting' if all(c['subreaper'] for c in conv) else 'WITHOUT pool workers'}), "
          f"decode only {decode_cpu:.2f} ms")
    steady_eff = med(c["steady_cpu"] for c in conv) / med(c for _, c in rows["limit"])
    tree_ms, main_ms = med(1000 / c["steady_cpu"] for c in conv), med(c["main_ms"] for c in conv)
    print(f"steady state: the process tree got {med(c['cores'] for c in conv):.2f} of 2 cores (machine shared; "
          f"load average {load_average()} at the end); CPU per image {tree_ms:.2f} ms = workers "
          f"{tree_ms - main_ms:.2f} + main process {main_ms:.2f} (decode alone {decode_cpu:.2f}): "
          f"per CPU-second it converts {100 * steady_eff:.0f}% of what decode alone does")
    print(f"whole process / seed-style = {whole_ratio:.1f}x (target >= 6); "
          f"steady state / decode-bound limit = {100 * med(steady_vs_limit):.0f}% "
          f"(per repeat: {', '.join(f'{100 * v:.0f}%' for v in steady_vs_limit)}; target >= 85%)")
    print(f"ratio={whole_ratio:.2f} target=6")


if __name__ == "__main__":
    main()
