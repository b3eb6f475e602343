"""How many Gibbs samples the Bayesian FM needs, and at which rank: one chain, its posterior mean read as it grows.

    python benchmarks/fm_chain.py [--rank 32] [--iterations 256] [--no-implicit] [train.py overrides ...]
    python benchmarks/fm_chain.py --rank 64 data.test_fraction=0.1 data.fold=0

Draws one chain from the training part of the split the overrides give (as `model=bayesian_fm` would, myFM
underneath) and prints, at 8, 16, 32, ... samples and the last, the validation RMSE of the mean of the samples
after the burn-in: what `model.iterations` and `model.rank` are chosen by. The test RMSE is printed beside it
to be reported, never to choose. The machine and date first; seconds are the chain's own time.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=256)
    parser.add_argument("--burn-in", type=int, default=5)
    parser.add_argument("--no-implicit", dest="implicit", action="store_false")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from hydra.utils import instantiate

    from cfae.configs import compose
    from cfae.models.fm import Sample, draw
    from cfae.processes import machine

    cfg = compose("model=bayesian_fm", *args.overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    low, high = datamodule.rating_range
    print(f"{machine()}, {date.today()}: Bayesian FM rank {args.rank}, implicit={args.implicit}, "
          f"burn-in {args.burn_in}, {' '.join(args.overrides) or 'default split'}", flush=True)
    parts = {name: getattr(datamodule, f"{name}_matrix").tocoo() for name in ("val", "test")}
    sums = {name: np.zeros(m.nnz) for name, m in parts.items()}
    reported = {n for n in 2 ** np.arange(3, 20) if n <= args.iterations - args.burn_in}
    reported.add(args.iterations - args.burn_in)
    start = time.perf_counter()
    print(f"{'samples':>8} {'val RMSE':>9} {'test RMSE':>9} {'seconds':>8}")

    def each(i: int, sample: Sample) -> None:
        if i < args.burn_in:
            return
        for name, m in parts.items():
            sums[name] += (sample.mean + sample.row_bias[m.row] + sample.col_bias[m.col]
                           + np.einsum("nk,nk->n", sample.row_factors[m.row], sample.col_factors[m.col]))
        n = i + 1 - args.burn_in
        if n in reported:
            rmse = {name: np.sqrt(np.mean((np.clip(sums[name] / n, low, high) - m.data) ** 2))
                    for name, m in parts.items()}
            print(f"{n:>8} {rmse['val']:>9.4f} {rmse['test']:>9.4f} {time.perf_counter() - start:>8.0f}", flush=True)

    draw(datamodule.train_matrix, args.rank, args.iterations, args.implicit, args.seed, each)


if __name__ == "__main__":
    main()
