"""Deep autoencoders (Kuchaiev and Ginsburg, "Training Deep AutoEncoders for Collaborative Filtering",
2017), with the study's batch-normalised variant (sec. 4.4.2).

The encoder is a list of layer sizes, the last being the code; the decoder mirrors it:

    n_inputs -> layer_sizes[0] -> ... -> layer_sizes[-1] (code) -> ... -> layer_sizes[0] -> n_inputs

- SELU activations on every hidden layer (sec. 3.2: SELU trains deep models without layer-wise
  pre-training), identity on the output;
- dropout on the code only (sec. 3.3: a high rate, 0.8, lets wide codes generalise);
- optional tied weights: decoder layer i reuses the transpose of its mirror encoder weight (own bias);
- dense re-feeding (sec. 2.3), `refeed=K`: the dense output y = f(x) of a training batch is a valid
  example too (any ideal f satisfies f(y) = y), so K times y is fed back as input with targets y
  itself, and the dense MSE of f(y) against y joins the loss. Kuchaiev and Ginsburg take a separate
  optimizer step per re-feed; here the terms are summed into one step, which keeps Lightning's automatic
  optimisation and moves the weights in the same direction to first order;
- optional BatchNorm after each hidden layer's affine map (the study, sec. 4.4.2; Ioffe & Szegedy 2015);
- optional denoising corruption of the input, as for AutoRec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfae.checks import Count, Fraction, Layers, NonNegative
from cfae.models.base import RatingModel, activation, corrupt, decoder_layers, masked_mse
from cfae.sparse import SparseLinear, SparseRows


class DeepAutoencoder(RatingModel):
    def __init__(
        self,
        n_inputs: int,
        layer_sizes: Layers,  # the last is the code size; the study's rows: conf/model/deep*.yaml
        hidden_activation: str = "selu",
        output_activation: str = "identity",
        dropout: Fraction = 0.5,  # on the code; 0 overfits the study's rows (ML-1M fold 0 validation)
        tied: bool = False,
        batch_norm: bool = False,
        refeed: Count = 0,  # dense re-feeding steps per batch
        noise: Fraction = 0.0,  # denoising, as for AutoRec
        gaussian_noise: NonNegative = 0.0,
        **base,
    ):
        super().__init__(n_inputs=n_inputs, **base)
        self.tied, self.refeed = tied, refeed
        self.noise, self.gaussian_noise = noise, gaussian_noise
        sizes = [n_inputs, *layer_sizes]
        self.encoder = nn.ModuleList(SparseLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        mirror = sizes[::-1]
        if tied:  # decoder layer i multiplies by encoder[-1 - i].weight.T; only its bias is its own
            self.decoder_bias = nn.ParameterList(nn.Parameter(torch.zeros(b)) for b in mirror[1:])
        else:
            self.decoder = decoder_layers(mirror)
        norm = nn.BatchNorm1d if batch_norm else (lambda size: nn.Identity())
        self.encoder_norms = nn.ModuleList(norm(b) for b in sizes[1:])
        self.decoder_norms = nn.ModuleList(norm(b) for b in mirror[1:-1])  # not on the output
        self.hidden_activation = activation(hidden_activation)
        self.output_function = activation(output_activation)
        self.code_dropout = nn.Dropout(dropout)

    def decoder_layer(self, i: int, h: Tensor) -> Tensor:
        if self.tied:
            return h @ self.encoder[-1 - i].weight.T + self.decoder_bias[i]
        return self.decoder[i](h)

    def features(self, x: SparseRows | Tensor) -> Tensor:
        if self.training and isinstance(x, SparseRows):
            x = corrupt(x, self.noise, self.gaussian_noise)
        h = x
        for layer, norm in zip(self.encoder, self.encoder_norms):
            h = self.hidden_activation(norm(layer(h)))  # (batch, layer size)
        h = self.code_dropout(h)  # (batch, code size)
        for i, norm in enumerate(self.decoder_norms):  # all decoder layers but the output layer
            h = self.hidden_activation(norm(self.decoder_layer(i, h)))
        return h  # (batch, layer_sizes[0])

    def output_layer(self) -> tuple[Tensor, Tensor]:
        if self.tied:
            return self.encoder[0].weight, self.decoder_bias[-1]  # (n_inputs, layer_sizes[0])
        return self.decoder[-1].weight, self.decoder[-1].bias

    def training_loss(self, batch: SparseRows) -> Tensor:
        if not self.refeed:
            return super().training_loss(batch)
        # all in float32, even under bf16 mixed precision: in bfloat16, re-feeding made the planted-data
        # test RMSE 9% worse (0.970 against 0.890; plain `deep` is unaffected) (tests/test_zoo.py)
        with torch.autocast(self.device.type, enabled=False):
            out = self(batch)  # (batch, n_inputs): re-feeding needs the dense output anyway
            loss = masked_mse(out, batch)
            y = out.detach()
            for _ in range(self.refeed):  # Kuchaiev & Ginsburg, sec. 2.3
                refed = self(y)  # dense input: every cell counts
                loss = loss + F.mse_loss(refed, y)
                y = refed.detach()
        return loss
