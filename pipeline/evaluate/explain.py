"""`pneumo explain`: Grad-CAM heat maps over chest X-rays, and the "pointing game" against RSNA boxes.

Grad-CAM (Selvaraju et al. 2017) for the one output, pneumonia:
    A = the last rank-4 feature map before the global pooling (here the last block's ReLU, ahead of its
        max-pool: twice the pool's resolution, the same evidence), z = the output's logit,
    alpha_k = mean over (i, j) of dz / dA_ijk,   cam = ReLU(sum_k alpha_k A_k),
then resized bilinearly to the input size and divided by its maximum (a map with no positive evidence stays 0).
The gradient is of the logit (the sigmoid head's input, recomputed from its kernel and bias), not of the
probability: d p = p (1 - p) d z vanishes for a confident model and the map would turn to rounding noise. The
augmentation layers do nothing at inference (`training=False`); float16 maps (mixed precision) are cast to
float32 before any arithmetic.

Pointing game (Zhang et al. 2016): a positive image is a hit when its heat map's peak pixel has its centre
inside a ground-truth box. Chance is the share of the image the boxes cover (their union, on the same pixel
grid): the hit rate of a peak placed at random. Boxes are the records' normalised (x, y, w, h).

The overlay is Pillow compositing (no pyplot, no figure): grey X-ray, 'jet' at alpha 0.4, a title strip with
the probability: ~2 ms to compose and ~7 ms to write a 256 px image here (~37 ms at 512 px). PNGs are
written atomically (temp file + rename).

Where it is called:
- `pneumo explain PATH...` -> `run_explain` -> `explain_paths`: one `<out>/<stem>.png` per readable DICOM or
  PNG/JPEG (the second file with the same stem gets `<stem>-2.png`); unreadable files get an error row, the
  rest still run, and the command then exits non-zero (as `pneumo predict` does).
- promotion -> `log_explanations(models:/<name>/<version>, data_dir, "test", <training run id>)`: a grid of
  test-set explanations (positives first, boxes drawn) and the metrics `pointing_game`,
  `pointing_game_chance`, `pointing_game_n` on the promoted version's training run.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifact.model_store import champion_uri
from pipeline.data import inputs
from pipeline.data.dicom import ImageError, load_image_file, screen_dicom
from pipeline.data.inputs import DICOM_SUFFIXES, IMAGE_SUFFIXES
from pipeline.errors import InputError

ALPHA = 0.4
CMAP = "jet"
DISPLAY = 256  # overlays smaller than this are enlarged to it, so the title stays legible
BOX_COLOUR = (0, 255, 0)
PEAK_COLOUR = (255, 255, 255)


class ExplainError(InputError):
    """A one-line reason explanations could not be made (or that some files failed)."""


# --- Grad-CAM --------------------------------------------------------------------------------------------
_FEATURE_LAYERS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "ReLU", "LeakyReLU", "Activation", "Add",
                   "BatchNormalization", "Concatenate")


def feature_layer(model):
    """The last layer with a rank-4 output among convs, activations, adds and batch norms: the last spatial
    map before the pooling that turns it into a vector (pools, dropout and the augmentation block are not
    candidates)."""
    last = None
    for layer in model.layers:
        if type(layer).__name__ not in _FEATURE_LAYERS:
            continue
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used twice has no single output
            continue
        if rank == 4:
            last = layer
    if last is None:
        raise ExplainError(f"model {model.name!r} has no convolutional feature map for Grad-CAM")
    return last


def _output_layer(model):
    history = getattr(model.output, "_keras_history", None)
    return history[0] if history else model.layers[-1]


class GradCam:
    """Grad-CAM of one model, built once: `cam(images, meta)` -> (heat (B,S,S) float32 in [0, 1], p (B,))."""

    def __init__(self, model, layer: str | None = None):
        import keras
        import tensorflow as tf

        from pipeline.artifact.model_store import model_uses_meta

        self.model = model
        self.layer = model.get_layer(layer) if layer else feature_layer(model)
        self.uses_meta = model_uses_meta(model)
        image_input = next(t for t in model.inputs if getattr(t, "name", "").split(":")[0] == "image")
        self.size = int(image_input.shape[1])
        head = _output_layer(model)
        # The logit, when the output is a sigmoid Dense (it is in this model family): its input, then kernel/bias.
        self.head = head if (type(head).__name__ == "Dense"
                             and getattr(head.activation, "__name__", "") == "sigmoid") else None
        second = self.head.input if self.head is not None else model.output
        self.sub = keras.Model(model.input, [self.layer.output, second], name="gradcam")
        self._run = tf.function(self._cam, reduce_retracing=True)

    def _cam(self, inputs):
        import tensorflow as tf

        # The tape records the sub-model's ops because they touch its trainable variables, so the gradient
        # with respect to the intermediate map is there without `watch`.
        with tf.GradientTape() as tape:
            fmap, out = self.sub(inputs, training=False)
            out = tf.cast(out, tf.float32)
            if self.head is not None:
                logit = tf.matmul(out, tf.cast(self.head.kernel, tf.float32))
                if self.head.bias is not None:
                    logit += tf.cast(self.head.bias, tf.float32)
                prob = tf.sigmoid(logit)
            else:
                prob = logit = out
            target = tf.reduce_sum(logit)  # images are independent: d(sum)/dA_b = dz_b/dA_b
        grads = tape.gradient(target, fmap)
        if grads is None:
            raise ExplainError(f"no gradient reaches layer {self.layer.name!r} (frozen model?)")
        # Differentiate with respect to the map itself, then cast: float16 under mixed precision.
        fmap, grads = tf.cast(fmap, tf.float32), tf.cast(grads, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # alpha_k per image
        cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, (self.size, self.size), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        return cam, tf.reshape(prob, [-1])

    def __call__(self, images, meta=None) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:] != (self.size, self.size, 1):
            raise ExplainError(f"images of shape {images.shape[1:]} for a model of input "
                               f"({self.size}, {self.size}, 1)")
        inputs = {"image": tf.constant(images)}
        if self.uses_meta:
            if meta is None:
                meta = np.zeros((len(images), 6), np.float32)
            inputs["meta"] = tf.constant(np.asarray(meta, dtype=np.float32))
        # One traced function does the forward and backward passes (retraced only for a new batch shape).
        heat, prob = self._run(inputs)
        return np.clip(heat.numpy(), 0.0, 1.0).astype(np.float32), prob.numpy().astype(np.float64)


def gradcam(model, images, meta=None) -> np.ndarray:
    """Grad-CAM heat maps (B, S, S) float32 in [0, 1] for uint8 images (B, S, S[, 1]) (meta (B, 6) when the
    model takes it; zeros if omitted)."""
    return _explainer(model)(images, meta)[0]


class EnsembleCam:
    """Grad-CAM of an ensemble (pipeline.promote.ensemble: member networks nested in one model whose output is the
    mean of their probabilities): the mean of the members' normalised maps, renormalised to a peak of 1, and
    the mean of their probabilities (the ensemble's own output). Each member's map is of its own logit; the
    ensemble weighs every member equally, so its evidence is the members' evidence weighed equally."""

    def __init__(self, model, members: list):
        self.model = model
        self.members = [GradCam(m) for m in members]
        first = self.members[0]
        self.size, self.uses_meta = first.size, any(m.uses_meta for m in self.members)
        self.layer = first.layer  # named in summaries; every member has its own

    def __call__(self, images, meta=None) -> tuple[np.ndarray, np.ndarray]:
        results = [m(images, meta if m.uses_meta else None) for m in self.members]
        heat = np.mean([h for h, _ in results], axis=0)
        peak_ = heat.max(axis=(1, 2), keepdims=True)
        heat = np.divide(heat, peak_, out=np.zeros_like(heat), where=peak_ > 0)
        return heat.astype(np.float32), np.mean([p for _, p in results], axis=0)


def ensemble_members(model) -> list:
    """The networks nested in an averaging model (none for a single network): an ensemble's output, and the
    test-time views' (pipeline/net/tta.py), is an `Average` of nested models (a single network nests models too:
    its augmentation block). Recursive, so an ensemble of view-averaging members yields the members' networks;
    a network under test-time views is explained on the image as it is."""
    import keras

    if type(_output_layer(model)).__name__ != "Average":
        return []
    return [net for layer in model.layers if isinstance(layer, keras.Model)
            for net in (ensemble_members(layer) or [layer])]


_LAST: list[GradCam] = []  # one slot: the last model's explainer (holding more would keep old models alive)


def _explainer(model) -> GradCam:
    """The GradCam of `model`, reused while the same model is explained (building the sub-model and tracing its
    function costs ~1 s)."""
    if not _LAST or _LAST[0].model is not model:
        members = ensemble_members(model)
        _LAST[:] = [EnsembleCam(model, members) if members else GradCam(model)]
    return _LAST[0]


# --- pointing game ---------------------------------------------------------------------------------------
def box_mask(boxes, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside any normalised (x, y, w, h) box."""
    centres = (np.arange(size) + 0.5) / size
    mask = np.zeros((size, size), bool)
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cols = (centres >= x) & (centres <= x + w)
        rows = (centres >= y) & (centres <= y + h)
        mask |= rows[:, None] & cols[None, :]
    return mask


def peak(heat: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the heat map's maximum; None for a map with no evidence at all (all zero)."""
    if not np.any(heat > 0):
        return None
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(r), int(c)


def pointing_game(heat, boxes) -> tuple[int, int]:
    """-> (hits, n): of the n images with at least one box, how many have their heat-map peak inside one.

    `heat` (B, S, S); `boxes` per image: a (k, 4) array of normalised x, y, w, h (k = 0: not counted), or the
    records' flat -1-padded vector. An all-zero map has no peak and counts as a miss.
    """
    heat = np.asarray(heat)
    hits = n = 0
    for h, b in zip(heat, boxes, strict=True):
        b = _unpad(b)
        if not len(b):
            continue
        n += 1
        p = peak(h)
        hits += bool(p is not None and box_mask(b, h.shape[0])[p])
    return hits, n


def box_fraction(boxes, size: int) -> float:
    """The share of the image the boxes cover: the chance a random peak lands in one."""
    return float(box_mask(_unpad(boxes), size).mean())


def _unpad(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1)
    return b[b >= 0].reshape(-1, 4)


# --- overlay ---------------------------------------------------------------------------------------------
@functools.cache
def _colormap(name: str) -> np.ndarray:
    from matplotlib import colormaps  # the colormap table only; no pyplot, no figure

    return np.round(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def overlay(image_u8, heat, prob: float, *, boxes=None, title: str | None = None, alpha: float = ALPHA,
            cmap: str = CMAP, display: int = DISPLAY, mark_peak: bool = False) -> np.ndarray:
    """The grey X-ray with the heat map in `cmap` at `alpha`, under a title strip with the probability.

    -> RGB uint8 (H, W, 3), W = max(S, display). `boxes` (normalised x, y, w, h) are drawn in green,
    `mark_peak` circles the heat map's maximum.
    """
    from PIL import Image, ImageDraw

    grey = np.asarray(image_u8, dtype=np.uint8).reshape(np.shape(heat))
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    size = grey.shape[0]
    side = max(size, display)
    colour = _colormap(cmap)[np.rint(heat * 255).astype(np.uint8)]
    blend = (1 - alpha) * np.repeat(grey[..., None], 3, axis=2).astype(np.float32) + alpha * colour
    picture = Image.fromarray(np.rint(blend).astype(np.uint8), "RGB")
    if side != size:  # enlarge the blend (one resize of an RGB image, not two of the inputs)
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    scale = side / size
    line = max(1, side // 128)
    for x, y, w, h in _unpad(boxes if boxes is not None else []):
        draw.rectangle([x * side, y * side, (x + w) * side, (y + h) * side], outline=BOX_COLOUR, width=line)
    if mark_peak and (p := peak(heat)) is not None:
        cy, cx, r = (p[0] + 0.5) * scale, (p[1] + 0.5) * scale, max(3, side // 40)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=PEAK_COLOUR, width=line)
    strip = max(16, side // 12)
    out = Image.new("RGB", (side, side + strip), (0, 0, 0))
    out.paste(picture, (0, strip))
    text = title if title is not None else f"p(pneumonia) = {prob:.3f}"
    ImageDraw.Draw(out).text((strip // 4, strip // 2), text, fill=(255, 255, 255), font=_font(int(strip * 0.7)),
                             anchor="lm")
    return np.asarray(out)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Atomic (pipeline.files: a reader never sees half a PNG)."""
    from PIL import Image

    from pipeline.files import atomic_write

    path = Path(path)
    atomic_write(path, lambda fh: Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(fh, format="PNG"))
    return path


def grid(tiles: list[np.ndarray], columns: int = 4, gap: int = 4) -> np.ndarray:
    """Equal-sized RGB tiles in rows of `columns`, on black."""
    if not tiles:
        raise ExplainError("no images to put in a grid")
    h, w, _ = tiles[0].shape
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    out = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


# --- files -> PNGs (`pneumo explain`) ---------------------------------------------------------------------
def collect_paths(paths: Iterable[str | Path]) -> list[Path]:
    """DICOM and PNG/JPEG files, found as `pneumo predict` finds DICOMs."""
    return inputs.collect_paths(paths, DICOM_SUFFIXES | IMAGE_SUFFIXES, "DICOM or PNG/JPEG", ExplainError)


@dataclass
class _Decoded:
    pixels: np.ndarray | None
    meta: tuple[str, str, int]  # view position, sex, age (-1 unknown): zeros in the meta vector for images
    error: str = ""
    warning: str = ""  # out of scope by its header, as `pneumo predict` says it


def _decode(path: Path, size: int, force: bool = False) -> _Decoded:
    """PNG/JPEG by suffix (through the converter's geometry policy), everything else as DICOM through predict's
    scope check: a header that is not a single-frame chest radiograph is skipped with the reason (no heat map,
    no probability) unless `force`, as `pneumo predict` skips it."""
    none = ("", "", -1)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return _Decoded(load_image_file(path, size), none)
        except ImageError as e:
            return _Decoded(None, none, str(e))
    screened = screen_dicom(path, size)
    img = screened.image
    if img is None:
        return _Decoded(None, none, screened.error, screened.out_of_scope)
    pixels = img.pixels if force or not screened.out_of_scope else None
    return _Decoded(pixels, (img.view_position, img.sex, img.age), warning=screened.out_of_scope)


def meta_vectors(meta: list[tuple[str, str, int]]) -> np.ndarray:
    """The model's side inputs (B, 6), by the function that builds them from the TFRecords."""
    return inputs.meta_batch(meta)


def load(model_uri: str | None = None, tracking_uri: str | None = None):
    """-> (LoadedModel, uri): the model behind an MLflow URI (default: the champion) in the store
    `tracking_uri` (default: $MLFLOW_TRACKING_URI, else the embedded one), with the temperature stored with
    its version, so the probability explain reports is the calibrated one predict and evaluate report.
    model_store's one-line ModelError when it is missing."""
    from pipeline.artifact.model_store import load as load_model

    uri = model_uri or champion_uri()
    return load_model(uri, tracking_uri, require_threshold=False), uri


def _keras_and_temperature(model) -> tuple[object, float]:
    """A Keras model (temperature 1: its own sigmoid) or a model_store.LoadedModel (its stored temperature)."""
    from pipeline.artifact.model_store import LoadedModel

    if isinstance(model, LoadedModel):
        return model.model, model.temperature
    return model, 1.0


def _png_name(path: Path, used: set[str]) -> str:
    name, k = path.stem or path.name, 1
    candidate = f"{name}.png"
    while candidate in used:
        k += 1
        candidate = f"{name}-{k}.png"
    used.add(candidate)
    return candidate


def explain_paths(paths: Iterable[str | Path], model_uri: str | None = None,
                  out_dir: str | Path = "explanations", *, tracking_uri: str | None = None, model=None,
                  batch_size: int = 32, force: bool = False) -> list[dict]:
    """One Grad-CAM overlay PNG per readable file -> rows {path, probability, png, error, warning}, in input
    order.

    Unreadable files get a row with the one-line reason in `error` (and no probability or PNG); the others
    still run. A DICOM out of scope by its header gets the reason in `warning` and is skipped unless `force`.
    `model` (a model_store.LoadedModel, or a Keras model: temperature 1) skips loading `model_uri`. The
    probability is calibrated with the version's temperature, as predict's is.
    """
    from pipeline.net.calibration import apply_temperature

    files = collect_paths(paths)
    if model is None:
        model, _ = load(model_uri, tracking_uri)
    model, temperature = _keras_and_temperature(model)
    cam = _explainer(model)
    out_dir = Path(out_dir)
    used: set[str] = set()
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        decoded = [_decode(p, cam.size, force) for p in chunk]
        ok = [d for d in decoded if d.pixels is not None]
        if ok:
            images = np.stack([d.pixels for d in ok])
            meta = meta_vectors([d.meta for d in ok]) if cam.uses_meta else None
            heats, probs = cam(images, meta)
            results = iter(zip(heats, apply_temperature(probs, temperature), strict=True))
        for path, d in zip(chunk, decoded, strict=True):
            row = {"path": str(path), "probability": None, "png": None, "error": d.error, "warning": d.warning}
            if d.pixels is not None:
                heat, prob = next(results)
                png = save_png(overlay(d.pixels, heat, float(prob)), out_dir / _png_name(path, used))
                row.update(probability=float(prob), png=str(png))
            rows.append(row)
    return rows


def run_explain(paths: list[str], model_uri: str | None = None, out_dir: str | Path = "explanations", *,
                tracking_uri: str | None = None, stdout=None, force: bool = False) -> list[dict]:
    """`pneumo explain`: a line per file on stdout, a summary on stderr; ExplainError (non-zero exit) after
    everything readable was written, when any file failed. Out-of-scope DICOMs are skipped, as `pneumo predict`
    skips them, unless `force`."""
    stdout = stdout or sys.stdout
    files = collect_paths(paths)  # a typo fails before the model loads
    model, uri = load(model_uri, tracking_uri)
    rows = explain_paths(files, uri, out_dir, model=model, force=force)
    for r in rows:
        note = f" (warning: {r['warning']})" if r["warning"] else ""
        if r["error"]:
            print(f"{r['path']}: error: {r['error']}", file=stdout)
        elif r["png"] is None:
            print(f"{r['path']}: skipped: {r['warning']}", file=stdout)
        else:
            print(f"{r['path']}: p={r['probability']:.4f} -> {r['png']}{note}", file=stdout)
    failed = sum(bool(r["error"]) for r in rows)
    skipped = sum(not r["error"] and r["png"] is None for r in rows)
    print(f"explained {len(rows) - failed - skipped} of {len(rows)} files with {uri}; PNGs in {out_dir}"
          + (f"; {skipped} skipped as out of scope (--force explains them)" if skipped else "")
          + (f"; {failed} failed to read" if failed else ""), file=sys.stderr)
    if failed:
        raise ExplainError(f"{failed} of {len(rows)} files could not be read (see the lines above)")
    return rows


# --- a registered model's explanations, logged to its run ---------------------------------------------------
def log_explanations(model, data_dir: str | Path, split: str = "test", run_id: str | None = None, n: int = 16,
                     *, tracking_uri: str | None = None, batch_size: int = 64) -> float:
    """Grad-CAM over `split`: a PNG grid of `n` explanations (positives first, in file order, boxes in green,
    peak circled) as `explanations/<split>_gradcam.png`, and where the records carry boxes the pointing game
    over every positive image with a box: metrics `pointing_game` (hit rate), `pointing_game_chance` (mean
    box-area fraction: a random peak's hit rate) and `pointing_game_n`, plus `explanations/<split>_pointing_game.json`.

    `model`: a Keras model, a model_store.LoadedModel or an MLflow model URI (the last two: titles show the
    calibrated probability). -> the pointing-game hit rate (NaN when no record has a box).
    """
    import mlflow
    from mlflow import MlflowClient

    from pipeline.artifact import tracking
    from pipeline.data.tfdata import eval_dataset
    from pipeline.net.calibration import apply_temperature

    if run_id is None:
        raise ExplainError("log_explanations needs the run_id to log to")
    if tracking_uri is not None:
        tracking.setup(tracking_uri)
    if isinstance(model, str):
        from pipeline.artifact.model_store import load as load_model

        # From the store the caller set up: no reset to the default store.
        model = load_model(model, mlflow.get_tracking_uri(), require_threshold=False)
    model, temperature = _keras_and_temperature(model)
    cam = _explainer(model)
    hits = n_boxed = 0
    chance: list[float] = []
    pos_tiles: list[tuple] = []
    neg_tiles: list[tuple] = []
    for features, labels in eval_dataset(data_dir, split, batch_size, with_meta=True, with_info=True):
        labels = labels.numpy().astype(int)
        boxes = [_unpad(b) for b in features["boxes"].numpy()]
        need_neg = max(0, n - len(neg_tiles))
        # Heat maps for every positive (the pointing game) and for as many negatives as the grid may need.
        neg_idx = np.flatnonzero(labels == 0)[:need_neg]
        idx = np.sort(np.concatenate([np.flatnonzero(labels == 1), neg_idx]))
        if not len(idx):
            continue
        images = features["image"].numpy()[idx]
        heats, probs = cam(images, features["meta"].numpy()[idx])
        probs = apply_temperature(probs, temperature)
        for image, k, heat, prob in zip(images, idx, heats, probs, strict=True):
            tile = (image[..., 0], heat, float(prob), int(labels[k]), boxes[k])
            if labels[k] == 1:
                if len(boxes[k]):
                    h, m = pointing_game(heat[None], [boxes[k]])
                    hits, n_boxed = hits + h, n_boxed + m
                    chance.append(box_fraction(boxes[k], cam.size))
                if len(pos_tiles) < n:
                    pos_tiles.append(tile)
            elif len(neg_tiles) < n:
                neg_tiles.append(tile)
    chosen = (pos_tiles + neg_tiles)[:n]
    score = hits / n_boxed if n_boxed else float("nan")
    client = MlflowClient(mlflow.get_tracking_uri())
    tiles = []
    for image, heat, prob, label, boxes in chosen:
        title = f"label {label}  p={prob:.2f}"
        if len(boxes):
            p = peak(heat)
            title += "  hit" if p is not None and box_mask(boxes, cam.size)[p] else "  miss"
        tiles.append(overlay(image, heat, prob, boxes=boxes, title=title, display=192, mark_peak=True))
    with tempfile.TemporaryDirectory(prefix="pneumo-explain-") as tmp:
        if tiles:
            save_png(grid(tiles), Path(tmp) / f"{split}_gradcam.png")
            client.log_artifact(run_id, str(Path(tmp) / f"{split}_gradcam.png"), "explanations")
    summary = {"split": split, "layer": cam.layer.name, "hits": hits, "n": n_boxed,
               "pointing_game": score if n_boxed else None,
               "pointing_game_chance": float(np.mean(chance)) if chance else None}
    client.log_dict(run_id, summary, f"explanations/{split}_pointing_game.json")
    if n_boxed:
        client.log_metric(run_id, "pointing_game", score)
        client.log_metric(run_id, "pointing_game_chance", float(np.mean(chance)))
        client.log_metric(run_id, "pointing_game_n", n_boxed)
    return score
