"""Where results live: the default MLflow and Optuna store URLs, and how a store URL is shown in output.

Light on purpose (no MLflow, no SQLAlchemy at import): the CLI resolves stores before any heavy import.

The default stores are anchored to the project, not to wherever a command runs: `sqlite:///mlruns/mlflow.db`
means `<home>/mlruns/mlflow.db` where `<home>` is `$PNEUMO_HOME`, else the checkout this package runs from (the
folder holding pyproject.toml and pipeline/); only an installed package without `$PNEUMO_HOME` falls back to
the current folder. So `pneumo
predict` run from any folder reads the same registry that `pneumo train` filled. A URL the user passes
(--tracking-uri, $MLFLOW_TRACKING_URI) is taken as written.

Read-only commands (predict, explain, evaluate, ui, promote --dry-run, doctor) call `require_store` first:
opening a SQLite URL creates the file, and an empty store only turns into a puzzling "model not found".

Passwords in a URL (postgresql://user:secret@host/db, http://user:secret@host) never reach a log, a table or
an error message: everything that prints a store URL prints `masked(url)`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.errors import InputError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_OPTUNA_STORAGE = "sqlite:///mlruns/optuna.db"
PACKAGE_DIR = Path(__file__).resolve().parent
# What fills each kind of store: every "not found" names it.
FILLED_BY = {"tracking": "`pneumo train --register`, `pneumo tune` or `pneumo demo`",
             "optuna": "`pneumo tune` or `pneumo demo`"}


class StoreMissing(InputError):
    """A read-only command was pointed at a store that does not exist yet (exit 2)."""


def checkout_root() -> Path | None:
    """The source checkout this package runs from (pyproject.toml beside pipeline/), or None when installed."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "pipeline").is_dir() else None


def project_home() -> Path:
    """$PNEUMO_HOME, else the checkout, else the current folder: where relative default stores live."""
    home = os.environ.get("PNEUMO_HOME")
    if home:
        return Path(home).expanduser().resolve()
    return checkout_root() or Path.cwd().resolve()


def anchored(url: str) -> str:
    """A relative SQLite URL (`sqlite:///mlruns/x.db`) made absolute under `project_home()`."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(project_home() / url.removeprefix("sqlite:///"))
    return url


def anchored_path(path: str | Path) -> Path:
    """A relative path (the default `train.checkpoint_dir`, `mlruns/checkpoints`) under `project_home()`, beside
    the stores: a run started again from another folder finds its checkpoint as it finds its MLflow run."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_home() / path


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under `project_home()`."""
    return postgres_driver(uri or os.environ.get("MLFLOW_TRACKING_URI") or anchored(DEFAULT_TRACKING_URI))


def resolve_optuna_storage(url: str | None = None) -> str:
    """--storage, else $PNEUMO_OPTUNA_STORAGE, else the embedded SQLite store under `project_home()`."""
    return postgres_driver(url or os.environ.get("PNEUMO_OPTUNA_STORAGE") or anchored(DEFAULT_OPTUNA_STORAGE))


def postgres_driver(url: str) -> str:
    """PostgreSQL URLs go through psycopg 3, the project's one driver (the `postgres` extra): a bare
    `postgresql://` is spelled `postgresql+psycopg://`, so the URL means the same under every SQLAlchemy
    version (SQLAlchemy 2.0 would pick psycopg2 for it). A missing driver is one line naming the extra."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        return url
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    driver = scheme.partition("+")[2]
    if driver.isidentifier() and importlib.util.find_spec(driver) is None:
        hint = "pip install 'pneumo[postgres]'" if driver == "psycopg" else \
            "the project's driver is psycopg 3: write postgresql:// (pip install 'pneumo[postgres]')"
        raise InputError(f"{masked(url)}: PostgreSQL driver {driver!r} is not installed: {hint}")
    return f"{scheme}://{rest}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for any other store)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def artifact_root(url: str) -> Path:
    """Where MLflow artifacts live for a store that has no artifact server: `artifacts/` beside a SQLite
    database, else `mlruns/artifacts` under `project_home()`."""
    db = sqlite_path(url)
    return ((db.parent if db is not None else project_home() / "mlruns") / "artifacts").resolve()


def require_store(url: str, command: str, kind: str = "tracking") -> None:
    """Fail with one line when a read-only `command` would create an empty SQLite store at `url`, or write its
    tables into an empty file there (a 0-byte file is what an interrupted start or a `touch` leaves; no store
    that holds anything is 0 bytes)."""
    db = sqlite_path(url)
    if db is None or (db.is_file() and db.stat().st_size):
        return
    what, flag = ("MLflow store", "--tracking-uri") if kind == "tracking" else ("Optuna storage", "--storage")
    found = f"{db} is an empty file" if db.is_file() else f"no {what} at {db}"
    raise StoreMissing(f"{found}: pneumo {command} only reads one; {FILLED_BY[kind]} fills it "
                       f"(or pass {flag}, or set PNEUMO_HOME to the folder holding mlruns/)")


# Query parameters that carry a secret in database and server URLs (libpq's `password`, `sslpassword`; tokens).
SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "sslpassword", "secret", "token", "access_token",
                               "api_key", "apikey"})


def masked(url: str) -> str:
    """The URL with every password replaced by ***: `postgresql://pneumo:***@db:5432/optuna`, and the value of
    any secret query parameter too (`?password=...`).

    The credentials end at the URL's last '@': a password may hold any character, '/', '?', '#' and '@'
    included, so nothing after the scheme is trusted to end it sooner. A URL whose path or query holds an '@'
    is masked further than needed; a password is never shown."""
    from urllib.parse import parse_qsl, urlencode

    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{tail}"
    elif at:
        rest = f"{userinfo}@{tail}"
    head, q, query = rest.partition("?")
    if q:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMETERS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in SECRET_PARAMETERS else v) for k, v in pairs], safe="*:/@")
    return f"{scheme}://{head}{q}{query}"
