"""Test-time augmentation (pipeline/net/tta.py): the fixed views and the averaging wrapper. That a promoted
candidate built with them is what predict and serving score: tests/test_ensemble.py."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import CHOICES, ConfigError, load_config
from pipeline.net.augment import FixedAffine
from pipeline.net.model import build_model, load_network
from pipeline.net.tta import VIEWS, with_views
from tests.conftest import REPO


def _net(size: int = 32, **model):
    cfg = load_config(REPO / "experiments" / "smoke.toml", [f"model.{k}={v}" for k, v in model.items()])
    return build_model(cfg.model, cfg.augment, size, seed=1)


def _images(n: int = 6, size: int = 32) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_the_config_choices_are_the_view_sets():
    assert tuple(CHOICES["promote.tta"]) == tuple(VIEWS)
    with pytest.raises(ConfigError, match="promote.tta"):
        load_config(REPO / "experiments" / "smoke.toml", ["promote.tta=strong"])
    with pytest.raises(ValueError, match="promote.tta must be one of"):
        with_views(_net(), "strong")


def test_fixed_affine_shifts_and_zooms_about_the_centre():
    img = np.zeros((1, 32, 32, 1), np.uint8)
    img[0, 14:18, 14:18] = 255
    moved = np.asarray(FixedAffine(1.0, 0.25, 0.0)(img))[0, ..., 0]
    assert np.nonzero(moved.max(axis=0))[0].tolist() == [22, 23, 24, 25]  # 0.25 x 32 = 8 px to the right
    assert np.nonzero(moved.max(axis=1))[0].tolist() == [14, 15, 16, 17]  # rows unchanged
    down = np.asarray(FixedAffine(1.0, 0.0, 0.125)(img))[0, ..., 0]
    assert np.nonzero(down.max(axis=1))[0].tolist() == [18, 19, 20, 21]
    zoomed_in = np.asarray(FixedAffine(0.5, 0.0, 0.0)(img))[0, ..., 0]
    cols = np.nonzero(zoomed_in.max(axis=0) > 0)[0]
    assert cols.min() >= 11 and cols.max() <= 20 and len(cols) >= 8  # the 4 px square twice as wide, centred
    zoomed_out = np.asarray(FixedAffine(2.0, 0.0, 0.0)(np.full((1, 32, 32, 1), 200, np.uint8)))[0, ..., 0]
    assert zoomed_out[16, 16] == 200 and zoomed_out[0, 0] == 0  # black margins outside the film
    assert np.asarray(FixedAffine(1.0, 0.0, 0.0)(img)).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(FixedAffine(1.0, 0.0, 0.0)(img)), img)  # identity is exact


def test_the_wrapper_outputs_the_mean_over_the_image_and_its_views():
    net = _net()
    assert with_views(net, "none") is net
    wrapped = with_views(net, "mild")
    x = _images()
    per_view = [net.predict_on_batch({"image": x})]
    for scale, sx, sy in VIEWS["mild"]:
        per_view.append(net.predict_on_batch({"image": np.asarray(FixedAffine(scale, sx, sy)(x))}))
    np.testing.assert_allclose(wrapped.predict_on_batch({"image": x}), np.mean(per_view, axis=0), atol=1e-6)
    # the views differ: the average is not just the image's own score
    assert np.abs(per_view[1] - per_view[0]).max() > 1e-5
    # one copy of the weights: the network is nested once
    assert sum(layer is net for layer in wrapped.layers) == 1 and wrapped.count_params() == net.count_params()


def test_metadata_goes_to_every_view_and_the_wrapper_saves_and_loads(tmp_path):
    net = _net(metadata_inputs="true")
    wrapped = with_views(net, "mild")
    assert {t.name.split(":")[0] for t in wrapped.inputs} == {"image", "meta"}
    x = _images(4)
    a = wrapped.predict_on_batch({"image": x, "meta": np.zeros((4, 6), np.float32)})
    b = wrapped.predict_on_batch({"image": x, "meta": np.ones((4, 6), np.float32)})
    assert np.abs(a - b).max() > 1e-6
    wrapped.save(tmp_path / "m.keras")
    loaded = load_network(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(loaded.predict_on_batch({"image": x, "meta": np.zeros((4, 6), np.float32)}), a,
                               atol=1e-6)


def test_grad_cam_explains_the_network_inside_the_views_and_inside_an_ensemble_of_them():
    from pipeline.evaluate.explain import ensemble_members, gradcam
    from pipeline.promote.ensemble import build_model as build_ensemble

    net_a, net_b = _net(), _net(filters=6)
    assert ensemble_members(with_views(net_a, "mild")) == [net_a]
    ensemble = build_ensemble([with_views(net_a, "mild"), with_views(net_b, "mild")], ["1", "2"])
    members = ensemble_members(ensemble)
    assert len(members) == 2 and all(type(m.get_layer("stem_conv")).__name__ == "Conv2D" for m in members)
    # The ensemble's map is its members' own maps (each on the image as it is), averaged and renormalised.
    mean = (gradcam(net_a, _images(2)) + gradcam(net_b, _images(2))) / 2
    expected = mean / mean.max(axis=(1, 2), keepdims=True)
    assert not np.allclose(gradcam(net_a, _images(2)), expected, atol=1e-3)  # both members count
    heat = gradcam(ensemble, _images(2))
    assert heat.shape == (2, 32, 32)
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    # the promoted form: the views around the members' mean
    views_around = with_views(build_ensemble([net_a, net_b], ["1", "2"]), "mild")
    assert [m.name for m in ensemble_members(views_around)] == ["member_1", "member_2"]
    np.testing.assert_allclose(gradcam(views_around, _images(2)), expected, atol=1e-5)
