"""Side by side: cpugen's packed-layout kernel (`linear_packed`) as built from a git commit's kernels/
and as built from this tree's, in one process, on gptj-1b's four matrix shapes (several layers of
them, beyond the caches: every matrix once a pass, as prefill and decode call them), the two builds
in a shuffled order within each round. For each row count of x: TFLOP/s of each build (median over
the rounds, min-max), the ratio this tree / base of each round (median, min-max), and whether the
two builds give the same outputs bit for bit (each packs its own copy of the weights, since the
layout itself may differ between commits).

    python kernels/bench_ab.py --base 8345313 [--rows 32,128,512] [--rounds 7] [--layers 2]
    CPUGEN_ISA=avx512 python kernels/bench_ab.py --base HEAD~1 --rows 64,512

CPUGEN_ISA caps both builds alike (each reads it as it loads). The base's kernels/ is taken with
`git archive` into a temporary folder and built there with cpugen's own compiler flags
(cpugen/runtime/native.py); this tree's build is the cached one (`python -m cpugen build`). The
module is the one holding the packed kernel at this level: gemv_bf16 with AVX-512, avx2 without.
"""

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpugen.host.cpu import cpu_info  # noqa: E402
from cpugen.runtime import native  # noqa: E402


def base_sources(commit: str, module: str, folder: Path) -> Path:
    """kernels/<module>.cpp as of `commit`, with its headers, under `folder`; exits with one line
    where git cannot give it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kernels"], capture_output=True)
    if archive.returncode:
        why = archive.stderr.decode().strip().splitlines()
        sys.exit(f"bench_ab: git cannot give kernels/ at {commit!r} ({why[-1] if why else 'no git here'}): "
                 "pass a commit of this repository with --base")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    source = folder / "kernels" / f"{module}.cpp"
    if not source.exists():
        sys.exit(f"bench_ab: kernels/{module}.cpp does not exist at {commit}: pass a later commit with --base")
    return source


def build(source: Path, module: str, folder: Path):
    """`source` built in `folder` with cpugen's flags, as a module of its own name."""
    from torch.utils import cpp_extension

    print(f"building {source} (about half a minute)", file=sys.stderr)
    folder.mkdir()
    return cpp_extension.load(name=f"cpugen_ab_{module}", sources=[str(source)], extra_cflags=list(native.CFLAGS),
                              extra_ldflags=list(native.LDFLAGS), build_directory=str(folder), verbose=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare this tree's kernels with")
    ap.add_argument("--rows", default="32,128,512", help="rows of x, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=2, help="gptj-1b layers' worth of matrices a pass")
    ap.add_argument("--hidden", type=int, default=2048, help="n_embd (the MLP is 4x it): gptj-1b's 2048")
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    module = "gemv_bf16" if cpu_info()["avx512"] else "avx2"
    with tempfile.TemporaryDirectory(prefix="cpugen-ab-") as tmp:
        source = base_sources(a.base, module, Path(tmp))
        new = native.extension(module)
        if new is None or not new.packed_available():
            sys.exit(f"bench_ab: no packed kernel at this level ({native.why_not(module) or 'packed_available() is False'})")
        base = build(source, module, Path(tmp) / "build")
        builds = {"base": base, "tree": new}
        h = a.hidden
        shapes = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)] * a.layers  # wqkv, wo, w_in, w_out
        g = torch.Generator().manual_seed(0)
        plain = [(torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16) for n, k in shapes]
        weights = {}
        for name, ext in builds.items():
            weights[name] = []
            for w in plain:
                p = torch.empty(ext.packed_shape(*w.shape), dtype=torch.bfloat16)
                ext.pack_into(w, p)
                weights[name].append((p, w.shape[0], w.shape[1]))
        del plain
        flop_per_row = sum(2 * n * k for n, k in shapes)
        same = {}
        for m in rows:
            x = {k: torch.randn(m, k, generator=g).to(torch.bfloat16) for k in {k for _, k in shapes}}
            outs = {name: [builds[name].linear_packed(x[k], p, n, None, 0) for p, n, k in weights[name][:4]]
                    for name in builds}
            diff = max((s.float() - t.float()).abs().max().item() for s, t in zip(outs["base"], outs["tree"]))
            same[m] = "yes" if diff == 0 else f"no (max |diff| {diff:.3g})"
        rates = {(m, name): [] for m in rows for name in builds}
        for r in range(a.rounds):
            order = [(m, name) for m in rows for name in builds]
            random.shuffle(order)
            for m, name in order:
                x = {k: torch.randn(m, k, generator=g).to(torch.bfloat16) for k in {k for _, k in shapes}}
                ext, reps = builds[name], max(1, 64 // m)
                ext.linear_packed(x[shapes[0][1]], *weights[name][0][:2], None, 0)  # warm
                t0 = time.perf_counter()
                for _ in range(reps):
                    for p, n, k in weights[name]:
                        ext.linear_packed(x[k], p, n, None, 0)
                rates[(m, name)].append(flop_per_row * m * reps / (time.perf_counter() - t0) / 1e12)
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr)

    def cell(v):
        return f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"

    how = "".join(f", {f} {getattr(new, f)()!r}" for f in ("packed_isa", "packed_multiply") if hasattr(new, f))
    print(f"## linear_packed, kernels/ at {a.base} against this tree: {module} at {new.isa()}{how} (this tree), "
          f"{torch.get_num_threads()} threads")
    print(f"\n{a.layers} layers of gptj's matrices at n_embd {a.hidden}, every matrix once a pass; medians of "
          f"{a.rounds} rounds (min-max), the builds in a shuffled order within each round\n")
    print("| rows | base TFLOP/s | tree TFLOP/s | tree / base | same outputs |")
    print("|---|---|---|---|---|")
    for m in rows:
        ratio = [t / b for b, t in zip(rates[(m, "base")], rates[(m, "tree")])]
        print(f"| {m} | {cell(rates[(m, 'base')])} | {cell(rates[(m, 'tree')])} | "
              f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | {same[m]} |")


if __name__ == "__main__":
    main()
