"""The Lightning callbacks of a training run: epoch timing, the learning rates a refit replays, divergence,
the resumable checkpoint; and `StopRun`, by which a callback ends a run whose result is no longer wanted."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cfae.checks import Diverged, read_checkpoint
from cfae.metrics import TRAIN_LOSS, VAL_RMSE
from cfae.processes import device_clock

log = logging.getLogger(__name__)



class StopRun(Exception):
    """Raised by a callback to end a run whose result is no longer wanted (a sweep's pruner, through its trial's
    callback): the run is closed KILLED, untested and unsaved, with this as its `error` tag, and the exception
    goes on to the caller."""


class EpochTimer(Callback):
    """Logs `time/epoch_s`, the wall time of each training epoch (validation excluded), and keeps them
    in `times`."""

    def __init__(self):
        self.times: list[float] = []
        self.start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = device_clock(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.start is None:  # resumed from a checkpoint taken at the end of an epoch: nothing timed
            return
        self.times.append(device_clock(pl_module.device) - self.start)
        pl_module.log("time/epoch_s", self.times[-1])


class EpochLog(Callback):
    """One line per epoch (its losses, validation RMSE and seconds) where no progress bar shows them: in a
    log file, a pipe or a notebook."""

    def __init__(self):
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after validation
        if trainer.progress_bar_callback is not None:
            return
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                         if k.startswith(("train/", "val/")))
        log.info("epoch %d/%d: %s (%.2f s)", trainer.current_epoch + 1, trainer.max_epochs, shown,
                 time.perf_counter() - self.start)


class LearningRates(Callback):
    """The learning rate of each parameter group at the start of each epoch. Recording (the default), it keeps
    them in `rates`, and in the run's full checkpoint so that a resumed run has them all. Given `replay`, it
    sets them instead: a refit follows the schedule its run had without the validation part a scheduler such
    as ReduceLROnPlateau would need."""

    def __init__(self, replay: list[list[float]] | None = None):
        self.replaying = replay is not None
        self.rates: list[list[float]] = list(replay or [])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        groups, epoch = trainer.optimizers[0].param_groups, trainer.current_epoch
        if self.replaying:
            for group, rate in zip(groups, self.rates[epoch], strict=True):
                group["lr"] = rate
        else:
            del self.rates[epoch:]  # an epoch begun again after a resume
            self.rates.append([group["lr"] for group in groups])

    def state_dict(self) -> dict:
        return {"rates": self.rates}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rates = state_dict["rates"]

    @classmethod
    def recorded_in(cls, checkpoint: str | Path) -> bool:
        """Whether a run's full state has this record (Lightning keeps a callback's state under its
        `state_key`, the class name): a run resumed from one that has not cannot be refitted."""
        return cls.__qualname__ in read_checkpoint(checkpoint).get("callbacks", {})


class DivergenceGuard(Callback):
    """Ends a run whose training has blown up, with an error that says so, instead of letting it finish
    with a useless model that looks like a result (in a sweep: a failed trial, never a best value).

    The bound is on the training loss (the MSE of the reconstruction, whose predictions are not clamped):
    above 10 x the squared width of the rating scale (160 on 1..5) the predictions lie far outside the
    scale, which no run that learns comes near; a non-finite loss or validation RMSE fails too. The
    validation RMSE itself cannot explode: predictions are clamped to the scale before it is measured, so a
    diverged AutoRec (Adam at lr 1e6) scores about 1.8 on ML-100K while its loss is 1e16, and a sound one
    that starts slowly scores worse (about 2.6 while it learns the mean).
    """

    def __init__(self, rating_min: float | None = None, rating_max: float | None = None):  # None: the data's
        self.rating_range = rating_min, rating_max
        self.max_loss = math.inf

    def setup(self, trainer, pl_module, stage: str) -> None:
        low, high = self.rating_range
        if low is None or high is None:  # the model's: infinite for scores (task=ranking), which only NaN fails
            low, high = pl_module.rating_range
        self.max_loss = 10 * (high - low) ** 2

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        if loss is not None and not float(loss) <= self.max_loss:  # NaN fails the test too
            raise Diverged(f"training diverged: train/loss={float(loss):.3g} at epoch {trainer.current_epoch}, "
                           f"above {self.max_loss:g} (10 x the squared rating range); lower optimizer.lr?")

    def on_validation_end(self, trainer, pl_module) -> None:
        rmse = trainer.callback_metrics.get(VAL_RMSE)
        if not trainer.sanity_checking and rmse is not None and not math.isfinite(float(rmse)):
            raise Diverged(f"training diverged: val/rmse is {float(rmse)} at epoch {trainer.current_epoch}; "
                           f"lower optimizer.lr?")


class LastCheckpoint(Checkpoint):
    """The full training state (weights, optimizer, loops, callbacks) at `path`, for `resume=`: at the end of
    the first epoch, then at most every `every_s` seconds, and when the run is stopped by SIGTERM (what a
    scheduler sends) or Ctrl-C.

    A signal during training stops it after the current batch: the epoch is cut short, validated and saved
    like any other, so the state resumes cleanly (a state saved in the middle of an epoch cannot: the data
    loader does not know where it was). A second signal stops at once. Each checkpoint is written beside
    the last and renamed over it, so a run killed while writing keeps the previous one. (A subclass of
    Checkpoint: Lightning calls it after the other callbacks, once early stopping and the best checkpoint
    have seen the epoch.)
    """

    def __init__(self, path: Path, every_s: float):
        self.path, self.every_s = Path(path), every_s
        self.saved_at: float | None = None  # None: nothing saved yet, or since the signal
        self.interrupt: signal.Signals | None = None  # the signal that stopped the training, if one did

    def save(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        trainer.save_checkpoint(partial)
        os.replace(partial, self.path)
        self.saved_at = time.monotonic()
        if self.interrupt:
            log.info("training state saved to %s: go on with resume=%s", self.path, self.path)

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, frame) -> None:
            if self.interrupt is not None:  # asked twice: now
                raise KeyboardInterrupt if signum == signal.SIGINT else SIGTERMException(128 + signum)
            self.interrupt, trainer.should_stop = signal.Signals(signum), True
            self.saved_at = None  # nothing saved since the signal
            log.warning("%s: stopping after this batch, saving the training state", signal.Signals(signum).name)

        # Replaces Lightning's own SIGTERM handler for the rest of the fit, which would raise in the middle of
        # the epoch; Lightning puts back the handlers it found when the fit ends.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.interrupt is None and isinstance(exception, KeyboardInterrupt | SIGTERMException):
            self.interrupt = signal.SIGINT if isinstance(exception, KeyboardInterrupt) else signal.SIGTERM

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after validation: a whole epoch to resume from
        if self.interrupt or self.saved_at is None or time.monotonic() - self.saved_at >= self.every_s:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # A signal that came after this epoch's save but before the next epoch began ends the fit with no
        # epoch left to save it: save here, at the same epoch boundary.
        if self.interrupt and self.saved_at is None:
            self.save(trainer)
