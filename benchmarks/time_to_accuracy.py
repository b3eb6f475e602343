"""Time to a model of a given quality: cfae against Surprise's SVD, on one split, in one run.

    pip install scikit-surprise      # the peer; needed by this benchmark only
    CFAE_DATA_DIR=../shared/data python benchmarks/time_to_accuracy.py [--repeats 3] [--arms ...]

Every arm sees cfae's ML-1M fold-0 split (80:20; `--overrides` for others). Surprise's `SVD` is
fitted on the training and validation parts together (it has no use for a validation part) and its clock
is `fit()` alone: the trainset is built before. A cfae arm is `python train.py <overrides>` run in this
process, into a throwaway MLflow store: its clock starts at `trainer.fit` (data already loaded, as
Surprise's) and includes what training does, validation and early stopping included. After each of its
epochs the benchmark also measures the test RMSE of the current weights, with the clock paused: that
curve says when the arm first reached each level, and nothing is chosen from it (the arm's final figure
is its own, the best validation epoch's test RMSE).

The arms run interleaved, `--repeats` times, so that a machine busy with something else slows them alike;
figures are medians with the min-max spread. Surprise's SVD is single-threaded Cython; cfae uses torch's
threads (all cores). The last line is the default `train.py` against Surprise's default `SVD()`:
`s_to_surprise_default=<s> surprise_default_fit_s=<s> ratio=<r>`, where the first is the time the default
run takes to reach the test RMSE that `SVD()` ends at, in the same repeat, and the ratio their median.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import lightning as L
import numpy as np
from common import quiet_benchmark, scratch_run
from omegaconf import open_dict

from cfae.configs import compose
from cfae.metrics import MaskedRMSE
from cfae.processes import keep_freed_memory, machine
from cfae.train import build, fit

LEVELS = (0.8725, 0.852, 0.845)  # Surprise SVD() defaults, SVD tuned, and the default train.py's target
SURPRISE = {  # arm: SVD's arguments
    "surprise_default": {},
    "surprise_tuned": {"n_factors": 100, "n_epochs": 50, "lr_all": 0.005, "reg_all": 0.05},
}
CFAE = {  # arm: train.py overrides
    "cfae_default": [],
    "cfae_mf": ["model=mf"],
    "cfae_autorec_tuned": ["+experiment=autorec_tuned"],
}


@dataclass
class Result:
    fit_s: float
    rmse: float  # the arm's final test RMSE
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, test RMSE) after each epoch

    def seconds_to(self, level: float) -> float:
        """When the arm first reached `level` (inf if never). An arm without a curve reaches its final
        RMSE when its fit ends."""
        points = self.curve or [(self.fit_s, self.rmse)]
        return next((s for s, rmse in points if rmse <= level), math.inf)


class TestCurve(L.Callback):
    """After each validation, the test RMSE of the current weights, timed apart from training."""

    current: list[tuple[float, float]] = []  # the curve of the run in progress

    def on_fit_start(self, trainer, pl_module) -> None:
        TestCurve.current = []
        self.start, self.paused = time.perf_counter(), 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        metric = MaskedRMSE(*trainer.datamodule.rating_range)
        for batch in trainer.datamodule.test_dataloader():
            batch = trainer.datamodule.on_after_batch_transfer(batch, 0)
            metric.update(pl_module.predict_held_out(batch), batch.targets.val)
        TestCurve.current.append((now - self.start - self.paused, float(metric.compute())))
        self.paused += time.perf_counter() - now


def surprise_arm(arguments: dict, train_val, test, seed: int) -> Result:
    from surprise import SVD

    algo = SVD(random_state=seed, **arguments)
    start = time.perf_counter()
    algo.fit(train_val)
    fit_s = time.perf_counter() - start
    pred = np.array([algo.predict(u, i, clip=True).est for (u, i, _) in test])
    truth = np.array([r for (_, _, r) in test])
    return Result(fit_s, float(np.sqrt(np.mean((pred - truth) ** 2))))


def cfae_arm(overrides: list[str], store: Path, seed: int) -> Result:
    cfg = scratch_run(store, *overrides, f"seed={seed}")
    with open_dict(cfg):
        cfg.callbacks.test_curve = {"_target_": f"{__name__}.TestCurve"}
    metrics = fit(cfg).metrics
    return Result(metrics["time/fit_s"], metrics["test/rmse"], list(TestCurve.current))


def surprise_data(overrides: list[str]):
    """The cfae arms' split as Surprise's (train + validation) trainset and (user, item, rating) test triples."""
    import pandas as pd
    from surprise import Dataset, Reader

    dm = build(compose(*overrides).data)
    dm.setup()
    train_val, test = dm.test_inputs.tocoo(), dm.test_matrix.tocoo()
    frame = pd.DataFrame({"row": train_val.row, "col": train_val.col, "rating": train_val.data})
    reader = Reader(rating_scale=dm.rating_range)
    trainset = Dataset.load_from_df(frame[["row", "col", "rating"]], reader).build_full_trainset()
    return trainset, list(zip(test.row.tolist(), test.col.tolist(), test.data.tolist())), dm


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"not reached in {len(values) - len(finite)} of {len(values)}" + (
            f" ({statistics.median(finite):.1f} s in the others)" if finite else "")
    return f"{statistics.median(values):.1f} s [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default=",".join([*SURPRISE, *CFAE]))
    parser.add_argument("--overrides", default="", help="train.py overrides for every arm's data and every cfae "
                                                        "arm, space-separated (e.g. 'data=ml100k data.fold=1')")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in SURPRISE and a not in CFAE]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; known: {[*SURPRISE, *CFAE]}")
    quiet_benchmark()
    keep_freed_memory()
    os.environ.setdefault("CFAE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    common = args.overrides.split()
    train_val, test, dm = surprise_data(common)
    print(f"{machine()}, {date.today()}; {dm.dataset} fold {dm.fold}: {train_val.n_ratings} training+validation "
          f"and {len(test)} test ratings; {args.repeats} interleaved repeats", flush=True)
    results: dict[str, list[Result]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as store:
        for repeat in range(args.repeats):
            for arm in arms:
                if arm in SURPRISE:
                    r = surprise_arm(SURPRISE[arm], train_val, test, seed=repeat)
                else:
                    r = cfae_arm([*common, *CFAE[arm]], Path(store), seed=repeat)
                results[arm].append(r)
                reached = "  ".join(f"<={lv}: {r.seconds_to(lv):.1f} s" for lv in LEVELS)
                print(f"repeat {repeat} {arm:>18}: test RMSE {r.rmse:.4f}, fit {r.fit_s:.1f} s;  {reached}",
                      flush=True)
    print(f"\n{'arm':>18}  {'test RMSE':>16}  {'fit':>22}  " + "  ".join(f"{'to ' + str(lv):>22}" for lv in LEVELS))
    for arm, rs in results.items():
        rmses = [r.rmse for r in rs]
        print(f"{arm:>18}  {statistics.median(rmses):.4f} [{min(rmses):.4f}-{max(rmses):.4f}]  "
              f"{spread([r.fit_s for r in rs]):>22}  "
              + "  ".join(f"{spread([r.seconds_to(lv) for r in rs]):>22}" for lv in LEVELS))
    if "surprise_default" in results and "cfae_default" in results:
        pairs = list(zip(results["cfae_default"], results["surprise_default"]))
        to_peer = [c.seconds_to(s.rmse) for c, s in pairs]  # the peer's own final RMSE of the same repeat
        ratios = [t / s.fit_s for t, (_, s) in zip(to_peer, pairs)]
        print(f"s_to_surprise_default={statistics.median(to_peer):.2f} "
              f"surprise_default_fit_s={statistics.median([s.fit_s for _, s in pairs]):.2f} "
              f"ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    sys.exit(main())
