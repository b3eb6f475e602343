"""How much a training run slows when other processes keep the machine's cores busy, by thread setting.

    CFAE_DATA_DIR=../shared/data python benchmarks/shared_machine.py [--busy 2] [--epochs 6] [--data ml1m]

Runs `train.py logger=none trainer.max_epochs=E patience=100` (ML-1M AutoRec by default) alone, then beside
`--busy` processes that each keep one core busy (a Python loop), once per setting: `threads` left to its
settings: libgomp's own (idle OpenMP threads spin 300,000 rounds before they sleep), cfae's (10,000),
`threads=1`, 1,000 rounds, and no spinning at all (`OMP_WAIT_POLICY=PASSIVE`). Each figure is the sum of the
epochs' seconds after the first, as the run's own epoch lines give them (start-up and data loading left
out), the least of `--repeats` runs. The last line gives each setting's
slowdown, busy over alone. A run that lost only its share of the CPU would slow by about 2x beside two
busy processes on two cores (its threads get half the CPU time), less where its threads do not scale.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"epoch (\d+)/\d+: .*\(([\d.]+) s\)")
SETTINGS = {  # name: (overrides, environment); GOMP_SPINCOUNT is libgomp's, torch's OpenMP on Linux
    "libgomp": ([], {"GOMP_SPINCOUNT": "300000"}),  # libgomp's own default
    "cfae": ([], {}),  # cfae's command lines: GOMP_SPINCOUNT=10000 (cfae.processes.openmp_spins_briefly)
    "threads=1": (["threads=1"], {}),
    "spin 1000": ([], {"GOMP_SPINCOUNT": "1000"}),
    "passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def epoch_seconds(data: str, epochs: int, overrides: list[str], env: dict[str, str]) -> float:
    """The run's epochs after the first, in seconds, summed."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data={data}", "logger=none",
                               f"trainer.max_epochs={epochs}", "patience=100", "trainer.enable_progress_bar=false",
                               f"output_dir={folder}/out", f"hydra.run.dir={folder}", *overrides],
                              cwd=folder, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    times = [float(s) for n, s in EPOCH.findall(done.stdout + done.stderr) if int(n) > 1]
    if len(times) != epochs - 1:
        raise RuntimeError(f"expected {epochs - 1} epoch lines after the first, found {len(times)}")
    return sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="processes keeping one core busy each")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data", default="ml1m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"some of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from cfae.processes import machine

    print(f"{machine()}, {date.today()}: {args.data} AutoRec, epochs 2-{args.epochs}, seconds, "
          f"least of {args.repeats}")
    results: dict[str, dict[str, float]] = {}
    for load in ("alone", f"beside {args.busy} busy"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in
                range(args.busy if load != "alone" else 0)]
        try:
            for name in args.settings.split(","):
                overrides, env = SETTINGS[name]
                results.setdefault(name, {})[load] = min(epoch_seconds(args.data, args.epochs, overrides, env)
                                                         for _ in range(args.repeats))
                print(f"  {name:<13} {load:<16} {results[name][load]:6.2f} s", flush=True)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    busy = f"beside {args.busy} busy"
    print(" ".join(f"{name.replace(' ', '_').replace('=', '')}_slowdown={r[busy] / r['alone']:.2f}"
                   for name, r in results.items()))


if __name__ == "__main__":
    main()
