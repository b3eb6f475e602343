"""Ranking quality beside RMSE: Recall@K and NDCG@K on the held-out ratings.

The protocol (the all-unrated-items ranking of Liang et al., "Variational Autoencoders for Collaborative
Filtering", WWW 2018, with explicit ratings made binary as in Sedhain et al.'s and most later studies):

- for each user, the model scores every item the user did not rate in the training and validation parts;
- the relevant items are the user's held-out (test) ratings of at least `threshold` (4 on the 1..5 scale);
  everything else, held-out ratings below it and unrated items alike, is not relevant;
- Recall@K = hits in the top K / min(K, number relevant) (Liang et al.'s normalisation, so that 1 is
  reachable), NDCG@K with binary gains and log2 discounts, both averaged over the users with at least one
  relevant held-out item.

Scoring every user x item cell is the one dense step: it needs n_users x n_items floats (ML-1M: 79 MB), so
it is skipped above `max_cells`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from cfae.sparse import SparseRows


@torch.no_grad()
def score_matrix(model, inputs: sp.csr_matrix, chunk: int = 256) -> np.ndarray:
    """(n_rows, n_cols) predicted ratings for every cell, the rows of `inputs` being the model's input."""
    n_rows, n_cols = inputs.shape
    chunk = n_rows if getattr(model, "whole_matrix", False) else chunk
    model.eval()
    scores = np.empty((n_rows, n_cols), dtype=np.float32)
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(start + chunk, n_rows))
        x = SparseRows.from_csr(inputs, rows).to(model.device)
        scores[rows] = model(x).float().cpu().numpy()  # (chunk, n_cols): forward scores every cell
    return scores


def ranking_metrics(scores: np.ndarray, seen: sp.csr_matrix, held_out: sp.csr_matrix, k: int = 10,
                    threshold: float = 4.0, chunk: int = 1024) -> dict[str, float]:
    """Recall@k and NDCG@k averaged over users; every argument is users x items (`seen`: the ratings the
    model was given, excluded from the ranking; `held_out`: the test ratings)."""
    if k >= scores.shape[1]:
        raise ValueError(f"ranking.k={k} needs more than {k} items; there are {scores.shape[1]}")
    relevant = held_out.multiply(held_out >= threshold).tocsr()
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr))
    discount = 1 / np.log2(np.arange(2, k + 2))  # (k,)
    recall, ndcg = [], []
    for start in range(0, len(users), chunk):
        u = users[start:start + chunk]
        s = scores[u].copy()
        s[seen[u].nonzero()] = -np.inf  # never recommend what the user already rated
        top = np.argpartition(-s, k, axis=1)[:, :k]  # (users, k), unordered
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)  # best first
        hits = np.asarray(relevant[u].toarray()[np.arange(len(u))[:, None], top] > 0)  # (users, k)
        n_relevant = np.minimum(np.diff(relevant.indptr)[u], k)
        recall.append(hits.sum(1) / n_relevant)
        ideal = np.cumsum(discount)[n_relevant - 1]
        ndcg.append((hits * discount).sum(1) / ideal)
    if not recall:
        return {f"recall_at_{k}": float("nan"), f"ndcg_at_{k}": float("nan"), "ranking_users": 0}
    return {f"recall_at_{k}": float(np.concatenate(recall).mean()), f"ndcg_at_{k}": float(np.concatenate(ndcg).mean()),
            "ranking_users": len(users)}


def evaluate_ranking(model, datamodule, k: int = 10, threshold: float = 4.0,
                     max_cells: int = 200_000_000) -> dict[str, float] | None:
    """Ranking metrics of a fitted model on the datamodule's test part (None above `max_cells`)."""
    inputs = datamodule.train_val_matrix
    if inputs.shape[0] * inputs.shape[1] > max_cells:
        return None
    scores = score_matrix(model, inputs)
    seen, held_out = inputs, datamodule.test_matrix
    if datamodule.orientation == "item":  # rows are items: rank per user, the columns
        scores, seen, held_out = scores.T, seen.T.tocsr(), held_out.T.tocsr()
    return ranking_metrics(np.ascontiguousarray(scores), seen, held_out, k, threshold)
