"""The memory-aware batch planner: what a run needs, term by term, and the largest batch that fits.

predicted peak = runtime baseline + weights + max(KV cache + activation/workspace peak, repack)
                 (resident memory; repack: the largest weight matrix, held twice for the moment a
                 backend repacks it in place, before the KV cache exists)
budget         = what this process may use: min(system available, cgroup limit - usage) plus what
                 it already holds, or --memory-budget, or --host-memory less an OS reserve
batch          = the largest B with predicted peak(B) + headroom <= budget

Resident memory includes mapped file pages (the shared libraries' code, reported as file_backed):
an out-of-memory limit does not count those the page cache already holds, so a hard limit lets a
run go a little past the budget in RSS; the planner keeps RSS itself under the budget.

Activations stay bounded: prefill runs the prompt in chunks of at most `prefill_chunk` tokens and
the batch in micro-batches of `prefill_micro_batch` sequences, chosen so that prefill scratch stays
under a cap (a small share of the budget), so memory goes to sequences, not scratch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import psutil

from cpugen.model.config import ModelConfig
from cpugen.errors import CpugenError
from cpugen.model import shard
from cpugen.model.shapes import block_matrices, largest_matrix
from cpugen.model.shard import Shard
from cpugen.model.transformer import WIDEN_BLOCK_BYTES
from cpugen.runtime.eager import widen_wanted
from cpugen.model.kv_cache import kv_cache_bytes
from cpugen.host.cgroup import cgroup_room
from cpugen.host.memory import rss_bytes, rss_file_bytes

GiB = 1024**3
MiB = 1024**2
UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MiB, "mb": 1000**2, "mib": MiB,
         "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}

# Measured on the 2-core development machine (torch 2.13, 2 threads): what the process holds beyond
# torch's import and the tensors it allocates: oneDNN/OpenMP thread pools, primitive caches, the
# allocator's retained blocks. Calibrated with scripts/probe_batch.py (see docs/planner.md).
RUNTIME_WORKSPACE = 96 * MiB
HEADROOM_FIXED = 32 * MiB  # margin between the predicted peak and the budget
HEADROOM_SHARE = 0.03  # ... plus this share of weights + KV cache (allocator fragmentation)
# oneDNN's own memory where its AMX kernels take plain bf16 weights (the amx level's auto layout):
# runs peaked 111-137 MiB above the predicted peak on 2 Xeon AMX cores (gptj-1b, 1-4 layers, 1-2
# threads, batch 60; 18-58 MiB with the packed layouts), which the headroom above mostly covered:
# the planned batch of tests/test_planner.py ran 2 MiB over its 3 GiB limit. Held back on top.
ONEDNN_AMX_RESERVE = 64 * MiB


def library_reserve(backend: str, itemsize: int) -> int:
    """ONEDNN_AMX_RESERVE where oneDNN's AMX kernels multiply plain bf16 weights, else 0."""
    from cpugen import knobs
    from cpugen.host.cpu import cpu_info

    plain = backend == "eager" and itemsize == 2 and knobs.current().layout != "packed"
    return ONEDNN_AMX_RESERVE if plain and cpu_info()["amx_bf16"] else 0
OS_RESERVE_SHARE = 0.03  # --host-memory: kept back for the kernel and other processes
BACKEND_WEIGHT_COPIES = {"eager": 1.0, "ipex": 1.0}  # ipex.optimize(inplace=True) repacks in place


def parse_bytes(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if not m or m.group(2).lower() not in UNITS:
        raise CpugenError(f"cannot read memory size {s!r}: use e.g. 20GiB, 512GB or 1500MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# --- the budget --------------------------------------------------------------------------------------
@dataclass
class Budget:
    bytes: int
    source: str  # how it was found, for the report


def budget(memory_budget: str | None = None, host_memory: str | None = None) -> Budget:
    if memory_budget and host_memory:
        raise CpugenError("give --memory-budget or --host-memory, not both")
    if memory_budget:
        return Budget(parse_bytes(memory_budget), "--memory-budget")
    if host_memory:
        host = parse_bytes(host_memory)
        return Budget(int(host * (1 - OS_RESERVE_SHARE)),
                      f"--host-memory {fmt(host)} less {OS_RESERVE_SHARE:.0%} for the OS")
    avail = psutil.virtual_memory().available
    room = cgroup_room()
    held = rss_bytes()
    if room is not None and room < avail:
        return Budget(held + room, f"cgroup limit: {fmt(room)} free + {fmt(held)} held by this process")
    return Budget(held + avail, f"available memory: {fmt(avail)} + {fmt(held)} held by this process")


# --- the memory model -------------------------------------------------------------------------------
def token_activation_bytes(cfg: ModelConfig, itemsize: int, widened: bool = False) -> int:
    """Scratch per token in flight through one block (the block's largest live set); `widened`:
    bf16 matmuls run as fp32 GEMM (widened_linear), with an fp32 copy of their input."""
    h, q, kv, ffn = cfg.n_embd, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    widen = 4 * max(h, q, ffn) if widened else 0
    residual = 3 * h * itemsize  # x, the block's output, GPT-J's attention branch beside the MLP
    norm = h * (4 + itemsize)  # fp32 normalization, cast back
    attn = (q + 2 * kv) * itemsize + 2 * q * 4 + q * itemsize  # qkv, fp32 rotary of q/k, attention out
    mlp = (3 if cfg.mlp == "glu" else 2) * ffn * itemsize  # w_in out (2 ffn for glu), activation
    return residual + norm + max(attn, mlp) + widen


def activation_bytes(cfg: ModelConfig, tokens: int, seqs: int, itemsize: int, widened: bool = False) -> int:
    """Activation peak of one forward over `seqs` sequences of `tokens` new tokens each."""
    logits = seqs * cfg.vocab_size * (itemsize + 4 + 4)  # lm_head output, fp32 copy for sampling, probs
    scratch = 2 * WIDEN_BLOCK_BYTES if widened else 0  # the widened weight block and its output block
    return seqs * tokens * token_activation_bytes(cfg, itemsize, widened) + logits + scratch


@dataclass
class Plan:
    model: str
    n_layer: int
    backend: str
    prompt_len: int
    gen_len: int
    batch_size: int  # 0 when nothing fits
    budget_bytes: int
    budget_source: str
    weight_bytes: int
    kv_cache_bytes_per_seq: int
    kv_cache_bytes: int
    activation_bytes: int
    prefill_activation_bytes: int
    decode_activation_bytes: int
    prefill_chunk: int
    prefill_micro_batch: int
    repack_bytes: int  # the largest weight matrix: held twice while it is repacked, before the cache exists
    overhead_bytes: int  # runtime baseline: interpreter, torch, thread pools (measured)
    file_backed_bytes: int  # of which mapped library pages, reclaimable (measured)
    headroom_bytes: int
    predicted_peak_bytes: int
    max_batch_size: int | None = None
    limited_by: str = "memory"
    tp: int = 1  # ranks: the memory figures are one rank's (the one that needs the most)

    def to_dict(self) -> dict:
        return asdict(self)


def runtime_overhead() -> int:
    """This process's resident memory now (interpreter, torch, cpugen) plus the runtime workspace."""
    return rss_bytes() + RUNTIME_WORKSPACE


PREFILL_TOKENS = 2048  # tokens per prefill forward: enough to keep the matmuls compute-bound


def _prefill_shape(cfg: ModelConfig, batch: int, prompt_len: int, itemsize: int, cap: int,
                   widened: bool = False) -> tuple[int, int]:
    """(chunk, micro_batch): prefill pieces of about PREFILL_TOKENS tokens whose scratch stays under cap."""
    per_token = token_activation_bytes(cfg, itemsize, widened)
    tokens = max(64, min(PREFILL_TOKENS, cap // max(per_token, 1)))
    chunk = min(prompt_len, tokens)
    micro = max(1, min(batch, tokens // chunk))
    return chunk, micro


def memory_at(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, itemsize: int, backend: str,
              overhead: int, file_backed: int, act_cap: int, s: Shard = Shard()) -> dict:
    """One rank's memory (the whole model's for a single process): its slices of the weights, the
    KV cache of its kv heads, activations of its share of each block, and, split, the logits
    gathered from every rank."""
    local = shard.local_config(cfg, s)
    weights = int(shard.n_params_of_rank(cfg, s) * itemsize * BACKEND_WEIGHT_COPIES.get(backend, 1.0))
    kv_seq = kv_cache_bytes(local, 1, prompt_len + gen_len, itemsize)
    widened = backend == "eager" and itemsize == 2 and widen_wanted()
    chunk, micro = _prefill_shape(local, batch, prompt_len, itemsize, act_cap, widened)
    gathered = 0 if s.whole else 2 * cfg.vocab_size * itemsize  # per sequence: the ranks' parts and their join
    pre = activation_bytes(local, chunk, micro, itemsize, widened) + micro * gathered
    dec = activation_bytes(local, 1, batch, itemsize, widened) + batch * gathered
    act = max(pre, dec)
    kv = kv_seq * batch
    repack = largest_matrix_bytes(cfg, itemsize, s)
    headroom = HEADROOM_FIXED + int(HEADROOM_SHARE * (weights + kv)) + library_reserve(backend, itemsize)
    return dict(weight_bytes=weights, kv_cache_bytes_per_seq=kv_seq, kv_cache_bytes=kv, activation_bytes=act,
                prefill_activation_bytes=pre, decode_activation_bytes=dec, prefill_chunk=chunk,
                prefill_micro_batch=micro, repack_bytes=repack, overhead_bytes=overhead,
                file_backed_bytes=file_backed, headroom_bytes=headroom,
                predicted_peak_bytes=overhead + weights + max(kv + act, repack))


def largest_matrix_bytes(cfg: ModelConfig, itemsize: int, s: Shard = Shard()) -> int:
    """The largest weight matrix (of a rank's slices): the eager backend's repacking into cpugen's
    layout, IPEX's and oneDNN's all replace one matrix at a time, so for a moment it is held twice."""
    if s.whole:
        return largest_matrix(cfg) * itemsize
    v0, v1 = shard.vocab_rows(cfg, s)
    head = 0 if cfg.tie_embeddings else (v1 - v0) * cfg.n_embd
    return max(head, *(o * i for o, i in block_matrices(shard.local_config(cfg, s)).values())) * itemsize


def needed(m) -> int:
    """What must fit in the budget: the predicted peak of resident memory plus headroom."""
    get = m.get if isinstance(m, dict) else lambda k: getattr(m, k)
    return get("predicted_peak_bytes") + get("headroom_bytes")


def plan(cfg: ModelConfig, prompt_len: int, gen_len: int, itemsize: int = 2, backend: str = "eager",
         memory_budget: str | None = None, host_memory: str | None = None, max_batch_size: int | None = None,
         batch_size: int | None = None, overhead: int | None = None, file_backed: int | None = None,
         tp: int = 1, ranks_per_host: int = 1) -> Plan:
    """The largest batch that fits (or, with batch_size, the plan for that batch). With `tp` ranks,
    the plan of the rank that needs the most, against its share of its host's budget (the budget
    divided among the `ranks_per_host` ranks on one host)."""
    if prompt_len < 1 or gen_len < 1:
        raise CpugenError("--prompt-len and --gen-len must be at least 1")
    shard.check(cfg, tp)
    b = budget(memory_budget, host_memory)
    if ranks_per_host > 1 and not memory_budget and not host_memory:  # measured: the ranks here share it
        b = Budget(b.bytes // ranks_per_host, f"{b.source}, shared by {ranks_per_host} ranks")
    ranks = [Shard(r, tp) for r in range(tp)]
    overhead = runtime_overhead() if overhead is None else overhead
    file_backed = rss_file_bytes() if file_backed is None else file_backed
    act_cap = max(128 * MiB, b.bytes // 100)  # prefill scratch: about 1% of the budget

    def at(n: int) -> dict:  # the rank that needs the most (rank 0: the most vocabulary rows)
        return max((memory_at(cfg, n, prompt_len, gen_len, itemsize, backend, overhead, file_backed, act_cap, r)
                    for r in ranks), key=needed)

    def fits(n: int) -> bool:
        return needed(at(n)) <= b.bytes

    limited_by = "memory"
    if batch_size is not None:
        best = batch_size
    elif not fits(1):
        best = 0
    else:  # exponential then binary search: peak grows monotonically with the batch
        lo, hi = 1, 2
        while (max_batch_size is None or hi <= max_batch_size) and fits(hi):
            lo, hi = hi, hi * 2
        if max_batch_size is not None:  # hi: the first batch that does not fit or is above the cap
            hi = min(hi, max_batch_size + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        best = lo
        if max_batch_size is not None and best >= max_batch_size:
            best, limited_by = max_batch_size, "--max-batch-size"
    m = at(max(best, 1))
    return Plan(model=cfg.name, n_layer=cfg.n_layer, backend=backend, prompt_len=prompt_len, gen_len=gen_len,
                batch_size=best, budget_bytes=b.bytes, budget_source=b.source, max_batch_size=max_batch_size,
                limited_by=limited_by, tp=tp, **m)


def shortfall(p: Plan, what: str, hint: str) -> str:
    """One line: what `what` needs against the budget, then what to change."""
    return (f"{what} needs {fmt(needed(p))} with headroom but the budget is {fmt(p.budget_bytes)} "
            f"({p.budget_source}): {hint}")


def explain_no_fit(p: Plan, cfg: ModelConfig, itemsize: int) -> str:
    """One line: how much is missing and what would make batch 1 fit."""
    need = needed(p)
    missing = need - p.budget_bytes
    again = dict(itemsize=itemsize, backend=p.backend, memory_budget=f"{p.budget_bytes}B",
                 batch_size=1, overhead=p.overhead_bytes, file_backed=p.file_backed_bytes)

    def fits(**kw) -> bool:
        q = plan(**{"cfg": cfg, "prompt_len": p.prompt_len, "gen_len": p.gen_len, **again, **kw})
        return needed(q) <= q.budget_bytes

    hints = []
    layers = max((n for n in range(1, cfg.n_layer) if fits(cfg=cfg.with_layers(n))), default=0)
    if layers:
        hints.append(f"--layers {layers} or fewer")
    if fits(prompt_len=1, gen_len=1):
        hints.append("a shorter prompt or generation")
    if p.tp == 1 and p.budget_source.startswith("--host-memory"):  # ranks on hosts of this size
        split = next((t for t in (2, 4, 8, 16, 32, 64) if shard.problem(cfg, t) is None
                      and fits(tp=t)), None)
        if split:
            hints.append(f"--tp {split} over {split} hosts of this size (one rank each)")
    hints.append(f"--memory-budget {fmt(need)} (a host of {fmt(need / (1 - OS_RESERVE_SHARE))})")
    return (f"{p.model} at batch 1 needs {fmt(need)} ({fmt(p.weight_bytes)} weights, "
            f"{fmt(p.kv_cache_bytes_per_seq)} KV cache, {fmt(need - p.weight_bytes - p.kv_cache_bytes_per_seq)} "
            f"runtime, activations and margin) but the budget is {fmt(p.budget_bytes)} ({p.budget_source}): "
            f"{fmt(missing)} short; use " + ", or ".join(hints))


def report(p: Plan) -> str:
    rows = [
        ("weights", p.weight_bytes, f"{p.model}, {p.n_layer} layers, as the {p.backend} backend holds them"),
        ("KV cache", p.kv_cache_bytes, f"{p.batch_size} x {fmt(p.kv_cache_bytes_per_seq)} per sequence "
                                       f"({p.prompt_len}+{p.gen_len} tokens)"),
        ("activations", p.activation_bytes, f"peak of prefill {fmt(p.prefill_activation_bytes)} (chunks of "
                                            f"{p.prefill_chunk} tokens x {p.prefill_micro_batch} sequences) "
                                            f"and decode {fmt(p.decode_activation_bytes)}"),
        ("repack", p.repack_bytes, "the largest matrix, held twice while the backend repacks it (before the "
                                   "KV cache exists: counted where it exceeds KV cache + activations)"),
        ("runtime", p.overhead_bytes, "interpreter, torch, thread pools (measured)"),
        ("predicted peak", p.predicted_peak_bytes, "resident memory"),
        ("file-backed", p.file_backed_bytes, "of which mapped library pages the kernel can reclaim"),
        ("headroom", p.headroom_bytes, "margin kept free"),
        ("budget", p.budget_bytes, p.budget_source),
    ]
    lines = [f"{name:>15}  {fmt(v):>12}  {note}" for name, v, note in rows]
    if p.tp > 1:
        lines.insert(0, f"tensor parallel over {p.tp} ranks: each figure is one rank's (the one that needs the most: "
                        "its slices of the weights, the KV cache of its kv heads, the gathered logits)")
    verdict = (f"largest batch: {p.batch_size}" + (" (capped by --max-batch-size)" if p.limited_by != "memory" else "")
               if p.batch_size else "largest batch: none (batch 1 does not fit)")
    return "\n".join(lines + [verdict])

