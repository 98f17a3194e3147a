"""The Optuna storage retries a call whose database connection was lost (a PostgreSQL restart), and only such
a call. The end-to-end case (every connection of a live study killed twice) is in tests/test_scale_out.py."""

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
