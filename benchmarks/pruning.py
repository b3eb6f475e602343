"""Epochs a sweep spends with and without pruning, same budget, same seed, same data.

    CFAE_DATA_DIR=../shared/data python benchmarks/pruning.py [--trials 8] [--epochs 20] [--model autorec]

Runs `sweep.py -m model=MODEL hydra.sweeper.n_trials=N trainer.max_epochs=E` twice in fresh folders:
with the default median pruner and with `hydra.sweeper.pruner=null`. Epochs spent are counted from the
per-epoch reports every trial makes to its Optuna study. Last line: epochs_pruned=.. epochs_unpruned=..
ratio=.. best_pruned=.. best_unpruned=..
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(folder: Path, model: str, trials: int, epochs: int, *extra: str) -> tuple[int, float, dict, float]:
    env = {**os.environ}
    env.setdefault("CFAE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "sweep.py"), "-m", f"model={model}", f"hydra.sweeper.n_trials={trials}",
                    f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "logger=none",
                    "hydra.sweeper.study_name=bench", *extra], cwd=folder, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/mlruns/optuna.db")
    epochs_spent = sum(len(t.intermediate_values) for t in study.trials)
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    return epochs_spent, study.best_value, {k: v for k, v in states.items() if v}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="autorec")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    results = {}
    for name, extra in (("pruned", ()), ("unpruned", ("hydra.sweeper.pruner=null",))):
        with tempfile.TemporaryDirectory() as folder:
            results[name] = run_sweep(Path(folder), args.model, args.trials, args.epochs, *extra)
        spent, best, states, wall = results[name]
        print(f"{name:>9}: {spent} epochs, best val/rmse_best {best:.4f}, trials {states}, {wall:.0f} s")
    (p_epochs, p_best, *_), (u_epochs, u_best, *_) = results["pruned"], results["unpruned"]
    print(f"epochs_pruned={p_epochs} epochs_unpruned={u_epochs} ratio={p_epochs / u_epochs:.3f} "
          f"best_pruned={p_best:.4f} best_unpruned={u_best:.4f}")


if __name__ == "__main__":
    main()
