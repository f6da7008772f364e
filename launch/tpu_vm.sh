#!/usr/bin/env bash
# Train on every worker of a TPU VM pod slice, from your workstation (the repo checked out on every worker at
# ~/customjax, which installs itself there with `pip install -e '.[tpu]'` before training):
#   TPU_NAME=my-v5e-32 ZONE=us-central2-b WORKDIR=gs://bucket/runs/rcpp MODEL=/mnt/bucket/weights/sdxl \
#     DATA=/mnt/bucket/data/laion-shards MULTIVIEW=/mnt/bucket/data/mv-shards bash launch/tpu_vm.sh [trainer flags]
# DATA: text-image ArrayRecord shards, MULTIVIEW (optional): multiview shards, both written by
# `python -m customjax.data.convert` (launch/README.md) and read as files on every worker (a local copy or a
# mounted bucket: the loader does not read gs:// paths). Without MULTIVIEW the run uses
# --config.data.recipe=text_image (text-image reconstruction only, the conference version's recipe).
# CONFIG: any configs/<method>.py:VARIANT (default configs/realcustompp.py:sdxl). Extra arguments go to the
# trainer. DRY_RUN=1 prints the trainer command every worker would run and exits 0 (no gcloud call). A missing
# variable or gs:// shards: exit 2.
# Exit status: gcloud's, the workers' trainer status as gcloud passes it on (0 finished, 75 preempted after a
# checkpoint: run the same command again to resume, 65 diverged, 2 usage error; 255 the ssh connection was
# lost, e.g. the slice itself was preempted). Each worker also logs `customjax: <host> trainer exit N`.
set -euo pipefail
for var in TPU_NAME ZONE WORKDIR MODEL DATA; do   # a usage error: exit 2, as the trainer's
  [ -n "${!var:-}" ] || { echo "launch: set ${var} (launch/README.md)" >&2; exit 2; }
done
CONFIG=${CONFIG:-configs/realcustompp.py:sdxl}
for shards in "${DATA}" "${MULTIVIEW:-}"; do
  case "${shards}" in
    gs://*) echo "launch: ${shards}: the loader reads shards as files; copy them to every worker or mount the" \
                 "bucket (gcsfuse) and give that path" >&2
            exit 2 ;;
  esac
done
DATA_ARGS=(--config.data.text_image="${DATA}")
if [ -n "${MULTIVIEW:-}" ]; then
  DATA_ARGS+=(--config.data.multiview="${MULTIVIEW}")
else
  DATA_ARGS+=(--config.data.recipe=text_image)
  echo "launch: MULTIVIEW not set: --config.data.recipe=text_image (text-image reconstruction only, the conference" \
       "version's recipe); give MULTIVIEW (multiview shards) for the curriculum" >&2
fi
TRAIN=(python3 -m customjax.train --distributed --config "${CONFIG}" --workdir "${WORKDIR}"
       --config.model.path="${MODEL}" "${DATA_ARGS[@]}" "$@")
printf -v line '%q ' "${TRAIN[@]}"
TRAIN_LINE=${line% }
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then
  echo "${TRAIN_LINE}"
  exit 0
fi
# The remote shell runs exactly TRAIN_LINE (quoted here, word for word) on every worker.
REMOTE="cd ~/customjax && python3 -m pip install -q -e '.[tpu]' && { ${TRAIN_LINE}; "
REMOTE+='rc=$?; echo "customjax: $(hostname) trainer exit $rc" >&2; exit $rc; }'
exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "${REMOTE}"
