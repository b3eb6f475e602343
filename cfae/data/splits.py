"""How the ratings are split into training, validation and test parts; the test part chooses nothing,
validation drives early stopping and tuning.

- `random`: the study's folds (sec. 4.1), independent random draws of the ratings;
- `u1`..`u5`: GroupLens's own splits of ML-100K;
- `temporal`: the last ratings in time are the test part, the ones before them validation: the model is
  asked about the future of the data it trained on;
- `leave_last`: each user's last `n` ratings in time are the test part, the `n` before them validation;
- `users`: held-out users (strong generalization, vae_cf's protocol): the model trains on the other users
  only; a held-out user's ratings are split into a fold-in part, which the model is given as input, and a
  scored part, which it predicts.

A split is indices into the ratings (the rating matrix's CSR order); `val_foldin` and `test_foldin` are
ratings given as input when scoring, never trained on.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cfae.checks import DataError, is_int

NONE = np.empty(0, dtype=np.int64)


class Split(NamedTuple):
    train: np.ndarray  # indices into the ratings (CSR data order): trained on
    val: np.ndarray  # scored by validation
    test: np.ndarray  # scored by the test
    val_foldin: np.ndarray = NONE  # the validation users' own input, held-out users only
    test_foldin: np.ndarray = NONE


def split_ratings(n_ratings: int, fold: int, n_folds: int = 5, test_fraction: float = 0.2,
                  val_fraction: float = 0.05, seed: int = 0) -> Split:
    """Fold `fold` of `n_folds` independent random splits, as in the study (sec. 4.1: "the test sets are
    not disjoint but rather sampled randomly"). The validation part is `val_fraction` of the training part.
    """
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
    rest = np.flatnonzero(~is_test)
    order = np.random.default_rng([seed, 0]).permutation(len(rest))
    n_val = round(val_fraction * len(rest))
    return Split(train=np.sort(rest[order[n_val:]]), val=np.sort(rest[order[:n_val]]), test=np.flatnonzero(is_test))


def split_temporal(times: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.05) -> Split:
    """The last `test_fraction` of the ratings in time as the test part, the `val_fraction` of the rest
    just before them as validation; ties in time keep the data's order."""
    order = np.argsort(times, kind="stable")
    n = len(order)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * (n - n_test))
    return Split(train=np.sort(order[:n - n_test - n_val]), val=np.sort(order[n - n_test - n_val:n - n_test]),
                 test=np.sort(order[n - n_test:]))


def split_leave_last(users: np.ndarray, times: np.ndarray, n: int = 1) -> Split:
    """Each user's last `n` ratings in time as the test part and the `n` before them as validation (ties in
    time in the data's order); a user with `2n` ratings or fewer keeps them all in training."""
    order = np.lexsort((times, users))  # by user, then time; lexsort is stable
    sorted_users = users[order]
    counts = np.bincount(users)
    first = np.searchsorted(sorted_users, sorted_users)  # where each rating's user begins
    from_last = counts[sorted_users] - 1 - (np.arange(len(order)) - first)  # 0: the user's last rating
    enough = counts[sorted_users] > 2 * n
    test, val = enough & (from_last < n), enough & (from_last >= n) & (from_last < 2 * n)
    return Split(train=np.sort(order[~(test | val)]), val=np.sort(order[val]), test=np.sort(order[test]))


def heldout_count(heldout: int | float, n_users: int) -> int:
    """Users per held-out part: `heldout` itself if a whole number, else that fraction of the users."""
    count = heldout if is_int(heldout) else round(heldout * n_users)
    if not (1 <= count and 2 * count < n_users):
        raise DataError(f"data.heldout_users={heldout}: {count} validation and {count} test users of {n_users} "
                        f"leave no one to train on")
    return count


VAE_CF_SEED = 98765  # dawenl/vae_cf's ML-20M notebook seeds numpy with it before each of its draws


def split_users(users: np.ndarray, items: np.ndarray, positions: np.ndarray, n_users: int, heldout: int | float,
                scored_fraction: float = 0.2, seed: int = VAE_CF_SEED) -> Split:
    """Held-out users, as vae_cf's notebook draws them: the users (by id) permuted by numpy's RandomState(seed),
    the last `2 * heldout` of them held out, half for validation, half for test; only ratings of items some
    training user rated are kept for them; then for each held-out user, in id order, with the generator seeded
    anew before each part, `int(scored_fraction * n)` of its n ratings (in the data's order, `positions`)
    drawn to be scored and the rest given as input; a user with fewer than 5 is all input. Ratings are indexed
    (users[i], items[i]) by their rows and columns in the matrix; ratings of items no training user rated
    are in no part."""
    count = heldout_count(heldout, n_users)
    permuted = np.random.RandomState(seed).permutation(n_users)
    part_of = np.zeros(n_users, dtype=np.int8)  # 0 train, 1 validation, 2 test
    part_of[permuted[n_users - 2 * count:n_users - count]] = 1
    part_of[permuted[n_users - count:]] = 2
    train = np.flatnonzero(part_of[users] == 0)
    seen = np.zeros(items.max() + 1, dtype=bool)
    seen[items[train]] = True
    parts = [train]
    for held in (1, 2):
        rng = np.random.RandomState(seed)  # the notebook seeds anew before each part's loop
        mine = np.flatnonzero((part_of[users] == held) & seen[items])
        mine = mine[np.lexsort((positions[mine], users[mine]))]  # by user id, then in the data's order
        starts = np.flatnonzero(np.r_[True, users[mine][1:] != users[mine][:-1]])
        scored = np.zeros(len(mine), dtype=bool)
        for start, end in zip(starts, np.r_[starts[1:], len(mine)]):
            n = end - start
            if n >= 5:
                scored[start + rng.choice(n, size=int(scored_fraction * n), replace=False)] = True
        parts += [np.sort(mine[scored]), np.sort(mine[~scored])]
    train, val, val_foldin, test, test_foldin = parts
    return Split(train=train, val=val, test=test, val_foldin=val_foldin, test_foldin=test_foldin)
