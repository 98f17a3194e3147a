"""Browser front ends as managed child processes: the MLflow UI/server and optuna-dashboard.

`MlflowServer(backend_uri, artifacts_dir)` is a context manager that starts `mlflow server` on a free loopback
port, waits until `/health` answers and, on exit, stops it. Two facts shape it (DESIGN.md):
- default settings start 15 processes (~2.5 GB); `--workers 1` and MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
  start one worker in ~7 s with ~0.5 GB;
- killing only the parent leaves `huey_consumer` children behind, so the server gets its own session
  (`start_new_session=True`: its own process group) and stop() signals the whole group.
The tests of the tracking server reuse it. Nothing here imports MLflow: the server is a separate program.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import InputError

DASHBOARD_HINT = "pip install 'pneumo[dashboard]'"


class UiError(InputError):
    """A one-line reason a server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    """The console script installed beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


class ManagedServer:
    """A child server in its own process group, ready once `health_path` answers HTTP 200."""

    name = "server"
    health_path = "/"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 120.0,
                 log_file: str | Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> ManagedServer:
        if self.log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"pneumo-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        except OSError as e:
            self._log.close()
            raise UiError(f"cannot start {self.name}: {e.strerror or e}") from None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UiError(f"{self.name} exited with code {self.proc.returncode} before answering on "
                              f"{self.url}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise UiError(f"{self.name} did not answer on {self.url}{self.health_path} within "
                      f"{self.startup_timeout:.0f} s (log: {self.log_path})")

    def log_tail(self, chars: int = 300) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " ".join(text[-chars:].split()) or "(empty log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the whole process group, SIGKILL to whatever is left after `timeout` seconds."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _kill_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until the server exits by itself (Ctrl-C reaches the caller, not the server's group)."""
        return self.proc.wait() if self.proc else 0

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen, timeout: float) -> None:
    pgid = proc.pid  # start_new_session: the child leads its own group, whose id is its pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if proc.poll() is not None and not group_alive(pgid):
                return
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (zombies of our own child aside)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MlflowServer(ManagedServer):
    """`mlflow server` over a backend store and an artifact folder, one worker, on 127.0.0.1.

    Runs logged to it get artifacts proxied into `artifacts_dir`; experiments created on an embedded SQLite
    store already name their own `file://` artifact location, which the server reads directly.
    """

    name = "mlflow server"
    health_path = "/health"

    def __init__(self, backend_uri: str, artifacts_dir: str | Path, port: int | None = None, *,
                 host: str = "127.0.0.1", workers: int = 1, startup_timeout: float = 120.0,
                 log_file: str | Path | None = None):
        super().__init__(port, host, startup_timeout, log_file)
        self.backend_uri = _absolute_sqlite(backend_uri)
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.workers = workers

    def command(self) -> list[str]:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return [_executable("mlflow"), "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", self.artifacts_dir.as_uri(), "--host", self.host,
                "--port", str(self.port), "--workers", str(self.workers)]

    def env(self) -> dict[str, str]:
        # No job-execution consumers (huey): they cost processes and memory and the UI does not need them.
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class DashboardServer(ManagedServer):
    """optuna-dashboard over an Optuna storage URL (an optional extra)."""

    name = "optuna-dashboard"

    def __init__(self, storage: str, port: int | None = None, **kwargs):
        super().__init__(port, **kwargs)
        self.storage = _absolute_sqlite(storage)

    def command(self) -> list[str]:
        return [_executable("optuna-dashboard"), self.storage, "--host", self.host, "--port", str(self.port)]


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///mlruns/x.db` is relative to the working directory: pin it, so the child reads the same file."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(server: ManagedServer, what: str) -> None:
    """Start, print the URL, and keep serving until Ctrl-C (or SIGTERM); the group is always stopped."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with server:
            print(f"{what}: {server.url}  (Ctrl-C stops it; log: {server.log_path})", flush=True)
            code = server.wait()
            if code:
                raise UiError(f"{server.name} stopped with exit code {code}: {server.log_tail()}")
    except KeyboardInterrupt:
        print(f"stopped {server.name}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_ui(tracking_uri: str | None = None, port: int = 5000) -> None:
    """`pneumo ui`: the MLflow UI over the project's stores (the embedded SQLite store by default)."""
    from pipeline.stores import project_home, require_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)  # the project's store, not the current folder's
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {uri}")
        return
    if not uri.startswith("sqlite:///"):
        artifacts = project_home() / "mlruns" / "artifacts"
    else:
        require_store(uri, "ui")  # opening it would create an empty store
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    _check_port(port)
    _serve(MlflowServer(uri, artifacts, port=port, log_file=artifacts.parent / "mlflow-server.log"),
           "MLflow UI")


def run_dashboard(storage: str | None = None, port: int = 8080) -> None:
    """`pneumo dashboard`: optuna-dashboard on the study storage, when the optional extra is installed."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UiError(f"optuna-dashboard is not installed: {DASHBOARD_HINT}")
    from pipeline.stores import require_store
    from pipeline.tune import resolve_storage

    url = resolve_storage(storage)
    require_store(url, "dashboard", kind="optuna")
    _check_port(port)
    _serve(DashboardServer(url, port=port), "Optuna dashboard")


def _check_port(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise UiError(f"port {port} on {host} is in use: pass --port") from None
