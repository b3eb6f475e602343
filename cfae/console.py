"""What the command lines print: the libraries' start-up chatter silenced, cfae's own lines kept. Called by
the entry points (train.py, sweep.py, `python -m cfae.study`, `cfae.blend`), never on import."""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose INFO lines say nothing a cfae user acts on: Lightning's "GPU available: False", "💡 Tip:
# ... litlogger", "Restoring states from the checkpoint ...", "`weights_only` was not set"; MLflow's
# "Creating initial MLflow database tables". Their warnings still show.
CHATTY = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
          "lightning.pytorch.trainer.connectors.checkpoint_connector", "mlflow.store.db.utils",
          "alembic.runtime.migration")


def quiet_libraries() -> None:
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's own pytree helper builds torch's deprecated LeafSpec; nothing a user can change.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # The sweeper's TPE schema passes options Optuna 5 deprecates; Optuna's plots are "experimental".
    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", category=ExperimentalWarning)


def quiet_benchmark() -> None:
    """For a script that runs train.py many times in its own process and prints its own lines: libraries
    quiet, cfae's and MLflow's logs errors only, no artifact progress bars."""
    quiet_libraries()
    for name in ("cfae", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
