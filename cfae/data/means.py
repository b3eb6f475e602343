"""Row and column means of a sparse rating matrix, and the fallbacks built from them for held-out ratings a
model cannot predict (a row or a column with no input ratings)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def rating_means(matrix: sp.csr_matrix, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean stored rating of each column (axis=0) or row (axis=1), the global mean where there is
    none, and how many ratings each has."""
    owner = matrix.indices if axis == 0 else np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    size = matrix.shape[1 - axis]
    counts = np.bincount(owner, minlength=size)
    sums = np.bincount(owner, matrix.data, minlength=size)
    return np.divide(sums, counts, out=np.full(size, matrix.data.mean()), where=counts > 0), counts


def fallback_predictions(inputs: sp.csr_matrix, targets: sp.csr_matrix) -> np.ndarray:
    """For each held-out rating (in `targets`' CSR order): NaN if the model can predict it, else a
    fallback. A rating whose row has no input ratings gets its column's mean, one whose column has no
    input ratings gets its row's mean, and one with neither gets the global mean."""
    global_mean = inputs.data.mean()
    row_mean, row_n = rating_means(inputs, axis=1)
    col_mean, col_n = rating_means(inputs, axis=0)
    t = targets.tocoo()
    row_ok, col_ok = row_n[t.row] > 0, col_n[t.col] > 0
    fallback = np.where(row_ok, row_mean[t.row], col_mean[t.col])  # a usable side's mean...
    fallback = np.where(row_ok | col_ok, fallback, global_mean)  # ...or the global mean if neither is
    return np.where(row_ok & col_ok, np.nan, fallback).astype(np.float32)
