"""The promotion rule (pipeline.promote.gate) and the reusable holdout (pipeline.evaluate.holdout) on constructed evidence."""

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


def test_thresholdout_answers_and_spends(tmp_path):
    from pipeline.artifact import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.setup(uri)
    t = holdout.Thresholdout(client, "d" * 64, budget=2, threshold=0.02, sigma=0.0)
    close = t.query("1", 0.90, 0.905)  # within the threshold: the validation AUC is the answer
    assert (close.answered, close.source, close.spent) == (0.90, "validation", False)
    far = t.query("2", 0.90, 0.80)
    assert far.spent and far.source == "test+noise" and far.answered == 0.80 and t.left == 1
    holdout.record(client, uri, digest="d" * 64, split="test", command="promote", versions=["1", "2"],
                   answered={}, data_dir="x", extra=t.ledger_tags())
    again = holdout.Thresholdout(client, "d" * 64, budget=2, threshold=0.02, sigma=0.0)
    assert again.used == 1 and again.left == 1
    with_noise = holdout.Thresholdout(client, "e" * 64, budget=5, threshold=0.02, sigma=0.01,
                                      rng=np.random.default_rng(0))
    answers = [with_noise.query("1", 0.9, 0.7).answered for _ in range(3)]
    assert all(a != 0.7 and abs(a - 0.7) < 0.2 for a in answers) and len(set(answers)) == 3
    assert len(holdout.reads(client, "d" * 64)) == 1 and holdout.reads(client, "e" * 64) == []


def test_spent_budget_refuses_with_the_way_out(tmp_path):
    from pipeline.artifact import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.setup(uri)
    t = holdout.Thresholdout(client, "f" * 64, budget=1, threshold=0.0, sigma=0.0)
    t.require_budget("tfrecords/x")
    assert t.query("1", 0.9, 0.8).spent and t.left == 0
    assert math.isnan(t.query("2", 0.9, 0.8).answered)  # no budget left inside this decision: no answer
    with pytest.raises(holdout.HoldoutSpent, match=r"tfrecords/x: the reusable-holdout budget .* spent .* "
                                                   r"bring a fresh test split.*pneumo convert"):
        t.require_budget("tfrecords/x")
