#!/usr/bin/env bash
# One call on a single-GPU host: the GPU runs that a CPU cannot make, with everything worth keeping written
# to $OUT (default out/). JOBS picks them, in order (default "base bench"):
#   base   the ShapeWorld base model's gpu preset (python -m customjax.shapeworld.pretrain ...:gpu) into $WORK
#          (default runs/base_gpu), then its held-out evaluation; $OUT gets the model folder, shapeworld.json,
#          the sample grid and the log. Stopped after $BASE_BUDGET seconds (default 480), it leaves in
#          $OUT/base_workdir.tgz what a second call resumes from (finished stages, the running stage's
#          snapshot, saved every 500 steps): unpack it into $WORK before that call.
#   bench  SD-1.5-shaped RealCustom++ train-step throughput and MFU in bfloat16 (benchmarks/train_step.py;
#          BENCH_ARGS replaces its arguments); $OUT gets its JSON and log.
# Dependencies missing from the host image come from build/devdeps (launch/offline_deps.sh).
#   PRESET=test JOBS=base bash launch/gpu_check.sh     # the same path with micro models, on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PY=${PY:-python3}
PRESET=${PRESET:-gpu}
WORK=${WORK:-runs/base_$PRESET}
mkdir -p "$OUT" "$WORK"
[ -d build/devdeps ] && export PYTHONPATH="$PWD/build/devdeps${PYTHONPATH:+:$PYTHONPATH}"
status=0
{ nvidia-smi 2>/dev/null || true; $PY -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"; } \
  > "$OUT/host.txt" 2>&1 || { cat "$OUT/host.txt"; exit 1; }
for job in ${JOBS:-base bench}; do
  t0=$(date +%s)
  case $job in
    base)
      timeout "${BASE_BUDGET:-480}" $PY -m customjax.shapeworld.pretrain --config "configs/shapeworld_base.py:$PRESET" \
        --workdir "$WORK" > "$OUT/base.log" 2>&1
      rc=$?
      if [ -f "$WORK/model/shapeworld.json" ] && [ $rc -eq 0 ]; then
        cp -r "$WORK/model" "$OUT/base_model" && cp "$WORK/samples.png" "$OUT/base_samples.png"
      else
        status=1
      fi
      # what a second call needs to go on (stages/ and snapshots), and the metrics so far
      tar -czf "$OUT/base_workdir.tgz" -C "$WORK" --exclude=model . ;;
    bench)
      $PY benchmarks/train_step.py ${BENCH_ARGS:---config configs/realcustompp.py:sd15 --full --batch 8 --dtype bfloat16} \
        --out "$OUT/train_step.json" > "$OUT/bench.log" 2>&1
      rc=$? ;;
    *) echo "unknown job $job (base, bench)"; exit 2 ;;
  esac
  echo "$job: exit $rc, $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || { status=1; tail -c 2000 "$OUT/$job.log"; }
done
exit $status
