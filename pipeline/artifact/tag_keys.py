"""The names of the tags a model version and its training run carry: one home, written and read only here.

A tag key written as a bare string in one module and read as another bare string elsewhere breaks silently
when one side is renamed; `tests/test_tag_keys.py` fails when a module writes or reads one of these keys
without the constant. Values are strings (MLflow tags); floats are written with `repr` (full precision).
"""

from __future__ import annotations

# --- written by training (`pipeline.study.train`) on its run, and copied to the registered version ----------
THRESHOLD = "threshold"  # the operating threshold on calibrated probabilities, decided on validation
THRESHOLD_POLICY = "threshold_policy"  # how it was decided (youden | sensitivity | robust, with a note)
TEMPERATURE = "temperature"  # the calibration temperature fitted on validation (1.0 = uncalibrated)
DATASET_DIGEST = "dataset_digest"  # the converted dataset the model was trained on (its manifest's digest)
RUN_ID = "run_id"  # the training run behind a version

# --- written by a study (`pipeline.study.tune`) on each trial's run and version ------------------------------
STUDY = "study"
TRIAL_NUMBER = "trial_number"
STUDY_METRIC = "study_metric"  # the name of the metric the study optimised (its value: a tag of that name)
VAL_AUC = "val_auc"  # the validation AUC of the final model, on every version
STUDY_RULE = "study_promotion_rule"  # on a study's parent run: its [promote] section and experiment file (JSON)

# --- written by an ensemble (`pipeline.promote.ensemble`) -----------------------------------------------------
ENSEMBLE_MEMBERS = "ensemble_members"  # "3,5,8": the versions averaged
KIND = "kind"  # "ensemble" on an ensemble's run

# --- written by a promotion (`pipeline.promote.record`) ------------------------------------------------------
MODEL_SHA256 = "model_sha256"  # the artifact's hash, verified at every load (`pipeline.artifact.integrity`)
PROMOTED_AT = "promoted_at"
PROMOTED_OVER = "promoted_over"
PROMOTION_RULE = "promotion_rule"
PROMOTION_RUN_ID = "promotion_run_id"
REPLACED_AT = "replaced_at"
REPLACED_BY = "replaced_by"
POINTING_GAME = "pointing_game"  # Grad-CAM pointing-game score on the test split (`--log-images`)
