"""python -m cfae.study: the whole study in one command, every row on every fold and the figures' runs.

    python -m cfae.study                                   # conf/study.yaml on ML-1M
    python -m cfae.study --name quick data=ml100k trainer.max_epochs=2 --folds 0,1
    python -m cfae.study --dry-run                         # list the runs and what is already done
    python -m cfae.study --config conf/study_kernels.yaml --only 'kernel_autorec/90-10/*'   # some runs only
    python -m cfae.study --jobs 2                          # two runs at a time, one core (or one GPU) each
    python -m cfae.study --only '*/80-20/*,fig*' --skip 'study_*'   # the 80:20 table and figures, tuned rows

Each run is what `python train.py +experiment=<row> data.fold=<k> <overrides>` would do, run in this
process (with `--jobs`, in worker processes), and becomes an MLflow run tagged `cfae.study=<name>`,
`cfae.key=<what it is>` (for example `deep/80-20/fold3` or `fig3_latent_size/fold0/hidden=300`),
`cfae.protocol` and `cfae.figure`. A run is
done when the study has a FINISHED run with the same key and the same resolved configuration (the run's
`cfae.config` digest: dataset, split, model, optimizer, trainer, ...), so a study that dies resumes where it
stopped and changed settings are run anew; a run that fails is recorded (FAILED, with its error) and the
study goes on. `python -m cfae.report` renders it.

With `--jobs N` the runs go N at a time, each in a process of its own with an equal share of the cores
(`threads`) and, where there are GPUs, one of them. Where a run is this small (ML-1M on a CPU) most of an
epoch's time is not parallel, so two one-core runs get through a study sooner than one two-core run at a
time (benchmarks in docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import multiprocessing
import os
import queue
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cfae.checks import check_config, reported_in_one_line
from cfae.configs import CONF, compose
from cfae.console import quiet_benchmark, quiet_libraries
from cfae.metrics import FIT_SECONDS, headline
from cfae.processes import keep_freed_memory, openmp_spins_briefly, usable_cores
from cfae.tracking import close_dead_runs, config_digest, finished_study_runs, mlflow_client
from cfae.train import train

log = logging.getLogger("cfae.study")


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


def compose_run(run: Run, name: str, overrides: list[str], output_root: Path, command: str = "") -> DictConfig:
    """The run's training config, as train.py would compose it, with the study's tags on its logger. The
    run's own overrides (fold, protocol, the figure's knob) come last: they win over the study-wide ones."""
    output_dir = output_root / run.key.replace("=", "-")
    # its checkpoints, not a packaged model (12 MB a run on ML-1M), unless the command says save_model=true
    cfg = compose(f"+experiment={run.experiment}", "save_model=false", *overrides, *run.overrides,
                  f"output_dir={output_dir}")
    with open_dict(cfg):
        if not cfg.get("logger"):
            raise SystemExit("the study records its runs in MLflow: drop logger=none")
        cfg.logger.tags = {**(cfg.logger.get("tags") or {}), **run.tags, "cfae.study": name, "cfae.key": run.key,
                           "cfae.command": command}
    return cfg


def finished(name: str, uri: str | None, experiment_name: str) -> set[tuple[str, str]]:
    """(key, config digest) of the study's FINISHED runs."""
    client, experiment_id = mlflow_client(uri, experiment_name)
    close_dead_runs(client, experiment_id)  # a run killed in an earlier try is FAILED, so not done
    return {(r.data.tags["cfae.key"], r.data.tags.get("cfae.config", "")) for r in
            finished_study_runs(client, experiment_id, name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data=ml100k")
    parser.add_argument("--config", default=str(CONF / "study.yaml"), help="the study's plan")
    parser.add_argument("--name", help="the study's name in MLflow (default: the plan's)")
    parser.add_argument("--folds", help="comma-separated folds (default: the plan's)")
    parser.add_argument("--only", help="comma-separated patterns of run keys, e.g. 'kernel_autorec/90-10/*'")
    parser.add_argument("--skip", help="comma-separated patterns of run keys to leave out, e.g. 'study_*'")
    parser.add_argument("--output-dir", default="outputs/study", help="checkpoints and configs, per run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with an equal share of the cores (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more runs at a time")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    quiet_libraries()
    study = OmegaConf.load(args.config)
    name = args.name or study.name
    runs = plan(study, [int(f) for f in args.folds.split(",")] if args.folds else None)
    if args.only:
        runs = [r for r in runs if matches(r.key, args.only)]
        if not runs:
            parser.error(f"--only {args.only}: no run of {args.config} has a key like that")
    if args.skip:
        runs = [r for r in runs if not matches(r.key, args.skip)]
        if not runs:
            parser.error(f"--skip {args.skip}: it leaves no run of {args.config} to run")
    command = shlex.join(["python", "-m", "cfae.study", *(argv if argv is not None else sys.argv[1:])])
    configs = [compose_run(r, name, args.overrides, Path(args.output_dir) / name, command) for r in runs]
    with reported_in_one_line():  # a bad value is refused before the first run, not in every run
        for cfg in configs:
            check_config(cfg)
        done = finished(name, configs[0].logger.uri, configs[0].logger.experiment_name)
    is_done = [(r.key, config_digest(c)) in done for r, c in zip(runs, configs)]
    todo = [(r, c) for r, c, d in zip(runs, configs, is_done) if not d]
    log.info("study %r: %d runs, %d already finished, %d to run", name, len(runs), len(runs) - len(todo), len(todo))
    report = shlex.join(["python", "-m", "cfae.report", "--study", name,
                         *(["--uri", configs[0].logger.uri] if configs[0].logger.uri else [])])
    if args.dry_run:
        for r, d in zip(runs, is_done):
            print(f"{'done' if d else 'todo'}  {r.key}  +experiment={r.experiment} {' '.join(r.overrides)}")
        log.info("dry run: %d runs to run; without --dry-run they run, then %s renders the study", len(todo), report)
        return 0
    if configs[0].keep_freed_memory:
        keep_freed_memory()
    openmp_spins_briefly()  # for the workers' torch (this process's is loaded already)
    start = time.perf_counter()
    failed = run_in_parallel(todo, args.jobs) if args.jobs > 1 and todo else run_in_turn(todo)
    log.info("study %r: %d runs in %.1f min, %d failed%s", name, len(todo), (time.perf_counter() - start) / 60,
             len(failed), f": {', '.join(failed)}" if failed else "")
    log.info("its table and figures: %s", report)
    return 1 if failed else 0


def matches(key: str, patterns: str) -> bool:
    """Whether a run key matches one of comma-separated shell patterns."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns.split(","))


def progress(done: int, total: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    eta = f", about {elapsed / done * (total - done) / 60:.0f} min left" if done else ""
    return f"{elapsed / 60:.0f} min so far{eta}"


def run_in_turn(todo: list[tuple[Run, DictConfig]]) -> list[str]:
    """Each run in this process, one after the other; the keys of those that failed."""
    failed, start = [], time.perf_counter()
    for i, (run, cfg) in enumerate(todo, 1):
        log.info("[%d/%d] %s (%s)", i, len(todo), run.key, progress(i - 1, len(todo), start))
        try:
            train(cfg)
        except Exception as err:  # recorded as FAILED in MLflow by train(); the study goes on
            log.error("%s failed: %s: %s", run.key, type(err).__name__, err)
            failed.append(run.key)
    return failed


def run_in_parallel(todo: list[tuple[Run, DictConfig]], jobs: int) -> list[str]:
    """The runs `jobs` at a time, each worker process with cores // jobs threads and, where there are GPUs,
    one of them; the keys of those that failed. A worker that dies (killed, out of memory) fails its run and
    is replaced. Ctrl-C, SIGTERM or SIGHUP stops every run as train.py stops one (state saved, MLflow run
    KILLED) and takes no more."""
    import torch

    jobs = min(jobs, len(todo))
    threads, n_gpus = max(1, usable_cores() // jobs), torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the GPUs this study may use, as the study was given them
    gpus = visible.split(",")[:n_gpus] if visible else [str(i) for i in range(n_gpus)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    tasks, results, stopping = context.Queue(), context.Queue(), context.Event()
    for run, cfg in todo:
        with open_dict(cfg):
            cfg.threads = cfg.get("threads") or threads
            cfg.trainer.enable_progress_bar = False  # one progress line per run from here instead
        tasks.put((run.key, cfg))
    # Runs still queued when the study is stopped are never read: without this, exiting would wait for ever
    # to push them into a pipe no worker reads.
    tasks.cancel_join_thread()
    configs = {run.key: cfg for run, cfg in todo}
    workers: dict[int, multiprocessing.Process] = {}

    def start_worker(slot: int) -> None:
        tasks.put(None)  # its stop sign, behind every run (a spare one, left by a worker that died, is harmless)
        gpu = gpus[slot % len(gpus)] if gpus else None
        workers[slot] = context.Process(target=work, args=(tasks, results, stopping, gpu), name=f"cfae-study-{slot}")
        workers[slot].start()

    running: dict[int, str] = {}  # worker pid -> key of its run
    started, ended, failed, start = set(), set(), [], time.perf_counter()

    def handle(pid: int, key: str, outcome) -> None:
        if outcome is None:
            running[pid] = key
            started.add(key)
            log.info("[%d/%d] %s started (%s)", len(started), len(todo), key, progress(len(ended), len(todo), start))
            return
        running.pop(pid, None)
        ended.add(key)
        if isinstance(outcome, str):
            log.error("%s failed: %s", key, outcome)
            failed.append(key)
        else:
            log.info("%s done in %.0f s: %s", key, outcome[FIT_SECONDS], headline(outcome))

    with stopped_together(workers, stopping):
        for slot in range(jobs):
            start_worker(slot)
        restarts = 0
        while len(ended) < len(todo):
            try:
                handle(*results.get(timeout=1))
                continue
            except queue.Empty:
                pass
            dead = [(slot, w) for slot, w in workers.items() if not w.is_alive()]
            with contextlib.suppress(queue.Empty):  # what the dead said before they died comes first
                while True:
                    handle(*results.get_nowait())
            for slot, worker in dead:
                del workers[slot]
                key = running.pop(worker.pid, None)
                if worker.exitcode == 0:  # took its stop sign after its last run
                    continue
                if key is not None and key not in ended:  # killed during a run: its MLflow run FAILED now
                    log.error("%s failed: its process died (exit code %s)", key, worker.exitcode)
                    ended.add(key)
                    failed.append(key)
                    logger = configs[key].logger
                    close_dead_runs(*mlflow_client(logger.uri, logger.experiment_name))
                if restarts < len(todo):  # not for ever if workers die on their own, before any run
                    restarts += 1
                    start_worker(slot)
            if not workers:
                break
    never = [run.key for run, _ in todo if run.key not in started]
    if never:  # a worker died between taking a run and starting it
        log.error("%d runs were never started: %s", len(never), ", ".join(never))
    return failed + [key for key in never if key not in failed]


@contextlib.contextmanager
def stopped_together(workers: dict, stopping) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP (once; more are ignored) stops the workers' runs, each saving its state and
    ending KILLED, then the study; so does an error in the study itself. The workers are waited for."""

    def stop(signum, frame) -> None:
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        yield
    except BaseException:
        stopping.set()  # take no more runs
        for worker in workers.values():
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        raise
    finally:
        for worker in workers.values():
            worker.join()
        for s, handler in previous.items():
            signal.signal(s, handler)


def work(tasks, results, stopping, gpu: str | None) -> None:
    """A worker process: runs (key, cfg) from `tasks` until a stop sign or the study's stop, telling
    `results` when each starts (pid, key, None) and how it ended: (pid, key, metrics) or (pid, key, "error")."""
    os.setpgrp()  # out of the terminal's process group: Ctrl-C reaches the study, which stops each run once
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA starts in this process
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s] %(message)s")
    quiet_benchmark()  # the study prints each run's start and end; a worker only its warnings and errors
    logging.getLogger("cfae").setLevel(logging.WARNING)
    study = os.getppid()
    for key, cfg in iter(tasks.get, None):
        if stopping.is_set() or os.getppid() != study:  # stopped, or the study was killed outright
            return
        if cfg.keep_freed_memory:
            keep_freed_memory()
        results.put((os.getpid(), key, None))
        try:
            results.put((os.getpid(), key, train(cfg)))
        except Exception as err:  # recorded as FAILED in MLflow by train()
            results.put((os.getpid(), key, f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    raise SystemExit(main())
