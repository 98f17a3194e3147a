"""The `pneumo` command: parses arguments and calls the stages; no logic lives here.

Imports are lazy so `pneumo --help` answers at once and `convert` never loads TensorFlow or MLflow.
Every failure the user can fix ends as one line `pneumo <command>: error: <reason>` and a non-zero exit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from pipeline.errors import InputError, one_line

# TensorFlow's C++ start-up chatter (CPU feature notes, CUDA probes) drowns the useful output: the level below
# quiets its logging, and the commands that load TensorFlow import it with stderr held back
# (pipeline/net/devices.py:import_tensorflow_quietly; PNEUMO_VERBOSE=1 shows all of it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _load_tensorflow() -> None:
    """TensorFlow imported with its start-up log held back, once a command's cheap checks have passed (a typo
    still answers before TensorFlow loads) and KERAS_BACKEND is set (importing TensorFlow imports Keras)."""
    from pipeline.net.devices import import_tensorflow_quietly

    import_tensorflow_quietly()


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db "
                        "under $PNEUMO_HOME or the project folder)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says it (a None default means
    "see the help text", never "(default: None)"; an on/off switch is off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False) or isinstance(action.default, list):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """A bad flag is one line, like every other error (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, high: float | None = None, what: str = ""):
    """An argparse type: a `kind` number in [low, high]; the error names the flag (argparse adds it)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") \
                from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):  # nan passes `<`
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}{what}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
port_number = _number(int, 1, 65535)
probability = _number(float, 0.0, 1.0)


def cmd_synth(a):
    from pipeline.data.synth import make_synthetic_dataset

    s = make_synthetic_dataset(a.out, n=a.n, positive_rate=a.positive_rate, size=a.image_size, seed=a.seed,
                               workers=a.workers, progress=not a.quiet)
    print(f"wrote {s['n']} synthetic DICOMs ({s['positives']} positive) to {a.out} in {s['seconds']:.1f} s")


def cmd_convert(a):
    from pipeline.data.convert import convert_image_dir, convert_rsna, summary

    patient_regex, out = a.patient_regex, a.out
    if a.config:  # the recipe's own patient rule and output folder ([data] patient_regex, dir)
        from pipeline.config import load_config

        data = load_config(a.config, []).data
        patient_regex = patient_regex or data.patient_regex or None
        out = out or data.dir
    if not out:
        raise UsageError("--out is required (or --config with a [data] dir)")
    a.out = out
    common = dict(image_size=a.image_size, workers=a.workers, seed=a.seed, test_frac=a.test_frac,
                  val_frac=a.val_frac, limit=a.limit, progress=not a.quiet, decode_timeout=a.decode_timeout)
    if a.image_dir:
        manifest = convert_image_dir(a.image_dir, out, patient_regex=patient_regex, **common)
    else:
        if not a.labels:
            raise UsageError("--dicom-dir needs --labels CSV")
        manifest = convert_rsna(a.dicom_dir, a.labels, out, **common)
    print(summary(manifest))
    print(f"wrote {a.out}/manifest.json")


def _use_backend(cfg, load: bool = True) -> None:
    """Keras reads KERAS_BACKEND once, when it is first imported: set it from `train.backend` before any stage
    that imports Keras (tune workers inherit it with the environment). `load=False`: set it only, for a process
    that does not train itself."""
    os.environ["KERAS_BACKEND"] = cfg.train.backend
    if load:
        _load_tensorflow()


def cmd_train(a):
    from pipeline.config import load_config

    # The experiment file is checked before TensorFlow loads (seconds): a typo answers at once.
    cfg = load_config(a.config, a.set)
    _use_backend(cfg)
    if a.register and not cfg.train.log_model:
        raise UsageError("--register needs train.log_model = true (nothing is logged to register)")
    from pipeline.data.manifest import load_manifest

    load_manifest(a.data or cfg.data.dir)  # a missing dataset, too
    from pipeline.stopping import stop_check_callback, stop_on_signals
    from pipeline.study.train import summary_table, train

    # SIGTERM (a scheduler's preemption) ends the run KILLED with its checkpoint kept, as Ctrl-C does: the same
    # command resumes it. Without the handler the process died at once and left the run RUNNING.
    with stop_on_signals():
        result = train(cfg, a.data, tracking_uri=a.tracking_uri, config_file=a.config, register_as=a.register,
                       callbacks=[stop_check_callback()])
    print(summary_table(result))
    if result.model_version:
        print(f"registered {a.register} version {result.model_version} "
              f"(pneumo promote --model-name {a.register} gates it against the champion)")


def cmd_tune(a):
    from pipeline.config import load_config

    cfg = load_config(a.config, a.set)
    from pipeline.net import devices

    workers = devices.default_workers(a.workers_per_gpu) if a.workers is None else a.workers
    # One worker: the trials run in this process. More: the launcher only coordinates and each worker imports
    # TensorFlow itself; imported here too, it cost ~10 s of CPU before the first worker started (on 2 cores,
    # while they start) and its memory for the whole study.
    _use_backend(cfg, load=workers <= 1)
    from pipeline.study.tune import run_tune

    run_tune(cfg, a.study, data_dir=a.data, trials=a.trials, timeout=a.timeout, workers=workers,
             storage=a.storage, tracking_uri=a.tracking_uri, config_file=a.config,
             workers_per_gpu=a.workers_per_gpu)


def cmd_doctor(a):
    _load_tensorflow()
    from pipeline.doctor import run_doctor

    run_doctor(a.tracking_uri, a.storage)


def _read_only(a, uri: str | None = None) -> None:
    """A command that only reads the MLflow store must not create an empty one (see pipeline.stores)."""
    from pipeline.stores import require_store, resolve_tracking_uri

    if uri is None or uri.startswith(("models:/", "runs:/")):  # a local model folder needs no store
        require_store(resolve_tracking_uri(a.tracking_uri), a.command)
    _load_tensorflow()  # every read-only command scores or loads a model


def cmd_evaluate(a):
    _read_only(a, a.model)
    from pipeline.evaluate.scoring import evaluate_model

    report = evaluate_model(a.model, a.data, a.split, tracking_uri=a.tracking_uri, out=a.out, shift=a.shift,
                            shift_max_images=a.shift_max_images)  # a test read is recorded in the ledger
    print(report["table"])
    print(f"wrote {report['path']}")


def cmd_demo(a):
    _load_tensorflow()
    from pipeline.demo import run_demo

    run_demo(workdir=a.workdir, tracking_uri=a.tracking_uri, n=a.n, quiet=a.quiet)


def cmd_promote(a):
    _read_only(a)  # it moves an alias at most: a store without registered models cannot be promoted from
    from pipeline.config import load_config
    from pipeline.promote.promotion import format_decision, promote, rule_of

    # Every argument is checked before anything is written: --ensemble registers a version.
    if a.set and not a.config:
        raise UsageError("--set needs --config (the experiment file whose [promote] section it overrides)")
    cfg = load_config(a.config, a.set).promote if a.config else None  # None: the study's own rule
    if cfg is not None:
        rule_of(cfg)
    gate = dict(config=cfg, externals=a.external, dry_run=a.dry_run, version=a.version,
                tracking_uri=a.tracking_uri, log_images=a.log_images,
                rule_source=f"--config {a.config}" + (f" with --set {' '.join(a.set)}" if a.set else ""))
    k, tta = candidate_recipe(a, cfg)
    if k >= 2 or tta != "none":  # build and register the ensemble, then gate it like any candidate
        from pipeline.promote.ensemble import promote_ensemble

        decision = promote_ensemble(a.model_name, a.study, k, data_dir=a.data, tta=tta, metric=a.metric, **gate)
    else:
        decision = promote(a.model_name, a.data, study=a.study, metric=a.metric, **gate)
    print(format_decision(decision))


def candidate_recipe(a, cfg) -> tuple[int, str]:
    """How the candidate is built -> (K, test-time views): each of --ensemble and --tta, else `[promote] ensemble`
    and `tta` (the --config file's, else the rule the study recorded at launch); (0, "none") is the best single
    version as it is. A forced --version or a --dry-run gates a single version as it is (an ensemble registers a
    new version), and says so when the rule asked for more."""
    rule = None
    if a.study and (a.ensemble is None or a.tta is None):
        if cfg is None:
            from pipeline.artifact import tracking
            from pipeline.promote.promotion import study_rule

            cfg, _ = study_rule(tracking.setup(tracking.resolve_tracking_uri(a.tracking_uri)), a.study)
        rule = cfg
    k = a.ensemble if a.ensemble is not None else (rule.ensemble if rule else 0)
    tta = a.tta if a.tta is not None else (rule.tta if rule else "none")
    if tta != "none":
        k = max(k, 1)  # the best version under the views
    if (k >= 2 or tta != "none") and a.ensemble is None and a.tta is None and (a.version or a.dry_run):
        flag = "--version" if a.version else "--dry-run"
        print(f"pneumo promote: [promote] ensemble = {rule.ensemble}, tta = {rule.tta!r} is not built with {flag} "
              "(it registers a new version): gating a single version as it is", file=sys.stderr)
        return 0, "none"
    return k, tta


def cmd_predict(a):
    _read_only(a, a.model)
    from pipeline.predict import run_predict

    run_predict(a.paths, a.model, a.out, tracking_uri=a.tracking_uri, force=a.force, threshold=a.threshold,
                batch_size=a.batch_size, progress=False if a.quiet else None,
                with_patient_id=a.with_patient_id)


def cmd_explain(a):
    _read_only(a, a.model)
    from pipeline.evaluate.explain import run_explain

    run_explain(a.paths, a.model, a.out, tracking_uri=a.tracking_uri, force=a.force)


def cmd_serve(a):
    from pipeline.serve import serve

    _load_tensorflow()
    serve(a.model, host=a.host, port=a.port, tracking_uri=a.tracking_uri, max_body=a.max_body,
          max_in_flight=a.max_in_flight)
    return 0


def cmd_ui(a):
    from pipeline.ui import run_ui

    run_ui(a.tracking_uri, a.port, host=a.host, auth=a.auth)


def cmd_dashboard(a):
    from pipeline.ui import run_dashboard

    run_dashboard(a.storage, a.port)


class UsageError(InputError):
    """A flag combination argparse cannot express (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = _Parser(prog="pneumo", description="Pneumonia chest X-ray training system")
    parser.add_argument("--version", action="version", version=f"pneumo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("synth", help="write a synthetic RSNA-like DICOM dataset")
    p.add_argument("--out", required=True, help="output folder (RSNA layout)")
    p.add_argument("--n", type=int, default=200, help="synthetic patients")
    p.add_argument("--positive-rate", type=float, default=0.25, help="fraction of positive patients")
    p.add_argument("--image-size", "--size", dest="image_size", type=positive_int, default=1024,
                   help="stored image side in pixels (--size is the older name)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                   help="writer processes (default: the core count, %(default)s here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="DICOMs (or class folders) -> sharded TFRecords + manifest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicom-dir", help="folder of <patientId>.dcm (RSNA layout)")
    src.add_argument("--image-dir", help="folder with NORMAL/ and PNEUMONIA/ class folders")
    p.add_argument("--labels", help="RSNA label CSV (with --dicom-dir)")
    p.add_argument("--patient-regex", help="regex with one group: the patient id in an image file name "
                   "(default: [data] patient_regex of --config)")
    p.add_argument("--config", default=None,
                   help="experiment file whose [data] patient_regex and dir are the defaults for the rule and --out")
    p.add_argument("--out", default=None, help="output folder (default: [data] dir of --config)")
    p.add_argument("--image-size", type=positive_int, default=256, help="stored image width and height")
    p.add_argument("--workers", type=positive_int, default=None, help="decode processes (default: the core count)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the patient-level split")
    p.add_argument("--test-frac", type=float, default=0.2, help="fraction of patients in the test split")
    p.add_argument("--val-frac", type=float, default=0.2, help="fraction of the remaining patients in validation")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="convert only N labelled inputs (image folders: a stratified N, both classes kept)")
    p.add_argument("--decode-timeout", type=float, default=60.0,
                   help="seconds one file may take to decode before it is rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="one training run, tracked in MLflow")
    p.add_argument("--config", required=True, help="experiments/<name>.toml")
    p.add_argument("--data", default=None, help="converted data folder (default: [data] dir of the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; default: none)")
    p.add_argument("--register", nargs="?", const="pneumonia-cnn", default=None, metavar="NAME",
                   help="register the run's model as a new version of NAME (default: not registered; "
                        "NAME defaults to pneumonia-cnn)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="an Optuna study; every trial an MLflow run")
    p.add_argument("--config", required=True, help="experiments/<name>.toml with a [tune.space]")
    p.add_argument("--study", required=True, help="study name (also the MLflow experiment)")
    p.add_argument("--data", default=None, help="converted data folder (default: [data] dir of the config)")
    p.add_argument("--trials", type=non_negative_int, default=None,
                   help="N more finished trials for this launch (default: tune.trials of the config)")
    p.add_argument("--timeout", type=_number(float, 1e-9), default=None,
                   help="seconds after which no new trial starts (default: none)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (default: one per visible GPU times --workers-per-gpu; 1 without a GPU)")
    p.add_argument("--workers-per-gpu", type=positive_int, default=1,
                   help="workers sharing one GPU (each grows its memory as it needs, or set PNEUMO_GPU_MEMORY_MB "
                        "to cap each)")
    p.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: $PNEUMO_OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db "
                        "under $PNEUMO_HOME or the project folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; default: none)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics of a model on a split, with CIs and the baseline")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/pneumonia-cnn@champion")
    p.add_argument("--data", required=True, help="converted data folder")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"],
                   help="split to score (`test` is explicit and recorded in the test ledger; `all` "
                        "scores a whole external set)")
    p.add_argument("--out", default=None, help="JSON report (default: <data>/evaluation-<split>.json)")
    p.add_argument("--shift", action="store_true",
                   help="generalization report: AUC under every shift-battery perturbation, ECE before/after")
    p.add_argument("--shift-max-images", type=non_negative_int, default=0,
                   help="cap the battery's subset of the split (class-stratified, fixed); 0 = whole split")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("promote", help="gate the best version against the champion; move the alias")
    p.add_argument("--model-name", default="pneumonia-cnn", help="registered model name")
    p.add_argument("--model", dest="model_name", help=argparse.SUPPRESS)  # deprecated alias of --model-name
    p.add_argument("--data", default=None,
                   help="converted dataset whose locked test split both are scored on (default: the candidate's)")
    p.add_argument("--study", default=None, help="only versions of this Optuna study (default: all versions)")
    p.add_argument("--metric", default=None,
                   help="validation metric that ranks the candidates (default: the one the study optimised, "
                        "version tag study_metric; else val_auc)")
    p.add_argument("--config", default=None,
                   help="experiment file whose [promote] section is the rule (default: superiority, alpha 0.05, "
                        "floor AUC 0.7)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. promote.policy=non_inferiority")
    p.add_argument("--external", action="append", default=[], metavar="NAME=DATA",
                   help="also score candidate and champion on this converted dataset (all splits); repeatable")
    p.add_argument("--log-images", action="store_true",
                   help="log a Grad-CAM grid of test images on the new champion's run (off: they may be "
                        "real patients' X-rays)")
    p.add_argument("--version", default=None,
                   help="gate this version instead of the best-ranked one (default: the best-ranked)")
    p.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    p.add_argument("--ensemble", type=non_negative_int, default=None, metavar="K",
                   help="gate one new version averaging the top K versions of --study (by --metric); 1: the "
                        "best single version (default: [promote] ensemble of --config, else of the study's rule)")
    p.add_argument("--tta", choices=("none", "mild"), default=None,
                   help="average the candidate over test-time views (pipeline/net/tta.py; with no --ensemble: the "
                        "best version under the views) (default: [promote] tta of --config, else of the study's rule)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="DICOM files or folders -> probabilities CSV")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (recursive)")
    p.add_argument("--model", default=None, help="model URI (default: models:/pneumonia-cnn@champion)")
    p.add_argument("--out", default=None, help="CSV file (default: CSV to stdout, or a table on a terminal)")
    p.add_argument("--force", action="store_true", help="predict files whose header is out of scope too")
    p.add_argument("--threshold", type=probability, default=None,
                   help="override the model's stored threshold (default: the stored one)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: one from 50 files on)")
    p.add_argument("--with-patient-id", action="store_true",
                   help="add the header's PatientID column (PHI; left out by default)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM heat maps over DICOMs or PNG/JPEG files, one PNG each")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM or PNG/JPEG files or folders (recursive)")
    p.add_argument("--model", default=None, help="model URI (default: models:/pneumonia-cnn@champion)")
    p.add_argument("--out", default="explanations", help="folder for <stem>.png")
    p.add_argument("--force", action="store_true", help="explain DICOMs whose header is out of scope too "
                   "(as `pneumo predict --force`; default: skipped with the reason)")
    p.set_defaults(func=cmd_explain)

    from pipeline import serve as serve_defaults  # light: the heavy imports are inside serve()

    p = sub.add_parser("serve", help="serve a verified registered version (default: the champion) over HTTP")
    p.add_argument("--model", default=None, help="registered model URI (default: models:/pneumonia-cnn@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=port_number, default=5001, help="port to listen on")
    p.add_argument("--max-body", type=positive_int, default=serve_defaults.MAX_BODY_BYTES, metavar="BYTES",
                   help="largest request body accepted (413 above it; default: %(default)s)")
    p.add_argument("--max-in-flight", type=positive_int, default=serve_defaults.MAX_IN_FLIGHT, metavar="N",
                   help="requests decoded and scored at once (503 beyond; default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the project's stores")
    p.add_argument("--port", type=port_number, default=5000, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (another than loopback warns: add --auth and TLS)")
    p.add_argument("--auth", action="store_true",
                   help="MLflow's basic-auth app: users and passwords (admin password from "
                        "$MLFLOW_AUTH_ADMIN_PASSWORD)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("dashboard", help="optuna-dashboard on the study storage (optional extra)")
    p.add_argument("--port", type=port_number, default=8080, help="port on 127.0.0.1")
    p.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: $PNEUMO_OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db "
                        "under $PNEUMO_HOME or the project folder)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("doctor", help="versions, devices, what `auto` picks, the stores and whether they answer")
    p.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: $PNEUMO_OPTUNA_STORAGE, else sqlite:///mlruns/optuna.db)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="synth -> convert -> ... on the embedded stores")
    p.add_argument("--workdir", default=".",
                   help="where tfrecords/ and, unless --tracking-uri is given, mlruns/ go (default: %(default)s, the current folder)")
    p.add_argument("--n", type=positive_int, default=800, help="synthetic patients")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    for name, p in sub.choices.items():
        if name not in NO_TRACKING:
            _add_tracking(p)
    return parser


NO_TRACKING = ("synth", "convert", "dashboard")  # commands that never touch the MLflow store


def _third_party_errors() -> tuple[type[BaseException], ...]:
    """MLflow's error, only where the command already loaded MLflow (importing it just to name it costs
    seconds); its messages name the store and the object, which is the reason the user needs."""
    errors = []
    if "mlflow.exceptions" in sys.modules:
        errors.append(sys.modules["mlflow.exceptions"].MlflowException)
    if "sqlalchemy.exc" in sys.modules:  # a database store that refuses, times out or runs out of space
        errors.append(sys.modules["sqlalchemy.exc"].SQLAlchemyError)
    return tuple(errors)


def _reason(e: BaseException) -> str:
    """One line: a database error's own first line (SQLAlchemy appends the SQL and a help link)."""
    orig = getattr(e, "orig", None)
    if orig is not None:
        return f"{type(e).__name__}: " + (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return one_line(e)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit 0 on success, 2 on bad input (`InputError`, a missing file), 1 on a failure at
    run time (`PneumoError`, an OS error such as a full disk, a store that does not answer), 130 on Ctrl-C;
    every failure is one line on stderr, never a traceback."""
    from pipeline.errors import PneumoError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGINT during `pneumo train` or `tune` (pipeline/stopping.py)
        how = f" ({e})" if str(e) else ""
        print(f"pneumo {args.command}: interrupted{how}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except PneumoError as e:
        code, reason = e.exit_code, one_line(e)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        code, reason = 2, one_line(e)
    except OSError as e:  # a full disk, a permission, a connection refused: the input was fine
        code, reason = 1, one_line(e)
    except _third_party_errors() as e:
        code, reason = 1, _reason(e)
    print(f"pneumo {args.command}: error: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
