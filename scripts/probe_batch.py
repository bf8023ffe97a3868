#!/usr/bin/env python3
"""Find the real largest batch that does not run out of memory, beside the planner's answer.

    python scripts/probe_batch.py --model gptj-1b --layers 2 --prompt-len 64 --gen-len 1984 --memory-limit 3GiB

Each try runs the real workload in a child process under a hard memory limit (see cpugen/probe.py);
a try that runs out of memory is an OOM row, never the probe's own death."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.config import resolve  # noqa: E402
from cpugen.errors import CpugenError  # noqa: E402
from cpugen.planner import fmt, parse_bytes  # noqa: E402
from cpugen.probe import probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--gen-len", type=int, default=100)
    ap.add_argument("--memory-limit", required=True, help="hard limit for each try, e.g. 3GiB")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--decode-steps", type=int, default=3, help="decode steps each try runs")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--limit-kind", default="auto", choices=("auto", "cgroup", "rlimit", "watchdog"))
    ap.add_argument("--max-batch", type=int, help="never try a batch above this")
    ap.add_argument("--json", metavar="PATH|-", help="write the report as JSON")
    a = ap.parse_args()
    try:
        cfg, _ = resolve(a.model)
        cfg = cfg.with_layers(a.layers)
        limit = parse_bytes(a.memory_limit)
        print(f"{'batch':>6} {'predicted peak':>15} {'measured peak':>14} {'result':>7} {'pred/meas':>9}  note",
              file=sys.stderr if a.json == "-" else sys.stdout, flush=True)

        def row(t):
            meas = fmt(t.measured_peak_bytes) if t.measured_peak_bytes else "-"
            ratio = f"{t.ratio:.3f}" if t.ratio else "-"
            print(f"{t.batch_size:>6} {fmt(t.predicted_peak_bytes):>15} {meas:>14} {'fit' if t.fits else 'OOM':>7} "
                  f"{ratio:>9}  {t.why}", file=sys.stderr if a.json == "-" else sys.stdout, flush=True)

        rep = probe(cfg, a.model, a.prompt_len, a.gen_len, limit, a.backend, a.dtype, a.decode_steps, a.threads,
                    {"rlimit": "rlimit", "watchdog": "watchdog"}.get(a.limit_kind, a.limit_kind), a.max_batch, row)
    except (CpugenError, RuntimeError) as e:
        print(f"probe_batch: error: {e}", file=sys.stderr)
        return 2
    summary = (f"planner: batch {rep['planner_batch']}; probe: batch {rep['probe_batch']} "
               f"(limit {fmt(rep['limit_bytes'])} by {rep['limit_kind']}"
               + (", the top of the searched range" if rep["probe_batch"] == rep["search_top"] else "") + ")")
    print(summary, file=sys.stderr if a.json == "-" else sys.stdout)
    if a.json == "-":
        print(json.dumps(rep))
    elif a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
