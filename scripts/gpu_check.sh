#!/usr/bin/env bash
# The prepared check for a lent NVIDIA GPU (one call, under 8 minutes): the project's own jitted steps at the base
# preset (ViT-B/16, 224 px, 10 candidates, 64 tokens) in bfloat16, each with XLA's FLOP count, MFU against the
# data-sheet peak, the compiler's memory estimate and the allocator's real peak, stage 2a and zero-shot scoring
# beside PyTorch (autocast bf16, eager and torch.compile); then the model and conversion tests on the GPU in
# float32 at full matmul precision (numerical parity with the PyTorch towers).
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

bench() {
  if ((SECONDS > deadline)); then
    echo "== skipped (time): $*"
    return
  fi
  echo "== benchmark $*"
  timeout 300 python3 -m contextblip_jax.benchmark --preset=base --dtype=bfloat16 "$@" 2>"$out/last_stderr.txt" |
    tee -a "$out/gpu.jsonl" || tail -20 "$out/last_stderr.txt"
}
bench --measure=train --stage=finetune --descriptions=16 --runs=15 --compare=torch,torch_compile
bench --measure=eval --stage=zeroshot --descriptions=16 --runs=15 --compare=torch,torch_compile
bench --measure=train --stage=context --descriptions=16 --runs=15
bench --measure=train --stage=pretrain --descriptions=128 --runs=15

if ((SECONDS < deadline)); then
  echo "== parity: tests/models and tests/convert on the GPU, float32, highest matmul precision"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout $((deadline - SECONDS + 60)) \
    python3 -m pytest -q -p no:cacheprovider tests/models tests/convert 2>&1 | tail -15 | tee "$out/parity.txt"
fi
