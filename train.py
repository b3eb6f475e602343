"""Train one model: `python train.py model=autorec data.fold=3 hidden=500` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from cfae.checks import reported_in_one_line
from cfae.configs import register_resolvers
from cfae.console import quiet_libraries
from cfae.processes import keep_freed_memory
from cfae.train import OBJECTIVE, train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    with reported_in_one_line():  # a bad value or data file: one line and exit 1 (HYDRA_FULL_ERROR=1: traceback)
        return train(cfg)[OBJECTIVE]  # the value a sweep minimises


register_resolvers()  # before Hydra composes: `--cfg job --resolve` and the sweeper resolve them too

if __name__ == "__main__":
    quiet_libraries()  # before Hydra starts: the sweeper opens the stores before any job runs
    main()
