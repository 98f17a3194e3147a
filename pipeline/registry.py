"""Registered versions, the promotion gate, the `champion` alias and its history.

`promote()` is what `pneumo promote` runs:
1. Candidates: the READY versions of the registered model (optionally of one study), ranked by a validation
   metric: the version tag (`pneumo tune` tags each version with its study's metric under its own name and
   names it in `study_metric`; by default the promotion ranks by that metric, e.g. val_auc_shift_mean), else
   the training run's `final_<metric>` (exact, on the whole val split), else its last per-epoch value. Higher is better, except for metrics named *loss/*brier.
   Ties go to the newer version. Only versions trained on the dataset in `--data` compete.
2. Gate, in the spirit of TFX's Evaluator "blessing": the candidate and the current champion are evaluated on the
   same locked test split (`scoring.evaluate_model`, what `pneumo evaluate` runs), each at the threshold chosen
   on validation when it was trained. The champion must have been trained on the same dataset (same digest),
   or the gate refuses: its training patients could sit in another dataset's test split. The candidate passes
   when its test AUC is not below the champion's by more than `min_delta`; both AUCs carry bootstrap 95% CIs,
   and the difference a paired bootstrap CI plus DeLong's test, so a user sees whether a gain is real.
3. Commit, under a lock: aliases are single-valued, so the danger is a lost update (a slower promotion of a
   worse model landing last, or a wrong `previous-champion`). Just before moving the alias the champion is
   re-read under `promotion_lock`; if it moved since the evaluation, the gate runs again against the new
   champion (evaluations are cached). The lock: a file lock beside an SQLite store, a database advisory lock on
   PostgreSQL/MySQL, and a lease in a registered-model tag (write, settle, read back) on a tracking server.
4. Record: the decision is an MLflow run `promote:<version>` (both evaluations, the paired comparison, plots);
   a promoted version carries its test metrics, threshold and dataset digest as tags and its model card as
   description; the replaced champion gets alias `previous-champion` and `replaced_at` / `replaced_by` tags.

Registry knows nothing of tf.data: evaluation goes through pipeline.scoring, imported when needed.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import evaluate as ev
from pipeline import model_card, tracking
from pipeline.errors import InputError
from pipeline.model_store import CHAMPION, MODEL_NAME, champion_uri  # noqa: F401  (re-exported)

PREVIOUS = "previous-champion"
EXPERIMENT = "promotions"
LOCK_TAG = "promotion_lock"


class RegistryError(InputError):
    """A one-line reason a promotion cannot be decided (no versions, missing data, mismatched datasets...)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- candidates ------------------------------------------------------------------------------------------
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


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("loss", "brier"))


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
    digest = tags.get("dataset_digest") or (run.data.tags.get("dataset_digest") if run else None)
    return Candidate(version=str(mv.version), run_id=mv.run_id, value=value, source=source, digest=digest,
                     data_dir=run.data.params.get("data.dir") if run else None, tags=tags,
                     run_name=run.info.run_name if run else None, description=mv.description)


def versions(client: MlflowClient, model: str) -> list:
    """Every READY version of `model` (RegistryError when the model is not registered at all)."""
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise RegistryError(f"no registered model {model!r} in {client.tracking_uri}: no registered versions "
                            "(`pneumo train` and `pneumo tune` register every model they log)") from None
    found = client.search_model_versions(f"name='{model}'")
    return [mv for mv in found if mv.status == "READY"]


def study_metric(all_versions: list, study: str | None) -> str:
    """The metric a study optimised (version tag `study_metric`, written by `pneumo tune`), else val_auc.
    Without a study, the versions' single shared study_metric if they agree."""
    found = {mv.tags.get("study_metric") for mv in all_versions
             if (not study or mv.tags.get("study") == study) and mv.tags.get("study_metric")}
    return found.pop() if len(found) == 1 else "val_auc"


def rank_candidates(client: MlflowClient, model: str, metric: str | None = None, study: str | None = None,
                    ) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """-> (candidates best first, [(version, why it is not a candidate)]). `metric` None: the study's own
    objective (`study_metric`), so promotion ranks by what the study optimised."""
    all_versions = versions(client, model)
    if not all_versions:
        raise RegistryError(f"registered model {model!r} has no registered versions (train or tune first)")
    metric = metric or study_metric(all_versions, study)
    runs = _Runs(client)
    ranked, skipped = [], []
    for mv in all_versions:
        if study and mv.tags.get("study") != study:
            continue
        c = _candidate(mv, metric, runs)
        if math.isnan(c.value):
            skipped.append((c.version, f"no {metric} (version tag or run metric)"))
        else:
            ranked.append(c)
    if study and not ranked and not skipped:
        studies = sorted({mv.tags["study"] for mv in all_versions if mv.tags.get("study")})
        raise RegistryError(f"no version of {model!r} belongs to study {study!r} (studies: "
                            f"{', '.join(studies) or 'none'})")
    sign = 1 if lower_is_better(metric) else -1
    ranked.sort(key=lambda c: (sign * c.value, -int(c.version)))
    return ranked, skipped


def champion_version(client: MlflowClient, model: str) -> str | None:
    aliases = client.get_registered_model(model).aliases or {}
    value = aliases.get(CHAMPION)
    return str(value) if value is not None else None


# --- evaluation and the gate -------------------------------------------------------------------------------
@dataclass
class Evaluation:
    version: str
    metrics: dict
    subgroups: list
    threshold: float
    threshold_source: str
    labels: object  # np.ndarray
    probabilities: object  # np.ndarray
    patient_id: list
    report: dict  # the JSON `pneumo evaluate` writes


def evaluate_version(model: str, version: str, data_dir: str | Path, tracking_uri: str,
                     n_boot: int = 1000) -> Evaluation:
    """Test-split metrics of one version: exactly `pneumo evaluate --model models:/<model>/<version>`."""
    from pipeline.scoring import evaluate_model

    with tempfile.TemporaryDirectory(prefix="pneumo-gate-") as tmp:
        r = evaluate_model(f"models:/{model}/{version}", data_dir, "test", tracking_uri=tracking_uri,
                           out=Path(tmp) / "evaluation.json", n_boot=n_boot)
    m = r["metrics"]
    report = {k: r[k] for k in ("model", "split", "dataset_digest", "threshold_source", "metrics", "subgroups")}
    return Evaluation(version=version, metrics=m, subgroups=r["subgroups"], threshold=float(m["threshold"]),
                      threshold_source=r["threshold_source"], labels=r["labels"], probabilities=r["probabilities"],
                      patient_id=list(r["patient_id"]), report=report)


def compare(candidate: Evaluation, champion: Evaluation, n_boot: int = 2000) -> dict:
    """Paired comparison on the same test cases: AUC difference with a paired-bootstrap CI and DeLong's test."""
    if candidate.patient_id != champion.patient_id:
        raise RegistryError("candidate and champion were scored on different test records: cannot pair them")
    out = ev.paired_auc_difference(candidate.labels, candidate.probabilities, champion.probabilities, n=n_boot)
    _, z, p = ev.delong_test(candidate.labels, candidate.probabilities, champion.probabilities)
    out.update(delong_z=z, delong_p=p, n_test=len(candidate.patient_id))
    return out


def gate(candidate: Evaluation, champion: Evaluation | None, min_delta: float, n_boot: int = 2000,
         ) -> tuple[str, str, dict | None]:
    """-> (outcome "promoted" | "rejected", reason, comparison or None)."""
    auc = candidate.metrics["auc"]
    if auc is None or not math.isfinite(auc):
        raise RegistryError("the test split holds one class only: AUC is undefined, the gate cannot decide")
    if champion is None:
        return "promoted", f"no champion yet; candidate test AUC {_ci(candidate.metrics)}", None
    c = compare(candidate, champion, n_boot)
    words = (f"test AUC {_ci(candidate.metrics)} vs champion v{champion.version} {_ci(champion.metrics)}: "
             f"difference {c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] (paired bootstrap "
             f"p={c['p_value']:.3f}, DeLong p={c['delong_p']:.3f}). {model_card.significance(c)}")
    if c["diff"] >= -min_delta:
        return "promoted", f"not worse than the champion by more than {min_delta:g}: {words}", c
    return "rejected", f"no improvement: worse than the champion by more than {min_delta:g}: {words}", c


def _ci(m: dict) -> str:
    f = model_card._f
    return f"{f(m['auc'])} [{f(m['auc_ci_low'])}, {f(m['auc_ci_high'])}]"


# --- the lock ----------------------------------------------------------------------------------------------
def lock_kind(tracking_uri: str) -> str:
    scheme = tracking_uri.split(":", 1)[0].split("+")[0].lower()
    if scheme == "sqlite":
        return "file"
    if scheme in ("postgresql", "postgres", "mysql"):
        return "database"
    return "tag"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model: str, *, client: MlflowClient | None = None, kind: str | None = None,
                   timeout: float = 300.0, poll: float = 0.2, settle: float = 1.0, lease: float = 120.0,
                   ) -> Iterator[None]:
    """Mutual exclusion of promotions of one model, across threads, processes and (for servers) hosts."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    kind = kind or lock_kind(uri)
    deadline = time.monotonic() + timeout

    def give_up(holder: str = "another promotion"):
        raise RegistryError(f"{model}: promotion lock held by {holder} for more than {timeout:.0f} s; "
                            "try again later")

    if kind == "file":
        db = Path(uri.split(":///", 1)[1])
        path = db.with_name(f"{db.name}.promote-{hashlib.sha1(model.encode()).hexdigest()[:12]}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: threads exclude too
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        give_up()
                    time.sleep(poll)
            yield
        finally:
            os.close(fd)  # releases the lock
    elif kind == "database":
        with _advisory_lock(uri, model, deadline, poll, give_up):
            yield
    else:
        with _tag_lease(client or MlflowClient(uri, uri), model, deadline, poll, settle, lease, give_up):
            yield


@contextlib.contextmanager
def _advisory_lock(uri: str, model: str, deadline: float, poll: float, give_up: Callable) -> Iterator[None]:
    """A session-level advisory lock in the tracking database (PostgreSQL or MySQL/MariaDB)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(uri)
    if url.drivername in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2-binary.
        url = url.set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    name = f"pneumo-promote:{model}"
    if engine.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        take, drop, args = "SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": key}
    else:
        take, drop, args = "SELECT GET_LOCK(:n, 0)", "SELECT RELEASE_LOCK(:n)", {"n": name[:64]}
    try:
        with engine.connect() as conn:
            while not conn.execute(sa.text(take), args).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    give_up()
                time.sleep(poll)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text(drop), args)
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _tag_lease(client: MlflowClient, model: str, deadline: float, poll: float, settle: float, lease: float,
               give_up: Callable) -> Iterator[None]:
    """A lease in a registered-model tag, for tracking servers (no database access): write our token only when
    the tag is free or expired, wait `settle` seconds for a concurrent writer's tag to land, and hold the lock
    only if the tag still names us. The critical section (re-read + alias moves) lasts seconds, far below
    `lease`; a crashed holder's lease simply expires."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def holder() -> dict | None:
        raw = (client.get_registered_model(model).tags or {}).get(LOCK_TAG)
        try:
            blob = json.loads(raw) if raw else None
        except ValueError:
            return None
        return blob if blob and blob.get("expires", 0) > time.time() else None

    while True:
        current = holder()
        if current is None:
            try:
                client.set_registered_model_tag(model, LOCK_TAG, json.dumps({"owner": token,
                                                                              "expires": time.time() + lease}))
            except MlflowException:
                pass  # a concurrent writer created the tag first (unique key): read back who holds it
            time.sleep(settle)
            current = holder()
            if current and current["owner"] == token:
                break
        if time.monotonic() > deadline:
            give_up(current["owner"] if current else "another promotion")
        time.sleep(poll)
    try:
        yield
    finally:
        current = holder()
        if current and current["owner"] == token:
            client.delete_registered_model_tag(model, LOCK_TAG)


# --- promotion -------------------------------------------------------------------------------------------
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
    min_delta: float
    n_candidates: int
    skipped: list = field(default_factory=list)
    candidate_eval: Evaluation | None = None
    champion_eval: Evaluation | None = None
    comparison: dict | None = None
    dry_run: bool = False
    attempts: int = 1
    promoted_at: str | None = None
    run_id: str | None = None
    forced: str | None = None  # the version asked for, if any


def _manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest, which must have a non-empty locked test split."""
    from pipeline.manifest import DataError, load_manifest

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


def promote(model: str = MODEL_NAME, data_dir: str | Path | None = None, *, study: str | None = None,
            metric: str | None = None, min_delta: float = 0.0, dry_run: bool = False, version: str | None = None,
            tracking_uri: str | None = None, n_boot: int = 1000, lock_timeout: float = 300.0,
            max_attempts: int = 5, before_commit: Callable[[Decision], None] | None = None) -> Decision:
    """Pick the best candidate, gate it against the champion, and move `champion` if it passes.

    `version` forces the candidate. `before_commit(decision)` runs between the evaluation and the locked
    commit (a test hook: a slow promotion is simulated by blocking there).
    """
    if min_delta < 0:
        raise RegistryError(f"--min-delta must be >= 0, got {min_delta}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.setup(uri)
    metric = metric or study_metric(versions(client, model), study)
    ranked, skipped = rank_candidates(client, model, metric, study)
    cand, data_dir, manifest, same = _choose(ranked, skipped, str(data_dir) if data_dir else None, version, model)
    digest = manifest["digest"]
    skipped = skipped + [(c.version, f"trained on dataset {str(c.digest)[:12]}") for c in ranked
                         if c.digest != digest and (version is None or c.version == str(version))]
    cache: dict[str, Evaluation] = {}

    def evaluation(v: str) -> Evaluation:
        if v not in cache:
            cache[v] = evaluate_version(model, v, data_dir, uri, n_boot)
        return cache[v]

    for attempt in range(1, max_attempts + 1):
        champ = champion_version(client, model)
        decision = Decision(outcome="unchanged", reason="", model=model, candidate=cand, champion=champ,
                            data_dir=data_dir, digest=digest, metric=metric, min_delta=min_delta,
                            n_candidates=len(same), skipped=skipped, dry_run=dry_run, attempts=attempt,
                            forced=str(version) if version is not None else None)
        if champ == cand.version:
            decision.reason = f"version {cand.version} is already the champion: nothing to do"
            decision.candidate_eval = evaluation(cand.version)
            return decision
        champ_eval = None
        if champ is not None:
            _check_champion_dataset(client, model, champ, digest, data_dir)
            champ_eval = evaluation(champ)
        decision.candidate_eval, decision.champion_eval = evaluation(cand.version), champ_eval
        decision.outcome, decision.reason, decision.comparison = gate(decision.candidate_eval, champ_eval,
                                                                      min_delta, 2 * n_boot)
        if dry_run:
            return decision
        if before_commit:
            before_commit(decision)
        with promotion_lock(uri, model, client=client, timeout=lock_timeout):
            if champion_version(client, model) != champ:
                continue  # another promotion landed meanwhile: gate again against the new champion
            if decision.outcome == "promoted":
                decision.promoted_at = _now()
                _commit(client, decision)
        break
    else:
        raise RegistryError(f"{model}: the champion changed {max_attempts} times during this promotion; "
                            "try again")
    _record(client, uri, decision, manifest)
    if decision.outcome == "promoted":
        _explain(client, uri, model, decision, data_dir)
    return decision


def _explain(client: MlflowClient, uri: str, model: str, d: Decision, data_dir: str | Path) -> None:
    """Grad-CAM grid and pointing-game score of the new champion on the test split, logged to its training
    run. Runs after the gate decided, so the test split cannot sway the decision; never undoes a promotion."""
    from pipeline.explain import ExplainError, log_explanations  # lazy: TensorFlow only when promoting

    v = d.candidate.version
    try:
        score = log_explanations(f"models:/{model}/{v}", data_dir, "test", d.candidate.run_id, tracking_uri=uri)
        if math.isfinite(score):
            client.set_model_version_tag(model, v, "pointing_game", f"{score:.4f}")
    except (ExplainError, MlflowException, OSError) as e:
        print(f"warning: no Grad-CAM explanations for v{v}: {e}", file=sys.stderr)


def _check_champion_dataset(client: MlflowClient, model: str, champ: str, digest: str, data_dir: str) -> None:
    mv = client.get_model_version(model, champ)
    theirs = mv.tags.get("dataset_digest")
    if not theirs:
        run = _Runs(client)(mv.run_id)
        theirs = run.data.tags.get("dataset_digest") if run else None
    if theirs != digest:
        raise RegistryError(f"champion {model} version {champ} was trained on dataset {str(theirs)[:12]}, but "
                            f"{data_dir} is dataset {digest[:12]}: candidate and champion must be compared on "
                            "the same locked test split; refusing (pass --data with the champion's dataset)")


def _commit(client: MlflowClient, d: Decision) -> None:
    """Under the lock: the candidate's facts first, then the history, and the champion alias last (the commit
    point: a crash before it leaves the old champion in place)."""
    m, v = d.candidate_eval.metrics, d.candidate.version
    tags = {f"test_{k}": m[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity",
                                        "specificity", "majority_baseline_accuracy", "n", "positives")}
    tags.update(threshold=f"{d.candidate_eval.threshold:.6f}", dataset_digest=d.digest, promoted_at=d.promoted_at,
                promoted_over=d.champion or "")
    for key, value in tags.items():
        value = f"{value:.6f}" if isinstance(value, float) else str(value)
        client.set_model_version_tag(d.model, v, key, value)
    if d.champion is not None:
        client.set_registered_model_alias(d.model, PREVIOUS, d.champion)
        client.set_model_version_tag(d.model, d.champion, "replaced_at", d.promoted_at)
        client.set_model_version_tag(d.model, d.champion, "replaced_by", v)
    client.set_registered_model_alias(d.model, CHAMPION, v)


def _record(client: MlflowClient, uri: str, d: Decision, manifest: dict) -> None:
    """The decision as an MLflow run `promote:<version>`; on promotion, the model card and descriptions."""
    import matplotlib

    matplotlib.use("Agg")
    exp_id = tracking.ensure_experiment(EXPERIMENT, uri)
    v, ce, he = d.candidate.version, d.candidate_eval, d.champion_eval
    run = client.create_run(exp_id, run_name=f"promote:{v}", tags={
        "model": d.model, "decision": d.outcome, "candidate_version": v, "champion_version": d.champion or "",
        "dataset_digest": d.digest, "mlflow.note.content": f"**{d.outcome.upper()}** {d.model} v{v}: {d.reason}"})
    rid = d.run_id = run.info.run_id
    try:
        for key, value in {"model": d.model, "candidate_version": v, "champion_version": d.champion or "none",
                           "metric": d.metric, "min_delta": d.min_delta, "data_dir": d.data_dir,
                           "candidates": d.n_candidates, "attempts": d.attempts}.items():
            client.log_param(rid, key, value)
        metrics = {f"candidate_test_{k}": ce.metrics[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "accuracy",
                                                                   "sensitivity", "specificity")}
        metrics["candidate_val_metric"] = d.candidate.value
        metrics["majority_baseline_accuracy"] = ce.metrics["majority_baseline_accuracy"]
        if he is not None:
            metrics.update({f"champion_test_{k}": he.metrics[k] for k in ("auc", "auc_ci_low", "auc_ci_high",
                                                                          "accuracy", "sensitivity", "specificity")})
            c = d.comparison
            metrics.update(auc_diff=c["diff"], auc_diff_ci_low=c["ci_low"], auc_diff_ci_high=c["ci_high"],
                           p_bootstrap=c["p_value"], p_delong=c["delong_p"])
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                client.log_metric(rid, key, float(value))
        client.log_dict(rid, ev.jsonable(ce.report), "evaluation/candidate.json")
        results = {f"candidate v{v}": ce.metrics}
        if he is not None:
            client.log_dict(rid, ev.jsonable(he.report), "evaluation/champion.json")
            client.log_dict(rid, ev.jsonable(d.comparison), "evaluation/comparison.json")
            results[f"champion v{d.champion}"] = he.metrics
        client.log_text(rid, format_decision(d) + "\n", "decision.txt")
        figure = ev.plot_auc_comparison(results)
        if d.comparison:
            k = d.comparison
            figure.axes[0].set_title(f"Test AUC: difference {k['diff']:+.3f} [{k['ci_low']:+.3f}, "
                                     f"{k['ci_high']:+.3f}], DeLong p={k['delong_p']:.3f}")
        client.log_figure(rid, figure, "plots/auc_comparison.png")
        client.log_figure(rid, ev.plot_roc(ce.labels, ce.probabilities, f"ROC, test: candidate v{v}",
                                           threshold=ce.threshold), "plots/roc_candidate.png")
        if he is not None:
            client.log_figure(rid, ev.plot_roc(he.labels, he.probabilities, f"ROC, test: champion v{d.champion}",
                                               threshold=he.threshold), "plots/roc_champion.png")
        if d.outcome == "promoted":
            _publish_card(client, d, manifest)
        _describe_versions(client, d)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise


def _publish_card(client: MlflowClient, d: Decision, manifest: dict) -> None:
    v, ce = d.candidate.version, d.candidate_eval
    lineage = {"study": d.candidate.tags.get("study"), "trial": d.candidate.tags.get("trial_number"),
               f"validation {d.metric}": f"{d.candidate.value:.4f} ({d.candidate.source})",
               "promotion run": d.run_id}
    card = model_card.render(model=d.model, version=v, metrics=ce.metrics, subgroups=ce.subgroups,
                             threshold=ce.threshold, threshold_source=ce.threshold_source, manifest=manifest,
                             digest=d.digest, data_dir=d.data_dir, run_id=d.candidate.run_id,
                             run_name=d.candidate.run_name, lineage=lineage, comparison=d.comparison,
                             champion=d.champion, promoted_at=d.promoted_at)
    figure = model_card.subgroup_figure([r for r in ce.subgroups if r["group"] in ("view_position", "sex",
                                                                                     "age_band")])
    client.log_text(d.run_id, card, "model_card/model_card.md")
    client.log_figure(d.run_id, figure, "model_card/subgroups.png")
    try:  # the training run keeps the card beside the model it describes
        client.log_text(d.candidate.run_id, card, "model_card/model_card.md")
        client.log_figure(d.candidate.run_id, figure, "model_card/subgroups.png")
    except (MlflowException, OSError):
        pass  # a deleted training run: the version description and the promotion run still hold the card
    client.set_model_version_tag(d.model, v, "promotion_run_id", d.run_id)
    client.update_model_version(d.model, v, description=card)
    if d.champion is not None:  # the replaced champion's card stays, headed by when and by whom it was replaced
        old = client.get_model_version(d.model, d.champion).description or ""
        note = f"> Replaced as `{CHAMPION}` by version {v} on {d.promoted_at} (now `{PREVIOUS}` until the next " \
               "promotion).\n\n"
        client.update_model_version(d.model, d.champion, description=note + old)
    client.update_registered_model(d.model, description=model_card.model_description(
        d.model, v, ce.metrics, d.digest, d.promoted_at))


def _describe_versions(client: MlflowClient, d: Decision) -> None:
    """Give every version without a description a short one, so the registry page says what each version is."""
    runs = _Runs(client)
    for mv in versions(client, d.model):
        if mv.description:
            continue
        c = _candidate(mv, d.metric, runs)
        client.update_model_version(d.model, c.version, description=model_card.version_summary(
            c.version, c.tags, d.metric, c.value, c.run_name))


# --- report ----------------------------------------------------------------------------------------------
def format_decision(d: Decision) -> str:
    f = model_card._f
    c = d.candidate
    trial = f", study {c.tags['study']} trial {c.tags.get('trial_number', '?')}" if c.tags.get("study") else ""
    how = f"best of {d.n_candidates} candidate(s) on this dataset" if d.forced is None else "chosen with --version"
    lines = [f"candidate  {d.model} v{c.version} ({d.metric} {f(c.value)} from {c.source}{trial}); {how}",
             "champion   " + (f"v{d.champion}" if d.champion else "none yet"),
             f"dataset    {d.data_dir} (digest {d.digest[:12]})"]
    if d.skipped:
        lines.append("not candidates: " + "; ".join(f"v{v}: {why}" for v, why in d.skipped[:5])
                     + (f"; ... {len(d.skipped) - 5} more" if len(d.skipped) > 5 else ""))
    rows = [("candidate v" + c.version, d.candidate_eval)]
    if d.champion_eval is not None:
        rows.append(("champion v" + str(d.champion), d.champion_eval))
    if d.candidate_eval is not None:
        n, pos = d.candidate_eval.metrics["n"], d.candidate_eval.metrics["positives"]
        lines += ["", f"test split: {n} patients, {pos} positive",
                  f"{'':<16}{'test AUC [95% CI]':<24}{'accuracy':>9}{'baseline':>9}{'sens':>7}{'spec':>7}"
                  f"{'threshold':>10}"]
        for name, e in rows:
            m = e.metrics
            lines.append(f"{name:<16}{_ci(m):<24}{f(m['accuracy']):>9}{f(m['majority_baseline_accuracy']):>9}"
                         f"{f(m['sensitivity']):>7}{f(m['specificity']):>7}{f(e.threshold, 4):>10}")
    if d.comparison:
        k = d.comparison
        lines.append(f"{'difference':<16}{k['diff']:+.3f} [{k['ci_low']:+.3f}, {k['ci_high']:+.3f}]  paired "
                     f"bootstrap p={f(k['p_value'])}, DeLong p={f(k['delong_p'])}")
    lines.append("")
    verdict = {"promoted": f"PROMOTED v{c.version} to {CHAMPION}" + (
                   f"; v{d.champion} is now {PREVIOUS}" if d.champion else ""),
               "rejected": f"NOT PROMOTED: champion v{d.champion} unchanged",
               "unchanged": f"UNCHANGED: v{c.version} already is the {CHAMPION}"}[d.outcome]
    if d.dry_run:
        verdict = f"DRY RUN, nothing changed: would be {verdict}"
    lines.append(f"decision   {verdict}")
    lines.append(f"reason     {d.reason}")
    if d.run_id:
        lines.append(f"recorded   MLflow run promote:{c.version} ({d.run_id}) in experiment {EXPERIMENT!r}")
    return "\n".join(lines)
