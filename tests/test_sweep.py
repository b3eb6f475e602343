"""sweep.py end to end on the synthetic data: grid, resume, failures, pruning, parallel and shared studies,
and the nested MLflow runs. Each sweep runs as its own process, as a user would run it."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cfae.launch import device_overrides
from cfae.processes import usable_cores

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "data.batch_size=32"]


def sweep(cwd: Path, data_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CFAE_DATA_DIR": str(data_root), **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None) if "MLFLOW_TRACKING_URI" not in (env or {}) else None
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-m", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def study(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/mlruns/optuna.db")


def runs(cwd: Path) -> list:
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("cfae").experiment_id])


@pytest.fixture(scope="module")
def grid_sweep(data_root, tmp_path_factory):
    """`sweep.py -m model=autorec hidden=8,16,32`, run twice in the same folder."""
    cwd = tmp_path_factory.mktemp("grid")
    args = [*FAST, "model=autorec", "hidden=8,16,32"]
    first, second = ok(sweep(cwd, data_root, *args)), ok(sweep(cwd, data_root, *args))
    return cwd, first, second


def test_a_discrete_space_runs_each_point_exactly_once_even_when_resumed(grid_sweep):
    cwd, first, second = grid_sweep
    trials = study(cwd, "autorec-ml1m-item-fold0").trials
    assert sorted(t.params["hidden"] for t in trials) == [8, 16, 32]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert "a grid of 3 points" in first.stderr + first.stdout
    assert "nothing left to run" in second.stderr + second.stdout


def test_mlflow_nests_one_child_per_trial_under_one_parent_per_sweep(grid_sweep):
    cwd, *_ = grid_sweep
    client, all_runs = runs(cwd)
    parents = [r for r in all_runs if r.info.run_name == "sweep-autorec-ml1m-item-fold0"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 3  # the resumed sweep ran no new trial
    first_parent = min(parents, key=lambda r: r.info.start_time)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {first_parent.info.run_id}
    assert sorted(c.data.tags["optuna.trial"] for c in children) == ["0", "1", "2"]
    assert sorted(int(c.data.params["hidden"]) for c in children) == [8, 16, 32]
    assert all("val/rmse" in c.data.metrics and "test/rmse" in c.data.metrics for c in children)
    best = min(c.data.metrics["val/rmse_best"] for c in children)
    assert first_parent.data.metrics["best/val/rmse_best"] == pytest.approx(best)
    assert first_parent.data.metrics["trials/complete"] == 3
    assert "best/hidden" in first_parent.data.params and first_parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(first_parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(first_parent.info.run_id, "plots")}
    assert {"trials.csv", "config.yaml"} <= artifacts  # the sweep's base config, beside the trials table
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots
    assert len(first_parent.data.tags["mlflow.source.git.commit"]) >= 7



def test_the_best_trial_is_registered_and_loads_by_its_models_uri(grid_sweep):
    import cfae

    cwd, *_ = grid_sweep
    client, _ = runs(cwd)
    (version,) = client.search_model_versions("name = 'cfae-autorec-ml1m-item-fold0'")  # once, though run twice
    best = study(cwd, "autorec-ml1m-item-fold0").best_trial
    assert version.tags["optuna.trial"] == str(best.number)
    assert client.get_run(version.run_id).data.params["hidden"] == str(best.params["hidden"])
    rec = cfae.load("models:/cfae-autorec-ml1m-item-fold0/latest", tracking_uri=f"sqlite:///{cwd}/mlruns/mlflow.db")
    assert len(rec.recommend(7, 5)) == 5 and rec.model.hparams.hidden_size == best.params["hidden"]
    packaged = {c.info.run_id for c in runs(cwd)[1] if any(a.path == "model" for a in client.list_artifacts(
        c.info.run_id))}
    assert packaged == {version.run_id}  # the trials keep their checkpoints; only the best one's model is packaged


@pytest.mark.slow
def test_n_trials_is_the_studys_budget_and_a_larger_one_extends_it(data_root, tmp_path):
    args = [*FAST, "model=autorec", "hidden=16", "optimizer.lr=interval(0.001,0.02)",
            "hydra.sweeper.study_name=resumable", "logger=none"]
    ok(sweep(tmp_path, data_root, *args, "hydra.sweeper.n_trials=2"))
    again = ok(sweep(tmp_path, data_root, *args, "hydra.sweeper.n_trials=2"))
    assert len(study(tmp_path, "resumable").trials) == 2 and "nothing left to run" in again.stdout + again.stderr
    ok(sweep(tmp_path, data_root, *args, "hydra.sweeper.n_trials=4"))
    trials = study(tmp_path, "resumable").trials
    assert len(trials) == 4 and len({t.params["optimizer.lr"] for t in trials}) == 4


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(data_root, tmp_path):
    done = ok(sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=16", "optimizer.lr=choice(1e30,0.01)"))
    states = {t.params["optimizer.lr"]: t.state for t in study(tmp_path, "autorec-ml1m-item-fold0").trials}
    assert states == {1e30: TrialState.FAIL, 0.01: TrialState.COMPLETE}
    _, all_runs = runs(tmp_path)
    (failed,) = [r for r in all_runs if r.info.status == "FAILED"]
    assert failed.data.tags["error"].startswith("Diverged: training diverged")
    assert "failed: Diverged: training diverged" in done.stderr + done.stdout


def test_a_sweep_without_a_storage_is_a_clear_error(data_root, tmp_path):
    done = sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16", "hydra.sweeper.storage=null")
    assert done.returncode != 0 and "hydra.sweeper.storage must be a database URL" in done.stderr


@pytest.mark.slow
def test_too_many_failures_stop_the_sweep(data_root, tmp_path):
    done = sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=16", "logger=none",
                 "optimizer.lr=choice(1e30,2e30,3e30,4e30,5e30)")
    assert done.returncode != 0
    assert "4 of 4 trials failed, more than max_failure_rate=0.25" in done.stderr
    assert len(study(tmp_path, "autorec-ml1m-item-fold0").trials) == 4


def test_pruned_trials_stop_early_and_show_as_pruned(data_root, tmp_path):
    always = "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0}"  # any RMSE > 0 is pruned
    done = sweep(tmp_path, data_root, *FAST, "trainer.max_epochs=6", "model=autorec", "hidden=8,16",
                 "~hydra.sweeper.pruner", always)
    ok(done)
    assert "Error" not in done.stderr  # a pruned trial is no failure
    trials = study(tmp_path, "autorec-ml1m-item-fold0").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [0] for t in trials)  # reported once, then stopped
    _, all_runs = runs(tmp_path)
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert all(c.data.tags["optuna.state"] == "PRUNED" and c.info.status == "KILLED" for c in children)
    assert all(c.data.tags["error"].endswith("pruned at epoch 0") for c in children)
    assert all("test/rmse" not in c.data.metrics for c in children)


@pytest.mark.slow
def test_parallel_trials_share_the_cores(data_root, tmp_path):
    ok(sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"))
    _, all_runs = runs(tmp_path)
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    assert {c.data.params["threads"] for c in children} == {str(max(1, usable_cores() // 2))}


def test_each_parallel_trial_gets_its_own_gpu_or_its_share_of_cores():
    assert device_overrides(4, n_gpus=2, n_cpus=16) == [
        ("trainer.accelerator=gpu", f"trainer.devices=[{i % 2}]", "threads=4") for i in range(4)]
    assert device_overrides(3, n_gpus=0, n_cpus=16) == [("threads=5",)] * 3
    assert device_overrides(4, n_gpus=0, n_cpus=2) == [("threads=1",)] * 4
    assert device_overrides(4, n_gpus=0, n_cpus=16, parallel=1) == [("threads=16",)] * 4


def test_placement_follows_the_launcher():
    from omegaconf import OmegaConf

    from cfae.launch import local_parallelism

    launcher = lambda target, **kw: OmegaConf.create({"_target_": target, **kw})  # noqa: E731
    assert local_parallelism(launcher("hydra._internal.core_plugins.basic_launcher.BasicLauncher"), 4) == 1
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert local_parallelism(launcher(joblib, n_jobs=3), 4) == 3
    assert local_parallelism(launcher(joblib, n_jobs=-1), 4) == usable_cores()
    assert local_parallelism(launcher(joblib, n_jobs=-2), 4) == max(1, usable_cores() - 1)  # joblib's all but one
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert local_parallelism(launcher(local), 4) == 4  # the whole batch at once
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert local_parallelism(launcher(slurm), 4) is None  # the cluster places jobs


@pytest.mark.slow
def test_submitit_runs_the_trials_as_separate_jobs(data_root, tmp_path):
    # submitit_local is the SLURM launcher's local twin: same plugin, jobs as local processes
    ok(sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16", "logger=none",
             "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"))
    trials = study(tmp_path, "autorec-ml1m-item-fold0").trials
    assert sorted(t.params["hidden"] for t in trials) == [8, 16]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len(list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))) == 2


# --- several sweep.py processes sharing one study through PostgreSQL ------------------------------------

@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql package), stopped afterwards."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))  # Debian keeps them off the PATH
    initdb = str(debian[-1]) if debian else shutil.which("initdb")
    if not initdb:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(initdb).parent
    folder = Path(tempfile.mkdtemp(prefix="cfae-pg-"))
    folder.chmod(0o777)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(folder / "data")]
    try:
        subprocess.run([*as_postgres, initdb, "-D", str(folder / "data"), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True, timeout=60)
        subprocess.run([*ctl, "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
                        "-l", str(folder / "log"), "-w", "start"], check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {err}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_one_study_through_a_database(data_root, tmp_path, postgres):
    args = [*FAST, "model=autorec", "hidden=16", "optimizer.lr=interval(0.001,0.02)", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={postgres}"]
    folders = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for folder in folders:
        folder.mkdir()
        env = {**os.environ, "CFAE_DATA_DIR": str(data_root)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "-m", *args], cwd=folder, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    trials = optuna.load_study(study_name="shared", storage=postgres).trials
    assert 4 <= len(trials) <= 5 and all(t.state == TrialState.COMPLETE for t in trials)  # a server: may pass by one
    assert len({t.params["optimizer.lr"] for t in trials}) == len(trials)


# --- the MLflow UI shows the sweep ------------------------------------------------------------------


@pytest.mark.slow
def test_the_mlflow_server_serves_the_sweeps_parent_children_and_metrics(grid_sweep):
    import json
    import time
    import urllib.request

    cwd, *_ = grid_sweep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{cwd}/mlruns/mlflow.db",
         "--default-artifact-root", str(cwd / "mlruns" / "artifacts")],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    try:
        for _ in range(360):  # up to three minutes for the server to come up on a busy machine
            try:
                experiment = call("/experiments/get-by-name?experiment_name=cfae")["experiment"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer within three minutes")
        found = call("/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
        parents = [r for r, t in zip(found, tags) if t.get("mlflow.runName", "").startswith("sweep-")]
        children = [r for r, t in zip(found, tags) if "mlflow.parentRunId" in t]
        assert len(parents) == 2 and len(children) == 3
        parent_ids = {p["info"]["run_id"] for p in parents}
        assert all(t["mlflow.parentRunId"] in parent_ids for t in tags if "mlflow.parentRunId" in t)
        for child in children:
            assert {"val/rmse", "val/rmse_best", "test/rmse"} <= {m["key"] for m in child["data"]["metrics"]}
        history = call(f"/metrics/get-history?run_id={children[0]['info']['run_id']}&metric_key=val/rmse")
        assert len(history["metrics"]) == 3  # one value per epoch
    finally:
        os.killpg(server.pid, 15)  # the server and its workers, by process id
        server.wait(timeout=30)


def test_a_swept_knob_the_model_does_not_use_is_refused_before_any_trial(data_root, tmp_path):
    done = sweep(tmp_path, data_root, *FAST, "model=vae", "dropout=interval(0,0.5)", "hydra.sweeper.n_trials=2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("error: dropout=(swept): cfae.models.VAE has no use for this "
                                                    "knob; it takes hidden, depth, noise")
    assert not (tmp_path / "mlruns" / "optuna.db").exists() or not study(tmp_path, "vae-ml1m-item-fold0").trials


def test_a_sweep_logs_quietly_and_ends_with_its_result(data_root, tmp_path):
    """Output to a file: no progress bars, one line per epoch; the last lines name the best value and its
    settings, the sweep's MLflow run, the registered model and the link that opens it."""
    done = ok(sweep(tmp_path, data_root, "model=autorec", "hidden=16,32", "trainer.max_epochs=2"))
    log = done.stdout + done.stderr
    assert len(log.encode()) < 20_000 and "\r" not in log and "it/s" not in log, len(log.encode())
    best = study(tmp_path, "autorec-ml1m-item-fold0").best_trial
    client, all_runs = runs(tmp_path)
    parent = next(r for r in all_runs if r.info.run_name.startswith("sweep-"))
    (version,) = client.search_model_versions("name = 'cfae-autorec-ml1m-item-fold0'")
    last = [line.split("] ", 1)[-1] for line in done.stdout.strip().splitlines()[-4:]]
    assert last[0] == f"best: val/rmse_best={best.value:.4f}, trial {best.number}: hidden={best.params['hidden']}"
    assert last[1].startswith("results: multirun/") and last[1].endswith("/optimization_results.yaml")
    assert last[2] == (f"MLflow: the sweep is run {parent.info.run_id}, its best trial run {version.run_id}, "
                       f"registered as models:/cfae-autorec-ml1m-item-fold0/{version.version}")
    assert last[3] == (f"browse: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db, then open "
                       f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
                       "?workflowType=machine_learning")
    results = yaml.safe_load((tmp_path / last[1].removeprefix("results: ")).read_text())
    assert results == {"name": "optuna", "best_params": {"hidden": best.params["hidden"]}, "best_value": best.value}
    assert parent.data.metrics["val/rmse_best"] == pytest.approx(best.value)  # the runs table's column
    trial_runs = [r for r in all_runs if "optuna.trial" in r.data.tags]
    assert sorted(r.info.run_name.split("-")[0] for r in trial_runs) == ["trial0", "trial1"]
    assert {r.data.params["hidden"] for r in trial_runs} == {"16", "32"}


def test_a_sweep_refused_up_front_runs_nothing_and_the_corrected_one_runs_every_point(data_root, tmp_path):
    refused = sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16", "refit=true")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        "error: refit=true in a sweep: trials are compared on validation, which refitting does not change; "
        "refit the chosen configuration with train.py")
    assert not (tmp_path / "mlruns" / "optuna.db").exists() or not study(tmp_path, "autorec-ml1m-item-fold0").trials
    # a value only the data can refuse stops the sweep at its first trial, which does not count as run
    in_job = sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16", "ranking.k=1000")
    assert in_job.returncode == 1
    assert in_job.stderr.strip().splitlines()[-1].startswith("error: ranking.k=1000: must be below the number of items")
    (first,) = study(tmp_path, "autorec-ml1m-item-fold0").trials
    assert first.state == TrialState.FAIL and "refused" in first.user_attrs
    ok(sweep(tmp_path, data_root, *FAST, "model=autorec", "hidden=8,16"))
    done = [t for t in study(tmp_path, "autorec-ml1m-item-fold0").trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["hidden"] for t in done) == [8, 16]
