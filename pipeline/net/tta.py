"""Test-time augmentation: the logged network averages its probability over a fixed, small set of mild views.

`with_views(network, "mild")` wraps a trained network in a Keras model that scores the image as it is and under
four fixed views (zoom in and out by 5%, shift left and right by 3% of the width), and outputs the mean of the
five probabilities. The views sit inside the model that is validated, calibrated, logged and served, so
`pneumo evaluate`, `pneumo predict`, the served pyfunc and an ensemble of such models all average the same
views without knowing they exist; the threshold and temperature are fitted on the averaged output.

Why these views: they lie inside the training augmentation (`augment.zoom` 0.1, `augment.translation` 0.05), so
each view is an image the network was trained to score, and together they average out the network's response to
where the lungs sit in the frame, which differs between sites (field of view, positioning). No flips (the heart
is on the left) and no intensity views: the held-out battery families (`train.shift_held_out`: JPEG, gamma,
letterbox, zoom-out at 0.85 and 0.7) are further from every view than the training augmentation is, so the
proxy (pipeline/study/proxy.py) measures TTA on conditions it was not built from. Averaging probabilities, not
logits, as the ensemble does (pipeline/promote/ensemble.py), so one view cannot dominate. Cost: the views
multiply inference (5x for "mild"): README, "A proxy for travels", has the measured cost and effect.
"""

from __future__ import annotations

import keras

from pipeline.net.augment import FixedAffine

# name -> the views besides the image itself, each (scale, shift_x, shift_y) for FixedAffine
VIEWS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "none": (),
    "mild": ((0.95, 0.0, 0.0), (1.05, 0.0, 0.0), (1.0, -0.03, 0.0), (1.0, 0.03, 0.0)),
}


def with_views(network: keras.Model, views: str) -> keras.Model:
    """`network` wrapped to average its output over the image and `VIEWS[views]` ("none": `network` itself).

    The wrapper takes the network's inputs (the metadata, when there is one, goes to every view unchanged) and
    nests the network once, so its weights are shared and Grad-CAM finds it (pipeline/evaluate/explain.py)."""
    if views not in VIEWS:
        raise ValueError(f"promote.tta must be one of {', '.join(VIEWS)}, got {views!r}")
    if not VIEWS[views]:
        return network
    inputs = {t.name.split(":")[0]: keras.Input(t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0])
              for t in network.inputs}
    outputs = [network(inputs)]
    for i, (scale, shift_x, shift_y) in enumerate(VIEWS[views], start=1):
        view = FixedAffine(scale, shift_x, shift_y, name=f"view{i}")(inputs["image"])
        outputs.append(network({**inputs, "image": view}))
    # float32 whatever the global policy, like the ensemble's mean: a float16 mean would round it.
    mean = keras.layers.Average(dtype="float32", name="probability")(outputs)
    return keras.Model(inputs, mean, name=f"{network.name}_tta")
