"""Registered versions and `pneumo promote`: candidates, the gate's evidence, the `champion` alias and its history.

`promote()` is what `pneumo promote` runs:
1. Candidates: the READY versions of the registered model (optionally of one study), ranked by a validation
   metric: the version tag (`pneumo tune` tags each version with its study's metric under its own name and
   names it in `study_metric`; by default the promotion ranks by that metric, e.g. val_auc_shift_mean), else
   the training run's `final_<metric>` (exact, on the whole val split), else its last per-epoch value. Higher is better, except for metrics named *loss/*brier.
   Ties go to the newer version. Only versions trained on the dataset in `--data` compete.
2. Evidence: the candidate and the current champion are scored on the same locked test split
   (`scoring.evaluate_model`, what `pneumo evaluate --split test` runs), each at the threshold chosen on
   validation, and on every `--external NAME=DATA` set (all of its splits). The champion must have been trained
   on the same dataset (same digest), or the gate refuses: its training patients could sit in another
   dataset's test split. Every read of the test split goes into the ledger, and the reusable holdout
   (`pipeline.evaluate.holdout`, Thresholdout) must have budget left, or promote refuses.
3. Decision: `pipeline.promote.gate.decide` applies the rule of `[promote]` (superiority or non-inferiority on the
   patient-clustered paired AUC difference; a floor for a first champion; required external sets).
4. Commit, under `pipeline.promote.lock`: just before moving the alias the champion is re-read; if it moved
   since the evaluation, the gate runs again against the new champion (evaluations are cached).
5. Record (`pipeline.promote.record`): the decision run, the version tags (with the artifact's sha256, which
   `pipeline.artifact.model_store` verifies at every load) and the model card. The Grad-CAM grid of test images is
   logged only with `log_images=True` (`--log-images`): test images may be real patients' X-rays.

Registry knows nothing of tf.data: evaluation goes through pipeline.evaluate.scoring, imported when needed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.artifact import tag_keys, tracking
from pipeline.artifact.model_store import CHAMPION, MODEL_NAME, champion_uri  # noqa: F401  (re-exported)
from pipeline.config import PromoteConfig, check_section
from pipeline.errors import InputError
from pipeline.evaluate import holdout
from pipeline.evaluate.metrics import lower_is_better
from pipeline.promote import gate, model_card
from pipeline.promote.gate import Evaluation, Rule
from pipeline.promote.lock import promotion_lock
from pipeline.promote.record import PREVIOUS, Candidate, Decision, External, format_decision  # noqa: F401
from pipeline.promote.record import commit as _commit
from pipeline.promote.record import record as _record
from pipeline.stores import masked


class RegistryError(InputError):
    """A one-line reason a promotion cannot be decided (no versions, missing data, mismatched datasets...)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rule_of(cfg: PromoteConfig) -> Rule:
    check_section("promote", cfg)  # ranges of pipeline/config.py:BOUNDS, for a PromoteConfig built in code too
    return Rule(policy=cfg.policy, alpha=cfg.alpha, margin=cfg.margin, floor_auc=cfg.floor_auc,
                floor_accuracy_margin=cfg.floor_accuracy_margin, require_external=tuple(cfg.require_external))


# --- candidates ------------------------------------------------------------------------------------------
class _Runs:
    """Training runs looked up once each (a study has tens to hundreds of versions)."""

    def __init__(self, client: MlflowClient):
        self.client, self.cache = client, {}

    def __call__(self, run_id: str):
        if run_id not in self.cache:
            try:
                self.cache[run_id] = self.client.get_run(run_id) if run_id else None
            except MlflowException:
                self.cache[run_id] = None  # deleted run: the version still ranks by its tags
        return self.cache[run_id]


def _candidate(mv, metric: str, runs: _Runs) -> Candidate:
    tags = dict(mv.tags or {})
    run = runs(mv.run_id)
    value, source = math.nan, "missing"
    if metric in tags:
        with contextlib.suppress(ValueError):
            value, source = float(tags[metric]), f"version tag {metric}"
    if math.isnan(value) and run is not None:
        for key in (f"final_{metric}", metric):
            if key in run.data.metrics:
                value, source = float(run.data.metrics[key]), f"run metric {key}"
                break
    digest = tags.get(tag_keys.DATASET_DIGEST) or (run.data.tags.get(tag_keys.DATASET_DIGEST) if run else None)
    run_metrics = dict(run.data.metrics) if run else {}
    val_auc = math.nan
    for raw in (tags.get(tag_keys.VAL_AUC), run_metrics.get("final_val_auc"), run_metrics.get("val_auc")):
        with contextlib.suppress(TypeError, ValueError):
            val_auc = float(raw)
            break
    return Candidate(version=str(mv.version), run_id=mv.run_id, value=value, source=source, digest=digest,
                     data_dir=run.data.params.get("data.dir") if run else None, tags=tags,
                     run_name=run.info.run_name if run else None, description=mv.description, val_auc=val_auc,
                     run_metrics={**run_metrics, **{k: v for k, v in (run.data.tags.items() if run else [])
                                                   if k.startswith("val_auc_shift_") or k == tag_keys.TEMPERATURE}})


def versions(client: MlflowClient, model: str) -> list:
    """Every READY version of `model` (RegistryError when the model is not registered at all)."""
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise RegistryError(f"no registered model {model!r} in store {masked(client.tracking_uri)}: "
                            "`pneumo train --register` or `pneumo tune` registers the models it trains") from None
    found = client.search_model_versions(f"name='{model}'")
    return [mv for mv in found if mv.status == "READY"]


def study_metric(all_versions: list, study: str | None) -> str:
    """The metric a study optimised (version tag `study_metric`, written by `pneumo tune`), else val_auc.
    Without a study, the versions' single shared study_metric if they agree."""
    found = {mv.tags.get(tag_keys.STUDY_METRIC) for mv in all_versions
             if (not study or mv.tags.get(tag_keys.STUDY) == study) and mv.tags.get(tag_keys.STUDY_METRIC)}
    return found.pop() if len(found) == 1 else "val_auc"


def rank_candidates(client: MlflowClient, model: str, metric: str | None = None, study: str | None = None,
                    ) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """-> (candidates best first, [(version, why it is not a candidate)]). `metric` None: the study's own
    objective (`study_metric`), so promotion ranks by what the study optimised."""
    all_versions = versions(client, model)
    if not all_versions:
        raise RegistryError(f"registered model {model!r} has no registered versions: "
                            "`pneumo train --register` or `pneumo tune` registers them")
    metric = metric or study_metric(all_versions, study)
    runs = _Runs(client)
    ranked, skipped = [], []
    for mv in all_versions:
        if study and mv.tags.get(tag_keys.STUDY) != study:
            continue
        c = _candidate(mv, metric, runs)
        if math.isnan(c.value):
            skipped.append((c.version, f"no {metric} (version tag or run metric)"))
        else:
            ranked.append(c)
    if study and not ranked and not skipped:
        studies = sorted({mv.tags[tag_keys.STUDY] for mv in all_versions if mv.tags.get(tag_keys.STUDY)})
        raise RegistryError(f"no version of {model!r} belongs to study {study!r} (studies: "
                            f"{', '.join(studies) or 'none'})")
    sign = 1 if lower_is_better(metric) else -1
    ranked.sort(key=lambda c: (sign * c.value, -int(c.version)))
    return ranked, skipped


def champion_version(client: MlflowClient, model: str) -> str | None:
    aliases = client.get_registered_model(model).aliases or {}
    value = aliases.get(CHAMPION)
    return str(value) if value is not None else None


# --- evidence ------------------------------------------------------------------------------------------------
def evaluate_version(model: str, version: str, data_dir: str | Path, tracking_uri: str, n_boot: int = 1000,
                     split: str = "test") -> Evaluation:
    """Metrics of one version on `split` (`all` for an external set): `pneumo evaluate` for that version."""
    from pipeline.evaluate.scoring import evaluate_model

    with tempfile.TemporaryDirectory(prefix="pneumo-gate-") as tmp:
        # ledger=None: promote records its test reads itself, one entry per decision with the holdout's answers
        r = evaluate_model(f"models:/{model}/{version}", data_dir, split, tracking_uri=tracking_uri,
                           out=Path(tmp) / "evaluation.json", n_boot=n_boot, ledger=None)
    m = r["metrics"]
    report = {k: r[k] for k in ("model", "split", "dataset_digest", "threshold_source", "metrics", "subgroups")}
    return Evaluation(version=version, metrics=m, subgroups=r["subgroups"], threshold=float(m["threshold"]),
                      threshold_source=r["threshold_source"], labels=r["labels"], probabilities=r["probabilities"],
                      patient_id=list(r["patient_id"]), report=report)


def parse_externals(specs: list[str] | dict | None) -> dict[str, tuple[str, dict]]:
    """`NAME=DATA` strings (or a dict) -> {NAME: (DATA, manifest)}, each a converted dataset; InputError if not."""
    from pipeline.data.manifest import DataError, load_manifest

    if not specs:
        return {}
    pairs = specs.items() if isinstance(specs, dict) else [s.partition("=")[::2] for s in specs]
    out = {}
    for name, path in pairs:
        if not name or not path or not name.replace("-", "_").isidentifier():
            raise RegistryError(f"--external {name}={path}: expected NAME=DATA with NAME made of letters, digits, "
                                "_ or - (e.g. --external kermany=tfrecords/kermany-128)")
        if name in out:
            raise RegistryError(f"--external {name}: given twice")
        try:
            out[name] = (str(path), load_manifest(path))
        except DataError as e:
            raise RegistryError(f"--external {name}: {e}") from None
    return out


def model_sha256(model: str, version: str) -> str:
    """The sha256 of a version's artifact files, recorded at promotion (`pipeline.artifact.model_store.verify`)."""
    from pipeline.artifact.model_store import artifact_sha256, local_artifacts

    return artifact_sha256(local_artifacts(f"models:/{model}/{version}"))


def _manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest, which must have a non-empty locked test split."""
    from pipeline.data.manifest import DataError, load_manifest

    try:
        manifest = load_manifest(data_dir)
    except DataError as e:
        raise RegistryError(f"{e}; pass --data with the converted dataset the models were trained on") from None
    if not manifest.get("splits", {}).get("test", {}).get("count"):
        raise RegistryError(f"{data_dir}: the test split is empty: the gate needs a locked test split")
    return manifest


def _choose(ranked: list[Candidate], skipped: list, data_dir: str | None, version: str | None,
            model: str) -> tuple[Candidate, str, dict, list[Candidate]]:
    """The candidate, the data folder, its manifest, and the candidates that were trained on that dataset."""
    if version is not None:
        pick = [c for c in ranked if c.version == str(version)]
        if not pick:
            why = dict(skipped).get(str(version), "not a READY version of this model (or not in --study)")
            raise RegistryError(f"{model} version {version}: {why}")
        ranked = pick
    if not ranked:
        raise RegistryError(f"{model}: no candidate with a validation metric ({len(skipped)} versions without)")
    if data_dir is None:
        data_dir = ranked[0].data_dir
        if not data_dir:
            raise RegistryError(f"{model} version {ranked[0].version}: its run names no data folder: missing "
                                "data; pass --data")
    manifest = _manifest(data_dir)
    digest = manifest["digest"]
    same = [c for c in ranked if c.digest == digest]
    if not same:
        c = ranked[0]
        raise RegistryError(f"{model} version {c.version} was trained on dataset {str(c.digest)[:12]}, but "
                            f"{data_dir} is dataset {digest[:12]}: the gate evaluates on the training "
                            "dataset's own locked test split; pass --data with that dataset")
    return same[0], str(data_dir), manifest, same


# --- promotion -------------------------------------------------------------------------------------------
@dataclass
class _Gate:
    """What one promotion works with: the store, the rule, the dataset, and the evaluations made so far (the
    gate may run more than once, when another promotion lands meanwhile; a version is scored once)."""

    client: MlflowClient
    uri: str
    model: str
    cfg: PromoteConfig
    rule: Rule
    data_dir: str
    n_boot: int
    cache: dict = field(default_factory=dict)

    def evaluation(self, v: str, where: str | None = None, split: str = "test") -> Evaluation:
        key = (v, where or self.data_dir, split)
        if key not in self.cache:
            self.cache[key] = evaluate_version(self.model, v, key[1], self.uri, self.n_boot, split)
        return self.cache[key]


def promote(model: str = MODEL_NAME, data_dir: str | Path | None = None, *, study: str | None = None,
            metric: str | None = None, config: PromoteConfig | None = None, externals: list[str] | dict | None = None,
            dry_run: bool = False, version: str | None = None, tracking_uri: str | None = None,
            n_boot: int = 1000, lock_timeout: float = 300.0, max_attempts: int = 5, log_images: bool = False,
            before_commit: Callable[[Decision], None] | None = None) -> Decision:
    """Pick the best candidate, gate it against the champion under the `[promote]` rule, and move `champion`
    if it passes (the steps: this module's docstring).

    `version` forces the candidate. `before_commit(decision)` runs between the evaluation and the locked
    commit (a test hook: a slow promotion is simulated by blocking there).
    """
    cfg = config or PromoteConfig()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(uri)
    metric = metric or study_metric(versions(client, model), study)
    cand, data_dir, manifest, same, skipped = _candidates(client, model, metric, study, data_dir, version)
    ext_sets = parse_externals(externals)
    reuse = holdout.Thresholdout(client, manifest["digest"], cfg.holdout_budget, cfg.holdout_threshold,
                                 cfg.holdout_sigma)
    reuse.require_budget(data_dir)
    g = _Gate(client, uri, model, cfg, rule_of(cfg), data_dir, n_boot)
    for attempt in range(1, max_attempts + 1):
        decision = Decision(outcome="unchanged", reason="", model=model, candidate=cand,
                            champion=champion_version(client, model), data_dir=data_dir, digest=manifest["digest"],
                            metric=metric, rule=g.rule, n_candidates=len(same), skipped=skipped, dry_run=dry_run,
                            attempts=attempt, forced=str(version) if version is not None else None)
        if decision.champion == cand.version:
            decision.reason = f"version {cand.version} is already the champion: nothing to do"
            decision.candidate_eval = g.evaluation(cand.version)
            _ledger(client, uri, decision, reuse, "promote")
            return decision
        _gather_evidence(g, decision, ext_sets)
        _decide(g, decision)
        if dry_run:
            _ledger(client, uri, decision, reuse, "promote --dry-run")
            return decision
        if before_commit:
            before_commit(decision)
        if _commit_unless_moved(g, decision, lock_timeout):
            break
    else:
        raise RegistryError(f"{model}: the champion changed {max_attempts} times during this promotion; "
                            "try again")
    _ledger(client, uri, decision, reuse, "promote")
    _record(client, uri, decision, manifest)
    _describe_versions(client, decision)
    if decision.outcome == "promoted" and log_images:
        _explain(client, uri, model, decision, data_dir)
    return decision


def _candidates(client: MlflowClient, model: str, metric: str, study: str | None, data_dir, version: str | None):
    """Step 1 -> (the candidate, the data folder, its manifest, the candidates on that dataset, the skipped ones
    with why)."""
    ranked, skipped = rank_candidates(client, model, metric, study)
    cand, data_dir, manifest, same = _choose(ranked, skipped, str(data_dir) if data_dir else None, version, model)
    skipped = skipped + [(c.version, f"trained on dataset {str(c.digest)[:12]}") for c in ranked
                         if c.digest != manifest["digest"] and (version is None or c.version == str(version))]
    return cand, data_dir, manifest, same, skipped


def _gather_evidence(g: _Gate, d: Decision, ext_sets: dict) -> None:
    """Step 2: candidate and champion on the locked test split and on every external set, paired."""
    champ = d.champion
    champ_cand = None
    if champ is not None:
        _check_champion_dataset(g.client, g.model, champ, d.digest, g.data_dir)
        d.champion_eval = g.evaluation(champ)
        champ_cand = _candidate(g.client.get_model_version(g.model, champ), d.metric, _Runs(g.client))
    d.candidate_eval = g.evaluation(d.candidate.version)
    d.champion_value = champ_cand.value if champ_cand else None
    try:
        d.comparison = (gate.compare(d.candidate_eval, d.champion_eval, g.rule.alpha, g.cfg.bootstrap)
                        if d.champion_eval else None)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    d.externals = []
    for name, (where, ext_manifest) in ext_sets.items():
        x = External(name, where, ext_manifest["digest"], g.evaluation(d.candidate.version, where, "all"))
        if champ is not None:
            x.champion = g.evaluation(champ, where, "all")
            x.comparison = gate.compare(x.candidate, x.champion, g.rule.alpha, g.cfg.bootstrap)
        d.externals.append(x)


def _decide(g: _Gate, d: Decision) -> None:
    """Step 3: the rule of `[promote]` on the evidence (pipeline.promote.gate.decide)."""
    try:
        verdict = gate.decide(g.rule, d.candidate_eval, d.champion_eval, d.comparison, study_metric=d.metric,
                              candidate_value=d.candidate.value, champion_value=d.champion_value,
                              lower_is_better=lower_is_better(d.metric),
                              externals={x.name: (x.candidate, x.champion, x.comparison) for x in d.externals})
    except ValueError as e:
        raise RegistryError(str(e)) from None
    d.outcome, d.reason, d.checks = verdict.outcome, verdict.reason, verdict.checks


def _commit_unless_moved(g: _Gate, d: Decision, lock_timeout: float) -> bool:
    """Step 4, under the lock: False when another promotion moved the champion since the evidence was gathered
    (the gate runs again against the new one); else the alias moves if the candidate passed, and True."""
    with promotion_lock(g.uri, g.model, client=g.client, timeout=lock_timeout):
        if champion_version(g.client, g.model) != d.champion:
            return False
        if d.outcome == "promoted":
            d.promoted_at = _now()
            d.model_sha256 = model_sha256(g.model, d.candidate.version)
            _commit(g.client, d)
    return True


def _ledger(client: MlflowClient, uri: str, d: Decision, reuse: holdout.Thresholdout, command: str) -> None:
    """Thresholdout answers for the versions the gate looked at, then one ledger entry per dataset read."""
    looked = [(d.candidate.version, d.candidate.val_auc, d.candidate_eval)]
    if d.champion_eval is not None:
        champ_val = _candidate(client.get_model_version(d.model, d.champion), "val_auc", _Runs(client)).val_auc
        looked.append((d.champion, champ_val, d.champion_eval))
    d.holdout = [reuse.query(v, val, e.metrics["auc"]) for v, val, e in looked]
    d.holdout_left, d.holdout_budget = reuse.left, reuse.budget
    answered = {f"v{a.version}": {"test_auc_answered": a.answered, "source": a.source} for a in d.holdout}
    answered["outcome"] = d.outcome
    versions = [v for v, _, _ in looked]
    holdout.record(client, uri, digest=d.digest, split="test", command=command, versions=versions,
                   answered=answered, data_dir=d.data_dir, extra={"model": d.model, **reuse.ledger_tags()})
    for x in d.externals:
        holdout.record(client, uri, digest=x.digest, split="all", command=f"{command} --external {x.name}",
                       versions=versions, answered={"outcome": d.outcome, "candidate_auc": x.candidate.metrics["auc"]},
                       data_dir=x.data_dir, extra={"model": d.model})


def _explain(client: MlflowClient, uri: str, model: str, d: Decision, data_dir: str | Path) -> None:
    """Grad-CAM grid and pointing-game score of the new champion on the test split, logged to its training
    run (opt-in: `--log-images`; the grid shows test images, which may be real patients'). Runs after the gate
    decided, so the test split cannot sway the decision; never undoes a promotion."""
    from pipeline.evaluate.explain import (  # lazy: TensorFlow only when promoting
        ExplainError,
        log_explanations,
    )

    v = d.candidate.version
    try:
        score = log_explanations(f"models:/{model}/{v}", data_dir, "test", d.candidate.run_id, tracking_uri=uri)
        if math.isfinite(score):
            client.set_model_version_tag(model, v, tag_keys.POINTING_GAME, f"{score:.4f}")
    except (ExplainError, MlflowException, OSError) as e:
        print(f"warning: no Grad-CAM explanations for v{v}: {e}", file=sys.stderr)


def _check_champion_dataset(client: MlflowClient, model: str, champ: str, digest: str, data_dir: str) -> None:
    mv = client.get_model_version(model, champ)
    theirs = mv.tags.get(tag_keys.DATASET_DIGEST)
    if not theirs:
        run = _Runs(client)(mv.run_id)
        theirs = run.data.tags.get(tag_keys.DATASET_DIGEST) if run else None
    if theirs != digest:
        raise RegistryError(f"champion {model} version {champ} was trained on dataset {str(theirs)[:12]}, but "
                            f"{data_dir} is dataset {digest[:12]}: candidate and champion must be compared on "
                            "the same locked test split; refusing (pass --data with the champion's dataset)")


def _describe_versions(client: MlflowClient, d: Decision) -> None:
    """Give every version without a description a short one, so the registry page says what each version is."""
    runs = _Runs(client)
    for mv in versions(client, d.model):
        if mv.description:
            continue
        c = _candidate(mv, d.metric, runs)
        client.update_model_version(d.model, c.version, description=model_card.version_summary(
            c.version, c.tags, d.metric, c.value, c.run_name))
