"""Where runs run, for the two commands that run many (the sweep and the study): both hand their runs to the
Hydra launcher the command line picks (`hydra/launcher=basic`, `joblib`, `submitit_local`, `submitit_slurm`),
which starts their processes; this module decides what each job of a batch gets (a GPU, or its share of the
cores) and how a command stops every run it launched (a file each run watches).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from cfae.processes import this_process, usable_cores

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Stopped:
    """What a job returns when a signal (or its command's stop, which signals it) ended its run, KILLED; or when
    its command was stopping before the run started, with no signal."""

    signal: signal.Signals | None = None


def quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar: taken as it is, commas, `=` and spaces included."""
    return "'" + str(value).replace("'", "\\'") + "'"


# -- placing jobs --------------------------------------------------------------------------------------------
def kind(launcher: DictConfig) -> str:
    """What the launcher `launcher` (hydra.launcher) is to cfae: "basic" (each job in the launching process, in
    turn), "joblib" (a pool of worker processes), "submitit_local" (a process per job, a batch at once) or
    "cluster" (jobs on other machines: submitit's SLURM, Ray, ...)."""
    target = launcher.get("_target_", "")
    for suffix, name in (("BasicLauncher", "basic"), ("JoblibLauncher", "joblib"), ("LocalLauncher", "submitit_local")):
        if target.endswith(suffix):
            return name
    return "cluster"


def device_overrides(batch_size: int, n_gpus: int, n_cpus: int, parallel: int | None = None) -> list[tuple[str, ...]]:
    """Overrides placing each job of a batch whose jobs run `parallel` at a time (default: all at once): an
    equal share of the CPU cores each and, when there are GPUs, one GPU each, round robin."""
    parallel = min(batch_size, parallel or batch_size)
    threads = f"threads={max(1, n_cpus // parallel)}"
    if n_gpus > 0:
        return [("trainer.accelerator=gpu", f"trainer.devices=[{i % n_gpus}]", threads) for i in range(batch_size)]
    return [(threads,)] * batch_size


def local_parallelism(launcher: DictConfig, batch_size: int) -> int | None:
    """How many jobs of a batch a launcher runs at once on this machine (submitit's local launcher: the whole
    batch; joblib's n_jobs as joblib reads it, -1 all cores, -2 all but one); None for launchers that place jobs
    on other machines, where the cluster assigns devices and cfae leaves placement alone."""
    name = kind(launcher)
    if name == "joblib":
        n_jobs = launcher.get("n_jobs") or -1
        return n_jobs if n_jobs > 0 else max(1, usable_cores() + 1 + n_jobs)
    return {"basic": 1, "submitit_local": batch_size}.get(name)


def placement(launcher: DictConfig, batch_size: int) -> list[tuple[str, ...]]:
    """What each job of a batch gets from the launcher `launcher` (hydra.launcher): `device_overrides`, or
    nothing where the cluster places the jobs."""
    parallel = local_parallelism(launcher, batch_size)
    if parallel is None:
        return [()] * batch_size
    import torch  # here: the sweeper's start-up stays light

    return device_overrides(batch_size, torch.cuda.device_count(), usable_cores(), parallel)


def first_line(err: BaseException) -> str:
    """An error's first line, or its type where it says nothing."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# -- stopping every run ------------------------------------------------------------------------------------------
class StopWhenAsked(Callback):
    """Stops its run, as SIGTERM stops one (state saved, MLflow run KILLED), once the file `path` exists: how a
    command that launched runs stops them wherever its launcher put them (other processes, other machines with
    the folder shared). A thread looks for the file every `every_s` seconds while the run trains and tests.
    `command` (the launching process, `processes.this_process()`) is read by the job before it trains, for
    `leave_the_terminal`; the callback has no use for it."""

    def __init__(self, path: str, command: str = "", every_s: float = 1.0):
        self.path, self.every_s = Path(path), every_s
        self.done: threading.Event | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.done is None:
            self.done = threading.Event()
            threading.Thread(target=self.watch, args=(self.done,), name="stop-when-asked", daemon=True).start()

    def watch(self, done: threading.Event) -> None:
        while not done.wait(self.every_s):
            if self.path.exists():
                log.warning("the command that launched this run is stopping: stopping the run")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.done is not None:
            self.done.set()
            self.done = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")


def leave_the_terminal(command: str) -> None:
    """A job's process out of the terminal's process group, unless it is the launching process `command` itself:
    Ctrl-C and a hang-up then reach the command alone, which stops each run through the file (a run they reached
    as well would take the file's stop for a second signal, and stop at once without saving its cut-short
    epoch)."""
    if command and command != this_process():
        os.setpgrp()


@contextlib.contextmanager
def stopped_by_signals(path: Path) -> Iterator[Callable[[], signal.Signals | None]]:
    """While the block runs, Ctrl-C, SIGTERM or SIGHUP writes the file `path` that every run launched with
    `StopWhenAsked(path)` watches, and the launching process waits for them to stop instead of dying at once
    (a launcher such as joblib's would kill its workers before their runs were closed). Yields what says which
    signal came, if one did. The file is removed as the block starts, and at its end unless a signal came: jobs
    that start later (queued on a cluster) find it and run nothing."""
    received: list[signal.Signals] = []

    def stop(signum, frame) -> None:
        if not received:
            log.warning("%s: stopping every run (each saves its state and ends KILLED); no new run starts",
                        signal.Signals(signum).name)
        received.append(signal.Signals(signum))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    path.unlink(missing_ok=True)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not received:
            path.unlink(missing_ok=True)
