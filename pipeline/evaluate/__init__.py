"""Evaluation: statistics, figures, the shift battery, scoring a split (`pneumo evaluate`), Grad-CAM, the test ledger."""
