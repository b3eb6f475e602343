"""Hydra finds sweepers only under `hydra_plugins`: this registers cfae's Optuna sweeper (cfae/sweep.py,
imported when a sweep starts, which keeps every Hydra start-up fast). It takes the configuration of the
hydra-optuna-sweeper plugin (`hydra/sweeper: optuna`, conf/sweep.yaml) with this class as its `_target_`."""

from hydra.plugins.sweeper import Sweeper


class CfaeOptunaSweeper(Sweeper):
    def __init__(self, **config) -> None:
        from cfae.sweep import OptunaSweep

        self.sweeper = OptunaSweep(**config)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
