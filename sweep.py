"""Sweep with Optuna: `python sweep.py -m model=deep hidden=300,500,750` (see conf/sweep.yaml)."""

import hydra
from omegaconf import DictConfig

from cfae.train import OBJECTIVE, train


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return train(cfg)[OBJECTIVE]  # what the sweeper minimises: val/rmse_best


if __name__ == "__main__":
    main()
