"""Ratings as (user, item, rating[, time]) triplets, whatever file or table they came from, and the study's
cleaning of them into a sparse users x items matrix with contiguous indices.

Ids may be integers or text. Text ids are kept as integer codes into `user_names` / `item_names` (what a
CSV of 20M rows with string ids costs in codes, not 20M Python strings); the matrix's `user_ids` and
`item_ids` are the original ids either way. The matrix is scipy CSR throughout, never dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from cfae.checks import DataError


class Ratings(NamedTuple):
    users: np.ndarray  # (n,) int64: original ids, or codes into user_names
    items: np.ndarray  # (n,) int64: original ids, or codes into item_names
    ratings: np.ndarray  # (n,) float32
    # the file read, if any: errors found after parsing cite rating i as its line first_line + i
    path: Path | None = None
    first_line: int = 1
    timestamps: np.ndarray | None = None  # (n,) int64 seconds, where the data has them
    user_names: np.ndarray | None = None  # text ids: users[i] is user_names[users[i]]
    item_names: np.ndarray | None = None

    def user_id(self, i: int):
        """The original id of rating i's user."""
        return self.users[i] if self.user_names is None else self.user_names[self.users[i]]

    def item_id(self, i: int):
        return self.items[i] if self.item_names is None else self.item_names[self.items[i]]

    def clicks(self, above: float) -> Ratings:
        """The ratings above `above` as clicks (1.0), the others dropped (implicit feedback, as vae_cf makes it);
        the data's order kept, so positions and timestamps still align (lines no longer do)."""
        keep = self.ratings > above
        return self._replace(users=self.users[keep], items=self.items[keep], ratings=np.ones(int(keep.sum()),
                             dtype=np.float32), timestamps=None if self.timestamps is None else self.timestamps[keep],
                             path=None)

    def where(self, i: int, source: str) -> str:
        """Where rating i is: its file and line, else its row in `source`."""
        if self.path is None:
            return f"{source} row {i + 1}"
        return f"{self.path} line {self.first_line + i}"


@dataclass
class RatingMatrix:
    """Users x items ratings after filtering, with contiguous indices."""

    matrix: sp.csr_matrix  # (n_users, n_items) float32, canonical CSR (sorted, no duplicates)
    user_ids: np.ndarray  # original id of each row
    item_ids: np.ndarray  # original id of each column
    dropped_items: int
    dropped_ratings: int
    dropped_users: int = 0
    positions: np.ndarray | None = None  # (nnz,) each stored rating's place in the data, in CSR order
    timestamps: np.ndarray | None = None  # (nnz,) int64 seconds, in CSR order, where the data has them

    @property
    def stats(self) -> dict[str, float]:
        n_users, n_items = self.matrix.shape
        return {
            "n_users": n_users,
            "n_items": n_items,
            "n_ratings": self.matrix.nnz,
            "density": self.matrix.nnz / (n_users * n_items),
            "dropped_items": self.dropped_items,
            "dropped_users": self.dropped_users,
            "dropped_ratings": self.dropped_ratings,
        }


def unique(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ids sorted, each id's index among them, their counts), as np.unique gives them; by counting
    where the ids are small non-negative integers (codes, MovieLens ids), which is linear, else by sorting."""
    if len(ids) and ids.dtype.kind in "iu" and ids.min() >= 0 and ids.max() < 4 * len(ids) + 1_000_000:
        counts = np.bincount(ids)
        present = np.flatnonzero(counts)
        index = np.zeros(len(counts), dtype=np.int32 if len(present) < 2**31 else np.int64)
        index[present] = np.arange(len(present))
        return present, index[ids], counts[present]
    return np.unique(ids, return_inverse=True, return_counts=True)


def build_matrix(ratings: Ratings, min_item_ratings: int = 10, source: str = "ratings",
                 min_user_ratings: int = 0) -> RatingMatrix:
    """Drop items with fewer than `min_item_ratings` ratings (the study's cleaning), then users with fewer
    than `min_user_ratings` (in that order, as vae_cf's filter_triplets), and index the rest, ids sorted.

    `source` names ratings not read from a file in errors; those from a file are cited by path and line.
    """
    where = str(ratings.path) if ratings.path is not None else source
    if len(ratings.ratings) == 0:
        raise DataError(f"{where}: no ratings")
    item_codes, item_index, item_counts = unique(ratings.items)
    keep_item = item_counts >= min_item_ratings
    keep = keep_item[item_index]
    if not keep.any():
        raise DataError(f"{where}: no ratings left after dropping items with fewer than {min_item_ratings} "
                        f"ratings (data.min_item_ratings); the most-rated item has {item_counts.max()}")
    dropped_users = 0
    if min_user_ratings > 1:
        _, user_index, user_counts = unique(ratings.users[keep])
        too_few = user_counts < min_user_ratings
        if too_few.all():
            raise DataError(f"{where}: no ratings left after dropping users with fewer than {min_user_ratings} "
                            f"ratings (data.min_user_ratings); the most active user has {user_counts.max()}")
        keep[np.flatnonzero(keep)[too_few[user_index]]] = False
        dropped_users = int(too_few.sum())
    index = np.int32 if len(keep) < 2**31 - 1 else np.int64  # positions; scipy's own choice for indices
    if keep.all():  # nothing dropped: no copies of the ratings' ids
        kept = np.arange(len(keep), dtype=index)
        user_codes, rows, _ = unique(ratings.users)
        kept_items, cols = np.arange(len(item_codes)), item_index
    else:
        kept = np.flatnonzero(keep).astype(index)
        user_codes, rows, _ = unique(ratings.users[kept])
        kept_items, cols, _ = unique(item_index[kept])
    # scipy's COO -> CSR conversion is a counting sort: it puts each rating in CSR order, and its place in
    # the data (plus one: never an explicit zero) with it; a repeated (user, item) pair is summed into one cell
    shape = (len(user_codes), len(kept_items))
    where_from = sp.coo_matrix((kept + 1, (rows, cols)), shape=shape).tocsr()
    del rows, cols
    if where_from.nnz != len(kept):
        raise _repeated_pair(ratings, where)
    where_from.sort_indices()
    positions = where_from.data - 1
    matrix = sp.csr_matrix((ratings.ratings[positions], where_from.indices, where_from.indptr), shape=shape)
    timestamps = None if ratings.timestamps is None else ratings.timestamps[positions]
    user_ids = user_codes if ratings.user_names is None else ratings.user_names[user_codes]
    item_ids = item_codes[kept_items]
    item_ids = item_ids if ratings.item_names is None else ratings.item_names[item_ids]
    return RatingMatrix(matrix, user_ids, item_ids, dropped_items=int((~keep_item).sum()),
                        dropped_ratings=len(keep) - len(kept), dropped_users=dropped_users,
                        positions=positions.astype(np.int64),
                        timestamps=timestamps)


def _repeated_pair(ratings: Ratings, where: str) -> DataError:
    """The error for the earliest rating whose (user, item) pair was rated before, citing both."""
    position = np.arange(len(ratings.ratings))
    order = np.lexsort((position, ratings.items, ratings.users))  # by pair, then by position
    u, i = ratings.users[order], ratings.items[order]
    repeats = np.flatnonzero((u[1:] == u[:-1]) & (i[1:] == i[:-1]))  # order[k + 1] repeats order[k]
    k = repeats[np.argmin(order[repeats + 1])]
    # the earliest repeat is its pair's second rating, so the one sorted just before it is the first
    first, again = order[k], order[k + 1]
    pair = f"user {ratings.user_id(again)}, item {ratings.item_id(again)} is rated again"
    if ratings.path is None:
        return DataError(f"{where}: {pair} (rating {again + 1}, first as rating {first + 1})")
    return DataError(f"{where} line {ratings.first_line + again}: {pair} (first on line {ratings.first_line + first})")
