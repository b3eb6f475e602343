import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from cfae.checks import ConfigError, Diverged, check_config
from cfae.processes import keep_freed_memory
from cfae.train import train


def config(data_root, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            f"data.root={data_root}", "data.download=false", "data.batch_size=16", "hidden=32", "optimizer.lr=0.01",
            "trainer.max_epochs=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"output_dir={tmp_path / 'out'}", f"logger.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", *overrides])


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train")
    cfg = config(data_root, tmp_path, "data.fold=1")
    metrics = train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cfae").experiment_id])
    return metrics, client, run, tmp_path


def test_train_returns_the_objective_and_test_rmse(trained):
    metrics, *_ = trained
    assert 0 < metrics["val/rmse_best"] < 1.2 and 0 < metrics["test/rmse"] < 1.2
    assert metrics["epochs"] == 4


def test_mlflow_run_carries_metrics_params_and_provenance(trained):
    metrics, client, run, _ = trained
    assert run.info.status == "FINISHED" and run.info.run_name == "autorec-ml1m-item-fold1"
    m = run.data.metrics
    for key in ("train/loss", "val/rmse", "val/rmse_best", "test/rmse", "time/fit_s", "time/epoch_s",
                "test/recall_at_10", "test/ndcg_at_10"):
        assert key in m, key
    assert 0 < m["test/recall_at_10"] <= 1 and 0 < m["test/ndcg_at_10"] <= 1
    assert m["test/ranking_users"] > 250  # of the 300 synthetic users, those with a held-out rating >= 4
    assert m["test/rmse"] == pytest.approx(metrics["test/rmse"])
    history = client.get_metric_history(run.info.run_id, "val/rmse")
    assert len(history) == 4  # one per epoch
    assert m["val/rmse_best"] == pytest.approx(min(h.value for h in history))
    p = run.data.params
    assert p["data/fold"] == "1" and p["model/hidden_size"] == "32" and p["optimizer/_target_"] == "torch.optim.Adam"
    assert p["dataset/n_users"] == "300" and p["dataset/n_items"] == "200" and len(p["dataset/sha256"]) == 64
    assert len(run.data.tags["mlflow.source.git.commit"]) >= 7 and run.data.tags["cfae.model"] == "autorec"
    from cfae.processes import machine

    assert run.data.tags["cfae.machine"] == machine() and " cores, " in machine()



def test_the_run_reads_well_in_the_mlflow_ui(trained):
    metrics, client, run, _ = trained
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    history = client.get_metric_history(run.info.run_id, "val/rmse")
    assert sorted(h.step for h in history) == [0, 1, 2, 3]  # stepped by epoch
    best = client.get_metric_history(run.info.run_id, "val/rmse_best")
    assert sorted(h.step for h in best) == [0, 1, 2, 3]  # no stray point at the end
    assert "epoch" not in run.data.metrics
    p = run.data.params
    assert p["model"] == "autorec" and "None" not in p.values() and not any(k.startswith("sweep/") for k in p)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "ml1m fold 1 80:20" and dataset.dataset.digest == p["dataset/sha256"][:8]
    note = run.data.tags["mlflow.note.content"]
    assert note == f"autorec on ml1m, item rows, fold 1 of 5 random 80:20 splits: test RMSE {metrics['test/rmse']:.4f}"


def test_mlflow_run_stores_config_and_best_checkpoint_under_mlruns(trained):
    _, client, run, tmp_path = trained
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model"} <= artifacts  # the best weights, inside the model cfae.load reads
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "model/artifacts/recommender")}
    assert saved == {f"model/artifacts/recommender/{name}" for name in ("model.ckpt", "data.npz", "recommender.json")}
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())


def test_a_run_resumes_from_its_last_full_state_and_a_missing_checkpoint_is_named(data_root, tmp_path):
    import torch

    first = config(data_root, tmp_path, "trainer.max_epochs=2", "checkpoint_every_s=0")
    train(first)
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 1 and state["optimizer_states"]  # the full state: optimizer included
    best = torch.load(tmp_path / "out" / "checkpoints" / "best.ckpt", weights_only=False)
    assert "optimizer_states" not in best  # the best checkpoint holds weights only
    more = config(data_root, tmp_path, "trainer.max_epochs=4", f"resume={last}",
                  f"output_dir={tmp_path / 'resumed'}")
    assert train(more)["epochs"] == 4
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cfae").experiment_id], order_by=["start_time"])
    epochs_run = [len(client.get_metric_history(r.info.run_id, "val/rmse")) for r in runs]
    assert epochs_run == [2, 2]  # the resumed run trained epochs 3 and 4 only (from scratch: 4)
    with pytest.raises(ConfigError, match="resume=.*nowhere.ckpt: no such checkpoint"):
        train(config(data_root, tmp_path, f"resume={tmp_path / 'nowhere.ckpt'}"))


def test_a_run_that_dies_is_marked_failed_with_its_error_and_keeps_what_it_logged(data_root, tmp_path):
    cfg = config(data_root, tmp_path, "trainer.max_epochs=5", "optimizer.lr=1e30")  # diverges to NaN
    with pytest.raises(Diverged, match="training diverged: the loss is (nan|inf)"):
        train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cfae").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("Diverged: training diverged: the loss is ")
    assert "dataset/sha256" in run.data.params  # what was logged before the failure stays


def cli(cwd, *args, env_extra=None):
    import os
    env = {**os.environ, **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_py_runs_end_to_end_and_tracks_into_mlruns(data_root, tmp_path):
    done = cli(tmp_path, "trainer.max_epochs=2", "hidden=16", "trainer.accelerator=cpu",
               env_extra={"CFAE_DATA_DIR": str(data_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert "test/rmse=" in done.stderr + done.stdout


def test_an_experiment_run_from_train_py_is_tagged_with_its_row_and_model(data_root, tmp_path):
    done = cli(tmp_path, "+experiment=deep_bn", "trainer.max_epochs=2", "hidden=16", "trainer.accelerator=cpu",
               env_extra={"CFAE_DATA_DIR": str(data_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cfae").experiment_id])
    assert run.data.tags["cfae.row"] == "deep_bn" and run.data.tags["cfae.model"] == "deep_bn"
    assert run.data.params["model/batch_norm"] == "True"


def test_train_py_bad_fold_is_a_clear_error(data_root, tmp_path):
    done = cli(tmp_path, "data.fold=7", env_extra={"CFAE_DATA_DIR": str(data_root)})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "error: data.fold=7: must be an integer from 0 to 4 (data.n_folds=5)"


@pytest.mark.parametrize(("cuda", "cuda_bf16", "amx", "accelerator", "expected"), [
    (False, False, True, "auto", "bf16-mixed"),  # a CPU that multiplies bfloat16 natively
    (False, False, False, "auto", "32-true"),  # one that would emulate it
    (False, False, True, "gpu", "32-true"),  # asked for a GPU that is not there: Lightning will say so
    (True, True, False, "auto", "bf16-mixed"),
    (True, False, True, "auto", "32-true"),  # a GPU without bfloat16 (V100) wins over the CPU
    (True, True, True, "cpu", "bf16-mixed"),
])
def test_precision_follows_the_hardware(monkeypatch, cuda, cuda_bf16, amx, accelerator, expected):
    import torch

    from cfae import configs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(configs, "cpu_has_amx", lambda: amx)
    assert configs.precision(accelerator) == expected


def test_the_trainer_logs_the_precision_it_ran_at(trained):
    _, _, run, _ = trained
    assert run.data.params["trainer/precision"] in ("bf16-mixed", "32-true")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_takes_effect_with_glibc_and_large_tensors_still_work():
    import torch

    assert keep_freed_memory()
    big = torch.ones(64 * 2**20 // 4)  # 64 MB: above glibc's default mmap threshold
    del big
    assert torch.zeros(64 * 2**20 // 4).sum() == 0  # a reused block still comes out zeroed where asked


def test_a_model_is_composed_trained_and_returned_from_python_without_hydras_runtime(data_root, tmp_path, monkeypatch):
    import cfae

    monkeypatch.chdir(tmp_path)  # the output folder goes under ./outputs/
    cfg = cfae.compose("model=deep", "hidden=8", "depth=2", f"data.root={data_root}", "data.download=false",
                       "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "ranking=null",
                       f"logger.uri=sqlite:///{tmp_path}/mlruns/mlflow.db")
    trained = cfae.fit(cfg)
    assert isinstance(trained.model, cfae.models.DeepAutoencoder) and trained.model.encoder[0].bias.shape == (8,)
    assert trained.metrics["epochs"] == 2 and 0 < trained.metrics["test/rmse"] < 4
    assert Path(cfg.output_dir).parts[0] == "outputs" and (tmp_path / cfg.output_dir / "config.yaml").is_file()
    run = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_run(trained.run_id)
    assert run.info.run_name == "deep-ml1m-item-fold0" and run.info.status == "FINISHED"
    # the returned model holds the best weights: scoring the validation part again gives val/rmse_best
    import torch

    trained.model.eval()
    with torch.no_grad():
        errors = [(trained.model.predict_held_out(b).clamp(1, 5) - b.targets.val).pow(2).sum()
                  for b in trained.datamodule.val_dataloader()]
    rmse = (sum(errors) / trained.datamodule.val_matrix.nnz).sqrt().item()
    assert rmse == pytest.approx(trained.metrics["val/rmse_best"], abs=2e-3)


def test_the_callbacks_group_chooses_the_optional_callbacks(trained, data_root, tmp_path):
    _, _, run, _ = trained
    assert "time/epoch_s" in run.data.metrics  # EpochTimer, from conf/callbacks/default.yaml
    cfg = config(data_root, tmp_path, "callbacks=none", "trainer.max_epochs=2", "ranking=null")
    train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (bare,) = client.search_runs([client.get_experiment_by_name("cfae").experiment_id])
    assert "time/epoch_s" not in bare.data.metrics and bare.data.metrics["epochs"] == 2
    assert (tmp_path / "out" / "checkpoints" / "best.ckpt").is_file()  # the checkpoints are not optional


def test_a_closed_form_model_is_solved_validated_and_tested_without_epochs(data_root, tmp_path):
    import torch

    import cfae

    trained = cfae.fit(config(data_root, tmp_path, "model=svd", "hidden=4", "ranking=null"))
    assert trained.metrics["epochs"] == 0 and 0 < trained.metrics["test/rmse"] < 1.2
    assert trained.model.optimizer_factory is None and (tmp_path / "out" / "checkpoints" / "best.ckpt").is_file()
    last = tmp_path / "last.ckpt"  # a training state, as another model's run would leave it
    torch.save({"optimizer_states": [], "epoch": 1}, last)
    with pytest.raises(ConfigError, match="ImputedSVD is solved in closed form; there is no training to resume"):
        cfae.fit(config(data_root, tmp_path / "again", "model=svd", "hidden=4", f"resume={last}"))


def test_refit_trains_anew_on_training_and_validation_for_the_epochs_validation_chose(data_root, tmp_path):
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    import cfae
    from cfae.train import build_model

    plain = cfae.fit(config(data_root, tmp_path / "plain", "ranking=null", "trainer.max_epochs=6"))
    refitted = cfae.fit(config(data_root, tmp_path / "refit", "ranking=null", "trainer.max_epochs=6", "refit=true"))
    m = refitted.metrics
    # the model validation chose is the plain run's, and the epochs to train again are its best epoch's
    assert m["test/rmse_before_refit"] == pytest.approx(plain.metrics["test/rmse"], abs=1e-6)
    best = torch.load(tmp_path / "plain" / "out" / "checkpoints" / "best.ckpt", weights_only=False)
    assert m["refit/epochs"] == best["epoch"] + 1
    assert m["val/rmse_best"] == pytest.approx(plain.metrics["val/rmse_best"], abs=1e-6)
    # the model returned, tested and saved: trained from the seed on both parts together for that many epochs
    dm = plain.datamodule
    merged = dm.with_validation_in_training()
    assert merged.train_matrix.nnz == dm.train_matrix.nnz + dm.val_matrix.nnz and dm.val_matrix.nnz > 0
    cfg = OmegaConf.load(tmp_path / "refit" / "out" / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    by_hand = build_model(cfg, merged)
    L.Trainer(max_epochs=m["refit/epochs"], accelerator="cpu", precision=cfg.trainer.precision, logger=False,
              enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
              enable_model_summary=False).fit(by_hand, datamodule=merged)
    for a, b in zip(by_hand.state_dict().values(), refitted.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(refitted.model.state_dict()["encoder.weight"], plain.model.state_dict()["encoder.weight"])
    assert m["test/rmse"] != m["test/rmse_before_refit"]
    saved = torch.load(tmp_path / "refit" / "out" / "checkpoints" / "refit.ckpt", weights_only=False)
    torch.testing.assert_close(saved["state_dict"]["encoder.weight"], by_hand.state_dict()["encoder.weight"])
    client = MlflowClient(f"sqlite:///{tmp_path}/refit/mlruns/mlflow.db")
    run = client.get_run(refitted.run_id)
    assert run.data.metrics["test/rmse"] == pytest.approx(m["test/rmse"])
    assert run.data.metrics["test/rmse_before_refit"] == pytest.approx(m["test/rmse_before_refit"])
    assert run.data.metrics["refit/epochs"] == m["refit/epochs"]
    assert len(client.get_metric_history(refitted.run_id, "test/rmse")) == 1  # the refit model's, logged once


def test_refit_replays_the_learning_rates_a_validation_scheduler_gave_the_run(data_root, tmp_path):
    """ReduceLROnPlateau needs the validation part, which a refit trains on: the refit follows the run's
    schedule instead, as MLflow recorded it epoch by epoch."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf

    import cfae
    from cfae.train import build_model

    refitted = cfae.fit(config(data_root, tmp_path, "ranking=null", "trainer.max_epochs=10", "optimizer.lr=0.05",
                               "scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5", "refit=true"))
    epochs = int(refitted.metrics["refit/epochs"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    recorded = {}  # epoch -> rate of each parameter group, as LearningRateMonitor logged them
    for key in ("lr-Adam/pg1", "lr-Adam/pg2"):
        for m in client.get_metric_history(refitted.run_id, key):
            recorded.setdefault(m.step, []).append(m.value)
    schedule = [recorded[epoch] for epoch in sorted(recorded)][:epochs]
    assert len(schedule) == epochs and len({rates[0] for rates in schedule}) > 1  # the rate did fall before then

    class Follow(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            for group, rate in zip(trainer.optimizers[0].param_groups, schedule[trainer.current_epoch], strict=True):
                group["lr"] = rate

    cfg = OmegaConf.load(tmp_path / "out" / "config.yaml")
    merged = refitted.datamodule.with_validation_in_training()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    by_hand = build_model(cfg, merged, scheduled=False)
    L.Trainer(max_epochs=epochs, accelerator="cpu", precision=cfg.trainer.precision, logger=False,
              callbacks=[Follow()], enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
              enable_model_summary=False).fit(by_hand, datamodule=merged)
    for a, b in zip(by_hand.state_dict().values(), refitted.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_resumed_run_keeps_the_learning_rates_of_its_first_epochs_for_its_refit(data_root, tmp_path):
    import torch

    plateau = ["ranking=null", "optimizer.lr=0.05", "scheduler=plateau", "scheduler.patience=0",
               "scheduler.factor=0.5", "checkpoint_every_s=0"]
    train(config(data_root, tmp_path, *plateau, "trainer.max_epochs=3"))
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    resumed = config(data_root, tmp_path, *plateau, "trainer.max_epochs=8", f"resume={last}", "refit=true",
                     f"output_dir={tmp_path / 'resumed'}")
    metrics = train(resumed)
    assert metrics["refit/epochs"] >= 1 and metrics["test/rmse"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cfae").experiment_id], order_by=["start_time"])
    logged = sorted((m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, "lr-Adam/pg1"))
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    kept = saved["callbacks"]["LearningRates"]["rates"]
    assert [rates[0] for rates in kept] == pytest.approx([value for _, value in logged])  # epochs 1-3, then 4-8
    assert len(kept) == metrics["epochs"] and len(set(value for _, value in logged)) > 1
    # a full state written without that record cannot be refitted: said before any training
    del saved["callbacks"]["LearningRates"]
    torch.save(saved, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"refit=true: .*old.ckpt holds no record of its epochs' learning rates"):
        train(config(data_root, tmp_path, *plateau, f"resume={tmp_path / 'old.ckpt'}", "refit=true",
                     f"output_dir={tmp_path / 'old'}"))


def test_a_closed_form_refit_solves_the_model_again_on_training_and_validation(data_root, tmp_path):
    import cfae
    from cfae.models import ImputedSVD

    trained = cfae.fit(config(data_root, tmp_path, "model=svd", "hidden=4", "refit=true"))
    assert trained.metrics["refit/epochs"] == 0
    assert trained.metrics["test/rmse"] != pytest.approx(trained.metrics["test/rmse_before_refit"], abs=1e-6)
    again = ImputedSVD(n_inputs=trained.datamodule.n_cols, n_rows=trained.datamodule.n_rows, n_factors=4,
                       orientation=trained.model.hparams.orientation)
    again.solve(trained.datamodule.with_validation_in_training().train_matrix)
    tested = trained.model.row_factors @ trained.model.col_factors.T
    assert torch.allclose(tested, again.row_factors @ again.col_factors.T, atol=1e-4)


def test_refit_switch_and_sweeps(data_root, tmp_path):
    import cfae

    with pytest.raises(ConfigError, match="refit=yes: must be true or false"):
        cfae.fit(config(data_root, tmp_path, "refit=yes"))
    with pytest.raises(ConfigError, match="refit=true in a sweep: trials are compared on validation"):
        check_config(config(data_root, tmp_path, "refit=true"), sweeping=True)


def test_refit_off_leaves_a_runs_config_digest_as_it_was_without_the_switch(data_root, tmp_path):
    from omegaconf import open_dict

    from cfae.tracking import config_digest

    cfg = config(data_root, tmp_path)
    without = cfg.copy()
    with open_dict(without):
        del without["refit"]
    assert config_digest(cfg) == config_digest(without)  # a study's runs recorded without it still count as done
    assert config_digest(config(data_root, tmp_path, "refit=true")) != config_digest(cfg)


def test_save_model_false_keeps_the_checkpoints_and_packages_no_model(data_root, tmp_path):
    import cfae
    from cfae.checks import UsageError

    trained = cfae.fit(config(data_root, tmp_path, "save_model=false", "trainer.max_epochs=2"))
    assert (tmp_path / "out" / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "out" / "model").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert "model" not in {a.path for a in client.list_artifacts(trained.run_id)}
    assert "test/rmse" in client.get_run(trained.run_id).data.metrics
    with pytest.raises(UsageError, match="save_model=false .* packaged none"):
        cfae.load(trained.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    from cfae.recommender import Recommender
    from cfae.train import packaged

    packaged(tmp_path / "out")  # later, from its folder (what a sweep does for its best trial)
    again, fitted = cfae.load(tmp_path / "out"), Recommender.from_fit(trained.model, trained.datamodule)
    assert again.recommend(7, 10) == fitted.recommend(7, 10)
