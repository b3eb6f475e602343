"""Item models solved in closed form, for top-N recommendation: EASE and the popularity baseline.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): an item-item weight matrix B
with a zero diagonal, the least-squares autoencoder of the click matrix X with an L2 penalty,

    min_B ||X - X B||^2 + l2 ||B||^2  s.t. diag(B) = 0   =>   P = (X^T X + l2 I)^-1,  B = -P / diag(P), diag(B) = 0

and a user's scores x_u B. Its one knob, `l2`, is chosen on validation (a sweep; Steck: 500 on ML-20M).
Popularity scores every item by how many training users clicked it: the floor every model must clear.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from cfae.checks import NonNegative
from cfae.models.ranking import RankingModel
from cfae.sparse import SparseRows


class EASE(RankingModel):
    closed_form = True

    def __init__(self, n_inputs: int, l2: NonNegative = 500.0, **base):
        super().__init__(n_inputs=n_inputs, **base)
        self.l2 = l2
        self.weight = nn.Parameter(torch.zeros(n_inputs, n_inputs), requires_grad=False)  # B: (n_items, n_items)

    def solve(self, train_matrix: sp.csr_matrix) -> None:
        x = train_matrix.astype(np.float64)
        gram = (x.T @ x).toarray()  # (n_items, n_items)
        gram[np.diag_indices_from(gram)] += self.l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        self.weight.copy_(torch.from_numpy(b).float())

    def forward(self, x: SparseRows) -> Tensor:
        return x.to_dense() @ self.weight  # (batch, n_items)


class Popularity(RankingModel):
    closed_form = True

    def __init__(self, n_inputs: int, **base):
        super().__init__(n_inputs=n_inputs, **base)
        self.clicks = nn.Parameter(torch.zeros(n_inputs), requires_grad=False)  # training users per item

    def solve(self, train_matrix: sp.csr_matrix) -> None:
        self.clicks.copy_(torch.from_numpy(np.asarray((train_matrix > 0).sum(axis=0)).ravel()).float())

    def forward(self, x: SparseRows) -> Tensor:
        return self.clicks.expand(x.n_rows, -1)  # (batch, n_items): the same for every user
