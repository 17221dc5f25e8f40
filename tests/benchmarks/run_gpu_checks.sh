#!/usr/bin/env bash
# Every GPU correctness check and benchmark of tide-ds, in one run of under seven minutes.
#   bash tests/benchmarks/run_gpu_checks.sh        (on a machine with a CUDA GPU, from anywhere in the repo)
# Prints each phase, then one table of every benchmark with the issue's targets. Results, ready to commit,
# go to $TIDE_BENCH_DIR (default bench_results/): <op>.json (rows + GPU, versions, git sha, date; rewritten
# after every measurement, so a phase cut by its timeout keeps what it measured) and commit.txt.
# Each phase has its own timeout; together they stay under seven minutes.
# TIDE_BENCH_DRY_RUN=1 on a machine without a GPU checks the benchmark logic instead (tiny shapes, Triton's
# interpreter, results in a temporary directory unless TIDE_BENCH_DIR is set).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
dry=${TIDE_BENCH_DRY_RUN:-0}
if [ "$dry" = "0" ]; then
    export TIDE_BENCH_DIR=${TIDE_BENCH_DIR:-bench_results}
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU (TIDE_BENCH_DRY_RUN=1 checks the logic on a CPU)'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" || exit 1
else
    export TIDE_BENCH_DIR=${TIDE_BENCH_DIR:-$(mktemp -d)}
    echo "dry run on the CPU: results in $TIDE_BENCH_DIR"
fi
mkdir -p "$TIDE_BENCH_DIR"
phase() { echo "== $1 ($(($(date +%s) - start)) s)"; }

if [ "$dry" = "0" ]; then
    phase "correctness on the GPU: compiled Triton kernels against float64 references, losses"
    timeout 90 python -m pytest -q -x -m "not slow" -p no:cacheprovider tests/kernels tests/losses 2>&1 | tail -n 8
fi
phase "benchmark: LM-head losses (student CE + Reverse CALM fwd+bwd, teacher target log-probs)"
timeout 70 python -m pytest -q -m bench -s -p no:cacheprovider tests/benchmarks/test_bench_fused_head.py 2>&1 | tail -n 4
phase "benchmark: BD3LM attention, L = 512 ... 4096"
timeout 100 python -m pytest -q -m bench -s -p no:cacheprovider tests/benchmarks/test_bench_bd3lm_attention.py 2>&1 | tail -n 4
if [ "$dry" = "0" ]; then
    phase "teacher load memory, replicate vs zero3 (2 ranks)"
    timeout 35 python tests/benchmarks/bench_teacher_memory.py --out "$TIDE_BENCH_DIR/teacher_memory.json" 2>&1 | tail -n 6
fi
if [ "$dry" = "0" ]; then
    phase "deployment: student vs LLaDA2.0-mini at real-size shapes (random bf16 weights), 256 new tokens"
    timeout 120 python tests/benchmarks/bench_deploy.py --scale real --repeats 1 --timeout 110 \
        --out "$TIDE_BENCH_DIR/deploy_real.json" 2>&1 | tail -n 5
fi

phase "all results"
python -m tests.benchmarks.harness "$TIDE_BENCH_DIR"
{ git rev-parse HEAD; git status --porcelain -- kernels tide_ds tests/benchmarks; date -u +%FT%TZ; } > "$TIDE_BENCH_DIR/commit.txt"
echo "total $(($(date +%s) - start)) s; commit with: git add $TIDE_BENCH_DIR && git commit -m 'GPU benchmark results'"
