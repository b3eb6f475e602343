"""train(cfg): one training run, from a composed Hydra config to an MLflow run. `train.py` wraps it."""

from __future__ import annotations

import contextlib
import inspect
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from cfae import serving
from cfae.callbacks import LastCheckpoint, LearningRates, StopRun
from cfae.checks import ConfigError, UsageError, check_against_data, check_config, read_checkpoint
from cfae.configs import data_name, knob_values, register_resolvers, split_name, with_model_defaults
from cfae.console import quiet
from cfae.metrics import (
    EPOCHS,
    FIT_SECONDS,
    REFIT_EPOCHS,
    TEST_RMSE,
    TEST_RMSE_BEFORE_REFIT,
    VAL_RMSE,
    headline,
)
from cfae.models import RankingModel
from cfae.processes import git_commit, machine, usable_cores
from cfae.ranking import evaluate_ranking
from cfae.recommender import ARTIFACT, Recommender
from cfae.serving import MODEL
from cfae.tracking import (
    config_digest,
    log_dataset,
    mlflow_client,
    runs_page,
    serve_command,
    tracking_uri,
    ui_base,
    ui_command,
)

log = logging.getLogger(__name__)


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



def build(node: DictConfig, **kwargs):
    """`instantiate`, with a UsageError from the constructor raised as itself (one line) rather than
    wrapped in Hydra's multi-line InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UsageError):
            raise err.__cause__ from None
        raise


@contextlib.contextmanager
def claimed(output_dir: Path) -> Iterator[None]:
    """Hold `output_dir` for this run: a second run given the same folder while this one runs is refused
    instead of mixing its checkpoints and config with ours."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(output_dir / ".run.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"output_dir={output_dir} is in use by another run") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[list[signal.Signals]]:
    """SIGTERM raises SIGTERMException, as Ctrl-C raises KeyboardInterrupt, so that a run stopped while it
    loads data, tests or ranks ends like one stopped while it trains. (While it trains, LastCheckpoint's
    handler stops it at the end of the batch instead.) Yields the list of SIGTERMs received: the exception
    raised in the middle of other code can be replaced by one that code raises while it unwinds (a `finally`
    restoring OmegaConf's flags, say), and the run was still stopped by the signal."""
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame) -> None:
        received.append(signal.Signals(signum))
        raise SIGTERMException(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    except Exception as err:
        if received:  # the SIGTERMException was replaced on the way out: still a stop, not a failure
            raise SystemExit(128 + received[0]) from err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_model(cfg: DictConfig, datamodule, scheduled: bool = True) -> L.LightningModule:
    """The model of `cfg.model`, given what the data decides (its width, its number of rows where the model
    has per-row parameters, the rating scale) and, unless it is fitted in closed form, its optimizer and,
    if `scheduled`, the scheduler of `cfg.scheduler`."""
    cls = get_class(cfg.model._target_)
    given = {"n_inputs": datamodule.n_cols}
    if not issubclass(cls, RankingModel):  # scores of clicks are not clipped to a scale
        given["rating_min"], given["rating_max"] = datamodule.rating_range
        given["train_mean"] = float(datamodule.train_matrix.data.mean())
    if "n_rows" in inspect.signature(cls).parameters:
        given["n_rows"] = datamodule.n_rows
    if not cls.closed_form:
        given["optimizer"] = instantiate(cfg.optimizer)
        given["scheduler"] = instantiate(cfg.scheduler) if scheduled and cfg.get("scheduler") else None
    return build(cfg.model, _convert_="all", **given)  # plain lists and dicts: they go into the checkpoint


RANKERS = "multvae, multdae, recvae, ease, pop"


def check_task(cfg: DictConfig) -> None:
    """The model does the task asked of it: a RatingModel predicts ratings (task=rating), a RankingModel ranks
    items from clicks (task=ranking); refit=true is the rating task's."""
    ranks = issubclass(get_class(cfg.model._target_), RankingModel)
    name, task = model_name(cfg), cfg.task.name
    if ranks and task != "ranking":
        raise ConfigError(f"model={name} ranks items from clicks: add task=ranking")
    if not ranks and task == "ranking":
        raise ConfigError(f"model={name} predicts ratings; task=ranking takes {RANKERS}")
    if task == "ranking" and cfg.get("refit"):
        raise ConfigError("refit=true: the rating task's; task=ranking chooses its epoch on validation only")


def split_note(data: DictConfig) -> tuple[str, str]:
    """(short, long): what a run holds out, for its Dataset column ("fold 0 80:20", "u1", "temporal") and its
    note ("fold 0 of 5 random 80:20 splits")."""
    ratio = f"{round(100 * (1 - data.test_fraction))}:{round(100 * data.test_fraction)}"
    split = data.get("split", "random")
    if split == "random":
        return f"fold {data.fold} {ratio}", f"fold {data.fold} of {data.n_folds} random {ratio} splits"
    if split == "temporal":
        return f"temporal {ratio}", f"the last {round(100 * data.test_fraction)}% of the ratings in time as test"
    if split == "leave_last":
        return f"leave last {data.leave_last}", f"each user's last {data.leave_last} rating(s) in time as test"
    if split == "users":
        return f"users fold {data.fold}", f"held-out users (fold {data.fold}): their input and scored ratings"
    return split, f"GroupLens's split {split}"


def run_logger(cfg: DictConfig, digest: str):
    """The MLflow logger of this run (False without one), its name and tags set: the config's digest and the
    study's row. It checks the store; its MLflow run starts on first use (`describe_run`), once `fit` holds
    the logger, so a signal arriving then finds it there to close the run KILLED."""
    if not cfg.get("logger"):
        return False
    name = model_name(cfg)
    data = data_name(cfg.data.dataset, cfg.data.get("path"))
    run_name = f"{name}-{data}-{cfg.data.orientation}-{split_name(cfg.data.split, cfg.data.fold)}"
    tags = {**(cfg.logger.get("tags") or {}), "cfae.model": name, "cfae.config": digest, "cfae.machine": machine()}
    if choice(cfg, "experiment"):  # a row of the study (conf/experiment/)
        tags["cfae.row"] = choice(cfg, "experiment")
    tags[MLFLOW_RUN_NOTE] = f"{name} on {data}, {cfg.data.orientation} rows, {split_note(cfg.data)[1]}"
    return instantiate(cfg.logger, run_name=cfg.logger.run_name or run_name, tags=tags)


def describe_run(logger, cfg: DictConfig, datamodule, knobs: dict) -> None:
    """Start the logger's MLflow run with the resolved config (each sweep knob the model takes with the value it
    ran with, set or not: the runs table's columns), the dataset's statistics and checksum and the git commit."""
    logger.log_hyperparams({**run_params(cfg), **knobs})
    logger.log_hyperparams({"model": model_name(cfg)})  # beside model/<argument>: which model, in one short column
    logger.log_hyperparams({f"dataset/{k}": v for k, v in datamodule.stats.items()})
    logger.log_hyperparams({"dataset/val_rmse_of_the_mean": round(datamodule.baseline_rmse, 4)})  # the reference
    logger.experiment.set_tag(logger.run_id, "mlflow.source.git.commit", git_commit())
    # the Dataset column of the runs table: which data, fold and split, and the file's digest
    dataset = Dataset(name=f"{data_name(cfg.data.dataset, cfg.data.get('path'))} {split_note(cfg.data)[0]}",
                      digest=datamodule.stats["sha256"][:8], source_type="local", source=str(datamodule.stats["file"]))
    log_dataset(logger.experiment, logger.run_id, DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")]))


def run_params(cfg: DictConfig) -> dict:
    """The resolved config as MLflow params: the values a reader compares runs by, without the nulls (a knob
    left null is in the model's own arguments) or the group choices."""
    def pruned(node):
        if not isinstance(node, dict):
            return node
        kept = {k: pruned(v) for k, v in node.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}

    params = OmegaConf.to_container(cfg, resolve=True)
    params.pop("choices", None)
    return pruned(params)


class Interrupted(Exception):
    """Training stopped by a signal (SIGTERM, Ctrl-C) after saving its state (`LastCheckpoint.interrupt`)."""


def interruption(err: BaseException, last: LastCheckpoint) -> signal.Signals | None:
    """The signal that ended the run, if a signal did."""
    if last.interrupt is not None:
        return last.interrupt
    if isinstance(err, SIGTERMException):
        return signal.SIGTERM
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None


def end_run(logger, err: BaseException, signum: signal.Signals | None) -> None:
    """Close a run that did not finish: KILLED when interrupted or stopped by a callback (`StopRun`), else FAILED,
    with an `error` tag saying what."""
    if signum is not None:
        status, error = "KILLED", f"interrupted ({signum.name})"
    elif isinstance(err, StopRun):
        status, error = "KILLED", str(err)
    else:
        status, error = "FAILED", f"{type(err).__name__}: {err}"[:5000]
    with contextlib.suppress(Exception):  # a store that is down cannot be told; the next sweep or study will
        logger.experiment.set_tag(logger.run_id, "error", error)
        logger.close(status)


class Trained(NamedTuple):
    """What `fit` gives back: the model tested (its best weights, or with refit=true the refit's), its data,
    metrics and MLflow run id."""

    model: L.LightningModule
    datamodule: L.LightningDataModule
    metrics: dict[str, float]
    run_id: str | None  # None without a logger


def train(cfg: DictConfig) -> dict[str, float]:
    """`fit(cfg)`'s metrics: what train.py, sweeps and the study need."""
    return fit(cfg).metrics


@quiet()  # the libraries' start-up chatter, for the call only: a notebook's logging stays its own
def fit(cfg: DictConfig, ratings=None) -> Trained:
    """Fit on the training part, early-stop on `val/rmse`, evaluate the best checkpoint on the test part.
    `ratings`: a pandas DataFrame to use instead of the data's file, its columns named by `data.columns`
    (`cfae.compose("data=table", "data.columns.user=customer", ...)`).

    Every value is checked before data loads, and every run ends FINISHED, FAILED (with an `error` tag) or
    KILLED (SIGTERM, Ctrl-C: the training state is saved first, and the process exits with 128 + signal; a
    callback raising `StopRun`: untested, the exception raised on).
    """
    register_resolvers()
    check_config(cfg)
    check_task(cfg)
    digest = config_digest(cfg)  # of the config as composed: what the study compares to skip a run
    if cfg.get("logger"):
        mlflow_client(tracking_uri(cfg.logger.uri), cfg.logger.experiment_name)  # the store answers and exists
    output_dir = Path(cfg.output_dir)
    with claimed(output_dir), sigterm_raises() as sigterms:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        torch.set_num_threads(cfg.get("threads") or usable_cores())
        datamodule = build(cfg.data)
        if ratings is not None:
            datamodule.use_frame(ratings)
        datamodule.setup("fit")
        check_against_data(cfg, datamodule.stats["n_items"], datamodule.rating_range)
        composed, cfg = cfg, with_model_defaults(cfg)  # every value the model runs with, for config.yaml and MLflow
        knobs = knob_values(composed.model, cfg.model)
        model = build_model(cfg, datamodule)
        if model.closed_form and cfg.get("resume"):
            raise ConfigError(f"resume={cfg.resume}: {type(model).__name__} is solved in closed form; "
                              f"there is no training to resume")
        if cfg.get("refit") and cfg.get("resume") and not LearningRates.recorded_in(cfg.resume):
            raise ConfigError(f"refit=true: {cfg.resume} holds no record of its epochs' learning rates, which "
                              f"the refit replays; resume it without refit=true, or train it again")
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        last = LastCheckpoint(output_dir / "checkpoints" / "last.ckpt", cfg.checkpoint_every_s)
        logger = False
        try:
            logger = run_logger(cfg, digest)
            if logger:
                describe_run(logger, cfg, datamodule, knobs)
            model, metrics = fit_and_test(cfg, model, datamodule, logger, last)
        except BaseException as err:
            signum = interruption(err, last) or (sigterms[0] if sigterms else None)
            if logger:
                end_run(logger, err, signum)
            if isinstance(err, StopRun):
                log.info("stopped early: %s", err)
            if signum is not None:
                saved = f"; resume={last.path}" if last.path.is_file() else ""
                log.error("stopped by %s%s", signum.name, saved)
                raise SystemExit(128 + signum) from None
            raise
    return Trained(model, datamodule, metrics, logger.run_id if logger else None)


def configured_callbacks(cfg: DictConfig, validated: bool = True) -> list:
    """The callbacks of `cfg.callbacks`; without `validated`, none that watches a validation metric."""
    return [build(c) for c in (cfg.get("callbacks") or {}).values()
            if c is not None and (validated or "monitor" not in c)]


def tested(cfg: DictConfig, model, datamodule, checkpoint: str) -> float:
    """The test RMSE of `checkpoint`'s weights, logged nowhere."""
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    return float(trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False,
                              weights_only=True)[0][TEST_RMSE])


def refit(cfg: DictConfig, datamodule, best: str,
          rates: LearningRates) -> tuple[L.LightningModule, str, int, float]:
    """(model, its checkpoint, epochs, seconds): the model trained anew from the run's seed on the training and
    validation parts together, for as many epochs as it took to reach its best validation epoch, with the
    learning rates the run had in those epochs; nothing is chosen during it. A model solved in closed form is
    solved again, with the same settings, on both parts (0 epochs). Its weights: <output_dir>/checkpoints/refit.ckpt."""
    merged = datamodule.with_validation_in_training()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg, merged, scheduled=False)
    start = time.perf_counter()
    if model.closed_form:
        epochs = 0
        log.info("refit: %s solved again on the training and validation parts together", type(model).__name__)
        model.solve(merged.train_matrix)
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
        trainer.validate(model, datamodule=merged, verbose=False)  # attaches the model, for save_checkpoint
    else:
        epochs = read_checkpoint(best)["epoch"] + 1
        kept = configured_callbacks(cfg, validated=False)  # early stopping has no validation to watch here
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, max_epochs=epochs,
                              callbacks=[LearningRates(replay=rates.rates[:epochs]), *kept], limit_val_batches=0)
        log.info("refit: %d epochs on the training and validation parts together", epochs)
        trainer.fit(model, datamodule=merged)
    seconds = time.perf_counter() - start
    path = Path(cfg.output_dir) / "checkpoints" / "refit.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return model, str(path), epochs, seconds


def log_validation_curve(logger, output_dir: Path, monitor: str = VAL_RMSE, mode: str = "min") -> None:
    """The run's validation metric per epoch as a figure among its artifacts (val_rmse.png, val_ndcg_at_100.png),
    zoomed on where the epoch is chosen: MLflow's own chart scales to the first epochs' values, which can lie far
    from the rest."""
    history = sorted(logger.experiment.get_metric_history(logger.run_id, monitor), key=lambda m: (m.step, m.timestamp))
    if len(history) < 2:  # a model solved in closed form: one value
        return
    from cfae.report import validation_curve  # matplotlib, only once a run has a curve to draw

    name = logger.experiment.get_run(logger.run_id).info.run_name
    path = validation_curve([m.value for m in history], output_dir / f"{monitor.replace('/', '_')}.png", name, monitor,
                            higher_is_better=mode == "max")
    logger.experiment.log_artifact(logger.run_id, str(path))


def fit_and_test(cfg: DictConfig, model, datamodule, logger,
                 last: LastCheckpoint) -> tuple[L.LightningModule, dict[str, float]]:
    """The run's story, stage by stage: (the model tested, its metrics)."""
    trainer, best, rates, metrics = train_on_validation(cfg, model, datamodule, logger, last)
    if cfg.get("refit"):  # the model tested, ranked and saved is then the one trained anew
        model, best = refitted(cfg, model, datamodule, best, rates, metrics)
    tests = measured_on_test(trainer, model, datamodule, best)  # logged by the trainer, as it tests
    metrics.update(tests)
    if cfg.get("ranking"):  # on the best checkpoint, which trainer.test has loaded into the model
        metrics.update(ranked(cfg, model, datamodule))
    saved = save_model(model, datamodule, best, Path(cfg.output_dir)) if cfg.get("save_model", True) else None
    if logger:
        close_run(logger, cfg, metrics, logged=(*tests, cfg.task.objective), saved=saved)
    say_where(cfg, model, metrics, logger)
    return model, metrics


def train_on_validation(cfg: DictConfig, model, datamodule, logger, last: LastCheckpoint):
    """Train (or solve, in closed form) on the training part, the epoch chosen on validation: (the trainer, the best
    checkpoint, the learning rates of each epoch, the metrics so far)."""
    output_dir, task = Path(cfg.output_dir), cfg.task  # task: what validation watches, which way is better
    # The best weights at each improvement (weights only: 24 MB for ML-1M AutoRec, written in a third of the
    # time of the 72 MB full state); the full state for `resume` after the first epoch, then at most every
    # `checkpoint_every_s` seconds (LastCheckpoint). Writing both every epoch took longer than an ML-1M epoch.
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor=task.monitor,
                                 mode=task.mode, save_top_k=1, save_weights_only=True, enable_version_counter=False)
    rates = LearningRates()  # what a refit replays
    callbacks = [checkpoint, last, rates, *configured_callbacks(cfg)]
    if cfg.get("scheduler") and logger:
        callbacks.append(LearningRateMonitor("epoch"))  # the schedule, epoch by epoch, in MLflow
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    start = time.perf_counter()
    if model.closed_form:  # fitted once, validated once, no epochs; its only weights are its best
        model.solve(datamodule.train_matrix)
        trainer.validate(model, datamodule=datamodule, verbose=False)
        best = str(output_dir / "checkpoints" / "best.ckpt")
        trainer.save_checkpoint(best, weights_only=True)
    else:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
        if last.interrupt is not None:  # stopped by a signal at the end of a batch; the state is saved
            raise Interrupted(last.interrupt.name)
        best = checkpoint.best_model_path
    metrics = {task.objective: float(trainer.callback_metrics[task.objective]),
               FIT_SECONDS: time.perf_counter() - start, EPOCHS: trainer.current_epoch}
    return trainer, best, rates, metrics


def refitted(cfg: DictConfig, model, datamodule, best: str, rates: LearningRates,
             metrics: dict[str, float]) -> tuple[L.LightningModule, str]:
    """The refit stage: the chosen model's test RMSE kept as `test/rmse_before_refit`, then (model, checkpoint)
    trained anew on training + validation (`refit`), its epochs and seconds added to `metrics`."""
    metrics[TEST_RMSE_BEFORE_REFIT] = tested(cfg, model, datamodule, best)
    model, best, metrics[REFIT_EPOCHS], seconds = refit(cfg, datamodule, best, rates)
    metrics[FIT_SECONDS] += seconds
    return model, best


def measured_on_test(trainer, model, datamodule, best: str) -> dict[str, float]:
    """The test part's metrics of the `best` checkpoint: test/rmse and test/mae (task=ranking: the rankings)."""
    tested = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
    return {name: float(value) for name, value in tested.items()}


def ranked(cfg: DictConfig, model, datamodule) -> dict[str, float]:
    """A rating model's top-N metrics on the test part (`cfg.ranking`: Recall@K, NDCG@K)."""
    ranking = evaluate_ranking(model, datamodule, **OmegaConf.to_container(cfg.ranking))
    return {f"test/{k}": v for k, v in (ranking or {}).items()}


def save_model(model, datamodule, best: str, output_dir: Path) -> Path:
    """The model you can load and serve (`cfae.load`, `mlflow models serve`): weights, constructor arguments,
    input ratings, ids and titles, in <output_dir>/model."""
    recommender = Recommender.from_fit(model, datamodule)
    with tempfile.TemporaryDirectory() as tmp:  # copied into the pyfunc model, which cfae.load reads
        return serving.save(recommender, recommender.save(Path(tmp) / ARTIFACT, best), output_dir / MODEL)


def packaged(output_dir: Path) -> Path:
    """The saved model of a run that kept its checkpoints only (`save_model=false`), packaged from its folder as
    `fit` packages one: its config.yaml, the checkpoint it tested (refit.ckpt under refit, else best.ckpt) and
    its data, read again from the files it names; in <output_dir>/model."""
    register_resolvers()
    cfg = OmegaConf.load(output_dir / "config.yaml")
    best = output_dir / "checkpoints" / ("refit.ckpt" if cfg.get("refit") else "best.ckpt")
    if not best.is_file():
        raise UsageError(f"{best}: no such checkpoint; the run's folder holds no model to package")
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg, datamodule, scheduled=False)
    model.load_state_dict(read_checkpoint(best)["state_dict"])
    return save_model(model, datamodule, str(best), output_dir)


def close_run(logger, cfg: DictConfig, metrics: dict[str, float], logged: tuple[str, ...], saved: Path | None) -> None:
    """The MLflow run's last metrics (those not `logged` already, at the last epoch), its note, its model, config
    and validation curve; then FINISHED."""
    output_dir = Path(cfg.output_dir)
    logger.log_metrics({k: v for k, v in metrics.items() if k not in logged}, step=metrics[EPOCHS])
    note = logger.experiment.get_run(logger.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
    logger.experiment.set_tag(logger.run_id, MLFLOW_RUN_NOTE, f"{note}: {headline(metrics)}")
    if saved is not None:
        logger.experiment.log_artifacts(logger.run_id, str(saved), MODEL)
    logger.experiment.log_artifact(logger.run_id, str(output_dir / "config.yaml"))
    if not logger.flush():
        raise RuntimeError("the tracking store still does not take this run's metrics; its checkpoints "
                           f"are in {output_dir / 'checkpoints'}")
    log_validation_curve(logger, output_dir, cfg.task.monitor, cfg.task.mode)
    logger.close("FINISHED")


def say_where(cfg: DictConfig, model, metrics: dict[str, float], logger) -> None:
    """The run's last lines: how it ended, its test figures, and where its checkpoints, run and model are."""
    objective = cfg.task.objective
    summary = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/") and "users" not in k)
    how = "solved in closed form" if model.closed_form else f"done after {metrics[EPOCHS]:.0f} epochs"
    log.info("%s (%.1f s): %s=%.4f  %s", how, metrics[FIT_SECONDS], objective, metrics[objective], summary)
    log.info("checkpoints: %s", Path(cfg.output_dir) / "checkpoints")
    if logger:
        uri = tracking_uri(cfg.logger.uri)
        log.info("MLflow run %s in %s; browse: %s, then open %s", logger.run_id, uri, ui_command(uri),
                 runs_page(logger.experiment_id, ui_base(uri)))
        if cfg.get("save_model", True):
            log.info("serve its model: %s", serve_command(logger.run_id, uri))
