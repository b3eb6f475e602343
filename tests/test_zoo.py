"""Each model's defining behaviour, and that each learns the planted structure."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import MODELS, ROOT, random_rows
from hydra import compose, initialize_config_dir

from cfae.models import VAE, AutoRec, DeepAutoencoder, MatrixFactorization
from cfae.models.base import masked_mse
from cfae.models.baselines import imputed_svd
from cfae.sparse import SparseRows
from cfae.train import train

ADAM = torch.optim.Adam


def test_denoising_corrupts_only_training_inputs_and_scores_clean_ratings():
    torch.manual_seed(0)
    x = random_rows(n_rows=8, n_cols=30, density=0.5)
    model = AutoRec(n_inputs=30, hidden_size=6, noise=0.5, optimizer=ADAM)
    clean = AutoRec(n_inputs=30, hidden_size=6, optimizer=ADAM)
    clean.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model(x), clean.eval()(x))  # no corruption at evaluation
    model.train()
    assert not torch.allclose(model(x), model(x))  # a fresh corruption each training pass
    everything_dropped = AutoRec(n_inputs=30, hidden_size=6, noise=0.5, optimizer=ADAM)
    everything_dropped.noise = 1.0  # past what a run may ask (noise < 1): the edge of the loss
    constant = everything_dropped.decoder(torch.sigmoid(everything_dropped.encoder.bias)).expand(8, 30)
    # the loss compares the (all-dropped) reconstruction with the clean ratings, not the corrupted zeros
    torch.testing.assert_close(everything_dropped.training_loss(x), masked_mse(constant, x))


def test_tied_decoder_reuses_the_encoder_weights():
    tied = DeepAutoencoder(n_inputs=20, layer_sizes=[8, 4], tied=True, optimizer=ADAM)
    untied = DeepAutoencoder(n_inputs=20, layer_sizes=[8, 4], tied=False, optimizer=ADAM)
    names = [n for n, _ in tied.named_parameters()]
    assert not any(n.startswith("decoder.") for n in names)
    weights = 20 * 8 + 8 * 4
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == weights
    h = torch.randn(3, 8)
    torch.testing.assert_close(tied.decoder_layer(1, h), h @ tied.encoder[0].weight.T + tied.decoder_bias[1])
    (grad,) = torch.autograd.grad(tied.decoder_layer(1, h).sum(), tied.encoder[0].weight)
    assert grad.abs().sum() > 0  # training the decoder moves the shared tensor


def test_refeeding_adds_the_dense_loss_and_changes_the_gradient():
    torch.manual_seed(0)
    x = random_rows(n_rows=5, n_cols=12, density=0.4)
    plain = DeepAutoencoder(n_inputs=12, layer_sizes=[6, 3], dropout=0.0, optimizer=ADAM)
    refeed = DeepAutoencoder(n_inputs=12, layer_sizes=[6, 3], dropout=0.0, refeed=1, optimizer=ADAM)
    refeed.load_state_dict(plain.state_dict())
    y = plain(x).detach()
    expected_extra = ((plain(y) - y) ** 2).mean()
    torch.testing.assert_close(refeed.training_loss(x), plain.training_loss(x) + expected_extra)
    g_plain = torch.autograd.grad(plain.training_loss(x), plain.encoder[0].weight)[0]
    g_refeed = torch.autograd.grad(refeed.training_loss(x), refeed.encoder[0].weight)[0]
    assert not torch.allclose(g_plain, g_refeed)


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_evaluation():
    torch.manual_seed(0)
    model = DeepAutoencoder(n_inputs=12, layer_sizes=[6, 3], batch_norm=True, optimizer=ADAM)
    x = random_rows(n_rows=6, n_cols=12, density=0.5).to_dense()
    before = model.encoder_norms[0].running_mean.clone()
    model.train()
    alone, together = model(x[:3]), model(x)[:3]
    assert not torch.allclose(alone, together)  # training: each row depends on its batch
    assert not torch.equal(before, model.encoder_norms[0].running_mean)  # running statistics move
    model.eval()
    torch.testing.assert_close(model(x[:3]), model(x)[:3])  # evaluation: rows are independent
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 2 + 1  # 2 encoder, 1 decoder


def test_vae_kl_weight_follows_its_schedule_and_evaluation_uses_the_mean():
    model = VAE(n_inputs=12, layer_sizes=[6, 3], beta_max=0.2, anneal_steps=1000, optimizer=ADAM)
    assert [model.kl_weight(s) for s in (0, 250, 500, 1000, 5000)] == pytest.approx([0, 0.05, 0.1, 0.2, 0.2])
    x = random_rows(n_rows=4, n_cols=12, density=0.5)
    model.eval()
    mu, _ = model.encode(x)
    torch.testing.assert_close(model(x), model.decode(mu))
    model.train()
    assert not torch.allclose(model(x), model(x))  # training samples z


def test_svd_reconstructs_a_planted_low_rank_matrix():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 30)) + 3  # rank 4 with the offset
    rows, cols = imputed_svd(sp.csr_matrix(full), n_factors=4, axis=0)
    np.testing.assert_allclose(rows @ cols.T, full, atol=1e-8)


def test_svd_fills_missing_cells_with_the_item_mean():
    ratings = sp.csr_matrix(np.array([[5, 0], [3, 2], [0, 4]], dtype=np.float64))  # users x items
    rows, cols = imputed_svd(ratings, n_factors=1, axis=0)  # rank 1 of [[5, 3], [3, 2], [4, 4]]
    imputed = np.array([[5, 3], [3, 2], [4, 4]], dtype=np.float64)
    u, s, vt = np.linalg.svd(imputed)
    np.testing.assert_allclose(rows @ cols.T, s[0] * np.outer(u[:, 0], vt[0]), atol=1e-8)


@pytest.mark.parametrize("n_factors", [0, 4])
def test_mf_and_bias_recover_planted_biases(n_factors):
    rng = np.random.default_rng(1)
    n_rows, n_cols = 60, 40
    row_bias, col_bias = rng.normal(scale=0.6, size=n_rows), rng.normal(scale=0.6, size=n_cols)
    observed = rng.random((n_rows, n_cols)) < 0.5
    ratings = sp.csr_matrix(np.where(observed, 3.5 + row_bias[:, None] + col_bias[None, :], 0).astype(np.float32))
    batch = SparseRows.from_csr(ratings, np.arange(n_rows))
    torch.manual_seed(0)
    model = MatrixFactorization(n_inputs=n_cols, n_rows=n_rows, n_factors=n_factors, regularization=1e-4,
                                optimizer=ADAM)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()
    learned_rows = model.row_bias.detach().numpy()
    learned_cols = model.col_bias.detach().numpy()
    # biases are identified up to a constant shared with the mean: compare centred; with factors, these
    # can absorb part of a bias, so MF is held to the planted ordering rather than the exact values
    if n_factors == 0:
        np.testing.assert_allclose(learned_rows - learned_rows.mean(), row_bias - row_bias.mean(), atol=0.05)
        np.testing.assert_allclose(learned_cols - learned_cols.mean(), col_bias - col_bias.mean(), atol=0.05)
    assert np.corrcoef(learned_rows, row_bias)[0, 1] > 0.95 and np.corrcoef(learned_cols, col_bias)[0, 1] > 0.95


ORIENTATIONS = ["item", pytest.param("user", marks=pytest.mark.slow)]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_learns_the_planted_structure_better_than_the_global_mean(name, orientation, data_root,
                                                                                tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={name}", f"data.root={data_root}", "data.download=false", "data.batch_size=16",
            f"data.orientation={orientation}", "trainer.max_epochs=25", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "logger=none", f"output_dir={tmp_path}", *MODELS[name]])
    from cfae.data import RatingsDataModule

    dm = RatingsDataModule(root=str(data_root), download=False, orientation=orientation)
    dm.setup()
    global_mean = float(np.sqrt(np.mean((dm.test_matrix.data - dm.test_inputs.data.mean()) ** 2)))
    metrics = train(cfg)
    margin = 0.95 if name == "bias" else 0.9  # biases alone cannot model the planted interactions
    assert metrics["test/rmse"] < margin * global_mean, (metrics, global_mean)
