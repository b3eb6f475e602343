#!/usr/bin/env bash
# cfae on one CUDA GPU, every figure printed, in about 8 minutes:
#
#   CFAE_DATA_DIR=../shared/data benchmarks/gpu_check.sh          # add --study for the 80:20 study as well
#
# 1. the CUDA tests (tests/test_cuda.py): every model trains on the GPU to the CPU's accuracy, the training
#    matrix is held there, bf16 mixed precision costs no accuracy;
# 2. benchmarks/epoch_time.py on the GPU: seconds per epoch against dense PyTorch loops, and the floor;
# 3. benchmarks/time_to_accuracy.py, one repeat: cfae against Surprise's SVD (which runs on the CPU);
# 4. the quick study variant (ML-100K, folds 0 and 1, 2 epochs) and its report;
# 5. with --study, the 80:20 rows of conf/study.yaml on five folds (not the 300-epoch study_* rows) and the
#    figures' runs, then its report.
# Each step prints its wall time; the runs go to a throwaway MLflow store, the reports to $OUT or a temporary
# folder. Stops at the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
work=$(mktemp -d)
out=${OUT:-$work}
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"

"$python" - <<'EOF'
import sys
import torch
from cfae.processes import machine
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU here ({machine()})")
print(f"{machine()}; torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

step() {
  local name=$1 start=$SECONDS
  shift
  echo; echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

step "CUDA tests" "$python" -m pytest -q -m cuda tests/test_cuda.py
step "epoch time" "$python" benchmarks/epoch_time.py --device cuda --epochs 5
step "time to accuracy" "$python" benchmarks/time_to_accuracy.py --repeats 1
study=(-m cfae.study --output-dir "$work/outputs")
step "quick study" "$python" "${study[@]}" --name quick --folds 0,1 data=ml100k trainer.max_epochs=2
step "quick report" "$python" -m cfae.report --study quick --out "$out/quick" --no-mlflow
if [[ ${1:-} == --study ]]; then
  step "80:20 study" "$python" "${study[@]}" --only '*/80-20/*,fig*' --skip 'study_*'  # the tuned rows and the figures' runs
  step "80:20 report" "$python" -m cfae.report --study study --out "$out/study" --no-mlflow
  cat "$out/study/study.md"
fi
