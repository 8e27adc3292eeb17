#!/usr/bin/env bash
# The backbone study: unet_tiny against two DiTs at matched training FLOPs per image (match.py), each trained
# for 30 minutes of one core on Hoda digits at 32x32 with the hoda32_uncond recipe (v-prediction, sigmoid
# schedule shifted by -3 in log SNR, class-balanced draws, batch 64, lr 1e-3, EMA 0.999), then scored on 2,000
# samples each (classifier-feature FID, class histogram, sampling images/s; Heun 18 steps, S_churn=2) with a
# 100-sample grid; report.py writes results.md and results.json beside this script. About 1.5 hours on a
# 2-core CPU (two trainings at a time, one thread each).
#   bash experiments/backbones/run.sh /path/to/hoda
# The digit classifier must exist: python -m diffusion_lab.metrics.train_classifier dataset=persian dataset.root=...
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:?usage: run.sh /path/to/hoda}"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/backbones}
SAMPLER=(sampler=heun sampler.steps=18 sampler.S_churn=2)
mkdir -p "$OUT"
$PY -m experiments.backbones.match --out "$OUT/flops.json"   # exits non-zero unless matched within 5%
train() {  # name
    # shellcheck disable=SC2046  # the overrides are separate words
    $PY train.py experiment=hoda32_uncond dataset.root="$ROOT" threads=1 paths.log_dir="$OUT/$1" \
        $($PY -m experiments.backbones.match --overrides "$1")
}
score() {  # name
    local ckpt; ckpt=$(ls -t "$OUT/$1"/hoda32_uncond/runs/*/checkpoints/last.ckpt | head -1)
    $PY -m diffusion_lab.evaluate ckpt="$ckpt" n=2000 metrics=[fid_classifier,class_histogram] \
        data_root="$ROOT" out="$OUT/$1.eval.json" "${SAMPLER[@]}"
    $PY -m diffusion_lab.sample ckpt="$ckpt" n=100 out="$OUT/$1.samples" "${SAMPLER[@]}"
}
train unet_tiny & train dit_p4 &
wait
score unet_tiny & train dit_p2 &
wait
score dit_p4 & score dit_p2 &
wait
$PY -m experiments.backbones.report "$OUT"
