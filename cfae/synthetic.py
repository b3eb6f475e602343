"""Synthetic MovieLens-format ratings with a planted structure, for tests and benchmarks.

rating = round(mean + user bias + item bias + <p_u, q_i> + noise), clipped to 1..5, on a random
subset of cells: a model that finds the low-rank structure beats the global mean by a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfae.data.ratings import Ratings


def planted_ratings(n_users: int = 300, n_items: int = 200, rank: int = 3, density: float = 0.3,
                    noise: float = 0.25, seed: int = 0) -> Ratings:
    rng = np.random.default_rng(seed)
    n_cells = n_users * n_items
    n = int(density * n_cells)
    if n_cells <= 10**7:
        cells = np.sort(rng.choice(n_cells, size=n, replace=False))
    else:  # ML-20M's shape has 3.7e9 cells: draw with replacement, drop repeats, top up
        cells = np.unique(rng.integers(0, n_cells, size=int(n * 1.01) + 1000))
        while len(cells) < n:
            cells = np.unique(np.concatenate([cells, rng.integers(0, n_cells, size=n - len(cells) + 1000)]))
        cells = np.sort(rng.choice(cells, size=n, replace=False))
    users, items = np.divmod(cells, n_items)
    p = rng.normal(size=(n_users, rank))
    q = rng.normal(size=(n_items, rank))
    user_bias = rng.normal(scale=0.4, size=n_users)
    item_bias = rng.normal(scale=0.4, size=n_items)
    score = (3.5 + user_bias[users] + item_bias[items] + np.einsum("nk,nk->n", p[users], q[items]) / np.sqrt(rank)
             + rng.normal(scale=noise, size=n))
    ratings = np.clip(np.rint(score), 1, 5).astype(np.float32)
    return Ratings(users + 1, items + 1, ratings)  # 1-based ids, as in MovieLens


def write_ratings(path: str | Path, ratings: Ratings, separator: str = "::", header: str | None = None) -> Path:
    """Write `user<sep>item<sep>rating<sep>timestamp` lines, the layout of ML-1M's ratings.dat."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timestamps = 978300000 + np.arange(len(ratings.ratings))
    rating_text = [f"{r:g}" for r in ratings.ratings]
    lines = [separator.join((str(u), str(i), r, str(t)))
             for u, i, r, t in zip(ratings.users, ratings.items, rating_text, timestamps)]
    path.write_text((header + "\n" if header else "") + "\n".join(lines) + "\n")
    return path
