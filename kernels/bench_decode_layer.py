"""Microbenchmark: one decode step of a random-weight model through the native decode stack
(kernels/decode_layer.cpp) with the weights in cpugen's packed layout and, on a second copy of the
model, with them plain; through the Python blocks (the same kernels called one by one); and the
model's matmuls alone (every matmul over the same weights, nothing between them): what the layout
gains, what the stack saves, and what is left between the matmuls. Interleaved rounds; the
machine's read bandwidth is read before and after each round, and each round's times are given as
weights streamed against the first reading (this machine's bandwidth can change from one minute to
the next); the medians are taken over the steady rounds (readings within 15%), split by regime.

    python kernels/bench_decode_layer.py [--model gptj-1b] [--layers N] [--batch 1] [--rounds 5] [--steps 8]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen import knobs  # noqa: E402
from cpugen.runtime import eager, sampling, stack  # noqa: E402
from cpugen.runtime import native  # noqa: E402
from cpugen.model.config import from_name  # noqa: E402
from cpugen.runtime.engine import Engine, Prompts, compute_context  # noqa: E402
from cpugen.model.transformer import Linear  # noqa: E402
from cpugen.perf.roofline import measure_bandwidth  # noqa: E402
from cpugen.model.weights import random_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gptj-1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cfg = from_name(a.model).with_layers(a.layers)
    if not knobs.current().native:
        sys.exit("CPUGEN_NATIVE=0 switches cpugen's kernels off: nothing here to time")
    if not eager.panels_wanted():
        sys.exit("no packed decode stack here (it needs AVX2, or AVX-512 without AMX; CPUGEN_LAYOUT=packed packs anywhere)")
    # the plain weights' stack takes the gemv's few rows; above them only the packed layout is timed
    layouts = ("packed", "plain") if a.batch <= Linear.kernel_rows else ("packed",)
    B, P = a.batch, 16
    max_len = P + a.rounds * a.steps * 2 + 1
    gen = torch.Generator().manual_seed(0)
    prompt = Prompts(torch.randint(cfg.vocab_size, (B, P), generator=gen), torch.ones(B, P, dtype=torch.bool))
    models = {}
    for layout in layouts:
        model = random_model(cfg, torch.bfloat16, 0)
        eager.install(model, pack=layout == "packed")
        if model.decode_stack is None:
            sys.exit("no decode stack here: " + (native.why_not("decode_layer") or stack.refusal(cfg)
                                                  or getattr(model, "stack_refused", None)
                                                  or "the model's blocks are not all on cpugen's kernels"))
        linears = list({id(m): m for m in model.modules() if type(m) is Linear}.values())
        mats = [(m, m.panels if m.panels is not None else m.weight) for m in linears]
        models[layout] = dict(model=model, stack=model.decode_stack, engine=Engine(model, B, max_len, torch.bfloat16),
                              mats=mats, xs={m.in_features: torch.randn(B, m.in_features).to(torch.bfloat16) for m in linears})
    ext = native.step_kernels()  # the level's gemv and packed kernel (gemv_bf16 with AVX-512, avx2 without)
    nbytes = sum(m.in_features * m.out_features * 2 for m, _ in models["packed"]["mats"])  # bf16, unpadded
    print(f"{cfg.name}, {cfg.n_layer} layers, batch {B}, {torch.get_num_threads()} threads, "
          f"{nbytes / 1e9:.2f} GB of matmul weights")
    names = tuple(n for n in ("stack packed", "stack plain", "python blocks packed", "matmuls packed", "matmuls plain")
                  if n.split()[-1] in layouts)
    rounds = []  # per round: (read GB/s before it, after it, {name: median step time})
    with compute_context(torch.bfloat16):
        toks = {k: sampling.argmax(v["engine"].prefill(prompt)) for k, v in models.items()}
        for r in range(a.rounds):
            read = measure_bandwidth(3)[0]
            times = {name: [] for name in names}
            for _ in range(a.steps):  # interleaved step by step
                for name in names:
                    layout = name.split()[-1]
                    v = models[layout]
                    t0 = time.perf_counter()
                    if name.startswith("matmuls"):
                        for m, w in v["mats"]:
                            if m.panels is not None:
                                ext.linear_packed(v["xs"][m.in_features], w, m.out_features, m.bias, 0)
                            else:
                                ext.gemv(v["xs"][m.in_features], w, m.bias, 0)
                    else:
                        v["model"].decode_stack = v["stack"] if name.startswith("stack") else None
                        toks[layout] = sampling.argmax(v["engine"].decode_one_token(toks[layout]))
                    times[name].append(time.perf_counter() - t0)
            after = measure_bandwidth(3)[0]
            med = {name: statistics.median(ts) for name, ts in times.items()}
            rounds.append((read, after, med))
            print(f"round {r + 1}: read {read:5.1f}/{after:5.1f} GB/s | " + " | ".join(
                f"{name} {med[name] * 1e3:5.1f} ms = {nbytes / med[name] / 1e9 / read:4.0%}" for name in names), flush=True)
    for v in models.values():
        v["model"].decode_stack = v["stack"]
        v["model"].free_caches()
    # each round against its own reading, steady rounds only, by regime
    steady = [(read, med) for read, after, med in rounds if abs(after - read) <= 0.15 * max(read, after)]
    print(f"{len(steady)} of {len(rounds)} rounds steady (readings before and after within 15%); medians "
          f"against each round's reading:")
    for regime, pick in (("usual (< 45 GB/s)", lambda rd: rd < 45), ("fast (>= 45 GB/s)", lambda rd: rd >= 45)):
        rs = [(read, med) for read, med in steady if pick(read)]
        if not rs:
            continue
        print(f"  {regime}, {len(rs)} rounds:")
        for name in names:
            eff = sorted(nbytes / med[name] / 1e9 / read for read, med in rs)
            ms = statistics.median(med[name] for _, med in rs)
            print(f"  {name:>22}: {ms * 1e3:6.1f} ms, weights at {statistics.median(eff):.0%} of read "
                  f"({eff[0]:.0%}-{eff[-1]:.0%})")


if __name__ == "__main__":
    main()
