"""Where results live: the default MLflow and Optuna store URLs, and how a store URL is shown in output.

Light on purpose (no MLflow, no SQLAlchemy at import): the CLI resolves stores before any heavy import.
Passwords in a URL (postgresql://user:secret@host/db, http://user:secret@host) never reach a log, a table or
an error message: everything that prints a store URL prints `masked(url)`.
"""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_OPTUNA_STORAGE = "sqlite:///mlruns/optuna.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_optuna_storage(url: str | None = None) -> str:
    """--storage, else $PNEUMO_OPTUNA_STORAGE, else the embedded SQLite store."""
    return url or os.environ.get("PNEUMO_OPTUNA_STORAGE") or DEFAULT_OPTUNA_STORAGE


def masked(url: str) -> str:
    """The URL with any password replaced by ***: `postgresql://pneumo:***@db:5432/optuna`.

    The credentials end at the authority's last '@' (an unescaped '@' in a password must not leak its tail)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"
