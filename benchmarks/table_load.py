"""How long a large table of ratings takes to load, and how much memory it takes on the way.

    python benchmarks/table_load.py [--rows 20000000] [--folder /tmp]

Writes a CSV of `--rows` ratings (text ids `u<k>` / `i<k>` as a shop's export has them, ratings 1..5, Unix
times; ML-20M's 138k users and 27k items), then, in a fresh process: reads it (`cfae.data.tables.read_table`)
and builds the rating matrix (`build_matrix`), printing seconds and the peak memory it took above what the
interpreter and its imports hold, beside the size of the triplets themselves (int64 user and item, float32
rating, int64 time: 28 bytes a rating) and the size of the file. The machine and date first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

MEASURE = """
import json, sys, time
from cfae.data.tables import read_table
from cfae.data.ratings import build_matrix

def memory(field):  # MiB, from Linux's account of this process
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

imports = memory("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # from here, VmHWM is the peak of what follows
start = time.perf_counter()
ratings = read_table(sys.argv[1], {"user": "user", "item": "item", "rating": "rating", "timestamp": "ts"})
read_s = time.perf_counter() - start
matrix = build_matrix(ratings, min_item_ratings=0)
total_s = time.perf_counter() - start
shape = matrix.matrix.shape
print(json.dumps({"read_s": read_s, "total_s": total_s, "peak_mb": memory("VmHWM:"), "imports_mb": imports,
                  "n_users": shape[0], "n_items": shape[1], "n_ratings": matrix.matrix.nnz}))
"""


def write_table(path: Path, n: int, n_users: int = 138_493, n_items: int = 26_744, seed: int = 0) -> None:
    """`n` distinct (user, item) ratings as a CSV with a header, in blocks (the table is never whole in memory)."""
    import pyarrow as pa
    import pyarrow.csv as pv

    rng = np.random.default_rng(seed)
    cells = np.unique(rng.integers(0, n_users * n_items, size=int(n * 1.02)))
    cells = rng.permutation(cells)[:n]
    with pv.CSVWriter(path, pa.schema([("user", pa.string()), ("item", pa.string()), ("rating", pa.int8()),
                                       ("ts", pa.int64())])) as writer:
        for start in range(0, n, 2_000_000):
            block = cells[start:start + 2_000_000]
            users, items = np.divmod(block, n_items)
            writer.write_table(pa.table({
                "user": pa.array(np.char.add("u", users.astype(str))),
                "item": pa.array(np.char.add("i", items.astype(str))),
                "rating": pa.array(rng.integers(1, 6, size=len(block)).astype(np.int8)),
                "ts": pa.array(1_100_000_000 + rng.integers(0, 400_000_000, size=len(block)))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--folder", default="/tmp")
    args = parser.parse_args()
    from cfae.processes import machine

    path = Path(args.folder) / f"cfae-ratings-{args.rows}.csv"
    print(f"{machine()}, {date.today()}: {args.rows:,} ratings, text ids", flush=True)
    if not path.is_file():
        start = time.perf_counter()
        write_table(path, args.rows)
        size = path.stat().st_size / 2**20
        print(f"wrote {path} ({size:,.0f} MiB) in {time.perf_counter() - start:.1f} s", flush=True)
    got = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                                    check=True).stdout)
    triplets = args.rows * 28 / 2**20
    print(f"read: {got['read_s']:.1f} s; read and matrix built: {got['total_s']:.1f} s "
          f"({got['n_users']:,} users x {got['n_items']:,} items, {got['n_ratings']:,} ratings)")
    held = got["peak_mb"] - got["imports_mb"]
    print(f"peak memory: {got['peak_mb']:,.0f} MiB, {held:,.0f} MiB above the interpreter and its imports "
          f"({got['imports_mb']:,.0f} MiB): {held / triplets:.1f}x the triplets ({triplets:,.0f} MiB; the file "
          f"{path.stat().st_size / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
