"""The Bayesian factorization machine: the strongest published baseline for rating prediction on MovieLens.

Rendle, Zhang and Koren ("On the Difficulty of Evaluating Baselines", 2019) showed that a factorization machine
sampled by Gibbs sampling, with implicit "who rated what" features, beats the neural models then published
(ML-10M 90:10: 0.7485 against Sparse FC's 0.769 and I-AutoRec's 0.782). The FM (Rendle 2010) predicts

    y(x) = w0 + sum_j w_j x_j + sum_{j<l} <v_j, v_l> x_j x_l

for a rating (u, i) whose features x are, in Rendle's "Bayesian SVD++ flipped" set (`implicit=true`):
the one-hot of u and the items u rated, each 1 / sqrt(count); the one-hot of i and the users who rated i,
likewise. `implicit=false` keeps the two one-hots: Bayesian biased MF. The "who rated what" comes from the
matrix the model is solved on (training; training and validation with refit=true), never from the test pairs
(Rendle's stricter protocol). Sampling is myFM's (Ohtsuki: `myfm`, a maintained library; the features go in
as its relation blocks, one group each, so each group gets its own prior as in Rendle's setup).

With x split into its user part x_u and its item part x_i, each sample s reduces to a biased MF:
y = w0 + b_u + b_i + <p_u, q_i> with p_u = V^T x_u, b_u = w . x_u + (|p_u|^2 - sum_j x_uj^2 |v_j|^2) / 2, and
likewise for items. The prediction is the posterior mean over the samples after `burn_in`: w0 and the biases
are averaged over all of them; the products over `samples` of them, evenly spaced, whose factors are stored
side by side (p_u^1 .. p_u^S) / S and (q_i^1 .. q_i^S), so one dot product is their mean. Users and items are
the rows and columns of the data (`data.orientation` decides which is which); the model scores only the rows
and columns it was solved on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from cfae.checks import ConfigError, Count, PositiveInt
from cfae.models.base import RatingModel
from cfae.sparse import SparseRows

log = logging.getLogger(__name__)


def features(ratings: sp.csr_matrix, implicit: bool) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(rows' features, columns' features): each entity's one-hot, beside (`implicit`) the entities of the other
    axis it has a rating with, each 1 / sqrt(their number). (n_rows, n_rows [+ n_cols]), (n_cols, n_cols [+ n_rows])."""
    ratings = ratings.tocsr()  # every stored rating counts, a 0 on a 0..5 scale too
    rated = sp.csr_matrix((np.ones(ratings.nnz), ratings.indices, ratings.indptr), shape=ratings.shape)

    def block(who: sp.csr_matrix) -> sp.csr_matrix:
        one_hot = sp.identity(who.shape[0], format="csr")
        if not implicit:
            return one_hot
        counts = np.maximum(who.getnnz(axis=1), 1)
        return sp.hstack([one_hot, sp.diags(counts**-0.5) @ who], format="csr")

    return block(rated), block(rated.T.tocsr())


class Sample(NamedTuple):
    """One Gibbs sample of the FM, reduced to a biased MF over the rows and columns of the ratings."""
    mean: float  # w0
    row_bias: np.ndarray  # (n_rows,)
    col_bias: np.ndarray  # (n_cols,)
    row_factors: np.ndarray  # (n_rows, rank)
    col_factors: np.ndarray  # (n_cols, rank)
    noise_precision: float


def draw(ratings: sp.csr_matrix, rank: int, iterations: int, implicit: bool, seed: int,
         each: Callable[[int, Sample], None]) -> None:
    """Sample the FM `iterations` times from `ratings` (rows x columns) with myFM, calling `each(i, sample)` on
    every sample and logging progress every tenth of the way."""
    with warnings.catch_warnings():  # myfm 0.4 still imports pkg_resources (hence setuptools<81)
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        import myfm

    ratings = ratings.tocsr()
    row_features, col_features = features(ratings, implicit)
    cells = ratings.tocoo()
    blocks = [myfm.RelationBlock(cells.row, row_features), myfm.RelationBlock(cells.col, col_features)]
    n_rows, n_cols = ratings.shape
    sizes = [n_rows, n_cols, n_cols, n_rows] if implicit else [n_rows, n_cols]  # one prior per group
    grouping = np.repeat(np.arange(len(sizes)), sizes).tolist()
    row_width = row_features.shape[1]
    row_squares, col_squares = row_features.multiply(row_features), col_features.multiply(col_features)
    start, every = time.perf_counter(), max(1, iterations // 10)

    def reduce(x: sp.csr_matrix, squares: sp.csr_matrix, w: np.ndarray, v: np.ndarray):
        factors = x @ v  # (entities, rank)
        pairs = 0.5 * (np.square(factors).sum(1) - squares @ np.square(v).sum(1))  # within the entity's features
        return x @ w + pairs, factors

    def callback(i: int, fm, hyper, history) -> tuple[bool, None]:
        w, v = np.asarray(fm.w), np.asarray(fm.V)  # (features,), (features, rank)
        row_bias, p = reduce(row_features, row_squares, w[:row_width], v[:row_width])
        col_bias, q = reduce(col_features, col_squares, w[row_width:], v[row_width:])
        each(i, Sample(fm.w0, row_bias, col_bias, p, q, hyper.alpha))
        if (i + 1) % every == 0 or i + 1 == iterations:
            elapsed = time.perf_counter() - start
            log.info("Gibbs sample %d/%d (%.0f s, about %.0f s left): noise precision %.3f", i + 1, iterations,
                     elapsed, elapsed / (i + 1) * (iterations - i - 1), hyper.alpha)
        return False, None

    fm = myfm.MyFMRegressor(rank=rank, random_seed=seed)
    with contextlib.redirect_stderr(io.StringIO()):  # myFM draws a progress bar it offers no switch for
        fm.fit(None, cells.data.astype(np.float64), X_rel=blocks, grouping=grouping, n_iter=iterations,
               n_kept_samples=1, callback=callback)


class BayesianFM(RatingModel):
    closed_form = True

    def __init__(
        self,
        n_inputs: int,
        n_rows: int,
        # ML-1M 90:10 fold 0, validation RMSE of the mean of 64 / 128 / 251 samples (benchmarks/fm_chain.py):
        # rank 32 0.8296 / 0.8277 / 0.8262, rank 64 0.8278 at 64 in the time rank 32 draws 128 (myFM's
        # example: rank 32, 512 samples; Rendle: up to rank 512 on ML-10M). 256 samples: about 8 min on one
        # core of a 2-core EPYC.
        rank: PositiveInt = 32,
        iterations: PositiveInt = 256,  # Gibbs samples drawn
        burn_in: Count = 5,  # the first samples, left out of the mean (myFM's "all but 5")
        samples: PositiveInt = 32,  # the samples whose products are stored, evenly spaced after the burn-in
        implicit: bool = True,  # the "who rated what" features (Bayesian SVD++ flipped); false: Bayesian MF
        seed: int = 42,
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        if not 0 <= burn_in < iterations:
            raise ConfigError(f"model.burn_in={burn_in}: it must be from 0 to model.iterations - 1 = {iterations - 1}")
        if not 1 <= samples <= iterations - burn_in:
            raise ConfigError(f"model.samples={samples}: it must be from 1 to iterations - burn_in = "
                              f"{iterations - burn_in}, the samples the mean is over")
        self.rank, self.iterations, self.burn_in, self.samples = rank, iterations, burn_in, samples
        self.implicit, self.seed = implicit, seed
        self.register_buffer("mean", torch.zeros(()))  # w0
        self.register_buffer("row_bias", torch.zeros(n_rows))
        self.register_buffer("col_bias", torch.zeros(n_inputs))
        self.register_buffer("row_factors", torch.zeros(n_rows, samples * rank))  # (p^1 .. p^S) / S
        self.register_buffer("col_factors", torch.zeros(n_inputs, samples * rank))  # (q^1 .. q^S)

    def solve(self, train_matrix: sp.csr_matrix) -> None:
        """Draw the samples from the training ratings (n_rows, n_inputs) and keep their posterior mean."""
        n_rows, n_cols = train_matrix.shape
        kept = dict(zip(np.linspace(self.burn_in, self.iterations - 1, self.samples).round().astype(int).tolist(),
                        range(self.samples)))
        totals = {"mean": 0.0, "row_bias": np.zeros(n_rows), "col_bias": np.zeros(n_cols)}
        row_factors = np.zeros((n_rows, self.samples, self.rank), dtype=np.float32)
        col_factors = np.zeros((n_cols, self.samples, self.rank), dtype=np.float32)

        def each(i: int, sample: Sample) -> None:
            if i < self.burn_in:
                return
            totals["mean"] += sample.mean
            totals["row_bias"] += sample.row_bias
            totals["col_bias"] += sample.col_bias
            if i in kept:
                row_factors[:, kept[i]], col_factors[:, kept[i]] = sample.row_factors, sample.col_factors

        draw(train_matrix, self.rank, self.iterations, self.implicit, self.seed, each)
        drawn = self.iterations - self.burn_in
        self.mean.fill_(totals["mean"] / drawn)
        self.row_bias.copy_(torch.from_numpy(totals["row_bias"] / drawn))
        self.col_bias.copy_(torch.from_numpy(totals["col_bias"] / drawn))
        self.row_factors.copy_(torch.from_numpy(row_factors.reshape(n_rows, -1) / self.samples))
        self.col_factors.copy_(torch.from_numpy(col_factors.reshape(n_cols, -1)))

    def forward(self, x: SparseRows) -> Tensor:
        """Dense predictions for the rows of `x` (only their ids are used)."""
        return (self.mean + self.row_bias[x.rows, None] + self.col_bias
                + self.row_factors[x.rows] @ self.col_factors.T)  # (batch, n_cols)

    def predict_at(self, x: SparseRows, at: SparseRows) -> Tensor:
        u, i = at.cells()
        return self.mean + self.row_bias[u] + self.col_bias[i] + (self.row_factors[u] * self.col_factors[i]).sum(-1)
