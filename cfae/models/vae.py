"""Variational autoencoder for explicit ratings (after Liang, Krishnan, Hoffman and Jebara, "Variational
Autoencoders for Collaborative Filtering", WWW 2018; the study, sec. 4.5).

Liang et al. model implicit clicks with a multinomial likelihood; ratings here get a Gaussian one:

    q(z | x) = N(mu(x), diag(exp(logvar(x))))          encoder: layer_sizes[:-1], then mu and logvar
    x_hat = f(z)                                        decoder mirrors the encoder
    loss = [ sum_observed (x_hat - x)^2 / 2  +  beta * KL(q(z | x) || N(0, I)) ] / n_observed

with a unit-variance Gaussian likelihood on the observed ratings only, and beta annealed linearly from 0
to `beta_max` over `anneal_steps` optimizer steps (Liang et al. sec. 2.2.2: a capped KL weight works
better than the full ELBO). Evaluation decodes the mean code mu, without sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfae.checks import Count, Fraction, Layers, NonNegative
from cfae.models.base import RatingModel, activation, corrupt, decoder_layers
from cfae.sparse import SparseLinear, SparseRows


class VAE(RatingModel):
    def __init__(
        self,
        n_inputs: int,
        layer_sizes: Layers,  # hidden sizes, then the code size; the study's row: conf/model/vae.yaml
        hidden_activation: str = "selu",
        output_activation: str = "identity",
        noise: Fraction = 0.0,  # drop this fraction of the input ratings in training (Liang et al.'s dropout)
        beta_max: NonNegative = 0.2,  # Liang et al.'s best cap on ML-20M
        anneal_steps: Count = 2000,
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        *hidden, code = layer_sizes
        sizes = [n_inputs, *hidden]
        self.beta_max, self.anneal_steps = beta_max, anneal_steps
        self.encoder = nn.ModuleList(SparseLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.to_code = SparseLinear(sizes[-1], 2 * code)  # mu and logvar
        mirror = [code, *hidden[::-1], n_inputs]
        self.decoder = decoder_layers(mirror)
        self.hidden_activation = activation(hidden_activation)
        self.output_function = activation(output_activation)
        self.noise = noise

    def kl_weight(self, step: int) -> float:
        """beta at optimizer step `step`: 0 at the first, rising linearly to beta_max at anneal_steps."""
        return self.beta_max * min(1.0, step / max(1, self.anneal_steps))

    def encode(self, x: SparseRows | Tensor) -> tuple[Tensor, Tensor]:
        if self.training and isinstance(x, SparseRows):
            x = corrupt(x, self.noise)
        h = x
        for layer in self.encoder:
            h = self.hidden_activation(layer(h))  # (batch, hidden)
        mu, logvar = self.to_code(h).chunk(2, dim=-1)  # (batch, code) each
        return mu, logvar.clamp(-10.0, 10.0)  # exp(logvar) must not overflow early in training

    def decoder_features(self, z: Tensor) -> Tensor:
        h = z
        for layer in self.decoder[:-1]:
            h = self.hidden_activation(layer(h))
        return h  # (batch, last decoder hidden size)

    def decode(self, z: Tensor) -> Tensor:
        """(batch, n_inputs) dense reconstruction from codes z."""
        return self.output_function(F.linear(self.decoder_features(z), *self.output_layer()))

    def features(self, x: SparseRows | Tensor) -> Tensor:
        mu, logvar = self.encode(x)
        if not self.training:
            return self.decoder_features(mu)  # evaluation uses the mean code
        return self.decoder_features(mu + torch.randn_like(mu) * (0.5 * logvar).exp())  # reparameterisation

    def output_layer(self) -> tuple[Tensor, Tensor]:
        return self.decoder[-1].weight, self.decoder[-1].bias

    def training_loss(self, batch: SparseRows) -> Tensor:
        mu, logvar = self.encode(batch)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        pred = self.decode_at(self.decoder_features(z), batch)  # (nnz,) only the observed cells
        squared_error = (pred - batch.val).square().sum()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()  # summed over rows and code
        beta = self.kl_weight(self.global_step)
        self.log("train/kl", kl / batch.n_rows, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        self.log("train/beta", beta, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        return (squared_error / 2 + beta * kl) / len(batch.val)
