"""MLflow: where runs go, and what a run carries besides Lightning's per-epoch metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cfae.checks import KNOBS
from cfae.processes import has_died, this_process
from cfae.stores import check_server, check_writable, store_lock

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"  # MLflow >= 3.13 refuses a plain folder store


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the project's sqlite store under mlruns/."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside its database (mlruns/artifacts); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))  # relative, or absolute for sqlite:////abs/path.db
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent.resolve() / "artifacts").as_uri()


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that a store which stops taking writes (a locked or full database,
    a server gone) does not end the training: metrics that could not be written are kept and sent with the
    next write that goes through, and `flush()` tells whether any are still waiting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[Mapping[str, float], int | None]] = []

    @property
    def experiment(self) -> MlflowClient:
        """The client, the run created on first use. A sqlite store busy with other processes' writes (a
        study's workers starting together) can refuse the creation with "database is locked" once its wait
        runs out: it is tried again, after 1, 2, 4 and 8 s."""
        for wait in (1, 2, 4, 8, None):
            try:
                return super().experiment
            except Exception as err:  # MlflowException or sqlalchemy's OperationalError, by store
                if wait is None or "database is locked" not in str(err):
                    raise
                log.info("the tracking store is locked by other writers; creating the run again in %d s", wait)
                time.sleep(wait)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Epoch-level metrics are stepped by their epoch (Lightning adds `epoch` to them), so that MLflow's
        charts read per epoch; `epoch` itself is not kept as a metric."""
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        if metrics:
            self.pending.append((metrics, int(epoch) if epoch is not None else step))
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Nothing: Lightning calls this at the end of every fit and test, and on an exception, while cfae
        closes its runs itself at their real end (`close`, after the test, the ranking and the artifacts;
        train.end_run on an error or a signal), so that a process killed during the test leaves its run
        RUNNING, to be marked FAILED, not FINISHED without its results."""

    def close(self, status: str = "FINISHED") -> None:
        super().finalize(status)

    def flush(self) -> bool:
        """Send what is waiting; whether everything went through."""
        while self.pending:
            try:
                super().log_metrics(*self.pending[0])
            except Exception as err:  # MlflowException, sqlalchemy's OperationalError, a broken connection
                if len(self.pending) == 1:  # say it once per outage, not at every step
                    log.warning("the tracking store does not take metrics (%s); training goes on and they "
                                "are sent when it does", str(err).splitlines()[0])
                return False
            self.pending.pop(0)
        return True


def mlflow_logger(experiment_name: str = "cfae", run_name: str | None = None, uri: str | None = None,
                  tags: dict[str, str] | None = None) -> RunLogger:
    uri = tracking_uri(uri)
    mlflow_client(uri, experiment_name)  # the store and the experiment exist before the logger looks
    return RunLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                     tags={**(tags or {}), "cfae.process": this_process()},
                     artifact_location=artifact_location(uri), log_model=False)


# What the MLflow UI reads to decide whether an experiment's page shows its runs or its GenAI traces (since
# 3.15 the sidebar's "GenAI / Model training" switch decides instead; `workflowType` in the URL sets it).
EXPERIMENT_KIND = "mlflow.experimentKind"

# The runs table's columns as a saved view, listed under "Views" in the MLflow UI. The UI keeps its saved
# views as experiment tags `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state}, state
# being the JSON of the view (what its "Save view" button writes). That is the UI's own format, not an
# API: tests/test_ui.py opens this view in Chromium and fails if the UI stops reading it.
RESULTS_VIEW = "cfae-results"
# The UI places metrics before params, whatever the order here; without the wide Dataset column (the run's name
# says its data and fold) the knobs fit on a 1600-pixel screen.
RESULTS_COLUMNS = ("params.`model`", *(f"params.`{knob}`" for knob in KNOBS),
                   "metrics.`val/rmse_best`", "metrics.`test/rmse`", "metrics.`test/recall_at_10`",
                   "metrics.`test/ndcg_at_10`", "metrics.`epochs`", "metrics.`time/fit_s`")


def saved_view_tag(name: str, columns: tuple[str, ...]) -> str:
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now,
                       "state": json.dumps({"selectedColumns": list(columns)})})


UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_base(uri: str) -> str:
    """Where the MLflow UI of the store at `uri` is: a tracking server serves its own, `mlflow ui` the others."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI


def ui_command(uri: str) -> str:
    """How to open the MLflow UI of the store at `uri`."""
    if uri.startswith(("http://", "https://")):
        return f"the tracking server's UI ({uri})"
    return f"mlflow ui --backend-store-uri {uri}"


def view_columns(tag: str | None) -> list[str] | str | None:
    """The columns of a saved view's tag (the tag itself where it is no view), to tell an outdated one."""
    try:
        return json.loads(json.loads(tag)["state"])["selectedColumns"]
    except (TypeError, ValueError, KeyError):
        return tag


def runs_page(experiment_id: str, base: str = UI) -> str:
    """The MLflow UI's page of an experiment's runs, in the "Model training" view, with cfae's columns."""
    return (f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW}"
            "&workflowType=machine_learning")


def run_page(experiment_id: str, run_id: str, base: str = UI) -> str:
    """The MLflow UI's page of one run, on the UI's "Model training" side."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def serve_command(run_id: str, uri: str) -> str:
    """The command that serves a run's model over HTTP, on the store it was logged to."""
    return f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m runs:/{run_id}/model --env-manager local -p 5001"


def mlflow_client(uri: str | None = None, experiment_name: str = "cfae") -> tuple[MlflowClient, str]:
    """A client on the store, and the id of `experiment_name` there (created, with artifacts beside a
    sqlite store, if it does not exist yet). Processes starting together on a new sqlite store create it
    one at a time; a server is asked once, with a short timeout, whether it answers."""
    uri = tracking_uri(uri)
    check_server(uri)
    check_writable(uri)
    with store_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        ui_tags = {EXPERIMENT_KIND: "custom_model_development",  # a model-training experiment: runs, not traces
                   f"mlflow.sharedViewState.{RESULTS_VIEW}": saved_view_tag("cfae results", RESULTS_COLUMNS)}
        if experiment is None:
            experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location(uri),
                                                     tags=ui_tags)
        else:
            experiment_id = experiment.experiment_id
            for key, value in ui_tags.items():
                if view_columns(experiment.tags.get(key)) != view_columns(value):  # absent, or another cfae's
                    client.set_experiment_tag(experiment_id, key, value)
    return client, experiment_id


def log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput) -> None:
    """`client.log_inputs(run_id, [dataset])`, safe when other processes log the same dataset at the same time.

    MLflow's SQL store looks a dataset up and inserts it when it is missing, in two steps: of two runs that
    log one dataset at once (a study's workers on the same fold), one fails on the table's unique key, as an
    IntegrityError from a sqlite file, as an error answer from a tracking server. Its transaction is rolled
    back whole, and by then the other's row is committed, so a second try finds it; an error that was not
    this race comes again from the second try."""
    try:
        client.log_inputs(run_id, [dataset])
    except MlflowException:
        client.log_inputs(run_id, [dataset])


PROCESS_DIED = "ended without closing it"  # in the `error` tag of a run whose process died


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED, with an `error` tag, the RUNNING runs whose process (tag `cfae.process`) is known to have
    ended without closing them (kill -9, out of memory); the ids of those runs. The commands that start runs
    (train, sweep, study) call it first, so that a killed run shows as such by the next one."""
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        process = run.data.tags.get("cfae.process")
        if process and has_died(process):
            client.set_tag(run.info.run_id, "error", f"its process ({process}) {PROCESS_DIED}: "
                                                     "killed, out of memory or crashed")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    if closed:
        log.info("marked %d run(s) of dead processes FAILED: %s", len(closed), ", ".join(closed))
    return closed


# Keys that change where a run writes or how it reports, never what it computes.
NOT_THE_RESULT = ("output_dir", "logger", "resume", "threads", "keep_freed_memory", "checkpoint_every_s",
                  "save_model", "callbacks.optuna_trial", "callbacks.study_stop", "choices",
                  "trainer.enable_progress_bar", "data.root", "data.download", "data.num_workers")
# Which device computes it: hashed as the default device once resolved, so that a run placed on GPU 1 counts as
# the run composed without placement, and a store's earlier runs keep counting as done; the numbers' precision,
# which the device decides, stays.
THE_DEVICE = {"accelerator": "auto", "devices": 1}
# Top-level switches left out of the digest while they are off: a run with one off computes what a run
# without the switch computes, so a store's runs keep counting as done.
OFF_IS_THE_RESULT = {"refit": False}


def config_digest(cfg: DictConfig) -> str:
    """A short hash of the resolved configuration that decides a run's result: dataset, split, model,
    optimizer, trainer and the rest, without where it writes (`NOT_THE_RESULT`) nor which device computes it
    (`THE_DEVICE`)."""
    config = OmegaConf.to_container(cfg, resolve=False)  # dropped first: output_dir may need Hydra to resolve
    for key in NOT_THE_RESULT:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(leaf, None)
    for key, off in OFF_IS_THE_RESULT.items():
        if config.get(key) == off:
            config.pop(key)
    resolved = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    if isinstance(resolved.get("trainer"), dict):
        resolved["trainer"].update(THE_DEVICE)
    return hashlib.sha256(OmegaConf.to_yaml(resolved).encode()).hexdigest()[:16]


def finished_study_runs(client: MlflowClient, experiment_id: str, study: str) -> list:
    """The FINISHED runs of `python -m cfae.study` run under the name `study`, oldest first."""
    return client.search_runs([experiment_id], f"tags.`cfae.study` = '{study}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50_000)
