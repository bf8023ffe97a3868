#!/usr/bin/env python3
"""cpugen beside its peers on the same random-weight model and workload, measured in one run.

    python scripts/bench_peers.py [--model gptj-1b] [--prompt-len 128] [--gen-len 32]
                                  [--batch-sizes 1,4,16,32] [--rounds 5] [--engines cpugen,hf,hf-ipex]
                                  [--engines cpugen,cpugen-plain,cpugen-packed,...]
                                  [--isa avx2,avx512,avx512_bf16]
                                  [--ipex-python ~/.cache/cpugen/ipex-venv/bin/python] [--out FILE.md]

Engines, each a long-lived worker process holding its model, all loading one bf16 checkpoint
written once from the preset with random weights (so every engine computes with the same numbers):
- cpugen: this repository, backend auto (the eager path with cpugen's native kernels);
- cpugen-plain: the same with CPUGEN_LAYOUT=plain, the weights left in their plain layout (an A/B of
  cpugen's packed layout);
- cpugen-packed: the same with CPUGEN_LAYOUT=packed, the weights packed at load wherever a packed
  kernel runs (with AMX, cpugen's tile kernel, where auto keeps oneDNN's);
- hf: Hugging Face transformers, eager bf16, `generate` greedy with min_new_tokens = max_new_tokens;
- hf-ipex: the same after `ipex.llm.optimize(dtype=bfloat16)`, in the IPEX environment. Where IPEX
  has no bf16 weight prepack (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on AVX2 CPUs, or capped to
  the avx2 level), `llm.optimize` asserts, and the engine is what that assertion tells the user to
  run instead: `ipex.optimize(dtype=bfloat16, weights_prepack=False)` under autocast, so named.
Rounds are interleaved (A, B, C, A, B, C, ...) so a change of the machine's regime hits every engine
alike; each figure is the median over rounds with min-max beside it. The machine's limits are read
before and after, and the bandwidth again before and after every round; a run whose before and after
readings disagree by more than 15% is flagged, and a round whose two readings do is left out of the
per-round ratio.

HF engines are timed inside one `generate` call by a logits processor that notes the time as each
token's logits arrive: the prompt time is the first arrival, the decode step the mean gap after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["CPUGEN_ROOT"])
engine, ckpt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
torch.set_num_threads(threads)

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()

if engine.startswith("cpugen"):
    # the same path as `cpugen run`: the session resolves, plans nothing here, pins the threads, loads
    from cpugen import knobs
    from cpugen.runtime.engine import Engine, Prompts, compute_context
    from cpugen.runtime.sampling import argmax
    from cpugen.runtime.session import open_session
    s = open_session(ckpt, threads=threads, quiet=True).load()
    model = s.model
    layout = {"plain": "plain", "packed": "packed at load"}.get(knobs.current().layout, "packed where the CPU takes it")
    name = f"cpugen ({s.backend}, {layout} layout)"
    def work(B, P, G, tokens):
        s.ready_for(B)
        e = Engine(model, B, P + G, s.dtype, s.forward)
        with compute_context(s.dtype):
            t0 = time.perf_counter()
            tok = argmax(e.prefill(Prompts(tokens, torch.ones_like(tokens, dtype=torch.bool))))
            tp = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(G - 1):
                tok = argmax(e.decode_one_token(tok))
            td = time.perf_counter() - t0
        model.free_caches()
        return tp, td / (G - 1)
else:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16).eval()
    name = f"hf eager (transformers {transformers.__version__})"
    if engine == "hf-ipex":
        import intel_extension_for_pytorch as ipex
        import intel_extension_for_pytorch._C as ipex_core
        if ipex_core.onednn_has_bf16_support():
            model = ipex.llm.optimize(model, dtype=torch.bfloat16, inplace=True, deployment_mode=True)
            name = f"hf + ipex {ipex.__version__} (transformers {transformers.__version__})"
        else:  # below AVX-512 (or capped there): what IPEX's own assertion tells the user to do
            model = ipex.optimize(model, dtype=torch.bfloat16, inplace=True, weights_prepack=False)
            name = f"hf + ipex {ipex.__version__} optimize(weights_prepack=False) (transformers {transformers.__version__})"
    class Clock(transformers.LogitsProcessor):  # called once per generated token, right after its forward
        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores
    clock = Clock()
    def work(B, P, G, tokens):
        clock.t = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine == "hf-ipex"):
            t0 = time.perf_counter()
            out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=G, min_new_tokens=G,
                                 do_sample=False, pad_token_id=0,
                                 logits_processor=transformers.LogitsProcessorList([clock]))
        assert out.shape[1] == P + G and len(clock.t) == G, (out.shape, len(clock.t))
        return clock.t[0] - t0, (clock.t[-1] - clock.t[0]) / (G - 1)
import resource
say(ready=name, torch=torch.__version__)
for line in sys.stdin:
    req = json.loads(line)
    B, P, G = req["batch"], req["prompt_len"], req["gen_len"]
    g = torch.Generator().manual_seed(req.get("seed", 0))
    tokens = torch.randint(req["vocab"], (B, P), generator=g)
    if req.get("warmup"):
        work(B, min(P, 16), 3, tokens[:, :min(P, 16)])
        say(warm=True); continue
    tp, step = work(B, P, G, tokens)
    hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    say(prompt_time_s=tp, step_s=step, peak_rss_bytes=hwm)
"""


# The pause before each timed request: the previous request's threads (another process's) go idle
# and the host settles before the next engine is timed. Without it, on 2 Zen 5 cores, the prefill
# timed first in each request swung widely: cpugen's 32-row prefill took 0.03-0.14 s at avx512_bf16
# and 0.07-0.53 s at avx2 over 6 rounds, against 0.03-0.03 and 0.07-0.09 with it (the same
# command, cpugen alone at three levels), and at 24% of the vdpbf16ps limit in a run with HF + IPEX
# (43-46% in the two runs with it).
QUIET_S = 0.3


def level_env(engine: str) -> dict[str, str]:
    """The environment that caps `engine@level` at its level ({} for an engine without one): cpugen
    takes CPUGEN_ISA (which caps PyTorch and oneDNN in its process as well), HF and IPEX the
    PyTorch and oneDNN caps that CPUGEN_ISA sets."""
    from cpugen.host.cpu import LIBRARY_CAPS

    base, _, level = engine.partition("@")
    if not level:
        return {}
    return {"CPUGEN_ISA": level} if base.startswith("cpugen") else dict(LIBRARY_CAPS[level])


class Worker:
    def __init__(self, engine: str, python: str, ckpt: Path, threads: int):
        base = engine.partition("@")[0]
        env = {**os.environ, "CPUGEN_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONWARNINGS": "ignore", **({"CPUGEN_LAYOUT": base[7:]} if base in ("cpugen-plain", "cpugen-packed") else {}),
               **level_env(engine)}
        self.engine = engine
        self.err = tempfile.TemporaryFile(mode="w+")  # the worker's stderr: its last line says why it died
        self.proc = subprocess.Popen([python, "-c", WORKER, base, str(ckpt), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env, cwd=ROOT)
        self.name = self._read()["ready"]

    def _read(self) -> dict:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        status = self.proc.wait()
        self.err.seek(0)
        last = [ln.strip() for ln in self.err.read().splitlines() if ln.strip()][-1:] or ["no message"]
        raise RuntimeError(f"{self.engine} worker exited (status {status}): {last[0][:300]}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def checkpoint_for(preset: str, layers: int | None) -> Path:
    """The preset with random weights as an HF bf16 checkpoint, written once and cached."""
    from cpugen.model.config import from_name

    cfg = from_name(preset).with_layers(layers)
    d = Path.home() / ".cache" / "cpugen" / "bench" / f"{preset}-L{cfg.n_layer}-random"
    if (d / "config.json").exists():
        return d
    import torch
    import transformers

    if cfg.family != "gptj":
        raise SystemExit("bench_peers writes random checkpoints for GPT-J presets only")
    hf_cfg = transformers.GPTJConfig(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, rotary_dim=cfg.rotary_dim,
                                     n_inner=cfg.intermediate_size, bos_token_id=cfg.bos_token_id,
                                     eos_token_id=cfg.eos_token_id, tie_word_embeddings=False)
    hf_cfg.architectures = ["GPTJForCausalLM"]
    print(f"writing a random-weight {preset} checkpoint to {d} (once)", file=sys.stderr)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.GPTJForCausalLM(hf_cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "ln" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, (1.0 if "wte" in name else p.shape[1] ** -0.5) * (0.2 if "out" in name else 1.0))
    model.save_pretrained(d)
    return d


def limits(threads: int) -> tuple[float, float, dict]:
    """(read GB/s, torch.mm's bf16 TFLOP/s, each ISA level's register-only TFLOP/s)"""
    from cpugen.perf import roofline

    r = roofline.measure(threads, repeats=5)
    return r.read_gbps, r.bf16_tflops, r.hw_tflops


def read_now(threads: int) -> float:
    """A quick bandwidth reading (GB/s), taken before and after each round: this machine changes
    regime within minutes, so a round's weight GB/s is also set against the readings around it."""
    import torch

    from cpugen.perf import roofline

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return roofline.measure_bandwidth(3)[0]
    finally:
        torch.set_num_threads(prev)


def steady(reads: list[tuple[float, float]]) -> list[int]:
    """The rounds whose bandwidth readings before and after agree within 15%: the machine stayed in
    one regime through them, so their weight GB/s can be set against those readings."""
    return [i for i, (r0, r1) in enumerate(reads) if abs(r1 / r0 - 1) <= 0.15]


def round_ratio(weight_bytes: float, steps: list[float], reads: list[tuple[float, float]]) -> str:
    kept = steady(reads)
    if not kept:
        return "-"
    return f"{statistics.median(weight_bytes / steps[i] / 1e9 / (sum(reads[i]) / 2) for i in kept):.0%}"


def fmt(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [x * scale for x in vals]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gptj-1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--engines", default="cpugen,hf,hf-ipex")
    ap.add_argument("--ipex-python", default=str(Path.home() / ".cache/cpugen/ipex-venv/bin/python"))
    ap.add_argument("--isa", help="levels to run every engine at, e.g. avx2,avx512,avx512_bf16 (cpugen through "
                                  "CPUGEN_ISA, PyTorch and oneDNN through ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--out", help="also write the markdown report here")
    a = ap.parse_args()

    from cpugen.model import shapes
    from cpugen.perf import flops
    from cpugen.model.config import from_name

    cfg = from_name(a.model).with_layers(a.layers)
    ckpt = checkpoint_for(a.model, a.layers)
    engines = a.engines.split(",")
    if "hf-ipex" in engines and not Path(a.ipex_python).exists():
        print(f"hf-ipex skipped: no IPEX environment at {a.ipex_python} (bash scripts/ipex_env.sh)", file=sys.stderr)
        engines.remove("hf-ipex")
    if a.isa:
        engines = [f"{e}@{lv}" for lv in a.isa.split(",") for e in engines]
    bw0, tf0, hw0 = limits(a.threads)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    workers, failed = [], {}  # an engine that cannot run here (a peer that refuses this CPU, say) is reported, not fatal
    for e in engines:
        try:
            w = Worker(e, a.ipex_python if e.startswith("hf-ipex") else sys.executable, ckpt, a.threads)
            w.ask(batch=batches[0], prompt_len=a.prompt_len, gen_len=a.gen_len, vocab=cfg.vocab_size, warmup=True)
            workers.append(w)
        except RuntimeError as err:
            failed[e] = str(err)
            print(f"not run: {err}", file=sys.stderr)
    engines = [w.engine for w in workers]
    weight_bytes = shapes.streamed_params(cfg) * 2
    res: dict = {(w.engine, b): [] for w in workers for b in batches}
    reads: dict = {b: [] for b in batches}  # per round: (reading before it, reading after it)
    try:
        for b in batches:
            for w in workers:
                w.ask(batch=b, prompt_len=a.prompt_len, gen_len=a.gen_len, vocab=cfg.vocab_size, warmup=True)
            for r in range(a.rounds):
                before = read_now(a.threads)  # this round's bandwidth, read just before and just after it
                for w in workers:  # interleaved: A, B, C, A, B, C, ...
                    time.sleep(QUIET_S)  # the previous engine's threads stop spinning first
                    res[(w.engine, b)].append(w.ask(batch=b, prompt_len=a.prompt_len, gen_len=a.gen_len,
                                                    vocab=cfg.vocab_size, seed=r))
                reads[b].append((before, read_now(a.threads)))
                print(f"batch {b}: round {r + 1}/{a.rounds}", file=sys.stderr)
    finally:
        for w in workers:
            w.close()
    bw1, tf1, hw1 = limits(a.threads)
    hw = {lv: max(hw0.get(lv, 0.0), hw1.get(lv, 0.0)) for lv in {*hw0, *hw1}}  # a register-only limit reads low, never high
    from cpugen.perf import roofline

    import platform

    from cpugen.host.cpu import cpu_info

    lines = [f"## {a.model} ({cfg.n_layer} layers, {shapes.n_params(cfg) / 1e9:.2f}e9 parameters, bf16), "
             f"prompt {a.prompt_len}, {a.gen_len} new tokens, {a.threads} threads",
             "",
             f"Machine: {cpu_info()['cpu']} ({platform.machine()}); limits before: {bw0:.1f} GB/s read, "
             f"{tf0:.3f} TFLOP/s bf16; after: {bw1:.1f} GB/s, {tf1:.3f} TFLOP/s"
             + ("  **(readings disagree by more than 15%: distrust this run)**"
                if abs(bw1 / bw0 - 1) > 0.15 or abs(tf1 / tf0 - 1) > 0.15 else ""),
             "Engines: " + "; ".join(f"{w.engine} = {w.name}" for w in workers)
             + "".join(f". Not run: {msg}" for msg in failed.values()),
             f"Each cell: median over {a.rounds} interleaved rounds (min-max). Bandwidth read before and after "
             "each round: " + "; ".join(f"batch {b}: {fmt([x for r in reads[b] for x in r], 1, 1)} GB/s, "
                                        f"{len(steady(reads[b]))} of {len(reads[b])} rounds steady" for b in batches)
             + ". 'vs round's read' is the median, over the steady rounds (their two readings within 15%), of "
             "each round's weight GB/s against the mean of its readings ('-' where none was steady); "
             "'vs HW' sets prefill's and a decode step's FLOP/s against the hardware limit of the engine's "
             "ISA level, the fastest register-only limit of the levels up to it (" + ", ".join(f"{lv} {v:.3f}" for lv, v in sorted(hw.items())) + " TFLOP/s); the "
             "other ratios use the mean of the limits read before and after the whole run.",
             "",
             "| batch | engine | tokens/s | prompt time (s) | decode step (ms) | weight GB/s | vs read BW | "
             "vs round's read | decode vs roofline | prefill vs peak | prefill vs HW | decode vs HW | tok/s vs hf | "
             "tok/s vs hf-ipex |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bw, tf = (bw0 + bw1) / 2, (tf0 + tf1) / 2
    out = {}
    for b in batches:
        med = {e: statistics.median([b / x["step_s"] for x in res[(e, b)]]) for e in engines}
        for e in engines:
            rows = res[(e, b)]
            tps = [b / x["step_s"] for x in rows]
            steps = [x["step_s"] for x in rows]
            c = a.prompt_len + a.gen_len / 2
            kv = 2 * cfg.n_layer * b * cfg.kv_dim * c * 2
            ideal = max((weight_bytes + kv) / (bw * 1e9), b * flops.token_flops(cfg, c) / (tf * 1e12))
            pf = [b * flops.prompt_flops(cfg, a.prompt_len) / x["prompt_time_s"] / (tf * 1e12) for x in rows]
            at = e[e.index("@"):] if "@" in e else ""  # against the peer at the same level
            lim = (roofline.level_limit(hw, at[1:] if at else roofline.run_level())[1] or 0.0) * 1e12  # the level's FLOP/s
            pf_hw = [b * flops.prompt_flops(cfg, a.prompt_len) / x["prompt_time_s"] / lim for x in rows] if lim else []
            dc_hw = b * flops.token_flops(cfg, c) / statistics.median(steps) / lim if lim else None
            rel = lambda other: f"{med[e] / med[other + at]:.2f}x" if other + at in med else "-"  # noqa: E731
            lines.append(f"| {b} | {e} | {fmt(tps, 1, 1)} | {fmt([x['prompt_time_s'] for x in rows], 1, 2)} | "
                         f"{fmt(steps, 1e3, 1)} | {weight_bytes / statistics.median(steps) / 1e9:.1f} | "
                         f"{weight_bytes / statistics.median(steps) / 1e9 / bw:.0%} | "
                         f"{round_ratio(weight_bytes, steps, reads[b])} | "
                         f"{ideal / statistics.median(steps):.0%} | {statistics.median(pf):.0%} | "
                         f"{fmt([100 * x for x in pf_hw], 1, 0) + '%' if pf_hw else '-'} | "
                         f"{f'{dc_hw:.0%}' if dc_hw else '-'} | {rel('hf')} | {rel('hf-ipex')} |")
            out[f"{e}/{b}"] = {"tokens_per_s": tps, "step_s": steps, "prompt_time_s": [x["prompt_time_s"] for x in rows],
                               "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rows)}
    report = "\n".join(lines)
    print(report)
    if a.out:
        Path(a.out).write_text(report + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps({"limits": [bw0, tf0, bw1, tf1], "round_reads": reads,
                                                                "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
