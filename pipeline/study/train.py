"""One training run: precision, strategy, data, callbacks, validation metrics, MLflow logging.

`train()` is what `pneumo train` runs and what every Optuna trial runs, as named steps: `prepare` (precision,
strategy, data, the compiled model), `training_run` (the MLflow run opened, resumed and ended), `log_inputs`,
`fit`, then `make_candidate` (pipeline/study/candidate.py: validation, threshold, calibration, figures, the
logged model). The run is resumable: Keras' BackupAndRestore keeps the state of an interrupted fit under
`train.checkpoint_dir/<run key>`, together with the MLflow run id, so running the same command again continues
the same MLflow run from the last finished epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline.artifact import tracking
from pipeline.config import Config, check_consistency
from pipeline.data.tfdata import eval_dataset, load_manifest, train_dataset
from pipeline.evaluate import metrics, shift
from pipeline.net.devices import configure_gpus, resolve_jit
from pipeline.net.model import apply_precision, build_model
from pipeline.net.weight_averaging import StochasticWeightAveraging, recompute_batch_norm
from pipeline.stopping import raise_if_stopped, stop_pending
from pipeline.stores import anchored_path
from pipeline.study.candidate import LoggedCandidate, make_candidate

CURVE_METRICS = ("loss", "auc", "auc_pr", "accuracy", "precision", "recall")


@dataclass
class TrainResult:
    run_id: str
    history: dict[str, list[float]]
    val_metrics: dict
    threshold: float  # on the calibrated scale (the `threshold` tag)
    best_val_auc: float
    epochs: int
    images_per_s: float
    model: keras.Model = field(repr=False)
    model_uri: str | None = None
    model_version: str | None = None
    jit_compile: bool = False
    precision: str = "float32"
    temperature: float = 1.0  # fitted on validation (tag `temperature`); 1.0 = uncalibrated
    val_ece: float = float("nan")  # before calibration
    val_ece_calibrated: float = float("nan")  # in-sample: on the split the temperature was fitted on
    val_ece_heldout: float = float("nan")  # on validation patients the temperature was not fitted on

    shift_metrics: dict = field(default_factory=dict)  # val_auc_shift_mean/_min/<name> (empty when off)


def check_backend(backend: str) -> None:
    """`train.backend` must be the Keras backend this process started with: Keras picks it once, at import,
    from KERAS_BACKEND (the CLI sets it from the config before importing Keras; pipeline/cli.py)."""
    if keras.backend.backend() != backend:
        raise ValueError(f"train.backend = {backend!r} but Keras runs on {keras.backend.backend()!r}: set "
                         f"KERAS_BACKEND={backend} before Keras is imported (`pneumo train` does it)")


def choose_strategy(devices: str) -> tf.distribute.Strategy:
    """One device by default; `all`: MirroredStrategy over every GPU, or over the logical CPUs when the CPU was
    split into several (how the multi-device path is tested without a GPU)."""
    if devices == "all":
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        names = [d.name for d in gpus] or ([d.name for d in cpus] if len(cpus) > 1 else [])
        if len(names) > 1:
            return tf.distribute.MirroredStrategy(names)
    return tf.distribute.get_strategy()


def eval_batch_size(count: int, global_batch: int, replicas: int) -> int:
    """The validation batch for `fit` under several replicas (one replica: the global batch).

    Two Keras 3.15 / tf.distribute limits, both seen on 2 logical CPUs with a 39-record split:
    - Keras builds a distributed model on the MEAN of the first validation batch across replicas, which fails
      ("AddN ... must have the same size and shape") when that batch splits unevenly;
    - a last batch smaller than the replica count leaves a replica an empty batch, which BatchNormalization
      rejects ("Incompatible shapes: [0,32,32,8] vs. [16]").
    So: the largest multiple of `replicas` up to the global batch whose last partial batch is empty or has at
    least one record per replica. Every record is still validated exactly once. Only tiny splits have none
    (7 records on 3 replicas): a ValueError says so rather than Keras' shape error.
    """
    if replicas <= 1 or count == 0:
        return global_batch
    for b in range(min(global_batch, count) // replicas * replicas, 0, -replicas):
        if count % b == 0 or count % b >= replicas:
            return b
    raise ValueError(f"a validation split of {count} records cannot be spread over {replicas} replicas in equal "
                     f"batches: use more validation data or fewer devices (train.devices)")


def scaled_learning_rate(lr: float, replicas: int, rule: str) -> float:
    """Global batch grows with replicas; scale LR by the linear rule (Goyal et al. 2017), sqrt, or not at all."""
    return {"linear": lr * replicas, "sqrt": lr * math.sqrt(replicas), "none": lr}[rule]


def class_weights(manifest: dict, mode: str) -> dict[int, float] | None:
    """Balanced loss weights n / (2 n_c): each class contributes equally to the loss."""
    split = manifest["splits"]["train"]
    pos, n = split["positives"], split["count"]
    if mode != "balanced" or pos == 0 or pos == n:
        return None
    return {0: n / (2 * (n - pos)), 1: n / (2 * pos)}


class EpochStats(keras.callbacks.Callback):
    """images/s per epoch (wall and CPU) and metrics to MLflow after every epoch."""

    def __init__(self, images_per_epoch: int, run_id: str):
        super().__init__()
        self.images = images_per_epoch
        self.run_id = run_id
        self.rates: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        logs = dict(logs or {})
        logs["images_per_s"] = self.images / wall
        logs["cpu_s_per_epoch"] = cpu
        logs["epoch_s"] = wall
        lr = self.model.optimizer.learning_rate  # under a schedule Keras 3 returns its value at this step
        logs["learning_rate"] = float(lr.numpy() if hasattr(lr, "numpy") else lr)
        self.rates.append(logs["images_per_s"])
        mlflow.log_metrics({k: float(v) for k, v in logs.items() if np.isfinite(v)}, step=epoch,
                           run_id=self.run_id)


def input_capacity(ds: tf.data.Dataset, batches: int = 20) -> float:
    """Images/s the input pipeline delivers alone (no model): if it is far above the training rate, the
    accelerator never waits for data. benchmarks/train_step.py measures the wait directly."""
    it = iter(ds)
    first = next(it)  # pipeline warm-up (threads, first file reads) is not steady state
    n = int(first[1].shape[0])
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return n * batches / (time.perf_counter() - t0)


def run_key(cfg: Config, digest: str, run_name: str | None) -> str:
    blob = json.dumps({"cfg": cfg.flat(), "digest": digest, "run": run_name}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compile_model(model: keras.Model, cfg: Config, lr: float, total_steps: int = 0, steps_per_epoch: int = 1) -> None:
    t = cfg.train
    if t.weight_averaging == "swa":
        # SWA's schedule (Izmailov et al. 2018): the run's own schedule until the averaged epochs start, then a
        # constant `swa_lr_fraction` of the initial rate (CosineDecay holds `alpha` times it after decay_steps).
        start = max(1, total_steps - steps_per_epoch * t.swa_epochs)
        lr = (keras.optimizers.schedules.CosineDecay(lr, decay_steps=start, alpha=t.swa_lr_fraction)
              if t.lr_schedule == "cosine" else
              keras.optimizers.schedules.PiecewiseConstantDecay([start], [lr, lr * t.swa_lr_fraction]))
    elif t.lr_schedule == "cosine":
        # Cosine decay to 0 over the whole run (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts).
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    # Polyak averaging: the optimizer keeps the average beside the weights it trains, which it never
    # overwrites; fit() shows the average to validation and the epoch-end callbacks (SwapEMAWeights) and
    # leaves it in the model at the end.
    ema = {"use_ema": True, "ema_momentum": t.ema_momentum} if t.weight_averaging == "ema" else {}
    optimizer = (keras.optimizers.AdamW(lr, weight_decay=t.weight_decay, **ema) if t.weight_decay
                 else keras.optimizers.Adam(lr, **ema))
    model.compile(
        optimizer=optimizer,
        # Label smoothing pulls the targets to eps/2 and 1 - eps/2: a penalty on over-confident logits
        # (Szegedy et al. 2016; Mueller et al., "When does label smoothing help?", NeurIPS 2019).
        loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.train.label_smoothing),
        metrics=[
            keras.metrics.AUC(name="auc"),
            keras.metrics.AUC(curve="PR", name="auc_pr"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=resolve_jit(cfg.train.jit_compile),
    )


@dataclass(frozen=True)
class RunSpec:
    """How the MLflow run of one training opens and ends. `pneumo train` takes the defaults; a tuning trial
    names its experiment, run and parent, tags it, learns its id as soon as it exists (`on_started`: a sweeper
    can then close it if the worker dies), and passes the exception a pruned trial raises (`stop_exceptions`:
    such a run ends FINISHED and the exception propagates)."""

    experiment: str | None = None  # default: the experiment file's name
    name: str | None = None  # default: the experiment file's stem and the start time
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    on_started: Callable[[str], None] | None = None
    stop_exceptions: tuple[type[BaseException], ...] = ()
    version_tags: Callable | None = None  # validation -> more tags the registered version is created with


@dataclass
class Setup:
    """Everything a fit needs, decided before the MLflow run opens."""

    cfg: Config  # resolved: names the data folder really used
    data_dir: Path
    manifest: dict
    model: keras.Model
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset
    steps: int
    global_batch: int
    replicas: int
    learning_rate: float
    precision: str


@dataclass
class OpenRun:
    run_id: str
    backup: Path  # BackupAndRestore's folder, with the run id for a resumed run
    resumed: bool


def train(cfg: Config, data_dir: str | Path | None = None, *, tracking_uri: str | None = None,
          run: RunSpec = RunSpec(), callbacks: list | None = None, register_as: str | None = None,
          config_file: str | Path | None = None, verbose: int = 2) -> TrainResult:
    """Train one model and log it as one MLflow run (nested under `run.parent_run_id` when given); register it
    as `register_as` when given. An exception in `run.stop_exceptions` ends the run FINISHED and propagates;
    any other ends it FAILED, Ctrl-C (or any exception raised while a stop is under way) ends it KILLED."""
    setup = prepare(cfg, data_dir)
    with training_run(setup, run, tracking_uri, config_file) as opened:
        if not opened.resumed:
            log_inputs(setup, config_file)
        history, stats = fit(setup, opened, callbacks, verbose)
        candidate = make_candidate(setup.model, setup.cfg, setup.data_dir, setup.manifest,
                                   with_shift=setup.cfg.train.shift_battery, history=history,
                                   register_as=register_as, log_network=setup.cfg.train.log_model,
                                   version_tags=run.version_tags)
        return _result(setup, opened.run_id, history, stats, candidate)


def prepare(cfg: Config, data_dir: str | Path | None) -> Setup:
    """Precision, strategy, data and the compiled model: no MLflow run yet."""
    data_dir = Path(data_dir or cfg.data.dir)
    cfg = cfg.with_values({"data.dir": str(data_dir)})  # the resolved config names the data really used
    check_consistency(cfg)  # a trial's sampled values too, not only the experiment file
    shift.check_held_out(cfg.train.shift_held_out)
    manifest = load_manifest(data_dir)
    tcfg = cfg.train
    configure_gpus()  # before TensorFlow's first op: memory growth, so workers can share a GPU
    check_backend(tcfg.backend)
    keras.utils.set_random_seed(tcfg.seed)
    precision = apply_precision(tcfg.precision)
    strategy = choose_strategy(tcfg.devices)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.data.batch_size * replicas
    lr = scaled_learning_rate(tcfg.learning_rate, replicas, tcfg.lr_scale)
    with_meta = cfg.model.metadata_inputs
    train_ds = train_dataset(data_dir, cfg.data, seed=tcfg.seed, with_meta=with_meta,
                             balance=tcfg.class_weight == "oversample", batch_size=global_batch)
    val_count = manifest["splits"]["val"]["count"]
    val_batch = eval_batch_size(val_count, global_batch, replicas)
    val_ds = eval_dataset(data_dir, "val", val_batch, with_meta=with_meta, verify=False)
    # The validation set's batch count is declared (last partial batch included): without it Keras 3 warns
    # that the finite validation set "ran out of data". Declared as the dataset's cardinality rather than
    # `validation_steps`: with validation_steps Keras keeps one iterator across epochs, and under a
    # distribution strategy its model build takes one batch from it before each validation, so epoch 2
    # found it exhausted (StopIteration); with a known cardinality each validation gets a fresh iterator.
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(math.ceil(val_count / val_batch)))
    steps = tcfg.steps_per_epoch or max(1, manifest["splits"]["train"]["count"] // global_batch)
    with strategy.scope():
        model = build_model(cfg.model, cfg.augment, manifest["image_size"], seed=tcfg.seed)
        compile_model(model, cfg, lr, total_steps=steps * tcfg.epochs, steps_per_epoch=steps)
    return Setup(cfg=cfg, data_dir=data_dir, manifest=manifest, model=model, train_ds=train_ds, val_ds=val_ds,
                 steps=steps, global_batch=global_batch, replicas=replicas, learning_rate=lr, precision=precision)


def _run_in_store(run_id: str, uri: str) -> bool:
    """Whether the tracking store at `uri` holds run `run_id` (other errors, e.g. an unreachable server, raise)."""
    try:
        mlflow.MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


@contextlib.contextmanager
def training_run(setup: Setup, spec: RunSpec, tracking_uri: str | None, config_file: str | Path | None):
    """The MLflow run's lifecycle, apart from what happens in it: open (or resume the interrupted run of the
    same command), then end it FINISHED, FAILED or KILLED by how the body ends (see `train`)."""
    cfg = setup.cfg
    uri = tracking.resolve_tracking_uri(tracking_uri)
    exp_id = tracking.ensure_experiment(spec.experiment or cfg.name, uri)
    backup = anchored_path(cfg.train.checkpoint_dir) / run_key(cfg, setup.manifest["digest"], spec.name)
    previous = backup / "mlflow_run_id"
    resume_id = previous.read_text().strip() if previous.exists() else None
    if resume_id and not _run_in_store(resume_id, uri):
        # The checkpoint's run lives in another store (the same command against another --tracking-uri, or a
        # store since deleted): its state is not this store's run to continue, so it is set aside, not resumed.
        print(f"note: the checkpoint in {backup} belongs to MLflow run {resume_id}, which {tracking.masked(uri)} "
              "does not hold: starting a new run", file=sys.stderr)
        shutil.rmtree(backup, ignore_errors=True)
        resume_id = None
    # `pneumo train` runs get a readable name, the experiment file's stem and the start time (the run key
    # above stays name-free, so an interrupted run still resumes); trials pass their own names.
    display = spec.name or f"{Path(config_file).stem if config_file else cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking.enable_system_metrics()
    run = mlflow.start_run(run_id=resume_id, experiment_id=None if resume_id else exp_id,
                           run_name=spec.name if resume_id else display,
                           parent_run_id=None if resume_id else spec.parent_run_id,
                           tags={**tracking.source_tags(), **spec.tags}, log_system_metrics=True)
    run_id = run.info.run_id
    try:
        if spec.on_started:
            spec.on_started(run_id)
        backup.mkdir(parents=True, exist_ok=True)
        previous.write_text(run_id)
        yield OpenRun(run_id=run_id, backup=backup, resumed=resume_id is not None)
    except spec.stop_exceptions:
        shutil.rmtree(backup, ignore_errors=True)
        mlflow.end_run("FINISHED")
        raise
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        # Raised while a stop was under way, this exception took the stop's place (pipeline/stopping.py): the
        # run was stopped, not failed, and the stop goes on up.
        mlflow.end_run("KILLED" if stop_pending() else "FAILED")
        raise_if_stopped()
        raise
    shutil.rmtree(backup, ignore_errors=True)  # finished: the next identical command starts a new run
    mlflow.end_run("FINISHED")


def log_inputs(setup: Setup, config_file: str | Path | None) -> None:
    """Parameters, the dataset input and the configs, once per run (a resumed run has them)."""
    cfg = setup.cfg
    mlflow.log_params({k: str(v) for k, v in cfg.flat().items()})
    mlflow.log_params({"data.image_size": setup.manifest["image_size"], "replicas": setup.replicas,
                       "global_batch_size": setup.global_batch, "effective_learning_rate": setup.learning_rate,
                       "precision_policy": setup.precision})
    tracking.log_dataset(setup.manifest, setup.data_dir)
    mlflow.log_dict(json.loads(json.dumps(cfg.flat(), default=str)), "config/resolved.json")
    mlflow.log_dict({"space": cfg.tune.space}, "config/search_space.json")
    if config_file:
        mlflow.log_artifact(str(config_file), "config")


def fit(setup: Setup, opened: OpenRun, callbacks: list | None, verbose: int) -> tuple[dict, EpochStats]:
    """Keras' fit with the project's callbacks (backup, per-epoch stats, early stopping, LR plateau)."""
    tcfg, model = setup.cfg.train, setup.model
    mlflow.log_metric("input_capacity_images_per_s", input_capacity(setup.train_ds), run_id=opened.run_id)
    stats = EpochStats(setup.steps * setup.global_batch, opened.run_id)
    cbs = [keras.callbacks.BackupAndRestore(str(opened.backup / "state")), stats]
    swa = (StochasticWeightAveraging(tcfg.epochs - tcfg.swa_epochs, opened.backup / "swa", setup.train_ds,
                                     setup.steps) if tcfg.weight_averaging == "swa" else None)
    if swa is not None:  # first: its snapshot of an epoch is on disk before the backup records it
        cbs.insert(0, swa)
    if tcfg.weight_averaging == "ema":
        # Validation and every callback after this one see the average; training goes on from the raw weights.
        # After the backup, which must record the raw weights beside their average for a resume; before early
        # stopping, whose best weights are then the average's.
        cbs.insert(1, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if tcfg.early_stopping_patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", restore_best_weights=True,
                                                 patience=tcfg.early_stopping_patience))
    if tcfg.lr_plateau_patience:
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5,
                                                     patience=tcfg.lr_plateau_patience))
    fitted = model.fit(setup.train_ds, validation_data=setup.val_ds, epochs=tcfg.epochs, steps_per_epoch=setup.steps,
                       class_weight=class_weights(setup.manifest, tcfg.class_weight), callbacks=cbs + (callbacks or []),
                       verbose=verbose)
    if swa is not None:  # which epochs the model holds the mean of (a resumed run's earlier epochs included)
        mlflow.set_tag("swa_averaged_epochs", ",".join(str(e + 1) for e in swa.averaged_epochs) or "none")
    if tcfg.weight_averaging == "ema":
        # Keras averages the trainable weights only: the batch-norm statistics were gathered for the raw weights,
        # and on Kermany the mismatch cost up to 0.08 of validation log loss (README, weight averaging). SWA's
        # recompute, one pass of the training data, after early stopping has put the best epoch's average back.
        recompute_batch_norm(model, setup.train_ds, setup.steps)
    # XLA may have been switched off by layers that do not support it: log what really ran.
    mlflow.set_tag("jit_compile_effective", str(bool(getattr(model, "jit_compile", False))))
    mlflow.set_tag("keras_backend", keras.backend.backend())
    return {k: [float(v) for v in vs] for k, vs in fitted.history.items()}, stats


def _result(setup: Setup, run_id: str, history: dict, stats: EpochStats, candidate: LoggedCandidate) -> TrainResult:
    v = candidate.validation
    best_val_auc = max(history.get("val_auc", [float("nan")]))
    mlflow.log_metric("best_val_auc", best_val_auc)
    mlflow.set_tag("mlflow.note.content", _description(v.metrics, best_val_auc, stats, setup.manifest))
    return TrainResult(run_id=run_id, history=history, val_metrics=v.metrics, threshold=v.threshold,
                       best_val_auc=best_val_auc, epochs=len(history.get("loss", [])),
                       images_per_s=float(np.median(stats.rates)) if stats.rates else float("nan"),
                       model=setup.model, model_uri=candidate.model_uri, model_version=candidate.version,
                       jit_compile=bool(getattr(setup.model, "jit_compile", False)), precision=setup.precision,
                       temperature=v.temperature, val_ece=v.ece[0], val_ece_calibrated=v.ece[1],
                       val_ece_heldout=v.ece_heldout,
                       shift_metrics=v.shift_metrics())


def _description(m: dict, best_val_auc: float, stats: EpochStats, manifest: dict) -> str:
    return (f"val AUC {metrics.fmt_metric_ci(m, 'auc')} (best epoch {metrics.fmt(best_val_auc)}); "
            f"accuracy {metrics.fmt(m['accuracy'])} vs majority baseline {metrics.fmt(m['majority_baseline_accuracy'])}; "
            f"sensitivity {metrics.fmt(m['sensitivity'])}, specificity {metrics.fmt(m['specificity'])} at threshold "
            f"{metrics.fmt(m['threshold'])}; {np.median(stats.rates) if stats.rates else 0:.0f} img/s; "
            f"dataset {manifest['digest'][:12]}")


def summary_table(result: TrainResult) -> str:
    m = result.val_metrics
    rows = [
        ("run", result.run_id),
        ("epochs", str(result.epochs)),
        ("images/s (median epoch)", f"{result.images_per_s:.1f}"),
        ("precision policy", result.precision),
        ("XLA (effective)", str(result.jit_compile)),
        ("threshold (validation)", f"{result.threshold:.3f} (on calibrated probabilities)"),
        ("temperature (validation)", f"{result.temperature:.3f}"),
        ("ECE (validation)", f"{result.val_ece:.4f} -> {result.val_ece_calibrated:.4f} calibrated (in-sample), "
                             f"{result.val_ece_heldout:.4f} held out (cross-fit over patients)"),
        *([("val AUC under shift: mean / worst", f"{result.shift_metrics['val_auc_shift_mean']:.4f} / "
                                                 f"{result.shift_metrics['val_auc_shift_min']:.4f}")]
          if result.shift_metrics else []),
        ("model", result.model_uri or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return metrics.format_table(m) + "\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

