"""python -m cfae.study: the whole study in one command, every row on every fold and the figures' runs.

    python -m cfae.study                                   # conf/study.yaml on ML-1M
    python -m cfae.study --name quick data=ml100k trainer.max_epochs=2 --folds 0,1
    python -m cfae.study --dry-run                         # list the runs and what is already done
    python -m cfae.study --config conf/study_kernels.yaml --only 'kernel_autorec/90-10/*'   # some runs only
    python -m cfae.study --jobs 2                          # two runs at a time, each with its share of the cores
    python -m cfae.study --only '*/80-20/*,fig*' --skip 'study_*'   # the 80:20 table and figures, tuned rows
    python -m cfae.study --jobs 8 hydra/launcher=submitit_slurm hydra.launcher.partition=gpu   # on a cluster

Each run is what `python train.py +experiment=<row> data.fold=<k> <overrides>` would do, and becomes an
MLflow run tagged `cfae.study=<name>`, `cfae.key=<what it is>` (for example `deep/80-20/fold3` or
`fig3_latent_size/fold0/hidden=300`), `cfae.protocol` and `cfae.figure`. A run is done when the study has a
FINISHED run with the same key and the same resolved configuration (the run's `cfae.config` digest: dataset,
split, model, optimizer, trainer, ...), so a study that dies resumes where it stopped and changed settings
are run anew; a run that fails is recorded (FAILED, with its error) and the study goes on. `python -m
cfae.report` renders it.

The runs go through Hydra's launchers, as a sweep's trials do (cfae/launch.py): one at a time in this process
(`hydra/launcher=basic`, the default), `--jobs N` at a time in worker processes (`joblib`, the default with
`--jobs`), as jobs of their own (`submitit_local`, in batches of N), or on a SLURM cluster (`submitit_slurm`,
in arrays of N). A local run gets its share of the cores or, where there are GPUs, one of them. A run whose
process dies (killed, out of memory; with joblib the runs beside it die too) is closed FAILED and tried once
more. Ctrl-C, SIGTERM or SIGHUP stops every run (state saved, MLflow run KILLED), wherever it runs, and starts
no new one. Each run's log is in its folder (<output-dir>/<name>/<key>/run.log); the study's log has a line
as each run starts and ends.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import io
import logging
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from cfae import launch
from cfae.checks import ConfigError, check_config, reported_in_one_line
from cfae.configs import CONF
from cfae.console import logging_kept
from cfae.metrics import FIT_SECONDS, headline
from cfae.processes import has_died, keep_freed_memory, this_process
from cfae.tracking import PROCESS_DIED, close_dead_runs, config_digest, finished_study_runs, mlflow_client

log = logging.getLogger("cfae.study")

TRIES = 2  # a run whose process died is tried once more


@dataclass
class Run:
    key: str  # unique within a study
    experiment: str  # conf/experiment/<experiment>.yaml
    overrides: list[str]
    tags: dict[str, str] = field(default_factory=dict)


def plan(study: DictConfig, folds: list[int] | None = None) -> list[Run]:
    """Every run of the study, fold by fold for the table (fold 0's rows first: a partial study already
    has a whole row set), then the figures' runs, then the other protocols."""
    folds = folds if folds is not None else list(study.folds)
    runs = []
    for i, (protocol, spec) in enumerate(study.protocols.items()):
        for fold in folds:
            for row in spec.get("rows") or study.rows:
                runs.append(Run(f"{row}/{protocol}/fold{fold}", row, [*spec.overrides, f"data.fold={fold}"],
                                {"cfae.protocol": protocol}))
        if i == 0:  # the figures use the study's own protocol, the first
            figure_folds = [f for f in study.figure_folds if f in folds]
            runs += figure_runs(study, figure_folds, list(spec.overrides), protocol)
    return runs


def figure_runs(study: DictConfig, folds: list[int], overrides: list[str], protocol: str) -> list[Run]:
    runs = []
    for figure, spec in study.figures.items():
        values = spec.get("values") or [None]
        for fold in folds:
            for value in values:
                setting = [f"{spec.knob}={value}"] if value is not None else []
                runs.append(Run("/".join([figure, f"fold{fold}", *setting]), spec.experiment,
                                [*overrides, f"data.fold={fold}", *setting],
                                {"cfae.protocol": protocol, "cfae.figure": figure}))
    return runs


def matches(key: str, patterns: str) -> bool:
    """Whether a run key matches one of comma-separated shell patterns."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns.split(","))



def planned(config: str, folds: str | None = None, only: str | None = None, skip: str | None = None) -> list[Run]:
    """The runs of the plan at `config`, on the comma-separated `folds` (default: the plan's), those whose key
    matches a pattern of `only` and none of `skip`."""
    runs = plan(OmegaConf.load(config), [int(f) for f in folds.split(",")] if folds else None)
    if only:
        runs = [r for r in runs if matches(r.key, only)]
        if not runs:
            raise ConfigError(f"--only {only}: no run of {config} has a key like that")
    if skip:
        runs = [r for r in runs if not matches(r.key, skip)]
        if not runs:
            raise ConfigError(f"--skip {skip}: it leaves no run of {config} to run")
    return runs


def finished(name: str, uri: str | None, experiment_name: str) -> set[tuple[str, str]]:
    """(key, config digest) of the study's FINISHED runs: the digest each run computed, and the one the study
    computed for it (`cfae.planned`)."""
    client, experiment_id = mlflow_client(uri, experiment_name)
    close_dead_runs(client, experiment_id)  # a run killed in an earlier try is FAILED, so not done
    return {(r.data.tags["cfae.key"], r.data.tags.get(tag, "")) for r in
            finished_study_runs(client, experiment_id, name) for tag in ("cfae.config", "cfae.planned")}


def progress(done: int, total: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    eta = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done else ""
    return f"{elapsed / 60:.0f} min so far{eta}"


class StudySweeper(Sweeper):
    """The study as a Hydra sweeper (`hydra/sweeper=study`, conf/hydra/sweeper/study.yaml; `main` sets its keys
    from the command line): the plan's runs not yet done, handed to the launcher in batches."""

    def __init__(self, plan: str, name: str, folds: str | None, only: str | None, skip: str | None,
                 jobs: int | None, dry_run: bool, command: str):
        self.plan_path, self.name, self.folds, self.only, self.skip = plan, name, folds, only, skip
        self.jobs, self.dry_run, self.command = jobs, dry_run, command

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.stop_file = Path(config.hydra.sweep.dir).resolve() / ".stop"  # in the folder every job sees
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        with reported_in_one_line():  # a bad value is refused before the first run, not in every run
            if not self.config.get("logger"):
                raise ConfigError("logger=none: the study records its runs in MLflow; drop logger=none")
            runs = planned(self.plan_path, self.folds, self.only, self.skip)
            digests = {r.key: self.checked_digest(self.job_overrides(r, arguments)) for r in runs}
            jobs = {r.key: self.job_overrides(r, arguments, digests[r.key]) for r in runs}
            done = finished(self.name, self.config.logger.uri, self.config.logger.experiment_name)
        todo = [r for r in runs if (r.key, digests[r.key]) not in done]
        log.info("study %r: %d runs, %d already finished, %d to run", self.name, len(runs), len(runs) - len(todo),
                 len(todo))
        logger = self.config.logger
        report = shlex.join(["python", "-m", "cfae.report", "--study", self.name,
                             *(["--uri", logger.uri] if logger.uri else [])])
        if self.dry_run:
            for r in runs:
                print(f"{'todo' if r in todo else 'done'}  {r.key}  +experiment={r.experiment} {' '.join(r.overrides)}")
            log.info("dry run: %d runs to run; without --dry-run they run, then %s renders the study", len(todo),
                     report)
            return
        start = time.perf_counter()
        failed, stopped = self.run_all(todo, jobs)
        log.info("study %r: %d runs in %.1f min, %d failed%s%s", self.name, len(todo),
                 (time.perf_counter() - start) / 60, len(failed), f": {', '.join(failed)}" if failed else "",
                 f"; stopped by {stopped.name}" if stopped else "")
        log.info("its table and figures: %s", report)
        if stopped or failed:
            raise SystemExit(128 + stopped if stopped else 1)

    def job_overrides(self, run: Run, arguments: list[str], planned: str = "") -> list[str]:
        """The run as its job's overrides: `train.py`'s, the study's tags on its MLflow run (`cfae.planned`: the
        digest of its config as the study composed it, which resumes it even where the job resolves a value
        otherwise: a GPU node's precision), its folder and the file that stops it. Its own overrides (fold,
        protocol, the figure's knob) come after the command's: they win. Its checkpoints, not a packaged model
        (12 MB a run on ML-1M), unless the command says save_model=true."""
        tags = {**run.tags, "cfae.study": self.name, "cfae.key": run.key, "cfae.command": self.command,
                "cfae.planned": planned}
        return [f"+experiment={run.experiment}", "save_model=false", *arguments, *run.overrides,
                "++logger.tags={" + ",".join(f"{k}:{launch.quoted(v)}" for k, v in tags.items()) + "}",
                f"hydra.sweep.subdir={launch.quoted(run.key.replace('=', '-'))}", "trainer.enable_progress_bar=false",
                f"++callbacks.study_stop={{_target_:cfae.launch.StopWhenAsked,path:{launch.quoted(self.stop_file)},"
                f"command:{launch.quoted(this_process())}}}"]

    def checked_digest(self, overrides: list[str]) -> str:
        """The run's config, composed as its launcher will compose it, checked; its digest."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        HydraConfig.instance().set_config(cfg)  # what ${hydra:...} resolves against, as a launcher sets it
        with open_dict(cfg):
            del cfg["hydra"]
        check_config(cfg)
        return config_digest(cfg)

    def batch_size(self, n: int) -> int:
        """How many of the `n` runs left go to the launcher at once: one for the basic launcher (the study sees
        each end); for joblib all on CPUs (it starts them `n_jobs` at a time as workers free up), its `n_jobs`
        with GPUs (a GPU each is given batch by batch); for submitit `--jobs` (its local launcher starts a
        batch at once), or all."""
        launcher = self.config.hydra.launcher
        if launch.kind(launcher) == "basic":
            return 1
        if launch.kind(launcher) == "joblib":
            import torch

            return min(n, launch.local_parallelism(launcher, n)) if torch.cuda.device_count() else n
        return min(n, self.jobs or n)

    def run_all(self, todo: list[Run], jobs: dict[str, list[str]]) -> tuple[list[str], signal.Signals | None]:
        """Every run of `todo`, through the launcher: (the keys of those that failed, the signal that stopped the
        study, if one did)."""
        queue, tries, failed, ended, start = list(todo), collections.Counter(), [], 0, time.perf_counter()
        launcher = launch.kind(self.config.hydra.launcher)
        with launch.stopped_by_signals(self.stop_file) as signalled:
            while queue and not signalled():
                size = self.batch_size(len(queue))
                batch, queue = queue[:size], queue[size:]
                since = int(time.time() * 1000)
                where = launch.placement(self.config.hydra.launcher, len(batch))
                try:
                    returns = self.launcher.launch([[*jobs[r.key], *w] for r, w in zip(batch, where)],
                                                   initial_job_idx=self.job_idx)
                    outcomes = [outcome(ret) for ret in returns]
                except Exception as err:  # a worker died and took its launcher's pool down (joblib, submitit)
                    log.error("the launcher lost its jobs: %s", launch.first_line(err))
                    outcomes = self.outcomes_in_store(batch, since)
                    if all(result is None for result in outcomes):  # not one run started: it cannot go on
                        raise
                    if launcher != "joblib":  # whose jobs may yet start (queued): not run again beside themselves
                        outcomes = [RuntimeError(f"not known to have run when its launcher failed ({err}); run the "
                                                 "study again to run it") if result is None else result
                                    for result in outcomes]
                self.job_idx += len(batch)
                for run, result in zip(batch, outcomes):
                    if result is None:  # never started: joblib's pool died with a worker before it took the run
                        queue.append(run)
                        continue
                    if result == DIED:
                        tries[run.key] += 1
                        if tries[run.key] < TRIES:
                            log.warning("%s: its process died; it is tried again", run.key)
                            queue.append(run)
                            continue
                        log.error("%s failed: its process died, %d times", run.key, tries[run.key])
                        failed.append(run.key)
                    elif isinstance(result, launch.Stopped):
                        if launcher == "basic":  # the signal came to the study itself
                            return failed, signalled() or result.signal
                        if result.signal is None:  # the study was stopping: it did not start
                            continue
                        if not signalled():  # someone stopped this run alone
                            failed.append(run.key)
                    elif isinstance(result, BaseException):
                        log.error("%s failed: %s: %s", run.key, type(result).__name__, launch.first_line(result))
                        failed.append(run.key)
                    ended += 1
                log.info("%d of %d runs ended (%s)", ended, len(todo), progress(ended, len(todo), start))
            return failed, signalled()

    def outcomes_in_store(self, batch: list[Run], since: int) -> list:
        """How each run of a batch whose launcher failed ended, from the MLflow store, once the batch's runs still
        alive on this machine have ended: its metrics (FINISHED), Stopped (KILLED), DIED (its process died), its
        error (FAILED, or still running on another machine: not run again beside itself), or None (never
        started)."""
        client, experiment_id = mlflow_client(self.config.logger.uri, self.config.logger.experiment_name)
        query = f"tags.`cfae.study` = '{self.name}' and attributes.start_time >= {since}"
        here = socket.gethostname() + ":"
        while any(r.info.status == "RUNNING" and r.data.tags.get("cfae.process", "").startswith(here)
                  and not has_died(r.data.tags["cfae.process"]) for r in client.search_runs([experiment_id], query)):
            time.sleep(1)
        close_dead_runs(client, experiment_id)
        newest = {}
        for r in client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"]):
            newest[r.data.tags.get("cfae.key")] = r
        outcomes = []
        for run in batch:
            r = newest.get(run.key)
            error = r.data.tags.get("error", "") if r else ""
            if r is None:
                outcomes.append(None)
            elif r.info.status == "RUNNING":
                outcomes.append(RuntimeError("still running on another machine when its launcher failed; run the "
                                             "study again once it has ended"))
            elif r.info.status in ("FINISHED", "KILLED"):
                outcomes.append(r.data.metrics if r.info.status == "FINISHED" else launch.Stopped(signal.SIGTERM))
            else:
                outcomes.append(DIED if PROCESS_DIED in error else RuntimeError(error))
        return outcomes


DIED = "died"  # how a run ended whose process died before it could close it


def outcome(ret: JobReturn):
    """What a job returned (a run's metrics, or Stopped), or the exception it raised."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # Hydra's "Error executing job with overrides: [...]"
            return ret.return_value  # raises the job's exception, which the study says in one line
    except Exception as err:
        return err


def run_one(cfg: DictConfig) -> dict[str, float] | launch.Stopped:
    """A study's run, in the job its launcher gave it: trained as train.py trains one, a line to the study's log as
    it starts and ends; Stopped if the study is stopping (it does not start) or a signal stopped it (KILLED)."""
    from cfae.console import quiet_libraries
    from cfae.train import train

    key, stop = cfg.logger.tags["cfae.key"], cfg.callbacks.get("study_stop")
    if stop is not None and Path(stop.path).exists():
        return launch.Stopped()
    if stop is not None:
        launch.leave_the_terminal(stop.command)
    quiet_libraries()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    said = logging.getLogger("cfae.study.run")  # the run's lines: the console and the run's own log
    said.info("%s started", key)
    try:
        metrics = train(cfg)
    except SystemExit as err:
        if isinstance(err.code, int) and err.code > 128:
            signum = signal.Signals(err.code - 128)
            said.warning("%s stopped by %s", key, signum.name)
            return launch.Stopped(signum)
        raise
    said.info("%s done in %.0f s: %s", key, metrics[FIT_SECONDS], headline(metrics))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data=ml100k; "
                                                     "hydra/launcher=... picks where the runs go")
    parser.add_argument("--config", default=str(CONF / "study.yaml"), help="the study's plan")
    parser.add_argument("--name", help="the study's name in MLflow (default: the plan's)")
    parser.add_argument("--folds", help="comma-separated folds (default: the plan's)")
    parser.add_argument("--only", help="comma-separated patterns of run keys, e.g. 'kernel_autorec/90-10/*'")
    parser.add_argument("--skip", help="comma-separated patterns of run keys to leave out, e.g. 'study_*'")
    parser.add_argument("--output-dir", default="outputs/study", help="checkpoints, configs and logs, per run")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: 1, or what the launcher given says; "
                                                 "more than 1: hydra/launcher=joblib unless another is given)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more runs at a time")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    try:
        planned(args.config, args.folds, args.only, args.skip)
    except ConfigError as err:
        parser.error(str(err))
    overrides = list(args.overrides)
    launcher = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")), None)
    if launcher is None and (args.jobs or 1) > 1:
        launcher = "joblib"
        overrides.append("hydra/launcher=joblib")
    if launcher == "joblib" and args.jobs and not any(o.startswith("hydra.launcher.n_jobs=") for o in overrides):
        overrides.append(f"hydra.launcher.n_jobs={args.jobs}")
    if launcher == "basic" and (args.jobs or 1) > 1:
        parser.error(f"--jobs {args.jobs}: hydra/launcher=basic runs one at a time")
    name = args.name or OmegaConf.load(args.config).name
    command = shlex.join(["python", "-m", "cfae.study", *(argv if argv is not None else sys.argv[1:])])
    settings = {"plan": str(Path(args.config).resolve()), "name": name, "folds": args.folds, "only": args.only,
                "skip": args.skip, "jobs": args.jobs, "dry_run": args.dry_run, "command": command}
    study = [f"hydra.sweeper.{k}={'null' if v is None else launch.quoted(v) if isinstance(v, str) else v}"
             for k, v in settings.items()]
    from cfae.cli import study_runs

    argv_before, sys.argv = sys.argv, ["cfae study", "--multirun", "hydra/sweeper=study", "hydra/job_logging=study",
                                       "hydra/hydra_logging=study", *study,
                                       f"hydra.sweep.dir={launch.quoted(Path(args.output_dir) / name)}", *overrides]
    hydra_config = HydraConfig.instance().cfg  # the launcher leaves its last job's there
    try:
        with logging_kept():  # for a caller in Python; a command's process ends here anyway
            study_runs()
    finally:
        sys.argv, HydraConfig.instance().cfg = argv_before, hydra_config
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
