#!/usr/bin/env bash
# The prepared check for a lent NVIDIA GPU (one call, under 8 minutes): the project's own jitted steps at the base
# preset (ViT-B/16, 224 px, 10 candidates, 64 tokens) in bfloat16, each with XLA's FLOP count, MFU against the
# data-sheet peak, the compiler's memory estimate and the allocator's real peak: stage 2a alone at 16
# descriptions, then scoring and stage 2a beside PyTorch (autocast bf16, eager and torch.compile); the other stages
# as time allows; then the conversion and tower tests on the GPU in float32 at full matmul precision (numerical
# parity with the PyTorch towers).
#
#   bash scripts/gpu_check.sh            # JSON lines to $OUT/gpu.jsonl (OUT defaults to ./gpu_out)
#   GPU_CHECK_PRESET=tiny GPU_CHECK_SECONDS=300 bash scripts/gpu_check.sh   # the plumbing, on any machine
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see docs/benchmarks.md); the image's own
# JAX, Flax, Optax and Orbax are used when the smoke step runs with them, the carried ones otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-420}))  # the benchmarks' share; parity comes after
preset=${GPU_CHECK_PRESET:-base}  # tiny: a dry run of the plumbing on any machine
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # PyTorch shares the GPU in the comparisons
# XLA's default GEMM autotuning can take minutes per step to compile, and `--xla_gpu_autotune_level=0` leaves
# untuned Triton GEMMs that run the steps several times slower (docs/benchmarks/gpu_h200_autotune0.jsonl). With
# Triton's GEMMs off, cuBLAS runs them untuned at full speed; that is also the program `--compile_only` predicts
# (aot.GPU_COMPILER_OPTIONS). The JAX rows record the flags (`xla_flags`); set XLA_FLAGS to override.
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/grain-* .whl/array_record-* .whl/portpicker-* .whl/ml_collections-* .whl/tensorboardx-* || exit 1
  export PYTHONPATH=/tmp/site
fi
versions='import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, "orbax", o.__version__, jax.devices())'
python3 -c "$versions"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
if ! python3 -m contextblip_jax.benchmark --measure=train --preset=tiny --runs=2 >"$out/smoke.txt" 2>&1; then
  tail -5 "$out/smoke.txt"
  echo "== the image's packages fail the smoke step: using the carried flax, optax and orbax"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 \
    .whl/flax-* .whl/optax-* .whl/orbax_checkpoint-* || exit 1
  export PYTHONPATH=/tmp/site2:/tmp/site
  python3 -c "$versions"
  python3 -m contextblip_jax.benchmark --measure=train --preset=tiny --runs=2 >"$out/smoke.txt" 2>&1 ||
    tail -5 "$out/smoke.txt"
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
  timeout "$limit" python3 -m contextblip_jax.benchmark --preset="$preset" --dtype=bfloat16 "$@" \
    2>>"$out/stderr.txt" | tee -a "$out/gpu.jsonl" || grep -E "jax:|torch|timing|Error|error" "$out/stderr.txt" | tail -12
}
# JAX alone first (the train step's MFU, real and estimated memory), then each measure beside PyTorch at 8
# descriptions (80 images: the frameworks share the GPU's memory), scoring before training because torch.compile
# of a train step is the costliest phase and a row prints only when its run ends; the other stages as time allows.
bench 160 --measure=train --stage=finetune --descriptions=16 --runs=30
bench 150 --measure=eval --stage=zeroshot --descriptions=8 --runs=20 --compare=torch,torch_compile
bench 240 --measure=train --stage=finetune --descriptions=8 --runs=20 --compare=torch,torch_compile
bench 90 --measure=eval --stage=zeroshot --descriptions=16 --runs=20
bench 120 --measure=train --stage=context --descriptions=16 --runs=15
bench 150 --measure=train --stage=pretrain --descriptions=128 --runs=15

# Parity has its own time, after the benchmarks' deadline: the conversion and tower tests that compare with PyTorch.
echo "== parity: the PyTorch-parity tests on the GPU, float32, highest matmul precision"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${GPU_CHECK_PARITY_SECONDS:-100}" \
  python3 -m pytest -q -n 4 tests/convert/test_parity.py tests/convert/test_golden.py tests/convert/test_authors.py \
  tests/models/test_blip.py tests/models/test_vit.py 2>&1 | tail -15 | tee "$out/parity.txt"
