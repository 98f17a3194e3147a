"""Does the promotion gate's promise hold when an operator keeps trying? A simulation, no TensorFlow.

    .venv/bin/python benchmarks/test_reuse.py            # defaults: 1,000 repetitions, 50 attempts, 2 processes

One repetition: a test split of ~1,000 images from 700 patients (1 + Poisson(0.43) images each, as Kermany's
test set has a few patients with several images; 62% of patients positive, as in Kermany's test set), a
champion, and an operator who submits up to 50 candidates one after another, each chosen from what the gate
revealed so far. Model scores are drawn per image as a * label + patient effect + image effect + model noise,
so two models agree on the hard patients (correlation 0.8 by default, `--model-correlation`: the power
depends on it) and the champion's population AUC is 0.95.
"Equal in truth" candidates have the champion's a and noise variance: their AUC on any fresh test set is the
champion's, whatever the noise's pattern on this one.

The operator is adaptive in the way that overfits a reused test set (the "boosting attack" of Blum & Hardt,
ICML 2015): every other attempt is a fresh, independent model; it keeps those whose revealed paired difference
was positive, and every other attempt submits their normalised sum: a pattern that happens to fit this test
split's patients, and grows with every kept one. Under the raw
gate it sees every candidate's paired difference; under the mechanism (pipeline/evaluate/holdout.py) it sees
only "kept", so it has nothing to build on.

Scenarios, each decided exactly as `pneumo promote` decides superiority (the lower bound of the clustered-DeLong
interval of the paired difference above 0, `pipeline.evaluate.metrics.delong_test`):
(a) all 50 candidates equal in truth: the false promotion rate, the chance that any of them is promoted;
(b) one candidate truly better by 0.02 AUC (0.97), at a random position: the power to promote it;
(c) in (b), the bias of the promoted model's reported test AUC against its AUC on a fresh draw (the population
    AUC: the expected AUC of any fresh test set).
Raw gate: every decision at alpha = 0.05, everything revealed. Mechanism: every decision at alpha / Q with
Q = 50 queries, one bit revealed about a candidate that is not promoted.

The last line is `false_promotion_rate=<mechanism's> target=0.05`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate.metrics import auc_covariance, delong_test, wilson  # noqa: E402

PATIENTS, EXTRA_IMAGES, PREVALENCE = 700, 0.43, 0.62
SD_PATIENT, SD_IMAGE = 0.7, 0.4  # what every model shares: the patient, the image
CHAMPION_AUC, GAIN = 0.95, 0.02
ALPHA = 0.05


def model_sd(correlation: float) -> float:
    """Each model's own noise, for a correlation `correlation` between two models' scores (given the label)."""
    shared = SD_PATIENT**2 + SD_IMAGE**2
    return math.sqrt(shared * (1 - correlation) / correlation)


def separation(auc: float, sd_model: float) -> float:
    """The label effect a giving population AUC `auc`: AUC = Phi(a / (sqrt(2) * sd of a score))."""
    return NormalDist().inv_cdf(auc) * math.sqrt(2) * math.sqrt(SD_PATIENT**2 + SD_IMAGE**2 + sd_model**2)


def test_split(rng):
    images = 1 + rng.poisson(EXTRA_IMAGES, PATIENTS)
    patient = np.repeat(np.arange(PATIENTS), images)
    y = np.repeat((rng.random(PATIENTS) < PREVALENCE).astype(int), images)
    shared = rng.normal(0, SD_PATIENT, PATIENTS)[patient] + rng.normal(0, SD_IMAGE, patient.size)
    return y, patient, shared


def one_sequence(seed: int, mechanism: bool, attempts: int, better_at: int | None,
                 correlation: float) -> tuple[bool, bool, float]:
    """-> (an equal candidate was promoted, the better one was promoted, its reported test AUC or NaN)."""
    rng = np.random.default_rng(seed)
    y, patient, shared = test_split(rng)
    sd = model_sd(correlation)
    a_equal, a_better = separation(CHAMPION_AUC, sd), separation(CHAMPION_AUC + GAIN, sd)
    level = ALPHA / attempts if mechanism else ALPHA
    champion = a_equal * y + shared + rng.normal(0, sd, y.size)
    promising: list[np.ndarray] = []  # independent noises the operator saw beat the champion
    false_promotion = False
    for k in range(1, attempts + 1):
        fresh = rng.normal(0, sd, y.size)
        # Odd attempts explore (a fresh, independent model); even ones exploit: the normalised sum of the explored
        # noises that did well on this split. Still equal in truth: noise carries no signal on fresh patients.
        noise = (np.sum(promising, axis=0) / math.sqrt(len(promising)) if k % 2 == 0 and promising else fresh)
        a = a_better if k == better_at else a_equal
        candidate = a * y + shared + noise
        result = delong_test(y, candidate, champion, clusters=patient, alpha=level)
        promoted = result["ci_low"] > 0
        if k == better_at:
            if promoted:
                (auc,), _ = auc_covariance(y, [candidate], patient)
                return false_promotion, True, float(auc)
            return false_promotion, False, math.nan
        if promoted:
            false_promotion = True
            if better_at is None:
                return True, False, math.nan
            champion, promising = candidate, []  # the lucky equal model is champion now
        elif not mechanism and noise is fresh and result["diff"] > 0:  # revealed by the raw gate only
            promising.append(fresh)
    return false_promotion, False, math.nan


def run(args_tuple):
    return one_sequence(*args_tuple)


def rate(hits: int, n: int) -> str:
    low, high = wilson(hits, n)
    return f"{hits / n:.3f} [{low:.3f}, {high:.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per scenario and gate")
    parser.add_argument("--attempts", type=int, default=50, help="candidates one operator submits (= Q)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-correlation", type=float, default=0.8,
                        help="correlation of two models' scores given the label (the power depends on it)")
    a = parser.parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    positions = rng.integers(1, a.attempts + 1, a.reps)
    jobs = {}
    for mechanism in (False, True):
        r = a.model_correlation
        jobs[("equal", mechanism)] = [(a.seed * 10**6 + i, mechanism, a.attempts, None, r) for i in range(a.reps)]
        jobs[("better", mechanism)] = [(a.seed * 10**6 + a.reps + i, mechanism, a.attempts, int(positions[i]), r)
                                       for i in range(a.reps)]
    with ProcessPoolExecutor(a.workers) as pool:
        results = {key: list(pool.map(run, todo, chunksize=25)) for key, todo in jobs.items()}
    truth = CHAMPION_AUC + GAIN
    rows = []
    for mechanism in (False, True):
        false = sum(r[0] for r in results[("equal", mechanism)])
        better = results[("better", mechanism)]
        power = sum(r[1] for r in better)
        reported = [r[2] for r in better if r[1]]
        bias = float(np.mean(reported)) - truth if reported else math.nan
        rows.append((false, power, bias))
    print(f"{a.reps} repetitions, {a.attempts} adaptive attempts each; ~{PATIENTS * (1 + EXTRA_IMAGES):.0f} test "
          f"images of {PATIENTS} patients; champion AUC {CHAMPION_AUC}, better candidate {truth}; models' scores "
          f"correlated {a.model_correlation:g}")
    print(f"{'':<46}{'raw gate (alpha each)':<26}{'mechanism (alpha / Q, one bit)':<30}")
    print(f"{'(a) false promotion rate, all equal in truth':<46}{rate(rows[0][0], a.reps):<26}"
          f"{rate(rows[1][0], a.reps):<30}")
    print(f"{'(b) power, one better by ' + str(GAIN) + ' AUC':<46}{rate(rows[0][1], a.reps):<26}"
          f"{rate(rows[1][1], a.reps):<30}")
    print(f"{'(c) bias of its reported test AUC':<46}{rows[0][2]:<+26.4f}{rows[1][2]:<+30.4f}")
    print(f"targets: (a) <= 0.05 with the mechanism, (b) >= 0.8, (c) <= 0.005; {time.perf_counter() - t0:.0f} s")
    print(f"false_promotion_rate={rows[1][0] / a.reps:.3f} target=0.05")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
