"""train(cfg): one training run, from a composed Hydra config to an MLflow run. `train.py` wraps it."""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cfae.ranking import evaluate_ranking
from cfae.sweep import OptunaPruning
from cfae.tracking import git_commit

log = logging.getLogger(__name__)

OBJECTIVE = "val/rmse_best"  # what checkpointing, early stopping (via val/rmse) and sweeps optimise


class EpochTimer(Callback):
    """Logs `time/epoch_s`, the wall time of each training epoch (validation excluded), and keeps them
    in `times`."""

    def __init__(self):
        self.times: list[float] = []
        self.start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.start is None:  # resumed from a checkpoint taken at the end of an epoch: nothing timed
            return
        self.times.append(time.perf_counter() - self.start)
        pl_module.log("time/epoch_s", self.times[-1])


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed ones for reuse.

    By default glibc maps every block above 32 MB afresh and unmaps it when freed, so each new large
    tensor (a 138k x 500 weight gradient at ML-20M's size: 277 MB, every step) pays the kernel for zeroed
    pages: allocating and filling one takes 63 ms, 17 ms with this setting (benchmarks/kernels.py). The
    price: memory freed during training stays with the process for reuse. Linux with glibc only (the role
    jemalloc or tcmalloc play in PyTorch's CPU tuning guides); returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 2**31 - 1)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def choice(cfg: DictConfig, group: str) -> str | None:
    """What a config group was set to (`model=vae`: "vae", `+experiment=deep_bn`: "deep_bn"): Hydra's
    record of the choices, under train.py and sweep.py, or `cfg.choices` where a caller composed the config
    itself (cfae.study); None if the group was not chosen or nobody recorded it."""
    if cfg.get("choices"):
        return cfg.choices.get(group)
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def model_name(cfg: DictConfig) -> str:
    """The `model=` choice (autorec, denoising, ...), else the class name."""
    return choice(cfg, "model") or cfg.model._target_.rsplit(".", 1)[-1].lower()


def start_run(cfg: DictConfig, datamodule, output_dir: Path):
    """The MLflow logger of this run (False without one), carrying the resolved config, the dataset's
    statistics and checksum, the git commit and, in a sweep, the trial and its parent run."""
    if not cfg.get("logger"):
        return False
    sweep, name = cfg.get("sweep") or {}, model_name(cfg)
    run_name = f"{name}-{cfg.data.dataset}-{cfg.data.orientation}-fold{cfg.data.fold}"
    tags = {**(cfg.logger.get("tags") or {}), "cfae.model": name}
    if choice(cfg, "experiment"):  # a row of the study (conf/experiment/)
        tags["cfae.row"] = choice(cfg, "experiment")
    if sweep.get("trial") is not None:
        run_name = f"{run_name}-trial{sweep.trial}"
        tags.update({"optuna.study": sweep.study, "optuna.trial": str(sweep.trial)})
        if sweep.get("parent_run_id"):
            tags["mlflow.parentRunId"] = sweep.parent_run_id
    logger = instantiate(cfg.logger, run_name=cfg.logger.run_name or run_name, tags=tags)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    logger.log_hyperparams({f"dataset/{k}": v for k, v in datamodule.stats.items()})
    logger.experiment.set_tag(logger.run_id, "mlflow.source.git.commit", git_commit())
    config_file = output_dir / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_file, resolve=True)
    logger.experiment.log_artifact(logger.run_id, str(config_file))
    return logger


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit on the training part, early-stop on `val/rmse`, evaluate the best checkpoint on the test part.

    In a sweep (`cfg.sweep.trial` set) the run nests under the sweep's MLflow run, reports `val/rmse` to
    its Optuna trial each epoch, and stops early without a test if the pruner says so.
    """
    L.seed_everything(cfg.seed, workers=True)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    output_dir = Path(cfg.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    # The one place where the data shapes the model: its width, its number of rows and the rating scale.
    rating_min, rating_max = datamodule.rating_range
    model = instantiate(cfg.model, n_inputs=datamodule.n_cols, n_rows=datamodule.n_rows, rating_min=rating_min,
                        rating_max=rating_max, optimizer=instantiate(cfg.optimizer),
                        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
    logger = start_run(cfg, datamodule, output_dir)

    # The best weights at each improvement (weights only: 24 MB for ML-1M AutoRec, written in a third of the
    # time of the 72 MB full state); the full state for `resume` at most every `checkpoint_every_s` seconds.
    # Writing both every epoch took 0.4 s, more than the ML-1M epoch itself.
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor="val/rmse",
                                 mode="min", save_top_k=1, save_weights_only=True)
    latest = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", enable_version_counter=False,
                             train_time_interval=timedelta(seconds=cfg.checkpoint_every_s))
    callbacks = [checkpoint, latest, EarlyStopping(monitor="val/rmse", mode="min", patience=cfg.patience), EpochTimer()]
    if cfg.get("scheduler") and logger:
        callbacks.append(LearningRateMonitor("epoch"))  # the schedule, epoch by epoch, in MLflow
    sweep = cfg.get("sweep") or {}
    pruning = None
    if sweep.get("trial") is not None:  # report every epoch; with no pruner that only records the curve
        pruner = instantiate(sweep.pruner) if sweep.get("pruner") else optuna.pruners.NopPruner()
        pruning = OptunaPruning(sweep.study, sweep.storage, sweep.trial, pruner)
        callbacks.append(pruning)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    resume = cfg.resume
    if resume and not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint (a run's full state is "
                                f"<its output dir>/checkpoints/last.ckpt)")

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)  # on an exception Lightning marks the run FAILED
    except Exception as err:
        if logger:
            logger.experiment.set_tag(logger.run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        raise
    metrics = {OBJECTIVE: float(model.val_rmse_best.compute()), "time/fit_s": time.perf_counter() - start,
               "epochs": trainer.current_epoch}
    pruned = pruning is not None and pruning.pruned
    if pruned:  # no test for a trial the sweep gave up on
        pruning.finish_pruned()
    else:
        test = trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False)[0]
        metrics["test/rmse"] = float(test["test/rmse"])
        if cfg.get("ranking"):  # on the best checkpoint, which trainer.test has loaded into the model
            ranking = evaluate_ranking(model, datamodule, **cfg.ranking)
            metrics.update({f"test/{k}": v for k, v in (ranking or {}).items()})
    if logger:
        logger.log_metrics({k: v for k, v in metrics.items() if k != "test/rmse"})
        if pruning is not None:
            logger.experiment.set_tag(logger.run_id, "optuna.state", "PRUNED" if pruned else "COMPLETE")
        if not pruned:
            logger.experiment.log_artifact(logger.run_id, checkpoint.best_model_path, "checkpoints")
        logger.finalize("KILLED" if pruned else "success")
    log.info("%s: val/rmse_best=%.4f test/rmse=%s epochs=%d fit=%.1fs (best checkpoint %s)",
             "pruned" if pruned else "done", metrics[OBJECTIVE], f"{metrics.get('test/rmse', float('nan')):.4f}",
             metrics["epochs"], metrics["time/fit_s"], checkpoint.best_model_path)
    return metrics
