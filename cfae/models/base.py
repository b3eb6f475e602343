"""What every cfae model shares: the masked loss, the train/val/test steps, metrics, logging and the
optimizer.

An autoencoder builds its layers and defines `features(x)` (everything up to the output layer) and
`output_layer()` (its weight, one row per output column as nn.Linear stores it, and bias); the base
composes them, densely (`forward`, every cell of a row) or only at the cells a loss or a metric needs
(`predict_at`; the sampled output). It may override one hook more (`training_loss`). Models that are not
autoencoders override `forward` and `predict_at` themselves; a closed-form one (`closed_form = True`) is
fitted by `solve` instead of gradient steps, then validated and tested like the others.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MinMetric

from cfae.checks import Diverged, NonNegative, check_arguments
from cfae.metrics import TEST_MAE, TEST_RMSE, TRAIN_LOSS, VAL_MAE, VAL_RMSE, VAL_RMSE_BEST, MaskedMAE, MaskedRMSE
from cfae.sparse import EvalBatch, SampledLinear, SparseLinear, SparseRows

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def decoder_layers(sizes: list[int]) -> nn.ModuleList:
    """Layers sizes[0] -> sizes[1] -> ... -> sizes[-1] (the output, n_inputs wide): the hidden ones as
    SparseLinear, the output one as nn.Linear, whose weight layout (one row per output column) is the one
    the sampled output product reads (`SampledLinear`)."""
    hidden = (SparseLinear(a, b) for a, b in zip(sizes[:-2], sizes[1:-1]))
    return nn.ModuleList([*hidden, nn.Linear(sizes[-2], sizes[-1])])


def corrupt(x: SparseRows, noise: float = 0.0, gaussian_noise: float = 0.0) -> SparseRows:
    """Denoising corruption of the observed ratings (Vincent et al. 2008): drop a fraction `noise` of them
    (the rest scaled by 1/(1-noise), as nn.Dropout does, so the expected input is unchanged), and add
    Gaussian noise of standard deviation `gaussian_noise`. Unobserved cells stay empty."""
    val = F.dropout(x.val, noise) if noise else x.val
    if gaussian_noise:
        val = val + gaussian_noise * torch.randn_like(val)
    return x._replace(val=val)


def masked_mse(out: Tensor, target: SparseRows) -> Tensor:
    """Mean squared error over the observed entries of `target` only (dense `out`: (batch, n_cols))."""
    pred = out[target.row_index(), target.col]  # (nnz,)
    return F.mse_loss(pred, target.val)


def optimizers(model: L.LightningModule, params, monitor: str):
    """Lightning's `configure_optimizers` answer for `model`: its optimizer over `params` and, where it has
    one, its scheduler stepped each epoch on the validation metric `monitor`."""
    if model.optimizer_factory is None:
        raise ValueError(f"{type(model).__name__} was built without an optimizer (optimizer=<a partial>)")
    optimizer = model.optimizer_factory(params=params)
    if model.scheduler_factory is None:
        return optimizer
    scheduler = {"scheduler": model.scheduler_factory(optimizer), "monitor": monitor, "interval": "epoch"}
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


class RatingModel(L.LightningModule):
    """Base of every model: input a batch of sparse rows, output dense rows of predicted ratings."""

    closed_form = False  # True: fitted once by `solve`, no gradient steps
    # True: the model reads the whole input matrix at once, rows in order (a convolution over neighbouring
    # rows): training, evaluation and scoring then give it every row in one batch
    whole_matrix = False

    def __init__(
        self,
        n_inputs: int,  # width of a row (the number of columns)
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,  # a partial: it gets the parameters
        scheduler: Callable[..., torch.optim.lr_scheduler.ReduceLROnPlateau] | None = None,  # on val/rmse
        weight_decay: NonNegative = 0.0,  # L2 on weight matrices only (not on biases or norm scales)
        rating_min: float = 1.0,
        rating_max: float = 5.0,
        sampled_output: str | bool = "auto",  # outputs only at the cells needed (true), whole rows (false)
        start_at_mean: bool = True,  # the first predictions are the training ratings' mean (`start_at`)
        train_mean: float | None = None,  # that mean, which the data decides (cfae.train.build_model gives it)
    ):
        super().__init__()
        # Every constructor argument (subclasses' too) into the checkpoint, so that `Model.load_from_checkpoint`
        # rebuilds it; not to the logger: the run's config already holds them.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        check_arguments(type(self), self.hparams)  # the bounds its constructors annotate (cfae.checks)
        if sampled_output not in ("auto", True, False):
            raise ValueError(f"sampled_output={sampled_output!r}: expected auto, true or false")
        self.weight_decay, self.sampled_output, self.start_at_mean = weight_decay, sampled_output, start_at_mean
        self.output_function: nn.Module = nn.Identity()  # f in r_hat = f(V h + c); models may set their own
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rating_range = (rating_min, rating_max)  # predictions are clipped to it wherever they are scored
        self.val_rmse, self.val_mae = MaskedRMSE(rating_min, rating_max), MaskedMAE(rating_min, rating_max)
        self.test_rmse, self.test_mae = MaskedRMSE(rating_min, rating_max), MaskedMAE(rating_min, rating_max)
        self.val_rmse_best = MinMetric()

    # -- composing an autoencoder from features() and output_layer() --------------------------------
    def features(self, x: SparseRows | Tensor) -> Tensor:
        """(batch, hidden): everything before the output layer."""
        raise NotImplementedError

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """The output layer's weight (n_inputs, hidden), stored as nn.Linear stores it, and bias (n_inputs,)."""
        raise NotImplementedError

    def forward(self, x: SparseRows | Tensor) -> Tensor:
        """(batch, n_inputs): predictions for every cell of the rows of x."""
        return self.output_function(F.linear(self.features(x), *self.output_layer()))

    def use_sampled_output(self, at: SparseRows) -> bool:
        """Whether to compute outputs only at the cells of `at`. `auto` does so below a share of the batch's
        rows x columns that depends on how the dense product would run, or when the dense output would pass
        256 MB. The output layer, 256 rows, latent 500:
        - float32 on a CPU (2-core AMD EPYC, AVX2; benchmarks/kernels.py, forward and backward): the
          sampled product wins up to about 16% of the cells (16 ms against 48 at ML-1M's 4%; even at 16%):
          sampled below 10%;
        - bf16 autocast on a CPU with AMX tiles, which reuse each weight row across the batch
          (benchmarks/kernels.py, forward): the dense product wins at 4% (1.6 ms against 3.0) and loses at
          ML-20M's 0.4% (104 against 22): below 1%;
          likewise on a GPU, whose dense products are its strength (not measured)."""
        if self.sampled_output != "auto":
            return self.sampled_output
        device = at.col.device.type
        share = 0.1 if device == "cpu" and not torch.is_autocast_enabled(device) else 0.01
        cells = at.n_rows * at.n_cols
        return len(at.col) < share * cells or cells * 4 > 256 * 2**20

    def decode_at(self, h: Tensor, at: SparseRows) -> Tensor:
        """(at nnz,) the output layer applied to features h, at the cells of `at` only."""
        weight, bias = self.output_layer()
        if self.use_sampled_output(at):
            z = SampledLinear.apply(h, weight, bias, at.crow, at.col)
        else:
            z = F.linear(h, weight, bias)[at.row_index(), at.col]
        return self.output_function(z)

    def predict_at(self, x: SparseRows, at: SparseRows) -> Tensor:
        """(at nnz,) predictions for the cells of `at`, the rows of x being the input."""
        return self.decode_at(self.features(x), at)

    # -- training and evaluation ---------------------------------------------------------------------
    def training_loss(self, batch: SparseRows) -> Tensor:
        """The objective on one batch: by default the MSE of the reconstruction at the observed ratings."""
        return F.mse_loss(self.predict_at(batch, batch), batch.val)

    def training_step(self, batch: SparseRows, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):  # fail loudly rather than early-stop on NaN and look fine
            raise Diverged(f"training diverged: the loss is {loss.item()} at epoch {self.current_epoch}, "
                           f"step {self.global_step}; lower optimizer.lr?")
        self.log(TRAIN_LOSS, loss, on_step=False, on_epoch=True, batch_size=len(batch.val))
        return loss

    def predict_held_out(self, batch: EvalBatch) -> Tensor:
        """(targets nnz,) predictions for the held-out ratings, the fallback where the model has none."""
        pred = self.predict_at(batch.inputs, batch.targets)
        return torch.where(batch.fallback.isnan(), pred, batch.fallback)

    def setup(self, stage: str) -> None:
        # Lightning calls this before a resumed fit restores its weights, which then replace these
        if stage == "fit" and self.start_at_mean and self.hparams.get("train_mean") is not None:
            self.start_at(self.hparams.train_mean)

    @torch.no_grad()
    def start_at(self, mean: float) -> None:
        """Make the untrained model predict about `mean` everywhere: the output layer's bias, where the output
        is the identity. Otherwise the first epochs go to moving predictions from around 0 to the ratings'
        level, and the hidden units saturate meanwhile: on ML-1M fold 0 AutoRec then needs 17 epochs to a
        validation RMSE of 0.88 and 36 to 0.85, against 4 and 9 from the mean (and 0.8395 at its best
        against 0.8404)."""
        if isinstance(self.output_function, nn.Identity):
            self.output_layer()[1].fill_(mean)

    def on_train_start(self) -> None:
        self.val_rmse_best.reset()  # forget the sanity check's value

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        pred, n = self.predict_held_out(batch), len(batch.targets.val)
        self.val_rmse.update(pred, batch.targets.val)
        self.val_mae.update(pred, batch.targets.val)
        self.log(VAL_RMSE, self.val_rmse, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(VAL_MAE, self.val_mae, on_epoch=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        self.val_rmse_best(self.val_rmse.compute())
        self.log(VAL_RMSE_BEST, self.val_rmse_best.compute(), prog_bar=True)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        pred, n = self.predict_held_out(batch), len(batch.targets.val)
        self.test_rmse.update(pred, batch.targets.val)
        self.test_mae.update(pred, batch.targets.val)
        self.log(TEST_RMSE, self.test_rmse, on_epoch=True, batch_size=n)
        self.log(TEST_MAE, self.test_mae, on_epoch=True, batch_size=n)

    def predict_step(self, batch: EvalBatch, batch_idx: int) -> Tensor:
        """(targets nnz,) what `test_step` scores, clipped to the rating scale as the metric clips it."""
        return self.predict_held_out(batch).clamp(*self.rating_range)

    def parameter_groups(self) -> list[dict]:
        """What the optimizer gets: `weight_decay` on weight matrices, none on biases and norm scales."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        return optimizers(self, self.parameter_groups(), VAL_RMSE)
