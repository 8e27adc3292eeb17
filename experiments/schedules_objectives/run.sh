#!/usr/bin/env bash
# The schedules x objectives study: 12 runs of the same small U-Net on Hoda digits at 32x32, one after another.
#   bash experiments/schedules_objectives/run.sh /path/to/hoda [extra overrides...]
# then: python -m experiments.schedules_objectives.report <the multirun folder it prints>
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:?usage: run.sh /path/to/hoda [overrides...]}"; shift || true
.venv/bin/python train.py -m experiment=schedules_objectives dataset.root="$ROOT" \
    schedule=linear,cosine,sigmoid objective=eps,v,hybrid,vlb "$@"
