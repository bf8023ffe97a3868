#!/usr/bin/env bash
# A performance check for a many-core host, as one short script: the machine's limits at several
# thread counts, the native kernel's check and microbenchmark, cpugen beside Hugging Face on
# gptj-1b, and the planner against a hard memory limit at a larger scale than a small host allows.
#   bash scripts/perf_host.sh [OUT_DIR]      (expects torch, transformers, psutil, safetensors, ninja)
# PERF_THREADS="8 16" limits the thread counts measured; PERF_ROUNDS (default 3) sets the peer
# rounds; PERF_PROBE=0 skips the planner check.
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
timeout 240 $py kernels/bench_gemv.py --rows 1,4,8 --repeat 5 --layers 12
timeout 240 $py kernels/bench_decode_layer.py --rounds 3
section "cpugen beside Hugging Face (gptj-1b, prompt 128, 32 new tokens)"
timeout 420 $py scripts/bench_peers.py --engines cpugen,hf --batch-sizes 1,4,16,32 --rounds "${PERF_ROUNDS:-3}" --out "$out/peers.md" 2>&1 | grep -v "round"
section "decode by thread count (cpugen, gptj-1b, batch 1)"
for t in ${PERF_THREADS:-4 8 $cores}; do
  timeout 120 $py -m cpugen run --model gptj-1b --prompt-len 128 --gen-len 32 --threads "$t" --json - \
    | $py -c "import json,sys; d=json.load(sys.stdin); print(f\"threads {d['threads']}: {d['token_throughput']:.1f} tok/s, {d['decode_weight_gbps']:.1f} GB/s, decode {d.get('decode_efficiency_hw', d['decode_efficiency']):.0%} of roofline, prefill {d.get('prefill_efficiency_hw', d['prefill_efficiency']):.0%} of {d.get('hw_level', 'torch.mm')} peak\")"
done
section "threads pinned or not (cpugen, gptj-1b, batch 1, $cores threads, interleaved)"
for r in 1 2; do for pin in 1 0; do
  CPUGEN_PIN=$pin timeout 120 $py -m cpugen run --model gptj-1b --prompt-len 128 --gen-len 32 --json - \
    | $py -c "import json,sys; d=json.load(sys.stdin); print(f\"CPUGEN_PIN=$pin: {d['token_throughput']:.1f} tok/s, {d['decode_weight_gbps']:.1f} GB/s; {d['placement']}\")"
done; done
section "one-time costs by depth (gptj-1b blocks, 24 and 96 layers, batch 1)"
$py -c "import json; d=json.load(open('configs/gptj-1b.json')); d.update(n_layer=96, name='gptj-1b-96'); json.dump(d, open('$out/gptj-1b-96.json', 'w'))"
for m in gptj-1b "$out/gptj-1b-96.json"; do
  timeout 180 $py -m cpugen run --model "$m" --prompt-len 128 --gen-len 8 --json - \
    | $py -c "import json,sys; d=json.load(sys.stdin); L=d['n_layer']; print(f\"{L} layers: load {d['load_s']:.1f} s, backend {d['prepare_s']:.1f} s, warm-up {d['warmup_s']:.2f} s = {1e3*d['warmup_s']/L:.1f} ms a layer; decode {d['decode_weight_gbps']:.1f} GB/s\")"
done
[ "${PERF_PROBE:-1}" = 0 ] && { section done; exit 0; }
section "planner against a 24 GiB hard limit (gptj-6b, 8 layers, 64+1984 tokens)"
timeout 300 $py scripts/probe_batch.py --model gptj-6b --layers 8 --prompt-len 64 --gen-len 1984 --memory-limit 24GiB --decode-steps 2 --json "$out/probe.json"
section done
