"""Servers that leak nothing: the store password never on a child's command line nor in an error; MLflow's
basic-auth app (401 without credentials, users and permissions); `pneumo ui --host` warns off loopback."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import server_group, stop_launcher, wait_for
from tests.test_scale_out import _admin_connection, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow
SECRET = "s3cret-Pw-4242"  # trust auth on the test server ignores it; it must still never be shown


def _group_cmdlines(pgid: int) -> dict[int, str]:
    """pid -> command line of every process in a process group (read from /proc as any local user can)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp is the 5th field; the 3rd after the ")"
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _status(url: str, auth: tuple[str, str] | None = None, method: str = "GET", body: dict | None = None) -> int:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_store_password_is_never_on_a_command_line_nor_in_an_error(postgres, tmp_path):  # noqa: F811
    from sqlalchemy.engine import make_url

    from pipeline.ui import MlflowServer, UiError, group_alive

    url = make_url(postgres("uipw")).set(password=SECRET).render_as_string(hide_password=False)
    assert SECRET in url
    with MlflowServer(url, tmp_path / "artifacts", log_file=tmp_path / "server.log") as server:
        pgid = server.proc.pid
        cmdlines = _group_cmdlines(pgid)
        assert any("mlflow" in c and "server" in c for c in cmdlines.values()), cmdlines
        assert len(cmdlines) >= 2, cmdlines  # the CLI and its web server worker(s)
        assert not [c for c in cmdlines.values() if SECRET in c], cmdlines
        # ... and the server really uses that store: an experiment made over HTTP lands in that database.
        api = server.url + "/api/2.0/mlflow"
        assert _status(f"{api}/experiments/create", method="POST", body={"name": "pw-check"}) == 200
    assert not group_alive(pgid)
    import psycopg  # the project's one PostgreSQL driver

    db = make_url(url)
    with psycopg.connect(host=db.host, port=db.port, user=db.username, dbname=db.database) as c:
        row = c.execute("SELECT name FROM experiments WHERE name = 'pw-check'").fetchone()
    assert row == ("pw-check",)
    assert SECRET not in (tmp_path / "server.log").read_text(errors="replace")

    # A store that cannot be opened: the error quotes the log, never the password.
    # (an unknown driver fails at once; a database that does not answer would cost MLflow's ~100 s of retries)
    bad = make_url(url).set(drivername="postgresql+nosuchdriver").render_as_string(hide_password=False)
    assert SECRET in bad
    with pytest.raises(UiError) as err:
        MlflowServer(bad, tmp_path / "a2", log_file=tmp_path / "bad.log", startup_timeout=240).start()
    assert "exited with code" in str(err.value) and SECRET not in str(err.value)


def test_basic_auth_server_rejects_anonymous_and_enforces_permissions(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from pipeline.ui import MlflowServer, group_alive

    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-Pw-123456")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    with MlflowServer(store, tmp_path / "mlruns" / "artifacts", auth=True,
                      log_file=tmp_path / "server.log") as server:
        pgid = server.proc.pid
        api = server.url + "/api/2.0/mlflow/experiments/search?max_results=10"
        assert _status(server.url + "/health") == 200  # health stays open for probes
        assert _status(api) == 401  # anonymous
        assert _status(api, ("admin", "wrong-password")) == 401
        assert _status(api, ("admin", "admin-Pw-123456")) == 200
        # Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-Pw-123456")
        admin = MlflowClient(server.url, server.url)
        exp = admin.create_experiment("guarded")
        get_app_client("basic-auth", tracking_uri=server.url).create_user("alice", "alice-Pw-123456")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-Pw-123456")
        alice = MlflowClient(server.url, server.url)
        assert alice.get_experiment(exp).name == "guarded"  # default permission READ
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            alice.delete_experiment(exp)  # ... but not write
        assert (tmp_path / "mlruns" / "basic_auth.db").exists()  # the user store lives beside the runs
    assert not group_alive(pgid)


def test_auth_without_an_admin_password_is_one_line(tmp_path, monkeypatch):
    from pipeline.ui import MlflowServer, UiError

    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(UiError, match="set MLFLOW_AUTH_ADMIN_PASSWORD"):
        MlflowServer(f"sqlite:///{tmp_path}/m.db", tmp_path / "a", auth=True).start()


def test_remote_warning_says_how_to_add_authentication():
    from pipeline.ui import remote_warning

    assert remote_warning("127.0.0.1", False) == "" and remote_warning("localhost", False) == ""
    plain = remote_warning("0.0.0.0", False)
    assert "WITHOUT authentication" in plain and "--auth" in plain and "MLFLOW_AUTH_ADMIN_PASSWORD" in plain
    assert "TLS" in remote_warning("10.1.2.3", True) and "WITHOUT" not in remote_warning("10.1.2.3", True)


def test_pneumo_ui_on_all_addresses_with_auth(tmp_path):
    # A store with one run, as `pneumo train` leaves it.
    import mlflow

    from pipeline.ui import STOP_GRACE_S, free_port, group_alive

    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        mlflow.log_param("x", 1)
    mlflow.set_tracking_uri(None)
    port = free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-Pw-123456"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--host", "0.0.0.0", "--auth", "--port",
                                 str(port), "--tracking-uri", store], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        wait_for(lambda: "MLflow UI:" in log.read_text(), 300, "the UI", proc, log)
        text = log.read_text()
        assert "WARNING: serving on 0.0.0.0" in text and "TLS" in text
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _status(api) == 401
        assert _status(api, ("admin", "admin-Pw-123456")) == 200
        server_pgid = server_group(port)
        assert server_pgid is not None
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=STOP_GRACE_S + 60)
        stop_s = time.monotonic() - start
    finally:
        stop_launcher(proc, port)
    assert proc.returncode == 0 and "stopped mlflow server" in log.read_text()
    wait_for(lambda: not group_alive(server_pgid), 30, "the server's group to go")
    print(f"pneumo ui stopped in {stop_s:.1f} s")
