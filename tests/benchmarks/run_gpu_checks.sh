#!/usr/bin/env bash
# Every GPU correctness check and benchmark of tide-ds, in one run of under five minutes.
#   bash tests/benchmarks/run_gpu_checks.sh        (on a machine with a CUDA GPU, from anywhere in the repo)
# Prints each phase, then one table of every benchmark with the issue's targets. Results, ready to commit,
# go to $TIDE_BENCH_DIR (default bench_results/): <op>.json (rows + GPU, versions, git sha, date; rewritten
# after every measurement, so a phase cut by its timeout keeps what it measured) and commit.txt.
# Each phase has its own timeout (75 + 65 + 45 + 75 + 25 + 50 s; 310 s in all, 285 s on one GPU, where the 25 s phase is
# skipped); the phases run in order
# of importance, and inside a benchmark our kernel and the headline shape are measured first.
# Works on a bare GPU image that has torch, triton and transformers but not tide-ds: the repo is put on
# PYTHONPATH (kernels/ as tide_kernels), and wheels in .whl/ (tools/gpu/fetch_wheels.sh: DeepSpeed and its
# pure-Python needs, and the peers Liger-Kernel and Cut Cross-Entropy) are installed to a temporary site; a peer
# that is missing is skipped by its benchmark, which says so; without DeepSpeed, or with one GPU, the 2-rank
# teacher-memory phase is skipped and says so.
# TIDE_BENCH_DRY_RUN=1 on a machine without a GPU checks the benchmark logic instead (tiny shapes, Triton's
# interpreter, results in a temporary directory unless TIDE_BENCH_DIR is set).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
dry=${TIDE_BENCH_DRY_RUN:-0}
# The interpreter that has torch: $PYTHON, else python, else python3 (a bare GPU image has only python3).
py=${PYTHON:-}
if [ -z "$py" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then py=$candidate; break; fi
    done
fi
[ -n "$py" ] || { echo "no python with torch on PATH; set PYTHON=/path/to/python"; exit 1; }
if [ "$dry" = "0" ]; then
    export TIDE_BENCH_DIR=${TIDE_BENCH_DIR:-bench_results}
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU (TIDE_BENCH_DRY_RUN=1 checks the logic on a CPU)'; print('GPU:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" || exit 1
else
    export TIDE_BENCH_DIR=${TIDE_BENCH_DIR:-$(mktemp -d)}
    echo "dry run on the CPU: results in $TIDE_BENCH_DIR"
fi
mkdir -p "$TIDE_BENCH_DIR"
phase() { echo "== $1 ($(($(date +%s) - start)) s)"; }

# tide-ds not installed (a bare GPU image): import it from this checkout.
if ! "$py" -c "import tide_kernels, tide_ds" 2>/dev/null; then
    shim=$(mktemp -d)
    ln -s "$PWD/kernels" "$shim/tide_kernels"
    export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "tide-ds is not installed: importing it from $PWD"
fi
if ! "$py" -c "import deepspeed, liger_kernel, cut_cross_entropy" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" && echo "installed the wheels of .whl/ to $site"
fi
export PATH="$(dirname "$(command -v "$py")"):$PATH"

if [ "$dry" = "0" ]; then
    phase "correctness on the GPU: compiled Triton kernels against float64 references, losses"
    timeout 75 "$py" -m pytest -q -x -m "not slow" -p no:cacheprovider tests/kernels tests/losses 2>&1 | tail -n 8
fi
phase "benchmark: LM-head losses (student CE + Reverse CALM fwd+bwd, CE vs Liger FLCE and CCE, teacher log-probs)"
timeout 65 "$py" -m pytest -q -m bench -s -p no:cacheprovider tests/benchmarks/test_bench_fused_head.py 2>&1 | tail -n 6
phase "benchmark: pipeline-B token divergences (fused op vs the logits path and Liger's fused linear JSD)"
timeout 45 "$py" -m pytest -q -m bench -s -p no:cacheprovider tests/benchmarks/test_bench_token_divergence.py 2>&1 | tail -n 5
phase "benchmark: BD3LM attention, L = 1024 first, then 512, 2048, 4096"
timeout 75 "$py" -m pytest -q -m bench -s -p no:cacheprovider tests/benchmarks/test_bench_bd3lm_attention.py 2>&1 | tail -n 4
if [ "$dry" = "0" ]; then
    gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
    if ! "$py" -c "import deepspeed" 2>/dev/null; then
        phase "teacher load memory: skipped, DeepSpeed is not installed (bash tools/gpu/fetch_wheels.sh here, carry .whl)"
    elif [ "$gpus" -lt 2 ]; then
        phase "teacher load memory: skipped, it needs 2 GPUs (NCCL takes one per rank) and this machine has $gpus"
    else
        phase "teacher load memory, replicate vs zero3 (2 ranks)"
        timeout 25 "$py" tests/benchmarks/bench_teacher_memory.py --out "$TIDE_BENCH_DIR/teacher_memory.json" 2>&1 | tail -n 6
    fi
    phase "deployment: student vs LLaDA2.0-mini at real-size shapes (random bf16 weights), 256 new tokens"
    timeout 50 "$py" tests/benchmarks/bench_deploy.py --scale real --repeats 1 --timeout 45 \
        --out "$TIDE_BENCH_DIR/deploy_real.json" 2>&1 | tail -n 5
fi

phase "all results"
"$py" -m tests.benchmarks.harness "$TIDE_BENCH_DIR"
{ git rev-parse HEAD 2>/dev/null || echo "no git"; git status --porcelain -- kernels tide_ds tests/benchmarks 2>/dev/null; date -u +%FT%TZ; } > "$TIDE_BENCH_DIR/commit.txt"
echo "total $(($(date +%s) - start)) s; commit with: git add $TIDE_BENCH_DIR && git commit -m 'GPU benchmark results'"
