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


# GroupLens's own five splits of ML-100K, made by the release's mku.sh from u.data's 100,000 lines:
#   head -`expr $i \* 20000` u.data | tail -20000      -> u$i.test
#   head -`expr \( $i - 1 \) \* 20000` u.data; tail -`expr \( 5 - $i \) \* 20000` u.data   -> u$i.base
# (each then sorted by user and item). The graph and kernel papers (GC-MC, IGMC, GLocal-K) report u1.
GROUPLENS_SPLITS = ("u1", "u2", "u3", "u4", "u5")
GROUPLENS_LINES = 100_000


def grouplens_test_lines(n_lines: int, split: str, where: str) -> np.ndarray:
    """Whether each line of u.data (in file order) is in `split`'s test part (one of GROUPLENS_SPLITS, which
    the DataModule checks when it is built), as mku.sh cuts it."""
    if n_lines != GROUPLENS_LINES:
        raise DataError(f"{where}: data.split={split} is GroupLens's split of ML-100K's {GROUPLENS_LINES} ratings; "
                        f"this file has {n_lines}")
    k = GROUPLENS_SPLITS.index(split) + 1
    is_test = np.zeros(n_lines, dtype=bool)
    is_test[(k - 1) * 20_000:k * 20_000] = True
    return is_test


def split_fixed_test(is_test: np.ndarray, val_fraction: float = 0.05, seed: int = 0) -> Split:
    """A split whose test part is given (`is_test`, over the ratings in CSR data order); the validation part
    is a random `val_fraction` of the rest, so it is carved from the training file only."""
    if not (is_number(val_fraction) and 0 < val_fraction < 1):
        raise DataError(f"data.val_fraction={val_fraction}: must be > 0 and < 1 (validation drives early stopping)")
    rest = np.flatnonzero(~is_test)
    order = np.random.default_rng([seed, 0]).permutation(len(rest))
    n_val = round(val_fraction * len(rest))
    return Split(train=np.sort(rest[order[n_val:]]), val=np.sort(rest[order[:n_val]]), test=np.flatnonzero(is_test))
