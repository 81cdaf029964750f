#!/bin/bash
# Issue 18's measurement in two device calls (each well inside the 600-s limit of one call):
#   measure: the 8B shape in bf16 (sluice-bench and the transformers baseline), in FP8, in FP8
#            with the FP8 KV cache, the shared-prefix workload with the cache off and on, and
#            batch-1 time per output token on the 0.5B shape;
#   checks:  the GPU checks (FP8 and FP8 KV accuracy, kernels, parity) and a SLUICE_PROFILE=1
#            run of the 8B shape in FP8 with the FP8 KV cache (where its step goes);
#   overlap: (not in all) whether decode attention and the layer's GEMMs overlap on two CUDA
#            streams at the 8B shape (`sluice-kernel-bench --overlap`, docs/engine.md): bf16 and
#            FP8, decode steps alone and with 2,048 prefill rows in the GEMMs; then the split
#            steps' GPU test, the 8B runs and the shared-prefix run (cache on) with and without
#            SLUICE_NANO_BATCHES=1.
# Each step is bounded by `timeout`; every output and a log.txt go to $OUT (or ./gpu-results).
#
#   scripts/gpu_bench_8b.sh BIN_DIR [measure|checks|all|overlap]   # default all (two calls' worth)
#   # BIN_DIR: sluice-bench, engine_fp8, engine_cuda_kernels, engine_gpu_parity (and for
#   # overlap sluice-kernel-bench) built with --features cuda
set -u
B=${1:?usage: gpu_bench_8b.sh BIN_DIR [measure|checks|all|overlap]}
PART=${2:-all}
R=${OUT:-gpu-results}; mkdir -p "$R"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$R/gpu.txt" 2>&1
git rev-parse HEAD > "$R/commit.txt" 2>/dev/null
step() {
  local name=$1 t=$2; shift 2
  echo "== $name $(date +%T): $*" | tee -a "$R/log.txt"
  timeout "$t" "$@" > "$R/$name.out" 2> "$R/$name.err"
  echo "rc=$? $(date +%T)" | tee -a "$R/log.txt"
  tail -c 700 "$R/$name.out" | tee -a "$R/log.txt"
}
L8B="--model llama-3.1-8b --requests 512 --max-num-seqs 512 --input-len 1000 --output-len 1000"
SP="--model qwen2.5-0.5b --workload shared-prefix --requests 4096 --max-num-seqs 4096 --shared-len 1024 --input-len 128 --output-len 128"
if [[ $PART == measure || $PART == all ]]; then
  step l8b_bf16 130 "$B/sluice-bench" $L8B
  # An H100 holds batch 64 of this shape, not 256 (out of memory); the best batch that runs wins.
  step hf_l8b 75 python3 scripts/bench_transformers.py --model llama-3.1-8b --batch-sizes 256,64 --input-len 1000 --output-len 1000 --max-time 20
  step l8b_fp8 110 "$B/sluice-bench" $L8B --dtype fp8
  step l8b_fp8_kv 110 "$B/sluice-bench" $L8B --dtype fp8 --kv-cache-dtype fp8
  step prefix_off 40 "$B/sluice-bench" $SP --prefix-caching off
  step prefix_on 25 "$B/sluice-bench" $SP --prefix-caching on
  step batch1 15 "$B/sluice-bench" --model qwen2.5-0.5b --requests 1 --max-num-seqs 1 --input-len 512 --output-len 128
fi
if [[ $PART == checks || $PART == all ]]; then
  step fp8tests 70 env SLUICE_TEST_CUDA=1 "$B/engine_fp8" --nocapture cuda_fp8
  grep -h "rel err\|agreement" "$R/fp8tests.err" | tee -a "$R/log.txt"
  step kernels 40 env SLUICE_TEST_CUDA=1 "$B/engine_cuda_kernels" --nocapture
  step parity 40 env SLUICE_TEST_CUDA=1 SLUICE_GPU_PARITY_OUT="$R/engine_bf16.json" "$B/engine_gpu_parity" --nocapture
  step parity_py 40 python3 scripts/gpu_parity.py "$R/engine_bf16.json"
  step profile_8b 90 env SLUICE_PROFILE=1 "$B/sluice-bench" --model llama-3.1-8b --requests 256 --max-num-seqs 256 --input-len 1000 --output-len 500 --dtype fp8 --kv-cache-dtype fp8
  tail -n 40 "$R/profile_8b.err" | tee -a "$R/log.txt"
fi
if [[ $PART == overlap ]]; then
  for cfg in "bf16 bf16 256 0" "bf16 bf16 256 2048" "fp8 fp8 384 0" "fp8 fp8 384 2048"; do
    read -r w kv seqs extra <<< "$cfg"
    step "overlap_${w}_${seqs}_${extra}" 90 "$B/sluice-kernel-bench" --overlap --weights "$w" --kv "$kv" \
      --decode-seqs "$seqs" --extra-rows "$extra" --label "$w weights, $kv cache"
  done
  step split_test 60 env SLUICE_TEST_CUDA=1 "$B/engine_gpu_parity" --nocapture gpu_split_decode_steps_match_one_batch
  grep -h "split steps" "$R/split_test.err" | tee -a "$R/log.txt"
  step l8b_fp8_kv 110 "$B/sluice-bench" $L8B --dtype fp8 --kv-cache-dtype fp8
  step l8b_fp8_kv_split 110 env SLUICE_NANO_BATCHES=1 "$B/sluice-bench" $L8B --dtype fp8 --kv-cache-dtype fp8
  step l8b_bf16 130 "$B/sluice-bench" $L8B
  step l8b_bf16_split 130 env SLUICE_NANO_BATCHES=1 "$B/sluice-bench" $L8B
  step prefix_on 25 "$B/sluice-bench" $SP --prefix-caching on
  step prefix_on_split 25 env SLUICE_NANO_BATCHES=1 "$B/sluice-bench" $SP --prefix-caching on
fi
for f in "$R"/*.err; do tail -n 3 "$f" | sed "s|^|$(basename "$f"): |" >> "$R/log.txt"; done
