#!/usr/bin/env bash
# make gpu-check on a GPU machine that has torch, Lightning and the rest but not hydra-core, omegaconf and
# antlr4-python3-runtime, and no network: their pure-Python wheels travel in .whl/ (made on a machine with
# network by `pip download` / `pip wheel`, see README "Performance") and go to /tmp/site.
#   bash experiments/gpu_check/device.sh OUT_DIR [more gpu_check arguments]      (from the repository root)
set -euo pipefail
OUT="${1:-${OUT:-outputs/gpu_check}}"
shift || true
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 -m experiments.gpu_check --device cuda --out "$OUT" "$@"
