"""Calibrated probabilities: temperature scaling fitted on validation, and the expected calibration error.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides the model's
logit by one scalar T fitted by minimising the negative log-likelihood on the validation split. It is monotone,
so it changes no ranking (AUC is unchanged) and a threshold moves with it: `apply_temperature(threshold, T)`
is the same decision on the calibrated scale. T > 1 softens an over-confident model, T < 1 sharpens one.

The temperature travels with a model version (tag `temperature`); `pipeline.artifact.model_store` applies it, so the
`probability` that predict, evaluate, explain and the served model report is the calibrated one.
"""

from __future__ import annotations

import numpy as np

# Probabilities are clipped away from 0 and 1 before the logit: float32 sigmoids saturate at exactly 1.0.
EPS = 1e-7
T_BOUNDS = (0.05, 20.0)  # beyond these the model is constant or a step function: refit, do not extrapolate
ECE_BINS = 15  # Guo et al.'s choice; equal-width bins over [0, 1]


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): the calibrated probability (T = 1 returns p unchanged)."""
    p = np.asarray(p, dtype=np.float64)
    if temperature == 1.0:
        return p
    return 1.0 / (1.0 + np.exp(-logit(p) / float(temperature)))


def nll(y, p) -> float:
    """Mean binary cross-entropy (negative log-likelihood) of labels `y` under probabilities `p`."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(y, p) -> float:
    """The T minimising validation NLL of sigmoid(logit(p)/T), by bounded scalar search on log T.

    Needs both classes (with one class the NLL keeps falling as T -> 0: no finite optimum)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("temperature scaling needs both classes in the fitting split")
    z = logit(p)

    def loss(log_t: float) -> float:
        q = 1.0 / (1.0 + np.exp(-z / np.exp(log_t)))
        return nll(y, q)

    res = minimize_scalar(loss, bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def expected_calibration_error(y, p, n_bins: int = ECE_BINS) -> float:
    """ECE: the |accuracy - confidence| gap per equal-width probability bin, weighted by the bin's share.

    For a binary classifier "confidence" is the predicted probability of the positive class and "accuracy"
    the observed positive rate in the bin (the reliability-diagram form, Naeini et al., AAAI 2015)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0:
        raise ValueError("ECE of an empty set")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)
