#!/usr/bin/env bash
# The unconditional-recipe search of experiments/uncond_recipe: ten 30-minute runs of one core each (two at a
# time on a 2-core CPU), the class histogram and classifier FID of each, and the sampler study on the
# preset's model; about 5 hours in all.
#   bash experiments/uncond_recipe/run.sh /path/to/hoda
# The digit classifier must exist: python -m diffusion_lab.metrics.train_classifier dataset=persian dataset.root=...
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
    local tag; tag=$(printf '%s' "$*" | tr -c 'A-Za-z0-9.-' '_')   # one file per sampler setting
    local ckpt; ckpt=$(ls -t "$OUT/$name"/hoda32_uncond/runs/*/checkpoints/last.ckpt | head -1)
    $PY -m diffusion_lab.evaluate ckpt="$ckpt" n="$n" metrics=[fid_classifier,class_histogram] \
        data_root="$ROOT" out="$OUT/$name.n$n${tag:+.$tag}.json" "$@"
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
# the sampler study on the preset's model (balanced_shift3), two at a time
score balanced_shift3 1000 sampler.clip_denoised=false & score balanced_shift3 1000 sampler.grid=time_uniform &
wait
score balanced_shift3 1000 sampler.steps=50 & score balanced_shift3 1000 sampler=heun &
wait
score balanced_shift3 1000 sampler=euler sampler.steps=35 sampler.S_churn=40 &
score balanced_shift3 1000 sampler=ddim sampler.steps=50 sampler.eta=1.0 &
wait
score balanced_shift3 1000 sampler=ddpm sampler.steps=50 sampler.grid=logsnr_uniform &
score balanced_shift3 1000 sampler=ddpm sampler.steps=100 &
wait
score balanced_shift3 2000 sampler=ddim sampler.steps=50 sampler.eta=0.5 & score balanced_shift3 2000 sampler=heun &
wait
for churn in 2 4 10; do score balanced_shift3 2000 sampler=heun sampler.S_churn=$churn; done
score balanced_shift3 5000 sampler=heun sampler.S_churn=2 seed=1   # the preset's sampler, fresh samples
# other trainings: cosine decay of the learning rate, lr 2e-3, shift -4; a second seed of the preset
cosine=(lr_scheduler=warmup_cosine lr_scheduler.total_steps=2150 trainer.max_steps=2150)
train cosine "${cosine[@]}" & train cosine_lr2e-3 "${cosine[@]}" optimizer.lr=2e-3 &
wait
score cosine 2000 & score cosine_lr2e-3 2000 &
wait
score cosine_lr2e-3 2000 sampler=heun & score cosine_lr2e-3 2000 sampler=heun sampler.S_churn=2 &
wait
train cosine_lr2e-3_shift4 "${cosine[@]}" optimizer.lr=2e-3 schedule.log_snr_shift=-4 & train preset_seed1 seed=1 &
wait
score cosine_lr2e-3_shift4 2000 & score preset_seed1 2000 sampler=heun sampler.S_churn=2 &
wait
