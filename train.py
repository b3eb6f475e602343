"""Train one model: `python train.py model=autorec data.fold=3 hidden=500` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from cfae.train import OBJECTIVE, train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return train(cfg)[OBJECTIVE]  # the value a sweep minimises


if __name__ == "__main__":
    main()
