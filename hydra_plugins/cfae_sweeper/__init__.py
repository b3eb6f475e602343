"""Hydra finds sweepers only under `hydra_plugins`: this registers cfae's two, each imported only when it starts,
which keeps every Hydra start-up fast. The Optuna sweeper (cfae/sweep.py) takes the configuration of the
hydra-optuna-sweeper plugin (`hydra/sweeper: optuna`, conf/sweep.yaml) with its class as the `_target_`; the
study's (cfae/study.py, `hydra/sweeper: study`) runs a plan of runs."""

import importlib

from hydra.plugins.sweeper import Sweeper


class _Imported(Sweeper):
    """The sweeper class named by `implementation`, imported when Hydra makes one."""

    implementation = ""

    def __init__(self, **config) -> None:
        module, name = self.implementation.rsplit(".", 1)
        self.sweeper = getattr(importlib.import_module(module), name)(**config)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


class CfaeOptunaSweeper(_Imported):
    implementation = "cfae.sweep.OptunaSweep"


class CfaeStudySweeper(_Imported):
    """`python -m cfae.study`: the plan's runs through Hydra's launchers."""

    implementation = "cfae.study.StudySweeper"
