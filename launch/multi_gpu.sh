#!/usr/bin/env bash
# Train on all GPUs of one host (one process, one mesh over the local GPUs).
#   WORKDIR=runs/rcpp MODEL=/weights/sdxl DATA=/data/laion-arrayrecord launch/multi_gpu.sh [trainer flags]
set -euo pipefail
: "${WORKDIR:?set WORKDIR}" "${MODEL:?set MODEL}" "${DATA:?set DATA}"
CONFIG=${CONFIG:-configs/realcustompp.py:sdxl}
exec python3 -m customjax.train --config "${CONFIG}" --workdir "${WORKDIR}" \
  --config.model.path="${MODEL}" --config.data.text_image="${DATA}" "$@"
