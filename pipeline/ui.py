"""Browser front ends as managed child processes: the MLflow UI/server and optuna-dashboard.

`MlflowServer(backend_uri, artifacts_dir)` is a context manager that starts `mlflow server` on a free loopback
port, waits until `/health` answers and, on exit, stops it. Two facts, measured when the project began, shape it:
- default settings start 15 processes (~2.5 GB); `--workers 1` and MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
  start one worker in ~7 s with ~0.5 GB;
- killing only the parent leaves `huey_consumer` children behind, so the server gets its own session
  (`start_new_session=True`: its own process group) and stop() signals the whole group.
The tests of the tracking server reuse it. Nothing here imports MLflow: the server is a separate program.

Secrets: the backend store URL (which may hold a database password) reaches the child through the environment
(MLFLOW_BACKEND_STORE_URI, which `mlflow server` reads for --backend-store-uri), never its command line, which
any local user can read in /proc/<pid>/cmdline; everything printed shows it through `stores.masked`.
With `auth=True` the server runs MLflow's basic-auth app: every request but /health needs a user and password
(401 otherwise); the admin account is created on first start from MLFLOW_AUTH_ADMIN_USERNAME (default admin)
and MLFLOW_AUTH_ADMIN_PASSWORD, which must be set in the environment. Basic auth sends the password with every
request: put TLS in front (docs/scale-out.md).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import InputError, one_line
from pipeline.stopping import stop_on_signals, wait_stoppable
from pipeline.stores import (
    artifact_root,
    masked,
    require_store,
    resolve_optuna_storage,
    resolve_tracking_uri,
    sqlite_path,
)

DASHBOARD_HINT = "pip install 'pneumo[dashboard]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Bounds that hold on a loaded 2-core machine: `mlflow server` starts in ~7 s idle and took over a minute with
# eight jobs sharing the cores; a SIGTERM'ed group normally exits in 1-2 s, and whatever is left after
# STOP_GRACE_S is SIGKILLed, so stop() returns within ~STOP_GRACE_S + 5 s whatever the load.
STARTUP_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0


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

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = STARTUP_TIMEOUT_S,
                 log_file: str | Path | None = None):
        self.host = host
        self.port = port or free_port("127.0.0.1" if host in ("0.0.0.0", "::") else host)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # where this host reaches it
        return f"http://{host}:{self.port}"

    def secrets(self) -> list[str]:
        """Strings that must never be shown (passwords in store URLs): masked in log tails and errors."""
        return []

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> ManagedServer:
        if self.log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"pneumo-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(path)
        command, env = self.command(), self.env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return " ".join(text[-chars:].split()) or "(empty log)"

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole process group, SIGKILL to whatever is left after `timeout` seconds."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _kill_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until the server exits by itself (Ctrl-C reaches the caller, not the server's group), or until
        a stop that `stop_on_signals` caught, even one whose exception was dropped."""
        return wait_stoppable(self.proc) if self.proc else 0

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
                 host: str = "127.0.0.1", workers: int = 1, startup_timeout: float = STARTUP_TIMEOUT_S,
                 log_file: str | Path | None = None, auth: bool = False):
        super().__init__(port, host, startup_timeout, log_file)
        self.backend_uri = _absolute_sqlite(backend_uri)
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.workers = workers
        self.auth = auth

    def secrets(self) -> list[str]:
        shown = masked(self.backend_uri)
        return [self.backend_uri] if shown != self.backend_uri else []

    def command(self) -> list[str]:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        cmd = [_executable("mlflow"), "server", "--artifacts-destination", self.artifacts_dir.as_uri(),
               "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        return cmd + (["--app-name", "basic-auth"] if self.auth else [])

    def env(self) -> dict[str, str]:
        # No job-execution consumers (huey): they cost processes and memory and the UI does not need them.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_BACKEND_STORE_URI": self.backend_uri}  # by environment: argv is world-readable
        if self.auth:
            if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
                raise UiError("authentication needs the admin password in the environment: set "
                              "MLFLOW_AUTH_ADMIN_PASSWORD (and MLFLOW_AUTH_ADMIN_USERNAME, default admin)")
            env.setdefault("MLFLOW_AUTH_CONFIG_PATH", str(self._auth_config()))
            # The auth app's CSRF tokens are signed with this key: random per start unless set (several servers
            # behind one proxy must share one: set MLFLOW_FLASK_SERVER_SECRET_KEY yourself).
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        return env

    def _auth_config(self) -> Path:
        """An auth config whose user store lives beside the artifacts (MLflow's default is ./basic_auth.db,
        wherever the server happens to start). Authenticated users may read; writing needs a grant or the
        admin (MLflow's permission model); anonymous requests get 401."""
        folder = self.artifacts_dir.parent
        path = folder / "basic_auth.ini"
        from pipeline.files import atomic_write_text

        atomic_write_text(path, "[mlflow]\ndefault_permission = READ\n"
                                f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                                "admin_username = admin\n"
                                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        return path

    def start(self) -> ManagedServer:
        try:
            return super().start()
        except UiError as e:  # a log tail or a library message may quote the store URL
            text = str(e)
            for secret in self.secrets():
                text = text.replace(secret, masked(secret))
            raise UiError(text) from None


class DashboardServer(ManagedServer):
    """optuna-dashboard over an Optuna storage URL (an optional extra)."""

    name = "optuna-dashboard"

    def __init__(self, storage: str, port: int | None = None, **kwargs):
        super().__init__(port, **kwargs)
        self.storage = _absolute_sqlite(storage)

    # The storage URL (its password included) goes through the environment, readable by this user only
    # (/proc/<pid>/environ is 0400), not the command line every local user can read in /proc/<pid>/cmdline.
    STORAGE_ENV = "PNEUMO_DASHBOARD_STORAGE"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import os, optuna_dashboard; optuna_dashboard.run_server("
                f"os.environ[{self.STORAGE_ENV!r}], host={self.host!r}, port={self.port})"]

    def env(self) -> dict[str, str]:
        return {**os.environ, self.STORAGE_ENV: self.storage}

    def secrets(self) -> list[str]:
        return [self.storage] if masked(self.storage) != self.storage else []


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///mlruns/x.db` is relative to the working directory: pin it, so the child reads the same file."""
    db = sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def _serve(server: ManagedServer, what: str, more=None) -> None:
    """Start, print the URL, and keep serving until Ctrl-C (or SIGTERM); the group is always stopped.

    SIGINT gets the handler explicitly: a process started from a non-interactive shell's background job (nohup,
    `cmd &` in a script, some CI runners) inherits SIGINT as ignored, and Python then installs no
    KeyboardInterrupt handler, so Ctrl-C (or a supervisor's SIGINT) would leave the server running."""
    try:
        with stop_on_signals(), server:
            # The links are read before the URL line is printed, so a Ctrl-C sent once the URL shows lands in the
            # wait below, not inside the store reads (a SIGINT there once left the process dying of SIGINT after
            # it had stopped the server: tests/test_ui.py saw exit -2).
            lines = []
            if more is not None:  # what to open first (read from the store: a failure here is only a hint lost)
                try:
                    lines = list(more())
                except Exception as e:  # noqa: BLE001
                    lines = [f"  (no links: {one_line(e)})"]
            print("\n".join([f"{what}: {server.url}  (Ctrl-C stops it; log: {server.log_path})", *lines]), flush=True)
            code = server.wait()
            if code:
                raise UiError(f"{server.name} stopped with exit code {code}: {server.log_tail()}")
    except KeyboardInterrupt:
        print(f"stopped {server.name}", flush=True)


def remote_warning(host: str, auth: bool) -> str:
    """The warning for a server reachable from other hosts ("" on a loopback address)."""
    if host in LOOPBACK or host.startswith("127."):
        return ""
    if auth:
        return (f"WARNING: serving on {host}: reachable from other hosts; basic auth sends passwords in clear "
                "text, so put TLS in front (a reverse proxy, docs/scale-out.md)")
    return (f"WARNING: serving on {host} WITHOUT authentication: anyone who can reach this port can read and "
            "change every run and registered model. Add --auth (MLflow's basic-auth app; set "
            "MLFLOW_AUTH_ADMIN_PASSWORD) and put TLS in front (a reverse proxy, docs/scale-out.md)")


GENAI_TOGGLE_NOTE = ("MLflow's sidebar may open in its GenAI view (a browser setting; upstream mlflow/mlflow#24498): "
                     "if you land on Traces or Prompts, switch the toggle at its top to Model training")


def landing_lines(uri: str, base_url: str, limit: int = 5) -> list[str]:
    """Where a model trainer wants to land: each experiment's "Training runs" page (newest first) and the
    registered models, as URLs of the UI at `base_url`, then the GenAI-view note."""
    from mlflow import MlflowClient

    experiments = MlflowClient(uri, uri).search_experiments(order_by=["last_update_time DESC"], max_results=limit)
    lines = [f"  training runs of {e.name!r}: {base_url}/#/experiments/{e.experiment_id}/runs" for e in experiments
             if e.name != "Default"]
    lines.append(f"  registered models: {base_url}/#/models")
    lines.append(f"  ({GENAI_TOGGLE_NOTE})")
    return lines


def run_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1", auth: bool = False) -> None:
    """`pneumo ui`: the MLflow UI over the project's stores (the embedded SQLite store by default).

    `host` other than loopback serves other machines and prints a warning (and how to add authentication);
    `auth` runs MLflow's basic-auth app (MLFLOW_AUTH_ADMIN_PASSWORD in the environment)."""
    uri = resolve_tracking_uri(tracking_uri)  # the project's store, not the current folder's
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {masked(uri)}")
        return
    if sqlite_path(uri) is not None:
        require_store(uri, "ui")  # opening it would create an empty store
    artifacts = artifact_root(uri)
    _check_port(port, host)
    warning = remote_warning(host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    server = MlflowServer(uri, artifacts, port=port, host=host, auth=auth,
                          log_file=artifacts.parent / "mlflow-server.log")
    _serve(server, "MLflow UI", lambda: landing_lines(uri, server.url.rstrip("/")))


def run_dashboard(storage: str | None = None, port: int = 8080) -> None:
    """`pneumo dashboard`: optuna-dashboard on the study storage, when the optional extra is installed."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UiError(f"optuna-dashboard is not installed: {DASHBOARD_HINT}")
    url = resolve_optuna_storage(storage)
    require_store(url, "dashboard", kind="optuna")
    _check_port(port)
    _serve(DashboardServer(url, port=port), "Optuna dashboard")


def _check_port(port: int, host: str = "127.0.0.1") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UiError(f"port {port} on {host} is in use: pass --port") from None
            # an address this host does not own, a privileged port, a malformed host: say which
            raise UiError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
