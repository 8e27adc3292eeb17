#!/usr/bin/env bash
# Bits/dim from the probability-flow ODE for each family's 30-minute Hoda preset (one core each, two at a
# time on a 2-core CPU), and the DDPM family's discrete bound on the same test digits: about 1.5 hours.
#   bash experiments/likelihood/run.sh /path/to/hoda [FLOW_EXPERIMENT]
# FLOW_EXPERIMENT: the flow-matching preset's name under conf/experiment (optional; skipped when absent).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:?usage: run.sh /path/to/hoda [FLOW_EXPERIMENT]}"
FLOW="${2:-}"
PY=.venv/bin/python
OUT=outputs/likelihood
train() {  # family, experiment, overrides...
    local family=$1 experiment=$2; shift 2
    $PY train.py experiment="$experiment" dataset.root="$ROOT" threads=1 paths.log_dir="$OUT/$family" "$@"
}
last() {  # family, experiment -> its newest last.ckpt
    ls -t "$OUT/$1/$2"/runs/*/checkpoints/last.ckpt | head -1
}
train ddpm hoda32_uncond &
train edm edm_hoda32 &
wait
CKPTS=(--ckpt "ddpm=$(last ddpm hoda32_uncond)" --ckpt "edm=$(last edm edm_hoda32)")
if [[ -n "$FLOW" ]]; then
    train flow "$FLOW"
    CKPTS+=(--ckpt "flow=$(last flow "$FLOW")")
fi
# dopri5 at rtol = atol = 1e-5, one Rademacher probe (Song et al. 2021), 256 test digits per family
$PY -m experiments.likelihood.measure "${CKPTS[@]}" --data-root "$ROOT" --n 256 --out experiments/likelihood
# the fixed-grid variant that a DDP evaluation would run (the same work on every rank)
$PY -m experiments.likelihood.measure "${CKPTS[@]}" --data-root "$ROOT" --n 256 --method heun --steps 32 \
    --out experiments/likelihood/heun32
