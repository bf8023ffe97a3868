"""`python -m cpugen`: run, plan, bench, generate, roofline, build, probe, nightly (scripts/ hold thin
entry points to probe and nightly). Results to stdout, diagnostics and progress to stderr; a user
error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
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


def _common(p: argparse.ArgumentParser, default_model: str | None = "gptj-1b", defaults: bool = True):
    """The options every model command takes. Without `defaults` (bench), an option left out is None,
    so that a sweep's own value stands."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--model", default=d(default_model), required=defaults and default_model is None,
                   help="preset name, config JSON path or Hugging Face checkpoint directory"
                   + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--layers", type=int, help="run only the first N blocks")
    p.add_argument("--backend", default=d("auto"), help="auto | eager | ipex (default auto)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    p.add_argument("--dtype", default=d("bfloat16"), choices=("bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=d(0))
    p.add_argument("--quiet", action="store_true", help="no progress or diagnostics on stderr")


def _tp_arg(s: str):
    if s == "auto":
        return s
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of ranks or auto, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--tp must be at least 1, not {n}")
    return n


def _tp(p: argparse.ArgumentParser):
    p.add_argument("--tp", type=_tp_arg, default=1, metavar="N|auto",
                   help="tensor parallel over N ranks (auto: one per NUMA node this process may use); on one "
                        "host cpugen starts the ranks itself, across hosts start it with torchrun")
    p.add_argument("--tp-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long a rank waits for the others (rendezvous and each collective; default 120)")


def _batch(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {s!r}") from None


def _memory(p: argparse.ArgumentParser, cap: bool = True):
    p.add_argument("--memory-budget", metavar="SIZE", help="memory this process may use, e.g. 20GiB "
                   "(default: available memory and the cgroup limit)")
    p.add_argument("--host-memory", metavar="SIZE", help="plan for a host of this size, e.g. 512GiB")
    if cap:
        p.add_argument("--max-batch-size", type=int, help="never plan a batch above this")


def _setting(p: argparse.ArgumentParser):
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=100)


def parser() -> argparse.ArgumentParser:
    from cpugen.knobs import help_text

    ap = _Parser(prog="cpugen", description="bf16 text generation with large decoder-only models on CPUs",
                 epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    def command(name, help_):
        return sub.add_parser(name, help=help_, epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)

    r = command("run", "time prompt and decode on synthetic tokens (the reference's table)")
    _common(r)
    _setting(r)
    r.add_argument("--batch-size", type=_batch, default=1, help="N, or auto: the largest batch that fits")
    _memory(r)
    r.add_argument("--json", metavar="PATH|-", help="write the result record as JSON (- for stdout)")
    _tp(r)

    pl = command("plan", "what a run needs, term by term, and the largest batch that fits")
    _common(pl, default_model=None)
    _setting(pl)
    pl.add_argument("--batch-size", type=int, help="plan this batch instead of the largest")
    _memory(pl)
    pl.add_argument("--json", metavar="-", help="print the plan as JSON")
    _tp(pl)

    b = command("bench", "batch sweep: a row per batch size and setting, the model loaded once")
    b.add_argument("--sweep", metavar="FILE|NAME", help="a sweep definition: a JSON path or a name in "
                   "configs/bench (options given beside it override its values)")
    _common(b, defaults=False)
    b.add_argument("--prompt-len", type=_int_list, help="prompt lengths, e.g. 1024,512 (default 1024)")
    b.add_argument("--gen-len", type=_int_list, help="generation lengths, paired with --prompt-len (default 100)")
    b.add_argument("--batch-sizes", help="e.g. 1,4,8,16,auto (default 1,4,8,16,auto)")
    b.add_argument("--repeat", type=int, help="timed prefill+decode runs per batch; figures are their median "
                   "(default 1)")
    b.add_argument("--warmup", type=int, help="warm-up passes per batch before timing (default 1)")
    _memory(b)
    b.add_argument("--format", default="md", choices=("md", "csv", "jsonl"), help="the view of the records")
    b.add_argument("--out", metavar="FILE", help="write the results here instead of stdout")
    _tp(b)

    g = command("generate", "generate tokens for one or more prompts")
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
    _memory(g, cap=False)
    g.add_argument("--json", metavar="-", help="print {tokens, text} as JSON")
    _tp(g)

    rf = command("roofline", "measure this machine's read bandwidth and bf16 matmul peak")
    rf.add_argument("--threads", type=int, help="threads to measure with (default: the usable cores)")
    rf.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    rf.add_argument("--json", metavar="-", help="print the result as JSON")

    command("build", "build the native kernels for this machine (once; `run` would otherwise build them first)")

    pr = command("probe", "the real largest batch under a hard memory limit, beside the planner's answer")
    _common(pr, default_model=None)
    _setting(pr)
    pr.add_argument("--memory-limit", required=True, help="hard limit for each try, e.g. 3GiB")
    pr.add_argument("--decode-steps", type=int, default=3, help="decode steps each try runs")
    pr.add_argument("--limit-kind", default="auto", choices=("auto", "cgroup", "rlimit", "watchdog"))
    pr.add_argument("--max-batch", type=int, help="never try a batch above this")
    pr.add_argument("--json", metavar="PATH|-", help="write the report as JSON")
    pr.add_argument("--tp", type=int, default=1, metavar="N",
                    help="each try runs N tensor-parallel ranks on this host, each under its own limit of "
                         "--memory-limit / N (the host's memory shared among them)")
    pr.add_argument("--tp-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="how long a rank waits for the others (default 120)")

    n = command("nightly", "run performance sweeps, keep their history, flag regressions")
    n.add_argument("--sweep", action="append", required=True, metavar="FILE",
                   help="a sweep definition (JSON path or a name in configs/bench); repeat for several")
    n.add_argument("--history", required=True, metavar="PATH", help="the history file (JSONL, appended to)")
    n.add_argument("--report-dir", required=True, metavar="DIR", help="where report.md and the charts go")
    n.add_argument("--threshold", type=float, default=0.10,
                   help="a figure worse than its history's median by more than this share, and by more than "
                        "--spread-k times its spread, regresses (default 0.10: 10%%)")
    n.add_argument("--spread-k", type=float, default=3.0,
                   help="how many times the history's spread (MAD as a standard deviation) a regression must "
                        "exceed (default 3)")
    n.add_argument("--window", type=int, default=10, help="judge against the last N runs (default 10)")
    n.add_argument("--min-runs", type=int, default=5,
                   help="judge a configuration once it has this many earlier runs (default 5)")
    n.add_argument("--confirm", type=int, default=3,
                   help="measure a row that regressed again up to N times; a regression must reproduce (default 3)")
    n.add_argument("--confirm-pause", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long before measuring a regressed row again, three times as long before each "
                        "further re-measure (default 10: 10, 30, 90 s)")
    n.add_argument("--repeat", type=int,
                   help="timed runs of each row of a compared sweep (default: the sweep's, at least 3)")
    n.add_argument("--calibrate", type=int, metavar="N",
                   help="run the sweeps N times on unchanged code and report how often the rule would alarm")
    n.add_argument("--quiet", action="store_true", help="no progress or diagnostics on stderr")
    _tp(n)
    return ap


def cmd_run(args) -> int:
    from cpugen.perf.measure import RunSpec, run
    from cpugen.perf.record import markdown, summary

    json_out = args.json
    rec = run(RunSpec(args.model, args.batch_size, args.prompt_len, args.gen_len, args.layers, args.backend,
                      args.dtype, args.seed, args.threads, quiet=args.quiet or json_out == "-",
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
    from cpugen.runtime import planner
    from cpugen.runtime.session import DTYPES, check_lengths
    from cpugen.runtime.backends import resolve as resolve_backend
    from cpugen.model.source import resolve

    cfg, _ = resolve(args.model, args.layers)
    if args.batch_size is not None and args.batch_size < 1:
        raise CpugenError(f"--batch-size must be at least 1, not {args.batch_size}")
    check_lengths(cfg, args.prompt_len, args.gen_len)
    itemsize = DTYPES[args.dtype].itemsize
    tp = _ranks(args.tp)
    p = planner.plan(cfg, args.prompt_len, args.gen_len, itemsize, resolve_backend(args.backend, args.dtype),
                     args.memory_budget, args.host_memory, args.max_batch_size, args.batch_size,
                     tp=tp, ranks_per_host=1 if args.host_memory else tp)
    if args.json:
        print(json.dumps(p.to_dict()))
    else:
        print(planner.report(p))
        if p.batch_size == 0:
            print("cpugen: " + planner.explain_no_fit(p, cfg, itemsize), file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from cpugen.perf import bench
    from cpugen.perf.record import csv_text, jsonl, sweep_markdown

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
    from cpugen.perf import roofline
    from cpugen.runtime.session import place, set_threads

    threads = set_threads(args.threads)
    place(threads)
    r = roofline.get(threads, refresh=args.refresh)
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"{r.cpu}, {r.threads} threads, torch {r.torch_version}")
        print(f"memory read bandwidth: {r.read_gbps:.1f} GB/s (min {r.read_spread[0]:.1f}, max {r.read_spread[1]:.1f})")
        print(f"bf16 matmul peak:      {r.bf16_tflops:.3f} TFLOP/s (min {r.tflops_spread[0]:.3f}, "
              f"max {r.tflops_spread[1]:.3f}): the route cpugen's bf16 matmuls take here")
        for level, tf in r.hw_tflops.items():
            what = {"avx512_bf16": "vdpbf16ps", "amx": "tdpbf16ps tile"}.get(level, "fp32 FMA")
            print(f"hardware, {level + ':':<12} {tf:.3f} TFLOP/s ({what} chains in registers on every thread; "
                  f"the matmul reaches {r.bf16_tflops / tf:.0%} of it)" if level == roofline.run_level() else
                  f"hardware, {level + ':':<12} {tf:.3f} TFLOP/s ({what} chains in registers on every thread)")
        print(f"cached in {roofline.cache_file()}")
    return 0


def cmd_build(args) -> int:
    from cpugen import knobs
    from cpugen.runtime import native

    knobs.current()
    for name, what in native.build_all().items():
        print(f"{name}: {what}")
    return 0


def cmd_generate(args) -> int:
    from cpugen.model.tokenizer import load_tokenizer
    from cpugen.progress import progress
    from cpugen.runtime.engine import generate
    from cpugen.runtime.sampling import Sampling
    from cpugen.runtime.session import check_lengths, open_session

    if not args.prompt and not args.prompt_ids:
        raise CpugenError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    if args.greedy and args.temperature:
        raise CpugenError("--greedy and --temperature contradict each other: choose one")
    s = open_session(args.model, layers=args.layers, backend=args.backend, dtype=args.dtype, threads=args.threads,
                     seed=args.seed, quiet=args.quiet or args.json == "-")
    cfg = s.cfg
    tok = load_tokenizer(s.checkpoint) if (args.prompt or s.checkpoint) else None
    if args.prompt and tok is None:
        raise CpugenError(f"--prompt needs a tokenizer.json beside the checkpoint ({args.model}); "
                          "use --prompt-ids instead")
    prompts = [tok.encode(p) for p in args.prompt] + list(args.prompt_ids)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    longest = max(len(p) for p in prompts)
    check_lengths(cfg, longest, args.max_new_tokens, prompt="the prompt", new="--max-new-tokens")
    for p in prompts:
        for t in p:
            if not 0 <= t < cfg.vocab_size:
                raise CpugenError(f"token id {t} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    # the batch is the prompts: the plan checks it fits before anything large is allocated, and
    # sizes prefill's chunks and micro-batches
    plan = s.plan(longest, args.max_new_tokens, len(prompts), args.memory_budget, args.host_memory,
                  what=f"{len(prompts)} prompts of up to {longest} tokens + {args.max_new_tokens} new tokens",
                  hint="give fewer or shorter prompts, fewer --max-new-tokens, or a larger --memory-budget")
    s.load()
    s.ready_for(len(prompts))
    bar = progress("generating", s.quiet)
    out = generate(s.model, prompts, args.max_new_tokens, sampling, s.dtype, cfg.eos_ids + args.stop_ids,
                   args.ignore_eos, s.forward, on_token=bar.update if bar else None,
                   prefill_chunk=plan.prefill_chunk, prefill_micro_batch=plan.prefill_micro_batch)
    text = [tok.decode(ids) for ids in out] if tok else None
    if args.json:
        print(json.dumps({"tokens": out, "text": text}))
    else:
        for i, ids in enumerate(out):
            print(text[i] if text else ",".join(map(str, ids)))
    return 0


def cmd_probe(args) -> int:
    from cpugen.model.source import resolve
    from cpugen.perf.probe import probe
    from cpugen.runtime.planner import fmt, parse_bytes

    cfg, _ = resolve(args.model, args.layers)
    limit = parse_bytes(args.memory_limit)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'batch':>6} {'predicted peak':>15} {'measured peak':>14} {'result':>7} {'pred/meas':>9}  note",
          file=out, flush=True)

    def row(t):
        meas = fmt(t.measured_peak_bytes) if t.measured_peak_bytes else "-"
        ratio = f"{t.ratio:.3f}" if t.ratio else "-"
        print(f"{t.batch_size:>6} {fmt(t.predicted_peak_bytes):>15} {meas:>14} {'fit' if t.fits else 'OOM':>7} "
              f"{ratio:>9}  {t.why}", file=out, flush=True)

    backend = "eager" if args.backend == "auto" else args.backend
    try:
        rep = probe(cfg, args.model, args.prompt_len, args.gen_len, limit, backend, args.dtype, args.decode_steps,
                    args.threads, args.limit_kind, args.max_batch, row, tp=args.tp, tp_timeout=args.tp_timeout)
    except RuntimeError as e:  # a try that failed for another reason than memory, or no cgroup to make
        raise CpugenError(str(e)) from None
    print(f"planner: batch {rep['planner_batch']}; probe: batch {rep['probe_batch']} "
          f"(limit {fmt(rep['limit_bytes'])} by {rep['limit_kind']}"
          + (f", {fmt(rep['rank_limit_bytes'])} for each of {rep['tp']} ranks" if rep["tp"] > 1 else "")
          + (", the top of the searched range" if rep["probe_batch"] == rep["search_top"] else "") + ")", file=out)
    if args.json == "-":
        print(json.dumps(rep))
    elif args.json:
        _write(Path(args.json), json.dumps(rep, indent=1) + "\n")
    return 0


def cmd_nightly(args) -> int:
    from cpugen.perf import nightly

    return nightly.main(args)


def _write(path: Path, text: str):
    try:
        path.write_text(text)
    except OSError as e:
        raise CpugenError(f"cannot write {path}: {e.strerror}") from None


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "bench": cmd_bench, "roofline": cmd_roofline, "generate": cmd_generate,
            "build": cmd_build, "probe": cmd_probe, "nightly": cmd_nightly}


def _ranks(tp) -> int:
    """--tp's number: `auto` is one rank per NUMA node with cores this process may use."""
    if tp != "auto":
        return tp
    from cpugen.host.placement import allowed_cores, numa_nodes

    return max(1, sum(1 for cs in numa_nodes().values() if set(cs) & allowed_cores()))


SPLIT = ("run", "bench", "generate", "nightly")  # the commands that run a split model (plan only plans one)


def _split(args, argv: list[str]) -> int:
    """A command with --tp: started as a rank (torchrun, or cpugen's launcher), it joins the group
    and runs; started by the user on one host, it launches its ranks."""
    from cpugen.runtime import launcher

    tp = _ranks(args.tp)
    if not launcher.in_rank():
        if tp == 1:
            return COMMANDS[args.command](args)
        return launcher.launch(argv, tp)
    from cpugen.runtime import distributed

    group = distributed.init(tp, args.tp_timeout)
    if group.rank:  # rank 0 writes the results; the others speak only when they fail
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
        if getattr(args, "json", None) not in (None, "-"):
            args.json = None
        if getattr(args, "out", None):
            args.out = None
    ok = False
    try:
        code = COMMANDS[args.command](args)
        ok = code == 0
        return code
    finally:
        distributed.finish(ok)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv or ["run"])
        if args.command is None:  # options without a command: `cpugen --model X` means run
            argv = ["run", *argv]
            args = parser().parse_args(argv)
        if args.command in SPLIT:
            return _split(args, argv)
        return COMMANDS[args.command](args)
    except CpugenError as e:
        print(f"cpugen: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("cpugen: error: out of memory: use a smaller --batch-size, shorter prompt/generation or "
              "fewer --layers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cpugen: interrupted", file=sys.stderr)
        return 130


def _rank_prefix() -> str:
    d = sys.modules.get("cpugen.runtime.distributed")
    g = getattr(d, "current", None)
    return f"rank {g.rank} ({g.hosts[g.rank] if g.hosts else '?'}): " if g is not None else ""


if __name__ == "__main__":
    sys.exit(main())
