"""The kernel choices behind cfae's sparse path, each against the alternative it replaced, same process.

    python benchmarks/kernels.py [--repeats 10]

Two random batches of 256 rows with latent 500: `ml1m`, the shape of an ML-1M item batch (6,040 columns,
233 ratings a row, 4% of the cells) and `ml20m`, ML-20M's (138,493 columns, 568 a row, 0.4%). Timed,
median of `--repeats` after a warm-up, float32:
- the encoder's weight gradient X^T @ grad: torch's own embedding_bag backward (sort and scatter) against
  `column_sums` (the entries regrouped by column and summed as embedding bags);
- the sampled output product with the weight stored (hidden, n_cols) against one row per output column
  (n_cols, hidden), nn.Linear's layout, and the dense product over every cell under bf16 autocast (what
  `sampled_output=auto` weighs it against there);
- in float32, the output layer's forward and backward of the masked squared error, sampled (`SampledLinear`)
  against dense (every cell, indexed at the rated ones after), at 2% to 30% of ML-1M's cells in 256-row
  batches and at 4% over the whole 3,260-row item matrix: where `auto` draws its line in float32;
- allocating and filling a (n_cols, 500) gradient with glibc's defaults, then after `keep_freed_memory`.
Last line: `<shape>_<what>_ms=` for each, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from common import timings

from cfae.processes import keep_freed_memory
from cfae.sparse import SampledLinear, SparseRows, column_sums

SHAPES = {"ml1m": (6_040, 233), "ml20m": (138_493, 568)}  # columns, ratings per row
ROWS, HIDDEN = 256, 500
SHARES = (0.02, 0.04, 0.08, 0.16, 0.3)  # of ML-1M's cells rated, for the float32 output layer


def batch(n_cols: int, per_row: int, generator: torch.Generator, rows: int = ROWS) -> SparseRows:
    col = torch.cat([torch.randperm(n_cols, generator=generator)[:per_row].sort().values for _ in range(rows)])
    crow = torch.arange(rows + 1, dtype=torch.int64) * per_row
    val = torch.randint(1, 6, (len(col),), generator=generator).float()
    return SparseRows(torch.arange(rows), crow, col, val, n_cols)


def median_ms(f, repeats: int) -> float:
    return 1000 * statistics.median(timings(f, repeats))


def measure(name: str, x: SparseRows, generator: torch.Generator, repeats: int) -> dict[str, float]:
    weight = torch.randn(x.n_cols, HIDDEN, generator=generator).requires_grad_()
    grad = torch.randn(ROWS, HIDDEN, generator=generator)
    h = torch.randn(ROWS, HIDDEN, generator=generator)
    out = F.embedding_bag(x.col, weight, x.crow, per_sample_weights=x.val, mode="sum", include_last_offset=True)
    torch_backward = lambda: torch.autograd.grad(out, weight, grad, retain_graph=True)[0]  # noqa: E731
    ours = lambda: column_sums(grad, x.crow, x.col, x.val, x.n_cols)  # noqa: E731
    torch.testing.assert_close(torch_backward(), ours())
    pattern = torch.sparse_csr_tensor(x.crow, x.col, torch.zeros(len(x.col)), (ROWS, x.n_cols), check_invariants=False)
    by_row = weight.detach()  # (n_cols, hidden): one row per output column
    by_column = by_row.T.contiguous()  # (hidden, n_cols)
    return {f"{name}_torch_backward_ms": median_ms(torch_backward, repeats),
            f"{name}_column_sums_ms": median_ms(ours, repeats),
            f"{name}_sampled_hidden_by_cols_ms": median_ms(lambda: torch.sparse.sampled_addmm(pattern, h, by_column),
                                                           repeats),
            f"{name}_sampled_cols_by_hidden_ms": median_ms(lambda: torch.sparse.sampled_addmm(pattern, h, by_row.T),
                                                           repeats),
            f"{name}_dense_bf16_ms": median_ms(lambda: dense_bf16(h, by_row), repeats)}


def output_layer_ms(x: SparseRows, generator: torch.Generator, repeats: int) -> tuple[float, float]:
    """(sampled, dense) milliseconds of the float32 output layer's forward and backward at the cells of x."""
    weight = torch.randn(x.n_cols, HIDDEN, generator=generator).requires_grad_()
    bias = torch.zeros(x.n_cols, requires_grad=True)
    h = torch.randn(x.n_rows, HIDDEN, generator=generator).requires_grad_()
    row = x.row_index()

    def sampled():
        ((SampledLinear.apply(h, weight, bias, x.crow, x.col) - x.val) ** 2).mean().backward()

    def dense():
        ((F.linear(h, weight, bias)[row, x.col] - x.val) ** 2).mean().backward()

    return median_ms(sampled, repeats), median_ms(dense, repeats)


def dense_bf16(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The whole (rows, n_cols) output under bf16 autocast, as cfae's dense path computes it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.linear(h, weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    figures = {}
    for name, shape in SHAPES.items():
        figures.update(measure(name, batch(*shape, generator), generator, args.repeats))
    for setting in ("default", "keep_freed"):
        if setting == "keep_freed" and not keep_freed_memory():
            break
        figures[f"ml20m_alloc_{setting}_ms"] = median_ms(lambda: torch.empty(138_493, HIDDEN).fill_(1.0), args.repeats)
    n_cols = SHAPES["ml1m"][0]
    layers = {f"{share:.0%} of 256 rows": batch(n_cols, round(share * n_cols), generator) for share in SHARES}
    layers["4% of 3260 rows"] = batch(n_cols, round(0.04 * n_cols), generator, rows=3_260)

    for name in SHAPES:
        print(f"{name:>6}: X^T @ grad: torch's backward {figures[f'{name}_torch_backward_ms']:.1f} ms, column_sums "
              f"{figures[f'{name}_column_sums_ms']:.1f} ms; sampled product, weight (hidden, n_cols) "
              f"{figures[f'{name}_sampled_hidden_by_cols_ms']:.1f} ms, (n_cols, hidden) "
              f"{figures[f'{name}_sampled_cols_by_hidden_ms']:.1f} ms; dense bf16 over every cell "
              f"{figures[f'{name}_dense_bf16_ms']:.1f} ms")
    for name, x in layers.items():
        sampled, dense = output_layer_ms(x, generator, args.repeats)
        print(f"float32 output layer, forward + backward, {name}: sampled {sampled:.1f} ms, dense {dense:.1f} ms, "
              f"dense / sampled {dense / sampled:.2f}")
    ratios = {f"{name}_column_sums_over_torch": figures[f"{name}_column_sums_ms"] / figures[f"{name}_torch_backward_ms"]
              for name in SHAPES}
    ratios["ml20m_rows_over_columns_layout"] = (figures["ml20m_sampled_cols_by_hidden_ms"]
                                                / figures["ml20m_sampled_hidden_by_cols_ms"])
    if "ml20m_alloc_keep_freed_ms" in figures:
        ratios["alloc_keep_freed_over_default"] = (figures["ml20m_alloc_keep_freed_ms"]
                                                   / figures["ml20m_alloc_default_ms"])
    print(" ".join([*(f"{k}={v:.1f}" for k, v in figures.items()), *(f"{k}={v:.2f}" for k, v in ratios.items())]))


if __name__ == "__main__":
    main()
