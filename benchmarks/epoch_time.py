"""Seconds per training epoch of cfae against plain dense PyTorch loops, same run, same data.

    CFAE_DATA_DIR=../shared/data python benchmarks/epoch_time.py [--epochs 4] [--models autorec,deep,vae]
    CFAE_DATA_DIR=../shared/data python benchmarks/epoch_time.py --models multvae,ease   # task=ranking's

Each model trains on ML-1M fold 0, item rows, batch 256 (`--batch-size`), Adam lr 1e-3, with the masked
loss: cfae through Lightning with its config's optimizer (Adam with `fused=True`), the reference as the
textbook loop that holds the whole items x users matrix dense and multiplies it as is, in float32, with
torch's default Adam.
Every loop runs on `--device` (cuda or cpu; default: the CUDA GPU where there is one, else the CPU), and
cfae at its default precision there (`conf/trainer/default.yaml`: bf16 mixed precision on a GPU that
multiplies bfloat16 and on a CPU with AMX tiles, else float32). Two more references show where the gap
comes from: the dense loop with fused Adam, and with fused Adam under bf16 autocast (cfae's optimizer and
precision). Reported: the median epoch after one warm-up epoch. The last line starts with AutoRec's
`cfae_s_per_epoch=X dense_s_per_epoch=Y ratio=X/Y`, then the same ratios for the other models, then
`autorec_floor_s=F autorec_over_floor=X/F`.

`multvae` and `ease` are task=ranking's (vae_cf's protocol on ML-1M, 600 held-out users): a Mult-VAE epoch
(600-200-600, batches of 500 training users) and EASE's fit (the Gram matrix and its inverse), each beside the
floor the machine's multiply rate and memory bandwidth set for its arithmetic and traffic.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
from datetime import date
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import quiet_benchmark, timings
from torch import nn

from cfae.callbacks import EpochTimer
from cfae.configs import precision
from cfae.data import RatingsDataModule
from cfae.models import EASE, VAE, AutoRec, DeepAutoencoder, MultVAE
from cfae.processes import device_clock, keep_freed_memory, machine

HIDDEN = 500


def reference(name: str, n_cols: int) -> tuple[nn.Module, callable]:
    """A plain dense network and its loss for one batch x (batch, n_cols) with mask m."""
    if name == "autorec":  # Sedhain et al.: sigmoid code, identity output
        net = nn.Sequential(nn.Linear(n_cols, HIDDEN), nn.Sigmoid(), nn.Linear(HIDDEN, n_cols))
    elif name == "deep":  # the study's 300,500,750 with a mirrored decoder, SELU, dropout on the code
        sizes = [n_cols, 300, 500, 750, 500, 300]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b), nn.SELU()] + ([nn.Dropout(0.5)] if i == 2 else [])
        net = nn.Sequential(*layers, nn.Linear(300, n_cols))
    else:  # vae, 500,200
        net = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(n_cols, 500), nn.SELU(), nn.Linear(500, 400)),
                             "dec": nn.Sequential(nn.Linear(200, 500), nn.SELU(), nn.Linear(500, n_cols))})

    def loss(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if name != "vae":
            return ((net(x) - x) ** 2 * m).sum() / m.sum()
        mu, logvar = net["enc"](x).chunk(2, -1)
        out = net["dec"](mu + torch.randn_like(mu) * (0.5 * logvar).exp())
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum()
        return (((out - x) ** 2 * m).sum() / 2 + 0.2 * kl) / m.sum()

    return net, loss


def machine_rates(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(matrix-multiply FLOP/s in `dtype`, memory bytes/s) on `device`: the best of a few products of the
    sizes an epoch multiplies, and a copy of 256 MB (read + write)."""
    def best(f) -> float:
        return min(timings(f, repeats=5, device=device))

    rate = 0.0
    for m, k, n in [(256, HIDDEN, 6040), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        rate = max(rate, 2 * m * k * n / best(functools.partial(torch.mm, a, b)))
    src, dst = torch.empty(64 * 2**20, device=device), torch.empty(64 * 2**20, device=device)
    return rate, 2 * src.numel() * 4 / best(functools.partial(dst.copy_, src))


def autorec_floor(n_rows: int, n_cols: int, nnz: int, batch_size: int, rate: float, bandwidth: float) -> dict:
    """Seconds an AutoRec epoch (item rows, HIDDEN units, Adam) cannot beat, per way of computing the output.
    FLOPs: the sparse encoder 2 T H forward and 2 T H for its weight's gradient, T the ratings; the output
    6 R N H dense (forward, two backward products) or 6 T H sampled. Bytes: Adam reads p, g, m, v and writes
    p, m, v of every parameter each step; the output weight (N x H) is read three times a batch (dense) or
    one row per rating three times (sampled)."""
    steps, params = math.ceil(n_rows / batch_size), 2 * n_cols * HIDDEN + n_cols + HIDDEN
    adam_bytes = steps * 7 * 4 * params
    floors = {}
    for kind, flops, weight_bytes in [("dense", 6 * n_rows * n_cols * HIDDEN, steps * 3 * 4 * n_cols * HIDDEN),
                                      ("sampled", 6 * nnz * HIDDEN, 3 * 4 * nnz * HIDDEN)]:
        flops += 4 * nnz * HIDDEN
        moved = adam_bytes + weight_bytes
        floors[kind] = (max(flops / rate, moved / bandwidth), flops, moved)
    return floors


def dense_epochs(name: str, matrix, epochs: int, fused: bool, bf16: bool = False, batch_size: int = 256,
                 device: torch.device | None = None) -> list[float]:
    device = device or torch.device("cpu")
    x_all = torch.from_numpy(matrix.toarray()).to(device)  # (n_rows, n_cols) dense
    net, loss_fn = reference(name, x_all.shape[1])
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    times = []
    for _ in range(epochs):
        start = device_clock(device)
        for rows in torch.randperm(len(x_all), device=device).split(batch_size):
            x = x_all[rows]  # (batch, n_cols)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(x, x > 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(device_clock(device) - start)
    return times


def cfae_model(name: str, n_cols: int, sampled_output: str | bool) -> L.LightningModule:
    adam = lambda params: torch.optim.Adam(params, lr=1e-3, fused=True)  # noqa: E731  (conf/optimizer/adam.yaml)
    common = {"optimizer": adam, "sampled_output": sampled_output}
    if name == "autorec":
        return AutoRec(n_inputs=n_cols, hidden_size=HIDDEN, **common)
    if name == "deep":
        return DeepAutoencoder(n_inputs=n_cols, layer_sizes=[300, 500, 750], dropout=0.5, **common)
    return VAE(n_inputs=n_cols, layer_sizes=[500, 200], **common)


def cfae_epochs(name: str, dm: RatingsDataModule, epochs: int, sampled_output: str | bool,
                precision: str, device: torch.device) -> list[float]:
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision)
    trainer.fit(cfae_model(name, dm.n_cols, sampled_output), datamodule=dm)
    return timer.times


def ranking_figures(root: str, epochs: int, rate: float, bandwidth: float, device: torch.device) -> str:
    """A Mult-VAE epoch and EASE's fit on ML-1M under vae_cf's protocol, each against its floor."""
    dm = RatingsDataModule(dataset="ml1m", root=root, clicks_above=3.5, min_item_ratings=0, min_user_ratings=5,
                           orientation="user", split="users", heldout_users=600, batch_size=500)
    dm.setup()
    x = dm.train_matrix
    users, items, clicks = int((x.getnnz(axis=1) > 0).sum()), x.shape[1], x.nnz
    print(f"ml1m clicks: {users} training users x {items} items, {clicks} clicks")
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1)
    adam = lambda params: torch.optim.Adam(params, lr=1e-3, fused=True)  # noqa: E731  (conf/optimizer/adam.yaml)
    trainer.fit(MultVAE(n_inputs=items, optimizer=adam), datamodule=dm)
    epoch = statistics.median(timer.times[1:])
    # FLOPs: the sparse encoder 4 T 600 (forward, weight gradient), the dense layers 6 U (600 x 400 + 200 x 600 +
    # 600 x I) (forward, two backward products); bytes: Adam's 7 reads and writes of every parameter each step
    params = items * 600 + 600 * 400 + 200 * 600 + 600 * items
    flops = 4 * clicks * 600 + 6 * users * (600 * 400 + 200 * 600 + 600 * items)
    moved = math.ceil(users / 500) * 7 * 4 * params
    vae_floor = max(flops / rate, moved / bandwidth)
    print(f"multvae: {' '.join(f'{t:.3f}' for t in timer.times)} s per epoch; floor {vae_floor:.3f} s "
          f"({flops / 1e9:.1f} GFLOP, {moved / 1e9:.2f} GB): {epoch / vae_floor:.1f} x")
    ease = EASE(n_inputs=items, l2=500.0)
    fit = statistics.median(timings(lambda: ease.solve(x), repeats=3))
    # the Gram matrix: sum over users of n_u^2 multiply-adds; the inverse of an I x I matrix: about 2 I^3 FLOPs,
    # in float64, at the float32 rate measured (a floor no slower than the truth)
    gram = 2 * float((x.getnnz(axis=1).astype(np.float64) ** 2).sum())
    ease_floor = (gram + 2 * items**3) / rate
    print(f"ease: fit {fit:.3f} s; floor {ease_floor:.3f} s ({(gram + 2 * items**3) / 1e9:.1f} GFLOP): "
          f"{fit / ease_floor:.1f} x")
    return (f"multvae_s_per_epoch={epoch:.3f} multvae_over_floor={epoch / vae_floor:.2f} ease_fit_s={fit:.3f} "
            f"ease_over_floor={fit / ease_floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--models", default="autorec,deep,vae")
    parser.add_argument("--sampled-output", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", help="cfae's; default: conf/trainer's choice for the device")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch, for every loop")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or precision("gpu" if device.type == "cuda" else "cpu")
    quiet_benchmark()
    sampled = {"true": True, "false": False}.get(args.sampled_output, "auto")
    keep_freed_memory()  # as train.py does; the reference loops share the process and so the setting
    root = os.environ.get("CFAE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    dm = RatingsDataModule(dataset="ml1m", root=root, orientation="item", batch_size=args.batch_size)
    dm.setup()
    print(f"ml1m: {dm.train_matrix.shape[0]} item rows x {dm.n_cols} users, {dm.train_matrix.nnz} training "
          f"ratings; torch {torch.__version__}, {torch.get_num_threads()} threads; cfae precision {args.precision}")
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32  # what cfae multiplies in
    rate, bandwidth = machine_rates(dtype, device)
    print(f"{machine()}, {date.today()}: {dtype} matrix multiply {rate / 1e9:.0f} GFLOP/s, memory "
          f"{bandwidth / 1e9:.1f} GB/s")
    figures, floor_figure = [], ""
    ranking = [m for m in args.models.split(",") if m in ("multvae", "ease")]
    if ranking:
        figures.append(ranking_figures(root, args.epochs, rate, bandwidth, device))
    for name in (m for m in args.models.split(",") if m not in ranking):
        torch.manual_seed(0)
        dense = functools.partial(dense_epochs, name, dm.train_matrix, args.epochs, batch_size=args.batch_size,
                                  device=device)
        runs = {"dense": dense(fused=False), "dense+fused": dense(fused=True),
                "dense+fused+bf16": dense(fused=True, bf16=True),
                "cfae": cfae_epochs(name, dm, args.epochs, sampled, args.precision, device)}
        medians = {k: statistics.median(v[1:]) for k, v in runs.items()}
        for kind, times in runs.items():
            print(f"{name:>8} {kind:>16}: " + " ".join(f"{t:.3f}" for t in times) + " s per epoch")
        if name == "autorec":
            floors = autorec_floor(dm.train_matrix.shape[0], dm.n_cols, dm.train_matrix.nnz, args.batch_size,
                                   rate, bandwidth)
            for kind, (seconds, flops, moved) in floors.items():
                print(f"autorec floor, {kind} output: {seconds:.3f} s ({flops / 1e9:.1f} GFLOP, {moved / 1e9:.2f} GB)")
            floor = min(seconds for seconds, _, _ in floors.values())
            print(f"autorec: cfae's epoch {medians['cfae']:.3f} s = {medians['cfae'] / floor:.2f} x the floor")
            floor_figure = f" autorec_floor_s={floor:.3f} autorec_over_floor={medians['cfae'] / floor:.2f}"
        prefix = "" if name == "autorec" else f"{name}_"
        figures.append(f"{prefix}cfae_s_per_epoch={medians['cfae']:.3f} {prefix}dense_s_per_epoch="
                       f"{medians['dense']:.3f} {prefix}ratio={medians['cfae'] / medians['dense']:.3f}")
        print(f"{name:>8}: cfae / dense {medians['cfae'] / medians['dense']:.3f}, "
              f"cfae / dense with fused Adam {medians['cfae'] / medians['dense+fused']:.3f}, "
              f"cfae / dense with fused Adam and bf16 {medians['cfae'] / medians['dense+fused+bf16']:.3f}")
    print(" ".join(figures) + floor_figure)


if __name__ == "__main__":
    main()
