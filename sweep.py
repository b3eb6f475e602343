"""Sweep with Optuna: `python sweep.py -m model=deep hidden=300,500,750` (see conf/sweep.yaml)."""

import warnings

import hydra
import optuna
from omegaconf import DictConfig

from cfae.console import quiet_libraries
from cfae.train import OBJECTIVE, train

# The sweeper's TPE schema passes options Optuna 5 deprecates, and Optuna's plots are "experimental".
warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    return train(cfg)[OBJECTIVE]  # what the sweeper minimises: val/rmse_best


if __name__ == "__main__":
    quiet_libraries()  # before Hydra starts: the sweeper opens the stores before any job runs
    main()
