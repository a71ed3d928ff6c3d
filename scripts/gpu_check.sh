#!/usr/bin/env bash
# The prepared check for a lent NVIDIA GPU (one call, under 8 minutes): the project's own jitted steps at the base
# preset (ViT-B/16, 224 px, 10 candidates, 64 tokens) in bfloat16, each with XLA's FLOP count, MFU against the
# data-sheet peak, the compiler's memory estimate and the allocator's real peak: stage 2a and zero-shot scoring
# alone at 16 descriptions, then beside PyTorch (autocast bf16, eager and torch.compile); the other stages as time
# allows; then the model and conversion tests on the GPU in float32 at full matmul precision (numerical parity
# with the PyTorch towers).
#
#   bash scripts/gpu_check.sh            # JSON lines to $OUT/gpu.jsonl (OUT defaults to ./gpu_out)
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see README, "Benchmarks"); the image's own
# JAX, Flax, Optax and Orbax are used when the smoke step runs with them, the carried ones otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-420}))
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # PyTorch shares the GPU in the comparisons

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/grain-* .whl/array_record-* .whl/portpicker-* .whl/ml_collections-* .whl/tensorboardx-* || exit 1
  export PYTHONPATH=/tmp/site
fi
versions='import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, "orbax", o.__version__, jax.devices())'
python3 -c "$versions"
if ! python3 -m contextblip_jax.benchmark --measure=train --preset=tiny --runs=2 >"$out/smoke.txt" 2>&1; then
  tail -5 "$out/smoke.txt"
  echo "== the image's packages fail the smoke step: using the carried flax, optax and orbax"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 \
    .whl/flax-* .whl/optax-* .whl/orbax_checkpoint-* || exit 1
  export PYTHONPATH=/tmp/site2:/tmp/site
  python3 -c "$versions"
fi

bench() {  # bench SECONDS ARGS...: one benchmark, cut at SECONDS or at the deadline, whichever comes first
  local limit=$1
  shift
  ((limit > deadline - SECONDS)) && limit=$((deadline - SECONDS))
  if ((limit < 30)); then
    echo "== skipped (time): $*"
    return
  fi
  echo "== benchmark (at most ${limit} s) $*"
  timeout "$limit" python3 -m contextblip_jax.benchmark --preset=base --dtype=bfloat16 "$@" 2>>"$out/stderr.txt" |
    tee -a "$out/gpu.jsonl" || grep -E "jax:|torch|timing|Error|error" "$out/stderr.txt" | tail -12
}
# JAX alone first (each phase's time goes to stderr.txt), then PyTorch beside it at 8 descriptions (80 images):
# the frameworks' activations share the GPU's memory. On 2026-11-27 a 300 s limit ended the first PyTorch
# comparison before it printed anything, so the costly ones come last.
bench 150 --measure=train --stage=finetune --descriptions=16 --runs=30
bench 90 --measure=eval --stage=zeroshot --descriptions=16 --runs=20
bench 200 --measure=train --stage=finetune --descriptions=8 --runs=20 --compare=torch
bench 200 --measure=eval --stage=zeroshot --descriptions=8 --runs=20 --compare=torch,torch_compile
bench 300 --measure=train --stage=finetune --descriptions=8 --runs=20 --compare=torch,torch_compile
bench 120 --measure=train --stage=context --descriptions=16 --runs=15
bench 150 --measure=train --stage=pretrain --descriptions=128 --runs=15

if ((SECONDS < deadline)); then
  echo "== parity: tests/models and tests/convert on the GPU, float32, highest matmul precision"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout $((deadline - SECONDS + 60)) \
    python3 -m pytest -q -p no:cacheprovider tests/models tests/convert 2>&1 | tail -15 | tee "$out/parity.txt"
fi
