#!/bin/bash
# The CUDA backend's GPU check (issue 5), written without a GPU: every CUDA test skips on the
# development machine. Run from the repository root on the GPU machine through the device tool,
# carrying .deps (../shared/device/stage-deps.sh .deps), with $OUT set:
#
#   bash bench/gpu_check.sh tests   # build, every CUDA test, memcheck + racecheck   (~5 min)
#   bash bench/gpu_check.sh bench   # bench --device cuda, background config, 262K and 1M (~5 min)
#   bash bench/gpu_check.sh big     # 4M experts x 2 layers under --vram 16GiB vs resident (~5 min)
#
# Each stage builds what it needs (kept between calls while the machine stays warm), bounds
# every step by a timeout, keeps going after a failure, and leaves its logs and --json in $OUT.
# Background config (SPEC §2): D 2048, h 4, k 8, dk 64, int4 records, batch 2048, zipf:1.09.
# Every one-layer bench also runs the GPU peers (ours all-resident, bf16 gather + einsum, managed
# memory) and the expert kernel's HBM roofline; the bench stage prints their figures at the end.
set -u
STAGE=${1:-tests}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
B=build-gpu
TESTS="cuda_memory_test cuda_test cuda_train_test cuda_peer_backward_test cuda_peer_test
       cuda_runtime_test cli_forward_test calibrate_test cuda_peers_test device_peers_test
       bench_test"

build() {
  if [ ! -f $B/build.ninja ]; then
    cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DTROVE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$PWD/.deps/usr" > "$OUT/cmake.log" 2>&1 ||
      { tail -30 "$OUT/cmake.log"; exit 1; }
  fi
  # shellcheck disable=SC2086
  timeout 400 cmake --build $B -j16 --target trove "$@" > "$OUT/build-$STAGE.log" 2>&1 ||
    { tail -50 "$OUT/build-$STAGE.log"; exit 1; }
}

step() {  # step NAME SECONDS COMMAND...: one bounded step, its output in $OUT/NAME.log
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ($((SECONDS - t0)) s)"
  grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$name.log" | head -20
}

# bench NAME SECONDS ARGS...: `trove --json bench --device cuda` at the background config.
bench() {
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout "$secs" $B/trove --json bench --device cuda --dim 2048 --heads 4 --topk 8 --dim-key 64 \
    --quant int4 --batch 2048 --no-fio --calibrate-seconds 0.5 --store /tmp/tb "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "$name rc=$? ($((SECONDS - t0)) s)"
  tail -3 "$OUT/$name.err"
}

case $STAGE in
  tests)
    # shellcheck disable=SC2086
    build $TESTS
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    nvidia-smi -L
    for t in $TESTS; do
      filter='*'
      [ "$t" = cli_forward_test ] && filter='*Device*:*Vram*'
      [ "$t" = calibrate_test ] && filter='H2d*'
      [ "$t" = bench_test ] && filter='*Cuda*'
      step "$t" 120 "$B/tests/$t" --gtest_filter="$filter"
    done
    step memcheck 150 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
      $B/tests/cuda_runtime_test --gtest_filter='CudaRuntimeDevice.AllHit*:CudaRuntimeDevice.Routed*'
    step memcheck_kernels 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
      $B/tests/cuda_memory_test
    step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 \
      $B/tests/cuda_peer_test --gtest_filter='*Expert*:*Route*'
    step memcheck_peers 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
      $B/tests/cuda_peers_test --gtest_filter='CudaPeersTest.Einsum*:CudaPeersTest.Fused*'
    tail -3 "$OUT"/memcheck*.log "$OUT"/racecheck.log
    # A driver older than the toolkit makes every device test skip: that is a failure here.
    if grep -l -E 'no CUDA device|compiled but not run' "$OUT"/*_test.log; then
      echo "UNEXPECTED: device tests skipped on the GPU machine (driver vs CUDA 13? see above)"
    fi
    ;;
  bench)
    build
    # The device tier copied per batch (no --vram), then a 16 GiB tier; --h2d auto reports
    # every method's bytes/s; pk routing exercises the device-side lookup of all-hit batches.
    bench bench_262k_1m 240 --experts 262144,1M --routing zipf:1.09 --host 100% \
      --batches 16 --warmup 8
    bench bench_262k_1m_vram 240 --experts 262144,1M --routing zipf:1.09 --host 100% \
      --vram 16GiB --batches 16 --warmup 8
    bench bench_1m_pk_vram 120 --experts 1M --routing pk --host 100% --vram 16GiB \
      --batches 16 --warmup 8 --no-calibrate
    for f in "$OUT"/bench_*.json; do
      python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
print(sys.argv[1], "hbm_bandwidth", j["calibration"].get("hbm_bandwidth"))
for p in j["points"]:
    print(" ", p["experts"], p["workload"], round(p["tokens_per_second"]),
          json.dumps(p.get("device", {}).get("peers")))' "$f"
    done
    ;;
  big)
    build
    # SPEC §2's background configuration: 2 layers of 4M int4 experts (~9.7 GB each) under a
    # 16 GiB device budget (2 x 8 GiB), host tier 48 GiB (2 x 24 GiB) over the store on disk;
    # the all-resident comparison keeps both tables on the device (~19 GB, fits 80+ GB).
    df -h /tmp > "$OUT/df.txt"
    bench bench_4m_2layers 560 --experts 4M --layers 2 --routing zipf:1.09 --vram 16GiB \
      --host 48GiB --batches 16 --warmup 8
    ;;
  *)
    echo "usage: bench/gpu_check.sh tests|bench|big" >&2
    exit 2
    ;;
esac
