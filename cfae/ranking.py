"""Ranking quality beside RMSE: Recall@K and NDCG@K on the held-out ratings.

The protocol (the all-unrated-items ranking of Liang et al., "Variational Autoencoders for Collaborative
Filtering", WWW 2018, with explicit ratings made binary as in Sedhain et al.'s and most later studies):

- for each user, the model scores every item the user did not rate in the training and validation parts;
- the relevant items are the user's held-out (test) ratings of at least `threshold` (4 on the 1..5 scale);
  everything else, held-out ratings below it and unrated items alike, is not relevant;
- Recall@K = hits in the top K / min(K, number relevant) (Liang et al.'s normalisation, so that 1 is
  reachable), NDCG@K with binary gains and log2 discounts, both averaged over the users with at least one
  relevant held-out item; `ranking.k` may list several K (`[10,20,50]`), ranked once.

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


def ranking_metrics(scores: np.ndarray, seen: sp.csr_matrix, held_out: sp.csr_matrix, k: int | list[int] = 10,
                    threshold: float = 4.0, chunk: int = 1024) -> dict[str, float]:
    """Recall@k and NDCG@k for each k (one int, or several), averaged over users; every argument is users x
    items (`seen`: the ratings the model was given, excluded from the ranking; `held_out`: the test ratings)."""
    ks = sorted({k} if isinstance(k, int) else set(k))
    top_k = ks[-1]
    if top_k >= scores.shape[1]:
        raise ValueError(f"ranking.k={top_k} needs more than {top_k} items; there are {scores.shape[1]}")
    relevant = held_out.multiply(held_out >= threshold).tocsr()
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr))
    discount = 1 / np.log2(np.arange(2, top_k + 2))  # (top_k,)
    recall, ndcg = {k: [] for k in ks}, {k: [] for k in ks}
    for start in range(0, len(users), chunk):
        u = users[start:start + chunk]
        s = scores[u].copy()
        s[seen[u].nonzero()] = -np.inf  # never recommend what the user already rated
        top = np.argpartition(-s, top_k, axis=1)[:, :top_k]  # (users, top_k), unordered
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)  # best first
        hits = np.asarray(relevant[u].toarray()[np.arange(len(u))[:, None], top] > 0)  # (users, top_k)
        for k in ks:
            n_relevant = np.minimum(np.diff(relevant.indptr)[u], k)
            recall[k].append(hits[:, :k].sum(1) / n_relevant)
            ndcg[k].append((hits[:, :k] * discount[:k]).sum(1) / np.cumsum(discount)[n_relevant - 1])
    out: dict[str, float] = {"ranking_users": len(users)}
    for k in ks:
        out[f"recall_at_{k}"] = float(np.concatenate(recall[k]).mean()) if len(users) else float("nan")
        out[f"ndcg_at_{k}"] = float(np.concatenate(ndcg[k]).mean()) if len(users) else float("nan")
    return out


def evaluate_ranking(model, datamodule, k: int | list[int] = 10, threshold: float = 4.0,
                     max_cells: int = 200_000_000) -> dict[str, float] | None:
    """Ranking metrics of a fitted model on the datamodule's test part (None above `max_cells`)."""
    inputs = datamodule.test_inputs
    if inputs.shape[0] * inputs.shape[1] > max_cells:
        return None
    scores = score_matrix(model, inputs)
    seen, held_out = inputs, datamodule.test_matrix
    if datamodule.orientation == "item":  # rows are items: rank per user, the columns
        scores, seen, held_out = scores.T, seen.T.tocsr(), held_out.T.tocsr()
    return ranking_metrics(np.ascontiguousarray(scores), seen, held_out, k, threshold)
