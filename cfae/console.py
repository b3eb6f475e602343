"""What cfae prints: the libraries' chatter silenced, cfae's own lines kept. The command lines silence it for
their whole process (`quiet_libraries`); the Python API (`cfae.fit`, `cfae.load`) for the call only
(`quiet`), leaving a notebook's own logging set-up as it found it. Nothing happens on import."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Loggers whose INFO lines say nothing a cfae user acts on: Lightning's "GPU available: False", "💡 Tip:
# ... litlogger", "Restoring states from the checkpoint ...", "`weights_only` was not set"; MLflow's
# "Creating initial MLflow database tables" and "Validating input example against model signature". Their
# warnings still show.
CHATTY = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
          "lightning.pytorch.trainer.connectors.checkpoint_connector", "mlflow.store.db.utils",
          "alembic.runtime.migration", "mlflow.pyfunc")
ARTIFACT_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's "Downloading artifacts" bars, read at each use


def _silence() -> None:
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ[ARTIFACT_BAR] = "false"
    # Lightning's own pytree helper builds torch's deprecated LeafSpec; nothing a user can change.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # The sweeper's TPE schema passes options Optuna 5 deprecates; Optuna's plots are "experimental".
    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", category=ExperimentalWarning)


def quiet_libraries() -> None:
    """Silence the libraries for the rest of the process: for the command lines, which own theirs."""
    _silence()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries while the block runs, then put back the loggers' levels, the warning filters
    and MLflow's progress-bar setting as they were."""
    levels = {name: logging.getLogger(name).level for name in CHATTY}
    bar = os.environ.get(ARTIFACT_BAR)
    with warnings.catch_warnings():
        _silence()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if bar is None:
                os.environ.pop(ARTIFACT_BAR, None)
            else:
                os.environ[ARTIFACT_BAR] = bar


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """Put the process's logging back as it was once the block, which lets Hydra configure it (its handlers
    write to the streams of that moment), returns: for a command called from Python (a test, a notebook)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    saved = [(lg, lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, level, handlers, propagate, disabled in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
