"""One training run: precision, strategy, data, callbacks, validation metrics, MLflow logging.

`train()` is what `pneumo train` runs and what every Optuna trial runs. The run is resumable: Keras'
BackupAndRestore keeps the state of an interrupted fit under `train.checkpoint_dir/<run key>`, together with the
MLflow run id, so running the same command again continues the same MLflow run from the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
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
from pipeline.evaluate import metrics as ev
from pipeline.evaluate import plots, shift
from pipeline.evaluate.scoring import predict_split
from pipeline.net.calibration import apply_temperature, expected_calibration_error, fit_temperature, nll
from pipeline.net.devices import configure_gpus, resolve_jit
from pipeline.net.model import apply_precision, build_model

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
    val_ece_calibrated: float = float("nan")

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


def compile_model(model: keras.Model, cfg: Config, lr: float, total_steps: int = 0) -> None:
    if cfg.train.lr_schedule == "cosine":
        # Cosine decay to 0 over the whole run (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts).
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    optimizer = (keras.optimizers.AdamW(lr, weight_decay=cfg.train.weight_decay) if cfg.train.weight_decay
                 else keras.optimizers.Adam(lr))
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


def train(cfg: Config, data_dir: str | Path | None = None, *, tracking_uri: str | None = None,
          experiment: str | None = None, run_name: str | None = None, parent_run_id: str | None = None,
          tags: dict | None = None, callbacks: list | None = None, register_as: str | None = None,
          config_file: str | Path | None = None, verbose: int = 2,
          on_run_started: Callable[[str], None] | None = None,
          stop_exceptions: tuple[type[BaseException], ...] = ()) -> TrainResult:
    """Train one model and log it as one MLflow run (nested under `parent_run_id` when given).

    `on_run_started(run_id)` is called as soon as the run exists (a tuning trial stores the id so a sweeper
    can close the run if the worker dies). An exception in `stop_exceptions` (a pruned trial) ends the run
    FINISHED and propagates; any other ends it FAILED, Ctrl-C ends it KILLED.
    """
    data_dir = Path(data_dir or cfg.data.dir)
    cfg = cfg.with_values({"data.dir": str(data_dir)})  # the resolved config names the data really used
    check_consistency(cfg)  # a trial's sampled values too, not only the experiment file
    manifest = load_manifest(data_dir)
    size = manifest["image_size"]
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
    val_batch = eval_batch_size(manifest["splits"]["val"]["count"], global_batch, replicas)
    val_ds = eval_dataset(data_dir, "val", val_batch, with_meta=with_meta, verify=False)
    steps = tcfg.steps_per_epoch or max(1, manifest["splits"]["train"]["count"] // global_batch)

    with strategy.scope():
        model = build_model(cfg.model, cfg.augment, size, seed=tcfg.seed)
        compile_model(model, cfg, lr, total_steps=steps * tcfg.epochs)

    uri = tracking.resolve_tracking_uri(tracking_uri)
    exp_id = tracking.ensure_experiment(experiment or cfg.name, uri)
    key = run_key(cfg, manifest["digest"], run_name)
    backup = Path(tcfg.checkpoint_dir) / key
    previous = backup / "mlflow_run_id"
    resume_id = previous.read_text().strip() if previous.exists() else None
    # `pneumo train` runs get a readable name, the experiment file's stem and the start time (the run key
    # above stays name-free, so an interrupted run still resumes); trials pass their own names.
    display = run_name or f"{Path(config_file).stem if config_file else cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking.enable_system_metrics()
    run = mlflow.start_run(run_id=resume_id, experiment_id=None if resume_id else exp_id,
                           run_name=run_name if resume_id else display,
                           parent_run_id=None if resume_id else parent_run_id,
                           tags={**tracking.source_tags(), **(tags or {})}, log_system_metrics=True)
    run_id = run.info.run_id
    try:
        if on_run_started:
            on_run_started(run_id)
        backup.mkdir(parents=True, exist_ok=True)
        previous.write_text(run_id)
        if not resume_id:
            mlflow.log_params({k: str(v) for k, v in cfg.flat().items()})
            mlflow.log_params({"data.image_size": size, "replicas": replicas,
                               "global_batch_size": global_batch, "effective_learning_rate": lr,
                               "precision_policy": precision})
            tracking.log_dataset(manifest, data_dir)
            mlflow.log_dict(json.loads(json.dumps(cfg.flat(), default=str)), "config/resolved.json")
            mlflow.log_dict({"space": cfg.tune.space}, "config/search_space.json")
            if config_file:
                mlflow.log_artifact(str(config_file), "config")
        capacity = input_capacity(train_ds)
        mlflow.log_metric("input_capacity_images_per_s", capacity, run_id=run_id)
        stats = EpochStats(steps * global_batch, run_id)
        cbs = [keras.callbacks.BackupAndRestore(str(backup / "state")), stats]
        if tcfg.early_stopping_patience:
            cbs.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", restore_best_weights=True,
                                                     patience=tcfg.early_stopping_patience))
        if tcfg.lr_plateau_patience:
            cbs.append(keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5,
                                                         patience=tcfg.lr_plateau_patience))
        cbs += callbacks or []
        # The validation set's batch count is declared (last partial batch included): without it Keras 3 warns
        # that the finite validation set "ran out of data". Declared as the dataset's cardinality rather than
        # `validation_steps`: with validation_steps Keras keeps one iterator across epochs, and under a
        # distribution strategy its model build takes one batch from it before each validation, so epoch 2
        # found it exhausted (StopIteration); with a known cardinality each validation gets a fresh iterator.
        val_steps = math.ceil(manifest["splits"]["val"]["count"] / val_batch)
        val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(val_steps))
        fit = model.fit(train_ds, validation_data=val_ds, epochs=tcfg.epochs, steps_per_epoch=steps,
                        class_weight=class_weights(manifest, tcfg.class_weight), callbacks=cbs, verbose=verbose)
        history = {k: [float(v) for v in vs] for k, vs in fit.history.items()}
        # XLA may have been switched off by layers that do not support it: log what really ran.
        jit = bool(getattr(model, "jit_compile", False))
        mlflow.set_tag("jit_compile_effective", str(jit))
        mlflow.set_tag("keras_backend", keras.backend.backend())
        result = _finish_run(model, cfg, data_dir, manifest, history, stats, run_id, register_as)
        result.jit_compile, result.precision = jit, precision
        shutil.rmtree(backup, ignore_errors=True)  # finished: the next identical command starts a new run
        mlflow.end_run("FINISHED")
        return result
    except stop_exceptions:
        shutil.rmtree(backup, ignore_errors=True)
        mlflow.end_run("FINISHED")
        raise
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise


def _finish_run(model, cfg: Config, data_dir: Path, manifest: dict, history: dict, stats: EpochStats,
                run_id: str, register_as: str | None) -> TrainResult:
    """Validation metrics at a threshold chosen on validation, plots, and the model."""
    # Under MirroredStrategy Keras 3.15's predict_on_batch runs the whole batch on every replica and concatenates
    # the results (2 replicas: twice the predictions); the same layers as a model built outside the strategy
    # predict each record once.
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow backend only
    scorer = tracking.inference_copy(model) if strategy and strategy.num_replicas_in_sync > 1 else model
    y, p, info = predict_split(scorer, data_dir, "val", cfg.data.batch_size, with_meta=cfg.model.metadata_inputs)
    t_shift = time.perf_counter()
    shifted = shift_battery(scorer, cfg, data_dir) if cfg.train.shift_battery else None
    if shifted is not None:  # its cost is paid once per trial: logged so a study's budget can be planned
        mlflow.log_metric("shift_battery_s", time.perf_counter() - t_shift)
    threshold, threshold_note = decide_threshold(cfg, y, p, shifted)
    # Calibration, on validation only: everything below (metrics, plots, the stored threshold) is on the
    # calibrated scale, the one model_store.LoadedModel.probabilities reports.
    p_raw = p
    temperature, p, threshold, ece = calibrate_on_validation(y, p_raw, threshold)
    metrics = ev.compute_metrics(y, p, threshold, n_boot=cfg.train.bootstrap, seed=cfg.train.seed,
                                 clusters=info["patient_id"])
    # Plain binary cross-entropy of the final network on the whole val split (no label smoothing, no class
    # weights, before calibration: the temperature is fitted on this split, so its NLL would flatter it):
    # `tune.metric = "val_loss"` and the promotion rank by it (logged as final_val_loss).
    metrics["loss"] = nll(y, p_raw)
    groups = {"view_position": info["view_position"], "sex": info["sex"],
              "age_band": [ev.age_band(a) for a in info["age"]]}
    subgroups = ev.subgroup_metrics(y, p, threshold, groups, n_boot=200, seed=cfg.train.seed,
                                   clusters=info["patient_id"])
    best_val_auc = max(history.get("val_auc", [float("nan")]))
    mlflow.log_metrics({f"final_val_{k}": float(v) for k, v in metrics.items()
                        if isinstance(v, int | float) and np.isfinite(v)})
    mlflow.log_metric("best_val_auc", best_val_auc)
    mlflow.log_metric("threshold", threshold)
    mlflow.set_tag("threshold", repr(float(threshold)))  # full precision: a case at the threshold must not flip
    mlflow.set_tag("threshold_policy", threshold_note)
    if shifted is not None:
        mlflow.log_metrics({k: float(v) for k, v in shifted.metrics().items() if np.isfinite(v)})
        mlflow.log_text(shift.format_table(shifted), "evaluation/val_shift.txt")
    mlflow.log_dict({"metrics": metrics, "subgroups": subgroups}, "evaluation/val.json")
    mlflow.log_text(ev.format_table(metrics, subgroups), "evaluation/val.txt")
    figures = {
        "history.png": plots.plot_history(history),
        "val_roc.png": plots.plot_roc(y, p, title="ROC (validation)"),
        "val_pr.png": plots.plot_pr(y, p, title="Precision-recall (validation)"),
        "val_confusion.png": plots.plot_confusion(y, p, threshold),
        "val_calibration.png": plots.plot_calibration(y, p_raw, y_prob_calibrated=p, temperature=temperature),
    }
    if shifted is not None:
        figures["val_shift.png"] = shift.plot_shift(shifted)
    for name, fig in figures.items():  # object-API figures (pipeline.evaluate.plots): no pyplot, nothing to close
        mlflow.log_figure(fig, f"plots/{name}")
    mlflow.set_tag("mlflow.note.content", _description(metrics, best_val_auc, stats, manifest))
    info_model = version = None
    if cfg.train.log_model:
        info_model = tracking.log_keras_model(model, manifest["image_size"], cfg.model.metadata_inputs,
                                              registered_model_name=register_as)
        version = getattr(info_model, "registered_model_version", None)
    rate = float(np.median(stats.rates)) if stats.rates else float("nan")
    return TrainResult(run_id=run_id, history=history, val_metrics=metrics, threshold=threshold,
                       best_val_auc=best_val_auc, epochs=len(history.get("loss", [])), images_per_s=rate,
                       model=model, model_uri=info_model.model_uri if info_model else None,
                       model_version=str(version) if version is not None else None,
                       temperature=temperature, val_ece=ece[0], val_ece_calibrated=ece[1],
                       shift_metrics=shifted.metrics() if shifted is not None else {})


def calibrate_on_validation(y, p_raw, threshold_raw: float) -> tuple[float, np.ndarray, float, tuple]:
    """Temperature scaling fitted on the validation split (pipeline.net.calibration), logged to the active run.

    -> (T, calibrated probabilities, the threshold on the calibrated scale, (ECE before, ECE after)).
    Temperature scaling is monotone, so apply_temperature(threshold_raw, T) makes exactly the decisions the
    raw threshold made on the raw scale. A validation split with one class has no finite optimum: T = 1."""
    try:
        temperature = fit_temperature(y, p_raw)
    except ValueError:
        temperature = 1.0
    p_cal = apply_temperature(p_raw, temperature)
    threshold = float(apply_temperature(threshold_raw, temperature))
    ece = (expected_calibration_error(y, p_raw), expected_calibration_error(y, p_cal))
    mlflow.log_metrics({"temperature": temperature, "val_ece": ece[0], "val_ece_calibrated": ece[1],
                        "threshold_uncalibrated": float(threshold_raw)})
    mlflow.set_tag("temperature", repr(float(temperature)))
    return temperature, p_cal, threshold, ece



def shift_battery(model, cfg: Config, data_dir: Path) -> shift.ShiftResult:
    """The model's AUC under the shift battery on validation's fixed subset (pipeline/evaluate/shift.py)."""
    sample = shift.load_sample(data_dir, "val", cfg.train.shift_max_images, cfg.train.shift_seed,
                               with_meta=cfg.model.metadata_inputs)
    return shift.score_battery(model, sample, seed=cfg.train.shift_seed, batch_size=cfg.data.batch_size)


def decide_threshold(cfg: Config, y, p, shifted: shift.ShiftResult | None) -> tuple[float, str]:
    """THE place the stored operating threshold is decided, on validation only -> (threshold, how).

    The threshold is on the model's raw probability scale; a calibration step that rescales probabilities must
    move it with them (a monotone map keeps the same decisions)."""
    policy = cfg.train.threshold_policy
    if policy == "robust":
        if shifted is None:
            raise ValueError("train.threshold_policy = 'robust' needs the shift battery (train.shift_battery)")
        conditions = [shifted.clean, *shifted.probabilities.values()]
        threshold, worst_j = shift.robust_threshold(shifted.labels, conditions)
        return threshold, f"robust (worst-case Youden J {worst_j:.3f} over clean + {len(conditions) - 1} shifts)"
    if policy == "sensitivity":
        return (ev.choose_threshold(y, p, cfg.train.target_sensitivity),
                f"sensitivity >= {cfg.train.target_sensitivity:g} on validation")
    return ev.choose_threshold(y, p), "youden (max J on validation)"


def _description(m: dict, best_val_auc: float, stats: EpochStats, manifest: dict) -> str:
    return (f"val AUC {ev.fmt_metric_ci(m, 'auc')} (best epoch {ev.fmt(best_val_auc)}); "
            f"accuracy {ev.fmt(m['accuracy'])} vs majority baseline {ev.fmt(m['majority_baseline_accuracy'])}; "
            f"sensitivity {ev.fmt(m['sensitivity'])}, specificity {ev.fmt(m['specificity'])} at threshold "
            f"{ev.fmt(m['threshold'])}; {np.median(stats.rates) if stats.rates else 0:.0f} img/s; "
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
        ("ECE (validation)", f"{result.val_ece:.4f} -> {result.val_ece_calibrated:.4f} calibrated"),
        *([("val AUC under shift: mean / worst", f"{result.shift_metrics['val_auc_shift_mean']:.4f} / "
                                                 f"{result.shift_metrics['val_auc_shift_min']:.4f}")]
          if result.shift_metrics else []),
        ("model", result.model_uri or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return ev.format_table(m) + "\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

