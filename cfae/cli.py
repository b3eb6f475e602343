"""The command lines: `cfae <command>` (or `python -m cfae <command>`) where cfae is installed, `python train.py`
and `python sweep.py` in a clone. `cfae --help` lists the commands."""

from __future__ import annotations

import sys

from cfae.processes import keep_freed_memory, openmp_spins_briefly

openmp_spins_briefly()  # before torch loads (cfae.checks and cfae.configs load it)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cfae.checks import reported_in_one_line  # noqa: E402
from cfae.configs import CONF, register_resolvers  # noqa: E402
from cfae.console import quiet_libraries  # noqa: E402

register_resolvers()  # before Hydra composes: `--cfg job --resolve` and the sweeper resolve them too


@hydra.main(config_path=str(CONF), config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float:
    from cfae.train import train

    quiet_libraries()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    with reported_in_one_line():  # a bad value or data file: one line and exit 1 (HYDRA_FULL_ERROR=1: traceback)
        if cfg.get("logger"):
            from cfae.tracking import close_dead_runs, mlflow_client

            close_dead_runs(*mlflow_client(cfg.logger.uri, cfg.logger.experiment_name))
        return train(cfg)[cfg.task.objective]


@hydra.main(config_path=str(CONF), config_name="sweep", version_base="1.3")
def _sweep(cfg: DictConfig) -> float | None:
    from cfae.callbacks import StopRun
    from cfae.train import train

    quiet_libraries()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    try:
        return train(cfg)[cfg.task.objective]  # what the sweeper optimises; a trial's error goes to it, which says it
    except StopRun:  # pruned: no value
        return None


@hydra.main(config_path=str(CONF), config_name="train", version_base="1.3")
def _study_run(cfg: DictConfig):
    from cfae.study import run_one

    return run_one(cfg)  # its metrics, or that it was stopped; an error goes to the study, which says it


def train() -> None:
    """One run: `python train.py model=vae data.fold=3` (conf/train.yaml)."""
    quiet_libraries()  # before Hydra starts
    _train()


def sweep() -> None:
    """An Optuna sweep: `python sweep.py -m model=deep hidden=300,500,750` (conf/sweep.yaml)."""
    quiet_libraries()  # before Hydra starts: the sweeper opens the stores before any job runs
    _sweep()


def study_runs() -> None:
    """A study's runs (`python -m cfae.study` builds the Hydra command line: hydra/sweeper=study)."""
    quiet_libraries()  # before Hydra starts: the study opens the store before any run
    _study_run()


def _module(name: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"cfae.{name}").main(argv)

    return run


COMMANDS = {  # name: (what it does, how it runs with the arguments after the name)
    "train": ("train one model (Hydra overrides: model=vae data.fold=3)", None),
    "sweep": ("search a model's settings with Optuna (overrides; -m is added)", None),
    "study": ("run the study's plan of runs (conf/study.yaml)", _module("study")),
    "report": ("render a study's table and figures", _module("report")),
    "blend": ("blend a study's rows, weights fitted on validation", _module("blend")),
    "recommend": ("a saved model's top-k items for a user", _module("recommend")),
    "evaluate": ("test a saved model on another split or file", _module("evaluate")),
    "configs": ("print the whole configuration of a run", _module("configs")),
}


def usage() -> str:
    lines = ["usage: cfae <command> [arguments]  (python -m cfae <command> [arguments])", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, (what, _) in COMMANDS.items()]
    lines += ["", "cfae <command> --help says more; in a clone, python train.py and python sweep.py -m run the "
              "first two."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: {name}: not a cfae command\n\n{usage()}", file=sys.stderr)
        return 1
    if name in ("train", "sweep"):  # Hydra reads its overrides from sys.argv
        if name == "sweep" and not {"-m", "--multirun"} & set(rest):
            rest = ["-m", *rest]
        sys.argv = [f"cfae {name}", *rest]
        (train if name == "train" else sweep)()
        return 0
    return COMMANDS[name][1](rest)
