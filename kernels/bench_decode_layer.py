"""Microbenchmark: one decode step of a random-weight model through the native decode stack
(kernels/decode_layer.cpp), through the Python blocks (the same kernels called one by one), and
the model's matmuls alone (every gemv over the same weights, nothing between them): what the stack
saves, and what is left between the matmuls. Interleaved rounds; the machine's read bandwidth is
read before each round, and each round's times are given as weights streamed against that reading
(this machine's bandwidth can change from one minute to the next).

    python kernels/bench_decode_layer.py [--model gptj-1b] [--layers N] [--batch 1] [--rounds 5] [--steps 8]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen import backends, native  # noqa: E402
from cpugen.config import from_name  # noqa: E402
from cpugen.generate import Engine, Prompts, compute_context  # noqa: E402
from cpugen.model import Linear  # noqa: E402
from cpugen.roofline import measure_bandwidth  # noqa: E402
from cpugen.weights import random_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gptj-1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cfg = from_name(a.model).with_layers(a.layers)
    model = random_model(cfg, torch.bfloat16, 0)
    fwd = backends.apply(model, "eager", torch.bfloat16)
    stack, gemv = model.decode_stack, native.extension().gemv
    if stack is None or a.batch > Linear.kernel_rows:
        sys.exit(f"no decode stack here (needs AVX512-BF16 and a batch of at most {Linear.kernel_rows})")
    linears = list({id(m): m for m in model.modules() if type(m) is Linear and m.weight is not model.wte.weight}.values())
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    xs = {m.in_features: torch.randn(a.batch, m.in_features).to(torch.bfloat16) for m in linears}
    B, P = a.batch, 16
    max_len = P + a.rounds * a.steps * 2 + 1
    engine = Engine(model, B, max_len, torch.bfloat16, fwd)
    gen = torch.Generator().manual_seed(0)
    print(f"{cfg.name}, {cfg.n_layer} layers, batch {B}, {torch.get_num_threads()} threads, "
          f"{nbytes / 1e9:.2f} GB of matmul weights")
    names = ("stack", "python blocks", "matmuls alone")
    rounds = []  # per round: (read GB/s before it, {name: median step time})
    with compute_context(torch.bfloat16):
        tok = engine.prefill(Prompts(torch.randint(cfg.vocab_size, (B, P), generator=gen),
                                     torch.ones(B, P, dtype=torch.bool))).argmax(-1)
        for r in range(a.rounds):
            read = measure_bandwidth(3)[0]
            times = {name: [] for name in names}
            for _ in range(a.steps):  # interleaved step by step
                for name in names[:2]:
                    model.decode_stack = stack if name == "stack" else None
                    t0 = time.perf_counter()
                    tok = engine.decode_one_token(tok).argmax(-1)
                    times[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for m in linears:
                    gemv(xs[m.in_features], m.weight, m.bias, 0)
                times["matmuls alone"].append(time.perf_counter() - t0)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            rounds.append((read, med))
            print(f"round {r + 1}: read {read:5.1f} GB/s | " + " | ".join(
                f"{name} {med[name] * 1e3:5.1f} ms = {nbytes / med[name] / 1e9 / read:4.0%}" for name in names), flush=True)
    model.decode_stack = stack
    model.free_caches()
    # each round against its own reading: the machine's read bandwidth can change between rounds
    print(f"median over {len(rounds)} rounds, each against the read bandwidth measured just before it:")
    for name in names:
        eff = sorted(nbytes / med[name] / 1e9 / read for read, med in rounds)
        ms = statistics.median(med[name] for _, med in rounds)
        print(f"{name:>14}: {ms * 1e3:6.1f} ms, weights at {statistics.median(eff):.0%} of read "
              f"({eff[0]:.0%}-{eff[-1]:.0%})")


if __name__ == "__main__":
    main()
