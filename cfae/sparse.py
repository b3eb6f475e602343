"""Sparse rows and the products that follow them: a batch of CSR rows (`SparseRows`), an evaluation
batch (`EvalBatch`), and the layers whose cost grows with the ratings, not with rows x columns: the input
product `SparseLinear` (forward as embedding bags, backward X^T @ grad summed column by column) and the
sampled output product `SampledLinear` (outputs only at the cells a loss or a metric needs).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def entry_rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) the row of each entry of a CSR matrix with row offsets `crow`."""
    rows = torch.arange(len(crow) - 1, device=crow.device)
    return torch.repeat_interleave(rows, crow.diff(), output_size=nnz)


class SparseRows(NamedTuple):
    """A batch of CSR rows as torch tensors; Lightning moves it to the model's device as a whole."""

    rows: torch.Tensor  # (batch,) int64 index of each row in the whole matrix (for per-row parameters)
    crow: torch.Tensor  # (batch + 1,) int64 row offsets into col/val
    col: torch.Tensor  # (nnz,) int64
    val: torch.Tensor  # (nnz,) float32
    n_cols: int

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix, rows: np.ndarray) -> SparseRows:
        """The rows `rows` of `matrix`."""
        m = matrix[rows]
        return cls(torch.as_tensor(rows, dtype=torch.int64), torch.from_numpy(m.indptr.astype(np.int64)),
                   torch.from_numpy(m.indices.astype(np.int64)), torch.from_numpy(m.data.astype(np.float32)),
                   m.shape[1])

    @property
    def n_rows(self) -> int:
        return len(self.crow) - 1

    def row_index(self) -> torch.Tensor:
        """(nnz,) the row of each stored entry."""
        return entry_rows(self.crow, len(self.col))

    def take(self, rows: torch.Tensor) -> SparseRows:
        """Rows `rows` (positions in this batch) as a batch of their own, on this batch's device, in a few
        vectorised ops: how a matrix held on the GPU serves its training batches."""
        start = self.crow[rows]
        lengths = self.crow[rows + 1] - start
        crow = torch.zeros(len(rows) + 1, dtype=torch.int64, device=self.crow.device)
        torch.cumsum(lengths, 0, out=crow[1:])
        nnz = int(crow[-1])
        at = torch.repeat_interleave(start - crow[:-1], lengths, output_size=nnz)
        at += torch.arange(nnz, device=self.crow.device)  # entry j of row i sits at start[i] + j
        return SparseRows(self.rows[rows], crow, self.col[at], self.val[at], self.n_cols)

    def to(self, device: torch.device) -> SparseRows:
        return SparseRows(*(t.to(device) for t in self[:4]), self.n_cols)

    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nnz,) each: the matrix row and the column of each stored entry."""
        return self.rows[self.row_index()], self.col

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.n_rows, self.n_cols, device=self.val.device)  # (batch, n_cols)
        dense[self.row_index(), self.col] = self.val
        return dense


class EvalBatch(NamedTuple):
    """Rows to evaluate: their input ratings, their held-out ratings, and the fallback for each held-out
    rating (NaN where the model's prediction is used)."""

    inputs: SparseRows
    targets: SparseRows
    fallback: torch.Tensor  # (targets nnz,)


def column_sums(rows: Tensor, crow: Tensor, col: Tensor, weights: Tensor, n_cols: int) -> Tensor:
    """(n_cols, d): for each column c of a CSR pattern, the sum over its entries k of weights[k] times the
    row of `rows` (batch, d) that entry k sits in; in matrix terms X^T @ rows, X the pattern holding
    `weights`. The entries are regrouped by column and summed as embedding bags, one bag per column, so
    the cost is the entries' plus writing the result (empty columns come out zero). torch's own backward of
    embedding_bag sorts and scatters instead: 6.1 ms against 2.5 on an ML-1M batch (benchmarks/kernels.py)."""
    order = torch.argsort(col, stable=True)
    offsets = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(torch.bincount(col, minlength=n_cols), 0, out=offsets[1:])
    return F.embedding_bag(entry_rows(crow, len(col))[order], rows, offsets,
                           per_sample_weights=weights[order].to(rows.dtype), mode="sum", include_last_offset=True)


class SparseRowsTimesDense(torch.autograd.Function):
    """X @ weight for X a batch of sparse rows (crow, col, val) and weight (n_cols, out): forward and
    backward cost grows with X's entries. Forward sums the weight rows X selects (an embedding bag);
    backward is X^T @ grad (`column_sums`), and X's values get a gradient only if they need one."""

    @staticmethod
    def forward(ctx, crow: Tensor, col: Tensor, val: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(crow, col, val, weight)
        return F.embedding_bag(col, weight, crow, per_sample_weights=val.to(weight.dtype), mode="sum",
                               include_last_offset=True)  # (batch, out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (batch, out)
        crow, col, val, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype).contiguous()
        grad_val = grad_weight = None
        if ctx.needs_input_grad[2]:  # d/d val[k] = grad[row k] . weight[col k]
            grad_val = SampledLinear.apply(grad, weight, torch.zeros_like(weight[:, 0]), crow, col).to(val.dtype)
        if ctx.needs_input_grad[3]:
            grad_weight = column_sums(grad, crow, col, val, weight.shape[0])
        return None, None, grad_val, grad_weight


class SparseLinear(nn.Module):
    """`x @ weight + bias` for sparse input rows, at a cost that grows with the stored ratings.

    The weight is stored (in_features, out_features) so that a sparse row times it is an
    embedding-bag sum of the weight rows its ratings select, scaled by the ratings. Dense inputs work too.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: SparseRows | Tensor) -> Tensor:
        if isinstance(x, SparseRows):
            return SparseRowsTimesDense.apply(x.crow, x.col, x.val, self.weight) + self.bias  # (batch, out)
        return x @ self.weight + self.bias


class SampledLinear(torch.autograd.Function):
    """(h @ weight_t.T + bias) at the cells of a CSR pattern only, a sampled dense-dense product: forward
    and backward cost grows with the number of cells, not with rows x columns.

    h (batch, hidden), weight_t (n_cols, hidden) (an output layer stored as nn.Linear stores its weight,
    one row per output column), bias (n_cols,), the pattern (crow, col) -> (nnz,). Forward is torch's
    sampled_addmm; backward is two embedding bags: each row's gradient sums the weight rows of its cells
    (grad_h), each column's sums the h rows of its cells (`column_sums`). The row-per-column layout makes
    all three read whole rows: with the weight stored (hidden, n_cols), sampled_addmm on a 138k-column
    output takes 182 ms instead of 22 (benchmarks/kernels.py).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight_t: Tensor, bias: Tensor, crow: Tensor, col: Tensor) -> Tensor:
        h = h.to(weight_t.dtype)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": used knowingly, here only
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(len(col), dtype=h.dtype, device=h.device),
                                              (h.shape[0], weight_t.shape[0]), check_invariants=False)
        ctx.save_for_backward(h, weight_t, crow, col)
        return torch.sparse.sampled_addmm(pattern, h, weight_t.T).values() + bias[col]

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (nnz,)
        h, weight_t, crow, col = ctx.saved_tensors
        grad = grad.to(weight_t.dtype).contiguous()
        grad_h = grad_weight_t = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(col, weight_t, crow, per_sample_weights=grad, mode="sum",
                                     include_last_offset=True)  # (batch, hidden)
        if ctx.needs_input_grad[1]:
            grad_weight_t = column_sums(h, crow, col, grad, weight_t.shape[0])  # (n_cols, hidden)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight_t.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, col, grad)
        return grad_h, grad_weight_t, grad_bias, None, None
