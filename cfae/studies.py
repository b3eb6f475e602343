"""Optuna studies as cfae keeps them: a database storage with heartbeats, trials that know their process,
and the recovery of trials whose process died. Used by the sweeper and, through `TrialReporting`, by each job.

A trial is RUNNING while a process trains it. That process records a heartbeat every `HEARTBEAT_S`
seconds and its identity (`cfae.process` user attribute). A sweep that starts (or asks for more trials)
fails the trials whose process has died: at once when it ran on this machine, after `GRACE_S` seconds
without a heartbeat when it ran elsewhere; each such point is enqueued to be tried again
(RetryHeartbeatStaleTrialCallback), and does not count against the study's `n_trials`.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from collections.abc import Iterator

import optuna
import sqlalchemy.exc
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from cfae.callbacks import StopRun
from cfae.processes import has_died, this_process
from cfae.stores import check_writable, store_lock

HEARTBEAT_S = 20
GRACE_S = 90
PROCESS = "cfae.process"  # user attribute: the process training the trial
ERROR = "error"  # user attribute of a trial that failed by its own error (not by its process dying)
REFUSED = "refused"  # user attribute of a trial whose settings were refused before it ran: not a result
PRUNER = "cfae.pruner"  # study user attribute: the config of the pruner its trials' jobs prune by
MAX_RETRY = 2
TRIES = 5  # to open a new database on a server


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue the point of a trial whose process died, at most `MAX_RETRY` times for one point."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8, and the replacement of a deprecated one
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def database(url: str) -> RDBStorage:
    """The study database at `url`, with heartbeats. Processes creating a new database together do it one
    at a time (sqlite: a lock file; a server: the losers of the race try again)."""
    check_writable(url)
    with store_lock(url):
        for attempt in range(TRIES):
            try:
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                  heartbeat_stale_trial_callback=retry)
            except sqlalchemy.exc.DBAPIError:  # a server, whose new tables another process is creating
                if attempt == TRIES - 1:
                    raise
                time.sleep(0.5 + random.random())


def ask(study: optuna.Study, distributions: dict) -> optuna.Trial:
    """`study.ask`, the trial marked with this process and its first heartbeat recorded."""
    with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for Study.optimize; we beat
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trial = study.ask(distributions)
    trial.set_user_attr(PROCESS, this_process())
    return trial


class TrialReporting(Callback):
    """What ties a training run to its sweep's trial; the sweeper adds it to each job's callbacks
    (`callbacks.optuna_trial`), so that training itself knows nothing of sweeps. It names the run's MLflow run
    after the trial and nests it under the sweep's run, holds the trial (its process, its heartbeat) while the
    run trains and tests, reports the task's validation metric after each validation and, once the study's
    pruner (`PRUNER`, recorded by the sweeper) says so, ends the run with `StopRun`. The sweeper alone tells the
    study each trial's result."""

    def __init__(self, study: str, storage: str, number: int, monitor: str, parent_run_id: str | None = None):
        self.study_name, self.storage_url, self.number, self.monitor = study, storage, number, monitor
        self.parent_run_id = parent_run_id
        self.trial: optuna.Trial | None = None
        self.storage: RDBStorage | None = None
        self.trial_id: int | None = None
        self.held: contextlib.ExitStack | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trial is None:
            storage = database(self.storage_url)
            study = optuna.load_study(study_name=self.study_name, storage=storage)
            pruner = study.user_attrs.get(PRUNER)
            study.pruner = instantiate(pruner) if pruner else optuna.pruners.NopPruner()
            # Public BaseStorage methods: Optuna's Study has no way from a trial's number to the trial.
            trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name),
                                                                       self.number)
            self.storage, self.trial_id, self.trial = storage, trial_id, optuna.Trial(study, trial_id)
            self.name_run(trainer.logger)
        self.hold()

    def name_run(self, logger) -> None:
        """The MLflow run, if there is one: named `trial<n>-<name>`, tagged with its study and trial, and nested
        under the sweep's run."""
        if not getattr(logger, "run_id", None):
            return
        client, run_id = logger.experiment, logger.run_id
        tags = {"optuna.study": self.study_name, "optuna.trial": str(self.number)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.update_run(run_id, name=f"trial{self.number}-{client.get_run(run_id).info.run_name}")

    def hold(self) -> None:
        """The trial is this process's while it trains (a sweep on this machine fails it at once if the process
        dies) and beats its heartbeat (a sweep elsewhere fails it after `GRACE_S` without one)."""
        if self.held is not None:
            return
        before = self.storage.get_trial(self.trial_id).user_attrs.get(PROCESS)  # the sweeper's
        self.held = contextlib.ExitStack()
        self.trial.set_user_attr(PROCESS, this_process())
        if before:
            self.held.callback(self.trial.set_user_attr, PROCESS, before)
        self.held.enter_context(heartbeat(self.storage, self.trial_id))

    def release(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            with contextlib.suppress(Exception):  # a store that is down now: the sweeper tells the result anyway
                held.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.current_epoch)
        if self.trial.should_prune():
            if getattr(trainer.logger, "run_id", None):
                trainer.logger.experiment.set_tag(trainer.logger.run_id, "optuna.state", "PRUNED")
            raise StopRun(f"trial {self.number} pruned at epoch {trainer.current_epoch}")


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every `HEARTBEAT_S` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a busy database skips a beat, the next one will do
                storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_dead_trials(study: optuna.Study, stopping: str | None = None) -> list[int]:
    """FAIL the RUNNING trials whose process has died (here: its pid is gone; elsewhere: no heartbeat for
    `GRACE_S`), or is `stopping` (this process, interrupted), each point enqueued again; the numbers of the
    trials failed."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        process = trial.user_attrs.get(PROCESS)
        if process and (process == stopping or has_died(process)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            retry(study, trial)
    fail_stale_trials(study)  # the storage's heartbeat_stale_trial_callback enqueues these again
    was_running = {t.number for t in running}
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.number in was_running)


def counts_against_budget(trial: FrozenTrial) -> bool:
    """Whether a trial has taken one of the study's `n_trials`: finished (complete, pruned, failed by its own
    error or by its process dying on the last retry) or running. Not one whose process died with retries
    left (its point waits to be tried again), nor one refused before it ran (a corrected command runs its
    point), nor a waiting one (the next ask takes it)."""
    if trial.state == TrialState.FAIL and REFUSED in trial.user_attrs:
        return False
    if trial.state == TrialState.FAIL:  # by its own error, or its process died once too often: given up
        return ERROR in trial.user_attrs or len(trial.system_attrs.get("retry_history", [])) >= MAX_RETRY
    return trial.state != TrialState.WAITING
