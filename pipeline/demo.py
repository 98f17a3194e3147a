"""`pneumo demo`: the main job end to end on the embedded stores and synthetic data.

synth -> convert -> train once -> a short Optuna study -> promote the best version -> predict on DICOMs the
model has never seen. Everything lands where a user would look: tfrecords/demo, mlruns/ (`pneumo ui`).
Running it again resumes: the data is reused, the study grows, promotion compares against the champion.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.errors import PneumoError

PACKAGE = Path(__file__).resolve().parent


def experiment_file(name: str = "demo.toml") -> Path:
    """An experiment file of the project, wherever the code runs: `experiments/` of a checkout, else the copy
    a wheel ships as package data (`pipeline/experiments/`, mapped from the same folder in pyproject.toml), so
    `pneumo demo` works after a plain `pip install .` in an empty folder."""
    for folder in (PACKAGE.parent / "experiments", PACKAGE / "experiments"):
        if (folder / name).is_file():
            return folder / name
    raise PneumoError(f"experiment file {name} is missing from {PACKAGE.parent / 'experiments'} and from the "
                      f"installed package ({PACKAGE / 'experiments'}): reinstall pneumo")


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def run_demo(workdir: str = ".", tracking_uri: str | None = None, n: int = 800, quiet: bool = False,
             storage: str | None = None) -> None:
    from pipeline.config import load_config
    from pipeline.data.convert import convert_rsna, summary
    from pipeline.data.synth import make_synthetic_dataset

    start = time.perf_counter()
    root = Path(workdir).resolve()
    raw, new, data = root / "tfrecords" / "demo-dicom", root / "tfrecords" / "demo-new-dicom", root / "tfrecords" / "demo"
    # Everything the demo writes lands under the work folder (its help says so): the stores too, unless the
    # user named them (flag or environment).
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root}/mlruns/mlflow.db"
    storage = storage or os.environ.get("PNEUMO_OPTUNA_STORAGE") or f"sqlite:///{root}/mlruns/optuna.db"
    config_file = experiment_file("demo.toml")
    cfg = load_config(config_file, [f"data.dir={data}", f"train.checkpoint_dir={root / 'mlruns' / 'checkpoints'}"])
    steps = 6

    _step(1, steps, f"synth: {n} RSNA-like DICOMs (JPEG Baseline, 256 px) -> {raw}")
    if not (raw / "stage_2_train_labels.csv").exists():
        make_synthetic_dataset(raw, n=n, size=256, seed=0, workers=2, progress=not quiet)
    if not (new / "stage_2_train_labels.csv").exists():  # unseen patients for the prediction step
        make_synthetic_dataset(new, n=8, size=256, seed=99, workers=1, progress=False)

    _step(2, steps, f"convert -> {data} (64 px; patient-level split, test 20%, val 20% of the rest)")
    manifest = convert_rsna(raw / "stage_2_train_images", raw / "stage_2_train_labels.csv", data, image_size=64,
                            progress=not quiet)
    print(summary(manifest))

    from pipeline.study.train import summary_table, train
    from pipeline.study.tune import run_tune

    _step(3, steps, "train: one run of experiments/demo.toml, tracked in MLflow")
    result = train(cfg, data, tracking_uri=tracking_uri, config_file=config_file)
    print(summary_table(result))

    _step(4, steps, f"tune: a {cfg.tune.trials}-trial Optuna study 'demo' (every trial an MLflow run, "
                    "every completed model registered as pneumonia-cnn)")
    run_tune(cfg, "demo", data_dir=str(data), tracking_uri=tracking_uri, storage=storage,
             config_file=str(config_file))
    _promote_and_predict(data, new, tracking_uri, steps)  # by the rule the study recorded (demo.toml's)
    from pipeline.stores import masked

    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s. Browse it: pneumo ui --tracking-uri "
          f"{masked(tracking_uri)}  (http://127.0.0.1:5000)")


def _promote_and_predict(data: Path, new: Path, tracking_uri: str | None, steps: int) -> None:
    """The last two steps: the evaluation gate moves `champion`, then the champion scores unseen DICOMs."""
    import io

    from pipeline.predict import format_table, run_predict
    from pipeline.promote.promotion import champion_uri, format_decision, promote

    _step(steps - 1, steps, "promote: the study's best version vs the champion on the locked test split")
    print(format_decision(promote(data_dir=data, study="demo", tracking_uri=tracking_uri)))

    out = new.parent / "demo-predictions.csv"
    _step(steps, steps, f"predict: {new.name} (patients no model has seen) with {champion_uri()} -> {out}")
    result = run_predict([str(new / "stage_2_train_images")], None, str(out), tracking_uri=tracking_uri,
                         stdout=io.StringIO())  # the table is printed below, terminal or not
    print(format_table(result["frame"]))
