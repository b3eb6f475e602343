"""python -m cfae.study: the whole study in one command, every row on every fold and the figures' runs.

    python -m cfae.study                                   # conf/study.yaml on ML-1M
    python -m cfae.study --name quick data=ml100k trainer.max_epochs=2 --folds 0,1
    python -m cfae.study --dry-run                         # list the runs and what is already done
    python -m cfae.study --config conf/study_kernels.yaml --only 'kernel_autorec/90-10/*'   # some runs only

Each run is what `python train.py +experiment=<row> data.fold=<k> <overrides>` would do, run in this
process, and becomes an MLflow run tagged `cfae.study=<name>`, `cfae.key=<what it is>` (for example
`deep/80-20/fold3` or `fig3_latent_size/fold0/hidden=300`), `cfae.protocol` and `cfae.figure`. A run is
done when the study has a FINISHED run with the same key and the same resolved configuration (the run's
`cfae.config` digest: dataset, split, model, optimizer, trainer, ...), so a study that dies resumes where it
stopped and changed settings are run anew; a run that fails is recorded (FAILED, with its error) and the
study goes on. `python -m cfae.report` renders it.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cfae.checks import check_config, reported_in_one_line
from cfae.configs import CONF, compose
from cfae.console import quiet_libraries
from cfae.processes import keep_freed_memory
from cfae.tracking import config_digest, finished_study_runs, mlflow_client
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
    cfg = compose(f"+experiment={run.experiment}", *overrides, *run.overrides, f"output_dir={output_dir}")
    with open_dict(cfg):
        if not cfg.get("logger"):
            raise SystemExit("the study records its runs in MLflow: drop logger=none")
        cfg.logger.tags = {**(cfg.logger.get("tags") or {}), **run.tags, "cfae.study": name, "cfae.key": run.key,
                           "cfae.command": command}
    return cfg


def finished(name: str, uri: str | None, experiment_name: str) -> set[tuple[str, str]]:
    """(key, config digest) of the study's FINISHED runs."""
    client, experiment_id = mlflow_client(uri, experiment_name)
    return {(r.data.tags["cfae.key"], r.data.tags.get("cfae.config", "")) for r in
            finished_study_runs(client, experiment_id, name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data=ml100k")
    parser.add_argument("--config", default=str(CONF / "study.yaml"), help="the study's plan")
    parser.add_argument("--name", help="the study's name in MLflow (default: the plan's)")
    parser.add_argument("--folds", help="comma-separated folds (default: the plan's)")
    parser.add_argument("--only", help="comma-separated patterns of run keys, e.g. 'kernel_autorec/90-10/*'")
    parser.add_argument("--output-dir", default="outputs/study", help="checkpoints and configs, per run")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    quiet_libraries()
    study = OmegaConf.load(args.config)
    name = args.name or study.name
    runs = plan(study, [int(f) for f in args.folds.split(",")] if args.folds else None)
    if args.only:
        patterns = args.only.split(",")
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]
        if not runs:
            parser.error(f"--only {args.only}: no run of {args.config} has a key like that")
    command = shlex.join(["python", "-m", "cfae.study", *(argv if argv is not None else sys.argv[1:])])
    configs = [compose_run(r, name, args.overrides, Path(args.output_dir) / name, command) for r in runs]
    with reported_in_one_line():  # a bad value is refused before the first run, not in every run
        for cfg in configs:
            check_config(cfg)
        done = finished(name, configs[0].logger.uri, configs[0].logger.experiment_name)
    is_done = [(r.key, config_digest(c)) in done for r, c in zip(runs, configs)]
    todo = [(r, c) for r, c, d in zip(runs, configs, is_done) if not d]
    log.info("study %r: %d runs, %d already finished, %d to run", name, len(runs), len(runs) - len(todo), len(todo))
    if args.dry_run:
        for r, d in zip(runs, is_done):
            print(f"{'done' if d else 'todo'}  {r.key}  +experiment={r.experiment} {' '.join(r.overrides)}")
        return 0
    if configs[0].keep_freed_memory:
        keep_freed_memory()
    failed, start = [], time.perf_counter()
    for i, (run, cfg) in enumerate(todo, 1):
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed / (i - 1) * (len(todo) - i + 1) / 60:.0f} min left" if i > 1 else ""
        log.info("[%d/%d] %s (%.0f min so far%s)", i, len(todo), run.key, elapsed / 60, eta)
        try:
            train(cfg)
        except Exception as err:  # recorded as FAILED in MLflow by train(); the study goes on
            log.error("%s failed: %s: %s", run.key, type(err).__name__, err)
            failed.append(run.key)
    log.info("study %r: %d runs in %.1f min, %d failed%s", name, len(todo), (time.perf_counter() - start) / 60,
             len(failed), f": {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
