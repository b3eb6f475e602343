"""Seconds per training epoch of cfae's AutoRec against a plain dense PyTorch loop, same run, same data.

    CFAE_DATA_DIR=../shared/data python benchmarks/epoch_time.py [--epochs 5] [--hidden 500]

Both train I-AutoRec (item rows, latent 500, sigmoid, identity output) on ML-1M fold 0 with Adam, batch
256 and the masked loss; the dense loop holds the whole items x users matrix dense and multiplies it as
is. Reported: the median epoch after one warm-up epoch. Last line: cfae_s_per_epoch=X dense_s_per_epoch=Y
ratio=X/Y.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from cfae.data import MovieLensDataModule
from cfae.models import AutoRec
from cfae.train import EpochTimer


def dense_epochs(matrix, hidden: int, batch_size: int, epochs: int) -> list[float]:
    """The reference: the textbook dense AutoRec loop."""
    x_all = torch.from_numpy(matrix.toarray())  # (n_rows, n_cols) dense
    encoder, decoder = nn.Linear(x_all.shape[1], hidden), nn.Linear(hidden, x_all.shape[1])
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for rows in torch.randperm(len(x_all)).split(batch_size):
            x = x_all[rows]  # (batch, n_cols)
            mask = x > 0
            out = decoder(torch.sigmoid(encoder(x)))
            loss = ((out - x) ** 2 * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def cfae_epochs(dm: MovieLensDataModule, hidden: int, epochs: int) -> list[float]:
    timer = EpochTimer()
    times = []
    timer.on_train_epoch_end = lambda trainer, module: times.append(time.perf_counter() - timer.start)
    model = AutoRec(n_inputs=dm.n_cols, hidden_size=hidden, optimizer=torch.optim.Adam)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--dataset", default="ml1m")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    root = os.environ.get("CFAE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    dm = MovieLensDataModule(dataset=args.dataset, root=root, orientation="item", batch_size=256)
    dm.setup()
    print(f"{args.dataset}: {dm.train_matrix.shape[0]} item rows x {dm.n_cols} users, "
          f"{dm.train_matrix.nnz} training ratings; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    dense = dense_epochs(dm.train_matrix, args.hidden, 256, args.epochs)
    cfae = cfae_epochs(dm, args.hidden, args.epochs)
    for name, times in (("dense", dense), ("cfae", cfae)):
        print(f"{name:>5}: " + " ".join(f"{t:.3f}" for t in times) + " s per epoch")
    cfae_s, dense_s = statistics.median(cfae[1:]), statistics.median(dense[1:])
    print(f"cfae_s_per_epoch={cfae_s:.3f} dense_s_per_epoch={dense_s:.3f} ratio={cfae_s / dense_s:.3f}")


if __name__ == "__main__":
    main()
