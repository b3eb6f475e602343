"""Hydra finds sweepers only under `hydra_plugins`: this registers cfae's extension of the Optuna
sweeper (the logic lives in cfae/sweep.py, imported lazily to keep every Hydra start-up fast)."""

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class CfaeOptunaSweeper(OptunaSweeper):
    def __init__(self, sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                 search_space, custom_search_space, params) -> None:
        from cfae.sweep import CfaeOptunaSweeperImpl

        self.sweeper = CfaeOptunaSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs,
                                             max_failure_rate, search_space, custom_search_space, params)
