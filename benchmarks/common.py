"""Helpers shared by the benchmarks: the seed-style decode, timing, a process-tree wrapper, synthetic DICOMs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Converted data and generated DICOMs live outside the repository (never committed): $PNEUMO_BENCH_CACHE, else
# cache/ beside the checkout.
CACHE = Path(os.environ.get("PNEUMO_BENCH_CACHE", REPO.parent / "cache"))
# The real data when this machine has it: $PNEUMO_DATA, else shared/data beside the checkout (where the tests
# look too); every benchmark falls back to synthetic data without it.
DATA = Path(os.environ.get("PNEUMO_DATA", REPO.parent / "shared" / "data"))


def load_average() -> str:
    """The 1/5/15-minute load average, printed beside every timing: the machine is shared, and a wall-clock
    figure means little without it."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# Runs a command (argv after the code), timestamps its tqdm progress (lines with `done/total [`), reaps the whole
# process tree and prints one JSON line: exit code, wall s, CPU s of the tree, peak memory (ru_maxrss of the
# reaped children: the largest single process, not the sum), progress samples. Used by convert.py and scale.py.
WRAPPER = r"""
import ctypes, glob, json, os, re, resource, subprocess, sys, threading, time
subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
tick = os.sysconf("SC_CLK_TCK")
def tree_cpu(pid):  # (CPU s of pid itself, of pid and its live descendants + those they reaped)
    try:
        with open(f"/proc/{pid}/stat") as f:
            own = sum(map(int, f.read().rsplit(")", 1)[1].split()[11:15])) / tick
        kids = [int(k) for c in glob.glob(f"/proc/{pid}/task/*/children") for k in open(c).read().split()]
    except OSError:
        return 0.0, 0.0
    return own, own + sum(tree_cpu(k)[1] for k in kids)
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
samples, tail = [], [b""]
def read_progress():  # a thread: the pool's processes hold stderr open after the command has exited
    buf, bar = b"", re.compile(rb"(\d+)/\d+ \[")
    for chunk in iter(lambda: p.stderr.read1(1 << 16), b""):
        now = time.perf_counter() - t0
        *lines, buf = re.split(rb"[\r\n]", buf + chunk)
        done = [int(m[1]) for m in map(bar.search, lines) if m]
        if done and p.poll() is None:
            samples.append((now, done[-1], *tree_cpu(p.pid)))
        tail[0] = (tail[0] + chunk)[-2000:]
reader = threading.Thread(target=read_progress, daemon=True)
reader.start()
out = p.stdout.read()
rc = p.wait()
wall = time.perf_counter() - t0
while True:  # orphans (forkserver, pool workers) were re-parented to us: wait for them so their CPU counts
    try:
        os.wait()
    except ChildProcessError:
        break
reader.join(5)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024,
                  "samples": samples,
                  "subreaper": subreaper, "stdout": out.decode(errors="replace")[-1500:],
                  "stderr": tail[0].decode(errors="replace")}))
"""


def run_wrapped(cmd: list[str]) -> dict:
    """`cmd` run under WRAPPER -> its JSON line (rc, wall, cpu, maxrss_mb, samples, stdout, stderr); exits with
    the command's stderr tail when it failed."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, cmd)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"wrapper failed: {proc.stderr[-1500:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {r['rc']}): {r['stderr'][-1200:]}")
    return r


def check_converted(out: Path, n: int) -> dict:
    """The manifest `pneumo convert` wrote into `out`, after checking it holds all `n` records."""
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(out)
    written = sum(s["count"] for s in manifest["splits"].values())
    if written != n:
        raise SystemExit(f"pneumo convert wrote {written} records into {out}, expected {n}")
    return manifest


def timed(fn, *args, **kwargs):
    """(result, wall s, CPU s of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def spread(values) -> str:
    """'median (min-max)' of rates."""
    return f"{statistics.median(values):7.1f} ({min(values):.0f}-{max(values):.0f})"


def seed_style_image(path, size: int):
    """The seed's decode: pydicom's default plugins -> pixel_array -> PIL resize (Pillow's default filter)."""
    import pydicom
    from PIL import Image

    return Image.fromarray(pydicom.dcmread(path).pixel_array).resize((size, size))


def pydicom_plugin_used(path) -> str:
    """Which of pydicom's plugins its default order actually decodes `path` with (spied on one file)."""
    import pydicom
    from pydicom.pixels.decoders.base import DecodeRunner

    used, original = [], DecodeRunner._decode_frame

    def spy(self, src):
        frame = original(self, src)
        used.append(self._previous[0])
        return frame

    DecodeRunner._decode_frame = spy
    try:
        ds = pydicom.dcmread(path)
        ds.pixel_array  # noqa: B018
    finally:
        DecodeRunner._decode_frame = original
    from pydicom.pixels import get_decoder

    dec = get_decoder(ds.file_meta.TransferSyntaxUID)
    missing = ", ".join(m.split(" - ")[0] for m in dec.missing_dependencies) or "none"
    return (f"{used[0] if used else '?'} (pydicom {pydicom.__version__}; available in order: "
            f"{', '.join(dec.available_plugins)}; not installed: {missing})")


def make_dicoms(out: Path, n: int, size: int = 1024) -> tuple[Path, Path]:
    """At least `n` synthetic RSNA-like DICOMs in `out` (made unless a complete set is there): (images, CSV)."""
    from pipeline.data.synth import IMAGES_DIR, LABELS_CSV, make_synthetic_dataset

    if not (out / LABELS_CSV).exists():
        make_synthetic_dataset(out, n=n, size=size, workers=2, progress=False)
    files = sorted((out / IMAGES_DIR).glob("*.dcm"))
    if len(files) < n:
        raise SystemExit(f"{out}: {len(files)} DICOMs, need {n}")
    return out / IMAGES_DIR, out / LABELS_CSV
