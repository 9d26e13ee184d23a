#!/usr/bin/env bash
# One prepared GPU check for fastdd, for a single call of at most 8 minutes on a CUDA machine:
#   build the extension (pip install --no-build-isolation -e .; the run goes on without it if that fails),
#   the gpu-marked tests, the four op benchmarks (--quick), the two end-to-end benchmarks (--quick),
#   a short Fashion-MNIST DM run + evaluation on the subset committed under benchmarks/data.
# Everything lands in $OUT/gpu_check (or benchmarks/results/gpu_check): one log per step, summary.txt,
# and copies of the benchmark CSV / Markdown files.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # here, on the CPU: every step with tiny sizes / --help
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
DEST=${OUT:-benchmarks/results}/gpu_check
RES=$DEST/results
mkdir -p "$DEST" "$RES"
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for the whole script (the call allows 480)
SUMMARY=$DEST/summary.txt
: > "$SUMMARY"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEV=cuda
[ $DRY = 1 ] && DEV=cpu

step() {  # step NAME SECONDS CMD...: run CMD with a timeout, unless the budget left is too small
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" > "$DEST/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - t0)) s, limit ${limit} s)" | tee -a "$SUMMARY"
}

{
    echo "date: $(date -u)"; echo "dry-run: $DRY"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$DEST/environment.txt" 2>&1
cat "$DEST/environment.txt"

if [ $DRY = 1 ]; then
    step build 5 $PY -c "import fastdd; print('dry-run: build skipped')"
    step tests_gpu 120 $PY -m pytest -q -m gpu --collect-only
    for b in mmd moments infonce lowrank bn_eval_stats; do step "bench_$b" 60 $PY "benchmarks/$b.py" --help; done
    step bench_dm_iteration 240 $PY benchmarks/dm_iteration.py --device cpu --quick --shape 1x28x28 --ipc 1 \
        --repeats 1 --batch-real 8 --compile off --out "$RES"
    step bench_evaluate 240 $PY benchmarks/evaluate.py --device cpu --quick --epochs 1 --models 1 --compile off \
        --data-path benchmarks/data --out "$RES"
    step bench_recover 30 $PY benchmarks/recover.py --help
    ITER=2; EPOCHS=1; MODELS=1
else
    step build 100 $PY -m pip install -q --no-build-isolation --no-deps -e .
    step tests_gpu 75 $PY -m pytest -q -m gpu -x
    for b in mmd moments infonce lowrank bn_eval_stats; do step "bench_$b" 30 $PY "benchmarks/$b.py" --device cuda --quick; done
    step bench_dm_iteration 80 $PY benchmarks/dm_iteration.py --device cuda --quick --out "$RES"
    step bench_evaluate 50 $PY benchmarks/evaluate.py --device cuda --quick --ipc 1 10 --epochs 100 --models 2 \
        --out "$RES"
    step bench_recover 90 $PY benchmarks/recover.py --device cuda --side 224 --batch 100 --repeats 10 --out "$RES"
    ITER=200; EPOCHS=300; MODELS=2
fi
step distill_dm 60 $PY -m fastdd.cli distill --method dm --dataset fashion-mnist --data-path benchmarks/data \
    --ipc 1 --iterations $ITER --batch-real 32 --seed 0 --device $DEV --out "$DEST/dm_run" --force
step evaluate_dm 60 $PY -m fastdd.cli evaluate "$DEST/dm_run" --models $MODELS --epochs $EPOCHS --seed 0 \
    --device $DEV --data-path benchmarks/data
cp benchmarks/results/*.csv benchmarks/results/*.md "$RES"/ 2>/dev/null
echo "total: $SECONDS s" | tee -a "$SUMMARY"
grep -q "rc=[1-9]" "$SUMMARY" && exit 1
exit 0
