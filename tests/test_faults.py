"""Runs and sweeps that are resumed, shared, killed, diverging or badly configured: nothing is lost, nothing is
left RUNNING, and what went wrong is said in one line. Processes are started, killed and raced as a user or a
scheduler would; the stores are new sqlite files under tmp_path."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cfae.checks import ConfigError
from cfae.stores import store_lock
from cfae.tracking import close_dead_runs, mlflow_client

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "data.batch_size=32", "hidden=16"]
LONG = ["trainer.max_epochs=400", "patience=400", "trainer.enable_progress_bar=false", "data.batch_size=8",
        "hidden=16"]  # a run that goes on until it is stopped


def environment(data_root: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return {**env, "CFAE_DATA_DIR": str(data_root), **extra}


def start(script: str, cwd: Path, data_root: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *(["-m"] if script == "sweep.py" else []), *args],
                            cwd=cwd, env=environment(data_root, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(script: str, cwd: Path, data_root: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    process = start(script, cwd, data_root, *args, **extra)
    output = process.communicate(timeout=600)[0]
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def wait_for(condition, timeout_s: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def mlflow_runs(cwd: Path) -> list:
    url = f"sqlite:///{cwd}/mlruns/mlflow.db"
    with store_lock(url):  # as cfae does: not while a process creates the store
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("cfae")
        return client.search_runs([experiment.experiment_id]) if experiment else []


def trials(cwd: Path, name: str) -> list:
    url = f"sqlite:///{cwd}/mlruns/optuna.db"
    if not (cwd / "mlruns" / "optuna.db").is_file():
        return []
    with store_lock(url):  # as the sweeps do: not while one of them creates the database
        try:
            return optuna.load_study(study_name=name, storage=url).trials
        except KeyError:  # the study is not created yet
            return []


def last_checkpoints(cwd: Path) -> list[Path]:
    return list(cwd.glob("outputs/*/*/checkpoints/last.ckpt"))


def compose(data_root: Path, tmp_path: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[
            f"data.root={data_root}", "data.download=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "data.batch_size=32", f"output_dir={tmp_path / 'out'}",
            f"logger.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", *overrides])


# --- sweeps: resumed, shared, killed -----------------------------------------------------------------------
TPE = [*FAST, "model=autorec", "optimizer.lr=interval(0.001,0.05)", "hydra.sweeper.study_name=tpe"]


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_finishes_when_run_again_with_new_points(data_root, tmp_path):
    args = [*TPE, "hydra.sweeper.n_trials=4", "trainer.max_epochs=6", "hydra.sweeper.pruner=null"]
    sweep = start("sweep.py", tmp_path, data_root, *args)
    wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in trials(tmp_path, "tpe")) == 2
             and any(r.data.tags.get("optuna.trial") == "2" for r in mlflow_runs(tmp_path)),
             what="the third trial's MLflow run")
    sweep.kill()
    sweep.wait()
    killed = next(t.number for t in trials(tmp_path, "tpe") if t.state == TrialState.RUNNING)

    again = run("sweep.py", tmp_path, data_root, *args)
    assert again.returncode == 0, again.stdout[-3000:]
    done = trials(tmp_path, "tpe")
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and done[killed].state == TrialState.FAIL
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == done[killed].params  # its point, tried again
    assert len({t.params["optimizer.lr"] for t in complete}) == 4  # no point replayed by a re-seeded sampler
    runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (dead,) = [r for r in runs if r.data.tags.get("optuna.trial") == str(killed)]
    assert dead.info.status == "FAILED" and "ended without closing it" in dead.data.tags["error"]
    parents = [r for r in runs if r.info.run_name == "sweep-tpe"]
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]


@pytest.mark.slow
def test_two_workers_on_one_new_sqlite_study_share_its_budget_without_repeating_a_point(data_root, tmp_path):
    workers = [start("sweep.py", tmp_path, data_root, *TPE, "hydra.sweeper.n_trials=4") for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    done = trials(tmp_path, "tpe")
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert len({t.params["optimizer.lr"] for t in done}) == 4
    children = [r for r in mlflow_runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)


def test_a_resumed_sampler_draws_new_points_reproducibly():
    from cfae.sweep import PerTrialSeeds

    def proposals(seed, n_before):
        study = optuna.create_study(sampler=PerTrialSeeds(lambda s: optuna.samplers.TPESampler(seed=s), seed))
        for _ in range(n_before + 3):
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            study.tell(trial, trial.params["x"])
        return [t.params["x"] for t in study.trials]

    first, resumed = proposals(0, 0), proposals(0, 3)
    assert first == proposals(0, 0)  # the same seed: the same sweep
    assert len(set(resumed)) == 6  # trials 3-5 do not replay trials 0-2
    assert first != proposals(1, 0)


@pytest.mark.slow
def test_sigterm_to_a_sweep_fails_the_running_trial_for_a_retry_and_closes_its_runs_killed(data_root, tmp_path):
    args = [*TPE, "hydra.sweeper.n_trials=3", *LONG[:2]]
    sweep = start("sweep.py", tmp_path, data_root, *args)
    wait_for(lambda: any(t.state == TrialState.RUNNING for t in trials(tmp_path, "tpe"))
             and last_checkpoints_of_sweep(tmp_path), what="the first trial's first epoch")
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 128 + signal.SIGTERM, output[-3000:]
    (stopped, retry) = trials(tmp_path, "tpe")
    assert stopped.state == TrialState.FAIL and "error" not in stopped.user_attrs
    assert retry.state == TrialState.WAITING and retry.params == stopped.params
    closed = {r.info.run_name: (r.info.status, r.data.tags.get("error")) for r in mlflow_runs(tmp_path)}
    assert closed == {"sweep-tpe": ("KILLED", "interrupted (SIGTERM)"),
                      "trial0-autorec-ml1m-item-fold0": ("KILLED", "interrupted (SIGTERM)")}


def last_checkpoints_of_sweep(cwd: Path) -> list[Path]:
    return list(cwd.glob("multirun/*/*/*/checkpoints/last.ckpt"))


# --- runs: together, killed, interrupted, diverging ----------------------------------------------------------
@pytest.mark.slow
def test_two_runs_started_together_on_a_new_store_both_finish_in_folders_of_their_own(data_root, tmp_path):
    runs = [start("train.py", tmp_path, data_root, *FAST, f"seed={seed}") for seed in (1, 2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    folders = sorted(p.parent for p in tmp_path.glob("outputs/*/*/config.yaml"))
    assert len(folders) == 2
    for folder in folders:
        assert [p.name for p in (folder / "checkpoints").glob("*.ckpt")] in (["best.ckpt", "last.ckpt"],
                                                                            ["last.ckpt", "best.ckpt"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    seeds = []
    for r in mlflow_runs(tmp_path):
        artifact = client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_path))
        logged = yaml.safe_load(Path(artifact).read_text())
        assert str(logged["seed"]) == r.data.params["seed"]
        seeds.append(logged["seed"])
    assert sorted(seeds) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_the_state_ends_the_run_killed_and_exits_non_zero(data_root, tmp_path, signum):
    process = start("train.py", tmp_path, data_root, *LONG)
    wait_for(lambda: last_checkpoints(tmp_path), what="the first epoch's last.ckpt")  # written after epoch 1
    time.sleep(1)
    written = last_checkpoints(tmp_path)[0].stat().st_mtime_ns
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "KILLED" and r.data.tags["error"] == f"interrupted ({signum.name})"
    assert last_checkpoints(tmp_path)[0].stat().st_mtime_ns > written  # saved again on the way out


def study_runs(cwd: Path) -> dict[str, list]:
    """The study's MLflow runs by row, oldest first."""
    by_row: dict[str, list] = {}
    for r in sorted(mlflow_runs(cwd), key=lambda r: r.info.start_time):
        by_row.setdefault(r.data.tags["cfae.key"].split("/")[0], []).append(r)
    return by_row


def start_study(cwd: Path, data_root: Path, log: Path, *args: str) -> subprocess.Popen:
    (cwd / "plan.yaml").write_text("name: pair\nfolds: [0]\nrows: [autorec, svd, denoising]\n"
                                   "protocols: {'80-20': {overrides: []}}\nfigure_folds: [0]\n"
                                   "figures: {fig3_latent_size: {experiment: autorec, knob: hidden, "
                                   "values: [8, 9, 10, 11, 12, 13]}}\n")
    with log.open("a") as out:  # read while it runs: each step waits for what the study says it did
        return subprocess.Popen([sys.executable, "-m", "cfae.study", "--config", "plan.yaml", "--output-dir", "out",
                                 *args, "--", *LONG], cwd=cwd, env=environment(data_root), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def epoch_done(cwd: Path, row: str) -> bool:
    return bool(list(cwd.glob(f"out/pair/{row}/*/*/checkpoints/last.ckpt")))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_study_on_a_parallel_launcher_survives_a_killed_worker_and_stops_every_run_on_sigterm(
        launcher, data_root, tmp_path):
    from cfae.processes import has_died

    log = tmp_path / "study.log"
    process = start_study(tmp_path, data_root, log, "--jobs", "2", f"hydra/launcher={launcher}")

    def until(condition, what: str) -> None:  # or the study ended: then its log says why
        wait_for(lambda: process.poll() is not None or condition(), what=what)
        assert process.poll() is None, f"the study ended before {what}:\n{log.read_text()[-3000:]}"

    # joblib: autorec and svd start; svd ends at once and denoising follows. submitit: a batch of autorec, svd.
    second = "denoising" if launcher == "joblib" else "svd"
    until(lambda: epoch_done(tmp_path, "autorec") and (epoch_done(tmp_path, "denoising") if launcher == "joblib"
                                                       else "svd" in study_runs(tmp_path)
                                                       and study_runs(tmp_path)["svd"][0].info.status == "FINISHED"),
          f"autorec's first epoch and {second}")
    os.kill(int(study_runs(tmp_path)["autorec"][0].data.tags["cfae.process"].split(":")[1]), signal.SIGKILL)
    until(lambda: "autorec/80-20/fold0: its process died; it is tried again" in log.read_text(), "the death said")
    # the next runs going on: joblib's first two figure runs; submitit's next batch, denoising and a figure run
    until(lambda: epoch_done(tmp_path, "fig3_latent_size") and (launcher == "joblib" or
                                                                epoch_done(tmp_path, "denoising")),
          "the next runs going on")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    said, runs = log.read_text(), study_runs(tmp_path)
    killed = runs["autorec"][0]
    assert killed.info.status == "FAILED", said[-3000:]
    assert killed.data.tags["error"].startswith(f"its process ({killed.data.tags['cfae.process']}) ended without")
    assert runs["svd"][0].info.status == "FINISHED"
    if launcher == "joblib":  # loky's pool dies with any of its workers: the run beside it died too, is tried again
        assert runs["denoising"][0].info.status == "FAILED"
        assert "denoising/80-20/fold0: its process died; it is tried again" in said
    else:  # a job of its own: its neighbour went on
        assert [r.info.status for r in runs["denoising"]] == ["KILLED"]
    stopped = [r for r in runs["fig3_latent_size"] if r.info.status != "FINISHED"]
    assert stopped and all(r.info.status == "KILLED" and r.data.tags["error"] == "interrupted (SIGTERM)"
                           for r in stopped), said[-3000:]
    assert len(runs["fig3_latent_size"]) < 6  # none started once it was stopping
    assert all(has_died(r.data.tags["cfae.process"]) for rows in runs.values() for r in rows)  # no worker left
    assert (tmp_path / "out" / "pair" / ".stop").is_file()  # left for jobs that start later: they run nothing


@pytest.mark.slow
def test_a_study_on_the_basic_launcher_killed_resumes_and_stops_its_run_on_sigterm(data_root, tmp_path):
    log = tmp_path / "study.log"
    process = start_study(tmp_path, data_root, log)  # one at a time, in the study's own process
    wait_for(lambda: process.poll() is not None or epoch_done(tmp_path, "autorec"), what="autorec's first epoch")
    process.kill()  # the study and its run with it, as the OOM killer would
    process.wait()
    for checkpoint in tmp_path.glob("out/pair/autorec/*/*/checkpoints/last.ckpt"):
        checkpoint.unlink()  # to see the next try's first epoch
    process = start_study(tmp_path, data_root, log)
    wait_for(lambda: process.poll() is not None or len(study_runs(tmp_path).get("autorec", [])) == 2,
             what="autorec run again")
    wait_for(lambda: process.poll() is not None or epoch_done(tmp_path, "autorec"), what="its first epoch")
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    runs = study_runs(tmp_path)
    assert [r.info.status for r in runs["autorec"]] == ["FAILED", "KILLED"], log.read_text()[-3000:]
    assert "ended without closing it" in runs["autorec"][0].data.tags["error"]
    assert runs["autorec"][1].data.tags["error"] == "interrupted (SIGTERM)"
    assert set(runs) == {"autorec"}  # nothing after it started


@pytest.mark.slow
def test_a_run_killed_in_its_first_minute_can_resume_and_is_marked_failed_by_the_next_touch(data_root, tmp_path):
    process = start("train.py", tmp_path, data_root, *LONG)
    wait_for(lambda: last_checkpoints(tmp_path), what="the first epoch's last.ckpt")
    process.kill()
    process.wait()
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "RUNNING"  # nobody could close it
    close_dead_runs(*mlflow_client(f"sqlite:///{tmp_path}/mlruns/mlflow.db"))  # what train, sweep and study do first
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "FAILED" and "ended without closing it" in r.data.tags["error"]
    resumed = run("train.py", tmp_path, data_root, *LONG, "trainer.max_epochs=3",
                  f"resume={last_checkpoints(tmp_path)[0]}")
    assert resumed.returncode == 0, resumed.stdout[-3000:]


@pytest.mark.slow
def test_adam_at_lr_1e6_fails_the_run_naming_divergence(data_root, tmp_path):
    done = run("train.py", tmp_path, data_root, *FAST, "optimizer.lr=1e6")
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].startswith("error: training diverged:")
    assert "Traceback" not in done.stdout
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "FAILED" and r.data.tags["error"].startswith("Diverged: training diverged")
    assert "test/rmse" not in r.data.metrics


def test_a_store_that_stops_taking_writes_does_not_stop_the_training_nor_lose_its_metrics(
        data_root, tmp_path, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException

    from cfae.train import train

    real, calls = MlflowClient.log_batch, []

    def locked_for_a_while(self, *args, **kwargs):  # a database that refuses metrics in epochs 2 and 3
        calls.append(bool(kwargs.get("metrics")))
        if kwargs.get("metrics") and 2 <= sum(calls) <= 5:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", locked_for_a_while)
    metrics = train(compose(data_root, tmp_path, "trainer.max_epochs=5"))
    assert metrics["epochs"] == 5 and "does not take metrics" in caplog.text
    (r,) = mlflow_runs(tmp_path)
    history = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_metric_history(r.info.run_id, "val/rmse")
    assert r.info.status == "FINISHED" and sorted(m.step for m in history) == sorted({m.step for m in history})
    assert len(history) == 5  # every epoch's value arrived, late or not


def assert_fit_ends_killed_by_sigterm(data_root, tmp_path):
    """A run stopped by SIGTERM exits 143 and leaves its MLflow run KILLED, saying why."""
    import cfae.train

    with pytest.raises(SystemExit) as exit_:
        cfae.train.fit(compose(data_root, tmp_path))
    assert exit_.value.code == 128 + signal.SIGTERM
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "KILLED" and r.data.tags["error"] == "interrupted (SIGTERM)"


def test_a_sigterm_whose_exception_is_replaced_on_the_way_out_still_ends_the_run_killed(data_root, tmp_path,
                                                                                         monkeypatch):
    import cfae.train

    def stopped_then_unwinding_badly(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises SIGTERMException here
        finally:
            raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")  # OmegaConf's

    monkeypatch.setattr(cfae.train, "fit_and_test", stopped_then_unwinding_badly)
    assert_fit_ends_killed_by_sigterm(data_root, tmp_path)


def test_a_sigterm_while_the_mlflow_run_starts_ends_it_killed(data_root, tmp_path, monkeypatch):
    import cfae.train

    def stopped(*args, **kwargs):  # the run exists in MLflow; its description is half written
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cfae.train, "log_dataset", stopped)
    assert_fit_ends_killed_by_sigterm(data_root, tmp_path)


# --- bad values, refused before anything runs ------------------------------------------------------------------
BAD = {
    "hidden=0": "hidden=0: must be an integer >= 1",
    "data.val_fraction=0": "data.val_fraction=0: must be a number > 0 and < 1",
    "data.batch_size=0": "data.batch_size=0: must be an integer >= 1",
    "trainer.max_epochs=0": "trainer.max_epochs=0: must be an integer >= 1",
    "optimizer.lr=-1": "optimizer.lr=-1: must be a number > 0",
    "model=denoising noise=1.0": "noise=1.0: must be a number >= 0 and < 1",
    "model=deep depth=0": "depth=0: must be an integer >= 1",
    "resume=/nowhere/last.ckpt": "resume=/nowhere/last.ckpt: no such checkpoint",
    "data.fold=5": "data.fold=5: must be an integer from 0 to 4",
    "model=svd hidden=100000": ("model.n_factors=100000 (or hidden): the SVD's rank must be from 1 to "
                                "min(rows, columns) - 1 = 199 for this data"),
    "data.min_item_ratings=100000": "no ratings left after dropping items with fewer than 100000 ratings",
    "ranking.k=500": "ranking.k=500: must be below the number of items, 200 in this data",
    "ranking.threshold=99": "ranking.threshold=99: must lie on this data's rating scale, 1 to 5",
    "threads=-2": "threads=-2: must be an integer >= 1",
    "data.seed=-1": "data.seed=-1: must be an integer >= 0",
    "trainer.devices=2": "trainer.devices=2: a run trains on one device (1, or [i] for GPU i)",
    "trainer.devices=[0,1]": "trainer.devices=[0, 1]: a run trains on one device",
}


@pytest.mark.parametrize("overrides", list(BAD))
def test_a_bad_value_is_refused_in_one_line_before_a_run_is_created(data_root, tmp_path, overrides):
    from cfae.checks import UsageError
    from cfae.train import train

    with pytest.raises(UsageError) as refused:
        train(compose(data_root, tmp_path, *overrides.split()))
    assert BAD[overrides] in str(refused.value) and "\n" not in str(refused.value)
    assert mlflow_runs(tmp_path) == []


def test_a_checkpoint_is_read_as_tensors_only_and_one_that_would_run_code_is_refused(data_root, tmp_path):
    """A file whose pickle would run code (here: create a file) is refused, and runs nothing, before any run
    starts: with refit=true too, which reads the checkpoint's learning rates first."""
    import pickle

    import cfae.train
    from cfae.checks import UsageError

    planted = tmp_path / "planted"

    class Payload:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    bad = tmp_path / "last.ckpt"
    with bad.open("wb") as f:
        pickle.dump({"optimizer_states": [], "payload": Payload()}, f)
    import torch

    torch.save({"optimizer_states": [], "payload": Payload()}, tmp_path / "zipped.ckpt")
    for path in (bad, tmp_path / "zipped.ckpt"):
        for extra in ((), ("refit=true",)):
            with pytest.raises(UsageError) as refused:
                cfae.train.fit(compose(data_root, tmp_path, f"resume={path}", *extra))
            assert str(refused.value) == (f"resume={path}: holds objects other than tensors and plain values, "
                                          "which cfae does not load (unpickling them could run code)")
    assert not planted.exists() and mlflow_runs(tmp_path) == []


def test_resume_takes_a_runs_full_state_not_its_best_weights(data_root, tmp_path):
    import cfae.train
    from cfae.checks import UsageError

    cfae.train.fit(compose(data_root, tmp_path / "first"))
    best = tmp_path / "first" / "out" / "checkpoints" / "best.ckpt"
    with pytest.raises(UsageError, match=f"resume={best}: holds a model's weights only, not a run's training state"):
        cfae.train.fit(compose(data_root, tmp_path, f"resume={best}"))
    assert mlflow_runs(tmp_path) == []


def test_no_cfae_module_unpickles_with_weights_only_false():
    found = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "cfae").rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert found == []


def test_a_rating_off_the_releases_steps_is_refused_with_its_line(tmp_path):
    from cfae.checks import DataError
    from cfae.data.movielens import DATASETS, read_ratings

    spec = DATASETS["ml100k"]
    path = tmp_path / "u.data"
    path.write_text("1\t2\t4\t881250949\n1\t3\t3.5\t881250950\n")
    with pytest.raises(DataError, match=r"u.data line 2: rating 3.5 is not on the scale \(1 to 5 in steps of 1\)"):
        read_ratings(path, spec.separator, rating_step=spec.rating_step)
    half = DATASETS["ml20m"]
    halves = read_ratings(path, "\t", rating_min=half.rating_min, rating_step=half.rating_step)
    assert halves.ratings.tolist() == [4, 3.5]


def test_a_read_only_store_is_said_in_one_line(tmp_path, monkeypatch):
    from cfae.stores import StoreError

    mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) and
                        mode == os.W_OK else real_access(p, mode))  # as for a user who may not write there
    with pytest.raises(StoreError, match="mlflow.db is read-only; point logger.uri"):
        mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")


def test_a_web_server_that_is_not_mlflow_is_said_at_once(tmp_path):
    from cfae.stores import StoreError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "the web server")
        with pytest.raises(StoreError, match=f"http://127.0.0.1:{port} answers, but not as an MLflow tracking "
                                             r"server \(HTTP 404"):
            mlflow_client(f"http://127.0.0.1:{port}")
    finally:
        server.kill()
        server.wait()


def test_a_run_whose_store_is_locked_while_it_starts_tries_again(data_root, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import cfae.train

    real_create, calls = MlflowClient.create_run, []

    def busy_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", busy_once)
    trained = cfae.train.fit(compose(data_root, tmp_path))
    (r,) = mlflow_runs(tmp_path)
    assert len(calls) == 2 and r.info.run_id == trained.run_id and r.info.status == "FINISHED"


def test_the_accelerator_asked_for_must_be_there(monkeypatch):
    import torch

    from cfae.checks import _check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu: this machine has no CUDA GPU"):
        _check_accelerator("gpu")
    _check_accelerator("cpu")


def test_a_runs_log_is_a_line_an_epoch_and_ends_with_where_to_look(data_root, tmp_path):
    done = run("train.py", tmp_path, data_root, "trainer.max_epochs=3", "hidden=16")
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(done.stdout.encode()) < 10_000 and "\r" not in done.stdout and "it/s" not in done.stdout
    assert done.stdout.count("[cfae.callbacks][INFO] - epoch ") == 3
    (r,) = mlflow_runs(tmp_path)
    last = [line.split("] - ", 1)[-1] for line in done.stdout.strip().splitlines()[-2:]]
    assert last[0].startswith(f"MLflow run {r.info.run_id} in sqlite:///mlruns/mlflow.db; browse: mlflow ui "
                              f"--backend-store-uri sqlite:///mlruns/mlflow.db, then open http://127.0.0.1:5000/")
    assert last[1] == (f"serve its model: MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow models serve "
                       f"-m runs:/{r.info.run_id}/model --env-manager local -p 5001")
    assert "val_rmse.png" in {a.path for a in MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").list_artifacts(
        r.info.run_id)}


def test_the_python_api_is_quiet_for_the_call_and_leaves_the_logging_as_it_was(data_root, tmp_path, capfd):
    import logging

    import cfae

    chatty = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    chatty.setLevel(logging.INFO)
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")  # as an earlier command line may have left it
    logging.basicConfig(level=logging.INFO, force=True)  # a notebook that shows INFO lines
    try:
        trained = cfae.fit(compose(data_root, tmp_path, "trainer.enable_progress_bar=false"))
        cfae.load(trained.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
        shown = capfd.readouterr()
        assert "GPU available" not in shown.err and "Downloading artifacts" not in shown.err + shown.out
        assert "Validating input example" not in shown.err and "CloudPickle" not in shown.err
        assert chatty.level == logging.INFO and os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") == bar
    finally:
        chatty.setLevel(logging.NOTSET)
        logging.basicConfig(level=logging.WARNING, force=True)


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_1_or_the_traceback_when_asked(data_root, tmp_path):
    done = run("train.py", tmp_path, data_root, "hidden=0")
    assert done.returncode == 1 and done.stdout.strip().splitlines() == [
        "error: hidden=0: must be an integer >= 1 (the latent size; null: the model's default)"]
    full = run("train.py", tmp_path, data_root, "hidden=0", HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stdout and "ConfigError" in full.stdout
    missing = run("train.py", tmp_path, tmp_path / "nowhere", "data.download=false")
    assert missing.returncode == 1 and len(missing.stdout.strip().splitlines()) == 1, missing.stdout
    swept = run("sweep.py", tmp_path, data_root, "hidden=8,16", "data.batch_size=0")
    assert swept.returncode == 1
    assert swept.stdout.strip().splitlines()[-1] == "error: data.batch_size=0: must be an integer >= 1"
    assert trials(tmp_path, "autorec-ml1m-item-fold0") == []


def test_an_unreachable_tracking_server_is_said_at_once(data_root, tmp_path):
    from cfae.stores import StoreError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(StoreError, match=f"MLflow tracking server http://127.0.0.1:{port} does not answer"):
        mlflow_client(f"http://127.0.0.1:{port}")
    assert time.monotonic() - began < 10


def test_a_folder_in_use_by_a_run_is_refused(tmp_path):
    from cfae.train import claimed

    with claimed(tmp_path / "out"):
        with pytest.raises(ConfigError, match="is in use by another run"):
            with claimed(tmp_path / "out"):
                pass
    with claimed(tmp_path / "out"):  # free again once the run is over
        pass


# --- the seams this rests on ------------------------------------------------------------------------------
# hydra-optuna-sweeper 1.3.0's configuration (hydra_plugins/hydra_optuna_sweeper/config.py): OptunaSweeperConf's
# fields and the sampler group's options, which conf/hydra/sweeper/ holds for cfae's sweeper
PLUGIN_FIELDS = {"sampler", "direction", "storage", "study_name", "n_trials", "n_jobs", "max_failure_rate",
                 "search_space", "params", "custom_search_space"}
PLUGIN_SAMPLERS = {"tpe", "random", "cmaes", "nsgaii", "motpe", "grid"}


def test_the_sweeper_takes_exactly_hydra_optuna_sweepers_configuration():
    """A sweep config written for hydra-optuna-sweeper runs unchanged: `hydra/sweeper: optuna` has that
    plugin's keys and sampler options, and cfae's sweeper takes exactly those keys and its own `pruner` (a key
    added here and not there is a TypeError at the sweep's start, not in its middle)."""
    import inspect

    from omegaconf import OmegaConf

    from cfae.configs import CONF
    from cfae.sweep import OptunaSweep

    sweeper = OmegaConf.load(CONF / "hydra" / "sweeper" / "optuna.yaml")
    assert set(sweeper) - {"_target_", "defaults"} | {"sampler"} == PLUGIN_FIELDS | {"pruner"}  # cfae's own key
    assert PLUGIN_FIELDS | {"pruner"} == set(inspect.signature(OptunaSweep.__init__).parameters) - {"self"}
    assert {p.stem for p in (CONF / "hydra" / "sweeper" / "sampler").glob("*.yaml")} == PLUGIN_SAMPLERS


def test_the_sweep_layer_uses_no_private_optuna_or_sweeper_api_and_patches_nothing():
    """No private attribute (`study._storage`, `._study_id`), no replaced Optuna function, nothing of the
    sweeper plugin's private `_impl`. (The one storage call, in cfae/studies.py, is to the public methods
    `BaseStorage.get_study_id_from_name` and `get_trial_id_from_study_id_trial_number`.)"""
    pattern = r"\._storage\|\._study_id\|\._trial_id\|optuna\.[a-z_.]* = \|_impl\b"
    found = subprocess.run(["grep", "-rn", pattern, "cfae", "hydra_plugins", "sweep.py", "train.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout
    assert found == ""


def test_a_process_is_known_dead_only_when_it_is(tmp_path):
    from cfae.processes import has_died, this_process

    assert not has_died(this_process())
    child = subprocess.Popen([sys.executable, "-c", "from cfae.processes import this_process; print(this_process())"],
                             stdout=subprocess.PIPE, text=True)
    identity = child.communicate()[0].strip()
    assert has_died(identity)
    assert not has_died("another-host:1:1")  # elsewhere: left to the heartbeats


def test_a_run_is_closed_at_its_real_end_not_when_lightning_ends_the_fit(tmp_path):
    from cfae.tracking import mlflow_logger

    logger = mlflow_logger(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", run_name="closing")
    logger.log_metrics({"val/rmse": 1.0}, step=0)
    logger.finalize("success")  # what Lightning calls after fit and after test
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "RUNNING"  # a kill during the test would leave it to be marked FAILED
    logger.close()
    (r,) = mlflow_runs(tmp_path)
    assert r.info.status == "FINISHED"


def test_a_point_whose_process_died_on_every_retry_is_given_up():
    from optuna.distributions import FloatDistribution

    from cfae.studies import MAX_RETRY, counts_against_budget

    def dead(history):
        return optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5},
                                         distributions={"x": FloatDistribution(0, 1)},
                                         system_attrs={"retry_history": history} if history else None)

    assert not counts_against_budget(dead([]))  # to be tried again
    assert not counts_against_budget(dead([0]))
    assert counts_against_budget(dead(list(range(MAX_RETRY))))  # no retry left: it took its place


@pytest.mark.parametrize("protected", [True, False])
def test_runs_logging_one_dataset_at_once_all_get_it(tmp_path, protected):
    """MLflow's SQL store looks a dataset up, then inserts it: of two runs logging it at the same moment, one
    fails on the table's unique key unless `log_dataset` tries again. The unprotected case shows the race
    still happens upstream: if it stops failing, the retry can go."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    from cfae.tracking import log_dataset

    client, experiment_id = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    workers, rounds = 2, 10
    barrier = Barrier(workers)

    def log(worker: int) -> int:
        failures = 0
        for i in range(rounds):
            run_id = client.create_run(experiment_id).info.run_id
            dataset = DatasetInput(Dataset(name=f"fold {i}", digest="f513c836", source_type="local", source="x"),
                                   [InputTag("mlflow.data.context", "training")])
            barrier.wait()
            try:
                log_dataset(client, run_id, dataset) if protected else client.log_inputs(run_id, [dataset])
            except MlflowException:
                failures += 1
        return failures

    with ThreadPoolExecutor(workers) as pool:
        failures = sum(pool.map(log, range(workers)))
    if protected:
        assert failures == 0
        runs = client.search_runs([experiment_id])
        assert len(runs) == workers * rounds and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
    else:
        assert failures > 0, "MLflow no longer races on a dataset logged twice at once: log_dataset's retry can go"


def test_a_dataset_is_logged_again_once_after_an_error_and_a_second_error_is_raised():
    from mlflow.exceptions import MlflowException

    from cfae.tracking import log_dataset

    class Store:
        def __init__(self, failures):
            self.failures, self.calls = failures, 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls <= self.failures:
                raise MlflowException(f"UNIQUE constraint failed ({self.calls})")

    raced = Store(failures=1)
    log_dataset(raced, "run", "dataset")
    assert raced.calls == 2
    broken = Store(failures=2)
    with pytest.raises(MlflowException, match=r"\(2\)"):  # the second try's error, not swallowed
        log_dataset(broken, "run", "dataset")
    assert broken.calls == 2


def test_a_run_uses_the_cores_its_process_may_use_and_openmp_spins_briefly(tmp_path, monkeypatch):
    from cfae.processes import SPIN, openmp_spins_briefly, usable_cores

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    for written, cores in (("max 100000", affinity), ("50000 100000", 1), (f"{100000 * affinity + 1} 100000",
                                                                            affinity)):
        quota.write_text(written)
        assert usable_cores(quota) == cores
    assert usable_cores(tmp_path / "absent") == affinity
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    openmp_spins_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's choice wins
    openmp_spins_briefly()
    assert "GOMP_SPINCOUNT" not in os.environ
    # the command lines set it before torch loads: libgomp reads it once, when torch's library is loaded
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    spy = ("import os, sys\n"
           "class Spy:  # says GOMP_SPINCOUNT as torch is first imported\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'torch': print('torch loads with', os.environ.get('GOMP_SPINCOUNT'))\n"
           "sys.meta_path.insert(0, Spy())\n"
           "import cfae.cli\n")
    said = subprocess.run([sys.executable, "-c", spy], env=env, capture_output=True, text=True)
    assert said.stdout.splitlines()[0] == f"torch loads with {SPIN}", said.stdout + said.stderr[-2000:]
