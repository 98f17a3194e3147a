"""Registered versions and `pneumo promote`: candidates, the gate's evidence, the `champion` alias and its history.

`promote()` is what `pneumo promote` runs:
1. Candidates: the READY versions of the registered model (optionally of one study), ranked by a validation
   metric: the version tag (`pneumo tune` tags each version with its study's metric under its own name and
   names it in `study_metric`; by default the promotion ranks by that metric, e.g. val_auc_shift_mean), else
   the training run's `final_<metric>` (exact, on the whole val split), else its last per-epoch value. Higher is better, except for metrics named *loss/*brier.
   Ties go to the newer version. Only versions trained on the dataset in `--data` compete.
2. Evidence: the candidate and the current champion are scored on the same locked test split
   (`scoring.evaluate_model`, what `pneumo evaluate --split test` runs), each at the threshold chosen on
   validation, and on every `--external NAME=DATA` set (all of its splits; refused when it is the training
   dataset or shares patients with it). The champion must have been trained on the same dataset (same digest),
   or the gate refuses: its training patients could sit in another dataset's test split.
3. Decision, under `pipeline.promote.lock`: the champion is re-read (if it moved since the scoring, the gate
   runs again against the new one; scores are cached); one query is charged on every test split read
   (`pipeline.evaluate.holdout`: refused when the split's budget is spent); `pipeline.promote.gate.decide`
   applies the rule of `[promote]` at level alpha / test_queries; the alias moves if the candidate passed. Dry
   runs and forced versions are queries like any other.
4. Disclosure: a candidate that is not promoted (and any dry run) is sealed (`record.seal`): its test results
   are dropped before anything is printed, logged, tagged or returned; "kept" is all the gate says about it.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.artifact import tag_keys, tracking
from pipeline.artifact.model_store import CHAMPION, MODEL_NAME, champion_uri  # noqa: F401  (re-exported)
from pipeline.config import PromoteConfig, check_section
from pipeline.errors import InputError, one_line
from pipeline.evaluate import holdout
from pipeline.evaluate.metrics import lower_is_better
from pipeline.promote import gate, model_card
from pipeline.promote.gate import Evaluation, Rule
from pipeline.promote.lock import promotion_lock
from pipeline.promote.record import (  # noqa: F401
    PREVIOUS,
    Candidate,
    Decision,
    External,
    alias_version,
    complete,
    format_decision,
    kill_point,
    pending_promotions,
    repair,
    seal,
)
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
    return alias_version(client, model, CHAMPION)


# --- evidence ------------------------------------------------------------------------------------------------
def evaluate_version(model: str, version: str, data_dir: str | Path, tracking_uri: str, n_boot: int = 1000,
                     split: str = "test") -> Evaluation:
    """Metrics of one version on `split` (`all` for an external set): `pneumo evaluate` for that version."""
    from pipeline.evaluate.scoring import evaluate_model

    with tempfile.TemporaryDirectory(prefix="pneumo-gate-") as tmp:
        # ledger=None: promote charges its test reads itself, under the lock (pipeline/evaluate/holdout.py)
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
    from pipeline.artifact.model_store import artifact_sha256, downloaded

    with downloaded(f"models:/{model}/{version}") as local:  # a private copy, deleted after hashing
        return artifact_sha256(local)


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
            before_commit: Callable[[Decision], None] | None = None, rule_source: str | None = None) -> Decision:
    """Pick the best candidate, gate it against the champion under the `[promote]` rule, and move `champion`
    if it passes (the steps: this module's docstring).

    `config` None: the rule `study` was launched with, else the built-in one (`rule_source` says where a given
    `config` came from). `version` forces the candidate. `before_commit(decision)` runs between the scoring
    and the locked decision (a test hook: a slow promotion is simulated by blocking there).
    """
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(uri)
    if not dry_run and pending_promotions(client, uri, model):  # an earlier promotion died half-way
        with promotion_lock(uri, model, client=client, timeout=lock_timeout):
            for line in repair(client, uri, model):
                print(f"pneumo promote: {line}", file=sys.stderr, flush=True)
    cfg, rule_source = (config, rule_source or "given in code") if config else study_rule(client, study)
    rule_of(cfg)
    metric = metric or study_metric(versions(client, model), study)
    cand, data_dir, manifest, same, skipped = _candidates(client, model, metric, study, data_dir, version)
    ext_sets = parse_externals(externals)
    check_external(ext_sets, data_dir, manifest)
    g = _Gate(client, uri, model, cfg, rule_of(cfg), data_dir, n_boot)
    for attempt in range(1, max_attempts + 1):
        decision = Decision(outcome="unchanged", reason="", model=model, candidate=cand,
                            champion=champion_version(client, model), data_dir=data_dir, digest=manifest["digest"],
                            metric=metric, rule=g.rule, n_candidates=len(same), skipped=skipped, dry_run=dry_run,
                            attempts=attempt, forced=str(version) if version is not None else None,
                            rule_source=rule_source)
        if decision.champion == cand.version:  # no query: the champion's results are public already
            decision.reason = f"version {cand.version} is already the champion: nothing to do"
            decision.candidate_eval = g.evaluation(cand.version)
            return decision
        _score(g, decision, ext_sets)
        if before_commit:
            before_commit(decision)
        if _decide_under_lock(g, decision, ext_sets, lock_timeout, manifest):
            break
    else:
        raise RegistryError(f"{model}: the champion changed {max_attempts} times during this promotion; "
                            "try again")
    if decision.outcome != "promoted" or dry_run:
        seal(decision)
    if dry_run:  # changes nothing: the ledger holds the charged read and its outcome
        return decision
    if decision.outcome != "promoted":  # a promotion's record was written, and completed, under the lock
        _record(client, uri, decision, manifest)
    _describe_versions(client, decision)
    if decision.outcome == "promoted" and log_images:
        _explain(client, uri, model, decision, data_dir)
    return decision


def study_rule(client: MlflowClient, study: str | None) -> tuple[PromoteConfig, str]:
    """The `[promote]` section `study` was launched with (recorded by pipeline.study.tune.prepare), and where it
    came from; the built-in rule when there is no study or it recorded none (a study from before the record)."""
    import json

    exp = client.get_experiment_by_name(study) if study else None
    runs = client.search_runs([exp.experiment_id], f"tags.{tag_keys.KIND} = 'study'", max_results=1,
                              order_by=["attributes.start_time DESC"]) if exp else []
    recorded = runs[0].data.tags.get(tag_keys.STUDY_RULE) if runs else None
    if not recorded:
        why = f"study {study!r} recorded no rule" if study else "no --study and no --config"
        return PromoteConfig(), f"the built-in rule ({why})"
    rule = json.loads(recorded)
    values = dict(rule["promote"])
    values["require_external"] = list(values.get("require_external") or [])
    try:
        cfg = PromoteConfig(**values)
    except TypeError as e:  # a key this version no longer has
        raise RegistryError(f"study {study!r}: its recorded [promote] rule does not fit this version ({e}); "
                            "pass --config") from None
    where = rule.get("experiment_file") or "the config it was launched with"
    sha = f", sha256 {rule['experiment_sha256'][:12]}" if rule.get("experiment_sha256") else ""
    return cfg, f"{where} ([promote] recorded by study {study!r} at launch{sha})"


def _candidates(client: MlflowClient, model: str, metric: str, study: str | None, data_dir, version: str | None):
    """Step 1 -> (the candidate, the data folder, its manifest, the candidates on that dataset, the skipped ones
    with why)."""
    ranked, skipped = rank_candidates(client, model, metric, study)
    cand, data_dir, manifest, same = _choose(ranked, skipped, str(data_dir) if data_dir else None, version, model)
    skipped = skipped + [(c.version, f"trained on dataset {str(c.digest)[:12]}") for c in ranked
                         if c.digest != manifest["digest"] and (version is None or c.version == str(version))]
    return cand, data_dir, manifest, same, skipped


def check_external(ext_sets: dict, data_dir: str, manifest: dict) -> None:
    """An external set must be external: not the training dataset (same digest), and none of its patients in
    the training dataset (any split: the model saw its training patients, the gate its test ones)."""
    if not ext_sets:
        return
    own = _patients(data_dir)
    for name, (where, ext_manifest) in ext_sets.items():
        if ext_manifest["digest"] == manifest["digest"]:
            raise RegistryError(f"--external {name}={where}: this is the training dataset itself (digest "
                                f"{manifest['digest'][:12]}): an external set must come from other patients")
        shared = own & _patients(where)
        if shared:
            raise RegistryError(f"--external {name}={where}: {len(shared)} of its patients are in the training "
                                f"dataset {data_dir} (e.g. {sorted(shared)[0]}): an external set must come from "
                                "other patients")


def _patients(data_dir: str | Path) -> set[str]:
    """The patient ids of a converted dataset (its splits.csv, every split)."""
    import csv

    path = Path(data_dir) / "splits.csv"
    try:
        with path.open(newline="") as f:
            return {row["patient_id"] for row in csv.DictReader(f)}
    except (OSError, KeyError) as e:
        raise RegistryError(f"{path}: cannot read the dataset's patients ({one_line(e)})") from None


def _score(g: _Gate, d: Decision, ext_sets: dict) -> None:
    """Step 2a, before the lock: candidate and champion scored on the test split and every external set. The
    scores stay in this process (cached in the _Gate); nothing is revealed or decided yet."""
    d.candidate_eval = g.evaluation(d.candidate.version)
    if d.champion is not None:
        _check_champion_dataset(g.client, g.model, d.champion, d.digest, g.data_dir)
        d.champion_eval = g.evaluation(d.champion)
        d.champion_value = _candidate(g.client.get_model_version(g.model, d.champion), d.metric,
                                      _Runs(g.client)).value
    for where, _ in ext_sets.values():
        g.evaluation(d.candidate.version, where, "all")
        if d.champion is not None:
            g.evaluation(d.champion, where, "all")


def _decide_under_lock(g: _Gate, d: Decision, ext_sets: dict, lock_timeout: float, manifest: dict) -> bool:
    """Steps 2b-4, under the lock: False when another promotion moved the champion since the scoring (the gate
    runs again against the new one). Else: one query charged on every test split read (refused when a budget
    is spent: pipeline/evaluate/holdout.py), the evidence and the decision at the level the charge allows, the
    alias moved if the candidate passed (not on a dry run), and the ledger told the outcome."""
    with promotion_lock(g.uri, g.model, client=g.client, timeout=lock_timeout) as fence:
        if champion_version(g.client, g.model) != d.champion:
            return False
        d.charges = _charge(g, d, ext_sets)
        d.level = d.charges[0].level(g.rule.alpha)
        _gather_evidence(g, d, ext_sets, d.level)
        _decide(g, d)
        if d.outcome == "promoted" and not d.dry_run:
            # Finish or repair: the whole record first, as pending (a rerun completes or undoes it, whichever
            # side of the alias move the process died on), then the version's tags, the alias, the completion.
            d.promoted_at = _now()
            d.model_sha256 = model_sha256(g.model, d.candidate.version)
            _record(g.client, g.uri, d, manifest, pending=True)
            kill_point("pending-written")
            _commit(g.client, d, fence)
            kill_point("alias-moved")
            complete(g.client, g.model, g.client.get_run(d.run_id))
            return True
        bit = "would be promoted" if d.outcome == "promoted" else "kept"
        for c in d.charges:
            holdout.settle(g.client, c, bit)
    return True


def _charge(g: _Gate, d: Decision, ext_sets: dict) -> list[holdout.Charge]:
    command = "promote --dry-run" if d.dry_run else "promote" + (" --version" if d.forced else "")
    versions = [d.candidate.version] + ([d.champion] if d.champion else [])
    reads = [(d.digest, "test", g.data_dir, command)] + [
        (m["digest"], "all", where, f"{command} --external {name}") for name, (where, m) in ext_sets.items()]
    return [holdout.charge(g.client, g.uri, digest=digest, split=split, command=cmd, versions=versions,
                           data_dir=where, queries=g.cfg.test_queries) for digest, split, where, cmd in reads]


def _gather_evidence(g: _Gate, d: Decision, ext_sets: dict, level: float) -> None:
    """Step 2b: the paired comparisons at `level`, on the test split and every external set (scores cached)."""
    try:
        d.comparison = (gate.compare(d.candidate_eval, d.champion_eval, level, g.cfg.bootstrap)
                        if d.champion_eval else None)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    d.externals = []
    for name, (where, ext_manifest) in ext_sets.items():
        x = External(name, where, ext_manifest["digest"], g.evaluation(d.candidate.version, where, "all"))
        if d.champion is not None:
            x.champion = g.evaluation(d.champion, where, "all")
            x.comparison = gate.compare(x.candidate, x.champion, level, g.cfg.bootstrap)
        d.externals.append(x)


def _decide(g: _Gate, d: Decision) -> None:
    """Step 3: the rule of `[promote]`, at the level of this query, on the evidence (pipeline.promote.gate)."""
    try:
        verdict = gate.decide(replace(g.rule, alpha=d.level), d.candidate_eval, d.champion_eval, d.comparison,
                              study_metric=d.metric, candidate_value=d.candidate.value,
                              champion_value=d.champion_value, lower_is_better=lower_is_better(d.metric),
                              externals={x.name: (x.candidate, x.champion, x.comparison) for x in d.externals})
    except ValueError as e:
        raise RegistryError(str(e)) from None
    d.outcome, d.reason, d.checks = verdict.outcome, verdict.reason, verdict.checks


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
