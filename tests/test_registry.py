"""Promotion: candidates, the evaluation gate, dry runs, clear refusals, history, and racing promotions."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

pytest_plugins = ["fixtures_registry"]
MODEL, META_MODEL, STUDY = "pneumonia-cnn", "pneumonia-cnn-meta", "regstudy"  # as in fixtures_registry
pytestmark = pytest.mark.slow

N_BOOT = 100  # bootstrap resamples in the tests: the numbers are not the point here


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


def _promote(store, **kwargs):
    from pipeline.registry import promote

    return promote(MODEL, tracking_uri=store.uri, n_boot=N_BOOT, **kwargs)


def _aliases(store) -> dict:
    return {k: str(v) for k, v in (_client(store.uri).get_registered_model(MODEL).aliases or {}).items()}


def snapshot(uri) -> dict:
    """Everything a promotion may change: aliases, model and version tags/descriptions, runs."""
    c = _client(uri)
    rm = c.get_registered_model(MODEL)
    exps = c.search_experiments()
    return {
        "aliases": {k: str(v) for k, v in (rm.aliases or {}).items()}, "description": rm.description, "tags": dict(rm.tags or {}),
        "versions": {mv.version: (dict(mv.tags), mv.description, sorted(mv.aliases))
                     for mv in c.search_model_versions(f"name='{MODEL}'")},
        "experiments": sorted(e.name for e in exps),
        "runs": sorted(r.info.run_id for r in c.search_runs([e.experiment_id for e in exps])),
    }


def test_candidates_are_ranked_by_val_metric(registry_store):
    from pipeline.registry import RegistryError, rank_candidates

    s = registry_store
    ranked, skipped = rank_candidates(_client(s.uri), MODEL, "val_auc")
    assert [c.version for c in ranked] == sorted(s.versions, key=lambda v: -s.val_auc[v])
    assert all(c.source == "version tag val_auc" for c in ranked) and not skipped
    # Without the version tag, the training run's exact final validation metric ranks the version.
    _client(s.uri).delete_model_version_tag(MODEL, ranked[0].version, "val_auc")
    again, _ = rank_candidates(_client(s.uri), MODEL, "val_auc", study=STUDY)
    top = next(c for c in again if c.version == ranked[0].version)
    assert top.source == "run metric final_val_auc" and top.value == pytest.approx(ranked[0].value, abs=1e-6)
    with pytest.raises(RegistryError, match="no version of 'pneumonia-cnn' belongs to study 'nope'"):
        rank_candidates(_client(s.uri), MODEL, "val_auc", study="nope")


def test_promote_picks_the_best_version_and_sets_champion(registry_store):
    s = registry_store
    best = max(s.versions, key=lambda v: s.val_auc[v])
    d = _promote(s, study=STUDY)
    assert d.outcome == "promoted" and d.candidate.version == best and d.champion is None
    assert d.data_dir == str(s.data)  # --data defaults to the folder the candidate was trained on
    assert _aliases(s) == {"champion": best}
    c = _client(s.uri)
    mv = c.get_model_version(MODEL, best)
    digest = json.loads((s.data / "manifest.json").read_text())["digest"]
    assert mv.tags["dataset_digest"] == digest
    assert float(mv.tags["test_auc"]) == pytest.approx(s.test_auc[best], abs=1e-6)
    assert float(mv.tags["threshold"]) == pytest.approx(d.candidate_eval.threshold, abs=1e-6)
    for text in ("# Model card", "not a diagnosis", digest, "Majority baseline", "view_position | AP",
                 "sex | F", "**Threshold:**", "## Known limits"):
        assert text in mv.description
    assert "not a diagnosis" in c.get_registered_model(MODEL).description
    # Every other version got a short description of what it is.
    assert all(c.get_model_version(MODEL, v).description for v in s.versions)
    run = c.get_run(d.run_id)
    assert run.info.run_name == f"promote:{best}" and run.data.tags["decision"] == "promoted"
    assert "PROMOTED" in run.data.tags["mlflow.note.content"]
    files = {f.path for f in c.list_artifacts(d.run_id, "plots")} | {
        f.path for f in c.list_artifacts(d.run_id, "model_card")}
    assert {"plots/auc_comparison.png", "model_card/model_card.md", "model_card/subgroups.png"} <= files


def test_a_worse_candidate_is_not_promoted(registry_store, capsys):
    from pipeline.cli import main

    s = registry_store
    worst, _, best = s.by_test_auc
    assert _promote(s, version=best).outcome == "promoted"
    before = snapshot(s.uri)
    code = main(["promote", "--version", worst, "--tracking-uri", s.uri, "--data", str(s.data)])
    out = capsys.readouterr().out
    assert code == 0  # a clear outcome, not an error
    assert "NOT PROMOTED" in out and "no improvement" in out and f"champion v{best} unchanged" in out
    assert "DeLong p=" in out and "paired bootstrap" in out
    after = snapshot(s.uri)
    assert after["aliases"] == before["aliases"] == {"champion": best}
    assert after["versions"] == before["versions"]
    new_runs = set(after["runs"]) - set(before["runs"])
    assert len(new_runs) == 1  # the decision is recorded all the same
    run = _client(s.uri).get_run(new_runs.pop())
    assert run.data.tags["decision"] == "rejected" and run.data.metrics["auc_diff"] < 0
    assert {f.path for f in _client(s.uri).list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/candidate.json", "evaluation/champion.json", "evaluation/comparison.json"}


def test_min_delta_lets_a_slightly_worse_model_through_and_history_is_kept(registry_store):
    s = registry_store
    worst, _, best = s.by_test_auc
    _promote(s, version=best)
    gap = s.test_auc[best] - s.test_auc[worst]
    d = _promote(s, version=worst, min_delta=gap + 0.01)
    assert d.outcome == "promoted" and d.comparison["diff"] == pytest.approx(-gap, abs=1e-9)
    assert _aliases(s) == {"champion": worst, "previous-champion": best}
    old = _client(s.uri).get_model_version(MODEL, best)
    assert old.tags["replaced_by"] == worst and old.tags["replaced_at"] == d.promoted_at
    assert old.description.startswith(f"> Replaced as `champion` by version {worst}")


def test_dry_run_changes_nothing(registry_store, capsys):
    from pipeline.cli import main

    s = registry_store
    worst, _, best = s.by_test_auc
    _promote(s, version=worst)
    before = snapshot(s.uri)
    assert main(["promote", "--dry-run", "--version", best, "--tracking-uri", s.uri]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN, nothing changed: would be PROMOTED" in out
    assert snapshot(s.uri) == before


def test_already_champion_is_unchanged(registry_store):
    s = registry_store
    first = _promote(s)
    before = snapshot(s.uri)
    again = _promote(s)
    assert again.outcome == "unchanged" and again.candidate.version == first.candidate.version
    assert snapshot(s.uri) == before


def test_no_registered_versions(bare_registry, capsys):
    from pipeline.cli import main

    uri = bare_registry.uri
    assert main(["promote", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow may log before it)
    assert err.startswith("pneumo promote: error: no registered model 'pneumonia-cnn'")
    assert main(["promote", "--model", bare_registry.model, "--tracking-uri", uri]) == 2
    assert "has no registered versions" in capsys.readouterr().err


def test_missing_data_and_mismatched_datasets_are_refused(registry_store, tmp_path):
    from pipeline.registry import RegistryError

    s = registry_store
    worst, mid, best = s.by_test_auc
    with pytest.raises(RegistryError, match=r"nowhere/manifest.json not found: run `pneumo convert` first.*pass --data with the converted dataset"):
        _promote(s, data_dir=tmp_path / "nowhere")
    # A dataset with another digest: the candidates were not trained on it.
    other = tmp_path / "other"
    shutil.copytree(s.data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["digest"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"was trained on dataset .* but .*other is dataset ffffffffffff"):
        _promote(s, data_dir=other)
    # A champion trained on another dataset cannot be compared on this test split.
    _promote(s, version=worst)
    _client(s.uri).set_model_version_tag(MODEL, worst, "dataset_digest", "0" * 64)
    before = snapshot(s.uri)
    with pytest.raises(RegistryError, match=rf"champion pneumonia-cnn version {worst} was trained on dataset "
                                            r"000000000000.*refusing"):
        _promote(s, version=best)
    assert snapshot(s.uri) == before


@pytest.mark.parametrize("slow_is_better", [False, True], ids=["slow-worse", "slow-better"])
def test_racing_promotions_end_with_the_better_model(registry_store, slow_is_better):
    """Champion W; a slow promotion evaluates against W, and a fast one lands meanwhile. The slow one must
    re-read the champion under the lock and gate again against the new one: the better model ends as champion
    and `previous-champion` is the one it really replaced (no lost update)."""
    from pipeline.registry import promote

    s = registry_store
    worst, mid, best = s.by_test_auc
    _promote(s, version=worst)
    slow_v, fast_v = (best, mid) if slow_is_better else (mid, best)
    evaluated, landed = threading.Event(), threading.Event()
    seen: list[str | None] = []

    def hold(decision):  # between the evaluation and the locked commit: where a slow promotion is slow
        seen.append(decision.champion)
        evaluated.set()
        landed.wait(120)

    result: dict = {}

    def slow():
        try:
            result["slow"] = promote(MODEL, version=slow_v, tracking_uri=s.uri, n_boot=N_BOOT, before_commit=hold)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            result["error"] = e

    t = threading.Thread(target=slow)
    t.start()
    assert evaluated.wait(120)
    fast = _promote(s, version=fast_v)
    landed.set()
    t.join(180)
    assert "error" not in result, result.get("error")
    slow_d = result["slow"]
    assert fast.outcome == "promoted" and fast.champion == worst
    assert seen == [worst, fast_v]  # gated twice: against W, then against the champion that landed
    assert slow_d.attempts == 2 and slow_d.champion == fast_v
    if slow_is_better:
        assert slow_d.outcome == "promoted"
        assert _aliases(s) == {"champion": best, "previous-champion": mid}
    else:
        assert slow_d.outcome == "rejected"
        assert _aliases(s) == {"champion": best, "previous-champion": worst}
    c = _client(s.uri)
    assert c.get_model_version(MODEL, _aliases(s)["previous-champion"]).tags["replaced_by"] == best


@pytest.fixture(scope="session")
def bare_store(tmp_path_factory) -> str:
    """One store without versions for the lock and no-version tests (a fresh SQLite store costs ~3 s)."""
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('bare')}/mlruns/mlflow.db"
    tracking.setup(uri)
    return uri


@pytest.fixture()
def bare_registry(bare_store, request):
    """A registered model of its own (no versions) in the bare store: all the lock needs."""
    from types import SimpleNamespace

    name = "lock-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name)
    _client(bare_store).create_registered_model(name)
    return SimpleNamespace(uri=bare_store, model=name)


@pytest.mark.parametrize("kind", ["file", "tag"])
def test_promotion_lock_excludes_concurrent_holders(bare_registry, kind):
    from pipeline.registry import promotion_lock

    s = bare_registry
    spans = []

    errors = []

    def hold():
        try:
            with promotion_lock(s.uri, s.model, kind=kind, poll=0.05, settle=0.3, timeout=60):
                t0 = time.monotonic()
                time.sleep(0.4)
                spans.append((t0, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    spans.sort()
    assert not errors and len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    if kind == "tag":  # the lease is gone once released
        assert "promotion_lock" not in (_client(s.uri).get_registered_model(s.model).tags or {})


def test_promotion_lock_times_out_with_a_reason(bare_registry):
    from pipeline.registry import RegistryError, promotion_lock

    s = bare_registry
    with promotion_lock(s.uri, s.model):
        errors = []

        def other():
            try:
                with promotion_lock(s.uri, s.model, timeout=0.3, poll=0.05):
                    pass
            except RegistryError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert errors and "promotion lock held by another promotion" in errors[0]


def test_promotion_lock_on_postgresql():
    """The database advisory lock, against the machine's PostgreSQL when there is one."""
    import psycopg  # psycopg 3 only: the lock must not need psycopg2

    url = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({e})")
    from pipeline.registry import promotion_lock

    spans = []

    errors = []

    def hold():
        try:
            with promotion_lock(url, "pg-lock-test", poll=0.05, timeout=30):
                t0 = time.monotonic()
                time.sleep(0.3)
                spans.append((t0, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spans.sort()
    assert not errors and len(spans) == 2 and spans[0][1] <= spans[1][0]
