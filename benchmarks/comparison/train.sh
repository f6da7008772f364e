#!/bin/bash
# Trains every method of the ShapeWorld comparison (docs/comparison.md) on the shipped base, in sequence, into
# runs/comparison/<method> (a finished run, marked by its DONE record of seconds and command, is skipped):
# the fine-tuning methods on 8 held-out two-colour subjects (runs/comparison/concepts), then the adapters at
# the budgets of the earlier issues (4000 steps x batch 8 on 16000 examples; RealCustom 3000). About 75 min
# on 2 CPU cores. Then: python -m customjax.evaluate --out docs/comparison
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=runs/comparison
C=$W/concepts
mkdir -p $W
[ -d $C ] || $PY -c "from customjax.shapeworld.benchmark.comparison import write_subjects as w; w('$C', 8)"
run() { name=$1; shift; if [ -e $W/$name/DONE ]; then echo "$name: done before"; return; fi
  s=$(date +%s); "$@" > $W/$name.log 2>&1 || { echo "$name failed (log $W/$name.log)"; return; }
  echo "{\"seconds\": $(( $(date +%s) - s )), \"command\": \"$*\"}" > $W/$name/DONE; echo "$name: $(( $(date +%s) - s )) s"; }
for m in dreambooth custom_diffusion contrastive_inversion textual_inversion clif; do
  run $m $PY -m customjax.finetune --config configs/$m.py:shapeworld --concepts $C --workdir $W/$m --config.train.preview_every=0
done
A="--config.train.steps=4000 --config.data.examples=16000 --config.train.preview_every=0"
run realcustompp $PY -m customjax.train --config configs/realcustompp.py:shapeworld --workdir $W/realcustompp $A
run ip_adapter $PY -m customjax.train --config configs/ip_adapter.py:shapeworld --workdir $W/ip_adapter $A
run customcontrast $PY -m customjax.train --config configs/customcontrast.py:shapeworld --workdir $W/customcontrast $A
run realcustom $PY -m customjax.train --config configs/realcustom.py:shapeworld --workdir $W/realcustom \
  --config.train.steps=3000 --config.data.examples=16000 --config.train.preview_every=0
