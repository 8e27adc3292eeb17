#!/usr/bin/env bash
# The EMA / autoguidance / DiT study's own trainings, beside the families study's `flow` run (which keeps the
# post-hoc EMA snapshots and the step-250 checkpoints this study reads; experiments/families/train.sh):
#   flow_dit:   flow_hoda32 with the patch-2 DiT at unet_tiny's training FLOPs per image
#               (experiments/backbones/match.py: width 64, depth 3, 4 heads), 1,500 steps;
#   flow_small: the autoguidance guide "smaller and shorter" (Karras et al. 2024, Sec. 3): unet_tiny at half
#               the width (8 base channels), 500 steps.
#   bash experiments/edm2_dit/train.sh DATA_ROOT OUT_DIR
# Same recipe as the families study (batch 64, lr 1e-3, EMA 0.999, class-balanced Hoda digits at 32 px, one core
# each). With WAIT_FOR=NAME[,NAME] each queue first waits for OUT_DIR/NAME.time (the families queues), so that
# no more than two trainings run at a time.
set -u
data=${1:?data root (Hoda digits)}
out=${2:?output directory}
py=${PYTHON:-python}
mkdir -p "$out"

run() {  # run NAME STEPS OVERRIDES...
    local name=$1 steps=$2; shift 2
    [ -f "$out/$name/checkpoints/last.ckpt" ] && [ -f "$out/$name.time" ] && return 0
    local t0=$SECONDS
    OMP_NUM_THREADS=1 "$py" train.py experiment=flow_hoda32 "$@" trainer.max_steps="$steps" trainer.max_time=null \
        threads=1 dataset.root="$data" dataset.balance_classes=true logger=csv \
        hydra.run.dir="$out/$name" task_name="edm2_$name" > "$out/$name.log" 2>&1
    echo "$name rc=$? wall_s=$((SECONDS - t0))" > "$out/$name.time"
}
wait_for() { [ -z "$1" ] && return 0; until [ -f "$out/$1.time" ]; do sleep 20; done; }

IFS=, read -r wait_a wait_b <<< "${WAIT_FOR:-,}"
(wait_for "$wait_a"; run flow_dit 1500 model=dit_tiny2 model.hidden_size=64 model.depth=3) &
(wait_for "$wait_b"; run flow_small 500 model.channels=8) &
wait
