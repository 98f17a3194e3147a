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
  takes) is broken, with the reason printed to stderr and kept in the new lock's tags. Its age is the
  server's own creation time of the lock model, never a tag a client wrote (a lock tagged with a future time
  once blocked promotions for good). Breaking is one atomic step too: the breaker first creates
  `<model>.promotion-lock.broken-<owner>`, a name only one waiter can create for that holder, and only the
  waiter that did deletes the stale lock. A refused create or delete (PERMISSION_DENIED: another user's lock
  under basic auth) ends the wait at once with one line; every other path backs off and keeps the deadline.

Fencing: the lock yields a `Fence`; `pipeline.promote.record.commit` calls `fence.check()` before each alias
write, so a holder whose lock was broken while it stalled (or whose database session, and with it the advisory
lock, was lost) stops before it moves an alias. The database lock needs a session-level connection: behind a
transaction-mode pooler (PgBouncer `pool_mode = transaction`) advisory locks do not hold; point the tracking
URI at the database or at a session-mode pool (docs/scale-out.md).
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
from pipeline.errors import InputError, PneumoError

STALE_AFTER = 600.0  # seconds after which a server-side lock is considered abandoned


MAX_BACKOFF = 2.0  # seconds between attempts, at most (the wait doubles from `poll` up to this)


class LockError(InputError):
    """Another promotion holds the lock for longer than we may wait, or we may not take it (exit 2)."""


class LockLost(PneumoError):
    """The lock stopped being ours before an alias write (broken as stale, or its session lost): exit 1."""


class Fence:
    """What the holder re-checks before each alias write: `check()` raises LockLost when the lock is no longer
    held by this promotion. The file lock cannot be lost while its descriptor is open: no check needed."""

    def __init__(self, check: Callable[[], str | None] | None = None):
        self._check = check

    def check(self) -> None:
        lost = self._check() if self._check else None
        if lost:
            raise LockLost(f"promotion lock lost before an alias write ({lost}): nothing more is written; "
                           "rerun `pneumo promote`")


def _backoff(poll: float) -> Iterator[float]:
    delay = poll
    while True:
        yield delay
        delay = min(delay * 2, MAX_BACKOFF)


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
                   timeout: float = 300.0, poll: float = 0.2, stale_after: float = STALE_AFTER) -> Iterator[Fence]:
    """Hold the promotion lock of `model` for the `with` block (-> its Fence); LockError after `timeout` seconds
    of waiting, or at once when the store refuses us the lock."""
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
            for delay in _backoff(poll):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        give_up()
                    time.sleep(delay)
            yield Fence()
        finally:
            os.close(fd)  # releases the lock
    elif kind == "database":
        with _advisory_lock(uri, model, deadline, poll, give_up) as fence:
            yield fence
    else:
        from mlflow import MlflowClient

        with _model_lock(client or MlflowClient(uri, uri), model, deadline, poll, stale_after, give_up) as fence:
            yield fence


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
    def session_alive(conn) -> str | None:
        try:  # the advisory lock lives as long as this session: a lost connection took the lock with it
            conn.execute(sa.text("SELECT 1")).scalar()
            conn.commit()
        except sa.exc.DBAPIError as e:
            return f"its database session failed: {type(e.orig).__name__}"
        return None

    try:
        with engine.connect() as conn:
            delays = _backoff(poll)
            while not conn.execute(sa.text(take), args).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    give_up()
                time.sleep(next(delays))
            conn.commit()
            try:
                yield Fence(lambda: session_alive(conn))
            finally:
                conn.execute(sa.text(drop), args)
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _model_lock(client, model: str, deadline: float, poll: float, stale_after: float,
                give_up: Callable) -> Iterator[Fence]:
    """The lock is a registered model of its own: the server creates a name at most once."""
    from mlflow.exceptions import MlflowException

    name = lock_model_name(model)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    note = ""
    delays = _backoff(poll)
    while True:
        try:
            client.create_registered_model(name, tags={"owner": token, **({"broke": note} if note else {})},
                                           description=f"promotion lock of {model} (pneumo promote); "
                                                       "deleted on release")
            break
        except MlflowException as e:
            # ALREADY_EXISTS: someone holds it. DOES_NOT_EXIST: the SQL store answers a lost race this way when
            # the holder released between our failed insert and its read-back; both mean "try again".
            _refused(e, model, name, "create")
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _holder(client, name)
        if holder is not None and _age(holder) > stale_after:
            note = (f"lock of {holder[0]} was {_age(holder):.0f} s old (> {stale_after:.0f} s): its promotion is "
                    "presumed dead")
            if _break(client, model, name, holder, note):
                continue  # broken: try to take it now (the deadline still holds below, next time round)
        if time.monotonic() > deadline:
            give_up(holder[0] if holder else "another promotion")
        time.sleep(next(delays))

    def still_ours() -> str | None:
        holder = _holder(client, name)
        return None if holder is not None and holder[0] == token else (
            f"`{name}` now held by {holder[0]}" if holder else f"`{name}` was deleted (broken as stale?)")

    try:
        yield Fence(still_ours)
    finally:
        holder = _holder(client, name)
        if holder is not None and holder[0] == token:
            with contextlib.suppress(MlflowException):  # already broken as stale by another promotion
                client.delete_registered_model(name)


def _refused(e, model: str, name: str, what: str) -> None:
    """PERMISSION_DENIED (or an auth failure) is final: waiting cannot change it."""
    if e.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        raise LockError(f"{model}: the tracking server refused to {what} the promotion lock `{name}` "
                        f"({e.error_code}): ask its owner or an admin to delete it, or promote as a user who "
                        "may manage it") from None


def _break(client, model: str, name: str, holder: tuple, note: str) -> bool:
    """Delete a stale lock, at most one waiter per stale holder: the one that creates the marker
    `<name>.broken-<owner>` (a unique name, so the server lets one creator through). True when we broke it."""
    from mlflow.exceptions import MlflowException

    marker = f"{name}.broken-{hashlib.sha1(holder[0].encode()).hexdigest()[:16]}"
    try:
        client.create_registered_model(marker, tags={"note": note[:500]},
                                       description=f"marks the broken promotion lock of {model}")
    except MlflowException as e:
        _refused(e, model, marker, "create")
        return False  # another waiter is breaking it
    print(f"warning: {model}: breaking the promotion lock: {note}", file=sys.stderr)
    try:
        if _holder(client, name) == holder:
            client.delete_registered_model(name)
    except MlflowException as e:
        _refused(e, model, name, "delete")
        raise
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(marker)
    return True


def _age(holder: tuple) -> float:
    """Seconds since the server created the lock model (its clock, not a tag any client can write); a
    creation time in the future (clock skew, or a forged store row) counts as no age at all until it passes.
    """
    return max(0.0, time.time() - holder[1])


def _holder(client, name: str) -> tuple[str, float] | None:
    """(owner, created at: the server's timestamp, seconds) of the lock model, None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return None
    return (rm.tags or {}).get("owner", "?"), (rm.creation_timestamp or 0) / 1000.0
