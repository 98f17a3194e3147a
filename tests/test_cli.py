"""The `pneumo` command as a user meets it: stores anchored to the project, one-line errors with the right exit
status, flags with one meaning and a documented default, `train --register`, run provenance and system
metrics, the tune launcher's exit status, psycopg 3 only, and a demo that finds its experiment file."""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import no_postgres

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.toml"


def _pneumo(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`pneumo ARGS` in a subprocess, from `cwd`; PYTHONPATH (the worktree) is inherited."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=os.environ if env is None else env)


def _no_stores_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PNEUMO_OPTUNA_STORAGE")}
    return {**env, "PNEUMO_HOME": str(home)}


# --- 2. stores anchored to the project, never created by a read-only command ------------------------------
def test_default_stores_are_anchored_to_the_project_not_the_current_folder(tmp_path, monkeypatch):
    from pipeline import stores

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PNEUMO_OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("PNEUMO_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert stores.resolve_tracking_uri() == f"sqlite:///{REPO}/mlruns/mlflow.db"  # a checkout: its own folder
    assert stores.resolve_optuna_storage() == f"sqlite:///{REPO}/mlruns/optuna.db"
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path / "home"))
    assert stores.resolve_tracking_uri() == f"sqlite:///{tmp_path}/home/mlruns/mlflow.db"
    monkeypatch.delenv("PNEUMO_HOME")
    monkeypatch.setattr(stores, "checkout_root", lambda: None)  # an installed package: the current folder
    assert stores.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    # What the user passes is taken as written (only the PostgreSQL driver is spelled out).
    assert stores.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert stores.resolve_tracking_uri("postgresql://u:pw@db/m") == "postgresql+psycopg://u:pw@db/m"


def test_predict_from_another_folder_creates_no_store_and_names_it(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    dicom = elsewhere / "scan.dcm"  # the store is checked before any file is read
    dicom.write_bytes(b"DICM")
    r = _pneumo("predict", str(dicom), cwd=elsewhere, env=_no_stores_env(home))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"no MLflow store at {home}/mlruns/mlflow.db" in lines[0]
    assert "`pneumo train --register`" in lines[0]  # what fills it
    assert not (elsewhere / "mlruns").exists() and not (home / "mlruns").exists()


def test_a_model_not_found_names_the_store_and_what_fills_it(tmp_path, capsys):
    from mlflow import MlflowClient

    from pipeline.artifact import tracking
    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracking.setup(uri)
    MlflowClient(uri, uri).search_experiments()  # an existing, empty store
    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    assert main(["predict", str(tmp_path / "scan.dcm"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pneumo predict: error: model models:/pneumonia-cnn@champion in store {uri}: ")
    assert err.endswith("(`pneumo train --register`, `pneumo tune` or `pneumo demo` registers models)")


@pytest.mark.parametrize("argv", [
    ["evaluate", "--model", "models:/pneumonia-cnn@champion", "--data", "DATA"],
    ["explain", "FILE"],
    ["promote", "--dry-run"],
    ["promote"],
    ["ui", "--port", "5999"],
])
def test_read_only_commands_never_create_a_store(argv, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_bytes(b"x")
    assert main([a if a not in ("DATA",) else str(tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pneumo {argv[0]}: error: no MLflow store at {tmp_path}/mlruns/mlflow.db: pneumo {argv[0]} only "
                   "reads one; `pneumo train --register`, `pneumo tune` or `pneumo demo` fills it (or pass "
                   "--tracking-uri, or set PNEUMO_HOME to the folder holding mlruns/)")
    assert not (tmp_path / "mlruns").exists()
    # An empty file where the store should be: named as such, and left empty (MLflow would write its tables)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").touch()
    assert main([a if a not in ("DATA",) else str(tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err.startswith(f"pneumo {argv[0]}: error: {tmp_path}/mlruns/mlflow.db is an empty "
                                              f"file: pneumo {argv[0]} only reads one;")
    assert (tmp_path / "mlruns" / "mlflow.db").stat().st_size == 0


def test_dashboard_names_the_missing_optuna_storage(tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna_dashboard")
    from pipeline.cli import main

    monkeypatch.delenv("PNEUMO_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("PNEUMO_HOME", str(tmp_path))
    assert main(["dashboard", "--port", "5998"]) == 2
    err = capsys.readouterr().err
    assert f"no Optuna storage at {tmp_path}/mlruns/optuna.db" in err and "`pneumo tune`" in err
    assert not (tmp_path / "mlruns").exists()


# --- 3. one line, exit 2 for bad input and 1 for a failure at run time -------------------------------------
def test_unreachable_postgresql_is_one_line_exit_1(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # the launcher reads the manifest (load_manifest) before it opens any store: a minimal valid one
    (data / "manifest.json").write_text('{"splits": {}, "digest": "0"}')
    r = _pneumo("tune", "--config", str(SMOKE), "--study", "s", "--data", str(data),
                "--storage", "postgresql://pneumo:s3cret@127.0.0.1:1/x",
                "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("pneumo tune: error: Optuna storage postgresql+psycopg://pneumo:***@127.0.0.1:1/x "
                               "does not answer: connection failed")
    assert "Connection refused" in lines[0] and "s3cret" not in r.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # checked before the MLflow store is made


def test_an_unreachable_postgresql_tracking_store_is_one_line_exit_1(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    code = main(["predict", str(tmp_path / "scan.dcm"), "--tracking-uri", "postgresql://u:s3cret@127.0.0.1:1/m"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err  # at once: not after MLflow's ~100 s of retries
    assert err.startswith("pneumo predict: error: MLflow store postgresql+psycopg://u:***@127.0.0.1:1/m does not "
                          "answer: connection failed") and "s3cret" not in err


def test_a_full_disk_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """ENOSPC while a file is being published (simulated in-process at the fsync every write goes through, as
    delayed allocation reports it on a real full disk: no tmpfs can be mounted here); no temp file is left."""
    from pipeline import files
    from pipeline.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    out = tmp_path / "raw"
    code = main(["synth", "--out", str(out), "--n", "4", "--size", "64", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("pneumo synth: error: [Errno 28] No space left on device") and "\n" not in err
    assert not [f for f in out.rglob("*") if f.is_file()], "nothing half-written is left behind"


def test_bad_flag_values_exit_2_naming_the_flag(capsys):
    from pipeline.cli import main

    for argv, shown in [(["convert", "--image-dir", "x", "--out", "y", "--limit", "0"],
                         "argument --limit: must be >= 1, got 0"),
                        (["predict", "x", "--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
                        (["predict", "x", "--threshold", "1.5"], "argument --threshold: must be in [0.0, 1.0]"),
                        (["tune", "--config", "c", "--study", "s", "--workers", "0"], "argument --workers"),
                        (["ui", "--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
                        # nan compares false with every bound: it once passed, and --threshold nan called
                        # every patient negative with exit 0
                        (["predict", "x", "--threshold", "nan"], "argument --threshold: must be in [0.0, 1.0], got nan"),
                        (["tune", "--config", "c", "--study", "s", "--timeout", "nan"], "argument --timeout: must be"),
                        (["convert", "--image-dir", "x", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
                        (["synth", "--out", "x", "--seed", "-1"], "argument --seed: must be >= 0, got -1")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert shown in capsys.readouterr().err


def test_config_out_of_range_is_one_line_exit_2(capsys):
    from pipeline.cli import main

    assert main(["train", "--config", str(SMOKE), "--set", "data.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pneumo train: error: {SMOKE}: config key 'data.batch_size' must be >= 1, got 0"


@pytest.mark.parametrize("config,override,reason", [
    ("smoke.toml", "augment.rotation=0.6", "config key 'augment.rotation' must be in [0, 0.5), got 0.6"),
    ("smoke.toml", "augment.contrast=1.0", "config key 'augment.contrast' must be in [0, 1), got 1.0"),
    ("seed.toml", "model.residual=true", "model.residual needs model.padding = 'same'"),
    ("smoke.toml", "promote.alpha=1.5", "config key 'promote.alpha' must be in (0, 1), got 1.5"),
    # inf was inside every open-ended range: a learning rate of inf trained to nan and ended in a traceback
    ("smoke.toml", "train.learning_rate=inf", "config key 'train.learning_rate' must be a finite number, got inf"),
    ("smoke.toml", "augment.zoom=nan", "config key 'augment.zoom' must be a finite number, got nan"),
])
def test_a_value_the_model_cannot_take_is_refused_when_the_file_is_read(capsys, config, override, reason):
    """One table of ranges (pipeline/config.py:BOUNDS) for files, overrides and sections built in code: these
    once passed the file check and died later with a traceback from the model or augmentation code."""
    from pipeline.cli import main

    path = SMOKE.parent / config
    assert main(["train", "--config", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumo train: error: {path}: ") and reason in err and "\n" not in err, err


def test_an_experiment_file_that_is_not_utf8_or_not_a_file_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "x"\n# caf\xe9 au lait\n'.encode("latin-1"))
    assert main(["train", "--config", str(latin1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pneumo train: error: {latin1}: not UTF-8 text (byte 16: invalid continuation byte); "
                   "save it as UTF-8")
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"pneumo train: error: {tmp_path}: a folder, not an experiment file"


def test_a_decode_timeout_the_timer_cannot_hold_is_one_line_before_any_work(tmp_path, capsys):
    """nan, inf and 1e20 reached SIGALRM's timer as a traceback (after the plan was written); the library
    refuses them before it touches --out."""
    from PIL import Image

    from pipeline.cli import main

    images = tmp_path / "images"
    for i, label in enumerate(("NORMAL", "PNEUMONIA")):
        (images / label).mkdir(parents=True)
        Image.new("L", (32, 32), 60 * i).save(images / label / f"p{i}.png")
    for value in ("nan", "inf", "1e20", "0", "-1"):
        out = tmp_path / f"out-{value}"
        assert main(["convert", "--image-dir", str(images), "--out", str(out), "--decode-timeout", value,
                     "--patient-regex", "(.*)"]) == 2, value
        err = capsys.readouterr().err.strip()
        assert f"--decode-timeout must be a number of seconds in (0, 86400], got {float(value)!r}" in err, err
        assert "\n" not in err and not out.exists()


# --- 6. flags: one meaning, a documented default, --version, answers before TensorFlow ----------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from pipeline.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_has_help_that_shows_its_default():
    for name, p in _subparsers().items():
        text = p.format_help()
        assert "default: None" not in text, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"pneumo {name} {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, []) and action.option_strings:
                shown = p._get_formatter()._expand_help(action)
                assert "default" in shown and str(action.default) in shown, \
                    f"pneumo {name} {action.option_strings[0]}: help does not show default {action.default!r}"


def test_model_is_a_uri_everywhere_and_promote_takes_a_model_name(capsys):
    from pipeline.cli import build_parser

    for name, p in _subparsers().items():
        for action in p._actions:
            if "--model" in action.option_strings and action.help != argparse.SUPPRESS:
                assert "URI" in action.help, f"pneumo {name} --model is not a model URI"
    args = build_parser().parse_args(["promote", "--model-name", "chest"])
    assert args.model_name == "chest"
    assert build_parser().parse_args(["promote", "--model", "old"]).model_name == "old"  # deprecated alias
    assert "--model " not in _subparsers()["promote"].format_help()


def test_quiet_wherever_there_is_a_progress_bar():
    for name in ("synth", "convert", "predict", "demo"):
        assert any("--quiet" in a.option_strings for a in _subparsers()[name]._actions), name


def test_version(capsys):
    from pipeline import __version__
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pneumo {__version__}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}


def test_train_with_a_missing_config_answers_before_tensorflow_loads(tmp_path):
    code = ("import sys; from pipeline.cli import main; rc = main(['train', '--config', 'missing.toml']); "
            "print(rc, 'tensorflow' in sys.modules, 'mlflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert r.stderr.strip() == "pneumo train: error: missing.toml: experiment file not found"


# --- 1 + 7. train --register, provenance tags, readable names, system metrics -----------------------------
def test_train_registers_and_tags_its_run(synth_data, tracking_uri, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from pipeline.cli import main

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a short run still gets samples
    assert main(["train", "--config", str(SMOKE), "--data", str(synth_data), "--tracking-uri", tracking_uri,
                 "--set", f"train.checkpoint_dir={tmp_path}/ckpt", "--register", "cli-cnn"]) == 0
    out = capsys.readouterr().out
    assert "registered cli-cnn version 1" in out

    client = MlflowClient(tracking_uri, tracking_uri)
    (mv,) = client.search_model_versions("name='cli-cnn'")
    run = client.get_run(mv.run_id)
    assert str(mv.version) == "1" and mv.status == "READY"
    # Readable name: the experiment file's stem and the start time.
    assert run.info.run_name.startswith("smoke-20") and len(run.info.run_name) == len("smoke-20260101-120000")
    # Provenance: the checkout's commit and whether tracked files differ from it.
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head.strip()
    assert run.data.tags["git_dirty"] == ("true" if dirty else "false")
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow's own system metrics, what the UI's System metrics tab shows.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 1 and all(0 <= m.value <= 100 * (os.cpu_count() or 1) for m in cpu)
    assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")

    # promote now finds what train registered; with no model of the name, the error names the commands.
    assert main(["promote", "--model-name", "other", "--tracking-uri", tracking_uri, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no registered model 'other' in store" in err and "`pneumo train --register`" in err


def test_register_needs_a_logged_model(capsys):
    from pipeline.cli import main

    assert main(["train", "--config", str(SMOKE), "--set", "train.log_model=false", "--register"]) == 2
    assert "--register needs train.log_model = true" in capsys.readouterr().err


# --- 4. tune fails loudly when a worker crashed or every trial failed --------------------------------------
@pytest.fixture()
def tune_args(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"digest": "x", "splits": {}}')
    return ["tune", "--config", str(SMOKE), "--data", str(data), "--trials", "2",
            "--storage", f"sqlite:///{tmp_path}/mlruns/optuna.db", "--tracking-uri",
            f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--set", "tune.max_retries=0",
            "--set", f"train.checkpoint_dir={tmp_path}/ckpt"]


def test_tune_exits_1_when_every_trial_failed(tune_args, monkeypatch, capsys):
    from pipeline.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("simulated trial failure")

    monkeypatch.setattr("pipeline.study.train.train", broken)
    assert main([*tune_args, "--study", "all-fail"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out  # the summary is still printed
    assert captured.err.strip().splitlines()[-1] == \
        "pneumo tune: error: study all-fail: every trial of this launch failed (2 FAIL; see each run's `error` tag)"


def test_tune_exits_1_when_a_worker_crashed(tune_args, monkeypatch, capsys):
    import pipeline.cli as cli

    loaded = []
    monkeypatch.setattr(cli, "_load_tensorflow", lambda: loaded.append(True))
    monkeypatch.setattr(sys, "executable", "/bin/false")  # each worker process exits 1 at once
    assert cli.main([*tune_args, "--study", "crash", "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "pneumo tune: error: study crash: 2 worker(s) crashed (exit codes 1, 1)"
    assert not loaded  # the whole launch, its summary included, ran without TensorFlow in the launcher


@pytest.mark.parametrize("flags, workers", [([], 1), (["--workers", "1"], 1), (["--workers", "2"], 2)])
def test_only_a_launch_that_trains_in_process_loads_tensorflow(tune_args, monkeypatch, flags, workers):
    """One worker: the trials run in the launcher, which loads TensorFlow (quietly) first. Several: each worker
    process loads its own, and the launcher, which only coordinates, does not."""
    import pipeline.cli as cli
    import pipeline.study.tune as tune

    loaded, launched = [], []
    monkeypatch.setattr(cli, "_load_tensorflow", lambda: loaded.append(True))
    monkeypatch.setattr(tune, "run_tune", lambda cfg, study, **kw: launched.append(kw["workers"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the default is one worker
    assert cli.main([*tune_args, "--study", "s", *flags]) == 0
    assert launched == [workers] and loaded == [True] * (workers == 1)
    assert os.environ["KERAS_BACKEND"] == "tensorflow"  # the workers' backend, from the config, either way


def test_a_launch_with_a_completed_trial_is_not_a_failure():
    import datetime

    import optuna

    from pipeline.study.tune import launch_problem

    study = optuna.create_study(direction="maximize")
    since = datetime.datetime.now()
    study.optimize(lambda t: 1.0, n_trials=1)
    study.optimize(lambda t: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))
    assert launch_problem(study, since, []) is None
    assert launch_problem(study, datetime.datetime.now(), []) is None  # nothing ran: no claim either way
    assert launch_problem(study, since, [-9]) == "1 worker(s) crashed (exit codes -9)"


# --- 8. one PostgreSQL driver ------------------------------------------------------------------------------
def test_psycopg3_is_the_one_postgres_driver():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = " ".join(pyproject["dependencies"])
    assert "psycopg" not in deps  # PostgreSQL is opt-in
    assert pyproject["optional-dependencies"]["postgres"] == ["psycopg[binary]>=3.2"]
    composed = [set(m.group(1).split(",")) for d in pyproject["optional-dependencies"]["dev"]
                if (m := re.fullmatch(r"pneumo\[([a-z,-]+)\]", d))]
    assert any("postgres" in extras for extras in composed)  # the dev extra composes it, not repeats it
    assert "psycopg2" not in (REPO / "pyproject.toml").read_text()


def test_postgres_code_paths_need_only_psycopg3(monkeypatch):
    """Optuna storage and the promotion advisory lock on the machine's PostgreSQL with psycopg2 unimportable."""
    psycopg = pytest.importorskip("psycopg")
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError as e:
        no_postgres(f"no PostgreSQL on 127.0.0.1:5432 ({e})")
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # `import psycopg2` now fails
    import sqlalchemy as sa

    from pipeline.promote.promotion import promotion_lock
    from pipeline.stores import resolve_optuna_storage

    engine = sa.create_engine(resolve_optuna_storage(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
    with promotion_lock(url, "psycopg3-only", kind="database", timeout=30):
        pass


# --- 9. the demo finds its experiment file outside a checkout -----------------------------------------------
def test_demo_finds_its_experiment_file_from_an_empty_folder(tmp_path, monkeypatch):
    from pipeline import demo
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    assert demo.experiment_file().samefile(REPO / "experiments" / "demo.toml")
    # An installed wheel: no experiments/ beside the package, the packaged copy inside it.
    site = tmp_path / "site-packages"
    (site / "pipeline" / "experiments").mkdir(parents=True)
    (site / "pipeline" / "experiments" / "demo.toml").write_text((REPO / "experiments" / "demo.toml").read_text())
    monkeypatch.setattr(demo, "PACKAGE", site / "pipeline")
    found = demo.experiment_file()
    assert found == site / "pipeline" / "experiments" / "demo.toml" and load_config(found).name == "demo"
    (found).unlink()
    from pipeline.errors import PneumoError

    with pytest.raises(PneumoError, match="demo.toml is missing"):
        demo.experiment_file()


def test_the_wheel_ships_the_experiment_files():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pipeline.experiments" in setuptools["packages"]
    assert setuptools["package-dir"]["pipeline.experiments"] == "experiments"
    assert setuptools["package-data"]["pipeline.experiments"] == ["*.toml"]


def test_commands_start_without_tensorflows_start_up_log(tmp_path):
    """`pneumo doctor` loads TensorFlow: its absl start-up lines (oneDNN, CUDA probes) stay off stderr unless
    PNEUMO_VERBOSE=1 asks for them (on a host where TensorFlow logs nothing there, both runs are clean)."""
    args = ("doctor", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", f"sqlite:///{tmp_path}/o.db")
    quiet = _pneumo(*args, cwd=tmp_path)
    assert quiet.returncode == 0 and "precision     auto ->" in quiet.stdout
    assert "absl::InitializeLog" not in quiet.stderr and "oneDNN" not in quiet.stderr, quiet.stderr
    verbose = _pneumo(*args, cwd=tmp_path, env={**os.environ, "PNEUMO_VERBOSE": "1"})
    assert verbose.returncode == 0
    # Asked for, the held-back lines are there (this machine's CUDA-build wheel logs them on every start; the
    # check above only means something where it does, which this line confirms).
    if sys.platform == "linux" and "absl::InitializeLog" not in verbose.stderr:
        pytest.skip("this TensorFlow logs nothing at start-up: nothing to hold back")
    assert "absl::InitializeLog" in verbose.stderr
