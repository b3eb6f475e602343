"""What several test modules share: the project's folder, small random rating rows, and settings that fit each
model to the tiny synthetic data in seconds."""

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cfae.sparse import SparseRows

ROOT = Path(__file__).resolve().parents[1]


def random_rows(n_rows=6, n_cols=9, density=0.3, seed=0) -> SparseRows:
    m = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed, dtype=np.float32)
    m.data = np.ceil(m.data * 5)
    return SparseRows.from_csr(m, np.arange(n_rows))


MODELS = {  # model: overrides that fit the tiny synthetic set in a few seconds
    "autorec": ["hidden=64", "optimizer.lr=0.01", "model.weight_decay=1e-3"],
    "denoising": ["hidden=64", "optimizer.lr=0.01", "model.weight_decay=1e-3", "noise=0.1"],
    "deep": ["hidden=32", "depth=2", "optimizer.lr=0.003"],
    "deep_refeed": ["hidden=32", "depth=2", "optimizer.lr=0.003"],
    "deep_bn": ["hidden=32", "depth=2", "optimizer.lr=0.003"],
    "vae": ["hidden=32", "depth=2", "optimizer.lr=0.003", "model.anneal_steps=100"],
    "mf": ["hidden=8", "optimizer.lr=0.02", "model.regularization=0.02"],
    "bias": ["optimizer.lr=0.05"],
    "svd": ["hidden=3"],
    "bayesian_fm": ["hidden=4", "model.iterations=60"],
    "kernel_autorec": ["hidden=32", "depth=1", "model.lambda_2=1", "model.lambda_s=0.01", "optimizer.max_iter=10",
                       "data.batch_size=100000", "trainer.max_epochs=10"],  # full batch, as its config has it
    "glocal_k": ["hidden=32", "depth=1", "model.lambda_2=1", "model.lambda_s=0.01", "optimizer.max_iter=10",
                 "model.pretrain_epochs=5", "trainer.max_epochs=10"],  # whole matrix: its own batches
}
