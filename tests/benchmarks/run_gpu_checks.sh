#!/usr/bin/env bash
# Every GPU correctness check and benchmark of tide-ds, in one run of under five minutes.
#   bash tests/benchmarks/run_gpu_checks.sh        (on a machine with a CUDA GPU, from the repo root)
# Prints the correctness results, then one benchmark table; JSON results go to $TIDE_BENCH_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
export TIDE_BENCH_DIR=${TIDE_BENCH_DIR:-bench_results}
mkdir -p "$TIDE_BENCH_DIR"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
echo "== correctness on the GPU (compiled Triton kernels against float64 references)"
timeout 120 python -m pytest -q -x tests/kernels tests/losses 2>&1 | tail -n 15
echo "== benchmarks"
timeout 150 python -m pytest -q -m bench -s tests/benchmarks 2>&1 | tail -n 60
echo "== teacher load memory, replicate vs zero3 (2 ranks)"
timeout 60 python tests/benchmarks/bench_teacher_memory.py --out "$TIDE_BENCH_DIR/teacher_memory.json" 2>&1 | tail -n 6
git rev-parse HEAD > "$TIDE_BENCH_DIR/commit.txt"; date -u +%FT%TZ >> "$TIDE_BENCH_DIR/commit.txt"
