import math

import pytest
import torch

from cfae.metrics import MaskedRMSE


def test_matches_hand_computation_over_observed_entries_only():
    preds = torch.tensor([[3.0, 4.0, 0.0], [2.0, 9.0, 5.0]])
    target = torch.tensor([[4.0, 4.0, 0.0], [1.0, 0.0, 3.0]])
    metric = MaskedRMSE()
    metric.update(preds, target, mask=target > 0)
    # errors on the four observed cells: -1, 0, 1, 2 -> sqrt((1 + 0 + 1 + 4) / 4)
    assert metric.compute().item() == pytest.approx(math.sqrt(6 / 4))


def test_pools_squared_errors_across_batches_rather_than_averaging_batch_rmses():
    metric = MaskedRMSE()
    metric.update(torch.tensor([2.0]), torch.tensor([1.0]))  # one error of 1
    metric.update(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))  # three of 0
    assert metric.compute().item() == pytest.approx(math.sqrt(1 / 4))  # not (1 + 0) / 2


def test_clips_predictions_to_the_rating_scale():
    metric = MaskedRMSE(rating_min=1.0, rating_max=5.0)
    metric.update(torch.tensor([7.0, -3.0]), torch.tensor([5.0, 1.0]))
    assert metric.compute().item() == 0.0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        MaskedRMSE().update(torch.zeros(3), torch.zeros(4))
