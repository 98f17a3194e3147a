"""The promotion rule (pipeline.promote.gate) and the test split's budget (pipeline.evaluate.holdout) on constructed evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate import holdout
from pipeline.promote import gate


def _eval(version, y, p, pid=None, threshold=0.5):
    from pipeline.evaluate.metrics import compute_metrics

    pid = list(pid if pid is not None else range(len(y)))
    m = compute_metrics(y, p, threshold, n_boot=300, clusters=pid)
    return gate.Evaluation(version=version, metrics=m, subgroups=[], threshold=threshold, threshold_source="t",
                           labels=np.asarray(y), probabilities=np.asarray(p), patient_id=pid, report={})


def _data(n=400, d=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    latent = rng.normal(size=n) + d * y
    return y, rng, latent


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _decide(rule, cand, champ, cand_value=0.9, champ_value=0.9, externals=None):
    cmp = gate.compare(cand, champ, rule.alpha, 500) if champ is not None else None
    return gate.decide(rule, cand, champ, cmp, study_metric="val_auc", candidate_value=cand_value,
                       champion_value=champ_value if champ is not None else None, lower_is_better=False,
                       externals=externals)


@pytest.mark.parametrize("policy", gate.POLICIES)
def test_a_model_against_itself_is_never_promoted(policy):
    y, _, latent = _data()
    p = _sig(latent)
    v = _decide(gate.Rule(policy=policy), _eval("2", y, p), _eval("1", y, p))
    assert v.outcome == "rejected"
    assert "NOT above 0" in v.reason if policy == "superiority" else "NOT better" in v.reason


def test_superiority_needs_the_lower_bound_above_zero():
    y, rng, latent = _data(n=600)
    good, bad = _sig(latent), _sig(latent + rng.normal(0, 2.5, latent.size))
    rule = gate.Rule(policy="superiority")
    up = _decide(rule, _eval("2", y, good), _eval("1", y, bad))
    assert up.outcome == "promoted" and up.checks[0][1]
    down = _decide(rule, _eval("2", y, bad), _eval("1", y, good))
    assert down.outcome == "rejected"
    # A tiny gain inside the noise is not a promotion
    slightly = _sig(latent + rng.normal(0, 0.05, latent.size))
    tie = _decide(rule, _eval("2", y, slightly), _eval("1", y, _sig(latent + rng.normal(0, 0.05, latent.size))))
    assert tie.outcome == "rejected"


def test_non_inferiority_margin_and_study_metric():
    y, rng, latent = _data(n=600)
    a = _sig(latent + rng.normal(0, 0.3, latent.size))
    b = _sig(latent + rng.normal(0, 0.3, latent.size))
    rule = gate.Rule(policy="non_inferiority", margin=0.05)
    assert _decide(rule, _eval("2", y, a), _eval("1", y, b), cand_value=0.95, champ_value=0.9).outcome == "promoted"
    worse_val = _decide(rule, _eval("2", y, a), _eval("1", y, b), cand_value=0.85, champ_value=0.9)
    assert worse_val.outcome == "rejected" and "study metric val_auc" in worse_val.reason
    much_worse = _sig(latent + rng.normal(0, 3, latent.size))
    v = _decide(rule, _eval("2", y, much_worse), _eval("1", y, b), cand_value=0.95, champ_value=0.9)
    assert v.outcome == "rejected" and "NOT above -0.05" in v.reason


def test_first_champion_must_clear_the_floor():
    y, rng, latent = _data(n=300)
    rule = gate.Rule(floor_auc=0.7)
    assert _decide(rule, _eval("1", y, _sig(latent), threshold=_sig(1.0)), None).outcome == "promoted"
    chance = _sig(rng.normal(size=y.size))
    v = _decide(rule, _eval("1", y, chance), None)
    assert v.outcome == "rejected" and "NOT above the floor 0.7" in v.reason
    # good ranking but a threshold that answers "negative" for everyone: accuracy = the baseline, not above it
    v = _decide(rule, _eval("1", y, _sig(latent), threshold=1.0), None)
    assert v.outcome == "rejected" and "NOT above the majority baseline" in v.reason


def test_required_external_sets():
    y, rng, latent = _data(n=400)
    good, bad = _sig(latent), _sig(latent + rng.normal(0, 3, latent.size))
    rule = gate.Rule(policy="superiority", require_external=("site2",))
    cand, champ = _eval("2", y, good), _eval("1", y, bad)
    missing = _decide(rule, cand, champ)
    assert missing.outcome == "rejected" and "--external site2=DATA" in missing.reason
    ey, erng, elat = _data(n=300, seed=9)
    ext_c, ext_h = _eval("2", ey, _sig(erng.normal(size=300))), _eval("1", ey, _sig(elat))  # worse outside
    cmp = gate.compare(ext_c, ext_h, 0.05, 300)
    v = _decide(rule, cand, champ, externals={"site2": (ext_c, ext_h, cmp)})
    assert v.outcome == "rejected" and v.reason.startswith("not promoted: external site2")
    ok = _decide(rule, cand, champ, externals={"site2": (ext_h, ext_c, gate.compare(ext_h, ext_c, 0.05, 300))})
    assert ok.outcome == "promoted"


def _a_fraction(text: str) -> bool:
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


def _store(tmp_path):
    from pipeline.artifact import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, tracking.setup(uri)


def _charge(client, uri, digest, queries, command="promote"):
    return holdout.charge(client, uri, digest=digest, split="test", command=command, versions=["1"],
                          data_dir="tfrecords/x", queries=queries)


def test_every_read_is_one_query_and_a_spent_budget_refuses(tmp_path):
    uri, client = _store(tmp_path)
    first = _charge(client, uri, "d" * 64, queries=2)
    assert (first.query, first.queries, first.left) == (1, 2, 1) and first.level(0.05) == pytest.approx(0.025)
    second = _charge(client, uri, "d" * 64, queries=2, command="evaluate")
    assert second.query == 2 and second.left == 0
    with pytest.raises(holdout.BudgetSpent, match=r"tfrecords/x: the test split of dataset dddddddddddd has answered "
                                                  r"all 2 of its queries.*bring a fresh test split.*pneumo convert"):
        _charge(client, uri, "d" * 64, queries=2)
    # The budget is the one the split's first read recorded: a later, larger one does not reopen it.
    with pytest.raises(holdout.BudgetSpent):
        _charge(client, uri, "d" * 64, queries=100)
    assert len(holdout.reads(client, "d" * 64)) == 2  # the refused reads wrote nothing
    # Another split has its own budget; the ledger holds outcomes in words, never a test number.
    other = _charge(client, uri, "e" * 64, queries=5)
    holdout.settle(client, other, "kept")
    (entry,) = holdout.reads(client, "e" * 64)
    assert entry.data.tags["outcome"] == "kept" and not entry.data.metrics
    assert [v for v in entry.data.tags.values() if _a_fraction(v)] == []
    # test_queries = 0: uncorrected, unlimited (tests and benchmarks only)
    raw = [_charge(client, uri, "f" * 64, queries=0) for _ in range(3)]
    assert [c.level(0.05) for c in raw] == [0.05] * 3 and raw[-1].left == math.inf
    assert "UNCORRECTED" in raw[0].describe(0.05) and "query 1 of 2" in first.describe(0.05)


def test_two_readers_racing_for_the_last_query_cannot_both_have_it(tmp_path, monkeypatch):
    """Both checked the count before either wrote (the race); whoever the store orders later is refused."""
    uri, client = _store(tmp_path)
    real = holdout.record

    def rival_writes_first(*args, **kwargs):  # the other reader's append lands just before ours
        monkeypatch.setattr(holdout, "record", real)
        real(*args, **{**kwargs, "command": "rival"})
        return real(*args, **kwargs)

    monkeypatch.setattr(holdout, "record", rival_writes_first)
    with pytest.raises(holdout.BudgetSpent):
        _charge(client, uri, "a" * 64, queries=1)
    entries = holdout.reads(client, "a" * 64)
    assert [e.data.tags["command"] for e in entries] == ["rival", "promote"]
    assert entries[1].data.tags["outcome"].startswith("refused")
