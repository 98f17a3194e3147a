"""The shift battery: fixed, seeded acquisition perturbations of the validation split, and a model's AUC under each.

In-distribution validation AUC saturates (Kermany: 0.995-0.998 for every trial) and cannot tell a model that
learnt the lungs from one that learnt the training hospital's look. Each perturbation here is a plausible
difference between hospitals, devices and technicians, at two or more severities:

    exposure, gamma          a darker/brighter film, a different detector response curve
    contrast, window         a flatter image, a narrower display window (clipped tails)
    blur, sharpen            a softer detector; unsharp masking as some devices apply it
    noise                    quantum noise of a lower dose
    jpeg                     re-compression by a PACS export
    zoom_out, crop, translate    another field of view: more body and black margin, a tighter crop, off-centre
    rotate                   a patient not squarely placed
    letterbox, border        a non-square film letterboxed to square; a white frame from a scanned film

Every perturbation maps uint8 (B, H, W, 1) -> uint8 (B, H, W, 1) and changes the image. The ones that draw
random numbers (noise, the sign of a rotation or shift) use stateless ops keyed by (seed, perturbation, image
index), so the same seed gives the same perturbed images in every trial, whatever the batch size. The arithmetic
is keras.ops (the accelerator when there is one); JPEG re-compression is tf.io on the host.

`score_battery` predicts the model over a capped, fixed, stratified subset of the split (`subset_indices`):
it runs after every trial, and ~29 perturbed copies of a 4,000-image RSNA validation split would cost more than
the training epochs; 512 images keep the AUC's standard error near 0.01 at the prevalences we see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

DEFAULT_MAX_IMAGES = 512


class ShiftError(InputError):
    """The battery cannot be scored on this split (e.g. one class only)."""


@dataclass(frozen=True)
class Perturbation:
    name: str  # "<kind>_<severity>", the MLflow metric suffix
    kind: str
    severity: float
    fn: Callable  # (float images in [0, 1] (B, H, W, 1), index of each image (B,), seed) -> float images


# --- the ops (float32 in [0, 1] in, float32 out; clipping and rounding happen once in `apply`) -------------
def _ops():
    from keras import ops

    return ops


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x, sigma: float):
    """Separable Gaussian blur, borders extended by reflection (zero padding would darken the edges)."""
    ops = _ops()
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    x = ops.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], mode="reflect")
    x = ops.conv(x, ops.convert_to_tensor(k.reshape(-1, 1, 1, 1)), padding="valid")
    return ops.conv(x, ops.convert_to_tensor(k.reshape(1, -1, 1, 1)), padding="valid")


def _signs(index, seed: int, salt: int):
    """A +-1 per image, fixed by (seed, salt, image index): rotations and shifts go both ways."""
    h = (np.asarray(index, dtype=np.int64) * 2654435761 + seed * 40503 + salt * 97) % 2**31
    return np.where((h >> 7) % 2 == 0, 1.0, -1.0).astype(np.float32)


def _affine(x, index, seed: int, salt: int, *, angle_deg: float = 0.0, scale: float = 1.0, shift: float = 0.0):
    """Rotate by +-angle, scale content by `scale` (< 1 shows more, with black margins) and shift by +-shift of
    the size, about the image centre; black outside the image (a collimated film)."""
    ops = _ops()
    b, h, w = len(index), x.shape[1], x.shape[2]
    s = _signs(index, seed, salt)
    a = np.deg2rad(angle_deg) * s
    # keras' transform maps an OUTPUT pixel (x, y) to the INPUT pixel (a0 x + a1 y + a2, b0 x + b1 y + b2).
    inv = 1.0 / scale
    cos, sin = np.cos(a) * inv, np.sin(a) * inv
    cx, cy = (w - 1) / 2, (h - 1) / 2
    tx, ty = shift * w * s, shift * h * 0.5 * s
    a2 = cx - cos * cx + sin * cy - tx
    b2 = cy - sin * cx - cos * cy - ty
    t = np.stack([cos, -sin, a2, sin, cos, b2, np.zeros(b), np.zeros(b)], axis=1).astype(np.float32)
    return ops.image.affine_transform(x, ops.convert_to_tensor(t), interpolation="bilinear", fill_mode="constant",
                                      fill_value=0.0)


def _resize(x, h: int, w: int):
    return _ops().image.resize(x, (h, w), interpolation="bilinear", antialias=True)


def _crop(x, fraction: float):
    """The central `fraction` of the image, enlarged back to full size (a tighter field of view)."""
    h, w = x.shape[1], x.shape[2]
    ch, cw = max(2, round(h * fraction)), max(2, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(x[:, top:top + ch, left:left + cw, :], h, w)


def _letterbox(x, fraction: float):
    """The image squeezed to (1 - 2 fraction) of its height, black bars above and below."""
    ops = _ops()
    h, w = x.shape[1], x.shape[2]
    bar = max(1, round(h * fraction))
    inner = _resize(x, h - 2 * bar, w)
    return ops.pad(inner, [[0, 0], [bar, bar], [0, 0], [0, 0]], constant_values=0.0)


def _border(x, fraction: float):
    """A white frame `fraction` of the size wide over the image's edge (a scanned film's margin)."""
    ops = _ops()
    h, w = x.shape[1], x.shape[2]
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    rows = (np.arange(h) >= bh) & (np.arange(h) < h - bh)
    cols = (np.arange(w) >= bw) & (np.arange(w) < w - bw)
    inside = ops.convert_to_tensor((rows[:, None] & cols[None, :]).astype(np.float32)[None, :, :, None])
    return x * inside + (1.0 - inside)


def _noise(x, index, seed: int, salt: int, std: float):
    """Additive Gaussian noise, one stateless draw per image keyed by (seed, salt, image index)."""
    import tensorflow as tf

    ops = _ops()
    shape = tuple(x.shape[1:])
    draws = [tf.random.stateless_normal(shape, seed=[seed * 1000 + salt, int(i)]) for i in index]
    return x + std * ops.convert_to_tensor(tf.stack(draws))


def _jpeg(x, quality: int):
    """JPEG re-compression at `quality` (tf.io, on the host: there is no accelerator JPEG encoder in TF)."""
    import tensorflow as tf

    u8 = tf.cast(tf.round(tf.clip_by_value(tf.convert_to_tensor(x), 0.0, 1.0) * 255.0), tf.uint8)
    out = [tf.io.decode_jpeg(tf.io.encode_jpeg(img, quality=quality, chroma_downsampling=False), channels=1)
           for img in tf.unstack(u8)]
    return tf.cast(tf.stack(out), tf.float32) / 255.0


def _window(x, lo: float, hi: float):
    return (x - lo) / (hi - lo)


def _contrast(x, factor: float):
    ops = _ops()
    mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _unsharp(x, amount: float, sigma: float):
    return x + amount * (x - gaussian_blur(x, sigma))


def battery(image_size: int) -> list[Perturbation]:
    """The fixed list (order fixed: it salts each perturbation's random draws). Pixel scales (blur sigma) are
    given at 128 px and scaled with `image_size`, so the same physical blur is applied at every resolution."""
    px = image_size / 128.0
    items: list[tuple[str, float, Callable]] = []
    for f in (0.6, 0.8, 1.25):
        items.append(("exposure", f, lambda x, i, s, k, f=f: x * f))
    for g in (0.6, 1.6):
        items.append(("gamma", g, lambda x, i, s, k, g=g: _ops().power(_ops().maximum(x, 0.0), g)))
    for c in (0.7, 0.5):
        items.append(("contrast", c, lambda x, i, s, k, c=c: _contrast(x, c)))
    for lo in (0.1, 0.2):
        items.append(("window", lo, lambda x, i, s, k, lo=lo: _window(x, lo, 1.0 - lo)))
    for sigma in (1.0, 2.0):
        items.append(("blur", sigma, lambda x, i, s, k, sigma=sigma: gaussian_blur(x, sigma * px)))
    for amount in (1.0, 2.0):
        items.append(("sharpen", amount, lambda x, i, s, k, amount=amount: _unsharp(x, amount, 1.0 * px)))
    for std in (0.03, 0.06):
        items.append(("noise", std, lambda x, i, s, k, std=std: _noise(x, i, s, k, std)))
    for q in (30, 10):
        items.append(("jpeg", q, lambda x, i, s, k, q=q: _jpeg(x, q)))
    for z in (0.85, 0.7):
        items.append(("zoom_out", z, lambda x, i, s, k, z=z: _affine(x, i, s, k, scale=z)))
    for c in (0.9, 0.8):
        items.append(("crop", c, lambda x, i, s, k, c=c: _crop(x, c)))
    for t in (0.05, 0.1):
        items.append(("translate", t, lambda x, i, s, k, t=t: _affine(x, i, s, k, shift=t)))
    for deg in (5.0, 10.0):
        items.append(("rotate", deg, lambda x, i, s, k, deg=deg: _affine(x, i, s, k, angle_deg=deg)))
    for f in (0.1, 0.2):
        items.append(("letterbox", f, lambda x, i, s, k, f=f: _letterbox(x, f)))
    for f in (0.04, 0.08):
        items.append(("border", f, lambda x, i, s, k, f=f: _border(x, f)))
    return [Perturbation(f"{kind}_{sev:g}", kind, float(sev), fn) for kind, sev, fn in items]


def apply(p: Perturbation, images, index, seed: int, salt: int):
    """uint8 (B, H, W, 1) -> the perturbed uint8 batch of the same shape. `index` (B,) are the images' fixed
    positions in the subset, `salt` the perturbation's position in the battery."""
    ops = _ops()
    x = ops.cast(ops.convert_to_tensor(images), "float32") / 255.0
    y = p.fn(x, np.asarray(index), int(seed), int(salt))
    return ops.cast(ops.round(ops.clip(y * 255.0, 0.0, 255.0)), "uint8")


# --- the validation subset ---------------------------------------------------------------------------------
def subset_indices(labels, max_images: int, seed: int) -> np.ndarray:
    """A fixed, class-stratified subset of at most `max_images` positions (sorted); the whole split if it fits.
    Each class keeps its share (at least one image each), drawn by a seeded generator."""
    y = np.asarray(labels).astype(int)
    if max_images <= 0 or len(y) <= max_images:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in (0, 1):
        where = np.flatnonzero(y == c)
        n = max(1, round(max_images * len(where) / len(y))) if len(where) else 0
        keep.append(rng.choice(where, size=min(n, len(where)), replace=False))
    return np.sort(np.concatenate(keep))


@dataclass
class SplitSample:
    images: np.ndarray  # uint8 (N, H, W, 1)
    labels: np.ndarray  # int (N,)
    meta: np.ndarray | None  # float32 (N, 6) or None
    index: np.ndarray  # positions in the split


def load_sample(data_dir: str | Path, split: str = "val", max_images: int = DEFAULT_MAX_IMAGES, seed: int = 0,
                with_meta: bool = False) -> SplitSample:
    """The split's fixed subset as arrays (the split is read in its stored, fixed order)."""
    from pipeline.data.tfdata import eval_dataset

    if max_images < 0:
        raise ShiftError(f"the shift battery's image cap must be >= 0 (0 = whole split), got {max_images}")

    imgs, ys, metas = [], [], []
    for features, labels in eval_dataset(data_dir, split, 256, with_meta=True):
        imgs.append(features["image"].numpy())
        metas.append(features["meta"].numpy())
        ys.append(labels.numpy().astype(int))
    if not ys:
        raise ShiftError(f"{data_dir}: the {split} split is empty; the shift battery needs images")
    y = np.concatenate(ys)
    keep = subset_indices(y, max_images, seed)
    return SplitSample(images=np.concatenate(imgs)[keep], labels=y[keep],
                       meta=np.concatenate(metas)[keep] if with_meta else None, index=keep)


# --- scoring ------------------------------------------------------------------------------------------------
@dataclass
class ShiftResult:
    labels: np.ndarray
    clean: np.ndarray  # probabilities on the unperturbed subset
    probabilities: dict[str, np.ndarray]  # perturbation name -> probabilities
    auc: dict[str, float] = field(default_factory=dict)
    clean_auc: float = math.nan
    # Families kept out of selection (`train.shift_held_out`): scored and logged, but not in the mean, the
    # worst or the tail, so a study cannot select on them: they stand in for a site nobody tuned for.
    held_out: tuple[str, ...] = ()

    def _selection(self) -> list[float]:
        return [v for k, v in self.auc.items() if family(k) not in self.held_out]

    @property
    def mean(self) -> float:
        return float(np.mean(self._selection()))

    @property
    def worst(self) -> float:
        return float(np.min(self._selection()))

    @property
    def tail(self) -> float:
        """The mean AUC of the worst quarter of the selection perturbations (CVaR at 25%)."""
        values = np.sort(self._selection())
        return float(values[: max(1, math.ceil(0.25 * len(values)))].mean())

    @property
    def worst_name(self) -> str:
        return min((k for k in self.auc if family(k) not in self.held_out), key=self.auc.get)

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: val_auc_shift_mean, _min and _tail over the selection perturbations,
        val_auc_shift/<name> for every one, the subset's clean AUC (the reference the drops are read against),
        and, with held-out families, val_auc_heldout_mean and _min over them."""
        out = {"val_auc_shift_mean": self.mean, "val_auc_shift_min": self.worst, "val_auc_shift_tail": self.tail,
               "val_auc_shift_clean": self.clean_auc}
        out.update({f"val_auc_shift/{k}": v for k, v in self.auc.items()})
        held = [v for k, v in self.auc.items() if family(k) in self.held_out]
        if held:
            out.update(val_auc_heldout_mean=float(np.mean(held)), val_auc_heldout_min=float(np.min(held)))
        return out

    def operating(self, threshold: float, calibrate: Callable | None = None) -> dict[str, tuple[float, float]]:
        """Which way each condition moves the stored decision: (sensitivity, specificity) at `threshold` on the
        clean subset ("clean") and under every perturbation. `calibrate` maps the network's probabilities onto
        the threshold's scale (a model's temperature); without it `threshold` is on the network's own scale.
        A perturbation can lose ranking (AUC) and still keep the operating point, or keep the ranking and move
        every score one way: the AUC alone does not say which side of the threshold fails."""
        return {name: operating_point(self.labels, calibrate(p) if calibrate else p, threshold)
                for name, p in {"clean": self.clean, **self.probabilities}.items()}

    def by_family(self) -> dict[str, list[str]]:
        """Each family's perturbation names, in battery order."""
        out: dict[str, list[str]] = {}
        for name in self.probabilities:
            out.setdefault(family(name), []).append(name)
        return out

    def selection_probabilities(self) -> dict[str, np.ndarray]:
        """The perturbations a study may select on and the robust threshold is fitted over (not held out)."""
        return {k: v for k, v in self.probabilities.items() if family(k) not in self.held_out}

    def held_out_operating(self, threshold_raw: float) -> dict[str, float]:
        """Does the stored threshold hold where nobody chose it? Sensitivity, specificity and accuracy at
        `threshold_raw` (the network's own probability scale, before the temperature), each the mean over the
        held-out perturbations; logged as val_heldout_sensitivity / _specificity / _accuracy. Empty without
        held-out families. On the battery's subset, whose prevalence is validation's."""
        names = [k for k in self.probabilities if family(k) in self.held_out]
        if not names:
            return {}
        at = self.operating(threshold_raw)
        prevalence = float(np.asarray(self.labels).astype(bool).mean())
        return {"val_heldout_sensitivity": float(np.mean([at[k][0] for k in names])),
                "val_heldout_specificity": float(np.mean([at[k][1] for k in names])),
                "val_heldout_accuracy": float(np.mean([prevalence * at[k][0] + (1 - prevalence) * at[k][1]
                                                       for k in names]))}


def operating_point(y, p, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of calling `p >= threshold` positive, against labels `y`."""
    positive = np.asarray(y).astype(bool)
    called = np.asarray(p) >= threshold
    return float(called[positive].mean()), float(1.0 - called[~positive].mean())


def family(name: str) -> str:
    """A perturbation's family from its name (`zoom_out_0.85` -> `zoom_out`)."""
    return name.rsplit("_", 1)[0]


FAMILIES = tuple(dict.fromkeys(p.kind for p in battery(128)))  # in battery order


def check_held_out(families) -> None:
    """`train.shift_held_out` must name battery families and leave some to select on (ConfigError otherwise)."""
    from pipeline.config import ConfigError

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"train.shift_held_out: unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                          f"{', '.join(map(repr, unknown))} (known: {', '.join(FAMILIES)})")
    if set(families) >= set(FAMILIES):
        raise ConfigError("train.shift_held_out holds every family: nothing would be left to select on")


def _predict(predict_fn, images, meta, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        inputs = {"image": images[start:start + batch_size]}
        if meta is not None:
            inputs["meta"] = meta[start:start + batch_size]
        out.append(np.asarray(predict_fn(inputs), dtype=np.float64).reshape(-1))
    return np.concatenate(out)


def score_battery(model_or_fn, sample: SplitSample, *, seed: int = 0, batch_size: int = 64,
                  perturbations: list[Perturbation] | None = None, held_out: tuple[str, ...] = ()) -> ShiftResult:
    """AUC of the model on the clean subset and under every perturbation. `model_or_fn` is a Keras model or
    a callable taking the model's input dict and returning probabilities."""
    from sklearn.metrics import roc_auc_score

    y = sample.labels
    if not 0 < int(y.sum()) < len(y):
        raise ShiftError("the shift battery needs both classes in the validation subset (AUC is undefined)")
    fn = model_or_fn.predict_on_batch if hasattr(model_or_fn, "predict_on_batch") else model_or_fn
    perturbations = perturbations if perturbations is not None else battery(sample.images.shape[1])
    clean = _predict(fn, sample.images, sample.meta, batch_size)
    probs: dict[str, np.ndarray] = {}
    for salt, p in enumerate(perturbations):
        batches = []
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            batches.append(np.asarray(apply(p, sample.images[sl], sample.index[sl], seed, salt)))
        probs[p.name] = _predict(fn, np.concatenate(batches), sample.meta, batch_size)
    return ShiftResult(labels=y, clean=clean, probabilities=probs,
                       auc={k: float(roc_auc_score(y, v)) for k, v in probs.items()},
                       clean_auc=float(roc_auc_score(y, clean)), held_out=tuple(held_out))


@dataclass
class RobustThreshold:
    """The robust operating threshold and its evidence (`robust_threshold`)."""

    threshold: float
    objective: float  # the tail average of Youden's J over the kept conditions, on the fitting half
    kept: list[str]  # the perturbations the threshold was fitted over (clean is always in)
    dropped: dict[str, float]  # perturbation -> its AUC on the fitting half, below the floor: left out
    report: dict[str, float]  # on the other half: clean sensitivity/specificity/J, mean and worst J

    def describe(self) -> str:
        r = self.report
        left_out = f"; {len(self.dropped)} left out below the AUC floor" if self.dropped else ""
        return (f"robust (tail-average Youden J {self.objective:.3f} over clean + {len(self.kept)} shifts{left_out}; "
                f"held-out half: clean sensitivity {r['clean_sensitivity']:.3f}, specificity "
                f"{r['clean_specificity']:.3f}, worst J {r['worst_j']:.3f})")


def _rates(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, 1 - specificity) at every threshold of `grid`: P(score >= t) per class, by binary search."""
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    return (1.0 - np.searchsorted(pos, grid, side="left") / len(pos),
            1.0 - np.searchsorted(neg, grid, side="left") / len(neg))


def fitting_half(y: np.ndarray, seed: int) -> np.ndarray:
    """A class-stratified random half of the battery's images (True: fit on it; False: report on it)."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(y), dtype=bool)
    for label in (False, True):
        idx = rng.permutation(np.flatnonzero(y == label))
        half[idx[: (len(idx) + 1) // 2]] = True
    return half


@dataclass
class JTable:
    """Youden's J of every condition at every candidate threshold (the fitting half's, in `robust_threshold`):
    built once, it answers any tail and sensitivity floor (pipeline/study/threshold_proxy.py asks several)."""

    grid: np.ndarray  # candidate thresholds, ascending
    j: np.ndarray  # (conditions, grid); row 0 is the clean condition
    clean_sensitivity: np.ndarray  # (grid,)

    def choose(self, tail: float, min_sensitivity: float) -> tuple[float, float]:
        """(threshold, objective): the highest threshold maximising the mean J of the worst `tail` fraction of the
        conditions among those keeping clean sensitivity >= `min_sensitivity`."""
        worst_k = max(1, math.ceil(tail * len(self.j)))
        objective = np.sort(self.j, axis=0)[:worst_k].mean(axis=0)
        objective = np.where(self.clean_sensitivity >= min_sensitivity, objective, -np.inf)
        best = np.flatnonzero(objective == objective.max())[-1]
        return float(self.grid[best]), float(objective[best])


def j_table(y: np.ndarray, conditions: list[np.ndarray], candidates: int = 1024) -> JTable:
    """`JTable` over `conditions` (clean first), scores of the same images labelled `y`; the candidate thresholds
    are quantiles of all pooled scores."""
    y = np.asarray(y).astype(bool)
    pooled = np.concatenate(conditions)
    grid = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, candidates)))
    j = np.stack([np.subtract(*_rates(y, c, grid)) for c in conditions])
    return JTable(grid, j, _rates(y, conditions[0], grid)[0])


def robust_threshold(y, clean: np.ndarray, shifted: dict[str, np.ndarray], *, auc_floor: float = 0.6,
                     tail: float = 0.25, min_sensitivity: float = 0.0, seed: int = 0,
                     candidates: int = 1024) -> RobustThreshold:
    """The threshold maximising a tail average of Youden's J (sensitivity + specificity - 1) over the clean
    images and the perturbations, subject to a clean-sensitivity floor.

    Half of the battery's images fit it and the other half report it (`fitting_half`), so the reported
    sensitivity and specificity are not the ones it was chosen on. On the fitting half:
    - a perturbation whose AUC is below `auc_floor` is left out: it carries almost no ranking, and a minimax
      over it would let one uninformative condition move the threshold for every patient (seen: one condition
      of AUC 0.54 moved a threshold from 0.76 to 0.37 and clean specificity from 0.89 to 0.30);
    - the objective is the mean of the worst `tail` fraction of the conditions' J (conditional value at risk,
      Rockafellar & Uryasev, J. Risk 2000): `tail` = 1 is the plain mean, a small one approaches the worst
      case (the minimax over groups of Sagawa et al., ICLR 2020) without being decided by a single condition;
    - thresholds whose clean sensitivity is below `min_sensitivity` are not eligible.
    Candidates: quantiles of all pooled scores; ties go to the highest threshold (fewer false positives).
    """
    y = np.asarray(y).astype(bool)
    clean = np.asarray(clean, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return RobustThreshold(0.5, 0.0, [], {}, {"clean_sensitivity": math.nan, "clean_specificity": math.nan,
                                                   "clean_j": math.nan, "mean_j": math.nan, "worst_j": math.nan})
    fit = fitting_half(y, seed)
    if not (0 < y[fit].sum() < fit.sum() and 0 < y[~fit].sum() < (~fit).sum()):
        fit = np.ones(len(y), dtype=bool)  # too few images to halve: fit and report on all (tiny sets only)
    report_on = ~fit if (~fit).any() else fit
    from sklearn.metrics import roc_auc_score

    aucs = {name: float(roc_auc_score(y[fit], np.asarray(p)[fit])) for name, p in shifted.items()}
    kept = [name for name, auc in aucs.items() if auc >= auc_floor]
    dropped = {name: auc for name, auc in aucs.items() if auc < auc_floor}
    conditions = [clean] + [np.asarray(shifted[name], dtype=np.float64) for name in kept]
    table = j_table(y[fit], [c[fit] for c in conditions], candidates)
    t, best_objective = table.choose(tail, min_sensitivity)
    at = np.array([t])
    report_j = [float(np.subtract(*_rates(y[report_on], c[report_on], at))[0]) for c in conditions]
    sens, fpr = (float(v[0]) for v in _rates(y[report_on], clean[report_on], at))
    return RobustThreshold(t, best_objective, kept, dropped,
                           {"clean_sensitivity": sens, "clean_specificity": 1.0 - fpr, "clean_j": report_j[0],
                            "mean_j": float(np.mean(report_j)), "worst_j": float(np.min(report_j))})


def plot_shift(result: ShiftResult, title: str = "AUC under the shift battery (validation subset)"):
    """Horizontal bars, one per perturbation, against the clean subset's AUC (dashed line)."""
    from matplotlib.figure import Figure

    names = list(result.auc)
    fig = Figure(figsize=(7, 0.28 * len(names) + 1.5))
    ax = fig.subplots()
    values = [result.auc[n] for n in names]
    ax.barh(names, values, color=["#c0392b" if v == result.worst else "#4a7ab5" for v in values])
    ax.axvline(result.clean_auc, color="k", ls="--", lw=1, label=f"clean {result.clean_auc:.3f}")
    ax.axvline(result.mean, color="#4a7ab5", ls=":", lw=1, label=f"mean {result.mean:.3f}")
    ax.set_xlim(max(0.0, min(values + [result.clean_auc]) - 0.05), 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def format_table(result: ShiftResult, operating: dict[str, tuple[float, float]] | None = None) -> str:
    """The AUC under each condition and its drop from clean; with `operating` (`ShiftResult.operating` at the
    stored threshold) also the sensitivity and specificity there. Held-out families are marked "(held out)"."""
    at = operating or {}

    def cols(name: str) -> str:
        return f"{at[name][0]:>7.3f}{at[name][1]:>7.3f}" if name in at else ""

    head = f"{'condition':<16}{'AUC':>7}{'drop':>8}" + (f"{'sens':>7}{'spec':>7}" if at else "")
    lines = [head, f"{'clean (subset)':<16}{result.clean_auc:>7.4f}{'':>8}" + cols("clean")]
    for name, auc in result.auc.items():
        mark = "  (held out)" if family(name) in result.held_out else ""
        lines.append(f"{name:<16}{auc:>7.4f}{auc - result.clean_auc:>+8.4f}" + cols(name) + mark)
    lines.append(f"{'mean':<16}{result.mean:>7.4f}{result.mean - result.clean_auc:>+8.4f}")
    lines.append(f"{'worst':<16}{result.worst:>7.4f}{result.worst - result.clean_auc:>+8.4f}  ({result.worst_name})")
    return "\n".join(lines)
