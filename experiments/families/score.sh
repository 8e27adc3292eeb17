#!/usr/bin/env bash
# Score the families study's checkpoints (train.sh) with two workers, one core each, pulling jobs in order from
# one list so that both cores stay busy; each job resumes where an earlier run of it stopped.
#   bash experiments/families/score.sh DATA_ROOT RUNS_DIR [JOB...]
# A job is "MEASUREMENT MODEL [options of study.py]"; the default list is the study's, in its order of priority
# (quality first, then straight paths, likelihood, the 5,000-sample runs).
set -u
data=${1:?data root (Hoda digits)}
runs=${2:?the directory of train.sh}
shift 2
py=${PYTHON:-python}
ck() { echo "$1=$runs/$1/checkpoints/last.ckpt"; }
jobs=("$@")
if [ ${#jobs[@]} -eq 0 ]; then
    jobs=("quality ddpm" "likelihood flow" "quality edm" "quality flow" "quality sit_gvp" "quality flow_ot"
          "ot flow" "ot flow_ot" "likelihood ddpm" "likelihood edm" "likelihood sit_gvp" "likelihood flow_ot"
          "best ddpm" "best flow" "best edm" "quality flow_uniform --samplers heun" "best sit_gvp"
          "best flow_ot")
fi
queue=$(mktemp); printf '%s\n' "${jobs[@]}" > "$queue"
mkdir -p "$runs/score_logs"

worker() {
    while true; do
        job=$(flock "$queue" sh -c 'head -n1 "$1"; sed -i 1d "$1"' _ "$queue")
        [ -z "$job" ] && return 0
        set -- $job  # MEASUREMENT MODEL [more options of study.py]
        local what=$1 model=$2 t0=$SECONDS
        shift 2
        OMP_NUM_THREADS=1 "$py" -m experiments.families.study "$what" --model "$(ck "$model")" \
            --data-root "$data" --threads 1 "$@" >> "$runs/score_logs/${what}_$model.log" 2>&1
        echo "$what $model $* rc=$? wall_s=$((SECONDS - t0))" >> "$runs/score_logs/jobs.txt"
    done
}
worker & worker & wait
rm -f "$queue"
