"""AutoRec (Sedhain, Menon, Sanner and Xie, "AutoRec: Autoencoders Meet Collaborative Filtering", WWW 2015).

One hidden layer reconstructs a partially observed row r (an item's ratings by all users for I-AutoRec,
a user's ratings for U-AutoRec):

    h(r) = g(W r + b),    r_hat = f(V h(r) + c)

trained on the observed entries of r only, with L2 on W and V. Sedhain et al. use g = sigmoid,
f = identity and 500 hidden units (sec. 3); the study swaps in ELU/SELU and RMSProp (sec. 4.3).
"""

from __future__ import annotations

from torch import Tensor, nn

from cfae.data import SparseRows
from cfae.models.base import RatingAutoencoder, SparseLinear, activation


class AutoRec(RatingAutoencoder):
    def __init__(
        self,
        n_inputs: int,
        hidden_size: int = 500,  # Sedhain et al. 2015, sec. 3: 500 hidden units
        hidden_activation: str = "sigmoid",  # g
        output_activation: str = "identity",  # f
        dropout: float = 0.0,  # on the code h; 0 is plain AutoRec
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.encoder = SparseLinear(n_inputs, hidden_size)  # W, b
        self.hidden_activation = activation(hidden_activation)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, n_inputs)  # V, c
        self.output_activation = activation(output_activation)

    def forward(self, r: SparseRows | Tensor) -> Tensor:
        h = self.dropout(self.hidden_activation(self.encoder(r)))  # (batch, hidden_size)
        return self.output_activation(self.decoder(h))  # (batch, n_inputs)
