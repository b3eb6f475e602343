"""python -m cfae.blend: rows of a study blended, the weights chosen on validation, each fold tested.

    python -m cfae.blend --study kernels --rows kernel_autorec,glocal_k
    python -m cfae.blend --study kernels,study --rows kernel_autorec,autorec_tuned --protocols 90-10

A blend predicts w0 + w1 p1 + ... + wk pk, where p1..pk are the rows' predicted ratings, each clipped to the
rating scale as the metric clips it (the blend is clipped again). On each protocol and fold where every row
has a FINISHED run in the studies named:

- the weights are the least-squares fit to the validation ratings of the predictions of each row's model that
  validation chose (`checkpoints/best.ckpt`), fed the training part as its validation was;
- the blend is tested with each row's tested model (`refit.ckpt` where the run used refit=true, else
  `best.ckpt`) fed the training and validation parts, as its test was. Each row's validation and test RMSE
  are first computed again from these predictions and must equal its run's `val/rmse_best` and `test/rmse`:
  a run whose checkpoints are not what it chose and tested is refused. The test part chooses nothing.

The runs' output folders must be on this machine (their checkpoints and `config.yaml`). Each fold becomes an
MLflow run tagged `cfae.study=<name>` and `cfae.row=blend`, so `python -m cfae.report --study <name>` renders
the blend as a row; the table printed here gives each fold's weights, each row's test RMSE and the blend's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from hydra.utils import get_class, instantiate
from mlflow.entities import Metric, Param
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cfae.checks import UsageError, reported_in_one_line
from cfae.console import quiet_libraries
from cfae.metrics import TEST_RMSE, TEST_RMSE_BEFORE_REFIT, VAL_RMSE_BEST
from cfae.processes import machine, this_process
from cfae.report import mean_ci, portable
from cfae.tracking import finished_study_runs, mlflow_client

log = logging.getLogger("cfae.blend")

ROW = "blend"  # the blend's row in its study, as cfae.report shows it
AGREEMENT = 1e-4  # how close a row's recomputed validation and test RMSE must come to its run's
VAL_FITTED = "blend/val_rmse_fitted"  # in-sample: on the validation ratings its weights were fitted to


class Member(NamedTuple):
    """One row's run on one fold, as the blend uses it."""

    row: str
    run_id: str
    output_dir: Path
    val_rmse: float  # its chosen model's, as its run logged it (val/rmse_best)
    test_rmse: float  # its tested model's, as its run logged it


class Predictions(NamedTuple):
    """Held-out ratings and each row's predictions of them, users x items in CSR order."""

    val: np.ndarray  # (n_val,) ratings
    test: np.ndarray  # (n_test,) ratings
    chosen_val: np.ndarray  # (k, n_val) the models validation chose
    chosen_test: np.ndarray  # (k, n_test) the same models on the test part
    tested_test: np.ndarray  # (k, n_test) the models each run tested (refit where it refitted)
    refitted: list[bool]
    rating_range: tuple[float, float]


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred.astype(np.float64) - target) ** 2)))


def fit_weights(preds: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(k + 1,) intercept and weights: the least-squares fit of `target` (n,) by `preds` (k, n)."""
    design = np.column_stack([np.ones(preds.shape[1]), preds.T.astype(np.float64)])
    return np.linalg.lstsq(design, target.astype(np.float64), rcond=None)[0]


def blended(weights: np.ndarray, preds: np.ndarray, rating_range: tuple[float, float]) -> np.ndarray:
    return np.clip(weights[0] + weights[1:] @ preds.astype(np.float64), *rating_range)


def held_out_predictions(checkpoint: Path, cfg, datamodule, part: str) -> sp.csr_matrix:
    """(n_users, n_items) the checkpoint's predictions of the `part` ratings ("val" or "test"), clipped to
    the scale, computed as the run computed them: its model class, its trainer's device and precision, the
    same input rows and the same fallbacks."""
    model = get_class(cfg.model._target_).load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    batches = datamodule.eval_batches(part, whole_matrix=model.whole_matrix)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    out = trainer.predict(model, dataloaders=DataLoader(batches, batch_size=None))
    targets = datamodule.val_matrix if part == "val" else datamodule.test_matrix
    values = np.concatenate([o.float().cpu().numpy() for o in out]) if out else np.empty(0, np.float32)
    pred = sp.csr_matrix((values, targets.indices, targets.indptr), shape=targets.shape)
    return in_user_rows(pred, datamodule.orientation)


def in_user_rows(matrix: sp.csr_matrix, orientation: str) -> sp.csr_matrix:
    """`matrix` with a row per user, its entries in canonical CSR order."""
    out = (matrix if orientation == "user" else matrix.T).tocsr()
    out.sort_indices()
    return out


def check_agrees(m: Member, what: str, logged: float, again: float, checkpoint: Path) -> None:
    """Refuse a member whose checkpoint does not give the RMSE its run logged."""
    if not math.isfinite(logged):
        raise UsageError(f"run {m.run_id} (row {m.row}) logged no {what}: the blend cannot check its checkpoints")
    if not abs(again - logged) <= AGREEMENT:
        raise UsageError(f"{checkpoint}: its {what} is {again:.5f} here, its run {m.run_id} logged {logged:.5f}; "
                         f"the folder holds another run's weights, or this machine computes otherwise (the "
                         f"run's machine: its tag cfae.machine)")


def fold_predictions(members: list[Member]) -> Predictions:
    """Every member's predictions of one fold's validation and test ratings; refused where the members hold
    out different ratings or a member's test RMSE is not its run's."""
    from cfae.train import build  # here: the blend's command line stays light until it has runs to load

    val = test = None
    chosen_val, chosen_test, tested_test, refitted = [], [], [], []
    for m in members:
        config = m.output_dir / "config.yaml"
        if not config.is_file():
            raise UsageError(f"{config}: not found; the blend reads each run's output folder (run {m.run_id}, "
                             f"row {m.row}) on this machine, a relative one from where the study ran (here: "
                             f"{Path.cwd()})")
        cfg = OmegaConf.load(config)
        datamodule = build(cfg.data)
        datamodule.setup("fit")
        best, refit = m.output_dir / "checkpoints" / "best.ckpt", m.output_dir / "checkpoints" / "refit.ckpt"
        if not best.is_file():
            raise UsageError(f"{best}: not found (run {m.run_id}, row {m.row}): its chosen model is needed")
        if cfg.get("refit") and not refit.is_file():
            raise UsageError(f"{refit}: not found (run {m.run_id}, row {m.row}): refit=true tested this model")
        targets = (in_user_rows(datamodule.val_matrix, datamodule.orientation),
                   in_user_rows(datamodule.test_matrix, datamodule.orientation))
        if val is None:
            val, test, first = targets[0], targets[1], m
        elif not all(_same_cells(a, b) for a, b in zip((val, test), targets)):
            raise UsageError(f"rows {first.row} and {m.row} hold out different ratings on this fold (runs "
                             f"{first.run_id}, {m.run_id}): blend rows run on the same data and split")
        chosen_val.append(held_out_predictions(best, cfg, datamodule, "val").data)
        check_agrees(m, VAL_RMSE_BEST, m.val_rmse, rmse(chosen_val[-1], val.data), best)
        chosen_test.append(held_out_predictions(best, cfg, datamodule, "test").data)
        refitted.append(bool(cfg.get("refit")))
        tested_test.append(held_out_predictions(refit, cfg, datamodule, "test").data if refitted[-1]
                           else chosen_test[-1])
        check_agrees(m, TEST_RMSE, m.test_rmse, rmse(tested_test[-1], test.data), refit if refitted[-1] else best)
    return Predictions(val.data, test.data, np.stack(chosen_val), np.stack(chosen_test), np.stack(tested_test),
                       refitted, datamodule.rating_range)


def _same_cells(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


def members_by_fold(client, experiment_id: str, studies: list[str], rows: list[str],
                    protocols: list[str] | None) -> dict[tuple[str, int], list[Member]]:
    """(protocol, fold) -> one Member per row, in `rows` order, for the folds where every row has a run (the
    latest FINISHED run of the row, protocol and fold across the studies)."""
    latest: dict[tuple[str, int, str], Member] = {}
    runs = sorted((r for s in studies for r in finished_study_runs(client, experiment_id, s)),
                  key=lambda r: r.info.start_time)
    for r in runs:
        t, p = r.data.tags, r.data.params
        if t.get("cfae.row") not in rows or t.get("cfae.figure") or "output_dir" not in p:
            continue
        if protocols and t.get("cfae.protocol") not in protocols:
            continue
        latest[(t["cfae.protocol"], int(p["data/fold"]), t["cfae.row"])] = Member(
            t["cfae.row"], r.info.run_id, Path(p["output_dir"]), r.data.metrics.get(VAL_RMSE_BEST, math.nan),
            r.data.metrics.get(TEST_RMSE, math.nan))
    folds = defaultdict(dict)
    for (protocol, fold, row), member in latest.items():
        folds[(protocol, fold)][row] = member
    missing = {key: [row for row in rows if row not in got] for key, got in folds.items()}
    for (protocol, fold), absent in sorted(missing.items()):
        if absent:
            log.warning("%s fold %d: no finished run of %s; the fold is left out", protocol, fold, ", ".join(absent))
    complete = {key: [got[row] for row in rows] for key, got in folds.items() if not missing[key]}
    if not complete:
        raise UsageError(f"no fold has a finished run of every row ({', '.join(rows)}) in the studies "
                         f"{', '.join(studies)} of {client.tracking_uri}")
    return dict(sorted(complete.items()))


class FoldResult(NamedTuple):
    protocol: str
    fold: int
    weights: np.ndarray  # (k + 1,) intercept first
    val_rmse: float  # the blend's on the validation ratings its weights were fitted to
    test_rmse: float  # the blend of the tested models
    test_rmse_before_refit: float  # the blend of the chosen models (NaN where no row refitted)
    row_test_rmse: list[float]  # each row's tested model alone


def blend_fold(protocol: str, fold: int, members: list[Member]) -> FoldResult:
    p = fold_predictions(members)
    weights = fit_weights(p.chosen_val, p.val)
    before = rmse(blended(weights, p.chosen_test, p.rating_range), p.test) if any(p.refitted) else math.nan
    return FoldResult(protocol, fold, weights, rmse(blended(weights, p.chosen_val, p.rating_range), p.val),
                      rmse(blended(weights, p.tested_test, p.rating_range), p.test), before,
                      [rmse(x, p.test) for x in p.tested_test])


def log_fold(client, experiment_id: str, name: str, rows: list[str], studies: list[str], result: FoldResult,
             members: list[Member], dataset: str, command: str) -> str:
    """The fold's MLflow run, written in one batch: the blend's metrics, its weights and the runs it blends."""
    key = f"{ROW}/{result.protocol}/fold{result.fold}"
    params = {"data/fold": result.fold, "data/dataset": dataset, "blend/rows": ",".join(rows),
              "blend/studies": ",".join(studies)}
    metrics = {TEST_RMSE: result.test_rmse, VAL_FITTED: result.val_rmse, "blend/intercept": result.weights[0]}
    if not math.isnan(result.test_rmse_before_refit):
        metrics[TEST_RMSE_BEFORE_REFIT] = result.test_rmse_before_refit
    for row, w, r in zip(rows, result.weights[1:], result.row_test_rmse):
        metrics[f"blend/weight/{row}"], metrics[f"blend/test_rmse/{row}"] = w, r
    run = client.create_run(experiment_id, run_name=f"blend-{'+'.join(rows)}-{result.protocol}-fold{result.fold}",
                            tags={"cfae.study": name, "cfae.key": key, "cfae.row": ROW,
                                  "cfae.protocol": result.protocol, "cfae.machine": machine(),
                                  "cfae.process": this_process(), "cfae.command": command,
                                  "cfae.blend.runs": json.dumps([m.run_id for m in members])})
    try:
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def markdown(results: list[FoldResult], rows: list[str]) -> str:
    """Per protocol: each fold's weights, each row's test RMSE and the blend's, then the means and CIs."""
    out = []
    for protocol in dict.fromkeys(r.protocol for r in results):
        rs = [r for r in results if r.protocol == protocol]
        refit = any(not math.isnan(r.test_rmse_before_refit) for r in rs)
        head = ["fold", "intercept", *(f"w {row}" for row in rows), *(f"test {row}" for row in rows),
                "blend val (fitted)", *(["blend, chosen models"] if refit else []), "blend test"]
        out += [f"## Protocol {protocol}", "", "| " + " | ".join(head) + " |",
                "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
        for r in rs:
            cells = [str(r.fold), f"{r.weights[0]:.3f}", *(f"{w:.3f}" for w in r.weights[1:]),
                     *(f"{x:.4f}" for x in r.row_test_rmse), f"{r.val_rmse:.4f}",
                     *([f"{r.test_rmse_before_refit:.4f}"] if refit else []), f"**{r.test_rmse:.4f}**"]
            out.append("| " + " | ".join(cells) + " |")

        def pm(values: list[float]) -> str:
            mean, ci = mean_ci(values)
            return f"{mean:.4f}" + ("" if math.isnan(ci) else f" ± {ci:.4f}")

        means = ["mean ± 95% CI", "", *([""] * len(rows)), *(pm([r.row_test_rmse[i] for r in rs])
                                                              for i in range(len(rows))),
                 pm([r.val_rmse for r in rs]), *([pm([r.test_rmse_before_refit for r in rs])] if refit else []),
                 f"**{pm([r.test_rmse for r in rs])}**"]
        out += ["| " + " | ".join(means) + " |", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="comma-separated studies holding the rows' runs")
    parser.add_argument("--rows", required=True, help="comma-separated rows to blend, e.g. kernel_autorec,glocal_k")
    parser.add_argument("--protocols", help="comma-separated protocols (default: every one with runs)")
    parser.add_argument("--name", help="the blend's study in MLflow (default: blend-<rows>)")
    parser.add_argument("--out", help="also write <out>/<name>.md")
    parser.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    quiet_libraries()
    command = shlex.join(["python", "-m", "cfae.blend", *(argv if argv is not None else sys.argv[1:])])
    studies, rows = args.study.split(","), args.rows.split(",")
    name = args.name or f"blend-{'+'.join(rows)}"
    with reported_in_one_line():
        if len(set(rows)) != len(rows) or len(rows) < 2:
            raise UsageError(f"--rows {args.rows}: name two or more different rows")
        client, experiment_id = mlflow_client(args.uri)
        folds = members_by_fold(client, experiment_id, studies, rows,
                                args.protocols.split(",") if args.protocols else None)
        other = {r.data.params.get("blend/rows") for r in finished_study_runs(client, experiment_id, name)
                 if r.data.tags.get("cfae.row") == ROW} - {",".join(rows)}
        if other:
            raise UsageError(f"--name {name}: the study holds a blend of other rows ({', '.join(sorted(other))}); "
                             f"one blend a study, so that its row is one blend")
        results = []
        for (protocol, fold), members in folds.items():  # every fold first: one refused, none is logged
            results.append(blend_fold(protocol, fold, members))
            log.info("%s fold %d: blend %.4f (rows %s)", protocol, fold, results[-1].test_rmse,
                     ", ".join(f"{x:.4f}" for x in results[-1].row_test_rmse))
        for result, members in zip(results, folds.values()):
            dataset = client.get_run(members[0].run_id).data.params.get("data/dataset", "")
            log_fold(client, experiment_id, name, rows, studies, result, members, dataset, command)
    text = (f"# Blend `{name}`: {', '.join(f'`{r}`' for r in rows)}, weights fitted on validation\n\n"
            + markdown(results, rows)
            + f"\nBlended {datetime.date.today().isoformat()} on {machine()}. Command: {portable(command)}\n")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
