"""The MLflow server over the project's stores: REST answers with the study's runs, the registered model and
its champion alias; plots are served; the whole process group stops. Plus `pneumo ui` and `pneumo dashboard`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest_plugins = ["fixtures_registry"]
MODEL, META_MODEL, STUDY = "pneumonia-cnn", "pneumonia-cnn-meta", "regstudy"  # as in fixtures_registry
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_server_answers_with_runs_model_and_champion(registry_store):
    from mlflow import MlflowClient

    from pipeline.ui import MlflowServer, group_alive

    s = registry_store
    champion = s.versions[1]
    MlflowClient(s.uri, s.uri).set_registered_model_alias(MODEL, "champion", champion)
    with MlflowServer(s.uri, s.artifacts) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port != 5000
        pgid = server.proc.pid
        api = server.url + "/api/2.0/mlflow"
        exp = _get(f"{api}/experiments/get-by-name?experiment_name={STUDY}")["experiment"]
        runs = _post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert names == {f"study:{STUDY}", "trial-000", "trial-001", "trial-002"}
        trial = next(r for r in runs if r["info"]["run_name"] == "trial-001")
        tags = {t["key"]: t["value"] for t in trial["data"]["tags"]}
        assert tags["study"] == STUDY and "val AUC" in tags["mlflow.note.content"]  # a run description
        model = _get(f"{api}/registered-models/get?name={MODEL}")["registered_model"]
        assert {"alias": "champion", "version": champion} in model["aliases"]
        by_alias = _get(f"{api}/registered-models/alias?name={MODEL}&alias=champion")["model_version"]
        assert by_alias["version"] == champion
        # The Python client over HTTP sees the same, and the UI can fetch a run's plot.
        assert MlflowClient(server.url, server.url).get_model_version_by_alias(MODEL, "champion").version == champion
        query = urllib.parse.urlencode({"path": "plots/history.png", "run_uuid": trial["info"]["run_id"]})
        with urllib.request.urlopen(f"{server.url}/get-artifact?{query}", timeout=30) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    assert server.proc is None and not group_alive(pgid)  # the whole group, workers included, is gone


def test_pneumo_ui_serves_until_interrupted(registry_store, tmp_path):
    """Bounded on a loaded 2-core machine: start waits on readiness (STARTUP_TIMEOUT_S), the stop is SIGTERM to
    the server's group then SIGKILL after STOP_GRACE_S (it once took over 60 s with the machine busy).

    Started with SIGINT ignored, as a background job of a non-interactive shell inherits it (nohup, `make test &`,
    some CI runners): Python then installs no KeyboardInterrupt handler of its own, and before pipeline/ui.py
    set one explicitly this test hung there while passing from a terminal."""
    from pipeline.ui import STARTUP_TIMEOUT_S, STOP_GRACE_S, free_port
    from tests.conftest import stop_launcher, wait_for

    s = registry_store
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "ui.log"
    with open(log, "w") as out:  # a file, not a pipe: reading it never blocks the test without a bound
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port), "--tracking-uri",
                                 s.uri], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: "MLflow UI:" in log.read_text(), STARTUP_TIMEOUT_S + 30, "the UI", proc, log)
        assert f"MLflow UI: http://127.0.0.1:{port}" in log.read_text()
        assert "WARNING" not in log.read_text()  # loopback: nothing to warn about
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
            assert r.status == 200
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: pneumo stops the server's own process group
        proc.wait(timeout=STOP_GRACE_S + 60)
        assert time.monotonic() - start < STOP_GRACE_S + 30
    finally:
        stop_launcher(proc, port)
    assert proc.returncode == 0 and "stopped mlflow server" in log.read_text()
    wait_for(lambda: not _listening(port), 30, "the port to close")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_a_stop_dropped_inside_a_finaliser_still_stops_the_server(tmp_path, capsys):
    """Python drops an exception raised inside `__del__` ("Exception ignored"): a SIGTERM that lands in one
    during the store reads before the URL line must still stop the server, not leave `pneumo ui` waiting on it
    (a supervisor's SIGKILL would then orphan the server's group)."""
    import threading

    from pipeline.ui import ManagedServer, _serve, group_alive

    class StaticServer(ManagedServer):
        name = "static server"

        def command(self):
            return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                    "--directory", str(tmp_path)]

    class StopInFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler's KeyboardInterrupt is raised here, and dropped

    server, groups = StaticServer(log_file=tmp_path / "server.log"), []

    def links():
        groups.append(server.proc.pid)
        StopInFinaliser()
        return ["  (links)"]

    # Without the fix the wait never ends: the watchdog then kills the server, and _serve reports its death.
    watchdog = threading.Timer(60, lambda: groups and os.killpg(groups[0], signal.SIGKILL))
    watchdog.start()
    try:
        _serve(server, "static", more=links)
    finally:
        watchdog.cancel()
    out = capsys.readouterr().out
    assert "static: http://127.0.0.1:" in out and out.rstrip().endswith("stopped static server")
    assert not group_alive(groups[0])


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ui_without_a_store_says_so(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db"]) == 2
    assert f"no MLflow store at {tmp_path}/none/mlflow.db" in capsys.readouterr().err


def test_dashboard_missing_extra_names_the_install(monkeypatch, capsys):
    from pipeline.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna_dashboard" else real(name, *a))
    assert main(["dashboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pneumo dashboard: error: optuna-dashboard is not installed: pip install 'pneumo[dashboard]'"


@pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None, reason="optional extra not installed")
def test_dashboard_serves_a_study(tmp_path):
    import optuna

    from pipeline.ui import DashboardServer, group_alive

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="dash", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with DashboardServer(storage) as server:
        pgid = server.proc.pid
        studies = _get(server.url + "/api/studies")
        assert any(st["study_name"] == "dash" for st in studies["study_summaries"])
        # The storage URL (a password, on a real server) is not on its command line, which any user can read.
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().decode()
        assert storage not in cmdline and "optuna.db" not in cmdline
    assert not group_alive(pgid)


def test_a_port_that_cannot_be_bound_says_why():
    """A busy port is "in use"; an address this host does not own is that, not a busy port."""
    import socket

    from pipeline.ui import UiError, _check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UiError, match=rf"^port {port} on 127.0.0.1 is in use: pass --port$"):
            _check_port(port, "127.0.0.1")
    with pytest.raises(UiError, match=r"^cannot serve on 192\.0\.2\.1:5000: .*assign requested address"):
        _check_port(5000, "192.0.2.1")  # TEST-NET-1 (RFC 5737): never an address of this host


def test_the_ui_points_at_the_training_runs_and_the_models(tmp_path):
    """`pneumo ui` prints each experiment's "Training runs" page and the registered models (MLflow's sidebar
    may open in its GenAI view: the note says how to switch)."""
    from mlflow import MlflowClient

    from pipeline.ui import GENAI_TOGGLE_NOTE, landing_lines

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, uri)
    study = client.create_experiment("kermany-s0")
    lines = landing_lines(uri, "http://127.0.0.1:5000")
    assert lines[0] == f"  training runs of 'kermany-s0': http://127.0.0.1:5000/#/experiments/{study}/runs"
    assert lines[-2] == "  registered models: http://127.0.0.1:5000/#/models"
    assert GENAI_TOGGLE_NOTE in lines[-1] and not any("'Default'" in line for line in lines)
