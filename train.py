"""Train one model: `python train.py model=autorec data.fold=3 hidden=500` (see conf/train.yaml)."""

from cfae.cli import train

if __name__ == "__main__":
    train()
