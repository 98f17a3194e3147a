"""The Optuna storage retries a call whose database connection was lost (a PostgreSQL restart), and only such
a call. The end-to-end case (every connection of a live study killed twice) is in tests/test_scale_out.py. The
MLflow store's one race between workers (the same new dataset logged twice at once) is repeated, and only it."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy.exc

import pipeline.study.tune as tune


def _lost() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


@pytest.fixture()
def storage(tmp_path, monkeypatch, smoke_config):
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)  # the backoff, not the behaviour, is skipped
    st = tune.make_storage(f"sqlite:///{tmp_path}/o.db", smoke_config())
    optuna.create_study(study_name="s", storage=st)
    return st


def test_a_lost_connection_is_retried(storage, monkeypatch, capsys):
    real = optuna.storages.RDBStorage.get_study_id_from_name
    calls = []

    def flaky(self, name):
        calls.append(name)
        if len(calls) <= 2:
            raise _lost() if len(calls) == 1 else optuna.exceptions.StorageInternalError("commit") from _lost()
        return real(self, name)

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_study_id_from_name", flaky)
    assert storage.get_study_id_from_name("s") == real(storage, "s")
    assert len(calls) == 3
    assert capsys.readouterr().err.count("connection lost in get_study_id_from_name") == 2


def _pending_rollback(after: BaseException | None) -> optuna.exceptions.StorageInternalError:
    """What Optuna's `_get_trials` raises when its fallback query reuses a session a failure left invalid."""
    pending = sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
    pending.__context__ = after  # raised while `after` was being handled, as Python chains it
    error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    error.__cause__ = pending  # Optuna's `raise StorageInternalError(...) from e`
    return error


def test_an_invalid_transaction_left_by_a_lost_connection_is_retried(storage, monkeypatch, capsys):
    """A worker crashed in a make test run: PostgreSQL's backends were terminated during `_get_trials`, Optuna
    caught the OperationalError and fell back to a second query in the same session, which raised SQLAlchemy's
    PendingRollbackError. That is the lost connection's doing: retried on a fresh session. A PendingRollbackError
    after any other error is not."""
    real = optuna.storages.RDBStorage._get_trials
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise _pending_rollback(_lost())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", flaky)
    study = optuna.load_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.5})
    assert len(study.get_trials(deepcopy=False)) == 1
    assert len(calls) == 2 and "connection lost in _get_trials (StorageInternalError)" in capsys.readouterr().err
    assert not tune._transient(_pending_rollback(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("dup"))))
    assert not tune._transient(_pending_rollback(None))


def test_other_errors_and_a_lasting_outage_are_raised(storage, monkeypatch):
    calls = []

    def broken(self, name):
        calls.append(name)
        raise KeyError(name)

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_study_id_from_name", broken)
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("s")
    assert len(calls) == 1  # a bad request is not retried

    def down(self, name):
        calls.append(name)
        raise _lost()

    calls.clear()
    monkeypatch.setattr(tune, "STORAGE_RETRIES", 3)
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_study_id_from_name", down)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        storage.get_study_id_from_name("s")
    assert len(calls) == 4


def test_every_storage_method_is_retried_or_named_as_not():
    """The retried set is read off Optuna: a method an upgrade adds is neither retried nor excluded until someone
    decides, and this fails; an exclusion Optuna no longer has fails too (it would hide a rename)."""
    methods = tune.storage_methods()
    retried = set(tune.retried_calls())
    assert methods - retried - tune.NOT_RETRIED == set()
    assert tune.NOT_RETRIED - methods == set()
    # the private calls _CachedStorage makes on its backend (the ones a hand list missed) are retried
    assert {"_set_trial_param", "_create_new_trial", "_get_trials"} <= tune.cached_backend_calls() - tune.NOT_RETRIED
    for name in retried:
        assert getattr(tune.ResilientRDBStorage, name) is not getattr(optuna.storages.RDBStorage, name), name


def test_a_private_call_made_through_optunas_cache_is_retried(storage, monkeypatch, capsys):
    """study.ask + suggest go through _CachedStorage, which calls RDBStorage._set_trial_param directly."""
    real = optuna.storages.RDBStorage._set_trial_param
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("commit") from _lost()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_set_trial_param", flaky)
    study = optuna.load_study(study_name="s", storage=storage)
    trial = study.ask()
    assert 0.0 <= trial.suggest_float("x", 0.0, 1.0) <= 1.0
    assert len(calls) == 2 and "connection lost in _set_trial_param" in capsys.readouterr().err
    assert study.get_trials()[0].params.keys() == {"x"}


def test_a_retried_call_inside_a_retried_call_is_not_retried_twice(storage, monkeypatch):
    """create_new_trial calls _create_new_trial: both are wrapped, but the attempts must not multiply."""
    calls = []

    def down(self, *args, **kwargs):
        calls.append(args)
        raise _lost()

    monkeypatch.setattr(tune, "STORAGE_RETRIES", 2)
    monkeypatch.setattr(optuna.storages.RDBStorage, "_create_new_trial", down)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        storage.create_new_trial(storage.get_study_id_from_name("s"))
    assert len(calls) == 3  # 1 + STORAGE_RETRIES, not (1 + STORAGE_RETRIES) ** 2


def test_opening_the_storage_retries_a_dropped_connection_only(tmp_path, monkeypatch, capsys, smoke_config):
    """The constructor checks the schema in its own transactions: a worker starting while the server drops its
    connections retries it; a connection never accepted (refused) fails at once, in one TuneError."""
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    real = optuna.storages.RDBStorage.__init__
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise _lost()
        real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "__init__", flaky)
    st = tune.make_storage(f"sqlite:///{tmp_path}/o.db", smoke_config())
    assert len(calls) == 2 and isinstance(st, tune.ResilientRDBStorage)
    assert "connection lost while opening sqlite:///" in capsys.readouterr().err

    # ... also when the drop happens inside a commit, which Optuna wraps in StorageInternalError
    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from _lost()
        real(self, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(optuna.storages.RDBStorage, "__init__", wrapped)
    st = tune.make_storage(f"sqlite:///{tmp_path}/o.db", smoke_config())
    assert len(calls) == 2 and isinstance(st, tune.ResilientRDBStorage)
    assert "connection lost while opening sqlite:///" in capsys.readouterr().err

    refused = sqlalchemy.exc.OperationalError(
        "connect", {}, Exception('connection failed: connection to server at "127.0.0.1", port 1 failed: '
                                 "Connection refused"))

    def never(self, *args, **kwargs):
        calls.append(1)
        raise refused

    calls.clear()
    monkeypatch.setattr(optuna.storages.RDBStorage, "__init__", never)
    with pytest.raises(tune.TuneError, match="does not answer: connection failed"):
        tune.make_storage(f"sqlite:///{tmp_path}/o.db", smoke_config())
    assert len(calls) == 1


@pytest.mark.parametrize("logged_by", ["log_dataset", "log_metrics_racing"])
def test_a_dataset_another_worker_created_mid_call_is_linked_not_failed(tmp_path, logged_by):
    """The MLflow side of a two-worker study (a failed first trial in the scale-out test): MLflow's SQL store
    looks a run's dataset up, then inserts it. Here the other worker inserts the same dataset in between, for
    real, on the same SQLite store; the logged input must still land, on the one dataset row there is. Both
    ways a run links a dataset: as its input (training), and inside `log_metrics(dataset=...)` (validation's
    metrics, linked to the validation split: the same race failed a trial in a later CI run)."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _get_store
    from sqlalchemy import event

    from pipeline.artifact import tag_keys, tracking

    client = tracking.setup(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = tracking.ensure_experiment("race")
    manifest = {"digest": "d" * 64}
    entity = tracking.dataset_entity(manifest, tmp_path / "data")
    other = client.create_run(experiment).info.run_id
    engine = _get_store().engine
    cut_in = []

    def other_worker_first(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not cut_in:
            cut_in.append(statement)  # once: the other worker's own insert comes through here too
            client.log_inputs(other, datasets=[mlflow.entities.DatasetInput(entity._to_mlflow_entity())])

    event.listen(engine, "before_cursor_execute", other_worker_first)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            if logged_by == "log_dataset":
                tracking.log_dataset(manifest, tmp_path / "data")
            else:
                tracking.log_metrics_racing({"final_val_auc": 0.9}, dataset=entity)
    finally:
        event.remove(engine, "before_cursor_execute", other_worker_first)
    assert cut_in, "the other worker never cut in: the race was not staged"
    mine, theirs = (client.get_run(r).inputs.dataset_inputs for r in (run.info.run_id, other))
    assert [d.dataset.digest for d in mine] == [d.dataset.digest for d in theirs] == ["d" * 36]
    if logged_by == "log_dataset":
        assert client.get_run(run.info.run_id).data.tags[tag_keys.DATASET_DIGEST] == "d" * 64
    else:  # logged once, against the dataset: the lost call had logged no metric
        assert [m.value for m in client.get_metric_history(run.info.run_id, "final_val_auc")] == [0.9]


def test_other_mlflow_errors_are_raised_at_once():
    from mlflow.exceptions import MlflowException

    from pipeline.artifact import tracking

    calls = []

    def missing_run():
        calls.append(1)
        raise MlflowException("Run with id=abc not found", error_code="RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(MlflowException, match="not found"):
        tracking.log_inputs_racing(missing_run)
    assert calls == [1]
