"""The `pneumo` command: parses arguments and calls the stages; no logic lives here.

Imports are lazy so `pneumo --help` answers at once and `convert` never loads TensorFlow or MLflow.
Every failure the user can fix ends as one line `pneumo <command>: error: <reason>` and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.errors import InputError

# TensorFlow's C++ start-up chatter (CPU feature notes, CUDA probes) drowns the useful output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")


def cmd_synth(a):
    from pipeline.synth import make_synthetic_dataset

    s = make_synthetic_dataset(a.out, n=a.n, positive_rate=a.positive_rate, size=a.size, seed=a.seed,
                               workers=a.workers)
    print(f"wrote {s['n']} synthetic DICOMs ({s['positives']} positive) to {a.out} in {s['seconds']:.1f} s")


def cmd_convert(a):
    from pipeline.convert import convert_image_dir, convert_rsna, summary

    common = dict(image_size=a.image_size, workers=a.workers, seed=a.seed, test_frac=a.test_frac,
                  val_frac=a.val_frac, limit=a.limit, progress=not a.quiet)
    if a.image_dir:
        manifest = convert_image_dir(a.image_dir, a.out, patient_regex=a.patient_regex, **common)
    else:
        if not a.labels:
            raise UsageError("--dicom-dir needs --labels CSV")
        manifest = convert_rsna(a.dicom_dir, a.labels, a.out, **common)
    print(summary(manifest))
    print(f"wrote {a.out}/manifest.json")


def cmd_train(a):
    from pipeline.config import load_config
    from pipeline.train import summary_table, train

    cfg = load_config(a.config, a.set)
    result = train(cfg, a.data, tracking_uri=a.tracking_uri, config_file=a.config)
    print(summary_table(result))


def cmd_tune(a):
    from pipeline.config import load_config
    from pipeline.tune import run_tune

    cfg = load_config(a.config, a.set)
    run_tune(cfg, a.study, data_dir=a.data, trials=a.trials, timeout=a.timeout, workers=a.workers,
             storage=a.storage, tracking_uri=a.tracking_uri, config_file=a.config)


def cmd_evaluate(a):
    from pipeline.scoring import evaluate_model

    report = evaluate_model(a.model, a.data, a.split, tracking_uri=a.tracking_uri, out=a.out, shift=a.shift,
                            shift_max_images=a.shift_max_images)
    print(report["table"])
    print(f"wrote {report['path']}")


def cmd_demo(a):
    from pipeline.demo import run_demo

    run_demo(workdir=a.workdir, tracking_uri=a.tracking_uri, n=a.n)


def cmd_promote(a):
    from pipeline.registry import format_decision, promote

    decision = promote(a.model, a.data, study=a.study, metric=a.metric, min_delta=a.min_delta,
                       dry_run=a.dry_run, version=a.version, tracking_uri=a.tracking_uri)
    print(format_decision(decision))


def cmd_predict(a):
    from pipeline.predict import run_predict

    run_predict(a.paths, a.model, a.out, tracking_uri=a.tracking_uri, force=a.force, threshold=a.threshold,
                batch_size=a.batch_size)


def cmd_explain(a):
    from pipeline.explain import run_explain

    run_explain(a.paths, a.model, a.out, tracking_uri=a.tracking_uri)


def cmd_ui(a):
    from pipeline.ui import run_ui

    run_ui(a.tracking_uri, a.port)


def cmd_dashboard(a):
    from pipeline.ui import run_dashboard

    run_dashboard(a.storage, a.port)


class UsageError(InputError):
    """A flag combination argparse cannot express (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumo", description="Pneumonia chest X-ray training system")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic RSNA-like DICOM dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--positive-rate", type=float, default=0.25)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="DICOMs (or class folders) -> sharded TFRecords + manifest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicom-dir", help="folder of <patientId>.dcm (RSNA layout)")
    src.add_argument("--image-dir", help="folder with NORMAL/ and PNEUMONIA/ class folders")
    p.add_argument("--labels", help="RSNA label CSV (with --dicom-dir)")
    p.add_argument("--patient-regex", help="regex with one group: the patient id in an image file name")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the core count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--val-frac", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=None, help="convert only the first N labelled inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="one training run, tracked in MLflow")
    p.add_argument("--config", required=True, help="experiments/<name>.toml")
    p.add_argument("--data", default=None, help="converted data folder (default: [data] dir of the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="an Optuna study; every trial an MLflow run")
    p.add_argument("--config", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--trials", type=int, default=None, help="N more finished trials for this launch")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU when GPUs exist)")
    p.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: $PNEUMO_OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics of a model on a split, with CIs and the baseline")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/pneumonia-cnn@champion")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="JSON report (default: <data>/evaluation-<split>.json)")
    p.add_argument("--shift", action="store_true",
                   help="generalization report: AUC under every shift-battery perturbation, ECE before/after")
    p.add_argument("--shift-max-images", type=int, default=0,
                   help="cap the battery's subset of the split (class-stratified, fixed); 0 = whole split")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("promote", help="gate the best version against the champion; move the alias")
    p.add_argument("--model", default="pneumonia-cnn", help="registered model name")
    p.add_argument("--data", default=None,
                   help="converted dataset whose locked test split both are scored on (default: the candidate's)")
    p.add_argument("--study", default=None, help="only versions of this Optuna study")
    p.add_argument("--metric", default=None,
                   help="validation metric that ranks the candidates (default: the one the study optimised, "
                        "version tag study_metric; else val_auc)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="promote unless the candidate's test AUC is below the champion's by more than this")
    p.add_argument("--version", default=None, help="gate this version instead of the best-ranked one")
    p.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="DICOM files or folders -> probabilities CSV")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (recursive)")
    p.add_argument("--model", default=None, help="model URI (default: models:/pneumonia-cnn@champion)")
    p.add_argument("--out", default=None, help="CSV file (default: CSV to stdout, or a table on a terminal)")
    p.add_argument("--force", action="store_true", help="predict files whose header is out of scope too")
    p.add_argument("--threshold", type=float, default=None, help="override the model's stored threshold")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM heat maps over DICOMs or PNG/JPEG files, one PNG each")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM or PNG/JPEG files or folders (recursive)")
    p.add_argument("--model", default=None, help="model URI (default: models:/pneumonia-cnn@champion)")
    p.add_argument("--out", default="explanations", help="folder for <stem>.png (default: explanations)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the project's stores")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("dashboard", help="optuna-dashboard on the study storage (optional extra)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: $PNEUMO_OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("demo", help="synth -> convert -> ... on the embedded stores")
    p.add_argument("--workdir", default=".", help="where tfrecords/ and mlruns/ go (default: here)")
    p.add_argument("--n", type=int, default=800, help="synthetic patients")
    p.set_defaults(func=cmd_demo)

    for p in sub.choices.values():
        _add_tracking(p)
    return parser


def _third_party_errors() -> tuple[type[BaseException], ...]:
    """MLflow's error, only where the command already loaded MLflow (importing it just to name it costs
    seconds); its messages name the store and the object, which is the reason the user needs."""
    if "mlflow.exceptions" in sys.modules:
        return (sys.modules["mlflow.exceptions"].MlflowException,)
    return ()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit 0 on success, 2 on bad input (`InputError`, a missing file), 1 on a failure at
    run time (`PneumoError`, an OS error such as a full disk, a store that does not answer), 130 on Ctrl-C;
    every failure is one line on stderr, never a traceback."""
    from pipeline.errors import PneumoError, one_line

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except KeyboardInterrupt:
        print(f"pneumo {args.command}: interrupted", file=sys.stderr)
        return 130
    except PneumoError as e:
        code, reason = e.exit_code, one_line(e)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        code, reason = 2, one_line(e)
    except OSError as e:  # a full disk, a permission, a connection refused: the input was fine
        code, reason = 1, one_line(e)
    except _third_party_errors() as e:
        code, reason = 1, one_line(e)
    print(f"pneumo {args.command}: error: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
