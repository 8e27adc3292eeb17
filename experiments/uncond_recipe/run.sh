#!/usr/bin/env bash
# The unconditional-recipe search of experiments/uncond_recipe: six 30-minute runs of one core each (two at a
# time on a 2-core CPU), then the class histogram and classifier FID of each.
#   bash experiments/uncond_recipe/run.sh /path/to/hoda
# The digit classifier must exist: python -m diffusion_lab.evaluate train_classifier dataset=persian dataset.root=...
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:?usage: run.sh /path/to/hoda}"
PY=.venv/bin/python
OUT=outputs/uncond_recipe
train() {  # name, overrides...
    local name=$1; shift
    $PY train.py experiment=hoda32_uncond dataset.root="$ROOT" threads=1 paths.log_dir="$OUT/$name" "$@"
}
score() {  # name, n, extra overrides...
    local name=$1 n=$2; shift 2
    local ckpt; ckpt=$(ls -t "$OUT/$name"/hoda32_uncond/runs/*/checkpoints/last.ckpt | head -1)
    $PY -m diffusion_lab.evaluate ckpt="$ckpt" n="$n" metric_names=[fid_classifier,class_histogram] \
        data_root="$ROOT" out="$OUT/$name.n$n.json" "$@"
}
train shift1 dataset.balance_classes=false schedule.log_snr_shift=-1 &
train shift2 dataset.balance_classes=false schedule.log_snr_shift=-2 &
wait
score shift1 2000 & score shift2 2000 &
wait
train balanced_shift2 schedule.log_snr_shift=-2 &
train balanced_shift3 &            # the preset as it stands
wait
score balanced_shift2 5000 & score balanced_shift3 5000 &
wait
score balanced_shift3 1000 & score balanced_shift3 2000 sampler=ddpm sampler.steps=50 &
wait
train lr2e-3 optimizer.lr=2e-3 &
train batch32 dataset.batch_size=32 &
wait
score lr2e-3 5000 & score batch32 2000 &
wait
