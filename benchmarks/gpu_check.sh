#!/usr/bin/env bash
# Everything the GPU machine has to prove, in one run of at most 8 minutes: build for the GPU's own
# architecture, the whole test suite with the CUDA tests enabled, compute-sanitizer on the op
# tests, the op / training-step / sparse-vs-dense step / SAELens-trainer / firing benchmarks, an ncu profile of the kernels, the trainer
# end to end on the GPU (bf16, a checkpoint and a --resume), the single-GPU scale-out baseline and
# streaming from a model (harvest, SAE steps and the two overlapped). Every step runs even when one
# fails; the exit status says whether all passed.
#
#   usage: benchmarks/gpu_check.sh OUT_DIR          on the GPU machine
#          benchmarks/gpu_check.sh OUT_DIR --dry    here: every step's command on the CPU at tiny
#                                                   sizes (no build, no sanitizer, no ncu)
#   GPU_CHECK_STEPS="build tests" benchmarks/gpu_check.sh OUT_DIR    only the steps named (a rerun
#                                                   of what failed or ran out of time)
#
# At most 8 files come back from the GPU machine, so OUT_DIR ends with four: summary.txt (this
# script's output), RESULTS.md (benchmarks/RESULTS.md with the new sections), logs.tar.gz (one
# log per step, the benchmarks' JSON lines, the trainer's metrics) and device.txt.
set -uo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry]}")
dry=0
[[ "${2:-}" == "--dry" ]] && dry=1
mkdir -p "$out/logs" "$out/results"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The package is built in place there, not installed: the benchmarks import it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
deadline=$((SECONDS + 470)) # 8 minutes, less the packing at the end
exec > >(tee "$out/summary.txt") 2>&1

# step NAME TIME_LIMIT_S COMMAND...: runs COMMAND into logs/NAME.log, stopped at its own limit or
# at the overall deadline, whichever comes first.
step() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    return
  fi
  limit=$((limit < deadline - SECONDS ? limit : deadline - SECONDS))
  if ((limit <= 0)); then
    echo "== $name: SKIPPED, no time left before the deadline"
    status=1
    return
  fi
  echo "== $name"
  if timeout "$limit" "$@" >"$out/logs/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - start)) s; last lines of $name.log:"
    tail -n 25 "$out/logs/$name.log"
    status=1
  fi
}

if ((dry)); then
  device=cpu
  sizes=(--d-in 32 --batch 64)
  test_args=(tests/test_values.py tests/test_layout.py -x -k "cpu or layout")
  firing_args=(--quick)
  ops_args=(--device cpu --quick --no-compile)
  train_args=(--d-sae 256 --precisions fp32)
  sparse_args=(--d-sae 1024 --precisions fp32 --l0 8)
  saelens_args=(--d-sae 1024 --steps 2 --warmup 1 --l0 8)
  dist_args=(--d-in 32 --d-sae 256 --batch 64 --steps 3 --warmup-steps 1)
  e2e_rows=2000
  e2e_flags=(--device cpu --d-sae 64 --batch-size 128)
  random_model_args=(--layers 2 --width 64 --heads 2)
  stream_args=(--layer 1 --tokens 8192,16384 --buffer-tokens 4096 --expansion-factor 2)
  markdown=$out/RESULTS.md # a dry run never touches the real results
  cp benchmarks/RESULTS.md "$markdown"
  echo "dry run on the CPU ($(nproc) cores), $("$python" -c 'import torch; print("torch", torch.__version__)')" |
    tee "$out/device.txt"
else
  device=cuda
  sizes=()
  test_args=(tests)
  firing_args=()
  ops_args=(--device cuda)
  train_args=(--d-sae 16384,65536)
  sparse_args=(--d-in 2304 --batch 4096 --d-sae 16384,65536,131072 --precisions fp32-tf32,bf16-autocast)
  saelens_args=(--d-sae 16384,65536)
  dist_args=(--world-sizes 1)
  e2e_rows=200000
  e2e_flags=(--device cuda --dtype bfloat16 --d-sae 16384 --batch-size 4096)
  random_model_args=()                                                      # GPT-2 small's shape
  stream_args=(--layer 6 --tokens 1048576,4194304 --rate-tokens 1048576 --expansion-factor 32) # d_sae 24576
  markdown=benchmarks/RESULTS.md
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    "$python" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    git rev-parse --short HEAD 2>/dev/null
    date -Is
  } | tee "$out/device.txt"
  # No package registry there: install what is missing from wheels carried in (gpu_wheels.sh).
  if [[ -d .gpu-wheels ]]; then
    step wheels 60 "$python" -m pip install -q --no-index --find-links .gpu-wheels \
      safetensors tqdm pyyaml matplotlib pytest expecttest
  fi
  # The machine's own architecture, e.g. 9.0 for an H100 or H200.
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
  step build 180 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" FORCE_CUDA=1 \
    "$python" setup.py build_ext --inplace
fi

step tests 150 env JUMPRELU_EXT_EXPECT_CUDA_BUILD=$((1 - dry)) "$python" -m pytest -q -rs "${test_args[@]}"

# Under the sanitizer: every kernel variant (dtypes, aligned and offset vector paths, scalar
# path, l0, step, ste_to_input, empty and NaN inputs); transposed/sliced layouts only add a copy
# before the same kernels, so they are left out to keep the time down.
cuda_op_tests=(tests/test_values.py tests/test_gradients.py tests/test_special_inputs.py
  tests/test_boundaries.py tests/test_determinism.py tests/test_op_fire_counts.py
  tests/test_sparse_kernels.py tests/test_sparse_step.py)
if ((!dry)); then
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 97 \
    "$python" -m pytest "${cuda_op_tests[@]}" -q -x -k "cuda and not sliced and not transposed"
  step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 97 \
    "$python" -m pytest tests/test_boundaries.py tests/test_determinism.py tests/test_op_fire_counts.py \
    tests/test_sparse_kernels.py -q -x -k cuda
fi

step bench_ops 150 "$python" benchmarks/bench_ops.py "${ops_args[@]}" --out "$out/results" --markdown "$markdown"
step bench_train 90 "$python" benchmarks/bench_train.py --device "$device" "${sizes[@]}" "${train_args[@]}" \
  --out "$out/results" --markdown "$markdown"
# The sparse step against the dense one (docs/ops.md#the-sparse-step), each in a process of its own.
step bench_sparse_step 150 "$python" benchmarks/bench_train.py --compare sparse --device "$device" "${sizes[@]}" \
  "${sparse_args[@]}" --out "$out/results" --markdown "$markdown"
# SAELens's SAETrainer with its JumpReLU SAE against ours (jumprelu_ext.saelens): only where sae-lens
# is installed (it is not among the wheels carried there; it needs about 60 packages).
if "$python" -c "import sae_lens" 2>/dev/null; then
  step bench_saelens 90 "$python" benchmarks/bench_saelens.py --device "$device" "${sizes[@]}" "${saelens_args[@]}" \
    --out "$out/results" --markdown "$markdown"
else
  echo "== bench_saelens: SKIPPED, sae-lens is not installed there"
fi
step bench_firing 45 "$python" benchmarks/bench_firing.py --device "$device" --rounds 9 "${firing_args[@]}" \
  --out "$out/results" --markdown "$markdown"
if ((!dry)); then
  # A few key metrics per kernel: what limits it when a bandwidth target is missed.
  step ncu 60 ncu --target-processes all -k regex:jumprelu \
    --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,sm__inst_issued.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
    "$python" benchmarks/profile_ops.py --device cuda
fi

# The trainer as a user runs it: activations made here, a checkpoint, a stop, a --resume.
"$python" -c "import numpy as np; np.save('$out/acts.npy', np.random.default_rng(0).normal(size=($e2e_rows, 256)).astype('float32'))"
e2e=(-m jumprelu_ext.train --activations "$out/acts.npy" --out "$out/results/e2e" "${e2e_flags[@]}"
  --log-every 20 --checkpoint-every 40 --lr-warmup-steps 20 --sparsity-warmup-steps 40 --l0-coefficient 1e-3)
step train_first_half 60 "$python" "${e2e[@]}" --steps 40
step train_resumed 60 "$python" "${e2e[@]}" --steps 80 --resume
rm -f "$out/acts.npy" "$out/results/e2e/checkpoint.pt" "$out/results/e2e/sae_weights.safetensors"
step bench_distributed 90 "$python" benchmarks/bench_distributed.py --device "$device" "${dist_args[@]}" \
  --out "$out/results" --markdown "$markdown"

# Streaming from a model: the harvest alone, the SAE alone and the two overlapped (on CUDA the
# producer harvests on a stream of its own), and memory against training tokens. No weights
# there, so a randomly initialised GPT-2: its forward costs what a trained one's does.
step random_model 60 "$python" benchmarks/random_model.py "$out/gpt2-random" "${random_model_args[@]}"
step bench_stream 150 "$python" benchmarks/bench_stream.py --device "$device" --model "$out/gpt2-random" \
  "${stream_args[@]}" --out "$out/results"
rm -rf "$out/gpt2-random"

if ((!dry)); then cp benchmarks/RESULTS.md "$out/RESULTS.md"; fi
tar czf "$out/logs.tar.gz" -C "$out" logs results && rm -rf "$out/logs" "$out/results"
verdict="all steps passed"
((status)) && verdict="some steps FAILED"
echo "== done: $verdict; files in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
