"""Experiment TOML -> frozen dataclasses, with checked `--set key=value` overrides.

Like nanoGPT's configurator, a key that does not exist or a value of the wrong type is an error naming the key:
`--set model.block=4` fails loudly instead of silently training the default. The resolved config is flattened
(`flat()`) into MLflow params, so every run can be re-run from its params.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from pipeline.errors import InputError


class ConfigError(InputError):
    """A one-line reason why an experiment file or override is unusable."""


@dataclass(frozen=True)
class DataConfig:
    dir: str = "tfrecords/synth"  # converter output folder (relative to the working directory)
    # Image folders: regex whose one group is the patient id in a file name, read by `pneumo convert --config`
    # (the recipe carries its rule: without one every image is its own patient and patients leak).
    patient_regex: str = ""
    batch_size: int = 32
    cache: str = "auto"  # auto | memory | none | <file path prefix>
    cache_budget_mb: int = 2048  # `auto` caches in memory when the serialised split fits this budget
    shuffle_buffer: int = 0  # 0 = the whole split (a true shuffle per epoch)
    deterministic: bool = False  # True: fixed element order (reproducible, a little slower)
    interleave_cycle: int = 4  # shards read at once


@dataclass(frozen=True)
class ModelConfig:
    blocks: int = 3  # conv blocks after the stem
    filters: int = 32  # filters of the first block
    growth: float = 2.0  # filter multiplier per block
    max_filters: int = 0  # cap on any block's filters; 0 = no cap (the seed: 32, 64, 128, 128)
    kernel_size: int = 3
    convs_per_block: int = 1
    padding: str = "same"  # same | valid (the seed's Keras default); residual blocks need same
    stem_stride: int = 4  # strided stem: full-resolution layers are the expensive ones (ConvNeXt-like 4)
    stem_filters: int = 32  # 0 = no stem; its kernel is 2*stem_stride+1
    batch_norm: bool = True
    residual: bool = False
    dropout: float = 0.2
    dense_units: int = 64  # 0 = no hidden dense layer
    pooling: str = "gap"  # gap (global average) | flatten (the seed)
    metadata_inputs: bool = False  # view position, sex, age fed beside the image into the penultimate layer
    # Per-image standardisation (zero mean, unit variance per image) instead of the fixed [-1, 1] map: removes
    # a film's overall exposure and contrast before the first conv (pipeline/net/model.py).
    standardize: bool = False
    # Where the standardisation takes its mean and std: "image" (every pixel, as tf.image's), "unsaturated" (every
    # pixel but black and white ones: a white frame, letterbox bars or a zoomed-out film's black margin leave
    # them alone) or "center" (those pixels in the central half of each side only). Measured on the proxy:
    # README, "A proxy for travels" (pipeline/net/augment.py: PerImageStandardization). Read only with
    # standardize = true, so turning that off alone is enough (a backbone needs it off).
    standardize_stats: str = "image"
    # What the standardisation outputs for black and white pixels: "keep" (their standardised value, which for a
    # black margin is 2-4 standard deviations below the image's mean) or "zero" (the image's mean: flat, like the
    # fixed map's -1, but never extreme). Read only with standardize = true. On the proxy "zero" lowered the
    # held-out AUC and lost more specificity under zoom-out (README, "A proxy for travels"): "keep" is the default.
    standardize_saturated: str = "keep"
    # Per-image histogram equalization instead (pipeline/net/augment.py: HistogramEqualization): a strictly
    # increasing grey-scale change (exposure, contrast, gamma) no longer reaches the convs, up to clipping and
    # 8-bit rounding; black margins and a white frame stay out of the ranks. Measured on the proxy: README,
    # "A proxy for travels".
    equalize: bool = False
    # A keras.applications network in place of the stem and blocks (pipeline/net/backbone.py): none |
    # densenet121 | efficientnetb0. Its weights come from a local file the user downloads once (Keras' ImageNet
    # "notop" .h5: hospitals are often offline, so nothing is fetched at training time); "" = random weights.
    backbone: str = "none"
    backbone_weights: str = ""


@dataclass(frozen=True)
class AugmentConfig:
    # Strengths in Keras' units: rotation as a fraction of a full turn, zoom/translation as a fraction of size.
    rotation: float = 0.02
    zoom: float = 0.1
    translation: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.1
    horizontal_flip: bool = False  # off: chest anatomy is not mirror-symmetric (heart on the left)
    # Acquisition-style intensity augmentation (pipeline/net/augment.py; 0 = off): gamma = exp(U(-g, g)) per image;
    # noise: Gaussian with a per-image std U(0, noise) in [0, 1] grey units; blur: a per-image blend weight
    # U(-b, b) towards a Gaussian-blurred copy (negative: unsharp-mask sharpening).
    gamma: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    xla_safe: bool = False  # one XLA-compilable RandomAffine instead of Keras' rotation/zoom/translation layers


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    steps_per_epoch: int = 0  # 0 = one pass over the train split
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # Weight averaging: "ema" keeps an exponential moving average of the weights (Polyak & Juditsky 1992; Keras
    # optimizers' use_ema) beside the weights being trained; validation, early stopping and the saved model see
    # the average (its batch-norm statistics recomputed at the end), and training goes on from the raw weights
    # (Keras' SwapEMAWeights). "swa": stochastic weight averaging, the mean of the weights at the end of each of
    # the last `swa_epochs` epochs, trained at `swa_lr_fraction` of the learning rate, with batch-norm
    # statistics recomputed (pipeline/net/weight_averaging.py). "none": the last step's weights.
    weight_averaging: str = "none"
    ema_momentum: float = 0.99
    swa_epochs: int = 4
    swa_lr_fraction: float = 0.2
    class_weight: str = "balanced"  # balanced (loss weights) | oversample (50/50 batches) | none
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    # auto | true | false (TOML booleans too): auto = XLA on a GPU, off on the CPU (pipeline/net/devices.py);
    # XLA needs augment.xla_safe = true when rotation/zoom/translation are on (Keras' layers have no XLA kernel)
    jit_compile: str = "auto"
    # tensorflow | jax: the Keras backend; chosen before keras is imported (pipeline/cli.py sets KERAS_BACKEND)
    backend: str = "tensorflow"
    devices: str = "one"  # one | all (MirroredStrategy over all GPUs)
    lr_scale: str = "linear"  # how LR scales with replicas under devices=all: linear | sqrt | none
    early_stopping_patience: int = 4  # epochs without val AUC gain; 0 = off
    lr_plateau_patience: int = 2  # epochs before LR halves on a val AUC plateau; 0 = off
    target_sensitivity: float = 0.0  # the sensitivity `threshold_policy = "sensitivity"` aims at on validation
    # How the stored operating threshold is chosen, on validation only: youden (max J on the clean split),
    # sensitivity (the highest threshold reaching target_sensitivity), robust (max tail-average J over the clean
    # split and the shift battery; needs shift_battery = true). pipeline/study/candidate.py:decide_threshold.
    threshold_policy: str = "youden"
    # The robust policy (pipeline/evaluate/shift.py:robust_threshold): perturbations with an AUC below the floor
    # are left out; the objective is the mean of the worst `robust_tail` fraction of the conditions' J (1 = the
    # mean); thresholds below the clean-sensitivity floor are not eligible.
    robust_auc_floor: float = 0.6
    robust_tail: float = 0.25
    robust_min_sensitivity: float = 0.0
    label_smoothing: float = 0.0  # binary cross-entropy label smoothing, in [0, 0.5)
    lr_schedule: str = "constant"  # constant (ReduceLROnPlateau may halve it) | cosine (decay to 0 over epochs)
    # The shift battery (pipeline/evaluate/shift.py) after training, on a fixed subset of validation: val_auc_shift_*.
    shift_battery: bool = True
    shift_max_images: int = 512  # the subset's cap (class-stratified, fixed by shift_seed); 0 = whole split
    shift_seed: int = 0  # fixes the subset and the perturbations' draws: the same images for every trial
    # Battery families held out of selection (pipeline/evaluate/shift.py:FAMILIES): scored and logged as
    # val_auc_heldout_mean/_min, but in no study metric and not in the robust threshold: a simulated second
    # site that nothing was tuned on (benchmarks/generalization.py --study measures what predicts it). Names
    # are checked against the battery by pipeline/evaluate/shift.py:check_held_out, before training starts.
    shift_held_out: list = field(default_factory=list)
    bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    seed: int = 0
    log_model: bool = True
    checkpoint_dir: str = "mlruns/checkpoints"  # BackupAndRestore state, one folder per run key; relative: under
    # the project home, beside the stores (pipeline/stores.py: anchored_path), not the current folder


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 20
    sampler: str = "tpe"  # tpe | random | cmaes | qmc
    pruner: str = "median"  # median | hyperband | none
    seed: int = 0
    # The study objective, also the promotion's ranking: val_auc | val_auc_shift_mean | val_auc_shift_min
    # (maximised) | val_loss (minimised). Shift metrics exist only after training: trials are pruned on the
    # per-epoch val_auc then (pipeline/study/tune.py).
    metric: str = "val_auc"
    startup_trials: int = 5  # random trials before TPE and before the median pruner may prune
    warmup_epochs: int = 1  # epochs before a trial may be pruned
    heartbeat_interval: int = 10  # seconds; a trial silent for 2x this is stale and retried
    max_retries: int = 2
    model_name: str = "pneumonia-cnn"
    space: dict = field(default_factory=dict)  # "section.key" -> {type, low, high, log, step, choices}


@dataclass(frozen=True)
class PromoteConfig:
    """The promotion gate's rule (`pneumo promote --config`; pipeline/promote/gate.py explains each check)."""
    policy: str = "superiority"  # superiority | non_inferiority
    alpha: float = 0.05  # two-sided level of the paired AUC-difference interval (clustered DeLong)
    margin: float = 0.02  # non-inferiority margin on the AUC scale (also for required external sets)
    floor_auc: float = 0.7  # a first champion's AUC lower bound must exceed this (0.7: "acceptable")
    floor_accuracy_margin: float = 0.0  # ... and its accuracy's lower bound the majority baseline by this
    require_external: list = field(default_factory=list)  # external set names that must be non-inferior
    # Reads one test split may answer (promotions, dry runs, `evaluate --split test`) before a fresh split is
    # needed; each decision is taken at level alpha / test_queries (pipeline/evaluate/holdout.py). Recorded by
    # the split's first read. 0 = uncorrected (each decision at alpha): for tests and benchmarks, no guarantee.
    test_queries: int = 20
    bootstrap: int = 2000  # resamples of the paired cluster bootstrap reported beside DeLong
    # K >= 2: `pneumo promote --study` builds one version averaging the study's top K (pipeline/promote/ensemble.py)
    # and gates it; 0 or 1: the best single version. `--ensemble K` on the command line overrides it.
    ensemble: int = 0
    # Test-time augmentation of the promoted candidate: "mild" builds it as the mean over the image and four
    # fixed mild views (pipeline/net/tta.py), with K = 1 too (the best version under the views); its threshold
    # and temperature are fitted on the averaged output, and evaluate, predict and serving score the same views.
    tta: str = "none"


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for every scalar setting (MLflow params); the search space is left out."""
        out: dict[str, Any] = {"name": self.name}
        for section in SECTIONS:
            if section == "promote":  # the gate's rule does not change what a run trains (nor its run key)
                continue
            for f in dataclasses.fields(getattr(self, section)):
                if f.name != "space":
                    out[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return out

    def with_values(self, values: dict[str, Any]) -> Config:
        """A copy with `section.key` values replaced (type-checked, unknown keys refused)."""
        cfg = self
        for key, value in values.items():
            section, name = _split_key(key)
            sub = getattr(cfg, section)
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: _check(key, value)})})
        return cfg


SECTIONS = ("data", "model", "augment", "train", "tune", "promote")
CHOICES = {
    "data.cache": None,  # free-form (path prefix allowed)
    "model.pooling": ("gap", "flatten"),
    "model.standardize_stats": ("image", "unsaturated", "center"),
    "model.standardize_saturated": ("keep", "zero"),
    "model.padding": ("same", "valid"),
    "model.backbone": ("none", "densenet121", "efficientnetb0"),
    "train.class_weight": ("balanced", "oversample", "none"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "train.devices": ("one", "all"),
    "train.jit_compile": ("auto", "true", "false"),
    "train.backend": ("tensorflow", "jax"),
    "train.lr_scale": ("linear", "sqrt", "none"),
    "train.threshold_policy": ("youden", "sensitivity", "robust"),
    "train.weight_averaging": ("none", "ema", "swa"),
    "train.lr_schedule": ("constant", "cosine"),
    "tune.metric": ("val_auc", "val_auc_shift_mean", "val_auc_shift_min", "val_auc_shift_tail", "val_loss"),
    "tune.sampler": ("tpe", "random", "cmaes", "qmc"),
    "tune.pruner": ("median", "hyperband", "none"),
    "promote.policy": ("superiority", "non_inferiority"),
    "promote.tta": ("none", "mild"),
}

INF = float("inf")
# Allowed ranges of numeric keys: (low, high, high_open). `low` is inclusive; `high` is inclusive unless
# high_open. A value outside is an error naming the key, so `--set data.batch_size=0` fails before any work
# instead of deep inside TensorFlow. Checked for files, overrides and every value a search space can propose.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "data.batch_size": (1, INF, False),
    "data.cache_budget_mb": (0, INF, False),
    "data.shuffle_buffer": (0, INF, False),
    "data.interleave_cycle": (1, INF, False),
    "model.blocks": (1, INF, False),
    "model.filters": (1, INF, False),
    "model.growth": (1e-9, INF, False),  # > 0
    "model.max_filters": (0, INF, False),
    "model.kernel_size": (1, INF, False),
    "model.convs_per_block": (1, INF, False),
    "model.stem_stride": (1, INF, False),
    "model.stem_filters": (0, INF, False),
    "model.dropout": (0, 1, True),
    "model.dense_units": (0, INF, False),
    "augment.rotation": (0, 0.5, True),  # fraction of a full turn; half a turn would be upside down
    "augment.zoom": (0, 1, True),  # a zoom or shift by the whole size is not an augmentation
    "augment.translation": (0, 1, True),
    "augment.contrast": (0, 1, True),  # 1 would allow zero contrast
    "augment.brightness": (0, 1, True),
    "train.epochs": (1, INF, False),
    "train.steps_per_epoch": (0, INF, False),
    "train.learning_rate": (1e-12, INF, False),  # > 0
    "train.weight_decay": (0, INF, False),
    "train.ema_momentum": (0, 1, True),
    "train.swa_epochs": (1, INF, False),
    "train.swa_lr_fraction": (1e-9, 1, False),  # > 0: averaging at a learning rate of 0 averages one point
    "train.early_stopping_patience": (0, INF, False),
    "train.lr_plateau_patience": (0, INF, False),
    "train.target_sensitivity": (0, 1, False),
    "train.bootstrap": (0, INF, False),
    "train.seed": (0, INF, False),
    "tune.trials": (1, INF, False),
    "tune.seed": (0, INF, False),
    "tune.startup_trials": (0, INF, False),
    "tune.warmup_epochs": (0, INF, False),
    "tune.heartbeat_interval": (1, INF, False),
    "tune.max_retries": (0, INF, False),
    "augment.gamma": (0, 1, True),  # log-gamma half-range: 1 would allow gamma e^{+-1}, darkening lungs to black
    "augment.noise": (0, 0.5, True),  # noise std in [0, 1] intensity units
    "augment.blur": (0, 1, True),  # blur/sharpen weight; 1 = a full box blur
    "train.label_smoothing": (0, 0.5, True),  # 0.5 would make every label 0.5
    "train.shift_max_images": (0, INF, False),
    "train.robust_auc_floor": (0, 1, False),
    "train.robust_tail": (1e-9, 1, False),  # > 0
    "train.robust_min_sensitivity": (0, 1, False),
    "promote.alpha": (1e-12, 1, True),  # in (0, 1)
    "promote.margin": (0, INF, False),
    "promote.test_queries": (0, INF, False),
    "promote.bootstrap": (0, INF, False),
    "promote.ensemble": (0, INF, False),
}


def _range_text(key: str) -> str:
    low, high, high_open = BOUNDS[key]
    positive = 0 < low < 1e-6  # a tiny inclusive low bound stands for "> 0"
    if high == INF:
        return "> 0" if positive else f">= {low:g}"
    return f"in {'(0' if positive else f'[{low:g}'}, {high:g}{')' if high_open else ']'}"


def check_range(key: str, value: Any) -> None:
    """ConfigError naming key and value when a number is not finite or lies outside BOUNDS."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not math.isfinite(value):  # TOML and `--set` read inf and nan; no key means either (nan slips past `<`)
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    if key not in BOUNDS:
        return
    low, high, high_open = BOUNDS[key]
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ConfigError(f"config key {key!r} must be {_range_text(key)}, got {value!r}")


# String keys that also take a TOML boolean (stored as "true"/"false").
BOOL_OR_WORD = {"train.jit_compile"}


def _section_type(section: str) -> type:
    return get_type_hints(Config)[section]


# Keys an older experiment file may still carry, and what replaced them (a plain "unknown key" would not say).
REMOVED = {f"promote.holdout_{k}": "Thresholdout gave way to a budget of test queries; use promote.test_queries "
           "(pipeline/evaluate/holdout.py)" for k in ("budget", "threshold", "sigma")}


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(SECTIONS)})")
    known = {f.name for f in dataclasses.fields(_section_type(section))}
    if key in REMOVED:
        raise ConfigError(f"config key {key!r} was removed: {REMOVED[key]}")
    if name not in known:
        raise ConfigError(f"unknown config key {key!r} (known in [{section}]: {', '.join(sorted(known))})")
    return section, name


def field_type(key: str) -> type:
    section, name = _split_key(key)
    return get_type_hints(_section_type(section))[name]


def _check(key: str, value: Any) -> Any:
    """Coerce int -> float where a float is expected; otherwise the type must match exactly."""
    want = field_type(key)
    if key in BOOL_OR_WORD and isinstance(value, bool):
        value = str(value).lower()  # `jit_compile = true` as written before "auto" existed
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is not float and want is not dict and type(value) is not want:
        raise ConfigError(f"config key {key!r} wants {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and type(value) is not float:
        raise ConfigError(f"config key {key!r} wants float, got {type(value).__name__} {value!r}")
    if want is dict and not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} wants a table, got {value!r}")
    if want is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"config key {key!r} wants a list of names, got {value!r}")
    check_value(key, value)
    return value


def check_value(key: str, value: Any) -> None:
    """ConfigError naming key and value when it is not one of CHOICES or lies outside BOUNDS."""
    allowed = CHOICES.get(key)
    if allowed and value not in allowed:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}, got {value!r}")
    check_range(key, value)


def check_section(section: str, values) -> None:
    """Every key of one section against CHOICES and BOUNDS: for a section built in code (a test, a notebook, a
    benchmark) rather than read from a file, so a bad value is the same one-line ConfigError either way."""
    for f in dataclasses.fields(values):
        check_value(f"{section}.{f.name}", getattr(values, f.name))


def check_model(m: ModelConfig) -> None:
    """The model section alone: its values and the settings only wrong together. The one check that needs the
    image size (blocks that shrink it to nothing) is pipeline.net.model's."""
    check_section("model", m)
    if m.residual and m.padding != "same":
        raise ConfigError("model.residual needs model.padding = 'same' (the shortcut must match the conv output)")
    if m.backbone_weights and m.backbone == "none":
        raise ConfigError(f"model.backbone_weights = {m.backbone_weights!r} is only read with a model.backbone "
                          f"(it is 'none')")
    for normalisation in ("standardize", "equalize"):
        if m.backbone != "none" and getattr(m, normalisation):
            raise ConfigError(f"model.{normalisation} applies to the project's own CNN; model.backbone = "
                              f"{m.backbone!r} takes its ImageNet input normalisation (--set "
                              f"model.{normalisation}=false)")
    if m.standardize and m.equalize:
        raise ConfigError("model.standardize and model.equalize are two ways to normalise the image: set one")


def check_consistency(cfg: Config) -> None:
    """Settings that are only wrong together (each alone passed `_check`)."""
    check_model(cfg.model)
    t = cfg.train
    if t.threshold_policy == "sensitivity" and not t.target_sensitivity > 0:
        raise ConfigError("train.threshold_policy = 'sensitivity' needs train.target_sensitivity in (0, 1]")
    if t.threshold_policy != "sensitivity" and t.target_sensitivity > 0:
        raise ConfigError(f"train.target_sensitivity = {t.target_sensitivity} is only read by "
                          f"train.threshold_policy = 'sensitivity' (it is {t.threshold_policy!r})")
    if t.threshold_policy == "robust" and not t.shift_battery:
        raise ConfigError("train.threshold_policy = 'robust' needs train.shift_battery = true")
    if cfg.tune.metric.startswith("val_auc_shift") and not t.shift_battery:
        raise ConfigError(f"tune.metric = {cfg.tune.metric!r} needs train.shift_battery = true")
    if t.weight_averaging == "swa" and t.swa_epochs >= t.epochs:
        raise ConfigError(f"train.swa_epochs = {t.swa_epochs} averages the last epochs: it must be below "
                          f"train.epochs = {t.epochs}")
    if t.weight_averaging == "swa" and t.early_stopping_patience:
        raise ConfigError("train.weight_averaging = 'swa' averages the last epochs, which early stopping would "
                          "cut off or replace: set train.early_stopping_patience = 0")
    if t.weight_averaging == "swa" and t.lr_plateau_patience:
        raise ConfigError("train.weight_averaging = 'swa' sets the learning rate of its last epochs: set "
                          "train.lr_plateau_patience = 0")
    if t.lr_schedule == "cosine" and t.lr_plateau_patience:
        raise ConfigError("train.lr_schedule = 'cosine' sets the learning rate itself: set "
                          "train.lr_plateau_patience = 0")


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` with the value parsed as TOML (so `0.01`, `true`, `"gap"`); bare words become strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"override {text!r} is not key=value")
    want = field_type(key)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `gap` or a path
    if want is str and not isinstance(value, str):
        value = raw.strip()
    return key, value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read an experiment file and apply `--set` overrides; every error names the file or key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: experiment file not found") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; a Latin-1 comment or a UTF-16 file from Windows is not
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not an experiment file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    values: dict[str, Any] = {}
    cfg = Config(name=str(raw.pop("name", path.stem)))
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section or key {section!r} (sections: {', '.join(SECTIONS)})")
        for name, value in table.items():
            values[f"{section}.{name}"] = value
    try:
        cfg = cfg.with_values(values)
        cfg = cfg.with_values(dict(parse_override(o) for o in overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    validate_space(cfg.tune.space, where=str(path))
    try:
        check_consistency(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def validate_space(space: dict, where: str = "config") -> None:
    """Each `[tune.space]` entry names a real scalar key and a well-formed distribution."""
    for key, spec in space.items():
        try:
            want = field_type(key)
        except ConfigError as e:
            raise ConfigError(f"{where}: [tune.space] {e}") from None
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"{where}: [tune.space] {key!r} needs type = float | int | categorical")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ConfigError(f"{where}: [tune.space] {key!r} has unknown fields {sorted(unknown)}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: [tune.space] {key!r} needs a non-empty choices list")
            for c in choices:
                _check(key, c)
            continue
        low, high = spec.get("low"), spec.get("high")
        if not isinstance(low, int | float) or not isinstance(high, int | float) or not low < high:
            raise ConfigError(f"{where}: [tune.space] {key!r} needs numbers low < high, got {low!r}, {high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: [tune.space] {key!r} has log = true but low <= 0")
        if spec.get("log") and spec.get("step"):
            raise ConfigError(f"{where}: [tune.space] {key!r} cannot have both log and step")
        for end in (low, high):  # every value the sampler may propose must be a valid setting
            try:
                check_range(key, end)
            except ConfigError as e:
                raise ConfigError(f"{where}: [tune.space] {key!r} low/high: {e}") from None
        if kind == "int" and want is not int:
            raise ConfigError(f"{where}: [tune.space] {key!r} is {want.__name__}, not int")
        if kind == "float" and want is not float:
            raise ConfigError(f"{where}: [tune.space] {key!r} is {want.__name__}, not float")
