#!/bin/bash
# The CUDA backend's GPU check (issues 5 and 15). Run from the repository root on the GPU machine
# through the device tool, carrying .deps (../shared/device/stage-deps.sh .deps), with $OUT set:
#
#   bash bench/gpu_check.sh tests   # build, every CUDA test, memcheck + racecheck   (~5 min)
#   bash bench/gpu_check.sh bench   # bench --device cuda, background config, 262K and 1M (~5 min)
#   bash bench/gpu_check.sh big     # 4M experts x 2 layers under --vram 16GiB vs resident (~5 min)
#   bash bench/gpu_check.sh prefetch  # look-ahead from disk, --cpu-misses vs copies (~7 min)
#   bash bench/gpu_check.sh lease   # all of it in priority order until GPU_CHECK_SECONDS (540)
#
# A lease is minutes: build build-gpu here (cmake -DTROVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
# -DCMAKE_PREFIX_PATH=$PWD/.deps/usr, the targets in $TESTS and trove), carry it with .deps and
# set GPU_CHECK_PREBUILT=1: the binaries run there as built (the tests' compiled-in paths are
# reached through a /work/main link to the copy) and nothing compiles on the GPU's time.
# Each step is bounded by a timeout and by the deadline, a failure does not stop the rest, and
# every log and --json lands in $LOG, bundled into $OUT/gpu_check.tgz after each step (the device
# tool returns at most 8 files). Background config (SPEC §2): D 2048, h 4, k 8, dk 64, int4
# records, batch 2048, zipf:1.09. Every one-layer bench also runs the GPU peers (ours
# all-resident, bf16 gather + einsum, managed memory) and the expert kernel's HBM roofline.
set -u
STAGE=${1:-tests}
OUT=${OUT:-/tmp/out}
LOG=${LOG:-/tmp/gpu_check}
mkdir -p "$OUT" "$LOG"
export PATH=$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer:$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=$PWD/.deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
B=build-gpu
TESTS="cuda_memory_test cuda_test cuda_train_test cuda_peer_backward_test cuda_peer_test
       cuda_runtime_test cli_forward_test calibrate_test cuda_peers_test device_peers_test
       bench_test"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-100000}))
[ "$STAGE" = lease ] && DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))

bundle() { tar czf "$OUT/gpu_check.tgz" -C "$LOG" . 2>/dev/null; }

# bounded SECONDS: SECONDS capped by what is left before the deadline (0: no time left).
bounded() {
  local left=$((DEADLINE - SECONDS - 5))
  [ "$left" -lt 10 ] && { echo 0; return; }
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

build() {
  if [ "${GPU_CHECK_PREBUILT:-0}" = 1 ]; then
    # A carried .gpubin (trove and tests/*, built here) takes build-gpu's place.
    if [ -d .gpubin ]; then
      mkdir -p $B/tests $B/bench && cp .gpubin/trove $B/ && cp .gpubin/tests/* $B/tests/ &&
        { [ ! -d .gpubin/bench ] || cp .gpubin/bench/* $B/bench/; }
    fi
    # The binaries carry /work/main/build-gpu (TROVE_BINARY_DIR) and the source path.
    [ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
    export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:/usr/local/cuda/lib64
    if ! ldd $B/trove $B/tests/cuda_test | grep 'not found'; then return 0; fi
    echo "the prebuilt binaries miss libraries (above): building here instead"
    rm -rf $B
  fi
  if [ ! -f $B/build.ninja ]; then
    cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DTROVE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$PWD/.deps/usr" > "$LOG/cmake.log" 2>&1 ||
      { tail -30 "$LOG/cmake.log"; bundle; exit 1; }
  fi
  # shellcheck disable=SC2086
  timeout 400 cmake --build $B -j16 --target trove "$@" > "$LOG/build-$STAGE.log" 2>&1 ||
    { tail -50 "$LOG/build-$STAGE.log"; bundle; exit 1; }
}

step() {  # step NAME SECONDS COMMAND...: one bounded step, its output in $LOG/NAME.log
  local name=$1 secs
  secs=$(bounded "$2")
  shift 2
  [ "$secs" = 0 ] && { echo "$name: skipped (deadline)"; return; }
  local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ($((SECONDS - t0)) s)"
  grep -E '^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|ERROR SUMMARY' "$LOG/$name.log" | head -20
  bundle
}

# bench NAME SECONDS ARGS...: `trove --json bench --device cuda` at the background config.
bench() {
  local name=$1 secs
  secs=$(bounded "$2")
  shift 2
  [ "$secs" = 0 ] && { echo "$name: skipped (deadline)"; return; }
  local t0=$SECONDS
  timeout "$secs" $B/trove --json bench --device cuda --dim 2048 --heads 4 --topk 8 --dim-key 64 \
    --quant int4 --batch 2048 --no-fio --calibrate-seconds 0.5 --store /tmp/tb "$@" \
    > "$LOG/$name.json" 2> "$LOG/$name.err"
  echo "$name rc=$? ($((SECONDS - t0)) s)"
  tail -3 "$LOG/$name.err"
  bundle
}

summary() {  # the figures of every bench json so far
  for f in "$LOG"/bench_*.json; do
    [ -s "$f" ] || continue
    python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[-1], "calibration", json.dumps(j.get("calibration")))
for p in j["points"]:
    print(" ", p["experts"], p["workload"], round(p["tokens_per_second"]),
          json.dumps(p.get("device")))' "$f" 2>&1 | cut -c1-1500
  done
}

run_tests() {
  nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
  nvidia-smi -L
  for t in $TESTS; do
    filter='*'
    [ "$t" = cli_forward_test ] && filter='*Device*:*Vram*'
    [ "$t" = calibrate_test ] && filter='H2d*'
    [ "$t" = bench_test ] && filter='*Cuda*'
    step "$t" 120 "$B/tests/$t" --gtest_filter="$filter"
  done
  # A driver older than the toolkit makes every device test skip: that is a failure here.
  if grep -l -E 'no CUDA device|compiled but not run' "$LOG"/*_test.log; then
    echo "UNEXPECTED: device tests skipped on the GPU machine (driver vs CUDA 13? see above)"
  fi
}

run_sanitizers() {
  step memcheck_kernels 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/tests/cuda_memory_test
  step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 \
    $B/tests/cuda_peer_test --gtest_filter='*Expert*:*Route*'
  step memcheck 150 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    $B/tests/cuda_runtime_test --gtest_filter='CudaRuntimeDevice.AllHit*:CudaRuntimeDevice.Routed*'
  step memcheck_peers 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/tests/cuda_peers_test --gtest_filter='CudaPeersTest.Einsum*:CudaPeersTest.Fused*'
  for f in "$LOG"/memcheck*.log "$LOG"/racecheck.log; do
    [ -f "$f" ] && { echo "== $f"; tail -3 "$f"; }
  done
}

# The background's own module in PyTorch (what a user runs instead) on the same shapes.
run_torch() {
  step torch_baseline 90 python3 bench/torch_peer_baseline.py --experts 262144,1048576 \
    --batch 2048
  cat "$LOG/torch_baseline.log" | cut -c1-400
}

# Each kernel of a few pk batches at the background config, by ncu (durations, throughput,
# occupancy), and a one-line-per-kernel digest.
run_ncu() {
  step ncu 150 ncu --clock-control none --target-processes all \
    -k 'regex:expert|select|gemm|Gemm|einsum|gather|norm|dequant' --launch-skip 40 \
    --launch-count 24 --section SpeedOfLight --section Occupancy --section LaunchStats \
    $B/trove bench --device cuda --dim 2048 --heads 4 --topk 8 --dim-key 64 --quant int4 \
    --batch 2048 --experts 262144 --routing pk --host 100% --batches 2 --warmup 1 \
    --no-calibrate --no-fio --store /tmp/tb
  awk '/\([0-9]+, [0-9]+, [0-9]+\)x\(/{name=$0; sub(/Context.*/,"",name)}
       /Duration/{printf "%10s us  %s\n", $NF, substr(name,1,110)}' "$LOG/ncu.log" |
    sort -k3 | uniq -c -f2 | head -20
}

# SPEC §2's background configuration: 2 layers of 4M int4 experts (~9.7 GB each) under a
# 16 GiB device budget (2 x 8 GiB), host tier 48 GiB (2 x 24 GiB) over the store on disk; the
# all-resident comparison keeps both tables on the device (~19 GB).
run_big() {
  df -h /tmp > "$LOG/df.txt"
  bench bench_4m_2layers 560 --experts 4M --layers 2 --routing zipf:1.09 --vram 16GiB \
    --host 48GiB --batches "${BIG_BATCHES:-16}" --warmup "${BIG_WARMUP:-8}"
}

# Issue 17 on the device: look-ahead 0, 1, 2 with most records on disk (host 10%) under a device
# tier, and device-tier misses computed on the CPU (--cpu-misses) against the same run without.
# The 1M int4 table at D 2048 is ~2.25 GiB: a 1 GiB device tier keeps misses coming.
run_prefetch() {
  bench bench_1m_disk_lookahead 200 --experts 1M --routing zipf:1.09 --host 10% --vram 1GiB \
    --lookahead 0,1,2 --batches 16 --warmup 4
  bench bench_1m_copy_misses 120 --experts 1M --routing zipf:1.09 --host 100% --vram 1GiB \
    --batches 16 --warmup 4 --no-calibrate
  bench bench_1m_cpu_misses 120 --experts 1M --routing zipf:1.09 --host 100% --vram 1GiB \
    --cpu-misses --batches 16 --warmup 4 --no-calibrate
}

case $STAGE in
  prefetch)
    build
    run_prefetch
    summary
    ;;
  tests)
    # shellcheck disable=SC2086
    build $TESTS
    run_tests
    run_sanitizers
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
    run_torch
    summary
    ;;
  big)
    build
    run_big
    summary
    ;;
  lease)
    # shellcheck disable=SC2086
    build $TESTS
    run_tests
    bench bench_262k_1m 150 --experts 262144,1M --routing zipf:1.09 --host 100% \
      --batches 8 --warmup 4
    run_torch
    run_sanitizers
    bench bench_1m_vram 120 --experts 1M --routing zipf:1.09 --host 100% --vram 16GiB \
      --batches 8 --warmup 4
    summary
    BIG_BATCHES=8 run_big
    summary
    ;;
  kernels)
    # After a kernel change: every CUDA test, the sanitizers on the router and expert kernels,
    # the background config with device routing beside torch, and where the time goes (ncu).
    # shellcheck disable=SC2086
    build $TESTS
    run_tests
    step racecheck_route 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
      $B/tests/cuda_peer_test --gtest_filter='*Route*:*Tie*:*Largest*:*Expert*:*Background*'
    step memcheck_route 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
      $B/tests/cuda_peer_test --gtest_filter='*Route*:*Tie*:*Largest*:*Expert*:*Background*'
    bench bench_pk 120 --experts 262144,1M --routing pk --host 100% --batches 8 --warmup 4
    run_torch
    run_ncu
    summary
    ;;
  final)
    # The figures of record after the sanitizers have run: every CUDA test, the background
    # config with device routing beside torch, and the per-kernel times.
    # shellcheck disable=SC2086
    build $TESTS
    run_tests
    bench bench_pk 120 --experts 262144,1M --routing pk --host 100% --batches 8 --warmup 4
    run_torch
    run_ncu
    summary
    ;;
  speed)
    # The speed figures with warm tiers, and where a batch's device time goes (ncu).
    build device_peers_test cache_bench
    step device_peers_test 60 $B/tests/device_peers_test
    # pk: the device routes, so the peers' layer time includes the routing, as torch's does.
    bench bench_pk 120 --experts 262144,1M --routing pk --host 100% --batches 8 --warmup 4
    run_torch
    # A warm host tier (48 warm-up batches) under a 16 GiB device tier: the device-tier misses
    # move host -> device by each --h2d method instead of waiting on the disk.
    bench bench_1m_vram_warm 150 --experts 1M --routing zipf:1.09 --host 100% --vram 16GiB \
      --batches 16 --warmup 48
    run_ncu
    step cache_bench 60 $B/bench/cache_bench --benchmark_min_time=0.2
    summary
    BIG_BATCHES=16 BIG_WARMUP=40 run_big
    summary
    ;;
  *)
    echo "usage: bench/gpu_check.sh tests|bench|big|lease|speed|kernels|final" >&2
    exit 2
    ;;
esac
bundle
