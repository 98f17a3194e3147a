"""What a promotion decided, and where it is written down: the decision run, the version tags, the model card.

`pipeline.promote.promotion.promote` decides; this module records: an MLflow run `promote:<version>` in the experiment
`promotions` (the rule, both evaluations, the paired comparison, external sets, the reusable-holdout answers,
plots), the promoted version's tags (test metrics, threshold, dataset digest, artifact sha256) and its model
card as description, and the one-screen text `pneumo promote` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.artifact import tag_keys
from pipeline.artifact.model_store import CHAMPION
from pipeline.evaluate import plots
from pipeline.evaluate.metrics import fmt, fmt_ci, fmt_difference, fmt_metric_ci, jsonable
from pipeline.promote import model_card
from pipeline.promote.gate import Evaluation, Rule

PREVIOUS = "previous-champion"
EXPERIMENT = "promotions"
HEADLINE = ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "sensitivity",
            "specificity")


@dataclass
class Candidate:
    version: str
    run_id: str
    value: float  # the ranking metric; NaN when unknown
    source: str  # where the value came from, e.g. "version tag val_auc"
    digest: str | None
    data_dir: str | None  # the training run's data folder (param data.dir)
    tags: dict = field(default_factory=dict)
    run_name: str | None = None
    description: str | None = None
    val_auc: float = math.nan  # the validation AUC (reported beside the study metric)
    run_metrics: dict = field(default_factory=dict)  # the training run's metrics (shift battery, final_val_*)


@dataclass
class External:
    name: str
    data_dir: str
    digest: str
    candidate: Evaluation
    champion: Evaluation | None = None
    comparison: dict | None = None


@dataclass
class Decision:
    outcome: str  # "promoted" | "rejected" | "unchanged" (the candidate already is the champion)
    reason: str
    model: str
    candidate: Candidate
    champion: str | None  # the champion the candidate was compared with
    data_dir: str
    digest: str
    metric: str
    rule: Rule
    n_candidates: int
    skipped: list = field(default_factory=list)
    candidate_eval: Evaluation | None = None
    champion_eval: Evaluation | None = None
    comparison: dict | None = None
    checks: list = field(default_factory=list)
    externals: list = field(default_factory=list)  # [External]
    charges: list = field(default_factory=list)  # [holdout.Charge]: the test split's first, then external sets
    level: float | None = None  # the level the decision was taken at (alpha / test_queries)
    sealed: bool = False  # the candidate's test results were dropped (not promoted, or a dry run)
    test_size: dict = field(default_factory=dict)  # images, patients, positives of the test split (public)
    rule_source: str | None = None  # where the rule came from: --config FILE, the study's record, built in
    dry_run: bool = False
    attempts: int = 1
    promoted_at: str | None = None
    run_id: str | None = None
    forced: str | None = None  # the version asked for, if any
    champion_value: float | None = None  # the champion's study metric
    model_sha256: str | None = None


# --- the promoted version ----------------------------------------------------------------------------------
def commit(client, d: Decision, fence=None) -> None:
    """Under the lock: the candidate's facts first, then the history, and the champion alias last (the commit
    point: a crash before it leaves the old champion in place). `fence` (pipeline/promote/lock.py) is checked
    before each alias write: a promotion that lost its lock stops there."""
    check = fence.check if fence is not None else (lambda: None)
    m, v = d.candidate_eval.metrics, d.candidate.version
    tags = {f"test_{k}": m[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity",
                                        "specificity", "majority_baseline_accuracy", "n", "patients", "positives")}
    tags.update({tag_keys.THRESHOLD: repr(float(d.candidate_eval.threshold)), tag_keys.DATASET_DIGEST: d.digest,
                 tag_keys.PROMOTED_AT: d.promoted_at, tag_keys.PROMOTED_OVER: d.champion or "",
                 tag_keys.PROMOTION_RULE: d.rule.policy, tag_keys.PROMOTION_RUN_ID: d.run_id or ""})
    if d.model_sha256:
        tags[tag_keys.MODEL_SHA256] = d.model_sha256
    for key, value in tags.items():
        value = f"{value:.6f}" if isinstance(value, float) else str(value)
        client.set_model_version_tag(d.model, v, key, value)
    kill_point("tags-written")
    if d.champion is not None:
        check()
        client.set_registered_model_alias(d.model, PREVIOUS, d.champion)
        client.set_model_version_tag(d.model, d.champion, tag_keys.REPLACED_AT, d.promoted_at)
        client.set_model_version_tag(d.model, d.champion, tag_keys.REPLACED_BY, v)
    check()
    client.set_registered_model_alias(d.model, CHAMPION, v)


def seal(d: Decision) -> None:
    """Drop what the gate may not reveal about a candidate it does not promote (pipeline/evaluate/holdout.py):
    its test metrics, the paired differences and which check failed. The champion's results stay (public since
    its own promotion); a dry run says only what it would do."""
    if d.candidate_eval is not None:
        m = d.candidate_eval.metrics
        d.test_size = {"images": m["n"], "patients": m["patients"], "positives": m["positives"]}
    passed = d.outcome == "promoted"
    d.candidate_eval, d.comparison, d.checks, d.sealed = None, None, [], True
    for x in d.externals:
        x.candidate, x.comparison = None, None
    charge = d.charges[0] if d.charges else None
    where = f"{charge.describe(d.rule.alpha)}" if charge else "no query charged"
    if d.dry_run:
        d.reason = (f"a dry run: the candidate {'would pass' if passed else 'would not pass'} the rule ({where}); "
                    "its test results stay sealed")
    else:
        d.reason = (f"kept: the candidate did not pass the rule ({where}); the gate reveals nothing more about a "
                    "candidate it does not promote")


# --- the decision run --------------------------------------------------------------------------------------
def decision_metrics(d: Decision) -> dict:
    ce, he = d.candidate_eval, d.champion_eval
    out = {"candidate_val_metric": d.candidate.value}
    if ce is not None:  # sealed decisions carry none of the candidate's test numbers
        out.update({f"candidate_test_{k}": ce.metrics[k] for k in HEADLINE})
        out.update(majority_baseline_accuracy=ce.metrics["majority_baseline_accuracy"], test_images=ce.metrics["n"],
                   test_patients=ce.metrics["patients"])
    else:
        out.update(test_images=d.test_size.get("images"), test_patients=d.test_size.get("patients"))
    if he is not None:
        out.update({f"champion_test_{k}": he.metrics[k] for k in HEADLINE})
    if d.comparison:
        c = d.comparison
        out.update(auc_diff=c["diff"], auc_diff_ci_low=c["delong_ci_low"], auc_diff_ci_high=c["delong_ci_high"],
                   auc_diff_boot_ci_low=c["ci_low"], auc_diff_boot_ci_high=c["ci_high"], p_bootstrap=c["p_value"],
                   p_delong=c["delong_p"])
    for x in d.externals:
        for k in ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity"):
            if x.candidate is not None:
                out[f"external_{x.name}_{k}"] = x.candidate.metrics[k]
            if x.champion is not None:
                out[f"external_{x.name}_champion_{k}"] = x.champion.metrics[k]
        if x.comparison:
            out[f"external_{x.name}_auc_diff"] = x.comparison["diff"]
            out[f"external_{x.name}_auc_diff_ci_low"] = x.comparison["delong_ci_low"]
    if d.charges:
        c = d.charges[0]
        out.update(test_query=c.query, test_queries=c.queries, decision_level=d.level)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def kill_point(step: str) -> None:
    """A test hook: `PNEUMO_KILL_AT=<step>` SIGKILLs this process there (tests/test_registry.py kills a promotion
    at each step and checks that the rerun completes or rolls it back). Steps: pending-written, tags-written,
    alias-moved."""
    import os
    import signal

    if os.environ.get("PNEUMO_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def record(client, uri: str, d: Decision, manifest: dict, *, pending: bool = False) -> None:
    """The decision as an MLflow run `promote:<version>`, with the model card of a promotion. `pending`: written
    before the alias moves (state `pending`, the run left RUNNING, with what a rerun needs to complete or undo
    it: the ledger entries, the previous `previous-champion`); `complete` finishes it after the alias moved."""
    from pipeline.artifact import tracking

    exp_id = tracking.ensure_experiment(EXPERIMENT, uri)
    v, ce, he = d.candidate.version, d.candidate_eval, d.champion_eval
    tags = {"model": d.model, "decision": d.outcome, "candidate_version": v, "champion_version": d.champion or "",
            tag_keys.DATASET_DIGEST: d.digest, "rule": d.rule.describe(), "reason": d.reason[:4000],
            "mlflow.note.content": f"**{'DRY RUN ' if d.dry_run else ''}{d.outcome.upper()}** {d.model} v{v}: "
                                   f"{d.reason}\n\nRule: {d.rule.describe()}"}
    if pending:
        previous = alias_version(client, d.model, PREVIOUS)
        tags.update({STATE_TAG: "pending", tag_keys.PROMOTED_AT: d.promoted_at or "",
                     LEDGER_RUNS_TAG: ",".join(c.run_id for c in d.charges), PREVIOUS_BEFORE_TAG: previous or ""})
    run = client.create_run(exp_id, run_name=f"promote:{v}", tags=tags)
    rid = d.run_id = run.info.run_id
    try:
        params = {"model": d.model, "candidate_version": v, "champion_version": d.champion or "none",
                  "metric": d.metric, "policy": d.rule.policy, "alpha": d.rule.alpha, "margin": d.rule.margin,
                  "floor_auc": d.rule.floor_auc, "require_external": ",".join(d.rule.require_external) or "none",
                  "data_dir": d.data_dir, "candidates": d.n_candidates, "attempts": d.attempts,
                  "external_sets": ",".join(f"{x.name}={x.data_dir}" for x in d.externals) or "none"}
        for key, value in params.items():
            client.log_param(rid, key, value)
        for key, value in decision_metrics(d).items():
            client.log_metric(rid, key, value)
        client.log_dict(rid, jsonable({"rule": d.rule.describe(), "outcome": d.outcome, "reason": d.reason,
                                       "level": d.level, "sealed": d.sealed,
                                       "checks": [{"check": n, "passed": ok, "numbers": w}
                                                  for n, ok, w in d.checks]}), "evaluation/decision.json")
        client.log_text(rid, format_decision(d) + "\n", "decision.txt")
        if he is not None:
            client.log_dict(rid, jsonable(he.report), "evaluation/champion.json")
        if ce is not None:  # a sealed decision logs nothing of the candidate's test results
            _log_evidence(client, rid, d)
            _log_test_view(client, rid, d, manifest)
        if d.outcome == "promoted" and not d.dry_run:
            log_card(client, d, manifest)
        if not pending:
            client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise


# --- a promotion's state: pending until the alias moved and the record is complete -------------------------
STATE_TAG = "promotion_state"  # pending | complete | rolled_back (on the decision run of a promotion)
LEDGER_RUNS_TAG = "ledger_runs"  # the test-split reads the decision charged (pipeline/evaluate/holdout.py)
PREVIOUS_BEFORE_TAG = "previous_champion_before"  # `previous-champion` before this promotion ("" for none)
CARD = "model_card/model_card.md"


def alias_version(client, model: str, alias: str) -> str | None:
    """The version `alias` points at, None when it is not set."""
    value = (client.get_registered_model(model).aliases or {}).get(alias)
    return str(value) if value is not None else None


def complete(client, model: str, run) -> None:
    """After the alias moved: the card becomes the version's description, the replaced champion's description
    says so, the ledger entries say "promoted", and the run is complete. Reads only what the run holds, so a
    rerun completes a promotion whose process died after the alias moved."""
    import mlflow

    from pipeline.evaluate import holdout

    tags, rid = run.data.tags, run.info.run_id
    v, old = tags["candidate_version"], tags.get("champion_version") or None
    for ledger_run in filter(None, tags.get(LEDGER_RUNS_TAG, "").split(",")):
        holdout.settle_entry(client, ledger_run, "promoted")
    card = mlflow.artifacts.load_text(f"runs:/{rid}/{CARD}")
    client.update_model_version(model, v, description=card)
    promoted_at = tags.get(tag_keys.PROMOTED_AT, "")
    if old is not None:  # the replaced champion's card stays, headed by when and by whom it was replaced
        before = client.get_model_version(model, old).description or ""
        note = f"> Replaced as `{CHAMPION}` by version {v} on {promoted_at} (now `{PREVIOUS}` until the next " \
               "promotion).\n\n"
        if not before.startswith(note):
            client.update_model_version(model, old, description=note + before)
    version_tags = client.get_model_version(model, v).tags
    metrics = {k.removeprefix("test_"): float(x) for k, x in version_tags.items() if k.startswith("test_")}
    client.update_registered_model(model, description=model_card.model_description(
        model, v, metrics, tags.get(tag_keys.DATASET_DIGEST, ""), promoted_at))
    client.set_tag(rid, STATE_TAG, "complete")
    client.set_terminated(rid, "FINISHED")


# The version tags a promotion writes (commit), removed again when it is rolled back before its alias moved.
PROMOTION_VERSION_TAGS = (tag_keys.PROMOTED_AT, tag_keys.PROMOTED_OVER, tag_keys.PROMOTION_RULE,
                          tag_keys.PROMOTION_RUN_ID, tag_keys.MODEL_SHA256)


def roll_back(client, model: str, run) -> None:
    """Before the alias moved: undo what the promotion wrote (its version tags, the replaced champion's
    `replaced_*` tags and `previous-champion`), the ledger entries say so (the reads stay charged), and the
    run is marked rolled back. The candidate stays a candidate: the rerun gates it afresh."""
    from pipeline.evaluate import holdout

    tags, rid = run.data.tags, run.info.run_id
    v, old = tags["candidate_version"], tags.get("champion_version") or None
    mine = client.get_model_version(model, v).tags
    if mine.get(tag_keys.PROMOTION_RUN_ID) == rid:
        for key in [*PROMOTION_VERSION_TAGS, *(k for k in mine if k.startswith("test_"))]:
            if key in mine:
                client.delete_model_version_tag(model, v, key)
    if old is not None and client.get_model_version(model, old).tags.get(tag_keys.REPLACED_BY) == v:
        for key in (tag_keys.REPLACED_AT, tag_keys.REPLACED_BY):
            client.delete_model_version_tag(model, old, key)
        before = tags.get(PREVIOUS_BEFORE_TAG) or None
        if before:
            client.set_registered_model_alias(model, PREVIOUS, before)
        elif alias_version(client, model, PREVIOUS) == old:
            client.delete_registered_model_alias(model, PREVIOUS)
    for ledger_run in filter(None, tags.get(LEDGER_RUNS_TAG, "").split(",")):
        holdout.settle_entry(client, ledger_run, "kept: the promotion was interrupted before the alias moved")
    client.set_tag(rid, STATE_TAG, "rolled_back")
    client.set_terminated(rid, "FAILED")


def pending_promotions(client, uri: str, model: str) -> list:
    """The decision runs of `model` left pending by a promotion that did not finish."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.{STATE_TAG} = 'pending' and tags.model = '{model}'")


def repair(client, uri: str, model: str) -> list[str]:
    """Complete or roll back every pending promotion of `model` (call under the promotion lock) -> what was
    done, one line each. The alias is the commit point: a champion that is the pending candidate is completed,
    anything else is undone."""
    done = []
    for run in pending_promotions(client, uri, model):
        v = run.data.tags["candidate_version"]
        if alias_version(client, model, CHAMPION) == v:
            complete(client, model, run)
            done.append(f"completed the interrupted promotion of version {v} (run {run.info.run_id})")
        else:
            roll_back(client, model, run)
            done.append(f"rolled back the interrupted promotion of version {v}: it died before the alias moved "
                        f"(run {run.info.run_id})")
    return done


def _log_test_view(client, rid: str, d: Decision, manifest: dict) -> None:
    """MLflow 3's model view of what the gate revealed (a promoted candidate only: issue 20's mechanism seals the
    rest): its test metrics logged against its logged model and the test split as a dataset input with the
    `test` context, so the Models tab shows them beside the validation figures training logged."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    from pipeline.artifact import tracking

    entity = tracking.dataset_entity(manifest, d.data_dir, "test")._to_mlflow_entity()
    source = client.get_model_version(d.model, d.candidate.version).source or ""
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None  # MLflow 3 models
    tracking.log_inputs_racing(
        client.log_inputs, rid, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "test")])],
        models=[LoggedModelInput(model_id)] if model_id else None)
    for key in HEADLINE:
        value = d.candidate_eval.metrics.get(key)
        if value is not None and math.isfinite(value):
            client.log_metric(rid, f"test_{key}", float(value), model_id=model_id, dataset_name=entity.name,
                              dataset_digest=entity.digest)


def _log_evidence(client, rid: str, d: Decision) -> None:
    """The promoted candidate's test evidence: reports, the comparison, the figures."""
    v, ce, he = d.candidate.version, d.candidate_eval, d.champion_eval
    client.log_dict(rid, jsonable(ce.report), "evaluation/candidate.json")
    results = {f"candidate v{v}": ce.metrics}
    if he is not None:
        client.log_dict(rid, jsonable(d.comparison), "evaluation/comparison.json")
        results[f"champion v{d.champion}"] = he.metrics
    for x in d.externals:
        client.log_dict(rid, jsonable({"candidate": x.candidate.report, "comparison": x.comparison,
                                       "champion": x.champion.report if x.champion else None}),
                        f"evaluation/external_{x.name}.json")
        results[f"candidate v{v} on {x.name}"] = x.candidate.metrics
        if x.champion is not None:
            results[f"champion v{d.champion} on {x.name}"] = x.champion.metrics
    figure = plots.plot_auc_comparison(results)
    if d.comparison:
        k = d.comparison
        diff = fmt_ci(k["diff"], k["delong_ci_low"], k["delong_ci_high"], sign=True)
        figure.axes[0].set_title(f"Test AUC: difference {diff}, DeLong p={fmt(k['delong_p'])}")
    client.log_figure(rid, figure, "plots/auc_comparison.png")
    client.log_figure(rid, plots.plot_roc(ce.labels, ce.probabilities, f"ROC, test: candidate v{v}",
                                          threshold=ce.threshold, clusters=ce.patient_id), "plots/roc_candidate.png")
    if he is not None:
        client.log_figure(rid, plots.plot_roc(he.labels, he.probabilities, f"ROC, test: champion v{d.champion}",
                                              threshold=he.threshold, clusters=he.patient_id),
                          "plots/roc_champion.png")


def log_card(client, d: Decision, manifest: dict) -> None:
    """The model card as artifacts of the decision run (and of the training run): `complete` makes it the
    version's description once the alias moved."""
    from mlflow.exceptions import MlflowException

    v, ce = d.candidate.version, d.candidate_eval
    lineage = {"study": d.candidate.tags.get(tag_keys.STUDY), "trial": d.candidate.tags.get(tag_keys.TRIAL_NUMBER),
               "ensemble of versions (mean probability)": d.candidate.tags.get(tag_keys.ENSEMBLE_MEMBERS),
               "calibration temperature (fitted on validation)": d.candidate.tags.get(tag_keys.TEMPERATURE),
               f"validation {d.metric}": f"{d.candidate.value:.4f} ({d.candidate.source})",
               "promotion run": d.run_id, "model artifact sha256": d.model_sha256}
    card = model_card.render(model=d.model, version=v, metrics=ce.metrics, subgroups=ce.subgroups,
                             threshold=ce.threshold, threshold_source=ce.threshold_source, manifest=manifest,
                             digest=d.digest, data_dir=d.data_dir, run_id=d.candidate.run_id,
                             run_name=d.candidate.run_name, lineage=lineage, comparison=d.comparison,
                             champion=d.champion, promoted_at=d.promoted_at, decision=d)
    figure = model_card.subgroup_figure([r for r in ce.subgroups if r["group"] in ("view_position", "sex",
                                                                                     "age_band")])
    client.log_text(d.run_id, card, CARD)
    client.log_figure(d.run_id, figure, "model_card/subgroups.png")
    try:  # the training run keeps the card beside the model it describes
        client.log_text(d.candidate.run_id, card, CARD)
        client.log_figure(d.candidate.run_id, figure, "model_card/subgroups.png")
    except (MlflowException, OSError):
        pass  # a deleted training run: the version description and the promotion run still hold the card


# --- report ----------------------------------------------------------------------------------------------
def _row(name: str, e: Evaluation) -> str:
    f, m = fmt, e.metrics
    return (f"{name:<28}{fmt_metric_ci(m, 'auc'):<24}{f(m['accuracy']):>9}{f(m['majority_baseline_accuracy']):>9}"
            f"{f(m['sensitivity']):>7}{f(m['specificity']):>7}{m['n']:>7}{m['patients']:>9}{f(e.threshold, 4):>10}")


def format_decision(d: Decision) -> str:
    f = fmt
    c = d.candidate
    members = c.tags.get(tag_keys.ENSEMBLE_MEMBERS)
    trial = (f", study {c.tags[tag_keys.STUDY]} " + (f"versions {members}" if members else
                                                     f"trial {c.tags.get(tag_keys.TRIAL_NUMBER, '?')}")
             if c.tags.get(tag_keys.STUDY) else "")
    how = (f"best of {d.n_candidates} candidate(s) on this dataset" if d.forced is None else
           "built from them by --ensemble/--tta" if members else "chosen with --version")
    lines = [f"candidate  {d.model} v{c.version} ({d.metric} {f(c.value)} from {c.source}{trial}); {how}",
             "champion   " + (f"v{d.champion}" if d.champion else "none yet"),
             f"dataset    {d.data_dir} (digest {d.digest[:12]})",
             f"rule       {d.rule.describe()}"]
    if d.rule_source:
        lines.append(f"rule from  {d.rule_source}")
    if d.skipped:
        lines.append("not candidates: " + "; ".join(f"v{v}: {why}" for v, why in d.skipped[:5])
                     + (f"; ... {len(d.skipped) - 5} more" if len(d.skipped) > 5 else ""))
    shown = d.candidate_eval or d.champion_eval
    if shown is not None or d.test_size:
        size = ({"images": shown.metrics["n"], "patients": shown.metrics["patients"],
                 "positives": shown.metrics["positives"]} if shown is not None else d.test_size)
        lines += ["", f"test split: {size['images']} images of {size['patients']} patients, {size['positives']} "
                      "positive images (intervals resample patients)"]
    if shown is not None:
        lines += [f"{'':<28}{'AUC [95% CI]':<24}{'accuracy':>9}{'baseline':>9}{'sens':>7}{'spec':>7}"
                  f"{'images':>7}{'patients':>9}{'threshold':>10}"]
        if d.candidate_eval is not None:
            lines.append(_row("candidate v" + c.version, d.candidate_eval))
        else:
            lines.append(f"{'candidate v' + c.version:<28}sealed: a candidate that is not promoted shows no test result")
        if d.champion_eval is not None:
            lines.append(_row(f"champion v{d.champion}", d.champion_eval))
        for x in d.externals:
            if x.candidate is not None:
                lines.append(_row(f"cand. v{c.version} @ {x.name}", x.candidate))
            if x.champion is not None:
                lines.append(_row(f"champ. v{d.champion} @ {x.name}", x.champion))
    if d.comparison:
        k = d.comparison
        lines.append(f"{'AUC':<28}{fmt_difference(k)}")
    for x in d.externals:
        if x.comparison:
            k = x.comparison
            lines.append(f"{'AUC @ ' + x.name:<28}{fmt_difference(k)}")
    if d.charges:
        lines.append(f"test reuse {d.charges[0].describe(d.rule.alpha)}")
    lines.append("")
    verdict = {"promoted": f"PROMOTED v{c.version} to {CHAMPION}" + (
                   f"; v{d.champion} is now {PREVIOUS}" if d.champion else ""),
               "rejected": (f"NOT PROMOTED: champion v{d.champion} unchanged" if d.champion
                            else "NOT PROMOTED: no champion (the candidate does not clear the floor)"),
               "unchanged": f"UNCHANGED: v{c.version} already is the {CHAMPION}"}[d.outcome]
    if d.dry_run:
        verdict = f"DRY RUN, nothing changed: would be {verdict}"
    lines.append(f"decision   {verdict}")
    lines.append(f"reason     {d.reason}")
    if d.run_id:
        lines.append(f"recorded   MLflow run promote:{c.version} ({d.run_id}) in experiment {EXPERIMENT!r}")
    return "\n".join(lines)
