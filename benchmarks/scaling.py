"""Seconds per AutoRec epoch and peak resident memory as the number of ratings grows.

    CFAE_DATA_DIR=../shared/data python benchmarks/scaling.py [--sets ml100k,ml1m,syn5m,syn20m]

AutoRec (latent 500, item rows, batch 256, fused Adam, cfae's default precision: bf16 mixed on a CPU with
AMX tiles, else float32) trains two epochs on each set, the second
timed, validation off, each set in its own process so that its peak resident memory is its own. The
synthetic sets have ML-20M's shape (138,493 users x 26,744 items) and a planted low-rank structure. Last
line: `<set>_s=` seconds per epoch, `<set>_gb=` peak memory, and `syn20m_over_20x_ml1m=`, the 20M-rating
epoch over twenty ML-1M epochs (1.0 would be cost in proportion to the ratings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML20M_SHAPE = (138_493, 26_744)
SYNTHETIC = {"syn5m": 5_000_000, "syn20m": 20_000_000}


def one(name: str, batch_size: int) -> dict:
    import lightning as L
    import torch
    from common import quiet_benchmark

    from cfae.callbacks import EpochTimer
    from cfae.configs import precision
    from cfae.data import RatingsDataModule
    from cfae.models import AutoRec
    from cfae.processes import keep_freed_memory
    from cfae.synthetic import planted_ratings

    quiet_benchmark()
    keep_freed_memory()  # as train.py does
    common = {"orientation": "item", "batch_size": batch_size, "min_item_ratings": 1 if name in SYNTHETIC else 10}
    if name in SYNTHETIC:
        users, items = ML20M_SHAPE
        ratings = planted_ratings(users, items, density=SYNTHETIC[name] / (users * items), seed=0)
        dm = RatingsDataModule.from_ratings(ratings, name=name, **common)
    else:
        root = os.environ.get("CFAE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
        dm = RatingsDataModule(dataset=name, root=root, download=False, **common)
    dm.setup()
    timer = EpochTimer()
    model = AutoRec(n_inputs=dm.n_cols, hidden_size=500,
                    optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, fused=True))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], accelerator="cpu",
                        precision=precision("cpu"))
    trainer.fit(model, datamodule=dm)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return {"set": name, "ratings": int(dm.train_matrix.nnz), "rows": dm.n_rows, "cols": dm.n_cols,
            "s_per_epoch": timer.times[-1], "peak_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="ml100k,ml1m,syn5m,syn20m")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch_size)))
        return
    results = {}
    print(f"AutoRec latent 500, item rows, batch {args.batch_size}")
    for name in args.sets.split(","):
        command = [sys.executable, __file__, "--one", name, "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        r = results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:>7}: {r['ratings']:>10,} training ratings, {r['rows']:,} rows x {r['cols']:,} cols: "
              f"{r['s_per_epoch']:.2f} s per epoch, peak {r['peak_gb']:.2f} GB", flush=True)
    figures = [f"{n}_s={r['s_per_epoch']:.3f} {n}_gb={r['peak_gb']:.2f}" for n, r in results.items()]
    if "syn20m" in results and "ml1m" in results:
        over = results["syn20m"]["s_per_epoch"] / (20 * results["ml1m"]["s_per_epoch"])
        figures.append(f"syn20m_over_20x_ml1m={over:.2f}")
    print(" ".join(figures))


if __name__ == "__main__":
    main()
