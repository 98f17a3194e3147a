"""Test-set reuse under control: every read of a test split is charged against that split's budget of queries.

Each promotion re-scores models on the same locked test split; an operator who keeps submitting candidates (or
keeps running studies until one passes) ends up selecting on that split's noise. The defence, in two parts:

- **What is revealed** (pipeline/promote/promotion.py): about a candidate that is not promoted, one bit: "kept".
  Its test AUC, interval, paired difference and which check failed are printed, tagged, logged and carded
  nowhere. Only a promoted candidate's test results are published (it is the champion now). This is the
  revelation rule of the Ladder (Blum & Hardt, "The Ladder: a reliable leaderboard for machine learning
  competitions", ICML 2015): a score is released only when it beats the best so far.
- **How each decision is tested** (this module): a test split has a budget of Q queries (`[promote]
  test_queries`, recorded in the ledger by the split's first read, so a later config cannot enlarge it); every
  decision is taken at level alpha / Q (Bonferroni; Dunn, "Multiple comparisons among means", JASA 1961).

Why the two together bound false promotions: until a split's first promotion, everything the gate has said
about that split is "kept", so the operator's candidates cannot depend on its test data; the chance that any
of at most Q such decisions promotes a candidate no better than the champion is then at most Q x alpha / Q =
alpha, however the candidates were chosen. After a promotion the champion's results are public; later
decisions are still each at alpha / Q, but that argument no longer covers an operator who tunes candidates to
the published champion figures (README, "What the gate guarantees"). `benchmarks/test_reuse.py` measures both
the rate with this mechanism and with the raw gate, under an adaptive operator.

The ledger: every read (`pneumo promote`, dry runs, forced versions, `pneumo evaluate --split test|all`,
external sets) is an MLflow run in the experiment `test-ledger`, tagged with the dataset digest, the command,
the versions and the outcome ("kept", "promoted", ...), never a test number. `charge` appends the read first
and only then counts the reads before it, so two concurrent readers cannot both take the last query (the
later one in the store's order is refused). There is no secret state: nothing an operator could read from
the store would let them predict a decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.artifact import tag_keys, tracking
from pipeline.errors import InputError

LEDGER = "test-ledger"
QUERIES_TAG = "test_queries"  # the split's budget, recorded by its first read
CHARGED_TAG = "charged"


class BudgetSpent(InputError):
    """The test split's budget of queries is spent (exit 2: bring a fresh test split)."""


@dataclass(frozen=True)
class Charge:
    """One charged read of a test split: the `query`-th of `queries` (0: no budget, the raw gate)."""

    run_id: str
    digest: str
    query: int
    queries: int

    def level(self, alpha: float) -> float:
        """The level a decision on this read is taken at: alpha / Q (alpha itself when uncorrected)."""
        return alpha / self.queries if self.queries else alpha

    @property
    def left(self) -> float:
        return self.queries - self.query if self.queries else math.inf

    def describe(self, alpha: float) -> str:
        if not self.queries:
            return (f"UNCORRECTED (test_queries = 0): each decision at level {alpha:g}; test reuse is not "
                    "controlled on this split")
        return (f"query {self.query} of {self.queries} on this test split, decided at level alpha / "
                f"{self.queries} = {self.level(alpha):.4g} (Bonferroni); {self.queries - self.query} left")


def reads(client, digest: str, split: str | None = "test") -> list:
    """The ledger entries (MLflow runs, oldest first) that read `split` of the dataset `digest`."""
    exp = client.get_experiment_by_name(LEDGER)
    if exp is None:
        return []
    query = f"tags.dataset_digest = '{digest}'" + (f" and tags.split = '{split}'" if split else "")
    runs = client.search_runs([exp.experiment_id], query, max_results=50000,
                              order_by=["attributes.start_time ASC"])
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))  # one total order for every reader


def recorded_queries(entries: list) -> int | None:
    """The budget the split's first charged read recorded (None: never charged)."""
    for e in entries:
        if e.data.tags.get(CHARGED_TAG) == "1" and QUERIES_TAG in e.data.tags:
            return int(e.data.tags[QUERIES_TAG])
    return None


def spent_message(data_dir: str, digest: str, queries: int) -> str:
    return (f"{data_dir}: the test split of dataset {digest[:12]} has answered all {queries} of its queries "
            "(promotions, dry runs and test evaluations): a further decision on it could no longer be trusted; "
            "bring a fresh test split: convert new patients into a new dataset (`pneumo convert ... --out NEW`), "
            "train on it and promote with --data NEW")


def record(client, uri: str, *, digest: str, split: str, command: str, versions: list[str], data_dir: str,
           extra: dict | None = None) -> str:
    """One ledger entry (no test numbers in it); returns its run id."""
    exp_id = tracking.ensure_experiment(LEDGER, uri)
    tags = {tag_keys.DATASET_DIGEST: digest, "split": split, "command": command, "versions": ",".join(versions),
            "data_dir": str(data_dir)}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    run = client.create_run(exp_id, run_name=f"{command}:{split}:{digest[:12]}", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def charge(client, uri: str, *, digest: str, split: str, command: str, versions: list[str], data_dir: str,
           queries: int) -> Charge:
    """Spend one query of the test split `digest` (BudgetSpent when none is left) -> the Charge.

    `queries` is the budget to record when this is the split's first read; a split that has one keeps it."""
    entries = reads(client, digest, split)
    budget = recorded_queries(entries)
    budget = queries if budget is None else budget
    if budget and sum(e.data.tags.get(CHARGED_TAG) == "1" for e in entries) >= budget:
        raise BudgetSpent(spent_message(data_dir, digest, budget))  # checked before writing: nothing to undo
    run_id = record(client, uri, digest=digest, split=split, command=command, versions=versions,
                    data_dir=data_dir, extra={CHARGED_TAG: "1", QUERIES_TAG: budget, "outcome": "pending"})
    # Count again with this read in: a concurrent reader may have charged meanwhile. The order is the store's
    # (start time, run id), the same for every reader, so exactly the reads beyond the budget are refused.
    entries = reads(client, digest, split)
    budget = recorded_queries(entries) or budget
    charged = [e.info.run_id for e in entries if e.data.tags.get(CHARGED_TAG) == "1"]
    position = charged.index(run_id) + 1
    if budget and position > budget:
        client.set_tag(run_id, "outcome", "refused: budget spent")
        raise BudgetSpent(spent_message(data_dir, digest, budget))
    return Charge(run_id=run_id, digest=digest, query=position, queries=budget)


def settle(client, c: Charge, outcome: str) -> None:
    """What the charged read decided, in words with no test numbers ("kept", "promoted", "evaluated")."""
    settle_entry(client, c.run_id, outcome)


def settle_entry(client, run_id: str, outcome: str) -> None:
    """`settle` by the ledger entry's run id (a rerun completing an interrupted promotion knows only that)."""
    client.set_tag(run_id, "outcome", outcome)
