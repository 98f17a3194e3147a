"""An ImageNet backbone from `keras.applications` in place of the project's own stem and blocks (issue 21).

    [0, 1] grey (B, H, W, 1) -> 3 equal channels -> the backbone's own input scaling -> DenseNet-121 |
    EfficientNet-B0 without its classifier -> (B, h, w, C) feature map

Kermany et al. (Cell 2018) reached their figures by ImageNet transfer learning; these are the two families the
issue names. The weights come from a local file (`model.backbone_weights`): Keras' "notop" ImageNet file,
downloaded once by the user, because a hospital's training machine is often offline and a training run must not
reach the internet behind its user's back. Without a file the backbone starts from random weights (what the
tests build, at 32 px: these machines have no ImageNet weights, so the backbone's accuracy is not measured here).

The network is nested in the model under the name "backbone", its feature map passed through an identity layer
Grad-CAM (pipeline/evaluate/explain.py) finds as the last map; the saved model carries the loaded weights, so
serving needs no file.
"""

from __future__ import annotations

from pathlib import Path

import keras

from pipeline.config import ConfigError, ModelConfig

# The files Keras itself downloads for weights="imagenet", include_top=False (its keras.applications modules
# name them): what `model.backbone_weights` should point at. Listed for the error message and the docs.
WEIGHT_FILES = {
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetb0": "efficientnetb0_notop.h5",
}
MIN_SIZE = 32  # the smallest input keras.applications accepts for these networks
# ImageNet's channel statistics on [0, 1] pixels: DenseNet's "torch" preprocessing (keras.applications.densenet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_weights(cfg: ModelConfig) -> Path | None:
    """The weights file `cfg` names, checked to exist and be a file; None for random weights."""
    if not cfg.backbone_weights:
        return None
    path = Path(cfg.backbone_weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.backbone_weights {str(path)!r}: no such file (download Keras' "
                          f"{WEIGHT_FILES[cfg.backbone]} once and point at it; README, \"A pretrained backbone\")")
    return path


def network_for(name: str, image_size: int) -> keras.Model:
    """The network with random weights (keras.applications never downloads with weights=None)."""
    shape = (image_size, image_size, 3)
    if name == "densenet121":
        return keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape, name="backbone")
    return keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=shape, name="backbone")


def load_weights(network: keras.Model, path: Path, name: str) -> None:
    """`path`'s weights into `network`, or a ConfigError: Keras' loader only warns when a file's layers do not
    match (a file of another network loads "successfully" and leaves those layers random), so a warning is
    taken as the mismatch it is, and every trainable kernel must have changed."""
    import warnings

    before = [v.numpy().copy() for v in network.trainable_weights]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            network.load_weights(str(path))
    except Exception as e:  # noqa: BLE001 (h5py, Keras and warnings raise a variety: each is a wrong file)
        reason = " ".join(str(e).split())[:160]
        raise ConfigError(f"model.backbone_weights {str(path)!r}: not {name} weights without the classifier "
                          f"({type(e).__name__}: {reason})") from None
    # Kernels start random, so each one a file holds changes on loading (norm scales and offsets start at 1 and 0,
    # and may equal the file's).
    kernels = [(b, v) for b, v in zip(before, network.trainable_weights, strict=True) if v.name.endswith("kernel")]
    kept = sum(bool((b == v.numpy()).all()) for b, v in kernels)
    if kept:
        raise ConfigError(f"model.backbone_weights {str(path)!r}: {kept} of {len(kernels)} kernels of {name} were "
                          f"not in the file")


def backbone_features(cfg: ModelConfig, unit_image, image_size: int):
    """`unit_image` ([0, 1] grey, after augmentation) -> the backbone's feature map, with its weights loaded."""
    if image_size < MIN_SIZE:
        raise ConfigError(f"model.backbone = {cfg.backbone!r} needs images of at least {MIN_SIZE} px, got "
                          f"{image_size} px (convert with a larger --image-size)")
    weights = check_weights(cfg)
    layers = keras.layers
    rgb = layers.Concatenate(name="to_rgb")([unit_image, unit_image, unit_image])  # ImageNet nets take 3 channels
    if cfg.backbone == "densenet121":
        x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD], name="imagenet_norm")(rgb)
    else:  # EfficientNet scales and normalises inside itself, from [0, 255]
        x = layers.Rescaling(255.0, name="to_255")(rgb)
    network = network_for(cfg.backbone, image_size)
    if weights is not None:
        load_weights(network, weights, cfg.backbone)
    # An identity layer on the map, in the outer graph: Grad-CAM (pipeline/evaluate/explain.py) takes the last
    # rank-4 activation there, and a nested model's own `.output` belongs to its inner graph.
    return layers.Activation("linear", name="backbone_features")(network(x))
