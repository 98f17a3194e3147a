"""Studies: one training run (`pneumo train`), Optuna studies of it (`pneumo tune`), the study summary."""
