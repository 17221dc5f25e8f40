#!/usr/bin/env bash
# Wheels a bare GPU image lacks, for tests/benchmarks/run_gpu_checks.sh (which installs .whl/*.whl itself).
#   bash tools/gpu/fetch_wheels.sh [PYTHON_VERSION=3.12]      (here, where pip reaches the package index)
# The image has torch, triton, transformers, safetensors, numpy, psutil, tqdm, msgpack, einops, ninja and
# py-cpuinfo; DeepSpeed ships only a source archive, so it is built here into a pure-Python wheel (no ops),
# and its pure-Python needs are downloaded for the image's Python at the versions of this environment. The
# benchmark peers (Liger-Kernel, Apple's Cut Cross-Entropy: pure-Python Triton wheels) come at pinned versions.
# Writes .whl/ in the repo root (ignored by git, about 5 MiB): name it in the device tool's carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
pyver=${1:-3.12}
py=${PYTHON:-python}
mkdir -p .whl
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pins=()
for name in hjson pydantic pydantic_core annotated_types typing_inspection; do
    pins+=("$name==$(version "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
"$py" -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -la .whl
