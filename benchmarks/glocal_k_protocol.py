"""GLocal-K under its published protocol, then under cfae's: how much of the published number is the protocol.

    CFAE_DATA_DIR=../shared/data python benchmarks/glocal_k_protocol.py            # ML-1M, the paper's setting
    python benchmarks/glocal_k_protocol.py --ratings path/to/ratings.dat --pretrain-epochs 2 --finetune-epochs 3

The published protocol (the authors' notebook, usydnlp/Glocal_K): every rating of ratings.dat (no filter),
one 90:10 split drawn with NumPy's legacy seed 1234 (np.random.seed(1234); shuffle; the first 10% is the
test part), item rows, no validation part: pre-training for 20 epochs of 50 L-BFGS iterations, fine-tuning
for 30 epochs of 10, each epoch a fresh L-BFGS run (as their scipy optimizer restarts), and the reported
figure the best fine-tuning epoch *as measured on the test set*. This script prints that figure, labelled
as selected on test, and the last epoch's; nothing is chosen from it. Then `train.py +experiment=glocal_k
data.test_fraction=0.1` on fold 0: 5% of the training part held out, early stopping and the checkpoint
chosen on it, the test part seen once.

It prints the machine and, last, `published_protocol_test_selected=<rmse> published_protocol_last=<rmse>
cfae_protocol=<rmse>`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from common import lbfgs_step

from cfae.configs import compose
from cfae.data.movielens import read_ratings
from cfae.data.ratings import build_matrix
from cfae.models import GLocalK
from cfae.processes import keep_freed_memory, machine
from cfae.sparse import SparseRows


def published_split(ratings_path: Path, test_fraction: float = 0.1, seed: int = 1234):
    """(train, test) items x users CSR matrices of every rating, split as the authors' load_data_1m does."""
    ratings = read_ratings(ratings_path, "::")
    rm = build_matrix(ratings, min_item_ratings=0)  # indices: sorted unique ids, as their udict / mdict
    users = np.searchsorted(rm.user_ids, ratings.users)
    items = np.searchsorted(rm.item_ids, ratings.items)
    np.random.seed(seed)  # their legacy global-seed shuffle, reproduced exactly
    order = np.arange(len(ratings.ratings))
    np.random.shuffle(order)
    n_test = int(test_fraction * len(order))
    shape = (len(rm.item_ids), len(rm.user_ids))

    def part(index: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((ratings.ratings[index], (items[index], users[index])), shape=shape)
        m.sort_indices()
        return m

    return part(order[n_test:]), part(order[:n_test])


def rmse(model: GLocalK, x: SparseRows, test: sp.csr_matrix) -> float:
    with torch.no_grad():
        model.eval()
        pred = model(x).clamp(1, 5)
        model.train()
    t = test.tocoo()
    return float(np.sqrt(np.mean((pred[t.row, t.col].double().numpy() - t.data) ** 2)))


def lbfgs_epoch(model: GLocalK, x: SparseRows, max_iter: int) -> None:
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                                  line_search_fn="strong_wolfe")  # fresh each epoch, as scipy's restarts
    lbfgs_step(model, x, optimizer)


def published_protocol(ratings_path: Path, pretrain_epochs: int, finetune_epochs: int) -> tuple[float, int, float]:
    train, test = published_split(ratings_path)
    torch.manual_seed(1284)
    model = GLocalK(n_inputs=train.shape[1], n_rows=train.shape[0])  # the paper's ML-1M setting (defaults)
    x = SparseRows.from_csr(train, np.arange(train.shape[0]))
    print(f"published protocol: {train.shape[0]} items x {train.shape[1]} users, {train.nnz} training and "
          f"{test.nnz} test ratings (no filter, seed 1234, no validation part)", flush=True)
    start = time.perf_counter()
    for epoch in range(pretrain_epochs):
        lbfgs_epoch(model, x, 50)
        print(f"  pre-training epoch {epoch + 1}: test RMSE {rmse(model, x, test):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.fine_tuned.fill_(True)
    curve = []
    for epoch in range(finetune_epochs):
        lbfgs_epoch(model, x, 10)
        curve.append(rmse(model, x, test))
        print(f"  fine-tuning epoch {epoch + 1}: test RMSE {curve[-1]:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    best = int(np.argmin(curve))
    return curve[best], best + 1, curve[-1]


def cfae_protocol(overrides: list[str]) -> float:
    from cfae.train import train

    cfg = compose("+experiment=glocal_k", "data.test_fraction=0.1", "logger=none", "ranking=null",
                  "trainer.enable_progress_bar=false", "output_dir=outputs/glocal_k_protocol", *overrides)
    return train(cfg)["test/rmse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=Path, help="an ML-1M-format ratings.dat (default: $CFAE_DATA_DIR/ml-1m)")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the cfae-protocol run")
    args = parser.parse_intermixed_args()  # overrides may come before and after the options
    keep_freed_memory()
    ratings = args.ratings or Path(os.environ.get("CFAE_DATA_DIR", ".")) / "ml-1m" / "ratings.dat"
    print(f"machine: {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)
    selected, epoch, last = published_protocol(ratings, args.pretrain_epochs, args.finetune_epochs)
    print(f"published protocol: {selected:.4f} at fine-tuning epoch {epoch}, SELECTED ON THE TEST SET (the paper's "
          f"reporting; never used for a choice here); last epoch {last:.4f}", flush=True)
    root = str(ratings.resolve().parent.parent)
    ours = cfae_protocol([f"data.root={root}", "data.download=false", *args.overrides])
    print(f"cfae protocol (items with >= 10 ratings, fold 0 of the random 90:10 splits, early stopping and the "
          f"checkpoint chosen on validation): {ours:.4f}")
    print(f"published_protocol_test_selected={selected:.4f} published_protocol_last={last:.4f} "
          f"cfae_protocol={ours:.4f}")


if __name__ == "__main__":
    main()
