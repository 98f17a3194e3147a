"""Test-set reuse under control: a ledger of every decision that read a test split, and a reusable holdout.

Each promotion re-scores models on the same locked test split; a user who keeps promoting (or keeps running
studies until one passes) ends up selecting on that split's noise. Two defences:

- The ledger: every read of a test split (`pneumo promote`, `pneumo evaluate --split test`, external sets) is
  an MLflow run in the experiment `test-ledger`, tagged with the dataset digest: when, by which command, which
  versions, what was answered. `reads(client, digest)` counts them per test split.
- Thresholdout (Dwork, Feldman, Hardt, Pitassi, Reingold & Roth, "The reusable holdout: preserving validity in
  adaptive data analysis", Science 349:636, 2015). For each version the gate looks at, it answers the test AUC
  only when it differs from the validation AUC by more than a noisy threshold T + gamma + eta (gamma ~ Lap(2
  sigma), eta ~ Lap(4 sigma)); the answer is then the test AUC + Lap(sigma) noise, one unit of the budget is
  spent and gamma is drawn again. Otherwise it answers the validation AUC: the test split confirmed it and
  leaks nothing more. When the budget is spent, `promote` refuses until a fresh test split is brought in
  (new patients converted into a new dataset, whose digest starts a new ledger and a new budget).

Noise comes from the operating system's entropy (not a seed): a predictable noise would protect nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from pipeline.artifact import tag_keys, tracking
from pipeline.errors import InputError

LEDGER = "test-ledger"


class HoldoutSpent(InputError):
    """The reusable holdout's budget for this test split is spent (exit 2: bring a fresh test split)."""


@dataclass
class Answer:
    version: str
    val_auc: float
    answered: float  # what the gate reports as this version's test AUC
    source: str  # "validation" (test agreed within the noisy threshold) | "test+noise"
    spent: bool


def reads(client, digest: str, split: str | None = "test") -> list:
    """The ledger entries (MLflow runs, oldest first) that read `split` of the dataset `digest`."""
    exp = client.get_experiment_by_name(LEDGER)
    if exp is None:
        return []
    query = f"tags.dataset_digest = '{digest}'" + (f" and tags.split = '{split}'" if split else "")
    runs = client.search_runs([exp.experiment_id], query, max_results=50000, order_by=["attributes.start_time ASC"])
    return list(runs)


def record(client, uri: str, *, digest: str, split: str, command: str, versions: list[str], answered: dict,
           data_dir: str, extra: dict | None = None) -> str:
    """One ledger entry; returns its run id."""
    exp_id = tracking.ensure_experiment(LEDGER, uri)
    tags = {tag_keys.DATASET_DIGEST: digest, "split": split, "command": command, "versions": ",".join(versions),
            "data_dir": str(data_dir), "answered": json.dumps(answered, default=str)[:4000]}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    run = client.create_run(exp_id, run_name=f"{command}:{split}:{digest[:12]}", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


class Thresholdout:
    """The reusable holdout of one test split; its state (spent budget, current gamma) lives in the ledger."""

    def __init__(self, client, digest: str, budget: int, threshold: float, sigma: float, rng=None):
        self.client, self.digest = client, digest
        self.budget, self.threshold, self.sigma = budget, threshold, sigma
        self.rng = rng or np.random.default_rng()
        entries = reads(client, digest)
        self.used = sum(int(e.data.tags.get("holdout_spent", "0") or 0) for e in entries)
        self.gamma = float(entries[-1].data.tags["holdout_gamma"]) if entries and \
            "holdout_gamma" in entries[-1].data.tags else self._lap(2 * sigma)
        self.spent_now = 0

    def _lap(self, scale: float) -> float:
        return float(self.rng.laplace(0.0, scale)) if scale > 0 else 0.0

    @property
    def left(self) -> int:
        return self.budget - self.used - self.spent_now

    def require_budget(self, data_dir: str) -> None:
        if self.left <= 0:
            raise HoldoutSpent(
                f"{data_dir}: the reusable-holdout budget of this test split (dataset {self.digest[:12]}) is spent "
                f"({self.used} of {self.budget} test answers used): its test AUCs can no longer be trusted; bring a "
                "fresh test split: convert new patients into a new dataset (`pneumo convert ... --out NEW`), "
                "train on it and promote with --data NEW")

    def query(self, version: str, val_auc: float, test_auc: float) -> Answer:
        """One answer of the reusable holdout (Dwork et al. 2015, Thresholdout)."""
        if not math.isfinite(val_auc):  # nothing to compare with: the test answer costs budget
            gap_exceeds = True
        else:
            gap_exceeds = abs(test_auc - val_auc) > self.threshold + self.gamma + self._lap(4 * self.sigma)
        if gap_exceeds and self.left > 0:
            self.spent_now += 1
            self.gamma = self._lap(2 * self.sigma)
            return Answer(version, val_auc, test_auc + self._lap(self.sigma), "test+noise", True)
        if gap_exceeds:  # budget ran out within this decision: no test answer can be given
            return Answer(version, val_auc, math.nan, "budget spent", False)
        return Answer(version, val_auc, val_auc, "validation", False)

    def ledger_tags(self) -> dict:
        return {"holdout_spent": self.spent_now, "holdout_gamma": f"{self.gamma:.6f}",
                "holdout_budget_left": self.left, "holdout_budget": self.budget}
