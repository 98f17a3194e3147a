"""Optuna studies: every trial an MLflow run, completed models registered, workers that survive SIGKILL."""

import os
import signal
import subprocess
import sys

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.config import load_config
from pipeline.stores import resolve_optuna_storage
from pipeline.study import tune
from tests.conftest import REPO, wait_for

SMOKE = REPO / "experiments" / "smoke.toml"


def _runs(uri, study):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def study4(synth_data, tmp_path_factory):
    """A 2-trial study run in-process, then one more launch of 1 trial. Two trials are the fewest that make
    every plot of the parent run's summary (importances need two completed trials: the median pruner's two
    start-up trials are never pruned); each trial more cost ~11 s of the suite's slowest file."""
    tmp = tmp_path_factory.mktemp("study4")
    uri, storage = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp}/ckpt"])
    first = tune.run_tune(cfg, "s4", data_dir=str(synth_data), trials=2, storage=storage, tracking_uri=uri)
    parent_first = first.user_attrs["mlflow_parent_run_id"]
    runs_first = _runs(uri, "s4")
    second = tune.run_tune(cfg, "s4", data_dir=str(synth_data), trials=1, storage=storage, tracking_uri=uri)
    return {"uri": uri, "storage": storage, "parent_first": parent_first, "runs_first": runs_first,
            "study": second}


def test_two_trials_are_two_nested_runs_with_tags(study4):
    runs = study4["runs_first"]
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    trials = [r for r in runs if "trial_number" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "study:s4"
    assert len(trials) == 2
    assert sorted(int(r.data.tags["trial_number"]) for r in trials) == [0, 1]
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["study"] == "s4" and r.info.run_name == f"trial-{int(r.data.tags['trial_number']):03d}"
        assert r.data.tags["state"] in ("COMPLETE", "PRUNED")
        assert r.info.status == "FINISHED"
        assert "val_auc" in r.data.metrics and "model.filters" in r.data.params


def test_rerun_adds_trials_to_the_same_study_and_parent(study4):
    study = study4["study"]
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3 and len(study.trials) == 3  # --trials 2 then --trials 1: a study of 3
    assert study.user_attrs["mlflow_parent_run_id"] == study4["parent_first"]
    runs = _runs(study4["uri"], "s4")
    assert len([r for r in runs if r.data.tags.get("kind") == "study"]) == 1
    for t in study.trials:  # each trial knows its run, and the run its trial
        run = MlflowClient(study4["uri"]).get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["trial_number"] == str(t.number) and run.data.tags["state"] == t.state.name


def test_registered_versions_are_the_complete_trials(study4):
    client = MlflowClient(study4["uri"], study4["uri"])
    versions = client.search_model_versions("name='pneumonia-cnn'")
    complete = study4["study"].get_trials(states=(TrialState.COMPLETE,))
    assert sorted(int(v.tags["trial_number"]) for v in versions) == sorted(t.number for t in complete)
    value = {t.number: t.value for t in complete}
    for v in versions:
        assert v.tags["study"] == "s4" and len(v.tags["dataset_digest"]) == 64
        # The tag is the trial's objective value (6 decimals), the number `pneumo promote` ranks by.
        assert float(v.tags["val_auc"]) == pytest.approx(value[int(v.tags["trial_number"])], abs=5e-7)
        run = client.get_run(v.run_id)  # calibration travels with the version, as training stored it
        assert (v.tags["temperature"], v.tags["threshold"]) == (run.data.tags["temperature"],
                                                                run.data.tags["threshold"])


def test_parent_run_carries_the_study_summary(study4):
    client = MlflowClient(study4["uri"])
    parent = study4["parent_first"]
    names = {a.path for a in client.list_artifacts(parent, "study")}
    assert {"study/trials.csv", "study/summary.txt", "study/optimization_history.png",
            "study/param_importances.png", "study/parallel_coordinate.png"} <= names
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and "best_val_auc" in run.data.metrics


def test_the_recipes_median_pruner_prunes_a_bad_trial(synth_data, tmp_path):
    """The pruner the recipes use (smoke/demo/kermany: `pruner = "median"`, startup 2 trials, warm-up 1
    epoch), through the real KerasPruningCallback: two finished trials that scored 0.99 at every epoch, then a
    trial that cannot learn (learning rate 1e-7). Epoch 1 is warm-up and is kept; at epoch 2 its val AUC is
    under the median of the others at that epoch, so it stops there, 1 epoch before its end."""
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp_path}/ckpt", "train.epochs=3"]).with_values(
        {"tune.space": {"train.learning_rate": {"type": "float", "low": 1e-7, "high": 1.1e-7}}})
    assert (cfg.tune.pruner, cfg.tune.startup_trials, cfg.tune.warmup_epochs) == ("median", 2, 1)
    study = tune.open_study("median", resolve_optuna_storage(storage), cfg)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    for _ in range(2):  # two good trials already in the study (no params: the sampler ignores them)
        study.add_trial(optuna.trial.create_trial(value=0.99, intermediate_values={0: 0.99, 1: 0.99, 2: 0.99}))
    study = tune.run_tune(cfg, "median", data_dir=str(synth_data), trials=1, storage=storage, tracking_uri=uri)
    bad = study.trials[-1]
    assert bad.params["train.learning_rate"] < 1.1e-7
    assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == [0, 1]
    assert bad.intermediate_values[1] < 0.99
    run = MlflowClient(uri).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "PRUNED" and run.info.status == "FINISHED"
    assert len(MlflowClient(uri).get_metric_history(run.info.run_id, "val_auc")) == 2  # stopped after epoch 2
    assert MlflowClient(uri, uri).search_model_versions("name='pneumonia-cnn'") == []


def test_the_private_queue_claim_still_behaves(tmp_path):
    """tune.claim_queued_trial holds the one private Optuna call (Study._pop_waiting_trial_id): it must claim
    WAITING trials one at a time, oldest first, mark each RUNNING, and answer None on an empty queue. An Optuna
    that renames or changes it fails here, not in a study."""
    import inspect

    assert list(inspect.signature(optuna.Study._pop_waiting_trial_id).parameters) == ["self"]
    study = optuna.create_study(study_name="q", storage=f"sqlite:///{tmp_path}/o.db")
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({"x": 2.0})
    first, second = tune.claim_queued_trial(study), tune.claim_queued_trial(study)
    trials = study.get_trials(deepcopy=False)
    assert [t._trial_id for t in trials] == [first, second]
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.RUNNING]
    assert tune.claim_queued_trial(study) is None and len(study.get_trials(deepcopy=False)) == 2
    tune.queue_only(study)
    with pytest.raises(tune.QueueEmpty):
        study.ask()


def test_a_launch_records_the_study_promotion_rule(tmp_path):
    """The launch records the experiment file (path, sha256) and its [promote] section on the study and its
    parent run, where `pneumo promote --study` reads it (tests/test_registry.py uses it)."""
    import json

    from pipeline.artifact import tag_keys
    from pipeline.files import sha256_file

    kermany = SMOKE.parent / "kermany.toml"
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cfg = load_config(kermany, [f"train.checkpoint_dir={tmp_path}/ckpt"])
    tune.tracking.setup(uri)
    parent, _ = tune.prepare(cfg, "ruled", storage, uri, trials=1, config_file=kermany)
    recorded = json.loads(MlflowClient(uri).get_run(parent).data.tags[tag_keys.STUDY_RULE])
    assert recorded["experiment_file"] == str(kermany.resolve())
    assert recorded["experiment_sha256"] == sha256_file(kermany)
    assert recorded["promote"]["policy"] == "non_inferiority" and recorded["promote"]["floor_auc"] == 0.9
    study = optuna.load_study(study_name="ruled", storage=storage)
    assert study.user_attrs[tag_keys.STUDY_RULE] == recorded


@pytest.mark.parametrize("then", ["returns", "writes_to_the_trial"])
def test_a_worker_whose_trial_a_peer_failed_as_stale_goes_on(tmp_path, monkeypatch, then):
    """Seen under load: a live worker's heartbeat came late, a peer failed its trial as stale and queued a
    retry, and Optuna's `tell` of the finished trial raised out of `study.optimize`, killing the worker.
    The worker must drop that attempt and carry on with the queue (no training here: a stand-in objective)."""
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp_path}/ckpt"])
    tune.tracking.setup(uri)
    parent, _ = tune.prepare(cfg, "peer", storage, uri, trials=2)

    def make_objective(spec, cfg, state):
        def objective(trial):
            state.last_trial = trial.number
            if trial.number == 0:  # what a peer's StaleTrialSweeper does meanwhile
                trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                if then == "writes_to_the_trial":  # as `started` does: UpdateFinishedTrialError
                    trial.set_user_attr("mlflow_run_id", "run")
            return 0.5

        return objective

    monkeypatch.setattr(tune, "make_objective", make_objective)
    spec = tune.WorkerSpec(study="peer", storage=storage, tracking_uri=uri, data_dir=str(tmp_path),
                           config=tune.config_to_json(cfg), parent_run_id=parent)
    tune.work(spec)
    study = optuna.load_study(study_name="peer", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_running_trial_with_no_heartbeat_at_all_cannot_hang_the_workers(tmp_path, monkeypatch):
    """A retried storage write whose first commit had landed left a RUNNING trial that never had a heartbeat:
    Optuna never marks such a trial stale, and every worker waited on it forever. The worker gives each trial
    it waits on one heartbeat, so the orphan goes stale a grace period later, is failed and retried, and the
    launch ends (a stand-in objective: no training)."""
    import threading

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp_path}/ckpt", "tune.heartbeat_interval=1"])
    tune.tracking.setup(uri)
    parent, _ = tune.prepare(cfg, "orphan", storage, uri, trials=1)
    study = optuna.load_study(study_name="orphan", storage=storage)
    backend = optuna.storages.RDBStorage(storage)
    orphan = backend.create_new_trial(backend.get_study_id_from_name("orphan"),
                                      template_trial=optuna.trial.create_trial(state=TrialState.RUNNING))

    def make_objective(spec, cfg, state):
        def objective(trial):
            state.last_trial = trial.number
            return 0.5

        return objective

    monkeypatch.setattr(tune, "make_objective", make_objective)
    spec = tune.WorkerSpec(study="orphan", storage=storage, tracking_uri=uri, data_dir=str(tmp_path),
                           config=tune.config_to_json(cfg), parent_run_id=parent)
    worker = threading.Thread(target=tune.work, args=(spec,), daemon=True)
    worker.start()
    worker.join(120)  # it hung forever before; a few grace periods (2 s each) now
    assert not worker.is_alive(), "the worker still waits on the heartbeat-less trial"
    states = {t._trial_id: t.state for t in optuna.load_study(study_name="orphan", storage=storage).trials}
    assert states.pop(orphan) == TrialState.FAIL and set(states.values()) == {TrialState.COMPLETE}
    assert len(states) == 2  # the queued trial and the orphan's retry
    del study


def test_unknown_space_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[tune.space]\n"model.filterz" = { type = "int", low = 4, high = 8 }\n')
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "tune", "--config", str(bad), "--study", "x"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "model.filterz" in run.stderr and run.stderr.count("\n") == 1


def _running_trial(study_name: str, storage: str):
    """A trial mid-way, by state rather than by a fixed sleep: its run exists and its first epoch has reported."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    live = [t for t in study.get_trials(states=(TrialState.RUNNING,))
            if "mlflow_run_id" in t.user_attrs and t.intermediate_values]
    return live[0] if live else None


def _kill_group(launcher: subprocess.Popen, log) -> None:
    """The launcher and any worker still alive (one process group): a failed test leaves nothing training."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait(timeout=60)
    log.close()


def test_two_workers_share_a_fresh_store_and_survive_a_sigkill(synth_data, tmp_path):
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(SMOKE), "--study", "crash",
           "--data", str(synth_data), "--trials", "3", "--workers", "2", "--storage", storage,
           "--tracking-uri", uri, "--set", f"train.checkpoint_dir={tmp_path}/ckpt", "--set", "train.epochs=4"]
    # smoke.toml's heartbeat (5 s, stale after 10 s), not 2 s: on a loaded 2-core box a live worker's
    # heartbeat write waited more than 4 s (SQLite lock, GIL) and its trial was failed as stale under it.
    log = open(tmp_path / "launch.log", "w")  # a file, not a pipe: a full pipe would block the workers
    # Its own process group (the workers are in it too), killed whole in `finally`: a failed test leaves no
    # worker training in the background to slow or break the tests after it.
    launcher = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        # Touch neither store before the launcher has created both (concurrent schema creation crashes).
        wait_for(lambda: "trials queued" in (tmp_path / "launch.log").read_text(), 120, "the launch")
        victim = wait_for(lambda: _running_trial("crash", storage), 300, "a trial past its first epoch", launcher,
                          tmp_path / "launch.log")
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=400)
    finally:
        _kill_group(launcher, log)
    out = (tmp_path / "launch.log").read_text()
    assert launcher.returncode == 1, out  # the killed worker fails the launch (the study still completes)
    assert "1 worker(s) crashed (exit codes -9)" in out.strip().splitlines()[-1], out
    study = optuna.load_study(study_name="crash", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(complete) == 3, out  # the launch still reached its target
    assert [t.number for t in failed] == [victim.number]
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1, "the killed trial was retried by the surviving worker"
    runs = _runs(uri, "crash")
    assert len([r for r in runs if r.data.tags.get("kind") == "study"]) == 1  # one parent for both workers
    killed = MlflowClient(uri).get_run(victim.user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED" and killed.data.tags["state"] == "FAIL"  # closed by the sweeper
    assert not [r for r in runs if r.info.status == "RUNNING"]
    versions = MlflowClient(uri, uri).search_model_versions("name='pneumonia-cnn'")
    assert len(versions) == len(study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallow itself
def test_a_stop_swallowed_by_a_finaliser_still_ends_training():
    """A CI run sent SIGINT while SQLAlchemy ran a weakref callback: the handler's StopRequested was raised
    inside it, Python printed "Exception ignored" and dropped it, and the launch ran on and exited 0. The
    caught signal is remembered, and the trial's callback raises it again after the next training batch."""
    import time

    import keras
    import numpy as np

    class SignalInFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in here, and its exception is dropped with the finaliser's

    seen = []

    class SwallowAtBatchOne(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)
            if batch == 1:
                SignalInFinaliser()  # made and collected at once, in the middle of fit

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((64, 4), "float32")
    fit = dict(x=x, y=x[:, :1], batch_size=4, epochs=1, verbose=0)
    with tune.stop_on_signals():  # without the check the stop is lost: fit runs all 16 batches
        model.fit(**fit, callbacks=[SwallowAtBatchOne()])
        assert seen == list(range(16))
        with pytest.raises(tune.StopRequested) as stop:
            tune.raise_if_stopped()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    tune.raise_if_stopped()  # the memory ends with the context: a later launch in this process is not stopped
    seen.clear()
    with tune.stop_on_signals(), pytest.raises(tune.StopRequested):
        model.fit(**fit, callbacks=[SwallowAtBatchOne(), tune.stop_check_callback()])
    assert seen == [0, 1]  # stopped at the batch the swallowed signal arrived in


def _stop_replaced_by_an_error():
    """SIGTERM to this process, and a RuntimeError raised in place of the handler's StopRequested."""
    import time

    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs in here, and raises
    except tune.StopRequested:
        raise RuntimeError("Exiting device scope without proper scope nesting") from None


@pytest.mark.parametrize("where", ["in_training", "after_training"])
def test_a_stop_another_error_replaced_still_queues_the_trial_again(synth_data, tmp_path, monkeypatch, capsys,
                                                                     where):
    """A CI run's SIGTERM landed inside TensorFlow's device scope, whose `__exit__` then raised RuntimeError
    ("Exiting device scope without proper scope nesting") in the stop's place: the trial was failed as an
    error, its run closed FAILED, and no replacement was queued. Here the same happens in a trial run
    in-process: mid-epoch (a callback), or after its run has ended (while the objective reads the result)."""
    import keras

    class StopReplacedAtBatchOne(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                _stop_replaced_by_an_error()

    if where == "in_training":
        monkeypatch.setattr(tune, "stop_check_callback", StopReplacedAtBatchOne)
    else:
        monkeypatch.setattr(tune, "objective_value", lambda result, metric: _stop_replaced_by_an_error())
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    cfg = load_config(SMOKE, [f"train.checkpoint_dir={tmp_path}/ckpt", "train.log_model=false",
                              "train.epochs=1"])
    with pytest.raises(tune.StopRequested) as stop:
        tune.run_tune(cfg, "replaced", data_dir=str(synth_data), trials=1, storage=storage, tracking_uri=uri)
    if where == "in_training":
        assert isinstance(stop.value.__context__, RuntimeError)  # the error that took its place, kept for the log
    assert "trial 0 interrupted; queued again for the next launch" in capsys.readouterr().err
    study = optuna.load_study(study_name="replaced", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].user_attrs["replaces_interrupted_trial"] == 0
    statuses = {r.info.run_name: r.info.status for r in _runs(uri, "replaced")}
    # after training, the trial's run had already ended as it should: FINISHED, its metrics logged
    trial_status = "KILLED" if where == "in_training" else "FINISHED"
    assert statuses == {"study:replaced": "KILLED", "trial-000": trial_status}, statuses


@pytest.mark.parametrize("how", ["sigterm", "sigint_ignored_at_start"])
def test_a_stopped_launch_closes_its_runs_and_the_same_command_resumes(synth_data, tmp_path, how):
    """The signal a scheduler sends on preemption (SIGTERM), or SIGINT to a launcher started with SIGINT
    ignored (`nohup ... &`): the trial in progress is failed and queued again, its run and the parent run are
    closed KILLED, the launcher exits 128 + signal within a bounded time, and the same command run again
    finishes the study with no run left RUNNING (after SIGTERM only: the resume does not depend on the signal,
    and a second run of it costs the suite half a minute)."""
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    # One trial a launch: the resume runs it and the interrupted trial's replacement (with --trials 2, a third).
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(SMOKE), "--study", "stop",
           "--data", str(synth_data), "--trials", "1", "--storage", storage, "--tracking-uri", uri,
           "--set", f"train.checkpoint_dir={tmp_path}/ckpt", "--set", "train.epochs=6"]
    sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    log = open(tmp_path / "launch.log", "w")
    launcher = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=ignore_sigint if how != "sigterm" else None)
    try:
        wait_for(lambda: "trials queued" in (tmp_path / "launch.log").read_text(), 120, "the launch")
        victim = wait_for(lambda: _running_trial("stop", storage), 300, "a trial past its first epoch", launcher,
                          tmp_path / "launch.log")
        launcher.send_signal(sig)
        launcher.wait(timeout=120)  # bounded: a stop must not wait for the study to finish
    finally:
        _kill_group(launcher, log)
    out = (tmp_path / "launch.log").read_text()
    assert launcher.returncode == 128 + sig, out
    assert f"interrupted ({signal.Signals(sig).name})" in out and "queued again for the next launch" in out, out
    study = optuna.load_study(study_name="stop", storage=storage)
    assert study.trials[victim.number].state == TrialState.FAIL
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert any(t.user_attrs.get("replaces_interrupted_trial") == victim.number for t in waiting)
    runs = _runs(uri, "stop")
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    assert {r.info.run_name: r.info.status for r in runs}[f"trial-{victim.number:03d}"] == "KILLED"
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "study"] == ["KILLED"]
    if how != "sigterm":
        return
    # the same command again: the interrupted trial's replacement runs too, and everything ends closed
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name="stop", storage=storage)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert [t.user_attrs.get("replaces_interrupted_trial") for t in finished].count(victim.number) == 1
    assert len(finished) == 2, [(t.number, t.state.name) for t in study.trials]
    assert not [r for r in _runs(uri, "stop") if r.info.status == "RUNNING"]
