"""model.backbone: a keras.applications network in place of the project's stem and blocks, its weights from a
local file (random weights here, at 32 px: these machines have no ImageNet weights)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.config import AugmentConfig, ConfigError, ModelConfig, load_config
from pipeline.net.backbone import network_for
from pipeline.net.model import build_model, load_network

SIZE = 32
REPO = Path(__file__).resolve().parents[1]
NO_AUG = AugmentConfig(rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0)


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def densenet_weights(tmp_path_factory):
    """A DenseNet-121 weights file without the classifier, as a user would download it (random values here)."""
    keras.utils.set_random_seed(7)
    path = tmp_path_factory.mktemp("weights") / "densenet121_notop.weights.h5"
    net = network_for("densenet121", SIZE)
    net.save_weights(path)
    return path, net.get_weights()


def test_the_backbone_loads_the_users_weights_file_and_the_saved_model_carries_them(densenet_weights, tmp_path):
    path, saved = densenet_weights
    cfg = ModelConfig(backbone="densenet121", backbone_weights=str(path), dense_units=8)
    m = build_model(cfg, NO_AUG, SIZE)
    loaded = m.get_layer("backbone").get_weights()
    assert len(loaded) == len(saved) and all(np.array_equal(a, b) for a, b in zip(loaded, saved, strict=True))
    keras.utils.set_random_seed(8)
    fresh = build_model(ModelConfig(backbone="densenet121", dense_units=8), NO_AUG, SIZE).get_layer("backbone")
    assert not np.array_equal(fresh.get_weights()[0], saved[0])  # random init differs: the file was read
    # Grey in, 3 channels to the ImageNet network, the project's head after it.
    assert m.get_layer("backbone").input.shape[-1] == 3 and m.output.shape == (None, 1)
    # The .keras file holds the network and its weights: serving needs no weights file.
    m.save(tmp_path / "m.keras")
    path.rename(tmp_path / "gone.h5")
    try:
        again = load_network(str(tmp_path / "m.keras"))
        x = {"image": _images()}
        np.testing.assert_allclose(again.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5)
    finally:
        (tmp_path / "gone.h5").rename(path)


def test_an_efficientnet_backbone_trains_and_grad_cam_reads_its_feature_map():
    from pipeline.evaluate.explain import GradCam

    keras.utils.set_random_seed(0)
    m = build_model(ModelConfig(backbone="efficientnetb0", dense_units=0, dropout=0.0), NO_AUG, SIZE)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    x = {"image": _images(8)}
    y = np.array([0, 1] * 4, dtype=np.float32)[:, None]
    before = m.get_layer("backbone").trainable_weights[0].numpy().copy()
    history = m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(before, m.get_layer("backbone").trainable_weights[0].numpy())  # the backbone is fine-tuned
    assert np.isfinite(history.history["loss"]).all()
    cam = GradCam(m)
    assert cam.layer.name == "backbone_features"  # the backbone's last map, in the outer graph
    heat, p = cam(x["image"][:2])
    assert heat.shape == (2, SIZE, SIZE) and np.isfinite(heat).all()
    np.testing.assert_allclose(p, m.predict(x, verbose=0)[:2, 0], atol=1e-5)


def test_backbone_mistakes_are_one_line_config_errors(densenet_weights, tmp_path):
    path, _ = densenet_weights
    with pytest.raises(ConfigError, match=r"model.backbone_weights '.*missing.h5': no such file .*"
                                          r"densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        build_model(ModelConfig(backbone="densenet121", backbone_weights=str(tmp_path / "missing.h5")), NO_AUG, SIZE)
    with pytest.raises(ConfigError, match=r"not efficientnetb0 weights without the classifier"):
        build_model(ModelConfig(backbone="efficientnetb0", backbone_weights=str(path)), NO_AUG, SIZE)
    with pytest.raises(ConfigError, match="needs images of at least 32 px, got 16 px"):
        build_model(ModelConfig(backbone="densenet121"), NO_AUG, 16)
    with pytest.raises(ConfigError, match="only read with a model.backbone"):
        build_model(ModelConfig(backbone_weights=str(path)), NO_AUG, SIZE)
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(REPO / "experiments" / "smoke.toml", ["model.backbone=resnet50"])
    (tmp_path / "junk.h5").write_bytes(b"not HDF5")
    with pytest.raises(ConfigError, match="junk.h5': not densenet121 weights without the classifier"):
        build_model(ModelConfig(backbone="densenet121", backbone_weights=str(tmp_path / "junk.h5")), NO_AUG, SIZE)
