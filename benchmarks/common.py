"""What several benchmark scripts share: a throwaway tracked run, timing a call, one L-BFGS step.
The scripts run as `python benchmarks/<name>.py`, which puts this folder first on the import path."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig

from cfae.configs import compose
from cfae.console import quiet_libraries
from cfae.processes import device_clock


def scratch_run(store: Path, *overrides: str) -> DictConfig:
    """`compose(*overrides)` for a run a benchmark measures: no progress bar and no ranking metrics, tracked
    in a throwaway MLflow store in `store`, its checkpoints in a folder of its own there."""
    return compose(*overrides, "trainer.enable_progress_bar=false", "ranking=null",
                   f"logger.uri=sqlite:///{store}/mlflow.db", f"output_dir={store}/run-{datetime.now().timestamp()}")


def timings(f, repeats: int, device=None) -> list[float]:
    """Seconds of each of `repeats` calls of f, after one call to warm up, the work f queues on `device`
    included."""
    f()
    times = []
    for _ in range(repeats):
        start = device_clock(device)
        f()
        times.append(device_clock(device) - start)
    return times


def lbfgs_step(model, x, optimizer: torch.optim.LBFGS) -> None:
    """One L-BFGS `step` on a rating model's objective over x (the whole matrix): up to its max_iter iterations."""

    def closure():
        optimizer.zero_grad()
        loss = model.training_loss(x)
        loss.backward()
        return loss

    optimizer.step(closure)


def quiet_benchmark() -> None:
    """For a script that runs train.py many times in its own process and prints its own lines: libraries
    quiet, cfae's and MLflow's logs errors only."""
    quiet_libraries()
    for name in ("cfae", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
