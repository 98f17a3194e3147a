"""Scale-out throughput: one study shared by K workers on PostgreSQL, logging to an MLflow tracking server,
against the seed-style way (one process running trials one after another on local files).

Both arms run the real command, `python -m pipeline.cli tune` on the smoke config (64 px synthetic data,
pruner off so that every trial does the same work):
- scale-out: `--workers K --storage postgresql://... --tracking-uri http://...` with a PostgreSQL database for
  Optuna and an `mlflow server --workers 1` over a second PostgreSQL database (served artifacts in a folder);
  optionally `--kill N` workers are SIGKILLed mid-trial, spread over the run, to measure recovery at scale;
- baseline: `--workers 1` on the embedded SQLite stores.
Prints trials/hour, wall and CPU time, trial outcomes, failures survived, the peak PostgreSQL connections and
the MLflow server's memory, and ends with `trials_per_hour=<x> target=<y>`, where y is the baseline's rate
measured in the same run: K workers sharing network stores must at least keep up with one worker on local files
on the same cores (on a host with G GPUs and `--workers G` the scale-out should approach G times it; here all
workers share 2 CPU cores, so the gain comes only from overlapping start-up, logging and evaluation).

    .venv/bin/python benchmarks/scale_out.py       # the README's run: 4 workers x 40 trials, 2 SIGKILLed; 10-20 min
    .venv/bin/python benchmarks/scale_out.py --workers 3 --trials 12 --kill 0   # a quicker look, ~7 min

Needs PostgreSQL: $PNEUMO_BENCH_POSTGRES (default postgresql://127.0.0.1:5432; user postgres, else root).
Its databases get unique names and are dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

SMOKE = REPO / "experiments" / "smoke.toml"
BAD_LOG = re.compile(r"\b(dead)?lock(ed|s)?\b|LockNotAvailable|database is locked|Traceback", re.IGNORECASE)


# --- PostgreSQL databases ----------------------------------------------------------------------------------
class Databases:
    """Creates uniquely named databases on the server and drops them all on exit."""

    def __init__(self, server_url: str):
        import psycopg  # psycopg 3, the project's one PostgreSQL driver
        from sqlalchemy.engine import make_url

        url = make_url(server_url)
        errors = []
        for user in [url.username] if url.username else ["postgres", "root"]:
            try:
                self.conn = psycopg.connect(host=url.host or "127.0.0.1", port=url.port or 5432, user=user,
                                            password=url.password, dbname="postgres", connect_timeout=5)
                break
            except psycopg.OperationalError as e:
                errors.append(f"{user}: {' '.join(str(e).split())}")
        else:
            raise SystemExit(f"PostgreSQL not reachable at {server_url}: {'; '.join(errors)}")
        self.conn.autocommit = True
        self.server = url.set(username=user, database=None)  # URLs as a user writes them: postgresql://...
        self.names: list[str] = []

    def make(self, tag: str) -> str:
        name = f"pneumo_bench_{tag}_{uuid.uuid4().hex[:8]}"
        with self.conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return self.server.set(database=name).render_as_string(hide_password=False)

    def size_mb(self, name_part: str) -> float:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(%s)", ([n for n in self.names if name_part in n][0],))
            return int(cur.fetchone()[0]) / 2**20

    def connections(self, name_part: str) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)",
                        ([n for n in self.names if name_part in n],))
            return int(cur.fetchone()[0])

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc) -> None:
        with self.conn.cursor() as cur:
            for name in self.names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.conn.close()


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the MLflow server and its children)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/<pid>/stat: the process group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


class Sampler(threading.Thread):
    """Every second: the peak of `probe()` for each name."""

    def __init__(self, **probes):
        super().__init__(daemon=True)
        self.probes, self.peaks, self.done = probes, dict.fromkeys(probes, 0.0), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for name, probe in self.probes.items():
                try:
                    self.peaks[name] = max(self.peaks[name], float(probe()))
                except Exception:
                    pass


# --- one launch --------------------------------------------------------------------------------------------
def launch(tmp: Path, study: str, data: Path, trials: int, workers: int, storage: str, tracking_uri: str,
           log: Path, kill: int = 0) -> dict:
    import optuna
    from optuna.trial import TrialState

    cmd = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(SMOKE), "--study", study,
           "--data", str(data), "--trials", str(trials), "--workers", str(workers), "--storage", storage,
           "--tracking-uri", tracking_uri, "--set", f"train.checkpoint_dir={tmp}/ckpt-{study}",
           # No pruning: every trial does the same work (2 epochs, evaluation, model logging), so trials/hour
           # compares the arms' infrastructure, not how many trials each arm's pruner happened to stop early
           # (one sequential worker prunes more: it sees every earlier result).
           "--set", "tune.pruner=none"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    killed: list[int] = []
    poll = None  # one storage (one pooled connection) for the kill loop, made once the launcher created the study
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        # Kills are spread over the run: the k-th once k/(kill+1) of the trials have finished.
        while kill and proc.poll() is None and len(killed) < kill:
            time.sleep(1.0)
            if "trials queued" not in log.read_text():
                continue  # never touch the study before the launcher has created it
            poll = poll or optuna.storages.RDBStorage(storage)
            s = optuna.load_study(study_name=study, storage=poll)
            done = len(s.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
            if done < (len(killed) + 1) * trials / (kill + 1):
                continue
            live = [t for t in s.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
            if live:
                time.sleep(1.0)  # mid-trial: training has started
                victim = s.get_trials(deepcopy=False)[live[0].number]
                if victim.state != TrialState.RUNNING:
                    continue  # it finished meanwhile: its worker is between trials, pick another
                os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
                killed.append(victim.number)
        if poll is not None:
            poll.engine.dispose()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = optuna.load_study(study_name=study, storage=storage)
    states = {st.name: len(s.get_trials(states=(st,))) for st in TrialState}
    text = log.read_text(errors="replace")
    finished = states["COMPLETE"] + states["PRUNED"]
    return {"exit": proc.returncode, "wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime)
            - (before.ru_utime + before.ru_stime), "states": states, "finished": finished,
            "trials_per_hour": finished * 3600 / wall, "killed": killed,
            "retried": sorted(t.system_attrs["failed_trial"] for t in s.trials if "failed_trial" in t.system_attrs),
            "failed": sorted(t.number for t in s.trials if t.state == TrialState.FAIL),
            "bad_lines": [ln for ln in text.splitlines() if BAD_LOG.search(ln)],
            "http_retries": text.count("MLflow client: Retrying")}


def open_runs(tracking_uri: str, study: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study)
    return sum(r.info.status == "RUNNING" for r in client.search_runs([exp.experiment_id], max_results=5000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults = the run README.md reports (its "Measured on this machine" table): keep the two in step.
    parser.add_argument("--workers", type=int, default=4, help="workers of the scale-out arm (default 4)")
    parser.add_argument("--trials", type=int, default=40, help="trials of the scale-out arm (default 40)")
    parser.add_argument("--kill", type=int, default=2,
                        help="workers to SIGKILL mid-trial during the scale-out arm (default 2)")
    parser.add_argument("--baseline-trials", type=int, default=None,
                        help="trials of the one-worker SQLite arm (default: --trials, so both pay start-up alike)")
    parser.add_argument("--n", type=int, default=240, help="synthetic patients")
    args = parser.parse_args()
    args.baseline_trials = args.baseline_trials or args.trials

    from pipeline.data.convert import convert_rsna
    from pipeline.data.synth import make_synthetic_dataset
    from pipeline.ui import MlflowServer

    server_url = os.environ.get("PNEUMO_BENCH_POSTGRES", "postgresql://127.0.0.1:5432")
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp, Databases(server_url) as dbs:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "raw", n=args.n, size=128, seed=0, workers=2, progress=False)
        convert_rsna(tmp / "raw" / "stage_2_train_images", tmp / "raw" / "stage_2_train_labels.csv", tmp / "data",
                     image_size=64, workers=2, progress=False)

        base_uri = f"sqlite:///{tmp}/mlflow.db"
        base = launch(tmp, "baseline", tmp / "data", args.baseline_trials, 1, f"sqlite:///{tmp}/optuna.db",
                      base_uri, tmp / "baseline.log")
        base["open_runs"] = open_runs(base_uri, "baseline")

        storage, backend = dbs.make("optuna"), dbs.make("mlflow")
        with MlflowServer(backend, tmp / "artifacts", log_file=tmp / "server.log") as server:
            sampler = Sampler(optuna_connections=lambda: dbs.connections("optuna"),
                              mlflow_connections=lambda: dbs.connections("mlflow"),
                              server_rss_mb=lambda: group_rss_mb(server.proc.pid))
            sampler.start()
            scale = launch(tmp, "scale", tmp / "data", args.trials, args.workers, storage, server.url,
                           tmp / "scale.log", kill=args.kill)
            sampler.done.set()
            scale["open_runs"] = open_runs(server.url, "scale")
            scale.update(sampler.peaks)
            server_bad = [ln for ln in (tmp / "server.log").read_text(errors="replace").splitlines()
                          if BAD_LOG.search(ln)]
        artifacts_mb = sum(f.stat().st_size for f in (tmp / "artifacts").rglob("*") if f.is_file()) / 2**20
        n_runs = max(1, sum(scale["states"].values()))
        arms = [("1 worker, SQLite (seed-style)", base), (f"{args.workers} workers, PostgreSQL + server", scale)]

        print(f"\n{'arm':<34} {'trials':>6} {'pruned':>6} {'failed':>6} {'wall s':>7} {'cpu s':>7} {'trials/h':>8} "
              f"{'open runs':>9}")
        for name, a in arms:
            print(f"{name:<34} {a['finished']:>6} {a['states']['PRUNED']:>6} {a['states']['FAIL']:>6} "
                  f"{a['wall_s']:>7.1f} {a['cpu_s']:>7.1f} {a['trials_per_hour']:>8.1f} {a['open_runs']:>9}")
        print(f"scale-out: {len(scale['killed'])} worker(s) SIGKILLed mid-trial (trials {scale['killed']}); "
              f"failed trials {scale['failed']}, retried by other workers {scale['retried']}; "
              f"launch exit {scale['exit']}; "
              f"{scale['http_retries']} MLflow HTTP retries; peak PostgreSQL connections: "
              f"{scale['optuna_connections']:.0f} to the Optuna database (launcher + workers"
              f"{' + this script' if args.kill else ''}), {scale['mlflow_connections']:.0f} to the MLflow "
              f"database (the server); MLflow server {scale['server_rss_mb']:.0f} MB resident")
        print(f"storage per trial: {artifacts_mb / n_runs:.2f} MB of artifacts, "
              f"{dbs.size_mb('mlflow') / n_runs:.2f} MB in the MLflow database "
              f"({dbs.size_mb('mlflow'):.0f} MB in all), Optuna database {dbs.size_mb('optuna'):.0f} MB in all")
        problems = scale["bad_lines"] + base["bad_lines"] + server_bad
        print(f"lock/deadlock/traceback lines in the logs: {len(problems)}")
        for line in problems[:10]:
            print("  " + line[:200])
        checks = {f"{args.trials} finished trials": scale["finished"] == args.trials,
                  "no run left RUNNING": scale["open_runs"] == 0,
                  "every killed trial failed and was retried": scale["failed"] == scale["retried"] == scale["killed"],
                  "clean logs": not problems}
        print("checks: " + ", ".join(f"{name}: {'yes' if good else 'NO'}" for name, good in checks.items())
              + f"; speed-up over one worker {scale['trials_per_hour'] / base['trials_per_hour']:.2f}x")
        print(f"trials_per_hour={scale['trials_per_hour']:.1f} target={base['trials_per_hour']:.1f}")


if __name__ == "__main__":
    main()
