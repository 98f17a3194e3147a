"""Scale-out: a study shared by several workers on PostgreSQL, logging to an MLflow tracking server.

Two launches of the real command (`python -m pipeline.cli tune`), sized for 2 cores:
1. load + crash: 3 workers x 6 trials of the smoke config, one worker SIGKILLed mid-trial; the study still reaches
   6 finished trials, no number twice, one parent run, every trial's run closed (the killed one FAILED by the
   sweeper), registered versions = COMPLETE trials, no lock/deadlock errors or tracebacks in the logs;
2. server restart: 2 workers x 3 trials while the MLflow server is stopped and started again (same port, same
   PostgreSQL backend); the workers' HTTP retries ride out the outage and nothing is lost.
Each test creates its own PostgreSQL databases (unique names) and drops them afterwards; the MLflow server runs
on a free loopback port in its own process group (`pipeline.ui.MlflowServer`, `--workers 1`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, no_postgres, wait_for

pytestmark = pytest.mark.slow

SMOKE = REPO / "experiments" / "smoke.toml"
MODEL = "pneumonia-cnn"
# Where the test databases live; CI and this machine run PostgreSQL here with trust auth.
PG_SERVER = os.environ.get("PNEUMO_TEST_POSTGRES", "postgresql://127.0.0.1:5432")
# What must never appear in a worker's or the server's log: lock waits, deadlocks, SQLite-style lock errors,
# unhandled exceptions.
BAD_LOG = re.compile(r"\b(dead)?lock(ed|s)?\b|LockNotAvailable|database is locked|Traceback", re.IGNORECASE)


# --- PostgreSQL: one database per use, dropped afterwards --------------------------------------------------
def _admin_connection():
    """An autocommit connection to the server's `postgres` database, as the first user that is let in."""
    import psycopg  # psycopg 3, the project's one PostgreSQL driver
    from sqlalchemy.engine import make_url

    url = make_url(PG_SERVER)
    errors = []
    for user in [url.username] if url.username else ["postgres", "root"]:
        try:
            conn = psycopg.connect(host=url.host or "127.0.0.1", port=url.port or 5432, user=user,
                                    password=url.password, dbname="postgres", connect_timeout=5)
        except psycopg.OperationalError as e:
            errors.append(f"{user}: {' '.join(str(e).split())}")
            continue
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        return conn, url.set(username=user, database=None)
    no_postgres(f"PostgreSQL not reachable at {PG_SERVER} (set PNEUMO_TEST_POSTGRES): {'; '.join(errors)}")


@pytest.fixture()
def postgres():
    """`make(tag)` -> the URL (`postgresql://user@host:port/name`, as a user types it) of a new empty database;
    every database made is dropped at the end."""
    conn, server = _admin_connection()
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"pneumo_test_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    yield make
    while _STORAGES:  # the test's own connections first
        _STORAGES.popitem()[1].engine.dispose()
    with conn.cursor() as cur:
        for name in made:  # FORCE: a worker killed mid-query may have left a session behind
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


# --- helpers -----------------------------------------------------------------------------------------------
def _launch(tmp: Path, study: str, storage: str, tracking_uri: str, data: Path, trials: int, workers: int,
            log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(SMOKE), "--study", study,
           "--data", str(data), "--trials", str(trials), "--workers", str(workers), "--storage", storage,
           "--tracking-uri", tracking_uri, "--set", f"train.checkpoint_dir={tmp}/ckpt",
           "--set", "tune.heartbeat_interval=2"]
    # The test's own MLflow settings must not leak into the workers: they get what `pneumo tune` sets up.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    # Output to a file, not a pipe: a full pipe would block the workers.
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def _queued(log: Path) -> bool:
    return "trials queued" in log.read_text()


_STORAGES: dict = {}


def _storage(url: str):
    """One Optuna storage (one small connection pool) per database for the whole test: polling with a new
    storage every time would open a new pool each time."""
    import optuna

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    return _STORAGES[url]


def _running_trial(study_name: str, storage: str):
    """A RUNNING trial whose MLflow run exists (its worker is training), else None."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    live = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
    return live[0] if live else None


def _runs(client, study: str):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _bad_lines(text: str) -> list[str]:
    # An artifact upload's access-log line names the file, and every logged model carries the project's source
    # (code/pipeline/promote/lock.py): a path, not a lock message.
    return [line for line in text.splitlines() if BAD_LOG.search(line) and "/mlflow-artifacts/artifacts/" not in line]


def _server_bad_lines(server_log: str) -> list[str]:
    """`_bad_lines` of the tracking server's log, less the records of requests whose client went away: a worker
    SIGKILLed in the middle of an artifact upload leaves uvicorn logging that request's ClientDisconnect
    traceback (seen in a `make test` run), the kill's own trace and not a server fault. The log's records are
    its timestamped lines, each with the lines that follow it."""
    records = re.split(r"(?m)^(?=\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )", server_log)
    return _bad_lines("".join(r for r in records if "starlette.requests.ClientDisconnect" not in r))


def _check_study_and_runs(study_name: str, storage: str, server_url: str, target: int) -> dict:
    """The properties every scale-out launch must end with; -> the study and runs for further checks."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"a trial number twice: {sorted(numbers)}"
    assert sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == target
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    client = MlflowClient(server_url, server_url)
    runs = _runs(client, study_name)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one parent for all workers
    nested = [r for r in runs if "trial_number" in r.data.tags]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in nested)
    assert len(nested) == len({r.data.tags["trial_number"] for r in nested}), "two runs for one trial"
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left open, the killed trial included
    by_trial = {int(r.data.tags["trial_number"]): r for r in nested}
    for t in finished:  # each finished trial is one FINISHED run with every epoch's metrics
        run = by_trial[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.status == "FINISHED" and run.data.tags["state"] == t.state.name
        epochs = len(client.get_metric_history(run.info.run_id, "val_auc"))
        assert epochs == len(t.intermediate_values) >= 1
    versions = client.search_model_versions(f"name='{MODEL}'")
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(int(v.tags["trial_number"]) for v in versions) == sorted(complete)
    return {"study": study, "runs": runs, "by_trial": by_trial, "client": client}


def _report(name: str, figures: dict) -> None:
    """Figures for docs/scale-out.md: printed (pytest -s) and appended to $PNEUMO_SCALE_OUT_REPORT if set."""
    line = f"{name}: " + json.dumps(figures, sort_keys=True)
    print(line)
    if os.environ.get("PNEUMO_SCALE_OUT_REPORT"):
        with open(os.environ["PNEUMO_SCALE_OUT_REPORT"], "a") as f:
            f.write(line + "\n")


# --- the tests ---------------------------------------------------------------------------------------------
def test_three_workers_share_a_postgres_study_and_survive_a_sigkill(synth_data, tmp_path, postgres):
    import optuna
    from optuna.trial import TrialState

    from pipeline.ui import MlflowServer

    storage, backend = postgres("optuna"), postgres("mlflow")
    log = tmp_path / "launch.log"
    with MlflowServer(backend, tmp_path / "artifacts", log_file=tmp_path / "server.log") as server:
        t0 = time.perf_counter()
        launcher = _launch(tmp_path, "load", storage, server.url, synth_data, trials=6, workers=3, log=log)
        try:
            # Touch the study only once the launcher has created it.
            wait_for(lambda: _queued(log), 120, "the launch", launcher, log)
            seen = wait_for(lambda: _running_trial("load", storage), 300, "a running trial", launcher, log)
            worker = seen.user_attrs["worker"]
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)  # mid-trial: its run exists, training has started
            # The victim is the trial that worker was running when it died, read after the kill (a fixed sleep
            # before it once let the worker finish `seen` and start another, which then was the one to fail).
            running = optuna.load_study(study_name="load", storage=_storage(storage)).get_trials(
                states=(TrialState.RUNNING,))
            [victim] = [t for t in running if t.user_attrs.get("worker") == worker]
            launcher.wait(timeout=420)
        finally:
            if launcher.poll() is None:
                launcher.kill()
        wall = time.perf_counter() - t0
        out = log.read_text()
        assert launcher.returncode == 1, out  # a crashed worker fails the launch, even though its trial was retried
        got = _check_study_and_runs("load", storage, server.url, target=6)
        server_log = server.log_path.read_text(errors="replace")

    study = got["study"]
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [victim.number], out  # the killed trial, and no other
    retries = [t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
               if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, "another worker retried the killed trial"
    killed = got["by_trial"][victim.number]
    assert killed.info.status == "FAILED" and killed.data.tags["state"] == "FAIL"  # closed by the sweeper
    assert f"trial {victim.number} went stale" in out
    assert "1 worker(s) crashed (exit codes -9)" in out  # the killed one; the others ended cleanly
    assert not _bad_lines(out), _bad_lines(out)
    assert not _server_bad_lines(server_log), _server_bad_lines(server_log)
    _report("load", {"workers": 3, "finished_trials": 6, "trials_run": len(study.trials), "killed": 1,
                     "wall_s": round(wall, 1), "trials_per_hour": round(6 * 3600 / wall, 1)})


def test_workers_ride_out_an_mlflow_server_restart(synth_data, tmp_path, postgres):
    from pipeline.ui import MlflowServer

    storage, backend = postgres("optuna"), postgres("mlflow")
    log = tmp_path / "launch.log"
    server = MlflowServer(backend, tmp_path / "artifacts", log_file=tmp_path / "server-1.log").start()
    port, url = server.port, server.url
    try:
        launcher = _launch(tmp_path, "restart", storage, url, synth_data, trials=3, workers=2, log=log)
        try:
            wait_for(lambda: _queued(log), 120, "the launch", launcher, log)
            wait_for(lambda: _running_trial("restart", storage), 300, "a running trial", launcher, log)
            time.sleep(1.0)  # the trial is logging to its run
            stopped_at = dt.datetime.now()
            server.stop()  # SIGTERM to the server's group: every request from now on is refused
            time.sleep(5.0)
            server = MlflowServer(backend, tmp_path / "artifacts", port=port, log_file=tmp_path / "server-2.log")
            server.start()  # same port, same backend database: ~7 s until /health answers again
            back_at = dt.datetime.now()
            launcher.wait(timeout=420)
        finally:
            if launcher.poll() is None:
                launcher.kill()
        out = log.read_text()
        assert launcher.returncode == 0, out
        got = _check_study_and_runs("restart", storage, url, target=3)
        study, client = got["study"], got["client"]
        from optuna.trial import TrialState

        assert not study.get_trials(states=(TrialState.FAIL,)), out  # nothing lost: no trial failed or retried
        assert len(study.trials) == 3
        # A trial was in flight through the outage and still finished with all of its metrics, plots and model ...
        spanning = [t for t in study.trials if t.datetime_start < stopped_at and t.datetime_complete > back_at]
        assert spanning, [(t.number, t.datetime_start, t.datetime_complete) for t in study.trials]
        # ... because the outage really hit the workers: their requests were refused and retried (logged).
        assert re.search(r"MLflow client: Retrying \(.*(NewConnectionError|Connection refused)", out), out
        for t in spanning:
            run = got["by_trial"][t.number]
            assert "plots/history.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert not _bad_lines(out), _bad_lines(out)
    finally:
        server.stop()
    outage = (back_at - stopped_at).total_seconds()
    _report("restart", {"workers": 2, "finished_trials": 3, "outage_s": round(outage, 1), "failed_trials": 0})


# --- the small pieces the launches rely on -----------------------------------------------------------------
def test_server_uris_get_retry_settings_that_the_environment_can_override(monkeypatch):
    import mlflow
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    from pipeline.artifact import tracking

    for key in tracking.HTTP_RETRY_DEFAULTS:  # set, then delete: monkeypatch removes what setup() adds
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        tracking.setup("http://127.0.0.1:1")
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "10"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "3"  # the user's setting wins
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 10  # what MLflow's REST client reads at every request
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_postgres_urls_work_as_written_and_logs_hide_passwords():
    from sqlalchemy.engine import make_url

    from pipeline.stores import masked as shown_url
    from pipeline.stores import resolve_optuna_storage

    url = resolve_optuna_storage("postgresql://pneumo@db:5432/optuna")  # psycopg 3, the project's one driver
    assert url == "postgresql+psycopg://pneumo@db:5432/optuna"
    make_url(url).get_dialect().import_dbapi()  # the driver SQLAlchemy will use is installed
    assert shown_url("postgresql+psycopg2://pneumo:s3cret@db:5432/optuna") == \
        "postgresql+psycopg2://pneumo:***@db:5432/optuna"
    assert "s3cret" not in shown_url("http://user:s3cret@mlflow:5000")
    assert shown_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    # A password with '/', '?', '#' or '@' in it, and one given as a query parameter, are hidden too.
    for url, shown in [("postgresql://u:pa/ss@db:5432/x", "postgresql://u:***@db:5432/x"),
                       ("postgresql://u:p?w#d@db/x", "postgresql://u:***@db/x"),
                       ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),
                       ("postgresql://db/x?user=u&password=s3cret", "postgresql://db/x?user=u&password=***"),
                       ("postgresql://db/x?sslmode=require", "postgresql://db/x?sslmode=require")]:
        assert shown_url(url) == shown, url


def _terminate_backends(database: str) -> int:
    """pg_terminate_backend on every session of one database: the same forced reconnect as a server restart,
    without touching the other databases on this shared server. -> how many sessions were cut."""
    conn, _ = _admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_a_terminated_session_counts_as_dropped_and_a_refused_one_does_not(postgres):
    """The classifier behind the storage constructor's retry, on the errors PostgreSQL really gives: a session
    the server terminates (as a restart does) is a dropped connection; a port nobody listens on is not."""
    import sqlalchemy
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    from pipeline.stores import postgres_driver
    from pipeline.study.tune import dropped_connection

    url = postgres("drop")
    engine = sqlalchemy.create_engine(postgres_driver(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            _terminate_backends(make_url(url).database)
            with pytest.raises(sqlalchemy.exc.OperationalError) as cut:
                conn.execute(sqlalchemy.text("SELECT 1"))
        assert dropped_connection(cut.value), cut.value
    finally:
        engine.dispose()
    refused = sqlalchemy.create_engine(postgres_driver(make_url(url).set(port=1).render_as_string(False)))
    with pytest.raises(sqlalchemy.exc.OperationalError) as never:
        refused.connect()
    assert not dropped_connection(never.value), never.value


def test_a_study_rides_out_postgres_dropping_every_connection(synth_data, tmp_path, postgres):
    """Every connection of the study's database is killed twice mid-study (as a PostgreSQL restart does):
    the workers reconnect, the study completes, no trial is lost, failed or run twice."""
    from optuna.trial import TrialState
    from sqlalchemy.engine import make_url

    storage = postgres("optuna")
    database = make_url(storage).database
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    log = tmp_path / "launch.log"
    launcher = _launch(tmp_path, "pgcut", storage, tracking, synth_data, trials=4, workers=2, log=log)
    cuts = []
    try:
        wait_for(lambda: _queued(log), 180, "the launch", launcher, log)
        first = wait_for(lambda: _running_trial("pgcut", storage), 300, "a running trial", launcher, log)
        cuts.append(_terminate_backends(database))  # mid-trial: heartbeats and the trial loop are connected
        _STORAGES.pop(storage).engine.dispose()  # the test's own pool was cut too

        def finished_one():
            study = _storage(storage)
            return any(t.state == TrialState.COMPLETE for t in study.get_all_trials(
                study.get_study_id_from_name("pgcut"), deepcopy=False))
        wait_for(finished_one, 300, "a finished trial", launcher, log)
        cuts.append(_terminate_backends(database))  # again, between or inside later trials
        _STORAGES.pop(storage).engine.dispose()
        launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
    out = log.read_text()
    assert launcher.returncode == 0, out
    assert cuts[0] >= 2, cuts  # the kill really hit live sessions (workers' loops and heartbeats)
    got = _check_study_and_runs("pgcut", storage, tracking, target=4)
    study = got["study"]
    assert not study.get_trials(states=(TrialState.FAIL,)), out  # nothing lost to the outage
    assert len(study.trials) == 4  # and nothing run twice
    assert first.number in {t.number for t in study.trials}
    _report("pg_connections_cut", {"cuts": cuts, "trials": len(study.trials)})
