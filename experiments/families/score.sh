#!/usr/bin/env bash
# Score the families study's checkpoints (train.sh) with two workers, one core each, pulling jobs in order from
# one list so that both cores stay busy; each job resumes where an earlier run of it stopped.
#   bash experiments/families/score.sh DATA_ROOT RUNS_DIR [JOB...]
# Default jobs: the order of the study (quality first, then likelihood, straight paths, 5,000-sample runs).
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
          "best ddpm" "best edm" "best flow" "best sit_gvp" "best flow_ot" "quality_heun flow_uniform")
fi
queue=$(mktemp); printf '%s\n' "${jobs[@]}" > "$queue"
mkdir -p "$runs/score_logs"

worker() {
    while true; do
        job=$(flock "$queue" sh -c 'head -n1 "$1"; sed -i 1d "$1"' _ "$queue")
        [ -z "$job" ] && return 0
        set -- $job
        extra=()
        [ "$1" = quality_heun ] && { set -- quality "$2"; extra=(--samplers heun); }
        t0=$SECONDS
        OMP_NUM_THREADS=1 "$py" -m experiments.families.study "$1" --model "$(ck "$2")" --data-root "$data" \
            --threads 1 "${extra[@]}" >> "$runs/score_logs/$1_$2.log" 2>&1
        echo "$1 $2 rc=$? wall_s=$((SECONDS - t0))" >> "$runs/score_logs/jobs.txt"
    done
}
worker & worker & wait
rm -f "$queue"
