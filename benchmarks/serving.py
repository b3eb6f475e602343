"""How long the served model takes to answer one request for many users' top-k lists.

    CFAE_DATA_DIR=../shared/data python benchmarks/serving.py [--users 1000] [--k 10] [overrides]

Trains a short run (`train.py trainer.max_epochs=2 <overrides>`, ML-1M by default) into a throwaway store,
starts `mlflow models serve` on its model, and times one request holding `--users` users (their ids as
MovieLens numbers them), several times. Beside it, in the same process and on the same model: the same
lists computed in one batched product (what the server runs, `Recommender.recommend_many`) and one user at
a time (the reference), with their ratio. Prints the machine and date first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

from common import quiet_benchmark, scratch_run

from cfae.processes import machine
from cfae.recommender import Recommender
from cfae.train import fit

REPEATS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_seconds(model: Path, users: list[int], k: int) -> list[float]:
    """Seconds of each of REPEATS requests for `users`' top k, after one to warm up."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager",
                               "local", "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    body = json.dumps({"dataframe_records": [{"user_id": u} for u in users], "params": {"k": k}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow models serve did not start") from None
                time.sleep(0.5)
        times = []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
            times.append(time.perf_counter() - start)
        assert len(answer) == len(users) * k, len(answer)
        return times[1:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def in_process_seconds(rec: Recommender, users: list[int], k: int) -> tuple[list[float], list[float]]:
    """Seconds of REPEATS batched answers and of REPEATS answers one user at a time, after a warm-up each."""
    batched, one_by_one = [], []
    for times, answer in ((batched, lambda: rec.recommend_many(users, k)),
                          (one_by_one, lambda: [rec.recommend(u, k) for u in users])):
        answer()
        for _ in range(REPEATS):
            start = time.perf_counter()
            answer()
            times.append(time.perf_counter() - start)
    return batched, one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. data=ml100k")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_intermixed_args()
    quiet_benchmark()
    os.environ.setdefault("CFAE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as store:
        cfg = scratch_run(Path(store), "trainer.max_epochs=2", *args.overrides)
        trained = fit(cfg)
        rec = Recommender.from_fit(trained.model, trained.datamodule)
        users = [int(u) for u in trained.datamodule.user_ids[:args.users]]
        print(f"{machine()}, {date.today()}: {len(users)} users x k={args.k}, train.py {' '.join(args.overrides)} "
              f"({cfg.data.dataset}, {trained.datamodule.n_rows} x {trained.datamodule.n_cols} "
              f"{cfg.data.orientation} rows), median of {REPEATS}", flush=True)
        batched, one_by_one = in_process_seconds(rec, users, args.k)
        served = served_seconds(Path(cfg.output_dir) / "model", users, args.k)
    b, o, s = (statistics.median(t) for t in (batched, one_by_one, served))
    print(f"in process, batched:        {b:.3f} s")
    print(f"in process, one at a time:  {o:.3f} s  ({o / b:.1f}x the batched time)")
    print(f"served (HTTP, one request): {s:.3f} s  (target < 2 s)")


if __name__ == "__main__":
    main()
