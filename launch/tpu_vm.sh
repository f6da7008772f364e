#!/usr/bin/env bash
# Train on every worker of a TPU VM pod slice.
#   TPU_NAME=my-v5e-32 ZONE=us-central2-b WORKDIR=gs://bucket/runs/rcpp MODEL=/mnt/weights/sdxl \
#   DATA=gs://bucket/data/laion-arrayrecord CONFIG=configs/realcustompp.py:sdxl launch/tpu_vm.sh [trainer flags]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${MODEL:?set MODEL}" "${DATA:?set DATA}"
CONFIG=${CONFIG:-configs/realcustompp.py:sdxl}
CMD="cd ~/customjax && python3 -m pip install -q -e '.[tpu]' && python3 -m customjax.train --distributed \
  --config ${CONFIG} --workdir ${WORKDIR} --config.model.path=${MODEL} --config.data.text_image=${DATA} $*"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "${CMD}"
