#!/usr/bin/env bash
# GPU validation of a release candidate on one machine with 2 CUDA GPUs (1 works: the NCCL parts skip).
#
#   bash benchmarks/gpu_validation.sh tests   # the op suite through the Triton and CUDA C++ kernels, GPU-only
#                                             # tests, the self-check, transformers models, NCCL context parallelism
#   bash benchmarks/gpu_validation.sh bench   # bench.py rows, CUDA C++ against Triton, the transformers example,
#                                             # context-parallel cost
#   bash benchmarks/gpu_validation.sh all     # both in one call (about 10 minutes on 2 GPUs; no NCCL parts)
#   bash benchmarks/gpu_validation.sh suite   # the op suite and GPU-only tests alone (about 6 minutes)
#   bash benchmarks/gpu_validation.sh timings # the timed runs alone (about 4 minutes)
#   bash benchmarks/gpu_validation.sh full    # every test file with --device cuda, all backends, the xdist
#                                             # workers spread over the GPUs (tests/conftest.py); about 9
#                                             # minutes on 2 H200s from a cold start, at the edge of a slot
#   bash benchmarks/gpu_validation.sh full 1/2  # the same suite in two calls: `full 1/2`, then `full 2/2`
#                                             # (pytest --shard: every other test of the run order)
#
# Logs and JSON go to $OUT (default ./gpu-results); a short summary is printed last. Each part has its own
# time limit so that a call fits a 10-minute slot. Run from the repository root; nothing is installed.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NVLink multicast stays off (shared hosts): NCCL, PyTorch symmetric memory and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
LAST=$((GPUS > 1 ? 1 : 0))

summary() {  # name, log: the log's last line (pytest's or the script's verdict), and any FAILED test ids
  printf '%-28s %s\n' "$1" "$(grep -v '^\s*$' "$2" | tail -n 1 | cut -c1-150)"
  grep -o 'FAILED tests/[^ ]*' "$2" | sort -u | head -n 20
}

environment() {
  { nvidia-smi -L; python -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)'
    python -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tail -n 1
  } > "$OUT/environment.txt" 2>&1
}

# The op suite through the backend of cuda tensors (Triton kernels, and the CUDA C++ kernels where they
# serve), split by file over the GPUs (test_causal_conv1d.py alone compiles many W = 16 kernels);
# -v so that a failure is named in the log even when the time limit cuts the run.
FIRST="tests/test_causal_conv1d.py tests/test_module.py tests/test_triton_v5.py tests/test_triton_v6.py"
SECOND="tests/test_short_conv_fused.py tests/test_update.py tests/test_validation.py tests/test_library.py
  tests/test_activation.py tests/test_varlen_states.py tests/test_fuzz.py tests/test_nan_stream_starts.py"
GPU_ONLY="tests/test_triton_gpu.py tests/test_cuda_kernels.py tests/test_cuda_btd.py tests/test_cuda_update.py
  tests/test_cuda_harness.py tests/test_cuda_mask_dtypes.py tests/test_cuda_btd_forward.py
  tests/test_final_states_absent.py tests/test_wide_filters.py tests/test_host_path.py tests/test_check.py tests/test_transformers_models.py
  tests/test_transformers_functions.py"

op_suite() {  # time limit in seconds
  CUDA_VISIBLE_DEVICES=0 timeout "$1" python -m pytest -v -p no:cacheprovider -n 16 -m triton --device cuda \
    $FIRST > "$OUT/suite-a.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$LAST timeout "$1" python -m pytest -v -p no:cacheprovider -n 10 -m triton --device cuda \
    $SECOND > "$OUT/suite-b.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$LAST timeout "$1" python -m pytest -q -p no:cacheprovider -n 4 --device cuda \
    $GPU_ONLY > "$OUT/gpu-only.log" 2>&1 &
  wait
}

suite_summary() {
  summary "op suite (a)" "$OUT/suite-a.log"
  summary "op suite (b)" "$OUT/suite-b.log"
  summary "GPU-only, check, transformers" "$OUT/gpu-only.log"
}

timings() {  # the timed runs: bench.py alone on the first GPU, the rest one after another on the other
  CUDA_VISIBLE_DEVICES=0 timeout 230 python bench.py --dtype bf16 --suite large,backward,decode,width \
    --json "$OUT/bench-bf16.json" > "$OUT/bench-bf16.log" 2>&1 &
  { CUDA_VISIBLE_DEVICES=$LAST timeout 90 python benchmarks/prototypes/cuda_vs_triton.py \
      --json "$OUT/cuda-vs-triton.json" > "$OUT/cuda-vs-triton.log" 2>&1
    CUDA_VISIBLE_DEVICES=$LAST timeout 90 python benchmarks/prototypes/cuda_vs_triton.py --channel-last \
      --json "$OUT/cuda-vs-triton-channel-last.json" > "$OUT/cuda-vs-triton-channel-last.log" 2>&1
    CUDA_VISIBLE_DEVICES=$LAST timeout 140 python examples/transformers_lfm2.py --device cuda --dtype bf16 \
      --diagnose --out "$OUT/lfm2-bf16.json" > "$OUT/lfm2-bf16.log" 2>&1
    CUDA_VISIBLE_DEVICES=$LAST timeout 40 python benchmarks/host_overhead.py --device cuda --dtype bf16 \
      > "$OUT/host-overhead.log" 2>&1; } &
  wait
}

timings_summary() {
  summary "bench.py bf16" "$OUT/bench-bf16.log"
  summary "CUDA C++ against Triton" "$OUT/cuda-vs-triton.log"
  summary "channel-last CUDA C++" "$OUT/cuda-vs-triton-channel-last.log"
  summary "transformers LFM2 bf16" "$OUT/lfm2-bf16.log"
  summary "host overhead" "$OUT/host-overhead.log"
}

suite() { environment; op_suite 330; suite_summary; }

timed() { environment; timings; timings_summary; }

all() { environment; op_suite 320; timings; suite_summary; timings_summary; }

tests() {
  environment
  op_suite 330
  timeout 200 python -m pytest -q -p no:cacheprovider --device cuda tests/test_context_parallel.py -k nccl \
    > "$OUT/cp-nccl.log" 2>&1
  suite_summary
  summary "context parallel (NCCL)" "$OUT/cp-nccl.log"
}

bench() {
  environment
  timings
  CUDA_VISIBLE_DEVICES=0 timeout 90 python -m causal_conv1d_mps.check --device cuda --json "$OUT/check.json" \
    > "$OUT/check.log" 2>&1
  if [ "$GPUS" -gt 1 ]; then
    timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py \
      --json "$OUT/cp-bench.json" > "$OUT/cp-bench.log" 2>&1
  fi
  timings_summary
  summary "self-check" "$OUT/check.log"
  [ "$GPUS" -gt 1 ] && summary "context-parallel cost" "$OUT/cp-bench.log"
}

full() {  # every test file, every backend the device runs, one pytest run spread over the GPUs; $1: a
          # shard K/N of it (optional)
  environment
  local workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
  local log="$OUT/full${1:+-${1/\//of}}.log"
  timeout "${FULL_LIMIT:-560}" python -m pytest -v -p no:cacheprovider -n "$workers" --device cuda \
    --durations=25 ${1:+--shard "$1"} tests > "$log" 2>&1
  summary "whole suite${1:+, part $1}" "$log"
}

case "${1:-}" in
  full) full "${2:-}" ;;
  suite) suite ;;
  timings) timed ;;
  tests) tests ;;
  bench) bench ;;
  all) all ;;
  *) echo "usage: $0 tests|bench|all|suite|timings|full [K/N]" >&2; exit 2 ;;
esac
