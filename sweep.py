"""Sweep with Optuna: `python sweep.py -m model=deep hidden=300,500,750` (see conf/sweep.yaml)."""

import hydra
from omegaconf import DictConfig

from cfae.configs import register_resolvers
from cfae.console import quiet_libraries
from cfae.processes import keep_freed_memory
from cfae.train import OBJECTIVE, train


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    return train(cfg)[OBJECTIVE]  # what the sweeper minimises: val/rmse_best


register_resolvers()  # before Hydra composes: the sweeper resolves the trials' configs

if __name__ == "__main__":
    quiet_libraries()  # before Hydra starts: the sweeper opens the stores before any job runs
    main()
