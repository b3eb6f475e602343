"""The sweeper behind `python sweep.py -m ...`: Optuna's ask-and-tell loop, with trials launched as Hydra jobs.

A Hydra Sweeper plugin (hydra_plugins/cfae_sweeper registers it) that takes the hydra-optuna-sweeper's
configuration (`hydra.sweeper.*`: sampler, direction, storage, study_name, n_trials, n_jobs,
max_failure_rate, params) and runs the study on Optuna's public API:

- the search space comes from Hydra's override grammar (`choice`, `range`, `interval`, `tag(log, ...)`),
  on the command line or in `hydra.sweeper.params` (conf/search_space/); a command line that sweeps
  anything replaces the model's default space;
- `n_trials` is the study's budget: a sweep runs trials until the study holds that many (finished,
  running or waiting), so re-running a command that was stopped finishes it, and several processes on one
  study share it. A space of `choice`s only is a grid: each point once, in order (enqueued);
- the sampler is made anew for each trial, seeded from (`seed`, trial number): reproducible, and a resumed
  or shared study draws new points instead of replaying the same sequence;
- trials whose process died are failed and tried again (cfae/studies.py);
- each job gets one callback, `TrialReporting` (cfae/studies.py; training knows nothing else of sweeps):
  it nests the job's MLflow run under the sweep's, holds the trial while it trains and reports every epoch
  to the study's pruner; the sweeper alone tells the study each result. With a local launcher each job of a
  parallel batch gets its own GPU, or its share of the CPU cores;
- one MLflow parent run per sweep with the best value and params, a trials table and Optuna's plots.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from cfae import launch, studies
from cfae.checks import ConfigError, check_config, check_knob, refused_up_front, reported_in_one_line
from cfae.metrics import VAL_RMSE_BEST
from cfae.processes import git_commit, this_process
from cfae.stores import store_lock
from cfae.tracking import close_dead_runs, mlflow_client, run_page, tracking_uri, ui_base, ui_command

log = logging.getLogger(__name__)

OBJECTIVE = VAL_RMSE_BEST  # what each trial reports as its value, unless its task says another (cfg.task.objective)


# -- the search space ------------------------------------------------------------------------------------
def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override: `choice(a,b)` or `a,b` categorical, `range(lo,hi,step)`
    the stepped values below `hi` (as Python's range), `interval(lo,hi)` uniform, with `tag(log, ...)` on a
    log scale; integer bounds give integers."""
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ConfigError(f"{override.input_line}: cannot sweep this (use choice, range or interval)")


def search_space(arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The swept parameters of `arguments` as distributions, and the fixed overrides every job gets."""
    distributions, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        if override.is_sweep_override():
            distributions[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    return distributions, fixed


def grid_of(distributions: dict[str, BaseDistribution]) -> dict[str, list] | None:
    """The points of a space whose every parameter is a `choice`; None for a space to sample."""
    if distributions and all(isinstance(d, CategoricalDistribution) for d in distributions.values()):
        return {name: list(d.choices) for name, d in distributions.items()}
    return None


def check_same_space(study: optuna.Study, distributions: dict[str, BaseDistribution]) -> None:
    """A study's parameters keep their distributions (Optuna refuses a changed set of choices): a sweep that
    gives one anew under the same study name is refused in one line."""
    for trial in study.get_trials(deepcopy=False):
        for name, before in trial.distributions.items():
            if name in distributions:
                try:
                    optuna.distributions.check_distribution_compatibility(before, distributions[name])
                except ValueError:
                    raise ConfigError(f"{name}: the study {study.study_name} already sweeps it over {shown(before)}; "
                                      f"sweep {shown(distributions[name])} in a study of its own "
                                      f"(hydra.sweeper.study_name=...)") from None


def shown(d: BaseDistribution) -> str:
    if isinstance(d, CategoricalDistribution):
        return ",".join(map(str, d.choices))
    return f"{'tag(log, ' if getattr(d, 'log', False) else ''}interval({d.low}, {d.high})" + (
        ")" if getattr(d, "log", False) else "")


# -- sampling ----------------------------------------------------------------------------------------------
class PerTrialSeeds(BaseSampler):
    """A sampler made anew for each trial by `make(seed)`, its seed drawn from (`seed`, trial number).

    One seed per process would replay the same proposals in every process: a resumed study repeats its first
    points and two workers on one study propose the same ones. Seeding by trial number keeps a sweep
    reproducible while every trial, in any process, draws differently.
    """

    def __init__(self, make: Callable[[int | None], BaseSampler], seed: int | None):
        self.make, self.seed = make, seed
        self.sampler = make(seed)

    def before_trial(self, study, trial) -> None:
        if self.seed is not None:
            self.sampler = self.make(int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0]))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)


# -- the trials' jobs ------------------------------------------------------------------------------------------
def trial_callback(study: str, storage: str, number: int, parent_run_id: str | None) -> list[str]:
    """The override that gives a trial's job its `TrialReporting` callback (cfae/studies.py): all a training run
    is told of its sweep."""
    return [f"++callbacks.optuna_trial={{_target_:cfae.studies.TrialReporting,study:{launch.quoted(study)},"
            f"storage:{launch.quoted(storage)},number:{number},monitor:${{task.monitor}},"
            f"parent_run_id:{parent_run_id or 'null'}}}"]


# -- the sweeper -----------------------------------------------------------------------------------------------
class OptunaSweep(Sweeper):
    def __init__(self, sampler: BaseSampler, direction: Any, storage: str | None, study_name: str, n_trials: int,
                 n_jobs: int, max_failure_rate: float, search_space: Any, custom_search_space: str | None,
                 params: DictConfig | None, pruner: Any = None):
        if search_space or custom_search_space:
            raise ConfigError("hydra.sweeper.search_space and custom_search_space are not supported: "
                              "give the space in hydra.sweeper.params (conf/search_space/) or on the command line")
        self.storage_url, self.study_name = storage, study_name
        self.direction = direction.name if hasattr(direction, "name") else str(direction)
        self.n_trials, self.n_jobs, self.max_failure_rate, self.params = n_trials, n_jobs, max_failure_rate, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        # The sampler's config, not the instance Hydra made of it: one is made for each trial (PerTrialSeeds).
        self.sampler_config = config.hydra.sweeper.sampler
        pruner = config.hydra.sweeper.get("pruner")  # its config, for the study to hand to the jobs
        self.pruner_config = OmegaConf.to_container(pruner, resolve=True) if pruner else None
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.tracking_uri = config.logger.uri if config.get("logger") else None
        self.objective = OmegaConf.select(config, "task.objective") or OBJECTIVE
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        with reported_in_one_line():  # a bad value, now or in a trial's job: one line and exit 1
            distributions, fixed, grid = self.prepare(arguments)
            study = self.open_study(distributions, grid)
            parent = self.start_parent_run() if self.config.get("logger") else None
            status, error, best = "FINISHED", None, None
            self.n_told = self.n_failed = 0  # over the whole sweep, for max_failure_rate
            try:
                while batch := self.ask_batch(study, distributions, grid):
                    self.run_batch(study, batch, fixed, parent)
            except BaseException as err:
                if isinstance(err, KeyboardInterrupt | SystemExit):  # a job exits with 128 + the signal
                    code = 128 + signal.SIGINT if isinstance(err, KeyboardInterrupt) else err.code
                    cause = signal.Signals(code - 128).name if isinstance(code, int) and code > 128 else f"exit {code}"
                    status, error = "KILLED", f"interrupted ({cause})"
                else:
                    status, error = "FAILED", f"{type(err).__name__}: {err}"[:5000]
                raise
            finally:
                if parent:
                    try:
                        best = summarise_study(study, parent, self.tracking_uri, status, error, self.objective)
                    except Exception:  # the sweep's own outcome (its error, its exit status) comes first
                        log.exception("could not summarise the sweep in MLflow run %s", parent)
            self.report(study, grid, parent, best)

    def report(self, study: optuna.Study, grid: dict | None, parent: str | None, best_run: dict | None) -> None:
        """The sweep's last lines: its trials, the best value and its settings, where its runs and its best
        model are; and optimization_results.yaml in the sweep folder, as hydra-optuna-sweeper writes it."""
        trials = study.get_trials(deepcopy=False)
        refused = sum(studies.REFUSED in t.user_attrs for t in trials)
        counts = ", ".join(f"{sum(t.state == state for t in trials)} {name}" for state, name in
                           ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned")))
        counts += f", {sum(t.state == TrialState.FAIL for t in trials) - refused} failed" + (
            f", {refused} refused before running" if refused else "")
        size = f"a grid of {math.prod(len(v) for v in grid.values())} points" if grid else f"n_trials={self.n_trials}"
        log.info("sweep %s (%s): %d trials in the study, %s", self.study_name, size, len(trials), counts)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            log.warning("no trial completed (all pruned or failed): the study has no best value")
            return
        settings = " ".join(f"{k}={v}" for k, v in study.best_params.items())
        log.info("best: %s=%.4f, trial %d: %s", self.objective, study.best_value, study.best_trial.number, settings)
        folder = Path(self.config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": study.best_params,
                                         "best_value": study.best_value}), folder / "optimization_results.yaml")
        log.info("results: %s", folder / "optimization_results.yaml")
        if parent and best_run:
            uri = tracking_uri(self.tracking_uri)
            log.info("MLflow: the sweep is run %s, its best trial run %s%s", parent, best_run["run_id"],
                     f", registered as {best_run['model']}" if best_run.get("model") else "")
            log.info("browse: %s, then open %s", ui_command(uri),
                     run_page(best_run["experiment_id"], parent, ui_base(uri)))

    def prepare(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str], dict | None]:
        """The space, the fixed overrides and the grid, with every fixed value checked before a trial runs."""
        if not self.storage_url:
            raise ConfigError("hydra.sweeper.storage must be a database URL (sqlite:///mlruns/optuna.db, "
                              "postgresql://...): each trial reports to the study from its own job")
        swept_on_command_line = bool(search_space(arguments)[0])
        configured = [] if swept_on_command_line else [f"{k}={v}" for k, v in (self.params or {}).items()]
        distributions, fixed = search_space([*configured, *arguments])
        if not distributions:
            raise ConfigError("nothing to sweep: give parameters (hidden=300,500,750) or a model with a "
                              "search space in conf/search_space/")
        check_config(self.config, sweeping=True)
        from cfae.train import check_task  # here: the sweeper's start-up stays light until it has a config

        check_task(self.config)
        for name in distributions:  # a swept knob the model would ignore is refused now
            check_knob(self.config, name, "(swept)")
        if self.config.get("logger"):  # a server that does not answer is said now, in one line
            close_dead_runs(*mlflow_client(self.tracking_uri, self.config.logger.experiment_name))
        return distributions, fixed, grid_of(distributions)

    def open_study(self, distributions: dict[str, BaseDistribution], grid: dict | None) -> optuna.Study:
        seed = self.sampler_config.get("seed")
        make = lambda s: instantiate(self.sampler_config, seed=s)  # noqa: E731  (a grid's points are enqueued)
        storage = studies.database(self.storage_url)
        with store_lock(self.storage_url):  # one process at a time creates the study and recovers trials
            study = optuna.create_study(study_name=self.study_name, storage=storage, load_if_exists=True,
                                        direction=self.direction, sampler=PerTrialSeeds(make, seed))
            dead = studies.fail_dead_trials(study)
            study.set_user_attr(studies.PRUNER, self.pruner_config)  # what each job's TrialReporting prunes by
        check_same_space(study, distributions)
        if dead:
            log.info("trials %s had lost their process: failed, their points to be tried again", dead)
        log.info("study %s in %s, %s", self.study_name, self.storage_url,
                 f"a grid of {math.prod(len(v) for v in grid.values())} points" if grid else
                 f"sampled by {self.sampler_config._target_.rsplit('.', 1)[-1]}")
        return study

    def ask_batch(self, study: optuna.Study, distributions: dict, grid: dict | None) -> list[optuna.Trial]:
        """Up to n_jobs new trials, as many as the study's budget (and the grid) leave; none when done.
        Waiting trials (points to try again) come first; a grid's next points are enqueued, in order."""
        with store_lock(self.storage_url):  # workers on one machine count and ask one at a time
            studies.fail_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            used = [t for t in trials if studies.counts_against_budget(t)]
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            left = self.n_trials - len(used)
            if grid is not None:
                taken = {tuple(t.params.get(k) for k in grid) for t in (*used, *waiting)}
                free = [point for point in itertools.product(*grid.values()) if point not in taken]
                left = min(left, len(free) + len(waiting))
                for point in free[:max(0, min(self.n_jobs, left) - len(waiting))]:
                    study.enqueue_trial(dict(zip(grid, point)))
            n = min(self.n_jobs, left)
            if n <= 0:
                log.info("study %s: nothing left to run (%s)", self.study_name,
                         "every point of the grid has run" if grid is not None else
                         f"it holds its n_trials={self.n_trials} trials")
                return []
            return [studies.ask(study, distributions) for _ in range(n)]

    def run_batch(self, study, trials: list[optuna.Trial], fixed: list[str], parent: str | None) -> None:
        placement = launch.placement(self.config.hydra.launcher, len(trials))
        overrides = [(*fixed, *(f"{name}={value}" for name, value in trial.params.items()),
                      *trial_callback(self.study_name, self.storage_url, trial.number, parent), *where)
                     for trial, where in zip(trials, placement)]
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException:  # interrupted: trials whose job ran here (or died) are failed, to be tried again
            studies.fail_dead_trials(study, stopping=this_process())  # (one on a cluster: once its job ends)
            raise
        self.job_idx += len(returns)
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        refusals = []
        for trial, ret in zip(trials, returns):
            try:
                value = ret.return_value  # raises the job's own exception, if it had one
            except Exception as err:
                refused = refused_up_front(err)  # a bad value: the same command would fail every trial
                if trial.number in running:  # else another sweep found its process dead and failed it already
                    trial.set_user_attr(studies.REFUSED if refused else studies.ERROR,
                                        f"{type(err).__name__}: {err}"[:2000])
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                if refused:
                    refusals.append(err)
                    continue
                self.n_failed += 1
                log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, str(err).splitlines()[0])
            else:
                if trial.number in running and value is None:  # stopped by the pruner (cfae.cli's task function)
                    study.tell(trial, state=TrialState.PRUNED)
                elif trial.number in running:  # else another sweep found its process dead and failed it already
                    study.tell(trial, float(value))
            self.n_told += 1
        if refusals:  # stop here; the refused points stay to run once the command is corrected
            raise refusals[0]
        if self.n_told >= 4 and self.n_failed / self.n_told > self.max_failure_rate:
            raise RuntimeError(f"{self.n_failed} of {self.n_told} trials failed, more than "
                               f"max_failure_rate={self.max_failure_rate}: stopping the sweep")

    def start_parent_run(self) -> str:
        client, experiment_id = mlflow_client(self.tracking_uri)
        run = client.create_run(experiment_id, run_name=f"sweep-{self.study_name}",
                                tags={"cfae.sweep": self.study_name, "optuna.storage": str(self.storage_url),
                                      "cfae.process": this_process(), "mlflow.source.git.commit": git_commit(),
                                      "mlflow.note.content": f"Optuna sweep {self.study_name}: minimises "
                                                             f"{self.objective}; one child run per trial"})
        # the sweep's base config, as its trials start from it (each child run holds its own resolved values)
        client.log_text(run.info.run_id, OmegaConf.to_yaml(self.config), "config.yaml")
        return run.info.run_id


def summarise_study(study: optuna.Study, parent_run_id: str, uri: str | None, status: str,
                    error: str | None = None, objective: str = OBJECTIVE) -> dict | None:
    """Best value and params, trial counts, the trials table and Optuna's plots on the parent run, closed
    with `status` (and an `error` tag saying why, if it did not finish); the best trial's MLflow run
    (`run_id`, `experiment_id` and, if registered, `model`), None without a completed trial."""
    client, _ = mlflow_client(uri)
    if error:
        client.set_tag(parent_run_id, "error", error)
    trials = study.get_trials(deepcopy=False)
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        client.log_metric(parent_run_id, f"trials/{state.name.lower()}", sum(t.state == state for t in trials))
    best = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        client.log_metric(parent_run_id, objective, study.best_value)  # the runs table's column, on the sweep's row
        client.log_metric(parent_run_id, f"best/{objective}", study.best_value)
        for name, value in study.best_params.items():
            client.log_param(parent_run_id, f"best/{name}", value)
        client.set_tag(parent_run_id, "best_trial", study.best_trial.number)
        best = best_run(client, study, client.get_run(parent_run_id).info.experiment_id, objective)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(parent_run_id, str(table))
        for path in _plots(study, Path(tmp), objective) if best else ():
            client.log_artifact(parent_run_id, str(path), "plots")
    client.set_terminated(parent_run_id, status)
    return best


def best_run(client, study: optuna.Study, experiment_id: str, objective: str = OBJECTIVE) -> dict | None:
    """The best trial's FINISHED run (`run_id`, `experiment_id`), and its model registered as a version of
    `cfae-<study>` in the model registry (once per run; `model`: `models:/cfae-<study>/<version>`), so that
    `models:/cfae-<study>/latest` names the sweep's best model. None if the trial has no finished run here
    (a sweep without MLflow); no `model` if its run saved none."""
    name = f"cfae-{study.study_name}"
    runs = client.search_runs([experiment_id], f"tags.`optuna.study` = '{study.study_name}' and tags.`optuna.trial` = "
                              f"'{study.best_trial.number}' and attributes.status = 'FINISHED'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run = runs[0]
    found = {"run_id": run.info.run_id, "experiment_id": experiment_id}
    if not any(a.path == "model" for a in client.list_artifacts(run.info.run_id)) and not package(client, run):
        return found
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"The best trial of the Optuna study {study.study_name} "
                                                         f"(best {objective})")
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if not versions:
        versions = [client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                                tags={"optuna.trial": str(study.best_trial.number),
                                                      objective: str(study.best_value)})]
    return {**found, "model": f"models:/{name}/{versions[0].version}"}


def package(client, run) -> bool:
    """Package the model of a trial's run, which kept its checkpoints only (the sweep's trials have
    save_model=false), from its folder, and log it to the run; whether it could."""
    from cfae.train import packaged

    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
            saved = packaged(Path(OmegaConf.load(config).output_dir))
    except Exception as err:  # its folder on another machine, or gone: the sweep's own end comes first
        log.warning("the best trial's model could not be packaged: %s", launch.first_line(err))
        return False
    client.log_artifacts(run.info.run_id, str(saved), "model")
    return True


def _plots(study: optuna.Study, folder: Path, objective: str = OBJECTIVE) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("parallel_coordinate", ovm.plot_parallel_coordinate)):
        try:
            ax = plot(study, target_name=objective)
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

