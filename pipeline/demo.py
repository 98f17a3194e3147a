"""`pneumo demo`: the main job end to end on the embedded stores and synthetic data."""

from __future__ import annotations

from pathlib import Path


def run_demo(workdir: str = ".", tracking_uri: str | None = None, n: int = 300) -> None:
    from pipeline.convert import convert_rsna, summary
    from pipeline.synth import make_synthetic_dataset

    root = Path(workdir)
    raw = root / "tfrecords" / "demo-dicom"
    data = root / "tfrecords" / "demo"
    print(f"[1/2] synth: {n} RSNA-like DICOMs -> {raw}")
    if not (raw / "stage_2_train_labels.csv").exists():
        make_synthetic_dataset(raw, n=n, size=256, seed=0, workers=2)
    print(f"[2/2] convert -> {data}")
    manifest = convert_rsna(raw / "stage_2_train_images", raw / "stage_2_train_labels.csv", data, image_size=64)
    print(summary(manifest))
    print("demo: synth and convert ran; training, tuning, promotion and prediction are not built yet.")
