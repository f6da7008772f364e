#!/usr/bin/env bash
# Train on all GPUs of one host (one process, one mesh over the local GPUs). Run from the repository root:
#   WORKDIR=runs/rcpp MODEL=/weights/sdxl DATA=/data/laion-shards MULTIVIEW=/data/mv-shards \
#     bash launch/multi_gpu.sh [trainer flags]
# DATA: text-image ArrayRecord shards, MULTIVIEW (optional): multiview shards, both written by
# `python -m customjax.data.convert` (launch/README.md). Without MULTIVIEW the run uses
# --config.data.recipe=text_image (text-image reconstruction only, the conference version's recipe).
# CONFIG: any configs/<method>.py:VARIANT (default configs/realcustompp.py:sdxl). Extra arguments go to the
# trainer. DRY_RUN=1 prints the trainer command and exits 0 without running it. A missing variable: exit 2.
# Exit status: the trainer's (0 finished, 75 preempted after a checkpoint: run the same command again to
# resume, 65 diverged, 2 usage error).
set -euo pipefail
for var in WORKDIR MODEL DATA; do   # a usage error: exit 2, as the trainer's
  [ -n "${!var:-}" ] || { echo "launch: set ${var} (launch/README.md)" >&2; exit 2; }
done
CONFIG=${CONFIG:-configs/realcustompp.py:sdxl}
DATA_ARGS=(--config.data.text_image="${DATA}")
if [ -n "${MULTIVIEW:-}" ]; then
  DATA_ARGS+=(--config.data.multiview="${MULTIVIEW}")
else
  DATA_ARGS+=(--config.data.recipe=text_image)
  echo "launch: MULTIVIEW not set: --config.data.recipe=text_image (text-image reconstruction only, the conference" \
       "version's recipe); give MULTIVIEW (multiview shards) for the curriculum" >&2
fi
TRAIN=(python3 -m customjax.train --config "${CONFIG}" --workdir "${WORKDIR}" --config.model.path="${MODEL}"
       "${DATA_ARGS[@]}" "$@")
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then
  printf -v line '%q ' "${TRAIN[@]}"
  echo "${line% }"
  exit 0
fi
exec "${TRAIN[@]}"
