#!/usr/bin/env bash
# The families study's trainings: every model 1,500 optimizer steps (a budget in steps, so that the load on the
# machine cannot change the comparison), unet_tiny, batch 64, lr 1e-3, EMA 0.999, class-balanced Hoda digits at
# 32 px, one core each, two trainings at a time (two queues).
#   bash experiments/families/train.sh DATA_ROOT OUT_DIR [STEPS]
# Each run goes to OUT_DIR/<model> (checkpoints/last.ckpt), its log to OUT_DIR/<model>.log; the wall time of each
# training to OUT_DIR/<model>.time. `flow` also keeps post-hoc EMA snapshots every 100 steps (sigma_rel 0.05 and
# 0.10) and a checkpoint every 250 steps (guides for autoguidance), for the EMA and autoguidance study.
set -u
data=${1:?data root (Hoda digits)}
out=${2:?output directory}
steps=${3:-1500}
py=${PYTHON:-python}
mkdir -p "$out"
common=(trainer.max_steps="$steps" trainer.max_time=null threads=1 dataset.root="$data"
        dataset.balance_classes=true logger=csv)

run() {  # run NAME OVERRIDES...
    local name=$1; shift
    [ -f "$out/$name/checkpoints/last.ckpt" ] && [ -f "$out/$name.time" ] && return 0
    local t0=$SECONDS
    OMP_NUM_THREADS=1 "$py" train.py "$@" "${common[@]}" hydra.run.dir="$out/$name" task_name="fam_$name" \
        > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall_s=$((SECONDS - t0))" > "$out/$name.time"
}

queue_a() {
    run ddpm experiment=hoda32_uncond
    run flow experiment=flow_hoda32 callbacks=phema callbacks.phema.every_n_steps=100 \
        callbacks.model_checkpoint.save_top_k=-1 callbacks.model_checkpoint.every_n_train_steps=250 \
        '+callbacks.model_checkpoint.filename="step{step:05d}"' \
        +callbacks.model_checkpoint.auto_insert_metric_name=false
    run flow_ot experiment=flow_hoda32 objective.coupling=ot
}
queue_b() {
    run edm experiment=edm_hoda32
    run sit_gvp experiment=flow_hoda32 objective=interpolant objective.path=gvp
    run flow_uniform experiment=flow_hoda32 objective.time_density=uniform
}
queue_a & queue_b & wait
