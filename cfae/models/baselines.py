"""Baselines that are not autoencoders, trained and scored exactly like them (same splits, metric,
fallbacks and MLflow fields).

- `MatrixFactorization`: biased MF (Koren, Bell and Volinsky, "Matrix Factorization Techniques for
  Recommender Systems", 2009, eq. 4-5): r_hat(u, i) = mu + b_u + b_i + p_u . q_i, squared error on the
  observed ratings plus lambda (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2) per rating. With `n_factors=0` it is
  the bias baseline (global mean plus row and column biases).
- `ImputedSVD`: the study's baseline (sec. 2 and 4.1): fill every missing cell with its item's mean,
  take the truncated SVD with k factors, and predict with the rank-k reconstruction.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import LinearOperator, svds
from torch import Tensor, nn

from cfae.checks import ConfigError, Count, NonNegative, Positive, PositiveInt
from cfae.data.means import rating_means
from cfae.models.base import RatingModel
from cfae.sparse import SparseRows


class MatrixFactorization(RatingModel):
    def __init__(
        self,
        n_inputs: int,
        n_rows: int,
        n_factors: Count = 64,  # 0: biases only
        regularization: NonNegative = 0.05,  # lambda, per rating
        init_std: Positive = 0.01,
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.regularization = regularization
        self.mean = nn.Parameter(torch.tensor(sum(self.rating_range) / 2))
        self.row_bias = nn.Parameter(torch.zeros(n_rows))
        self.col_bias = nn.Parameter(torch.zeros(n_inputs))
        self.row_factors = nn.Parameter(torch.randn(n_rows, n_factors) * init_std)  # p
        self.col_factors = nn.Parameter(torch.randn(n_inputs, n_factors) * init_std)  # q

    @torch.no_grad()
    def start_at(self, mean: float) -> None:
        self.mean.fill_(mean)

    def forward(self, x: SparseRows) -> Tensor:
        """Dense predictions for the rows of `x` (only their ids are used)."""
        p = self.row_factors[x.rows]  # (batch, factors)
        return self.mean + self.row_bias[x.rows, None] + self.col_bias + p @ self.col_factors.T  # (batch, n_cols)

    def cells(self, at: SparseRows) -> tuple[Tensor, Tensor]:
        """(nnz,) predictions at the cells of `at` and (nnz,) each cell's L2 penalty, from one gather."""
        u, i = at.cells()
        p, q, bu, bi = self.row_factors[u], self.col_factors[i], self.row_bias[u], self.col_bias[i]
        penalty = p.square().sum(-1) + q.square().sum(-1) + bu.square() + bi.square()
        return self.mean + bu + bi + (p * q).sum(-1), penalty

    def predict_at(self, x: SparseRows, at: SparseRows) -> Tensor:
        return self.cells(at)[0]

    def training_loss(self, batch: SparseRows) -> Tensor:
        pred, penalty = self.cells(batch)  # only the observed cells
        return (pred - batch.val).square().mean() + self.regularization * penalty.mean()


def imputed_svd(ratings: sp.csr_matrix, n_factors: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k SVD of `ratings` with every missing cell set to the mean of its row (axis=1) or column
    (axis=0), without building the dense matrix: it is (sparse residual) + (rank-1 means), applied as a
    linear operator. Returns (row factors U * s, column factors V)."""
    means, _ = rating_means(ratings, axis)
    coo = ratings.tocoo()
    owner = coo.col if axis == 0 else coo.row
    residual = sp.csr_matrix((coo.data - means[owner], (coo.row, coo.col)), shape=ratings.shape)
    ones = np.ones(ratings.shape[axis])
    # imputed = residual + ones (x) means (axis=0: each column j holds means[j]; axis=1: row i holds means[i])
    outer_left, outer_right = (ones, means) if axis == 0 else (means, ones)
    op = LinearOperator(
        ratings.shape, dtype=np.float64,
        matvec=lambda v: residual @ np.ravel(v) + outer_left * (outer_right @ np.ravel(v)),
        rmatvec=lambda v: residual.T @ np.ravel(v) + outer_right * (outer_left @ np.ravel(v)),
        matmat=lambda m: residual @ m + np.outer(outer_left, outer_right @ m),
        rmatmat=lambda m: residual.T @ m + np.outer(outer_right, outer_left @ m),
    )
    u, s, vt = svds(op, k=n_factors, random_state=0)
    return np.ascontiguousarray(u * s), np.ascontiguousarray(vt.T)


class ImputedSVD(RatingModel):
    """Closed form: `solve` fits it once from the training ratings; no gradient steps."""

    closed_form = True

    def __init__(
        self,
        n_inputs: int,
        n_rows: int,
        n_factors: PositiveInt = 25,  # best of 5, 10, 20, 25, 30, 50 on ML-1M fold 0's validation part
        orientation: str = "user",  # which axis holds users: the model imputes item means
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        if orientation not in ("item", "user"):
            raise ValueError(f"orientation={orientation!r}: expected 'item' or 'user'")
        if not 0 < n_factors < min(n_rows, n_inputs):
            raise ConfigError(f"model.n_factors={n_factors} (or hidden): the SVD's rank must be from 1 to "
                              f"min(rows, columns) - 1 = {min(n_rows, n_inputs) - 1} for this data")
        self.n_factors = n_factors
        self.mean_axis = 1 if orientation == "item" else 0  # item means: of rows (item rows) or of columns
        self.register_buffer("row_factors", torch.zeros(n_rows, n_factors))
        self.register_buffer("col_factors", torch.zeros(n_inputs, n_factors))

    def solve(self, train_matrix: sp.csr_matrix) -> None:
        """Fit to the training ratings (n_rows, n_inputs)."""
        rows, cols = imputed_svd(train_matrix, self.n_factors, axis=self.mean_axis)
        self.row_factors.copy_(torch.from_numpy(rows))
        self.col_factors.copy_(torch.from_numpy(cols))

    def forward(self, x: SparseRows) -> Tensor:
        return self.row_factors[x.rows] @ self.col_factors.T  # (batch, n_cols)

    def predict_at(self, x: SparseRows, at: SparseRows) -> Tensor:
        u, i = at.cells()
        return (self.row_factors[u] * self.col_factors[i]).sum(-1)
