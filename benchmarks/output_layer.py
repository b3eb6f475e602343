"""The output layer alone, sampled against dense, at several shares of rated cells: where `sampled_output=auto`
draws its line in float32.

    python benchmarks/output_layer.py

Random rows of 6,040 columns (ML-1M's users) and latent 500, float32, on the CPU with torch's threads: the
forward and backward of the masked squared error through `SampledLinear` (the output at the rated cells only)
and through the dense product over every cell, indexed at the rated cells after. Median of 7 after a warm-up.
256-row batches at 2% to 30% of the cells, and the whole 3,260-row ML-1M item matrix at 4% and 8%.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from cfae.processes import machine, timings
from cfae.sparse import SampledLinear

COLS, HIDDEN = 6_040, 500
CASES = [(256, [0.02, 0.04, 0.08, 0.16, 0.3]), (3_260, [0.04, 0.08])]  # rows, shares of the cells rated


def seconds(rows: int, share: float, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """Median seconds of the (sampled, dense) output layer's forward and backward on `rows` random rows."""
    h = torch.randn(rows, HIDDEN, requires_grad=True)
    rated = torch.rand(rows, COLS) < share
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = rated.sum(1).cumsum(0)
    row, col = rated.nonzero().T
    col = col.contiguous()
    target = torch.randn(len(col))

    def sampled():
        ((SampledLinear.apply(h, weight, bias, crow, col) - target) ** 2).mean().backward()

    def dense():
        ((F.linear(h, weight, bias)[row, col] - target) ** 2).mean().backward()

    return statistics.median(timings(sampled, 7)), statistics.median(timings(dense, 7))


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(COLS, HIDDEN, requires_grad=True)
    bias = torch.zeros(COLS, requires_grad=True)
    print(f"{machine()}; {torch.get_num_threads()} threads, float32, forward + backward, latent {HIDDEN}, "
          f"{COLS} columns")
    for rows, shares in CASES:
        for share in shares:
            s, d = seconds(rows, share, weight, bias)
            print(f"{rows} rows, {share:.0%} of the cells: sampled {s * 1e3:.1f} ms, dense {d * 1e3:.1f} ms, "
                  f"dense/sampled {d / s:.2f}", flush=True)


if __name__ == "__main__":
    main()
