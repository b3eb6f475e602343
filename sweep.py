"""Sweep with Optuna: `python sweep.py -m model=deep hidden=300,500,750` (see conf/sweep.yaml)."""

from cfae.cli import sweep

if __name__ == "__main__":
    sweep()
