"""Masked RMSE, the accuracy metric every cfae model is chosen by (the study, sec. 4.2), masked MAE beside it,
and the names every metric goes by: the models log them, callbacks and sweeps watch them, MLflow and the
reports show them."""

from __future__ import annotations

import torch
from torchmetrics import Metric

TRAIN_LOSS = "train/loss"
VAL_RMSE = "val/rmse"  # each validation: early stopping, the best checkpoint, pruning, the LR schedule
VAL_RMSE_BEST = "val/rmse_best"  # the best so far: what sweeps minimise
TEST_RMSE = "test/rmse"  # once, on the best checkpoint (with refit=true, on the refit one); it chooses nothing
VAL_MAE, TEST_MAE = "val/mae", "test/mae"  # beside the RMSEs; they choose nothing
# task=ranking (vae_cf's protocol): NDCG@100 on validation chooses; the test reports NDCG@100, Recall@20 and @50
VAL_NDCG, VAL_NDCG_BEST = "val/ndcg_at_100", "val/ndcg_at_100_best"
TEST_RANKING = {"test/ndcg_at_100": ("ndcg", 100), "test/recall_at_20": ("recall", 20),
                "test/recall_at_50": ("recall", 50)}
FIT_SECONDS = "time/fit_s"  # wall time of training, validation included (with refit=true, the refit too)
EPOCHS = "epochs"
TEST_RMSE_BEFORE_REFIT = "test/rmse_before_refit"  # with refit=true: the validation-chosen model's
REFIT_EPOCHS = "refit/epochs"  # with refit=true: the epochs trained anew on training + validation


def headline(metrics: dict) -> str:
    """A run's test result in words, as its end line and its MLflow note say it: "test RMSE 0.8428" or
    "test NDCG@100 0.4292"."""
    if TEST_RMSE in metrics:
        return f"test RMSE {metrics[TEST_RMSE]:.4f}"
    return f"test NDCG@100 {metrics['test/ndcg_at_100']:.4f}"


class MaskedRMSE(Metric):
    """RMSE over the observed ratings only, pooled over every batch (and every process under DDP).

    `update(preds, target, mask)` takes predictions and ratings of the same shape; entries where `mask`
    is False (unobserved cells) are ignored. Predictions are clipped to the rating scale first, since a
    rating outside it is never right.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, rating_min: float = 1.0, rating_max: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.rating_min, self.rating_max = rating_min, rating_max
        # Sums, not per-batch RMSEs: the average of batch RMSEs is not the RMSE.
        self.add_state("sum_squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def error(self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) float64 the errors at the observed ratings, predictions clipped to the scale."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        if mask is not None:
            preds, target = preds[mask], target[mask]
        return preds.clamp(self.rating_min, self.rating_max).double() - target.double()

    def update(self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        error = self.error(preds, target, mask)
        self.sum_squared_error += error.square().sum()
        self.count += error.numel()

    def compute(self) -> torch.Tensor:
        return (self.sum_squared_error / self.count).sqrt().float()


class MaskedMAE(MaskedRMSE):
    """Mean absolute error over the observed ratings only, pooled likewise, predictions clipped likewise."""

    def __init__(self, rating_min: float = 1.0, rating_max: float = 5.0, **kwargs):
        super().__init__(rating_min, rating_max, **kwargs)
        self.add_state("sum_absolute_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        error = self.error(preds, target, mask)
        self.sum_absolute_error += error.abs().sum()
        self.count += error.numel()

    def compute(self) -> torch.Tensor:
        return (self.sum_absolute_error / self.count).float()


class TopK(Metric):
    """NDCG@k or Recall@k of ranked scores against held-out items, averaged over the users that have any, as
    vae_cf computes them: binary gains with log2 discounts, NDCG normalised by the ideal ranking of
    min(k, n held out) items, Recall by min(k, n held out) (so that 1 is reachable). Items a user was given
    as input must already score -inf."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: str, k: int, **kwargs):
        super().__init__(**kwargs)
        if kind not in ("ndcg", "recall"):
            raise ValueError(f"kind={kind!r}: expected ndcg or recall")
        self.kind, self.k = kind, k
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("users", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, held_out) -> None:
        """scores (batch, n_items); held_out: the batch's held-out items, SparseRows of the same rows."""
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[held_out.row_index(), held_out.col] = True
        k = min(self.k, scores.shape[1])
        hits = relevant.gather(1, scores.topk(k, dim=1).indices).double()  # (batch, k), best first
        n_relevant = relevant.sum(1)
        users = n_relevant > 0
        cut = n_relevant.clamp(max=k)
        if self.kind == "recall":
            value = hits.sum(1) / cut.clamp(min=1)
        else:
            discount = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores.device, dtype=torch.float64))
            ideal = torch.cumsum(discount, 0)[(cut - 1).clamp(min=0)]
            value = (hits * discount).sum(1) / ideal
        self.total += value[users].sum()
        self.users += users.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.users).float()
