"""MLflow: where runs go, and what a run carries besides Lightning's per-epoch metrics."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

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


def mlflow_logger(experiment_name: str = "cfae", run_name: str | None = None, uri: str | None = None,
                  tags: dict[str, str] | None = None) -> MLFlowLogger:
    uri = tracking_uri(uri)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, tags=tags,
                        artifact_location=artifact_location(uri), log_model=False)


def mlflow_client(uri: str | None = None, experiment_name: str = "cfae") -> tuple[MlflowClient, str]:
    """A client on the store, and the id of `experiment_name` there (created, with artifacts beside a
    sqlite store, if it does not exist yet)."""
    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return client, experiment.experiment_id
    return client, client.create_experiment(experiment_name, artifact_location=artifact_location(uri))


def finished_study_runs(client: MlflowClient, experiment_id: str, study: str) -> list:
    """The FINISHED runs of `python -m cfae.study` run under the name `study`, oldest first."""
    return client.search_runs([experiment_id], f"tags.`cfae.study` = '{study}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50_000)


def git_commit() -> str:
    """The commit of the cfae checkout, with '-dirty' if it has uncommitted changes; 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
