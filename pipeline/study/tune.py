"""Optuna studies of the CNN: a launcher, its workers, and the trial objective.

How a launch works:
1. The launcher creates (or opens) everything shared before any worker starts: the MLflow store and
   experiment (named after the study, with its artifact location), the parent run, and the Optuna study, whose
   user attributes carry the parent run id for workers on other hosts. Several processes creating a fresh
   SQLite MLflow store at once crash on schema creation; one creator avoids that.
2. It queues `--trials N` WAITING trials. Workers only ever run queued trials (they never create extra ones),
   so a launch ends with exactly N more finished trials however many workers share it: `--trials 3` then
   `--trials 1` leaves a study of 4.
3. Workers (K processes, one per GPU when there are GPUs) pop trials until the queue is empty. A dead worker
   stops heart-beating; the next worker that asks for a trial marks it FAIL, closes its MLflow run as FAILED
   (the sweeper) and queues a retry (`RetryHeartbeatStaleTrialCallback`). Stale trials are only noticed when a
   worker asks, so workers keep polling while any trial is still RUNNING somewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.artifact import tag_keys, tracking
from pipeline.config import Config, ConfigError
from pipeline.data.manifest import load_manifest
from pipeline.errors import PneumoError, one_line
from pipeline.net import devices
from pipeline.stopping import (
    StopRequested,
    raise_if_stopped,
    stop_check_callback,
    stop_on_signals,
    wait_stoppable,
)
from pipeline.stores import masked, resolve_optuna_storage, sqlite_path
from pipeline.study import study_report


@contextlib.contextmanager
def experimental_optuna():
    """Optuna's heartbeat and stale-trial retry are marked experimental (since 2.8); the project relies on them
    knowingly, so their warning is silenced where they are used, not globally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed by the worker loop


class QueueEmpty(Exception):
    """No queued trial is left for this launch."""


class TuneError(PneumoError):
    """A one-line reason the study cannot run."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; JSON-serialisable so it crosses process and host boundaries."""

    study: str
    storage: str
    tracking_uri: str
    data_dir: str
    config: dict  # {"name", "values", "space"}
    parent_run_id: str
    worker: int = 0
    deadline: float | None = None  # absolute time.time() after which no new trial starts
    config_file: str | None = None


def config_to_json(cfg: Config) -> dict:
    values = {k: v for k, v in cfg.flat().items() if k != "name"}
    return {"name": cfg.name, "values": values, "space": cfg.tune.space}


def config_from_json(blob: dict) -> Config:
    return Config(name=blob["name"]).with_values({**blob["values"], "tune.space": blob["space"]})


# --- Optuna pieces ---------------------------------------------------------------------------------------
class StaleTrialSweeper:
    """Runs when a worker finds a trial whose heartbeat stopped: close its MLflow run, then queue a retry."""

    def __init__(self, max_retry: int):
        with experimental_optuna():
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            from mlflow import MlflowClient

            client = MlflowClient()
            client.set_tag(run_id, "state", "FAIL")
            client.set_tag(run_id, "failure", "worker stopped heart-beating (killed or lost); trial retried")
            client.set_terminated(run_id, "FAILED")
        print(f"trial {trial.number} went stale (its worker died); retrying it", flush=True)
        self.retry(study, trial)


# --- a storage that rides out a database restart -------------------------------------------------------------
# A PostgreSQL restart (or pg_terminate_backend) kills every pooled connection. `pool_pre_ping` replaces a dead
# connection when it is next checked out; a call already in flight fails with OperationalError (raw, or as the
# cause of Optuna's StorageInternalError) and is retried here with backoff, on a fresh connection. The attempts
# span ~30 s, longer than a restart takes. Caveat: a write whose commit reached the server but whose answer was
# lost is applied twice on retry; the window is one round trip, and Optuna's trial writes are keyed by trial.
STORAGE_RETRIES = 6

# Which RDBStorage methods are retried is read off Optuna itself, not written by hand: every public method, and
# every private one that Optuna's _CachedStorage (the wrapper every study puts around an RDBStorage) calls on
# its backend directly (Optuna 5.1: _create_new_trial, _set_trial_param, _get_trials, ...). A hand list missed
# those, so a dropped connection there failed the trial. A method that is neither retried nor named below fails
# tests/test_storage_resilience.py, so an Optuna upgrade that adds one is looked at, not skipped.
NOT_RETRIED = {
    # one-off set-up, run by the launcher: a dropped connection there should fail the launch loudly
    "create_new_study", "delete_study", "upgrade", "get_current_version", "get_head_version",
    "get_all_versions", "_create_unique_study_name",
    # no database round trip of their own
    "remove_session", "check_trial_is_updatable", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback",
    "get_failed_trial_callback", "_build_frozen_trial_from_trial_model", "_fill_storage_url_template",
    "_set_default_engine_kwargs_for_mysql", "_get_prepared_new_trial",
    # run inside a caller's open transaction: retrying them alone would commit half of it
    "_set_trial_attr_without_commit", "_set_trial_intermediate_value_without_commit",
    "_set_trial_param_without_commit", "_set_trial_value_without_commit",
}


def storage_methods() -> set[str]:
    """Every method RDBStorage defines or inherits from BaseStorage (dunders aside)."""
    return {name for cls in optuna.storages.RDBStorage.__mro__[:-1] for name, value in vars(cls).items()
            if callable(value) and not name.startswith("__")}


def cached_backend_calls() -> set[str]:
    """The names Optuna's _CachedStorage calls on its backend (`self._backend.<name>`), read from its source."""
    import inspect

    from optuna.storages._cached_storage import _CachedStorage

    return set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_CachedStorage)))


def retried_calls() -> list[str]:
    public = {name for name in storage_methods() if not name.startswith("_")}
    return sorted((public | cached_backend_calls()) - NOT_RETRIED)


def _transient(e: BaseException) -> bool:
    """A lost connection (server restarted, backend terminated, network blip), not a bad statement.

    Also SQLAlchemy's PendingRollbackError raised while handling a lost connection: Optuna's `_get_trials`
    catches the OperationalError and retries its query in the same session, whose transaction the dead
    connection left invalid (seen in tests/test_scale_out.py's cut: a worker crashed on it)."""
    import sqlalchemy.exc

    def lost(x: BaseException | None) -> bool:
        return isinstance(x, sqlalchemy.exc.OperationalError) or (
            isinstance(x, sqlalchemy.exc.DBAPIError) and x.connection_invalidated)

    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
    if isinstance(cause, sqlalchemy.exc.PendingRollbackError):
        return lost(cause.__context__) or lost(cause.__cause__)
    return lost(cause)


_retry_depth = threading.local()  # a retried call that calls another (create_new_trial -> _create_new_trial)


def _retrying(name: str):
    def call(self, *args, **kwargs):
        method = getattr(optuna.storages.RDBStorage, name)  # looked up per call: tests can stand in for it
        if getattr(_retry_depth, "inside", False):  # the outermost call retries, or the attempts multiply
            return method(self, *args, **kwargs)
        _retry_depth.inside = True
        try:
            for attempt in range(STORAGE_RETRIES + 1):
                try:
                    return method(self, *args, **kwargs)
                except Exception as e:  # noqa: BLE001 (only a lost connection is retried)
                    if attempt == STORAGE_RETRIES or not _transient(e):
                        raise
                    wait = min(0.5 * 2**attempt, 10.0)
                    print(f"optuna storage: connection lost in {name} ({type(e).__name__}); "
                          f"retry {attempt + 1}/{STORAGE_RETRIES} in {wait:.1f} s", file=sys.stderr, flush=True)
                    self.scoped_session.remove()  # drop the session bound to the dead connection
                    time.sleep(wait)
        finally:
            _retry_depth.inside = False
    call.__name__ = name
    return call


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose calls retry on a lost database connection (see STORAGE_RETRIES)."""


for _name in retried_calls():
    setattr(ResilientRDBStorage, _name, _retrying(_name))


# A connection the server accepted and then dropped (pg_terminate_backend, a restart, a crash: SQLSTATE class
# 57P, or the socket closed under a query), as opposed to one it never accepted (refused, unknown host, bad
# password). Only the first kind is worth retrying when the storage is made: a refused connection is a wrong URL
# or a server that is down, and the user hears it at once (tests/test_cli.py), not after ~30 s of retries.
_DROPPED_SQLSTATES = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now
_DROPPED_MESSAGES = ("server closed the connection unexpectedly", "consuming input failed",
                     "terminating connection", "connection is lost", "connection already closed")


def dropped_connection(e: BaseException) -> bool:
    """Whether `e` (an SQLAlchemy error) is a connection the server had accepted and then lost."""
    import sqlalchemy.exc

    if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
        return True
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) in _DROPPED_SQLSTATES:
        return True
    text = str(orig if orig is not None else e).lower()
    return any(m in text for m in _DROPPED_MESSAGES)


def make_storage(url: str, cfg: Config) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # The constructor checks the schema in transactions of its own: a worker that starts while the server drops
    # its connections (tests/test_scale_out.py cuts them mid-study) retries it like any storage call.
    for attempt in range(STORAGE_RETRIES + 1):
        try:
            with experimental_optuna():  # heartbeats
                return ResilientRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=cfg.tune.heartbeat_interval,
                    grace_period=2 * cfg.tune.heartbeat_interval,
                    heartbeat_stale_trial_callback=StaleTrialSweeper(cfg.tune.max_retries),
                )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as raised:
            # A drop inside a commit reaches us wrapped: Optuna's session scope raises StorageInternalError from
            # the SQLAlchemy error (seen in tests/test_scale_out.py's connection cut), so judge the cause.
            e = raised.__cause__ if isinstance(raised, optuna.exceptions.StorageInternalError) else raised
            if not isinstance(e, sqlalchemy.exc.SQLAlchemyError):
                raise
            if attempt < STORAGE_RETRIES and dropped_connection(e):
                wait = min(0.5 * 2**attempt, 10.0)
                print(f"optuna storage: connection lost while opening {masked(url)} ({type(e).__name__}); "
                      f"retry {attempt + 1}/{STORAGE_RETRIES} in {wait:.1f} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                continue
            if not isinstance(e, sqlalchemy.exc.OperationalError):
                raise
            # refused, unknown host, bad password, full disk, or still dropped after the retries: run time
            reason = str(e.orig if e.orig is not None else e).strip().splitlines()[0]
            raise TuneError(f"Optuna storage {masked(url)} does not answer: {reason}") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def make_sampler(cfg: Config, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker gets its own seed, or parallel workers would propose the same parameters.
    seed = cfg.tune.seed + 1000 * worker
    kind = cfg.tune.sampler
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=cfg.tune.startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    if cfg.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.startup_trials,
                                           n_warmup_steps=cfg.tune.warmup_epochs)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


# What each `tune.metric` reads. Per-epoch metrics are reported to the pruner under their own name; the shift
# metrics exist only once training ends (the battery scores the final model), so those trials are pruned on
# the per-epoch val_auc: a trial whose clean AUC lags the median is unlikely to hold up better under shift,
# and a pruner needs a learning curve, which a single end-of-training number cannot give.
PER_EPOCH = {"val_auc": "val_auc", "val_loss": "val_loss"}


def direction(metric: str) -> str:
    from pipeline.evaluate.metrics import lower_is_better

    return "minimize" if lower_is_better(metric) else "maximize"


def pruning_monitor(metric: str) -> str:
    """The per-epoch Keras log the pruner watches for `metric` (same direction as the study)."""
    return PER_EPOCH.get(metric, "val_auc")


def objective_value(result, metric: str) -> float:
    """The study's value of a finished trial: computed once, on the final (restored-best) model over the
    whole validation split (val_auc, val_loss) or the battery's fixed subset (the shift metrics)."""
    return metric_value(result.val_metrics, result.shift_metrics, metric)


def metric_value(val_metrics: dict, shift_metrics: dict, metric: str) -> float:
    if metric == "val_auc":
        return float(val_metrics["auc"])
    if metric == "val_loss":
        return float(val_metrics["loss"])
    if metric not in shift_metrics:
        raise TuneError(f"tune.metric = {metric!r} but the trial logged no shift metrics "
                        "(train.shift_battery is off)")
    return float(shift_metrics[metric])


def trial_version_tags(study: str, trial_number: int, metric: str):
    """validation -> the tags a trial's version is created with: `pneumo promote --study` ranks by them."""
    def tags(v) -> dict:
        return {tag_keys.STUDY: study, tag_keys.TRIAL_NUMBER: str(trial_number),
                tag_keys.VAL_AUC: f"{float(v.metrics['auc']):.6f}", tag_keys.STUDY_METRIC: metric,
                metric: f"{metric_value(v.metrics, v.shift_metrics(), metric):.6f}"}

    return tags


def open_study(name: str, storage_url: str, cfg: Config, worker: int = 0, storage=None) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage or make_storage(storage_url, cfg),
                                direction=direction(cfg.tune.metric), sampler=make_sampler(cfg, worker),
                                pruner=make_pruner(cfg), load_if_exists=True)
    stored = study.user_attrs.get("metric")
    if stored and stored != cfg.tune.metric:
        raise ConfigError(f"study {name!r} optimises {stored!r}; tune.metric = {cfg.tune.metric!r} would mix "
                          "two objectives in one study: use a new study name")
    return study


def claim_queued_trial(study: optuna.Study) -> int | None:
    """Atomically move one WAITING trial to RUNNING -> its id (None when the queue is empty).

    The project's one private Optuna call (optuna is pinned <6): Optuna's public `ask` makes a new trial when
    the queue is empty, and a check-then-ask races with other workers (two see one waiting trial, one of them
    creates an extra). `tests/test_tune.py::test_the_private_queue_claim_still_behaves` fails when Optuna
    changes it."""
    study._thread_local.cached_all_trials = None  # the claim must see other workers' trials
    return study._pop_waiting_trial_id()


def seed_heartbeats(storage, study_id: int, running: list, seeded: set[int]) -> None:
    """Record one heartbeat, once, for every RUNNING trial this worker waits on, so none can be waited on
    forever. Optuna fails a trial as stale only when it has a heartbeat older than the grace period: a trial
    with none at all (a retried storage write whose first commit had landed made one RUNNING, and its worker
    never beat for it) stayed RUNNING for good, and every worker waited on it. After one seeded beat, a dead
    or heartbeat-less trial is stale one grace period later and the next `optimize` fails it (and the sweeper
    queues its retry); a live trial's own heartbeat thread keeps it fresh, so the extra beat changes nothing.
    Once per trial only: seeding again would keep refreshing a dead trial. Public storage API only
    (`BaseHeartbeat.record_heartbeat`)."""
    for t in running:
        if t.number not in seeded:
            seeded.add(t.number)
            storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, t.number))


def queue_only(study: optuna.Study) -> None:
    """Make `study.optimize` run queued trials only, raising QueueEmpty instead of creating new ones.

    Optuna's `ask` creates a fresh trial when the queue is empty; with several workers that overshoots the
    launch's trial count. This replaces `ask` on this one study object with the same steps minus the
    creation (`claim_queued_trial`)."""

    def ask(fixed_distributions=None):
        trial_id = claim_queued_trial(study)
        if trial_id is None:
            raise QueueEmpty
        return optuna.Trial(study, trial_id)

    study.ask = ask


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Sample every `[tune.space]` entry; parameter names are the config keys themselves."""
    values = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                            log=bool(spec.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return values


# --- the worker ------------------------------------------------------------------------------------------
@dataclass
class WorkerState:
    """What the objective leaves for the worker loop: the trial it last started (None before any), so the loop
    can read how that trial ended, or find that a peer failed it as stale while it ran here."""

    last_trial: int | None = None
    seeded: set = field(default_factory=set)  # trial numbers given one heartbeat while waited on (seed_heartbeats)


def make_objective(spec: WorkerSpec, cfg: Config, state: WorkerState):
    from mlflow import MlflowClient
    from optuna_integration.keras import KerasPruningCallback

    from pipeline.study.train import RunSpec, train

    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float:
        state.last_trial = trial.number
        trial_cfg = cfg.with_values(suggest(trial, cfg.tune.space))
        run: dict[str, str] = {}

        def started(run_id: str) -> None:
            run["id"] = run_id
            trial.set_user_attr("mlflow_run_id", run_id)

        # Report the per-epoch metric every epoch even without a pruner (NopPruner): the study keeps learning
        # curves. For the shift metrics that is val_auc (see PER_EPOCH).
        callbacks = [KerasPruningCallback(trial, pruning_monitor(cfg.tune.metric)), stop_check_callback()]
        worker = f"{os.uname().nodename}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        tags = {tag_keys.STUDY: spec.study, tag_keys.TRIAL_NUMBER: str(trial.number), "state": "RUNNING",
                "worker": worker}
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        with experimental_optuna():
            retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retried is not None:
            tags["retry_of_trial"] = str(retried)
        try:
            run_spec = RunSpec(experiment=spec.study, name=f"trial-{trial.number:03d}",
                               parent_run_id=spec.parent_run_id, tags=tags, on_started=started,
                               stop_exceptions=(optuna.TrialPruned,),
                               version_tags=trial_version_tags(spec.study, trial.number, cfg.tune.metric))
            result = train(trial_cfg, spec.data_dir, tracking_uri=spec.tracking_uri, run=run_spec,
                           callbacks=callbacks, register_as=cfg.tune.model_name, verbose=0,
                           config_file=spec.config_file)
        except optuna.TrialPruned:
            if "id" in run:
                client.set_tag(run["id"], "state", "PRUNED")
            raise
        except BaseException as e:
            if "id" in run:
                client.set_tag(run["id"], "state", "FAIL")
                client.set_tag(run["id"], "error", f"{type(e).__name__}: {one_line(e)}"[:5000])
            raise
        metric = cfg.tune.metric
        value = objective_value(result, metric)
        client.set_tag(result.run_id, "state", "COMPLETE")
        if result.model_version:
            # The version was created with the study's value under the metric's own name plus `study_metric`
            # (trial_version_tags), so `pneumo promote --study` ranks by what the study optimised.
            trial.set_user_attr("model_version", result.model_version)
        trial.set_user_attr("threshold", result.threshold)
        return value

    return objective


def work(spec: WorkerSpec) -> dict[str, int]:
    """Pop queued trials until none is left and none is running anywhere; -> outcome counts of this worker."""
    tracking.setup(spec.tracking_uri)
    cfg = config_from_json(spec.config)
    storage = make_storage(spec.storage, cfg)
    study = open_study(spec.study, spec.storage, cfg, spec.worker, storage=storage)
    queue_only(study)
    state = WorkerState()
    study_id = storage.get_study_id_from_name(spec.study)
    objective = make_objective(spec, cfg, state)
    outcomes = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    failures = 0
    while spec.deadline is None or time.time() < spec.deadline:
        raise_if_stopped()  # a stop swallowed between trials: no trial of this launch is left half-run
        state.last_trial = None
        t0 = time.perf_counter()
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            raise_if_stopped()  # a stop some code swallowed or replaced with its own error in this trial
        except StopRequested:
            # Optuna failed the interrupted trial (its run is closed KILLED): queue its replacement, so the same
            # command run again does the work this launch could not finish. A trial that finished before the
            # stop was noticed needs none.
            last = state.last_trial
            if last is not None and study.get_trials(deepcopy=False)[last].state == TrialState.FAIL:
                study.enqueue_trial({}, user_attrs={"replaces_interrupted_trial": last})
                print(f"trial {last} interrupted; queued again for the next launch [worker "
                      f"{spec.worker}]", file=sys.stderr, flush=True)
            raise
        except QueueEmpty:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                break
            seed_heartbeats(storage, study_id, running, state.seeded)
            time.sleep(cfg.tune.heartbeat_interval)  # a running trial may be a dead worker's: ask again soon
            continue
        except Exception:
            # A peer declared this worker's trial stale (its heartbeats came late: a loaded machine, a locked
            # SQLite file), failed it and queued a retry; Optuna then cannot `tell` the finished trial and raises
            # out of optimize (ValueError "Cannot tell a FAIL trial", or its internal "Should not reach"
            # assertion when the objective itself returned). Objective errors never get here (catch=Exception
            # makes them FAIL trials), so an exception with this trial already FAIL is that case: the retry owns
            # the work now; drop this attempt and take the next trial rather than let the worker die.
            last = state.last_trial
            if last is None or study.get_trials(deepcopy=False)[last].state != TrialState.FAIL:
                raise
            print(f"trial {last} was failed as stale by another worker while it ran here; its retry takes over "
                  f"[worker {spec.worker}]", file=sys.stderr, flush=True)
            continue
        if state.last_trial is None:
            continue
        trial = study.get_trials(deepcopy=False)[state.last_trial]
        outcomes[trial.state.name] = outcomes.get(trial.state.name, 0) + 1
        if trial.state == TrialState.FAIL:
            failures += 1
            if failures <= cfg.tune.max_retries:
                study.enqueue_trial({}, user_attrs={"replaces_failed_trial": trial.number})
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        print(f"trial {trial.number:>3} {trial.state.name:<8} {cfg.tune.metric} {value:>6}  "
              f"{study_report.best_line(study)}  "
              f"{time.perf_counter() - t0:6.1f} s  [worker {spec.worker}]", flush=True)
        try:
            study_report.refresh(study, spec.parent_run_id)
        except Exception as e:  # the summary is a convenience: never lose a trial over it
            print(f"warning: study summary not refreshed: {e}", file=sys.stderr)
    return outcomes


# --- the launcher ----------------------------------------------------------------------------------------
def prepare(cfg: Config, study_name: str, storage_url: str, tracking_uri: str, trials: int,
            config_file: str | Path | None = None) -> tuple[str, int]:
    """Create the shared state once: MLflow experiment + parent run, Optuna study, queued trials; record the
    study's promotion rule (`promotion_rule`)."""
    from mlflow import MlflowClient

    exp_id = tracking.ensure_experiment(study_name, tracking_uri)
    client = MlflowClient()
    study = open_study(study_name, storage_url, cfg)
    study.set_user_attr("metric", cfg.tune.metric)  # the summary and later launches read the objective here
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        try:
            client.update_run(parent, status="RUNNING")
        except Exception:
            parent = None  # the MLflow store was reset: start a new parent
    if not parent:
        run = client.create_run(exp_id, run_name=f"study:{study_name}",
                                tags={tag_keys.STUDY: study_name, tag_keys.KIND: "study", **tracking.source_tags()})
        parent = run.info.run_id
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("mlflow_experiment_id", exp_id)
        client.log_dict(parent, config_to_json(cfg), "study/config.json")
    rule = promotion_rule(cfg, config_file)
    study.set_user_attr(tag_keys.STUDY_RULE, rule)
    client.set_tag(parent, tag_keys.STUDY_RULE, json.dumps(rule))  # what `pneumo promote --study` reads
    waiting_before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    for _ in range(trials):
        study.enqueue_trial({})
    return parent, waiting_before


def promotion_rule(cfg: Config, config_file: str | Path | None) -> dict:
    """The `[promote]` section a study was launched with, and the file it came from (path and sha256): so
    `pneumo promote --study` decides by the study's own rule when no --config is given. The latest launch's."""
    import dataclasses

    from pipeline.files import sha256_file

    path = Path(config_file).resolve() if config_file else None
    return {"promote": dataclasses.asdict(cfg.promote), "experiment_file": str(path) if path else None,
            "experiment_sha256": sha256_file(path) if path and path.is_file() else None}


def run_tune(cfg: Config, study_name: str, *, data_dir: str | None = None, trials: int | None = None,
             timeout: float | None = None, workers: int = 1, storage: str | None = None,
             tracking_uri: str | None = None, config_file: str | None = None,
             workers_per_gpu: int = 1) -> optuna.Study:
    """`workers` None: one per visible GPU (x `workers_per_gpu`), 1 without a GPU (pipeline/net/devices.py)."""
    if not cfg.tune.space:
        raise ConfigError("[tune.space] is empty: nothing to search")
    data_dir = str(data_dir or cfg.data.dir)
    load_manifest(data_dir)  # DataError (exit 2) naming the folder when it holds no converted data
    from pipeline.evaluate.shift import check_held_out

    check_held_out(cfg.train.shift_held_out)  # before any worker starts, not in every trial
    gpus = devices.visible_gpus()
    workers = devices.default_workers(workers_per_gpu) if workers is None else workers
    devices.check_placement(workers, gpus, workers_per_gpu)
    trials = cfg.tune.trials if trials is None else trials
    storage_url = resolve_optuna_storage(storage)
    if (db := sqlite_path(storage_url)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    make_storage(storage_url, cfg)  # a storage that does not answer fails before any MLflow store is made
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.setup(uri)
    parent, waiting = prepare(cfg, study_name, storage_url, uri, trials, config_file)
    print(f"study {study_name}: {trials} trials queued" + (f" (+{waiting} left by an earlier launch)" if waiting else "")
          + f"; {workers} worker(s); storage {masked(storage_url)}; MLflow {masked(uri)} parent run {parent}",
          flush=True)
    launched = datetime.datetime.now()  # Optuna stamps trials with naive local time
    crashed: list[int] = []
    spec = WorkerSpec(study=study_name, storage=storage_url, tracking_uri=uri, data_dir=data_dir,
                      config=config_to_json(cfg), parent_run_id=parent,
                      deadline=time.time() + timeout if timeout else None,
                      config_file=str(config_file) if config_file else None)
    status = "FINISHED"
    try:
        with stop_on_signals():
            if workers <= 1:
                work(spec)
            else:
                crashed = _run_worker_processes(spec, workers, gpus, workers_per_gpu)
    except KeyboardInterrupt:
        status = "KILLED"  # stopped: the trials already finished stay; the same command resumes the queue
        raise
    finally:
        from mlflow import MlflowClient

        study = optuna.load_study(study_name=study_name, storage=storage_url)
        try:
            study_report.refresh(study, parent)
        except Exception as e:
            print(f"warning: study summary not refreshed: {e}", file=sys.stderr)
        MlflowClient().set_terminated(parent, status)
    print(study_report.summary_table(study))
    problem = launch_problem(study, launched, crashed)
    if problem:
        raise TuneError(f"study {study_name}: {problem}")
    return study


def launch_problem(study: optuna.Study, since: datetime.datetime, crashed: list[int]) -> str | None:
    """Why this launch failed, for the summary and a non-zero exit: crashed workers (their exit codes), or
    every trial the launch finished failed. None when at least one trial completed or was pruned."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_start >= since
            and t.state.is_finished()]
    failed = sum(t.state == TrialState.FAIL for t in mine)
    reasons = []
    if crashed:
        reasons.append(f"{len(crashed)} worker(s) crashed (exit codes {', '.join(map(str, crashed))})")
    if mine and failed == len(mine):
        reasons.append(f"every trial of this launch failed ({failed} FAIL; see each run's `error` tag)")
    return "; ".join(reasons) or None




def worker_env(worker: int, gpus: list[str], workers_per_gpu: int, environ: dict | None = None) -> dict:
    """Worker `worker`'s environment: one entry of the user's GPU list (pipeline.net.devices.worker_gpu)."""
    env = dict(os.environ if environ is None else environ)
    gpu = devices.worker_gpu(worker, gpus, workers_per_gpu)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


STOP_GRACE_S = 60  # after a stop, how long a worker may take to close its trial before it is killed


def _run_worker_processes(spec: WorkerSpec, workers: int, gpus: list[str], workers_per_gpu: int = 1) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="pneumo-tune-") as tmp:
        procs = []
        for w in range(workers):
            path = Path(tmp) / f"worker-{w}.json"
            path.write_text(json.dumps({**spec.__dict__, "worker": w}))
            env = worker_env(w, gpus, workers_per_gpu)
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.study.tune", str(path)], env=env))
            time.sleep(1.0)  # stagger start-up: the first trials' TF imports compete for the same 2 cores
        try:
            codes = []
            for p in procs:
                codes.append(wait_stoppable(p))
        except KeyboardInterrupt as e:
            # Forward the stop (a terminal's Ctrl-C reaches the whole group, a scheduler's SIGTERM often only
            # this process), give each worker STOP_GRACE_S to close its trial, then kill what is left: the
            # launcher must exit within a bounded time.
            sig = getattr(e, "signum", signal.SIGINT)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(sig)
            deadline = time.monotonic() + STOP_GRACE_S
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            raise
    return [c for c in codes if c != 0]  # the caller reports them and exits non-zero


def worker_main(spec_path: str) -> int:
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    # A worker process imports Keras only in its first trial: the config's backend is still ours to pick.
    os.environ["KERAS_BACKEND"] = config_from_json(spec.config).train.backend
    devices.import_tensorflow_quietly()  # the launcher's output stays readable with K workers
    try:
        with stop_on_signals():
            work(spec)
    except KeyboardInterrupt as e:
        return getattr(e, "exit_code", 130)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
