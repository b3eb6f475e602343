"""AutoRec (Sedhain, Menon, Sanner and Xie, "AutoRec: Autoencoders Meet Collaborative Filtering", WWW 2015).

One hidden layer reconstructs a partially observed row r (an item's ratings by all users for I-AutoRec,
a user's ratings for U-AutoRec):

    h(r) = g(W r + b),    r_hat = f(V h(r) + c)

trained on the observed entries of r only, with L2 on W and V. Sedhain et al. use g = sigmoid,
f = identity and 500 hidden units (sec. 3); the study swaps in ELU/SELU and RMSProp (sec. 4.3).

Denoising (the study, sec. 4.3.1; Vincent et al. 2008): in training only, the input r is corrupted
(a fraction `noise` of its ratings dropped, optional Gaussian noise) while the loss still scores
every observed rating of the clean r.
"""

from __future__ import annotations

from torch import Tensor, nn

from cfae.checks import Fraction, NonNegative, PositiveInt
from cfae.models.base import RatingModel, activation, corrupt
from cfae.sparse import SparseLinear, SparseRows


class AutoRec(RatingModel):
    def __init__(
        self,
        n_inputs: int,
        hidden_size: PositiveInt = 500,  # Sedhain et al. 2015, sec. 3: 500 hidden units
        hidden_activation: str = "sigmoid",  # g
        output_activation: str = "identity",  # f
        dropout: Fraction = 0.0,  # on the code h; 0 is plain AutoRec
        noise: Fraction = 0.0,  # denoising: drop this fraction of the input ratings in training
        gaussian_noise: NonNegative = 0.0,  # denoising: Gaussian noise (its std) on the input ratings in training
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.noise, self.gaussian_noise = noise, gaussian_noise
        self.encoder = SparseLinear(n_inputs, hidden_size)  # W, b
        self.hidden_activation = activation(hidden_activation)  # g
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, n_inputs)  # V, c
        self.output_function = activation(output_activation)  # f

    def features(self, r: SparseRows | Tensor) -> Tensor:
        if self.training and isinstance(r, SparseRows):
            r = corrupt(r, self.noise, self.gaussian_noise)  # the loss still scores the clean r
        return self.dropout(self.hidden_activation(self.encoder(r)))  # h(r): (batch, hidden_size)

    def output_layer(self) -> tuple[Tensor, Tensor]:
        return self.decoder.weight, self.decoder.bias  # V: (n_inputs, hidden_size), c
