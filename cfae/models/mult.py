"""Mult-DAE and Mult-VAE (Liang, Krishnan, Hoffman and Jebara, "Variational Autoencoders for Collaborative
Filtering", WWW 2018; dawenl/vae_cf) for top-N recommendation from clicks:

    x_u -> L2-normalised, dropout -> encoder (tanh) -> code -> decoder (tanh) -> logits over all items
    loss = -sum_i x_ui log softmax(logits)_i (the multinomial likelihood), averaged over users,
           + l2 * sum of the squared weights (vae_cf's lam)                                   (Mult-DAE)
           + beta * KL(q(z | x_u) || N(0, I)), beta = min(beta_max, updates / anneal_steps)     (Mult-VAE)

The paper's settings: Mult-VAE 600-200-600 (q: I -> 600 -> 2 x 200, p: 200 -> 600 -> I), l2 0, beta rising by
1/200,000 an update up to 0.2 (vae_cf's `min(anneal_cap, update_count / total_anneal_steps)`); Mult-DAE I -> 200 ->
I, l2 0.01 / batch size; both tanh, dropout 0.5 on the input, Adam 1e-3, batches of 500 users
(conf/model/multvae.yaml, multdae.yaml). Weights Xavier-uniform, biases N(0, 0.001) truncated, as vae_cf. Scoring
decodes the mean code, without dropout or sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfae.checks import Count, Fraction, Layers, NonNegative
from cfae.models.ranking import RankingModel, multinomial_nll, normalized
from cfae.sparse import SparseLinear, SparseRows


def vae_cf_init(layer: nn.Module) -> None:
    nn.init.xavier_uniform_(layer.weight)  # symmetric in fan-in and fan-out: either weight layout
    nn.init.trunc_normal_(layer.bias, std=0.001, a=-0.002, b=0.002)


class MultDAE(RankingModel):
    code_parts = 1  # what the encoder's last layer outputs per code unit: the code (Mult-VAE: mu and logvar)

    def __init__(
        self,
        n_inputs: int,
        layer_sizes: Layers = (200,),  # encoder sizes, the last one the code; the decoder mirrors them
        dropout: Fraction = 0.5,  # on the normalised input, in training
        l2: NonNegative = 0.01 / 500,  # vae_cf's lam (0.01 / batch size): l2 * sum of squared weights
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.dropout, self.l2 = dropout, l2
        sizes = [n_inputs, *layer_sizes]
        outputs = [*sizes[1:-1], self.code_parts * sizes[-1]]
        self.encoder = nn.ModuleList([SparseLinear(sizes[0], outputs[0]),
                                      *(nn.Linear(a, b) for a, b in zip(sizes[1:-1], outputs[1:]))])
        mirror = sizes[::-1]
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(mirror[:-1], mirror[1:]))
        for layer in (*self.encoder, *self.decoder):
            vae_cf_init(layer)

    def input(self, x: SparseRows) -> SparseRows:
        x = normalized(x)
        return x._replace(val=F.dropout(x.val, self.dropout)) if self.training and self.dropout else x

    def decode(self, h: Tensor) -> Tensor:
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = torch.tanh(h)
        return h  # (batch, n_items) logits

    def forward(self, x: SparseRows) -> Tensor:
        h = self.input(x)
        for layer in self.encoder:
            h = torch.tanh(layer(h))  # (batch, hidden); the code too, as vae_cf's DAE
        return self.decode(h)

    def weight_penalty(self) -> Tensor:
        return sum(layer.weight.square().sum() for layer in (*self.encoder, *self.decoder))

    def training_loss(self, batch: SparseRows) -> Tensor:
        return multinomial_nll(self(batch), batch) + self.l2 * self.weight_penalty()


class MultVAE(MultDAE):
    code_parts = 2

    def __init__(
        self,
        n_inputs: int,
        layer_sizes: Layers = (600, 200),  # the paper's: I -> 600 -> 200 (mu, logvar) and 200 -> 600 -> I
        dropout: Fraction = 0.5,
        l2: NonNegative = 0.0,
        beta_max: NonNegative = 0.2,  # the cap on the KL weight (Liang et al. sec. 2.2.2)
        anneal_steps: Count = 200_000,  # beta rises by 1 / anneal_steps an update, up to beta_max (vae_cf's)
        **base,
    ):
        super().__init__(n_inputs=n_inputs, layer_sizes=layer_sizes, dropout=dropout, l2=l2, **base)
        self.beta_max, self.anneal_steps = beta_max, anneal_steps

    def encode(self, x: SparseRows) -> tuple[Tensor, Tensor]:
        h = self.input(x)
        for layer in self.encoder[:-1]:
            h = torch.tanh(layer(h))
        mu, logvar = self.encoder[-1](h).chunk(2, dim=-1)  # (batch, code) each
        return mu, logvar

    def forward(self, x: SparseRows) -> Tensor:
        return self.decode(self.encode(x)[0])  # the mean code

    def kl_weight(self, step: int) -> float:
        return min(self.beta_max, step / max(1, self.anneal_steps))

    def training_loss(self, batch: SparseRows) -> Tensor:
        mu, logvar = self.encode(batch)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kl = (0.5 * (-logvar + logvar.exp() + mu.square() - 1)).sum(-1).mean()
        beta = self.kl_weight(self.global_step)
        self.log("train/beta", beta, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        return multinomial_nll(self.decode(z), batch) + beta * kl + self.l2 * self.weight_penalty()
