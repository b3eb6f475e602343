"""Sweeps: a thin extension of hydra-optuna-sweeper, and the job-side pieces that talk to the study.

The official sweeper asks Optuna for trials, launches them as Hydra jobs and tells Optuna the returned
objective. `CfaeOptunaSweeperImpl` keeps that loop and adds, around it:

- each job learns its trial (number, study, storage) and its MLflow parent run through overrides of the
  `sweep.*` keys, so it can report per-epoch values for pruning and nest its MLflow run;
- a discrete space (every swept parameter a `choice`) is walked by Optuna's GridSampler: each point once,
  also across resumed runs of the same study;
- parameters given on the command line replace the model's default search space (`search_space/`);
- with a local launcher, each job of a parallel batch gets its own GPU (`trainer.devices=[k]`), or on a
  CPU-only machine its share of the cores (`threads`); on a cluster (submitit, Ray) the cluster does;
- a job that finished its trial itself (pruned) is not told again, and failures are counted over the
  whole sweep against `max_failure_rate` (upstream counts within one batch, so one failure in a batch of
  one would stop the sweep);
- one MLflow parent run per sweep with the best value and params, a trials table and Optuna's plots.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import optuna
import sqlalchemy.exc
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from cfae.tracking import mlflow_client

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def device_overrides(batch_size: int, n_gpus: int, n_cpus: int, parallel: int | None = None) -> list[tuple[str, ...]]:
    """Overrides placing each trial of a batch whose jobs run `parallel` at a time (default: all at once):
    one GPU each, round robin, when there are GPUs, else an equal share of the CPU cores."""
    parallel = min(batch_size, parallel or batch_size)
    if n_gpus > 0:
        return [("trainer.accelerator=gpu", f"trainer.devices=[{i % n_gpus}]") for i in range(batch_size)]
    return [("trainer.accelerator=cpu", f"threads={max(1, n_cpus // parallel)}")] * batch_size


def local_parallelism(launcher: DictConfig) -> int | None:
    """How many jobs a launcher runs at once on this machine; None for launchers that place jobs on
    other machines (submitit, Ray), where the cluster assigns devices and cfae leaves placement alone."""
    target = launcher.get("_target_", "")
    if target.endswith("BasicLauncher"):
        return 1
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs", -1)
        return os.cpu_count() or 1 if n_jobs in (None, -1) else n_jobs
    return None


def has_sweep_overrides(arguments: list[str]) -> bool:
    return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(arguments))


class CfaeOptunaSweeperImpl(OptunaSweeperImpl):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.tracking_uri = config.logger.uri if config.get("logger") else None
        self.track = bool(config.get("logger"))
        if not self.storage:
            raise ValueError("hydra.sweeper.storage must be a database URL (sqlite:///mlruns/optuna.db, "
                             "postgresql://...): each trial reports to the study from its own job")
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.max_failures = self.max_failure_rate
        self.max_failure_rate = 1.0  # upstream's per-batch check off: ours counts the whole sweep

    # -- the loop's inputs ------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        if has_sweep_overrides(arguments):  # the command line says what to sweep
            self.params, self.search_space = None, None
        self._process_searchspace_config()
        distributions, _ = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        if not distributions:
            raise ValueError("nothing to sweep: give parameters (hidden=300,500,750) or a model with a "
                             "search space in conf/search_space/")
        if all(isinstance(d, CategoricalDistribution) for d in distributions.values()):
            seed = self.config.hydra.sweeper.sampler.get("seed")
            self.sampler = functools.partial(optuna.samplers.GridSampler, seed=seed)
            grid = {name: d.choices for name, d in distributions.items()}
            self.n_trials = min(self.n_trials, self._grid_points_left(grid))
            log.info("discrete space: grid of %d points, %d left to run",
                     math.prod(len(c) for c in grid.values()), self.n_trials)
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)  # even when no trial is left
        self._create_study_once()
        self.parent_run_id = self._start_parent_run() if self.track else None
        status = "FAILED"
        try:
            with _tell_skips_finished_trials(self.max_failures):
                try:
                    super().sweep(arguments)
                except ValueError:  # upstream's summary asks for a best trial, and there may be none
                    if self._load_study().get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                        raise
                    log.warning("no trial completed (all pruned or failed): the study has no best value")
            status = "FINISHED"
        finally:
            if self.parent_run_id:
                summarise_study(self._load_study(), self.parent_run_id, self.tracking_uri, status)

    def _configure_trials(self, trials, search_space_distributions, fixed_params):
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        parallel = local_parallelism(self.config.hydra.launcher)
        if parallel is None:
            placement = [()] * len(trials)
        else:
            placement = device_overrides(len(trials), torch.cuda.device_count(), os.cpu_count() or 1, parallel)
        return [
            (*o, f"sweep.trial={t.number}", f"sweep.study='{self.study_name}'", f"sweep.storage='{self.storage}'",
             f"sweep.parent_run_id={self.parent_run_id or 'null'}", *where)
            for t, o, where in zip(trials, overrides, placement)
        ]

    # -- helpers ----------------------------------------------------------------------------------
    def _create_study_once(self, tries: int = 5) -> None:
        """Create (or find) the study before the loop does. Workers started together against a new
        database race to create Optuna's tables; the losers retry once the winner has made them."""
        for attempt in range(tries):
            try:
                optuna.create_study(study_name=self.study_name, storage=self.storage, load_if_exists=True,
                                    directions=self._get_directions())
                return
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                if attempt == tries - 1:
                    raise
                time.sleep(0.5 + random.random())

    def _load_study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage)

    def _grid_points_left(self, grid: dict[str, list]) -> int:
        """Grid points not yet finished in this study (a resumed sweep does not repeat them)."""
        points = set(itertools.product(*grid.values()))
        try:
            study = self._load_study()
        except KeyError:  # a new study
            return len(points)
        done = {tuple(t.params.get(k) for k in grid) for t in study.get_trials(deepcopy=False, states=FINISHED)}
        return len(points - done)

    def _start_parent_run(self) -> str:
        client, experiment_id = mlflow_client(self.tracking_uri)
        run = client.create_run(experiment_id, run_name=f"sweep-{self.study_name}",
                                tags={"cfae.sweep": self.study_name, "optuna.storage": str(self.storage)})
        return run.info.run_id


@contextlib.contextmanager
def _tell_skips_finished_trials(max_failure_rate: float, min_trials: int = 4):
    """While the upstream loop runs: `study.tell` leaves alone a trial its job already finished (pruned),
    and raises once failures exceed `max_failure_rate` of the trials told (after `min_trials`)."""
    real_create_study = optuna.create_study
    told = {"all": 0, "failed": 0}

    def create_study(*args, **kwargs):
        study = real_create_study(*args, **kwargs)
        real_tell = study.tell

        def tell(trial, values=None, state=None, **_):
            try:
                real_tell(trial, values=values, state=state, skip_if_finished=True)
            except RuntimeError as err:  # GridSampler calls study.stop() once its last point is told
                if "Study.stop" not in str(err):
                    raise
            told["all"] += 1
            told["failed"] += state == TrialState.FAIL
            if told["all"] >= min_trials and told["failed"] / told["all"] > max_failure_rate:
                raise RuntimeError(f"{told['failed']} of {told['all']} trials failed, more than "
                                   f"max_failure_rate={max_failure_rate}: stopping the sweep")

        study.tell = tell
        return study

    optuna.create_study = create_study
    try:
        yield
    finally:
        optuna.create_study = real_create_study


def summarise_study(study: optuna.Study, parent_run_id: str, uri: str | None, status: str) -> None:
    """Best value and params, trial counts, the trials table and Optuna's plots on the parent run."""
    client, _ = mlflow_client(uri)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in FINISHED}
    for name, n in counts.items():
        client.log_metric(parent_run_id, f"trials/{name}", n)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        client.log_metric(parent_run_id, "best/val/rmse_best", study.best_value)
        for name, value in study.best_params.items():
            client.log_param(parent_run_id, f"best/{name}", value)
        client.set_tag(parent_run_id, "best_trial", study.best_trial.number)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(parent_run_id, str(table))
        for path in _plots(study, Path(tmp)):
            client.log_artifact(parent_run_id, str(path), "plots")
    client.set_terminated(parent_run_id, status)


def _plots(study: optuna.Study, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("parallel_coordinate", ovm.plot_parallel_coordinate)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            log.warning("no %s plot: %s", name, err)
            continue
        figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        made.append(folder / f"{name}.png")
        figure.savefig(made[-1], dpi=100)
        plt.close(figure)
    return made


# ----------------------------------------------------------------------------------------------------
# In the job


class OptunaPruning(Callback):
    """Reports `val/rmse` after each validation to the job's trial and stops training once the study's
    pruner says the trial is clearly worse than the others at the same epoch."""

    def __init__(self, study_name: str, storage: str, trial_number: int, pruner: optuna.pruners.BasePruner):
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        self.trial = optuna.Trial(self.study, trial_id)
        self.trial_number, self.pruned = trial_number, False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/rmse" not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics["val/rmse"]), step=trainer.current_epoch)
        if self.trial.should_prune():
            log.info("trial %d pruned at epoch %d", self.trial_number, trainer.current_epoch)
            self.pruned, trainer.should_stop = True, True

    def finish_pruned(self) -> None:
        self.study.tell(self.trial_number, state=TrialState.PRUNED)
