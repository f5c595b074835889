#!/usr/bin/env bash
# One command for the GPU machine: build the extension, run the whole test suite with the
# CUDA tests enabled, run the CUDA op tests under compute-sanitizer (memcheck, racecheck),
# and run the benchmarks (ops, training step, single-GPU scale-out baseline). Logs and JSON results go to OUT_DIR; benchmarks/RESULTS.md is updated and
# copied there too. Exits non-zero if any step failed (every step still runs).
#   usage: benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
deadline=$((SECONDS + 570))  # the whole check must end within 10 minutes

# step NAME TIME_LIMIT_S COMMAND...: runs COMMAND into OUT_DIR/NAME.log, stopped at its own
# limit or at the overall deadline, whichever comes first.
step() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  limit=$((limit < deadline - SECONDS ? limit : deadline - SECONDS))
  if ((limit <= 0)); then
    echo "== $name: SKIPPED, no time left before the 10-minute deadline"
    status=1
    return
  fi
  echo "== $name"
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - start)) s; last lines of $name.log:"
    tail -n 25 "$out/$name.log"
    status=1
  fi
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$out/device.txt"

# No package registry there: install what is missing from wheels carried in (gpu_wheels.sh).
if [[ -d .gpu-wheels ]]; then
  step wheels 60 "$python" -m pip install -q --no-index --find-links .gpu-wheels \
    safetensors tqdm pyyaml matplotlib pytest expecttest
fi
# The machine has no network: build in place against the torch that is there.
step build 180 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 \
  "$python" setup.py build_ext --inplace
step tests 150 env JUMPRELU_EXT_EXPECT_CUDA_BUILD=1 "$python" -m pytest tests -q -rs
# Under the sanitizer: every kernel variant (dtypes, aligned and offset vector paths, scalar
# path, l0, step, empty and NaN inputs); transposed/sliced layouts only add a copy before
# the same kernels, so they are left out to keep the time down.
cuda_op_tests=(tests/test_values.py tests/test_gradients.py tests/test_special_inputs.py
               tests/test_boundaries.py tests/test_determinism.py)
step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 97 \
  "$python" -m pytest "${cuda_op_tests[@]}" -q -x -k "cuda and not sliced and not transposed"
# The kernels use no shared memory; racecheck confirms no hazard on a smaller set.
step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 97 \
  "$python" -m pytest tests/test_boundaries.py tests/test_determinism.py -q -x -k cuda
step bench_ops 240 "$python" benchmarks/bench_ops.py --device cuda --out "$out" \
  --markdown benchmarks/RESULTS.md
step bench_train 150 "$python" benchmarks/bench_train.py --device cuda --out "$out" \
  --markdown benchmarks/RESULTS.md
# The single-GPU baseline that multi-GPU scale-out numbers are compared against.
step bench_distributed 90 "$python" benchmarks/bench_distributed.py --device cuda --world-sizes 1 --out "$out" \
  --markdown benchmarks/RESULTS.md
cp benchmarks/RESULTS.md "$out/"
exit $status
