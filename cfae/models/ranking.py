"""What every top-N model shares (task=ranking): input a batch of users' interactions (sparse rows of 1s), output a
score for every item; validation and test rank the items a user was not given and score the top against the
user's held-out items (NDCG@k, Recall@k as vae_cf computes them: cfae/metrics.py), never against a rating.

A model defines `forward(x)` (scores, (batch, n_items)) and `training_loss(batch)`; a closed-form one
(`closed_form = True`: EASE, popularity) defines `solve(train_matrix)` instead. The rest (steps, metrics,
logging, the optimizer) is here.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import scipy.sparse as sp
import torch
from torch import Tensor
from torchmetrics import MaxMetric

from cfae.checks import Diverged, check_arguments
from cfae.metrics import TEST_RANKING, TRAIN_LOSS, VAL_NDCG, VAL_NDCG_BEST, TopK
from cfae.models.base import optimizers
from cfae.sparse import EvalBatch, SparseRows


def normalized(x: SparseRows) -> SparseRows:
    """Each row scaled to unit L2 norm (Liang et al.: the encoder sees the direction of a user's clicks)."""
    norms = torch.zeros(x.n_rows, device=x.val.device).index_add_(0, x.row_index(), x.val.square()).sqrt()
    return x._replace(val=x.val / norms.clamp_min(1e-12)[x.row_index()])


def multinomial_nll(logits: Tensor, x: SparseRows) -> Tensor:
    """-mean over users of sum_i x_ui log softmax(logits_u)_i: Liang et al.'s multinomial likelihood."""
    log_p = torch.log_softmax(logits, dim=-1)  # (batch, n_items)
    per_user = torch.zeros(x.n_rows, device=logits.device).index_add_(
        0, x.row_index(), log_p[x.row_index(), x.col] * x.val)
    return -per_user.mean()


class RankingModel(L.LightningModule):
    """Base of every top-N model."""

    closed_form = False  # True: fitted once by `solve`, no gradient steps
    whole_matrix = False
    rating_range = (float("-inf"), float("inf"))  # scores, not ratings: nothing to clip them to

    def __init__(self, n_inputs: int, optimizer: Callable | None = None, scheduler: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        check_arguments(type(self), self.hparams)  # the bounds its constructors annotate (cfae.checks)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_ndcg, self.val_ndcg_best = TopK("ndcg", 100), MaxMetric()
        self.test_metrics = torch.nn.ModuleDict({name.replace("/", "_"): TopK(kind, k)
                                                 for name, (kind, k) in TEST_RANKING.items()})

    def forward(self, x: SparseRows) -> Tensor:
        """(batch, n_items) a score for every item."""
        raise NotImplementedError

    def training_loss(self, batch: SparseRows) -> Tensor:
        raise NotImplementedError

    def predict_at(self, x: SparseRows, at: SparseRows) -> Tensor:
        """(at nnz,) the scores at the cells of `at`, the rows of x being the input (what a Recommender asks)."""
        return self(x)[at.row_index(), at.col]

    def solve(self, train_matrix: sp.csr_matrix) -> None:
        raise NotImplementedError

    # -- training and evaluation ---------------------------------------------------------------------
    def training_step(self, batch: SparseRows, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise Diverged(f"training diverged: the loss is {loss.item()} at epoch {self.current_epoch}, "
                           f"step {self.global_step}; lower optimizer.lr?")
        self.log(TRAIN_LOSS, loss, on_step=False, on_epoch=True, batch_size=batch.n_rows)
        return loss

    def ranked(self, batch: EvalBatch) -> Tensor:
        """(batch, n_items) scores with the items each user was given out of the ranking."""
        scores = self(batch.inputs).float()
        return scores.index_put((batch.inputs.row_index(), batch.inputs.col),
                                torch.tensor(float("-inf"), device=scores.device))

    def on_train_start(self) -> None:
        self.val_ndcg_best.reset()

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self.val_ndcg.update(self.ranked(batch), batch.targets)
        self.log(VAL_NDCG, self.val_ndcg, on_epoch=True, prog_bar=True, batch_size=batch.targets.n_rows)

    def on_validation_epoch_end(self) -> None:
        self.val_ndcg_best(self.val_ndcg.compute())
        self.log(VAL_NDCG_BEST, self.val_ndcg_best.compute(), prog_bar=True)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        scores = self.ranked(batch)
        for name in TEST_RANKING:
            metric = self.test_metrics[name.replace("/", "_")]
            metric.update(scores, batch.targets)
            self.log(name, metric, on_epoch=True, batch_size=batch.targets.n_rows)

    def configure_optimizers(self):
        return optimizers(self, self.parameters(), VAL_NDCG)
