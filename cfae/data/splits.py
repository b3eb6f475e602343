"""The study's splits (sec. 4.1): independent random folds of the ratings into training, validation and
test parts. The test part chooses nothing; validation drives early stopping and tuning."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cfae.checks import DataError, is_number


class Split(NamedTuple):
    train: np.ndarray  # indices into the ratings (CSR data order)
    val: np.ndarray
    test: np.ndarray


def check_split(fold: int, n_folds: int, test_fraction: float, val_fraction: float) -> None:
    if not 0 <= fold < n_folds:
        raise DataError(f"data.fold={fold} is outside 0..{n_folds - 1}")
    if not (is_number(test_fraction) and 0 < test_fraction < 1):
        raise DataError(f"data.test_fraction={test_fraction}: must be > 0 and < 1")
    if not (is_number(val_fraction) and 0 < val_fraction < 1):
        raise DataError(f"data.val_fraction={val_fraction}: must be > 0 and < 1 (validation drives early stopping)")


def split_ratings(n_ratings: int, fold: int, n_folds: int = 5, test_fraction: float = 0.2,
                  val_fraction: float = 0.05, seed: int = 0) -> Split:
    """Fold `fold` of `n_folds` independent random splits, as in the study (sec. 4.1: "the test sets are
    not disjoint but rather sampled randomly"). The validation part is `val_fraction` of the training part.
    """
    check_split(fold, n_folds, test_fraction, val_fraction)
    order = np.random.default_rng([seed, fold]).permutation(n_ratings)
    n_test = round(test_fraction * n_ratings)
    n_val = round(val_fraction * (n_ratings - n_test))
    return Split(train=np.sort(order[n_test + n_val:]), val=np.sort(order[n_test:n_test + n_val]),
                 test=np.sort(order[:n_test]))
