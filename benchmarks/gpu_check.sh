#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, docs/results.md "GPU check") as a device session runs it, from
# the repository root:
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [gpu_check.py flags, e.g. --budget 200 --only identity]
#
# OUTDIR defaults to $OUT if set, else benchmarks/results/gpu_check. Writes results.json, results.md,
# children.log and gpu_check.log (this run's output) there. Python: the project's .venv if it has torch,
# else python3. If deepspeed is not importable and .whl/ holds wheels (benchmarks/gpu_check_wheels.sh
# makes them), they are installed into /tmp/gpu_check_site first. Exit status: 0 when every section
# that ran passed, 1 otherwise (the outputs are written either way).
set -u
cd "$(dirname "$0")/.." || exit 2

OUTDIR="${OUT:-benchmarks/results/gpu_check}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUTDIR="$1"; shift; fi
mkdir -p "$OUTDIR" || exit 2

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DS_BUILD_OPS=0                     # never pre-build DeepSpeed ops; the check passes torch's SGD

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then PY=.venv/bin/python; fi

{
  echo "gpu_check.sh: $(date -u +%FT%TZ) python $PY ($($PY -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  if ! $PY -c "import deepspeed" >/dev/null 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      echo "gpu_check.sh: deepspeed not importable; installing .whl/*.whl into /tmp/gpu_check_site"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl 2>&1 | tail -5
      export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "gpu_check.sh: deepspeed not importable and no .whl/ (benchmarks/gpu_check_wheels.sh): the ds_* sections will record the import error"
    fi
  fi
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY benchmarks/gpu_check.py --out "$OUTDIR" "$@"
} 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
