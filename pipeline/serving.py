"""Import shim for models logged before the layout change (issue 19): keep it while such versions exist.

MLflow pickles a pyfunc's class by its module path, so every version logged before `pipeline/` was grouped into
subpackages names `pipeline.serving.PneumoniaModel` in its `python_model.pkl`. The class lives in
`pipeline/artifact/serving.py` now; this module only makes the old path resolve to it
(`tests/test_legacy_models.py` loads such a model).
"""

from pipeline.artifact.serving import PneumoniaModel  # noqa: F401
