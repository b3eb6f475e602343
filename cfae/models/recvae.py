"""RecVAE (Shenbin, Alekseev, Tutubalina, Malykh and Nikolenko, "RecVAE: a New Variational Autoencoder for Top-N
Recommendations with Implicit Feedback", WSDM 2020; ilya-shenbin/RecVAE): Mult-VAE with

- an encoder of five densely connected layers (each sees the sum of all before it), swish, layer norm;
- a composite prior: a mixture of N(0, I) (3/20), the posterior of the encoder as it was before its last
  update (3/4) and a wide N(0, e^10 I) (1/10), which keeps the encoder's updates small;
- a KL weight proportional to the user's number of clicks, beta_u = gamma * |x_u|;
- alternating updates: the encoder trains `encoder_epochs` epochs (input dropout 0.5), the prior takes the
  encoder's weights, then the decoder (one linear layer) trains `decoder_epochs` epochs without dropout.

The authors' settings: hidden 600, latent 200, gamma 0.005, Adam 5e-4, batches of 500, 3 encoder epochs a
decoder epoch. Here one epoch of the trainer is one pass of either part, so validation (and early stopping)
sees the model after every pass. Scoring decodes the mean code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfae.checks import Fraction, NonNegative, PositiveInt
from cfae.models.ranking import RankingModel, normalized
from cfae.sparse import SparseLinear, SparseRows


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (logvar + math.log(2 * math.pi) + (z - mu).square() / logvar.exp())


class Encoder(nn.Module):
    def __init__(self, n_inputs: int, hidden: int, latent: int, depth: int = 5):
        super().__init__()
        self.layers = nn.ModuleList([SparseLinear(n_inputs, hidden), *(nn.Linear(hidden, hidden)
                                                                       for _ in range(depth - 1))])
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=0.1) for _ in range(depth))
        self.to_mu, self.to_logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)

    def forward(self, x: SparseRows, dropout: float) -> tuple[Tensor, Tensor]:
        x = normalized(x)
        if self.training and dropout:
            x = x._replace(val=F.dropout(x.val, dropout))
        before = []  # every earlier layer's output, summed into each next one (dense connections)
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            h = layer(x if i == 0 else before[-1]) + sum(before, torch.zeros(()))
            before.append(norm(F.silu(h)))  # silu is swish
        return self.to_mu(before[-1]), self.to_logvar(before[-1])


class RecVAE(RankingModel):
    def __init__(
        self,
        n_inputs: int,
        hidden_size: PositiveInt = 600,
        latent_size: PositiveInt = 200,
        depth: PositiveInt = 5,  # encoder layers
        gamma: NonNegative = 0.005,  # beta_u = gamma * |x_u|
        dropout: Fraction = 0.5,  # on the encoder's input, in its updates
        encoder_epochs: PositiveInt = 3,
        decoder_epochs: PositiveInt = 1,
        mixture: tuple[float, float, float] = (3 / 20, 3 / 4, 1 / 10),  # standard, old posterior, wide
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.automatic_optimization = False  # two optimizers, one part trained at a time
        self.encoder = Encoder(n_inputs, hidden_size, latent_size, depth)
        self.old_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # the prior's posterior
        self.decoder = nn.Linear(latent_size, n_inputs)
        self.gamma, self.dropout = gamma, dropout
        self.encoder_epochs, self.decoder_epochs = encoder_epochs, decoder_epochs
        self.register_buffer("log_mixture", torch.log(torch.tensor(mixture)))

    def forward(self, x: SparseRows) -> Tensor:
        return self.decoder(self.encoder(x, 0.0)[0])  # (batch, n_items)

    def training_encoder(self) -> bool:
        """Whether this epoch trains the encoder (else the decoder)."""
        return self.current_epoch % (self.encoder_epochs + self.decoder_epochs) < self.encoder_epochs

    def log_prior(self, x: SparseRows, z: Tensor) -> Tensor:
        """(batch, latent) log density of z under the composite prior."""
        with torch.no_grad():
            old_mu, old_logvar = self.old_encoder(x, 0.0)
        zero = torch.zeros_like(z)
        parts = torch.stack([log_normal(z, zero, zero), log_normal(z, old_mu, old_logvar),
                             log_normal(z, zero, zero + 10.0)], dim=-1) + self.log_mixture
        return torch.logsumexp(parts, dim=-1)

    def training_loss(self, batch: SparseRows) -> Tensor:
        encoding = self.training_encoder()
        mu, logvar = self.encoder(batch, self.dropout if encoding else 0.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(z)  # (batch, n_items)
        clicks = torch.zeros(batch.n_rows, device=z.device).index_add_(0, batch.row_index(), batch.val)
        log_p = torch.log_softmax(logits, dim=-1)[batch.row_index(), batch.col] * batch.val
        likelihood = torch.zeros_like(clicks).index_add_(0, batch.row_index(), log_p).mean()
        kl = ((log_normal(z, mu, logvar) - self.log_prior(batch, z)).sum(-1) * self.gamma * clicks).mean()
        return -(likelihood - kl)

    def training_step(self, batch: SparseRows, batch_idx: int) -> Tensor:
        encoder_optimizer, decoder_optimizer = self.optimizers()
        optimizer = encoder_optimizer if self.training_encoder() else decoder_optimizer
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        if self.current_epoch % (self.encoder_epochs + self.decoder_epochs) == self.encoder_epochs - 1:
            self.old_encoder.load_state_dict(self.encoder.state_dict())  # the prior follows the encoder

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("RecVAE was built without an optimizer (optimizer=<a partial>)")
        return [self.optimizer_factory(params=self.encoder.parameters()),
                self.optimizer_factory(params=self.decoder.parameters())]
