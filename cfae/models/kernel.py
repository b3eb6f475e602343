"""Kernelised AutoRec: Sparse FC layers (Muller, Martel and Indiveri, "Kernelized Synaptic Weight Matrices",
ICML 2018), the local kernel of GLocal-K (Han, Lim, Long, Burgstaller and Poon, CIKM 2021).

Each layer's weight is the elementwise product of a dense weight W and a kernel of learned embeddings, one
u_i per input and one v_j per output (`kernel_dim` wide each):

    W_eff = W * K,    K_ij = max(0, 1 - |u_i - v_j|^2)

K has finite support: an input and an output whose embeddings are further apart than 1 are not connected
at all (their effective weight is exactly zero), so the layers learn their own sparsity. The objective is
the authors' (their TensorFlow `l2_loss` and `l2_regularizer`):

    1/2 sum over observed ratings (r - r_hat)^2  +  sum over layers  lambda_s/2 |K|^2 + lambda_2/2 |W|^2

(here divided by the number of ratings), minimised over the whole training matrix at once by L-BFGS
(conf/optimizer/lbfgs.yaml).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor, nn

from cfae.checks import Count, NonNegative, PositiveInt
from cfae.models.base import RatingModel, activation
from cfae.sparse import SparseRows, SparseRowsTimesDense


class KernelLinear(nn.Module):
    """`x @ (W * K(u, v)) + b` for sparse or dense input rows; W is stored (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, kernel_dim: int = 5):
        super().__init__()
        bound = math.sqrt(6 / (in_features + out_features))  # Glorot uniform, TensorFlow's default
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        # embeddings start near 0 (truncated normal, std 1e-3, as the authors'): every weight connected at first
        self.u = nn.Parameter(nn.init.trunc_normal_(torch.empty(in_features, kernel_dim), std=1e-3, a=-2e-3, b=2e-3))
        self.v = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_features, kernel_dim), std=1e-3, a=-2e-3, b=2e-3))
        bound = math.sqrt(3 / out_features)  # Glorot uniform of a vector
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def kernel(self) -> Tensor:
        """(in, out) K_ij = max(0, 1 - |u_i - v_j|^2): exactly zero beyond distance 1."""
        squared = (self.u * self.u).sum(1, keepdim=True) + (self.v * self.v).sum(1) - 2 * self.u @ self.v.T
        return torch.clamp(1 - squared, min=0)

    def effective_weight(self) -> Tensor:
        return self.weight * self.kernel()

    def penalty(self, lambda_s: float, lambda_2: float) -> Tensor:
        """lambda_s/2 |K|^2 + lambda_2/2 |W|^2: the kernel's sparsity and the weight's L2."""
        return lambda_s / 2 * self.kernel().square().sum() + lambda_2 / 2 * self.weight.square().sum()

    def forward(self, x: SparseRows | Tensor) -> Tensor:
        weight = self.effective_weight()
        if isinstance(x, SparseRows):
            return SparseRowsTimesDense.apply(x.crow, x.col, x.val, weight) + self.bias
        return x @ weight + self.bias


class KernelAutoRec(RatingModel):
    """I-AutoRec-shaped: `n_layers` kernel layers of `hidden_size` (sigmoid), a kernel output layer
    (identity). Defaults: Muller et al.'s ML-1M setting (2 x 500, embeddings of 5, lambda_2 70, lambda_s
    0.013)."""

    def __init__(
        self,
        n_inputs: int,
        hidden_size: PositiveInt = 500,
        n_layers: PositiveInt = 2,  # hidden kernel layers
        kernel_dim: PositiveInt = 5,  # width of the embeddings u, v
        lambda_2: NonNegative = 70.0,  # L2 on W
        lambda_s: NonNegative = 0.013,  # L2 on the kernel K: pushes embeddings apart, weights to exact zeros
        hidden_activation: str = "sigmoid",
        start_at_mean: bool = False,  # the authors' initialisation: every bias Glorot-uniform
        **base,
    ):
        super().__init__(n_inputs=n_inputs, start_at_mean=start_at_mean, **base)
        if self.weight_decay:
            raise ValueError(f"weight_decay={self.weight_decay}: a kernelised AutoRec has its own L2 (lambda_2)")
        self.lambda_2, self.lambda_s = lambda_2, lambda_s
        sizes = [n_inputs] + [hidden_size] * n_layers
        self.hidden = nn.ModuleList(KernelLinear(a, b, kernel_dim) for a, b in zip(sizes[:-1], sizes[1:]))
        self.hidden_activation = activation(hidden_activation)
        self.output = KernelLinear(hidden_size, n_inputs, kernel_dim)

    def features(self, x: SparseRows | Tensor) -> Tensor:
        for layer in self.hidden:
            x = self.hidden_activation(layer(x))
        return x

    def output_layer(self) -> tuple[Tensor, Tensor]:
        return self.output.effective_weight().T, self.output.bias  # (n_inputs, hidden), nn.Linear's layout

    def penalty(self) -> Tensor:
        return sum(layer.penalty(self.lambda_s, self.lambda_2) for layer in (*self.hidden, self.output))

    def training_loss(self, batch: SparseRows) -> Tensor:
        """The authors' objective on the batch (the whole training matrix under L-BFGS), divided by the
        batch's number of ratings: the same minimiser, and a loss that reads per rating."""
        objective = (self.predict_at(batch, batch) - batch.val).square().sum() / 2 + self.penalty()
        return objective / len(batch.val)

    def parameter_groups(self) -> list[dict]:
        """One group (L-BFGS takes no others); the L2 is the model's own, in `training_loss`."""
        return [{"params": list(self.parameters())}]


class GLocalK(KernelAutoRec):
    """GLocal-K (Han et al. 2021): a kernelised AutoRec pre-trained for `pretrain_epochs` epochs, then
    fine-tuned on its input smoothed by a global kernel. The global kernel is a `kernel_size` x
    `kernel_size` convolution whose weights come from the pre-trained model itself: the mean of each row of
    its reconstruction, times a learned (n_rows, kernel_size^2) matrix, times `dot_scale`. It slides over the
    whole rating matrix (neighbouring rows and columns by index, zero-padded), then a ReLU:

        r_smooth = relu(conv2d(R, reshape(mean_cols(AE(R)) @ C * dot_scale)))
        r_hat = AE(r_smooth)

    The same kernel layers serve both stages; fine-tuning trains them and C together. The convolution
    needs the whole matrix: training, evaluation and scoring give this model every row at once, in order
    (`whole_matrix`). Defaults: the authors' ML-1M setting (lambda_2 70, lambda_s 0.018, 20 pre-training
    epochs of 50 L-BFGS iterations, then 10 per epoch, dot_scale 0.5)."""

    whole_matrix = True

    def __init__(
        self,
        n_inputs: int,
        n_rows: int,  # the matrix's rows: C has one row per matrix row
        pretrain_epochs: Count = 20,
        kernel_size: PositiveInt = 3,  # the global kernel is kernel_size x kernel_size
        dot_scale: float = 0.5,
        finetune_max_iter: PositiveInt = 10,  # L-BFGS iterations per fine-tuning epoch (the optimizer's max_iter)
        lambda_s: NonNegative = 0.018,
        **kwargs,
    ):
        super().__init__(n_inputs=n_inputs, lambda_s=lambda_s, **kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size}: must be odd (the convolution keeps the matrix's shape)")
        self.n_rows, self.pretrain_epochs, self.kernel_size = n_rows, pretrain_epochs, kernel_size
        self.dot_scale, self.finetune_max_iter = dot_scale, finetune_max_iter
        self.conv_kernel = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_rows, kernel_size**2), std=0.1,
                                                              a=-0.2, b=0.2))
        self.register_buffer("fine_tuned", torch.tensor(False))  # saved: a checkpoint knows its stage

    def global_kernel(self, x: SparseRows) -> Tensor:
        """(kernel_size, kernel_size) from the local model's reconstruction of the whole matrix x."""
        reconstruction = F.linear(super().features(x), *self.output_layer())  # (n_rows, n_cols): every cell
        pooled = torch.zeros(self.n_rows, device=x.val.device, dtype=reconstruction.dtype)
        pooled[x.rows] = reconstruction.mean(dim=1)
        return (pooled @ self.conv_kernel * self.dot_scale).view(self.kernel_size, self.kernel_size)

    def smoothed(self, x: SparseRows) -> Tensor:
        """(batch, n_cols) the rows of x after the global convolution of the whole matrix (rows by index;
        rows missing from x count as empty)."""
        dense = torch.zeros(self.n_rows, self.hparams.n_inputs, device=x.val.device)
        dense[x.rows] = x.to_dense()
        kernel = self.global_kernel(x).to(dense.dtype)
        out = F.relu(F.conv2d(dense[None, None], kernel[None, None], padding=self.kernel_size // 2))[0, 0]
        return out[x.rows]

    def features(self, x: SparseRows | Tensor) -> Tensor:
        if self.fine_tuned and isinstance(x, SparseRows):
            x = self.smoothed(x)
        return super().features(x)

    # -- the two stages ------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.current_epoch >= self.pretrain_epochs and not self.fine_tuned:
            self.fine_tuned.fill_(True)
            optimizer = self.optimizers().optimizer
            optimizer.state.clear()  # a new objective: L-BFGS's curvature history no longer holds
            for group in optimizer.param_groups:
                if "max_iter" in group:
                    group["max_iter"] = self.finetune_max_iter

    def configure_callbacks(self) -> list:
        """Early stopping judges the fine-tuning stage only, on its own curve: Lightning puts this subclass in
        place of the run's EarlyStopping, with its settings. The checkpoint tested stays the best validation
        epoch of either stage."""
        return [FineTuningEarlyStopping(monitor=c.monitor, mode=c.mode, patience=c.patience,
                                        min_delta=abs(float(c.min_delta)), verbose=c.verbose)
                for c in self.trainer.early_stopping_callbacks]


class FineTuningEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, idle until GLocal-K fine-tunes: the pre-training epochs neither count against
    its patience nor set the score fine-tuning must beat."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.fine_tuned:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if pl_module.fine_tuned:
            super().on_validation_end(trainer, pl_module)
