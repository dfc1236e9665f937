#!/usr/bin/env bash
# ftpipe on CUDA: the GPU figures in one script, finishing within 8 minutes on one modern GPU.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # OUT_DIR (default: gpu-bench-<date>) gets one log per step
#
# Steps (each with its own time limit, so one slow step cannot eat the others' time):
#   1. environment: nvidia-smi, torch/CUDA versions, GPU count             (20 s)
#   2. extraction overhead on cuda: ftpipe extract vs bare forwards        (120 s)
#   3. head vs frozen on cuda (benchmarks/head_vs_frozen.py)                (120 s)
#   4. sweep on cuda: auto vs in-turn vs stacked (benchmarks/sweep.py)      (150 s)
#   5. streamed vs in-memory head on cuda (benchmarks/streaming.py --quick): float16 blocks
#      copied to the GPU and cast there, the budget read as device memory  (60 s)
#   6. only with >= 2 GPUs: a 2-rank torchrun extraction (nccl), then the
#      same extraction in one process, arrays compared byte for byte      (90 s)
# The limits add up to more than 8 minutes with 2 GPUs, so every step is also cut to what is left of
# BUDGET_S (default 470 s) and a step with under 10 s left is skipped (its log says so).
# Run from the repository root with the environment that has ftpipe installed (python on PATH,
# or PYTHON=/path/to/python). Nothing is downloaded; every input is generated.
set -uo pipefail

PY=${PYTHON:-python}
OUT=${1:-gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))

step() {  # step NAME SECONDS CMD...: run with a limit, keep the log, never stop the script
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped (${left}s left of the time budget)" | tee "$OUT/$name.log"
        status=1
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
    tail -n 12 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), torch.cuda.get_device_name(0))'"

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 1 ]; then
    echo "no CUDA device visible to torch: nothing to measure" >&2
    exit 2
fi

step extract_overhead 120 "$PY" benchmarks/extract_overhead.py --device cuda --n 8192 --t 64 --dim 256 --depth 6 \
    --batch-size 256 --num-workers 4 --rounds 3
step head_vs_frozen 120 "$PY" benchmarks/head_vs_frozen.py --device cuda --n 16384 --layers 6
step sweep 150 "$PY" benchmarks/sweep.py --device cuda --strategies --n 16384 --epochs 5
step streaming 60 "$PY" benchmarks/streaming.py --quick --device cuda --epochs 3

if [ "$NGPU" -ge 2 ]; then
    W="$OUT/torchrun"
    mkdir -p "$W"
    cat >"$W/make.py" <<'EOF'
# Inputs for the 2-rank check: the extract_overhead benchmark's encoder, data and checkpoint.
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import extract_overhead as eo
eo._setup(Path(sys.argv[1]), n=16384, t=64, d_in=16, dim=256, depth=6)
EOF
    cat >"$W/compare.py" <<'EOF'
import sys
from cache.reader import open_cache
a, b = (open_cache(next(__import__("pathlib").Path(p).glob("*.zarr"))) for p in sys.argv[1:3])
for s in b.arrays():
    assert a.load_numpy(s.name).tobytes() == b.load_numpy(s.name).tobytes(), s.name
print(f"2-rank and 1-process caches are byte-identical ({len(b.arrays())} arrays, {b.n_samples} samples)")
EOF
    step torchrun_setup 30 "$PY" "$W/make.py" "$W"
    # the backbone class lives in benchmarks/extract_overhead.py: its folder is on PYTHONPATH for every rank
    step torchrun_2gpu 60 env PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node 2 -m cli extract --config "$W/bench.yaml" --checkpoint "$W/model.ckpt" \
        --cache-root "$W/two" --device cuda --json
    step torchrun_1gpu 60 env PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" "$PY" -m cli extract --config "$W/bench.yaml" \
        --checkpoint "$W/model.ckpt" --cache-root "$W/one" --device cuda --json
    # on CUDA, differing batch boundaries between the two runs may change the last bits of a float16 value
    step torchrun_compare 30 "$PY" "$W/compare.py" "$W/two" "$W/one"
else
    echo "== torchrun: skipped (1 GPU; the 2-rank extraction needs 2)" | tee "$OUT/torchrun.log"
fi

echo "logs in $OUT; exit $status"
exit $status
