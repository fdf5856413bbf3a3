#!/usr/bin/env bash
# Every GPU number of issue 16 in one run on a lent H200 (budget: under 9.5 minutes of the session's
# 15 device minutes, machine start excluded; each part has its own timeout), tables written to $OUT.
#
# 1. Here (a machine with pip and the internet), once: fetch the wheels the device lacks into .whl/
#    (ignored by git; diffusers and cache-dit are not installed there, torch 2.11 is):
#        bash benchmarks/gpu_all.sh fetch
# 2. On the device (the `run` tool), carrying .whl:
#        run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=595)
#
# What it measures (each part under its own time limit, rows written as they finish, so a part cut
# short still leaves its rows and the table is printed from them):
#   A. full-depth FLUX.1-dev shape (19 double + 38 single blocks, 3072 wide, random bf16, 1024^2 =
#      4096 image + 512 text tokens, 28 steps): uncached eager, uncached regional compile (diffusers),
#      uncached whole-graph compile (fullgraph, reduce-overhead: CUDA graphs, the honest limit),
#      MagCache with the FLUX ratios: fxcache, diffusers eager, diffusers + regional compile.
#   B. reduced depth 4 + 8 (as the 2026-11-26 table): the same uncached rows, FirstBlockCache
#      skipping nothing (t=0.08) and skipping every step after the first (t=1e6): fxcache,
#      diffusers, cache-dit DBCache F1B0 eager and + regional compile.
#   The warm-up column of A is wall time with one Inductor cache for the part (rows after the first
#   may reuse kernels of earlier rows); C is the cold compile-time table.
#   C. cold compile time at 12 blocks, a fresh process and Inductor cache per row: diffusers' regional
#      compile, fxcache MagCache with block kinds compiled once (nested_compile_region; opt-in,
#      FXCACHE_BLOCK_REGIONS=1, until this part has run on torch 2.11 with CUDA graphs) and as one
#      flat graph (the default).
#   D. (where time is left) FirstBlockCache skipping nothing, host vs cond lowering vs the uncached
#      whole graph: where its overhead goes (benchmarks/first_block_split.py).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
    for wheel in diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata==8.7.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$wheel" || exit 1
    done
    ls -l .whl
    exit 0
fi

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 CACHE_DIT_LOG_LEVEL=warning
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cold-$$   # cold compiles: the warm-up column is compile time
started=$(date +%s)
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
    python3 -c "from importlib.metadata import version; print('cache-dit', version('cache-dit'))" || echo "cache-dit missing"
    git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# A: full depth, ~4.5 minutes (each whole-graph compile of 57 blocks is the bulk)
timeout 260 python3 -m fxcache.demo.bench --double 19 --single 38 --methods mag --peers diffusers --repeats 1 \
    --json "$OUT/full_depth.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/full_depth.log"
echo "A done after $(( $(date +%s) - started )) s"

# B: reduced depth with cache-dit, ~2.5 minutes
timeout 150 python3 -m fxcache.demo.bench --double 4 --single 8 --methods fbc,fbc-forced --peers diffusers,cache-dit \
    --repeats 2 --json "$OUT/reduced_depth.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/reduced_depth.log"
echo "B done after $(( $(date +%s) - started )) s"

# C: cold compile time at 12 blocks (4 + 8), each row in a fresh process with a fresh Inductor cache:
# diffusers' regional compile, fxcache with each block kind compiled once (nested_compile_region) and
# fxcache as one flat graph, ~2.5 minutes
timeout 150 python3 benchmarks/compile_time.py --blocks 12 --device cuda --size gpu --mode reduce-overhead \
    --rows regional,fxcache --fxcache-block-regions both --json "$OUT/compile_time.jsonl" 2>&1 \
    | grep -v "^W[0-9]" | tee "$OUT/compile_time.log"
echo "C done after $(( $(date +%s) - started )) s"

# D, only where time is left: FirstBlockCache skipping nothing, host against cond lowering against the
# uncached whole graph (reduced depth, as B; B's kernels are in the shared cache), ~1.5 minutes
if (( $(date +%s) - started < 420 )); then
    timeout 110 python3 benchmarks/first_block_split.py --device cuda --size gpu --double 4 --single 8 \
        --mode reduce-overhead --rounds 3 2>&1 | grep -v "^W[0-9]" | tee "$OUT/first_block_split.log"
    echo "D done after $(( $(date +%s) - started )) s"
fi

# the tables, from the rows each part wrote (complete or cut short)
rows=$(ls "$OUT"/full_depth.rows.jsonl "$OUT"/reduced_depth.rows.jsonl 2>/dev/null)
[[ -n "$rows" ]] && python3 -m fxcache.demo.bench --table-from $rows 2>/dev/null | tee "$OUT/gpu_table.md"
echo "total $(( $(date +%s) - started )) s"
