"""Train every model of the zoo on ML-1M fold 0 with its config's defaults and print the README table.

    CFAE_DATA_DIR=../shared/data python benchmarks/fold0_table.py [--models autorec,svd] [--table-only]

Each model is one `python train.py model=NAME` run, tracked in MLflow (the default store, or
$MLFLOW_TRACKING_URI) with the tag table=fold0; the table is read back from MLflow, the newest run
per model: model, orientation, test RMSE, epochs, fit time on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cfae.tracking import mlflow_client

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["bias", "svd", "mf", "autorec", "denoising", "deep", "deep_refeed", "deep_bn", "vae"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--table-only", action="store_true", help="print the table from runs already tracked")
    args = parser.parse_args()
    models = args.models.split(",")
    env = {**os.environ}
    env.setdefault("CFAE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if not args.table_only:
        for model in models:
            print(f"training {model} ...", flush=True)
            command = [sys.executable, str(ROOT / "train.py"), f"model={model}", "+logger.tags.table=fold0",
                       "trainer.enable_progress_bar=false"]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, experiment_id = mlflow_client()
    runs = client.search_runs([experiment_id], "tags.table = 'fold0' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    print("| model | orientation | test RMSE (fold 0) | epochs | fit time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for model in models:
        run = next((r for r in runs if r.data.tags.get("cfae.model") == model), None)
        if run is None:
            print(f"| {model} | - | not run | | |")
            continue
        m = run.data.metrics
        print(f"| {model} | {run.data.params['data/orientation']} | {m['test/rmse']:.4f} | {int(m['epochs'])} | "
              f"{m['time/fit_s']:.0f} |")


if __name__ == "__main__":
    main()
