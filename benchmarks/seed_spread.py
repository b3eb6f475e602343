"""How much one run's result depends on its seed: the same `train.py` run under several seeds.

    CFAE_DATA_DIR=../shared/data python benchmarks/seed_spread.py model=deep_refeed [--seeds 5]

Each seed is `python train.py <overrides> seed=<k>` run in this process, into a throwaway MLflow store. It
prints each seed's test RMSE, validation RMSE and epochs (or why it failed: a diverged run, say), then
last `mean=<m> std=<s> worst_minus_mean=<w> failed=<n>` over the seeds that finished: a run that collapsed
shows as a worst seed far above the mean, one that diverged as failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from datetime import date
from pathlib import Path

from common import quiet_benchmark, scratch_run

from cfae.processes import keep_freed_memory, machine
from cfae.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=deep_refeed")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_intermixed_args()  # overrides may come before and after the options
    quiet_benchmark()
    os.environ.setdefault("CFAE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    keep_freed_memory()
    print(f"{machine()}, {date.today()}: train.py {' '.join(args.overrides)}, seeds 0-{args.seeds - 1}", flush=True)
    tests, failed = [], 0
    with tempfile.TemporaryDirectory() as store:
        for seed in range(args.seeds):
            cfg = scratch_run(Path(store), *args.overrides, f"seed={seed}")
            try:
                m = train(cfg)
            except Exception as err:  # the run is FAILED in its store, with the reason; the other seeds go on
                failed += 1
                print(f"seed {seed}: failed: {type(err).__name__}: {err}", flush=True)
                continue
            tests.append(m["test/rmse"])
            print(f"seed {seed}: test RMSE {m['test/rmse']:.4f}, val/rmse_best {m['val/rmse_best']:.4f}, "
                  f"{m['epochs']} epochs, {m['time/fit_s']:.1f} s", flush=True)
    if not tests:
        print(f"mean=nan std=nan worst_minus_mean=nan failed={failed}")
        return
    mean, std = statistics.mean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0
    print(f"mean={mean:.4f} std={std:.4f} worst_minus_mean={max(tests) - mean:.4f} failed={failed}")


if __name__ == "__main__":
    main()
