"""`python -m cpugen`: run, bench, plan, roofline, generate. Results to stdout, diagnostics and progress to stderr; a
user error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpugen.errors import CpugenError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage block
        raise CpugenError(f"{message} (see `python -m cpugen {self.prog.split()[-1]} --help`)"
                          if " " in self.prog else f"{message} (see --help)")


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _common(p: argparse.ArgumentParser, default_model: str | None = "gptj-1b"):
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help="preset name, config JSON path or Hugging Face checkpoint directory")
    p.add_argument("--layers", type=int, help="run only the first N blocks")
    p.add_argument("--backend", default="auto", help="auto | eager | ipex (default auto)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress or diagnostics on stderr")


def _batch(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {s!r}") from None


def _memory(p: argparse.ArgumentParser):
    p.add_argument("--memory-budget", metavar="SIZE", help="memory this process may use, e.g. 20GiB "
                   "(default: available memory and the cgroup limit)")
    p.add_argument("--host-memory", metavar="SIZE", help="plan for a host of this size, e.g. 512GiB")
    p.add_argument("--max-batch-size", type=int, help="never plan a batch above this")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cpugen", description="bf16 text generation with large decoder-only models on CPUs")
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    r = sub.add_parser("run", help="time prompt and decode on synthetic tokens (the reference's table)")
    _common(r)
    r.add_argument("--prompt-len", type=int, default=1024)
    r.add_argument("--gen-len", type=int, default=100)
    r.add_argument("--batch-size", type=_batch, default=1, help="N, or auto: the largest batch that fits")
    _memory(r)
    r.add_argument("--json", metavar="PATH|-", help="write the result record as JSON (- for stdout)")

    pl = sub.add_parser("plan", help="what a run needs, term by term, and the largest batch that fits")
    _common(pl, default_model=None)
    pl.add_argument("--prompt-len", type=int, default=1024)
    pl.add_argument("--gen-len", type=int, default=100)
    pl.add_argument("--batch-size", type=int, help="plan this batch instead of the largest")
    _memory(pl)
    pl.add_argument("--json", metavar="-", help="print the plan as JSON")

    b = sub.add_parser("bench", help="batch sweep: a row per batch size and setting, the model loaded once")
    b.add_argument("--sweep", metavar="FILE|NAME", help="a sweep definition: a JSON path or a name in "
                   "configs/bench (options given beside it override its values)")
    b.add_argument("--model", help="preset name, config JSON path or Hugging Face checkpoint directory "
                   "(default gptj-1b)")
    b.add_argument("--prompt-len", type=_int_list, help="prompt lengths, e.g. 1024,512 (default 1024)")
    b.add_argument("--gen-len", type=_int_list, help="generation lengths, paired with --prompt-len (default 100)")
    b.add_argument("--batch-sizes", help="e.g. 1,4,8,16,auto (default 1,4,8,16,auto)")
    b.add_argument("--repeat", type=int, help="timed prefill+decode runs per batch; figures are their median "
                   "(default 1)")
    b.add_argument("--warmup", type=int, help="warm-up passes per batch before timing (default 1)")
    b.add_argument("--layers", type=int, help="run only the first N blocks")
    b.add_argument("--backend", help="auto | eager | ipex (default auto)")
    b.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    b.add_argument("--dtype", choices=("bfloat16", "float32"))
    b.add_argument("--seed", type=int)
    _memory(b)
    b.add_argument("--format", default="md", choices=("md", "csv", "jsonl"), help="the view of the records")
    b.add_argument("--out", metavar="FILE", help="write the results here instead of stdout")
    b.add_argument("--quiet", action="store_true", help="no progress or diagnostics on stderr")

    rf = sub.add_parser("roofline", help="measure this machine's read bandwidth and bf16 matmul peak")
    rf.add_argument("--threads", type=int, help="threads to measure with (default: the usable cores)")
    rf.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    rf.add_argument("--json", metavar="-", help="print the result as JSON")

    g = sub.add_parser("generate", help="generate tokens for one or more prompts")
    _common(g, default_model=None)
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (needs tokenizer.json)")
    g.add_argument("--prompt-ids", action="append", default=[], type=_int_list, help="token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop-ids", type=_int_list, default=[], help="extra token ids that end a sequence")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    g.add_argument("--memory-budget", metavar="SIZE", help="memory this process may use, e.g. 20GiB")
    g.add_argument("--host-memory", metavar="SIZE", help="plan as if on a host of this size")
    g.add_argument("--json", metavar="-", help="print {tokens, text} as JSON")
    return ap


def _resolve_model(args):
    from cpugen.config import resolve

    cfg, ckpt = resolve(args.model)
    if args.layers is not None:
        cfg = cfg.with_layers(args.layers)
    return cfg, ckpt


def cmd_run(args) -> int:
    from cpugen.record import markdown, summary
    from cpugen.runner import RunSpec, run

    cfg, ckpt = _resolve_model(args)
    json_out = args.json
    rec = run(RunSpec(cfg, ckpt, args.batch_size, args.prompt_len, args.gen_len, args.backend, args.dtype,
                      args.seed, args.threads, quiet=args.quiet or json_out == "-",
                      memory_budget=args.memory_budget, host_memory=args.host_memory,
                      max_batch_size=args.max_batch_size))
    if json_out == "-":
        print(rec.to_json())
        return 0
    print(summary(rec))
    print()
    print(markdown([rec]))
    if json_out:
        _write(Path(json_out), rec.to_json() + "\n")
    return 0


def cmd_plan(args) -> int:
    from cpugen import backends, planner
    from cpugen.runner import DTYPES

    cfg, _ = _resolve_model(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise CpugenError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.prompt_len + args.gen_len > cfg.max_positions:
        raise CpugenError(f"prompt {args.prompt_len} + generation {args.gen_len} exceeds {cfg.name}'s "
                          f"{cfg.max_positions} positions: shorten either")
    itemsize = DTYPES[args.dtype].itemsize
    backend = backends.resolve(args.backend, args.dtype)
    p = planner.plan(cfg, args.prompt_len, args.gen_len, itemsize, backend, args.memory_budget,
                     args.host_memory, args.max_batch_size, args.batch_size)
    if args.json:
        print(json.dumps(p.to_dict()))
    else:
        print(planner.report(p))
        if p.batch_size == 0:
            print("cpugen: " + planner.explain_no_fit(p, cfg, itemsize), file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from cpugen import bench
    from cpugen.record import csv_text, jsonl, sweep_markdown

    shape = {"--prompt-len": args.prompt_len, "--gen-len": args.gen_len, "--batch-sizes": args.batch_sizes}
    if args.sweep:
        given = [k for k, v in shape.items() if v is not None]
        if given:
            raise CpugenError(f"{', '.join(given)} and --sweep contradict each other: the sweep defines its settings")
        sweep = bench.load_sweep(args.sweep)
    else:
        batches = bench.parse_batch_sizes(args.batch_sizes or "1,4,8,16,auto")
        settings = bench.settings_from(args.prompt_len or [1024], args.gen_len or [100], batches)
        sweep = bench.Sweep(name="bench", model=args.model or "gptj-1b", settings=settings, source="bench options")
    for k in ("model", "layers", "backend", "threads", "dtype", "seed", "repeat", "warmup", "memory_budget",
              "host_memory", "max_batch_size"):
        if getattr(args, k) is not None:
            setattr(sweep, k, getattr(args, k))
    sweep = bench.from_dict({k: v for k, v in vars(sweep).items() if k != "source"} |
                            {"settings": [vars(s) for s in sweep.settings]}, sweep.source)  # one validation path
    quiet = args.quiet or (args.format != "md" and not args.out)
    records = bench.run_sweep(sweep, quiet=quiet)
    text = {"md": sweep_markdown, "csv": csv_text, "jsonl": jsonl}[args.format](records)
    if args.out:
        _write(Path(args.out), text if text.endswith("\n") else text + "\n")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def cmd_roofline(args) -> int:
    from cpugen import roofline
    from cpugen.runner import set_threads

    threads = set_threads(args.threads)
    r = roofline.get(threads, refresh=args.refresh)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"{r.cpu}, {r.threads} threads, torch {r.torch_version}")
        print(f"memory read bandwidth: {r.read_gbps:.1f} GB/s (min {r.read_spread[0]:.1f}, max {r.read_spread[1]:.1f})")
        print(f"bf16 matmul peak:      {r.bf16_tflops:.3f} TFLOP/s (min {r.tflops_spread[0]:.3f}, "
              f"max {r.tflops_spread[1]:.3f})")
        print(f"cached in {roofline.CACHE}")
    return 0


def cmd_generate(args) -> int:
    from cpugen import backends, planner
    from cpugen.generate import generate
    from cpugen.progress import progress
    from cpugen.runner import DTYPES, set_threads
    from cpugen.sampling import Sampling
    from cpugen.tokenizer import load_tokenizer
    from cpugen.weights import load_model

    cfg, ckpt = _resolve_model(args)
    if not args.prompt and not args.prompt_ids:
        raise CpugenError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    tok = load_tokenizer(ckpt) if (args.prompt or ckpt) else None
    if args.prompt and tok is None:
        raise CpugenError(f"--prompt needs a tokenizer.json beside the checkpoint ({args.model}); "
                          "use --prompt-ids instead")
    prompts = [tok.encode(p) for p in args.prompt] + list(args.prompt_ids)
    if args.greedy and args.temperature:
        raise CpugenError("--greedy and --temperature contradict each other: choose one")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_positions:
        raise CpugenError(f"prompt {longest} + {args.max_new_tokens} new tokens exceeds {cfg.name}'s "
                          f"{cfg.max_positions} positions: shorten the prompt or lower --max-new-tokens")
    for p in prompts:
        for t in p:
            if not 0 <= t < cfg.vocab_size:
                raise CpugenError(f"token id {t} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    dtype = DTYPES[args.dtype]
    backend = backends.resolve(args.backend, args.dtype)
    set_threads(args.threads)
    quiet = args.quiet or args.json == "-"
    # the batch is the prompts: the plan checks it fits before anything large is allocated, and
    # sizes prefill's chunks and micro-batches
    plan = planner.plan(cfg, longest, args.max_new_tokens, dtype.itemsize, backend, args.memory_budget,
                        args.host_memory, batch_size=len(prompts))
    if planner.needed(plan) > plan.budget_bytes:
        raise CpugenError(f"{len(prompts)} prompts of up to {longest} tokens + {args.max_new_tokens} new tokens need "
                          f"{planner.fmt(planner.needed(plan))} with headroom but the budget is "
                          f"{planner.fmt(plan.budget_bytes)} ({plan.budget_source}): give fewer or shorter prompts, "
                          "fewer --max-new-tokens, or a larger --memory-budget")
    model = load_model(cfg, ckpt, dtype, args.seed, progress("loading", quiet))
    forward = backends.apply(model, backend, dtype)
    backends.for_batch(model, backend, dtype, len(prompts))
    bar = progress("generating", quiet)
    out = generate(model, prompts, args.max_new_tokens, sampling, dtype, cfg.eos_ids + args.stop_ids,
                   args.ignore_eos, forward, on_token=bar.update if bar else None,
                   prefill_chunk=plan.prefill_chunk, prefill_micro_batch=plan.prefill_micro_batch)
    text = [tok.decode(ids) for ids in out] if tok else None
    if args.json:
        print(json.dumps({"tokens": out, "text": text}))
    else:
        for i, ids in enumerate(out):
            print(text[i] if text else ",".join(map(str, ids)))
    return 0


def _write(path: Path, text: str):
    try:
        path.write_text(text)
    except OSError as e:
        raise CpugenError(f"cannot write {path}: {e.strerror}") from None


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "bench": cmd_bench, "roofline": cmd_roofline, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv or ["run"])
        if args.command is None:  # options without a command: `cpugen --model X` means run
            args = parser().parse_args(["run", *argv])
        return COMMANDS[args.command](args)
    except CpugenError as e:
        print(f"cpugen: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("cpugen: error: out of memory: use a smaller --batch-size, shorter prompt/generation or "
              "fewer --layers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cpugen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
