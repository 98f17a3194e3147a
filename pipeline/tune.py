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

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import study_report, tracking
from pipeline.config import Config, ConfigError
from pipeline.errors import PneumoError
from pipeline.manifest import dataset_digest
from pipeline.stores import masked, resolve_optuna_storage

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
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


def resolve_storage(url: str | None) -> str:
    url = resolve_optuna_storage(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; where only psycopg2 is installed (an older
        # environment of this project), name it, as pipeline.registry does.
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def config_to_json(cfg: Config) -> dict:
    values = {k: v for k, v in cfg.flat().items() if k != "name"}
    return {"name": cfg.name, "values": values, "space": cfg.tune.space}


def config_from_json(blob: dict) -> Config:
    return Config(name=blob["name"]).with_values({**blob["values"], "tune.space": blob["space"]})


# --- Optuna pieces ---------------------------------------------------------------------------------------
class StaleTrialSweeper:
    """Runs when a worker finds a trial whose heartbeat stopped: close its MLflow run, then queue a retry."""

    def __init__(self, max_retry: int):
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


def make_storage(url: str, cfg: Config) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=cfg.tune.heartbeat_interval,
        grace_period=2 * cfg.tune.heartbeat_interval,
        heartbeat_stale_trial_callback=StaleTrialSweeper(cfg.tune.max_retries),
    )


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


def open_study(name: str, storage_url: str, cfg: Config, worker: int = 0) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=make_storage(storage_url, cfg), direction="maximize",
                               sampler=make_sampler(cfg, worker), pruner=make_pruner(cfg), load_if_exists=True)


def queue_only(study: optuna.Study) -> None:
    """Make `study.optimize` run queued trials only, raising QueueEmpty instead of creating new ones.

    Optuna's `ask` creates a fresh trial when the queue is empty; with several workers that overshoots the
    launch's trial count. This replaces `ask` on this one study object with the same steps minus the
    creation (uses Optuna's `_pop_waiting_trial_id`, the atomic WAITING -> RUNNING claim; optuna is pinned <6).
    """

    def ask(fixed_distributions=None):
        study._thread_local.cached_all_trials = None
        trial_id = study._pop_waiting_trial_id()
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
def make_objective(spec: WorkerSpec, cfg: Config):
    from mlflow import MlflowClient
    from optuna_integration.keras import KerasPruningCallback

    from pipeline.train import train

    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float:
        objective.last_trial = trial.number
        trial_cfg = cfg.with_values(suggest(trial, cfg.tune.space))
        run: dict[str, str] = {}

        def started(run_id: str) -> None:
            run["id"] = run_id
            trial.set_user_attr("mlflow_run_id", run_id)

        # Report val AUC every epoch even without a pruner (NopPruner): the study keeps learning curves.
        callbacks = [KerasPruningCallback(trial, "val_auc")]
        worker = f"{os.uname().nodename}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        tags = {"study": spec.study, "trial_number": str(trial.number), "state": "RUNNING", "worker": worker}
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retried is not None:
            tags["retry_of_trial"] = str(retried)
        try:
            result = train(trial_cfg, spec.data_dir, tracking_uri=spec.tracking_uri, experiment=spec.study,
                           run_name=f"trial-{trial.number:03d}", parent_run_id=spec.parent_run_id, tags=tags,
                           callbacks=callbacks, register_as=cfg.tune.model_name, on_run_started=started,
                           stop_exceptions=(optuna.TrialPruned,), verbose=0, config_file=spec.config_file)
        except optuna.TrialPruned:
            if "id" in run:
                client.set_tag(run["id"], "state", "PRUNED")
            raise
        except BaseException as e:
            if "id" in run:
                client.set_tag(run["id"], "state", "FAIL")
                client.set_tag(run["id"], "error", " ".join(f"{type(e).__name__}: {e}".split())[:5000])
            raise
        value = float(result.val_metrics["auc"])
        client.set_tag(result.run_id, "state", "COMPLETE")
        if result.model_version:
            for key, val in {"study": spec.study, "trial_number": str(trial.number), "val_auc": f"{value:.6f}",
                             "dataset_digest": _digest(spec.data_dir), "threshold": f"{result.threshold:.6f}",
                             "run_id": result.run_id}.items():
                client.set_model_version_tag(cfg.tune.model_name, result.model_version, key, val)
            trial.set_user_attr("model_version", result.model_version)
        trial.set_user_attr("threshold", result.threshold)
        return value

    objective.last_trial = None
    return objective


def _digest(data_dir: str) -> str:
    return dataset_digest(data_dir)


def work(spec: WorkerSpec) -> dict[str, int]:
    """Pop queued trials until none is left and none is running anywhere; -> outcome counts of this worker."""
    tracking.setup(spec.tracking_uri)
    cfg = config_from_json(spec.config)
    study = open_study(spec.study, spec.storage, cfg, spec.worker)
    queue_only(study)
    objective = make_objective(spec, cfg)
    outcomes = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    failures = 0
    while spec.deadline is None or time.time() < spec.deadline:
        objective.last_trial = None
        t0 = time.perf_counter()
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        except QueueEmpty:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(cfg.tune.heartbeat_interval)  # a running trial may be a dead worker's: ask again soon
            continue
        except Exception:
            # A peer declared this worker's trial stale (its heartbeats came late: a loaded machine, a locked
            # SQLite file), failed it and queued a retry; Optuna then cannot `tell` the finished trial and raises
            # out of optimize (ValueError "Cannot tell a FAIL trial", or its internal "Should not reach"
            # assertion when the objective itself returned). Objective errors never get here (catch=Exception
            # makes them FAIL trials), so an exception with this trial already FAIL is that case: the retry owns
            # the work now; drop this attempt and take the next trial rather than let the worker die.
            last = objective.last_trial
            if last is None or study.get_trials(deepcopy=False)[last].state != TrialState.FAIL:
                raise
            print(f"trial {last} was failed as stale by another worker while it ran here; its retry takes over "
                  f"[worker {spec.worker}]", file=sys.stderr, flush=True)
            continue
        if objective.last_trial is None:
            continue
        trial = study.get_trials(deepcopy=False)[objective.last_trial]
        outcomes[trial.state.name] = outcomes.get(trial.state.name, 0) + 1
        if trial.state == TrialState.FAIL:
            failures += 1
            if failures <= cfg.tune.max_retries:
                study.enqueue_trial({}, user_attrs={"replaces_failed_trial": trial.number})
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        print(f"trial {trial.number:>3} {trial.state.name:<8} val_auc {value:>6}  {study_report.best_line(study)}  "
              f"{time.perf_counter() - t0:6.1f} s  [worker {spec.worker}]", flush=True)
        try:
            study_report.refresh(study, spec.parent_run_id)
        except Exception as e:  # the summary is a convenience: never lose a trial over it
            print(f"warning: study summary not refreshed: {e}", file=sys.stderr)
    return outcomes


# --- the launcher ----------------------------------------------------------------------------------------
def prepare(cfg: Config, study_name: str, storage_url: str, tracking_uri: str, trials: int) -> tuple[str, int]:
    """Create the shared state once: MLflow experiment + parent run, Optuna study, queued trials."""
    from mlflow import MlflowClient

    exp_id = tracking.ensure_experiment(study_name, tracking_uri)
    client = MlflowClient()
    study = open_study(study_name, storage_url, cfg)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        try:
            client.update_run(parent, status="RUNNING")
        except Exception:
            parent = None  # the MLflow store was reset: start a new parent
    if not parent:
        run = client.create_run(exp_id, run_name=f"study:{study_name}",
                                tags={"study": study_name, "kind": "study"})
        parent = run.info.run_id
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("mlflow_experiment_id", exp_id)
        client.log_dict(parent, config_to_json(cfg), "study/config.json")
    waiting_before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    for _ in range(trials):
        study.enqueue_trial({})
    return parent, waiting_before


def count_gpus() -> int:
    """GPUs without importing TensorFlow in the launcher (6 s): ask nvidia-smi when it exists."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def run_tune(cfg: Config, study_name: str, *, data_dir: str | None = None, trials: int | None = None,
             timeout: float | None = None, workers: int = 1, storage: str | None = None,
             tracking_uri: str | None = None, config_file: str | None = None) -> optuna.Study:
    if not cfg.tune.space:
        raise ConfigError("[tune.space] is empty: nothing to search")
    data_dir = str(data_dir or cfg.data.dir)
    if not (Path(data_dir) / "manifest.json").exists():
        raise TuneError(f"{data_dir}/manifest.json not found: run `pneumo convert` first (or pass --data)")
    trials = cfg.tune.trials if trials is None else trials
    storage_url = resolve_storage(storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.setup(uri)
    parent, waiting = prepare(cfg, study_name, storage_url, uri, trials)
    print(f"study {study_name}: {trials} trials queued" + (f" (+{waiting} left by an earlier launch)" if waiting else "")
          + f"; {workers} worker(s); storage {masked(storage_url)}; MLflow {masked(uri)} parent run {parent}",
          flush=True)
    spec = WorkerSpec(study=study_name, storage=storage_url, tracking_uri=uri, data_dir=data_dir,
                      config=config_to_json(cfg), parent_run_id=parent,
                      deadline=time.time() + timeout if timeout else None,
                      config_file=str(config_file) if config_file else None)
    try:
        if workers <= 1:
            work(spec)
        else:
            _run_worker_processes(spec, workers)
    finally:
        from mlflow import MlflowClient

        study = optuna.load_study(study_name=study_name, storage=storage_url)
        try:
            study_report.refresh(study, parent)
        except Exception as e:
            print(f"warning: study summary not refreshed: {e}", file=sys.stderr)
        MlflowClient().set_terminated(parent, "FINISHED")
    print(study_report.summary_table(study))
    return study


def _run_worker_processes(spec: WorkerSpec, workers: int) -> None:
    gpus = count_gpus()
    with tempfile.TemporaryDirectory(prefix="pneumo-tune-") as tmp:
        procs = []
        for w in range(workers):
            path = Path(tmp) / f"worker-{w}.json"
            path.write_text(json.dumps({**spec.__dict__, "worker": w}))
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(w % gpus)  # one trial per GPU
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.tune", str(path)], env=env))
            time.sleep(1.0)  # stagger start-up: the first trials' TF imports compete for the same 2 cores
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:  # the terminal sent SIGINT to the whole group; give workers time to close runs
                p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait(timeout=120)
            raise
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"warning: {len(bad)} worker(s) exited with errors {bad}", file=sys.stderr)


def worker_main(spec_path: str) -> int:
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    try:
        work(spec)
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
