import functools

import lightning as L
import numpy as np
import pytest
import torch
from helpers import random_rows

from cfae.data import RatingsDataModule
from cfae.models import VAE, AutoRec, DeepAutoencoder, MatrixFactorization
from cfae.models.base import masked_mse
from cfae.sparse import SampledLinear, SparseLinear, SparseRows, SparseRowsTimesDense


def test_sparse_linear_matches_dense_product_and_gradient():
    torch.manual_seed(0)
    layer, x = SparseLinear(9, 4), random_rows()
    sparse_out = layer(x)
    (sparse_grad,) = torch.autograd.grad(sparse_out.square().sum(), layer.weight)
    dense_out = x.to_dense() @ layer.weight + layer.bias
    (dense_grad,) = torch.autograd.grad(dense_out.square().sum(), layer.weight)
    torch.testing.assert_close(sparse_out, dense_out)
    torch.testing.assert_close(sparse_grad, dense_grad)
    torch.testing.assert_close(layer(x.to_dense()), dense_out)


def test_masked_loss_ignores_unobserved_cells():
    x = random_rows()
    out = torch.rand(x.n_rows, x.n_cols) * 5
    observed = x.to_dense() > 0
    expected = ((out - x.to_dense())[observed] ** 2).mean()
    torch.testing.assert_close(masked_mse(out, x), expected)
    torch.testing.assert_close(masked_mse(out.masked_fill(~observed, 1000.0), x), expected)


def test_weight_decay_applies_to_weight_matrices_only():
    model = AutoRec(n_inputs=9, hidden_size=4, weight_decay=0.1, optimizer=torch.optim.Adam)
    decay, no_decay = model.configure_optimizers().param_groups
    assert decay["weight_decay"] == 0.1 and {p.ndim for p in decay["params"]} == {2}
    assert no_decay["weight_decay"] == 0.0 and {p.ndim for p in no_decay["params"]} == {1}


def test_sparse_products_match_dense_ones_with_empty_rows_and_columns_and_every_gradient():
    torch.manual_seed(0)
    crow = torch.tensor([0, 2, 2, 5])  # row 1 is empty; columns 2 and 6 hold nothing
    col = torch.tensor([0, 4, 1, 3, 5])
    val = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0], requires_grad=True)
    n_cols, width = 7, 4
    weight = torch.randn(n_cols, width, requires_grad=True)  # encoder: (n_cols, out); decoder: (n_cols, hidden)
    h = torch.randn(3, width, requires_grad=True)
    bias = torch.randn(n_cols, requires_grad=True)
    row = torch.tensor([0, 0, 2, 2, 2])

    def dense_x():  # the same rows as a dense (3, n_cols) matrix, differentiable in val
        return torch.zeros(3, n_cols).index_put((row, col), val)

    for sparse, dense, inputs in [
        (lambda: SparseRowsTimesDense.apply(crow, col, val, weight), lambda: dense_x() @ weight, (val, weight)),
        (lambda: SampledLinear.apply(h, weight, bias, crow, col), lambda: (h @ weight.T + bias)[row, col],
         (h, weight, bias)),
    ]:
        out_sparse, out_dense = sparse(), dense()
        torch.testing.assert_close(out_sparse, out_dense)
        probe = torch.randn_like(out_dense)
        grads_sparse = torch.autograd.grad((out_sparse * probe).sum(), inputs)
        grads_dense = torch.autograd.grad((out_dense * probe).sum(), inputs)
        for g_sparse, g_dense in zip(grads_sparse, grads_dense):
            torch.testing.assert_close(g_sparse, g_dense)
    # empty columns get zero gradient rows, an empty row gets zero features
    grad = torch.autograd.grad(SparseRowsTimesDense.apply(crow, col, val, weight).sum(), weight)[0]
    assert grad[[2, 6]].abs().sum() == 0 and grad[[0, 4]].abs().sum() > 0
    assert SparseRowsTimesDense.apply(crow, col, val, weight)[1].abs().sum() == 0


def test_sparse_products_run_under_bf16_autocast_and_keep_float32_gradients():
    torch.manual_seed(0)
    model = DeepAutoencoder(n_inputs=9, layer_sizes=[5, 3], sampled_output=True, optimizer=torch.optim.Adam)
    x = random_rows(n_rows=6, n_cols=9, density=0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model.decoder[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sigmoid", "elu", "selu", "identity"])
def test_activations_are_settings(name):
    model = AutoRec(n_inputs=9, hidden_size=4, hidden_activation=name, output_activation=name,
                    optimizer=torch.optim.Adam)
    assert model(random_rows()).shape == (6, 9)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        AutoRec(n_inputs=9, hidden_activation="swish", optimizer=torch.optim.Adam)


def global_mean_rmse(dm: RatingsDataModule) -> float:
    return float(np.sqrt(np.mean((dm.test_matrix.data - dm.test_inputs.data.mean()) ** 2)))


def fit(model, dm, epochs: int) -> float:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]["test/rmse"]


@pytest.mark.parametrize("orientation", ["item", "user"])
def test_autorec_learns_the_planted_structure(data_root, orientation):
    L.seed_everything(0)
    dm = RatingsDataModule(root=str(data_root), download=False, orientation=orientation, batch_size=16)
    dm.setup()
    model = AutoRec(n_inputs=dm.n_cols, hidden_size=64, weight_decay=1e-3,
                    optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    baseline = global_mean_rmse(dm)
    rmse = fit(model, dm, epochs=25)
    assert rmse < 0.75 * baseline, (rmse, baseline)


@pytest.mark.parametrize("make", [
    lambda **kw: AutoRec(n_inputs=9, hidden_size=4, **kw),
    lambda **kw: AutoRec(n_inputs=9, hidden_size=4, output_activation="sigmoid", **kw),
    lambda **kw: DeepAutoencoder(n_inputs=9, layer_sizes=[5, 3], **kw),
    lambda **kw: DeepAutoencoder(n_inputs=9, layer_sizes=[5, 3], tied=True, **kw),
    lambda **kw: VAE(n_inputs=9, layer_sizes=[5, 3], **kw),
], ids=["autorec", "autorec-sigmoid-output", "deep", "deep-tied", "vae"])
def test_sampled_and_dense_outputs_give_the_same_loss_and_gradients(make):
    torch.manual_seed(0)
    sparse, dense = make(sampled_output=True, optimizer=torch.optim.Adam), make(sampled_output=False,
                                                                                 optimizer=torch.optim.Adam)
    dense.load_state_dict(sparse.state_dict())
    x = random_rows(n_rows=6, n_cols=9, density=0.4)
    losses, grads = [], []
    for model in (sparse, dense):
        torch.manual_seed(1)  # the same VAE sample in both
        loss = model.training_loss(x)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    torch.testing.assert_close(losses[0], losses[1])
    for g_sparse, g_dense in zip(*grads):
        if g_dense is None:
            assert g_sparse is None
        else:
            torch.testing.assert_close(g_sparse, g_dense)
    sparse.eval(), dense.eval()
    torch.testing.assert_close(sparse.predict_at(x, x), dense(x)[x.row_index(), x.col])


def test_auto_sampled_output_is_used_for_sparse_batches_or_outputs_too_big_to_hold_and_forced_paths_hold():
    # the share of cells below which the sampled product pays depends on the precision the dense one would use
    x = random_rows(density=0.3)
    auto = AutoRec(n_inputs=9, optimizer=torch.optim.Adam)
    assert not auto.use_sampled_output(x)
    wide = x._replace(n_cols=138_000, crow=torch.zeros(1025, dtype=torch.long))  # 1024 rows x 138k columns
    assert auto.use_sampled_output(wide)
    sparse = random_rows(n_rows=20, n_cols=1000, density=0.005)  # 0.5% of the cells
    ml1m_like = random_rows(n_rows=20, n_cols=1000, density=0.04)
    assert auto.use_sampled_output(sparse) and auto.use_sampled_output(ml1m_like)  # float32: below 10%
    with torch.autocast("cpu", dtype=torch.bfloat16):  # products on bf16 tiles: below 1%
        assert auto.use_sampled_output(sparse) and not auto.use_sampled_output(ml1m_like)
    assert AutoRec(n_inputs=9, sampled_output=True, optimizer=torch.optim.Adam).use_sampled_output(x)
    assert not AutoRec(n_inputs=9, sampled_output=False, optimizer=torch.optim.Adam).use_sampled_output(wide)
    with pytest.raises(ValueError, match="sampled_output='fast'"):
        AutoRec(n_inputs=9, sampled_output="fast", optimizer=torch.optim.Adam)


def test_plateau_scheduler_cuts_the_learning_rate_when_validation_stalls(data_root):
    dm = RatingsDataModule(root=str(data_root), download=False, batch_size=16)
    dm.setup()
    final_lr = {}
    for name, scheduler in [("none", None), ("plateau", functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=0))]:
        L.seed_everything(0)
        model = AutoRec(n_inputs=dm.n_cols, hidden_size=64, optimizer=functools.partial(torch.optim.Adam, lr=0.02),
                        scheduler=scheduler)
        trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)  # no weight decay, lr 0.02: validation stalls within 15 epochs
        final_lr[name] = trainer.optimizers[0].param_groups[0]["lr"]
    assert final_lr["none"] == 0.02 and final_lr["plateau"] <= 0.01


@pytest.mark.parametrize("make", [
    lambda n, **kw: AutoRec(n_inputs=n, hidden_size=8, **kw),
    lambda n, **kw: DeepAutoencoder(n_inputs=n, layer_sizes=[8, 4], **kw),
    lambda n, **kw: VAE(n_inputs=n, layer_sizes=[8, 4], **kw),
    lambda n, **kw: MatrixFactorization(n_inputs=n, n_rows=200, n_factors=4, **kw),
], ids=["autorec", "deep", "vae", "mf"])
def test_a_model_starts_at_the_training_ratings_mean_unless_resumed(make, data_root, tmp_path):
    dm = RatingsDataModule(root=str(data_root), download=False, batch_size=16)
    dm.setup()
    mean = float(dm.train_matrix.data.mean())
    started = make(dm.n_cols, optimizer=torch.optim.Adam, train_mean=mean)  # the data's mean, handed over
    L.Trainer(**unfit_args()).fit(started, datamodule=dm)  # setup, no step
    x = SparseRows.from_csr(dm.train_matrix, np.arange(dm.n_rows))
    with torch.no_grad():
        started.eval()
        predictions = started(x)
    assert abs(float(predictions.mean()) - mean) < 0.2 and abs(mean - 3.0) > 0.3  # not the scale's middle
    bias = starting_value(started)
    assert torch.all(bias == mean)
    untouched = make(dm.n_cols, optimizer=torch.optim.Adam, start_at_mean=False, train_mean=mean)
    L.Trainer(**unfit_args()).fit(untouched, datamodule=dm)
    assert not torch.any(starting_value(untouched) == mean)
    with torch.no_grad():  # a resumed fit keeps the checkpoint's weights
        bias.fill_(7.0)
    trainer = L.Trainer(**unfit_args())
    trainer.strategy.connect(started)
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    resumed = make(dm.n_cols, optimizer=torch.optim.Adam, train_mean=mean)
    L.Trainer(**unfit_args(max_epochs=2)).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "state.ckpt")
    assert torch.all(starting_value(resumed) == 7.0)


def starting_value(model) -> torch.Tensor:
    """What `start_at` sets: MF's global mean, an autoencoder's output bias."""
    return model.mean if isinstance(model, MatrixFactorization) else model.output_layer()[1]


def unfit_args(max_epochs: int = 1) -> dict:
    return dict(max_epochs=max_epochs, limit_train_batches=0, limit_val_batches=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_starting_at_the_mean_learns_faster(data_root):
    dm = RatingsDataModule(root=str(data_root), download=False, batch_size=16)
    dm.setup()
    rmse = {}
    for start in (True, False):
        L.seed_everything(0)
        model = AutoRec(n_inputs=dm.n_cols, hidden_size=64, weight_decay=1e-3, start_at_mean=start,
                        train_mean=float(dm.train_matrix.data.mean()),
                        optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
        rmse[start] = fit(model, dm, epochs=2)
    assert rmse[True] < 0.8 * rmse[False], rmse
