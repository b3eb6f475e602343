"""A saved model tested on another split or another file, logged as a new MLflow run linked to the model's.

    python -m cfae.evaluate run=<run id> data.split=temporal          # the model's data, split another way
    python -m cfae.evaluate run=<run id> data.fold=3                  # another random fold
    python -m cfae.evaluate run=<run id> data=table data.path=new.csv data.columns.user=customer ...
    cfae.evaluate("<run id>", "data.split=temporal")                  # from Python: the metrics

The data is the model's run's (its config.yaml), with the overrides applied; `data=...` starts from that group
instead. As in a run's test, the model is given everything but the new split's test part as input and scores
the test ratings (RMSE, MAE, and Recall/NDCG as `ranking` says). Users and items are matched by their original
ids: a test rating whose item (with user rows; whose user, with item rows) the model has never seen cannot be
scored and is counted, not guessed; a user the model has not seen is scored from its input ratings where the
model has no per-user parameters (an autoencoder with user rows), else counted too.

A split the model was trained on tests it on ratings it has seen: evaluating a run on its own data and a
different fold or split says how a model does on ratings it may have trained on, not a held-out result.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cfae.checks import UsageError, reported_in_one_line
from cfae.console import quiet, quiet_libraries
from cfae.metrics import TEST_MAE, TEST_RMSE

log = logging.getLogger("cfae.evaluate")


def model_config(source: str, tracking_uri: str | None = None) -> tuple[DictConfig, str | None]:
    """(the run's resolved config, its MLflow run id or None) of a saved model: a run's output folder, or a run
    named by its id, runs:/ or models:/ URI."""
    folder = Path(source)
    if folder.is_dir():
        if not (folder / "config.yaml").is_file():
            raise UsageError(f"{folder}: no config.yaml; give a run's output folder, or its MLflow run id")
        return OmegaConf.load(folder / "config.yaml"), None
    from cfae.recommender import run_files

    run_id, local = run_files(source, "config.yaml", tracking_uri)
    return OmegaConf.load(local), run_id


def data_config(trained: DictConfig, overrides: list[str]) -> DictConfig:
    """The model's run's `data`, with `overrides` (data.<key>=<value>, or data=<group> to start from that group's
    config) applied; the model's orientation kept."""
    from cfae.configs import compose

    unknown = [o for o in overrides if not o.startswith(("data.", "data=", "ranking"))]
    if unknown:
        raise UsageError(f"{unknown[0]}: cfae.evaluate takes data=..., data.<key>=... and ranking... overrides")
    regroup = [o for o in overrides if o.startswith("data=")]
    composed = compose(*regroup, *(o for o in overrides if o not in regroup))
    data = composed.data if regroup else OmegaConf.merge(
        trained.data, OmegaConf.from_dotlist([o.removeprefix("data.") for o in overrides if o.startswith("data.")]))
    asked = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.orientation=")), None)
    if asked and asked != trained.data.orientation:
        raise UsageError(f"data.orientation={asked}: the model reads {trained.data.orientation} rows")
    data.orientation = trained.data.orientation
    data._target_ = "cfae.data.RatingsDataModule"  # whatever class a saved config names, the data's is this one
    ranking = composed.ranking if any(o.startswith("ranking") for o in overrides) else trained.get("ranking")
    return OmegaConf.create({"data": data, "ranking": ranking})


def aligned(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """`matrix` in the model's index space: its row r is the model's rows[r] and column c the model's cols[c]
    (-1: the model has none; those ratings are left out)."""
    m = matrix.tocoo()
    keep = (rows[m.row] >= 0) & (cols[m.col] >= 0)
    out = sp.csr_matrix((m.data[keep], (rows[m.row[keep]], cols[m.col[keep]])), shape=shape)
    out.sort_indices()
    return out


def index_in(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """For each id of `ids`, its position in `known`, -1 where `known` does not hold it."""
    position = {k: i for i, k in enumerate(known.tolist())}
    return np.array([position.get(i, -1) for i in ids.tolist()], dtype=np.int64)


@quiet()
def evaluate(source, *overrides: str, ratings=None, tracking_uri: str | None = None,
             log_run: bool = True) -> dict[str, float]:
    """The metrics of the saved model `source` (a run id, runs:/ or models:/ URI, or a run's output folder)
    on the test part of its data with `overrides` applied (`ratings`: a DataFrame in place of the data's file,
    as `cfae.fit` takes one); logged as an MLflow run (unless `log_run` is false) tagged
    `cfae.model_run=<the model's run>` and nested under it."""
    import lightning as L

    from cfae.configs import data_name, register_resolvers
    from cfae.data.module import eval_batches
    from cfae.ranking import ranking_metrics, score_matrix
    from cfae.recommender import load
    from cfae.train import build, split_note

    register_resolvers()
    trained, run_id = model_config(str(source), tracking_uri)
    cfg = data_config(trained, list(overrides))
    rec = load(source, tracking_uri=tracking_uri)
    datamodule = build(cfg.data)
    if ratings is not None:
        datamodule.use_frame(ratings)
    datamodule.setup("test")
    user_rows = rec.orientation == "user"
    users, items = index_in(datamodule.user_ids, rec.user_ids), index_in(datamodule.item_ids, rec.item_ids)
    rows, cols = (users, items) if user_rows else (items, users)
    per_row = "n_rows" in inspect.signature(type(rec.model)).parameters  # per-user (or per-item) parameters
    n_rows = rec.inputs.shape[0]
    if not per_row:  # rows the model has not seen are scored from their input, after its own rows
        unseen = np.flatnonzero(rows < 0)
        rows = rows.copy()
        rows[unseen] = n_rows + np.arange(len(unseen))
        n_rows += len(unseen)
    shape = (n_rows, rec.inputs.shape[1])
    inputs, targets = (aligned(m, rows, cols, shape) for m in (datamodule.test_inputs, datamodule.test_matrix))
    scored, asked = targets.nnz, datamodule.test_matrix.nnz
    if scored == 0:
        raise UsageError(f"none of the {asked} test ratings has a user and an item the model knows")
    batches = eval_batches(inputs, targets, rec.model.whole_matrix, datamodule.eval_batch_size)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1)
    tested = trainer.test(rec.model, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]
    metrics = {TEST_RMSE: float(tested[TEST_RMSE]), TEST_MAE: float(tested[TEST_MAE]),
               "evaluate/scored": scored, "evaluate/not_scored": asked - scored}
    ranking = OmegaConf.to_container(cfg.ranking) if cfg.get("ranking") else None
    if ranking and inputs.shape[0] * inputs.shape[1] <= ranking["max_cells"]:
        scores, seen, held_out = score_matrix(rec.model, inputs), inputs, targets
        if not user_rows:
            scores, seen, held_out = scores.T, seen.T.tocsr(), held_out.T.tocsr()
        ranked = ranking_metrics(np.ascontiguousarray(scores), seen, held_out, ranking["k"], ranking["threshold"])
        metrics.update({f"test/{k}": v for k, v in ranked.items()})
    name = f"{data_name(cfg.data.dataset, cfg.data.get('path'))} {split_note(cfg.data)[0]}"
    log.info("%s on %s: test/rmse=%.4f test/mae=%.4f over %d of %d test ratings (%d with a user or item the "
             "model has not seen)", source, name, metrics[TEST_RMSE], metrics[TEST_MAE], scored, asked, asked - scored)
    if log_run and run_id:
        metrics["run_id"] = log_evaluation(run_id, cfg, metrics, name, tracking_uri)
    return metrics


def log_evaluation(model_run: str, cfg: DictConfig, metrics: dict, name: str, tracking_uri: str | None) -> str:
    """A new MLflow run in the model's experiment, nested under the model's run: the data config as params,
    the metrics; its id."""
    from cfae.tracking import mlflow_client, run_page, ui_base
    from cfae.tracking import tracking_uri as store_uri

    client, _ = mlflow_client(tracking_uri)
    model = client.get_run(model_run)
    run = client.create_run(model.info.experiment_id, run_name=f"evaluate-{model.info.run_name}",
                            tags={"mlflow.parentRunId": model_run, "cfae.model_run": model_run,
                                  "mlflow.note.content": f"{model.info.run_name} tested on {name}: test RMSE "
                                                         f"{metrics[TEST_RMSE]:.4f}"})
    params = {f"data/{k}": v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v is not None}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    client.set_terminated(run.info.run_id, "FINISHED")
    uri = store_uri(tracking_uri)
    log.info("MLflow run %s, under the model's run %s: %s", run.info.run_id, model_run,
             run_page(model.info.experiment_id, run.info.run_id, ui_base(uri)))
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    """`python -m cfae.evaluate run=<id>|path=<folder> [uri=<tracking uri>] <data overrides>`."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    quiet_libraries()
    with reported_in_one_line():
        given = {k: v for k, _, v in (a.partition("=") for a in args if a.startswith(("run=", "path=", "uri=")))}
        overrides = [a for a in args if not a.startswith(("run=", "path=", "uri="))]
        source = given.get("run") or given.get("path")
        if not source:
            raise UsageError("give the model as run=<MLflow run id> or path=<a run's output folder>, and the data "
                             "as overrides (python -m cfae.evaluate run=<id> data.split=temporal)")
        metrics = evaluate(source, *overrides, tracking_uri=given.get("uri"))
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


class _Callable(types.ModuleType):
    """`cfae.evaluate` is this module (`python -m cfae.evaluate`) and, called, its `evaluate` function: the
    name cannot be both a module and a function of the package any other way."""

    def __call__(self, *args, **kwargs) -> dict[str, float]:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable

if __name__ == "__main__":
    raise SystemExit(main())
