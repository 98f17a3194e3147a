"""Does `pneumo serve` stay bounded under crafted requests? A load test on loopback, bounded in count and time.

    .venv/bin/python benchmarks/serve_load.py             # ~2 min on 2 cores; --repeats N for more requests

It builds its own promoted model (a smoke-sized CNN at 64 px, logged and registered in a temporary SQLite store,
its hash recorded as promotion records it), starts `pneumo serve` on a free loopback port, and sends, in turn:
1. normal requests: 8 synthetic DICOM rows (the baseline latency and memory);
2. a JPEG 2000 DICOM of 5000 x 5000 pixels with a RescaleSlope, a few KB: it once took 836 MiB and 1.7 s to
   decode; the serving pixel cap refuses it before any pixel is decoded;
3. a 16-bit PNG of 7000 x 7000 (~111 KB): once 655 MiB; refused on its header by the same cap;
4. a 16-bit PNG of 4000 x 4000, just under the cap: decoded in a worker with the 2 GiB cap, then scored;
5. 50,000 one-pixel PNG rows in one request (5.3 MB): once gigabytes of arrays; refused whole by the row cap;
6. a request declaring a 70 MB body: refused on its Content-Length (413) before any of it is read;
7. 8 concurrent normal requests with `--max-in-flight 2`: some answered 503 instead of queueing.
For each: the HTTP status, the first answer's status or message, the latency, and the peak resident memory of
the server's whole process tree (server plus decode workers, sampled every 20 ms) above its idle level.
The last line is `peak_rss_over_idle_mib=<max over all crafted requests> target=2048`: the address-space cap
of one decode worker (`pipeline.artifact.serving.Limits.decode_memory_bytes`), which no request may exceed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "pneumonia-cnn"


def promoted_store(root: Path) -> str:
    """A SQLite store whose @champion is a tiny promoted model (its hash recorded like `pneumo promote` does)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.artifact import tag_keys, tracking
    from pipeline.config import load_config
    from pipeline.net.model import build_model
    from pipeline.promote.promotion import model_sha256

    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(REPO / "experiments" / "smoke.toml", [])
    exp = tracking.ensure_experiment("serve-load", uri)
    network = build_model(cfg.model, cfg.augment, 64)
    with mlflow.start_run(experiment_id=exp):
        info = tracking.log_keras_model(network, 64, cfg.model.metadata_inputs, registered_model_name=MODEL,
                                        threshold=0.5, temperature=1.0)
    client = MlflowClient(uri, uri)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(MODEL, "champion", version)
    client.set_model_version_tag(MODEL, version, tag_keys.MODEL_SHA256, model_sha256(MODEL, version))
    return uri


def j2k_dicom(side: int = 5000) -> bytes:
    """A JPEG 2000 lossless DICOM of side x side zeros with a RescaleSlope: a few KB that declare 25 M pixels."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", "bomb"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "2", "0"
    ds.compress(JPEG2000Lossless, np.zeros((side, side), np.uint16), encoding_plugin="pylibjpeg")
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def png16(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("I;16", (side, side)).save(out, format="PNG")
    return out.getvalue()


def png1() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class TreeMemory:
    """Peak RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post_declared(url: str, size: int) -> tuple[int, dict]:
    """Headers declaring a `size`-byte body, then wait for the answer before sending any of it: the limit is
    enforced on Content-Length, before a byte of the body is read (a client streaming it would see a reset)."""
    import http.client
    from urllib.parse import urlparse

    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def rows(records: list[dict]) -> bytes:
    return json.dumps({"dataframe_records": records}).encode()


def first(answer: dict) -> str:
    if "predictions" in answer:
        p = answer["predictions"][0]
        return p["status"] + (f": {p['error']}" if p["error"] else "")
    return answer.get("message", "")[:90]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="normal requests for the baseline")
    args = parser.parse_args(argv)

    from pipeline.artifact.serving import Limits
    from pipeline.data.synth import example_dicom_bytes
    from pipeline.ui import ManagedServer

    tmp = Path(tempfile.mkdtemp(prefix="pneumo-serve-load-"))
    t0 = time.perf_counter()
    uri = promoted_store(tmp)
    print(f"store with a promoted champion: {time.perf_counter() - t0:.1f} s", flush=True)
    crafted = {"j2k 5000x5000 DICOM": rows([{"dicom": b64(j2k_dicom())}]),
               "16-bit PNG 7000x7000": rows([{"image": b64(png16(7000))}]),
               "16-bit PNG 4000x4000": rows([{"image": b64(png16(4000))}]),
               "50,000 one-pixel PNG rows": rows([{"image": b64(png1())}] * 50_000),
               "70 MB body (declared)": 70 * 2**20}
    normal = rows([{"dicom": b64(example_dicom_bytes())}] * 8)
    sizes = {k: v if isinstance(v, int) else len(v) for k, v in crafted.items()}

    class Serve(ManagedServer):
        name, health_path = "pneumo serve", "/ping"

        def command(self):
            return [str(Path(sys.executable).parent / "pneumo"), "serve", "--port", str(self.port),
                    "--tracking-uri", uri, "--max-in-flight", "2"]

        def env(self):
            return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}

    results = []
    with Serve(startup_timeout=300, log_file=tmp / "serve.log") as server:
        post(server.url, normal)  # warm: the decode workers start on the first request
        idle = TreeMemory(server.proc.pid).rss()
        print(f"server up; idle tree RSS {idle / 2**20:.0f} MiB", flush=True)
        print(f"{'request':<28} {'bytes':>10} {'HTTP':>5} {'s':>6} {'peak-idle MiB':>14}  first answer")
        for name, body in [*[(f"normal #{i + 1} (8 DICOM rows)", normal) for i in range(args.repeats)],
                           *crafted.items()]:
            with TreeMemory(server.proc.pid) as mem:
                start = time.perf_counter()
                status, answer = post_declared(server.url, body) if isinstance(body, int) else post(server.url, body)
                took = time.perf_counter() - start
            over = (mem.peak - idle) / 2**20
            results.append((name, status, took, over))
            print(f"{name:<28} {sizes[name] if name in sizes else len(body):>10} {status:>5} {took:>6.2f} {over:>14.0f}  {first(answer)}",
                  flush=True)
        with TreeMemory(server.proc.pid) as mem, concurrent.futures.ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            codes = sorted(s for s, _ in pool.map(lambda _: post(server.url, normal), range(8)))
            took = time.perf_counter() - start
        print(f"{'8 concurrent, 2 in flight':<28} {len(normal) * 8:>10} {','.join(map(str, codes)):>5} "
              f"{took:>6.2f} {(mem.peak - idle) / 2**20:>14.0f}")
    baseline = max(over for name, _, _, over in results if name.startswith("normal"))
    crafted_peak = max(over for name, _, _, over in results if not name.startswith("normal"))
    print(f"normal requests' peak over idle: {baseline:.0f} MiB")
    print(f"peak_rss_over_idle_mib={crafted_peak:.0f} target={Limits().decode_memory_bytes // 2**20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
