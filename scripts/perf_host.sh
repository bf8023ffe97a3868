#!/usr/bin/env bash
# A performance check for a many-core host, as one short script: the machine's limits at several
# thread counts, the native kernel's check and microbenchmark, cpugen beside Hugging Face on
# gptj-1b, and the planner against a hard memory limit at a larger scale than a small host allows.
#   bash scripts/perf_host.sh [OUT_DIR]      (expects torch, transformers, psutil, safetensors, ninja)
# PERF_THREADS="8 16" limits the thread counts measured; PERF_PROBE=0 skips the planner check.
set -u
out=${1:-${OUT:-/tmp/cpugen-perf}}; mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CPUGEN_CACHE=${CPUGEN_CACHE:-/tmp/cpugen-cache}
cores=$(nproc)
section() { echo; echo "=== $* ($(date +%T))"; }
section machine
lscpu | grep -E "Model name|Socket|Core|Thread|NUMA node|L3|Flags" | sed 's/Flags:.*\(amx[a-z_0-9 ]*\).*/Flags: ... \1 .../' | cut -c1-160
free -g | head -2
$py -c "import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"
section "limits by thread count"
for t in ${PERF_THREADS:-1 2 4 8 $cores}; do timeout 120 $py -m cpugen roofline --threads "$t" --refresh | sed -n 2,3p | sed "s/^/threads $t: /"; done
section "native gemv: check and microbenchmark"
timeout 240 $py kernels/check_gemv.py | head -3
timeout 240 $py kernels/check_decode_attention.py | tail -4
timeout 240 $py kernels/bench_gemv.py --rows 1,2,4,8 --repeat 5
section "cpugen beside Hugging Face (gptj-1b, prompt 128, 32 new tokens)"
timeout 420 $py scripts/bench_peers.py --engines cpugen,hf --batch-sizes 1,4,16,32 --rounds 3 --out "$out/peers.md" 2>&1 | grep -v "round"
section "decode by thread count (cpugen, gptj-1b, batch 1)"
for t in ${PERF_THREADS:-4 8 $cores}; do
  timeout 120 $py -m cpugen run --model gptj-1b --prompt-len 128 --gen-len 32 --threads "$t" --json - \
    | $py -c "import json,sys; d=json.load(sys.stdin); print(f\"threads {d['threads']}: {d['token_throughput']:.1f} tok/s, {d['decode_weight_gbps']:.1f} GB/s, decode {d['decode_efficiency']:.0%} of roofline, prefill {d['prefill_efficiency']:.0%} of peak\")"
done
[ "${PERF_PROBE:-1}" = 0 ] && { section done; exit 0; }
section "planner against a 24 GiB hard limit (gptj-6b, 8 layers, 64+1984 tokens)"
timeout 300 $py scripts/probe_batch.py --model gptj-6b --layers 8 --prompt-len 64 --gen-len 1984 --memory-limit 24GiB --decode-steps 2 --json "$out/probe.json"
section done
