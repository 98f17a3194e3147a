"""Mutual exclusion of promotions of one registered model, across threads, processes and hosts.

Aliases are single-valued, so the danger is a lost update: a slower promotion of a worse model landing last,
or a wrong `previous-champion`. `pipeline.promote.promotion.promote` re-reads the champion and moves the aliases inside
this lock. The primitive depends on where the registry lives, and each is one the store enforces atomically:
- SQLite file: an exclusive `flock` on a file beside the database (per open file, so threads exclude too);
- PostgreSQL / MySQL: a session-level advisory lock in the tracking database;
- a tracking server (http[s]://, no database access): creating a registered model named
  `<model>.promotion-lock`. Registered-model names are unique in every MLflow backend, so the server answers
  RESOURCE_ALREADY_EXISTS to all but one creator, whatever the timing. Release deletes it. A holder that died
  leaves it behind: a lock older than `stale_after` seconds (default 600 s, far above the seconds a commit
  takes) is broken, with the reason printed to stderr and kept in the new lock's tags.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.artifact import tracking
from pipeline.errors import InputError

STALE_AFTER = 600.0  # seconds after which a server-side lock is considered abandoned


class LockError(InputError):
    """Another promotion holds the lock for longer than we may wait (exit 2: try again later)."""


def lock_kind(tracking_uri: str) -> str:
    scheme = tracking_uri.split(":", 1)[0].split("+")[0].lower()
    if scheme == "sqlite":
        return "file"
    if scheme in ("postgresql", "postgres", "mysql"):
        return "database"
    return "model"


def lock_model_name(model: str) -> str:
    return f"{model}.promotion-lock"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model: str, *, client=None, kind: str | None = None,
                   timeout: float = 300.0, poll: float = 0.2, stale_after: float = STALE_AFTER) -> Iterator[None]:
    """Hold the promotion lock of `model` for the `with` block; LockError after `timeout` seconds of waiting."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    kind = kind or lock_kind(uri)
    deadline = time.monotonic() + timeout

    def give_up(holder: str = "another promotion"):
        raise LockError(f"{model}: promotion lock held by {holder} for more than {timeout:.0f} s; try again later")

    if kind == "file":
        db = Path(uri.split(":///", 1)[1])
        path = db.with_name(f"{db.name}.promote-{hashlib.sha1(model.encode()).hexdigest()[:12]}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        give_up()
                    time.sleep(poll)
            yield
        finally:
            os.close(fd)  # releases the lock
    elif kind == "database":
        with _advisory_lock(uri, model, deadline, poll, give_up):
            yield
    else:
        from mlflow import MlflowClient

        with _model_lock(client or MlflowClient(uri, uri), model, deadline, poll, stale_after, give_up):
            yield


@contextlib.contextmanager
def _advisory_lock(uri: str, model: str, deadline: float, poll: float, give_up: Callable) -> Iterator[None]:
    """A session-level advisory lock in the tracking database (PostgreSQL or MySQL/MariaDB)."""
    import sqlalchemy as sa

    from pipeline.stores import postgres_driver

    url = sa.engine.make_url(postgres_driver(uri))  # psycopg 3, the project's one PostgreSQL driver
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    name = f"pneumo-promote:{model}"
    if engine.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        take, drop, args = "SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": key}
    else:
        take, drop, args = "SELECT GET_LOCK(:n, 0)", "SELECT RELEASE_LOCK(:n)", {"n": name[:64]}
    try:
        with engine.connect() as conn:
            while not conn.execute(sa.text(take), args).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    give_up()
                time.sleep(poll)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text(drop), args)
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _model_lock(client, model: str, deadline: float, poll: float, stale_after: float,
                give_up: Callable) -> Iterator[None]:
    """The lock is a registered model of its own: the server creates a name at most once."""
    from mlflow.exceptions import MlflowException

    name = lock_model_name(model)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    note = ""
    while True:
        try:
            client.create_registered_model(name, tags={"owner": token, "acquired": f"{time.time():.3f}",
                                                       **({"broke": note} if note else {})},
                                           description=f"promotion lock of {model} (pneumo promote); "
                                                       "deleted on release")
            break
        except MlflowException as e:
            # ALREADY_EXISTS: someone holds it. DOES_NOT_EXIST: the SQL store answers a lost race this way when
            # the holder released between our failed insert and its read-back; both mean "try again".
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _holder(client, name)
        if holder is not None and time.time() - holder[1] > stale_after:
            note = (f"lock of {holder[0]} was {time.time() - holder[1]:.0f} s old (> {stale_after:.0f} s): "
                    "its promotion is presumed dead")
            print(f"warning: {model}: breaking the promotion lock: {note}", file=sys.stderr)
            with contextlib.suppress(MlflowException):  # another waiter may have broken it first
                if _holder(client, name) == holder:
                    client.delete_registered_model(name)
            continue
        if time.monotonic() > deadline:
            give_up(holder[0] if holder else "another promotion")
        time.sleep(poll)
    try:
        yield
    finally:
        holder = _holder(client, name)
        if holder is not None and holder[0] == token:
            with contextlib.suppress(MlflowException):  # already broken as stale by another promotion
                client.delete_registered_model(name)


def _holder(client, name: str) -> tuple[str, float] | None:
    """(owner, acquired at) of the lock model, None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException:
        return None
    try:
        return tags.get("owner", "?"), float(tags.get("acquired", "0"))
    except ValueError:
        return tags.get("owner", "?"), 0.0
