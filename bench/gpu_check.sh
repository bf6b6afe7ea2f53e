#!/bin/bash
# First GPU check of the CUDA backend, written without a GPU (issue 5; every CUDA test skips on
# the development machine). Run it from the repository root on the GPU machine, e.g. through the
# device tool: `bash bench/gpu_check.sh` with $OUT set. Under about 4 minutes on an H200: build
# the needed targets, every CUDA test (kernels, backward, training update, runtime), memcheck
# on the runtime test, and
# trove bench --device cuda at the background config (D 2048, h 4, k 8, dk 64, int4,
# batch 2048, zipf:1.09) at N = 262K and 1M, without and with a device tier.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/cmake.log" 2>&1
cmake --build build-gpu -j16 --target trove cuda_runtime_test cuda_peer_test cli_forward_test \
  cuda_test cuda_train_test cuda_peer_backward_test \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
( cd build-gpu && ./tests/cuda_test; ./tests/cuda_train_test; ./tests/cuda_peer_backward_test;
  ./tests/cuda_runtime_test; ./tests/cuda_peer_test;
  ./tests/cli_forward_test --gtest_filter='*Device*:*Vram*' ) > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E '^\[  (PASSED|FAILED|SKIPPED)' "$OUT/tests.log"
timeout 90 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
  build-gpu/tests/cuda_runtime_test --gtest_filter='CudaRuntimeDevice.Routed*:CudaRuntimeDevice.Vram*' \
  > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
B="build-gpu/trove --json bench --device cuda --experts 262144,1M --batch 2048 --routing zipf:1.09
   --host 100% --batches 12 --warmup 4 --calibrate-seconds 0.5 --no-fio --store /tmp/tb"
timeout 100 $B > "$OUT/bench_cuda_copy.json" 2> "$OUT/bench_cuda_copy.err"; echo "bench copy rc=$?"
timeout 100 $B --vram 16GiB > "$OUT/bench_cuda_vram.json" 2> "$OUT/bench_cuda_vram.err"
echo "bench vram rc=$?"
