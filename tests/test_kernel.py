"""Kernelised AutoRec and its kernel layer (cfae/models/kernel.py)."""

import functools

import lightning as L
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_rows

from cfae.models import GLocalK, KernelAutoRec
from cfae.models.kernel import KernelLinear
from cfae.sparse import SparseRows


def planted_layer() -> KernelLinear:
    """4 inputs, 3 outputs, 2-d embeddings at known places: input i and output j are |u_i - v_j| apart."""
    layer = KernelLinear(4, 3, kernel_dim=2)
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0, 0.999]]))
        layer.v.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]))
    return layer


def test_the_kernel_has_finite_support_and_weights_outside_it_are_exactly_zero():
    layer = planted_layer()
    distance = torch.cdist(layer.u, layer.v)
    expected = torch.clamp(1 - distance**2, min=0)
    torch.testing.assert_close(layer.kernel(), expected, atol=1e-6, rtol=0)
    outside = distance >= 1
    assert outside.sum() == 8 and (~outside).sum() == 4  # some pairs of each kind, one exactly at distance 1
    weight = layer.effective_weight()
    assert torch.all(weight[outside] == 0)  # exactly, not nearly
    assert torch.all(weight[~outside] != 0)
    # no gradient reaches W where the kernel is zero: those connections do not exist
    weight.square().sum().backward()
    assert torch.all(layer.weight.grad[outside] == 0) and torch.all(layer.weight.grad[~outside] != 0)


def test_sparse_and_dense_inputs_give_the_same_kernel_layer_output_and_gradients():
    torch.manual_seed(0)
    x = random_rows(n_rows=5, n_cols=4)
    layer = planted_layer()
    sparse = layer(x)
    grads = torch.autograd.grad(sparse.sum(), [layer.weight, layer.u, layer.v, layer.bias])
    dense = layer(x.to_dense())
    torch.testing.assert_close(sparse, dense)
    for a, b in zip(grads, torch.autograd.grad(dense.sum(), [layer.weight, layer.u, layer.v, layer.bias])):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(dense, x.to_dense() @ (layer.weight * layer.kernel()) + layer.bias)


def test_the_objective_is_half_the_squared_error_plus_the_kernel_and_weight_penalties_per_rating():
    torch.manual_seed(0)
    x = random_rows(n_rows=6, n_cols=9)
    model = KernelAutoRec(n_inputs=9, hidden_size=5, n_layers=2, kernel_dim=3, lambda_2=2.0, lambda_s=0.5)
    h = x.to_dense()
    for layer in model.hidden:
        h = torch.sigmoid(h @ (layer.weight * layer.kernel()) + layer.bias)
    out = h @ (model.output.weight * model.output.kernel()) + model.output.bias
    torch.testing.assert_close(model(x), out)  # the dense forward: hidden layers, then the kernel output layer
    layers = [*model.hidden, model.output]
    expected = ((out[x.row_index(), x.col] - x.val) ** 2).sum() / 2 \
        + sum(0.5 / 2 * (layer.kernel() ** 2).sum() + 2.0 / 2 * (layer.weight ** 2).sum() for layer in layers)
    torch.testing.assert_close(model.training_loss(x), expected / len(x.val))  # per rating


def test_full_batch_lbfgs_takes_one_group_and_lowers_the_objective(benchmark):
    torch.manual_seed(0)
    x = random_rows(n_rows=30, n_cols=12, density=0.4)
    model = KernelAutoRec(n_inputs=12, hidden_size=8, n_layers=1, lambda_2=0.1, lambda_s=0.01,
                          optimizer=functools.partial(torch.optim.LBFGS, max_iter=20, line_search_fn="strong_wolfe"))
    optimizer = model.configure_optimizers()
    before = model.training_loss(x).item()
    benchmark("common").lbfgs_step(model, x, optimizer)
    assert model.training_loss(x).item() < 0.5 * before


def zero_padded_correlation(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """What conv2d computes (cross-correlation, zero padding, same size), written out."""
    k = kernel.shape[0] // 2
    padded = np.pad(image, k)
    out = np.zeros_like(image)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            out[i, j] = (padded[i:i + 2 * k + 1, j:j + 2 * k + 1] * kernel).sum()
    return out


def test_the_global_kernel_comes_from_the_reconstructions_row_means_and_smooths_the_whole_matrix():
    torch.manual_seed(0)
    x = random_rows(n_rows=7, n_cols=9, density=0.4)
    model = GLocalK(n_inputs=9, n_rows=7, hidden_size=5, n_layers=1, kernel_dim=3, dot_scale=0.7)
    model.eval()
    with torch.no_grad():
        reconstruction = model(x).numpy()  # not fine-tuned yet: the local model
        kernel = (reconstruction.mean(axis=1) @ model.conv_kernel.numpy() * 0.7).reshape(3, 3)
        torch.testing.assert_close(model.global_kernel(x), torch.from_numpy(kernel), rtol=1e-5, atol=1e-6)
        expected = np.maximum(zero_padded_correlation(x.to_dense().numpy(), kernel), 0)
        torch.testing.assert_close(model.smoothed(x), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
        # rows are placed by their index in the matrix, whatever order a batch holds them in
        order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
        shuffled = SparseRows.from_csr(sp.csr_matrix(x.to_dense().numpy()), order.numpy())
        torch.testing.assert_close(model.smoothed(shuffled), torch.from_numpy(expected)[order], rtol=1e-5, atol=1e-5)
        model.fine_tuned.fill_(True)  # fine-tuned, the model reads the smoothed matrix
        torch.testing.assert_close(model(x), model.output_function(
            torch.nn.functional.linear(KernelAutoRec.features(model, model.smoothed(x)), *model.output_layer())))


class StageRecorder(L.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
        optimizer = trainer.optimizers[0]
        stopping = trainer.early_stopping_callback
        self.epochs.append((bool(pl_module.fine_tuned), optimizer.param_groups[0]["max_iter"], stopping.wait_count,
                            float(stopping.best_score), float(trainer.callback_metrics["val/rmse"])))


def test_glocal_k_pretrains_then_fine_tunes_and_early_stopping_waits_for_the_fine_tuning(data_root, tmp_path):
    from cfae.configs import compose
    from cfae.train import fit

    cfg = compose("model=glocal_k", "hidden=16", "depth=1", "model.pretrain_epochs=3", "model.finetune_max_iter=4",
                  "model.lambda_2=1", "model.lambda_s=0.01", "optimizer.max_iter=6", "patience=2",
                  "trainer.max_epochs=6", f"data.root={data_root}", "data.download=false", "logger=none",
                  "trainer.enable_progress_bar=false", "ranking=null", f"output_dir={tmp_path}",
                  "+callbacks.recorder._target_=test_kernel.StageRecorder")
    trained = fit(cfg)
    recorder = next(c for c in trained.model.trainer.callbacks if isinstance(c, StageRecorder))
    assert len(recorder.epochs) > 3  # early stopping (patience 2) did not end the pre-training
    for epoch, (fine_tuned, max_iter, waited, *_) in enumerate(recorder.epochs):
        assert (fine_tuned, max_iter) == ((False, 6) if epoch < 3 else (True, 4)), recorder.epochs
        assert epoch >= 3 or waited < 2
    # fine-tuning's first epoch is early stopping's new reference, whatever pre-training reached (the recorder
    # runs before early stopping's own end-of-epoch check: it sees the reference an epoch late)
    first_fine_tuning_val, pretraining_best = recorder.epochs[3][4], min(e[4] for e in recorder.epochs[:3])
    assert recorder.epochs[4][3] == pytest.approx(first_fine_tuning_val, abs=1e-6)
    assert first_fine_tuning_val != pytest.approx(pretraining_best, abs=1e-6)
    best = GLocalK.load_from_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert best.n_rows == trained.datamodule.n_rows and best.fine_tuned.dtype == torch.bool


def test_glocal_k_refit_goes_through_the_stages_up_to_the_epoch_validation_chose(data_root, tmp_path):
    from cfae.configs import compose
    from cfae.train import fit

    cfg = compose("model=glocal_k", "hidden=16", "depth=1", "model.pretrain_epochs=2", "model.finetune_max_iter=4",
                  "model.lambda_2=1", "model.lambda_s=0.01", "optimizer.max_iter=6", "trainer.max_epochs=5",
                  f"data.root={data_root}", "data.download=false", "logger=none", "trainer.enable_progress_bar=false",
                  "ranking=null", f"output_dir={tmp_path}", "refit=true")
    trained = fit(cfg)
    chosen = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    epochs = trained.metrics["refit/epochs"]
    assert epochs == chosen["epoch"] + 1
    assert bool(trained.model.fine_tuned) == (epochs > 2) == bool(chosen["state_dict"]["fine_tuned"])
    assert 0 < trained.metrics["test/rmse"] < 2 and 0 < trained.metrics["test/rmse_before_refit"] < 2


def test_the_published_glocal_k_split_is_the_authors_own_loop(data_root, benchmark):
    """benchmarks/glocal_k_protocol.py against the authors' load_data_1m, written out as they wrote it."""
    path = data_root / "ml-1m" / "ratings.dat"
    train, test = benchmark("glocal_k_protocol").published_split(path)
    data = np.array([line.split("::")[:3] for line in path.read_text().splitlines()], dtype=np.int32)
    n_u, n_m, n_r = np.unique(data[:, 0]).size, np.unique(data[:, 1]).size, data.shape[0]
    udict = {u: i for i, u in enumerate(np.unique(data[:, 0]).tolist())}
    mdict = {m: i for i, m in enumerate(np.unique(data[:, 1]).tolist())}
    np.random.seed(1234)
    idx = np.arange(n_r)
    np.random.shuffle(idx)
    train_r, test_r = np.zeros((n_m, n_u), dtype="float32"), np.zeros((n_m, n_u), dtype="float32")
    for i in range(n_r):
        u_id, m_id, r = data[idx[i], 0], data[idx[i], 1], data[idx[i], 2]
        if i < int(0.1 * n_r):
            test_r[mdict[m_id], udict[u_id]] = r
        else:
            train_r[mdict[m_id], udict[u_id]] = r
    np.testing.assert_array_equal(train.toarray(), train_r)
    np.testing.assert_array_equal(test.toarray(), test_r)


@pytest.mark.slow
def test_the_protocol_benchmark_prints_both_protocols(data_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "glocal_k_protocol.py"), "--ratings",
                           str(data_root / "ml-1m" / "ratings.dat"), "--pretrain-epochs", "1", "--finetune-epochs", "2",
                           "hidden=16", "depth=1", "model.pretrain_epochs=1", "trainer.max_epochs=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SELECTED ON THE TEST SET" in done.stdout
    last = dict(item.split("=") for item in done.stdout.strip().splitlines()[-1].split())
    assert set(last) == {"published_protocol_test_selected", "published_protocol_last", "cfae_protocol"}
    assert all(0 < float(v) < 5 for v in last.values())
    assert float(last["published_protocol_test_selected"]) <= float(last["published_protocol_last"])
