"""The eager backend's native routes: cpugen's kernels installed into a built model.

- every Linear gets the gemv for decode's skinny matmuls on the plain weights, or, on CPUs with
  AVX512-BF16 and without AMX, its weight repacked once into cpugen's packed layout (`panels`),
  which one kernel multiplies at every batch, prefill's included (docs/performance.md, "cpugen's
  packed layout"); with AMX, oneDNN's tile kernels are prefill's fastest path and read the plain
  layout, so the weights stay plain there (CPUGEN_LAYOUT=packed packs them for cpugen's own tile
  kernel, kernels/packed_amx.h: ahead of oneDNN at decode batches of 8-32, behind it in prefill);
  without AVX-512 they are packed at load where this
  host's measured choice says kernels/packed_avx2.h streams faster than the AVX2 gemv at every
  batch (layout.py), else for decode batches above the choice's `pack_above` (`for_batch`), and
  until then that kernel takes matmuls of more rows (prefill) on the plain weights, packing as it
  goes;
- Attention gets the fused decode step (rotary, cache write, attention over the cache);
- Norm and a GLU MLP's product get kernels/norm.h and kernels/glu.h, which the decode stack runs
  too, so the Python blocks and the stack agree bit for bit;
- where every block has its native parts, the decode stack (stack.py).
Where the weights stay plain, decode batches above the gemv's rows reorder them once into
oneDNN's blocked layout (`for_batch`). CPUGEN_NATIVE=0, CPUGEN_LAYOUT=plain and CPUGEN_REORDER=0
switch each off (cpugen/knobs.py).
"""

from __future__ import annotations

import torch

from cpugen import knobs
from cpugen.host.cpu import cpu_info
from cpugen.host.memory import release_freed
from cpugen.model.activations import KERNEL_CODE
from cpugen.model.transformer import MLP, Attention, Linear, Norm, Transformer
from cpugen.runtime import distributed, layout, native, stack


# widened fp32 GEMM from this many rows up: on 2 Zen 3 cores, an 8192 x 2048 weight, PyTorch's bf16
# F.linear leads at 1-4 rows (1.8 / 3.3 / 6.7 ms against 3.9 / 5.3 / 8.5), widened_linear from 8
# (9.3 ms against 12.9; 5.0x at 64 rows, 7.1x at 1024): kernels/bench_widen.py
WIDEN_ABOVE_ROWS = 4


def widen_wanted() -> bool:
    """Whether bf16 matmuls above a few rows run as fp32 GEMM on widened weight blocks: on CPUs
    without AVX-512, where PyTorch's bf16 matmuls run at 1-21 GFLOP/s against 150-165 for fp32
    (docs/performance.md, "CPUs without AVX-512"). CPUGEN_WIDEN=0 keeps PyTorch's bf16 GEMM."""
    return knobs.current().widen and not cpu_info()["avx512"]


def prepare(model: Transformer):
    """The eager backend for a bf16 model: widened GEMM where the CPU wants it, then the native
    kernels where they run."""
    if widen_wanted():
        for m in model.modules():
            if isinstance(m, Linear):
                m.widen_above = WIDEN_ABOVE_ROWS
    install(model)


def panels_wanted() -> bool:
    """Whether bf16 weights are repacked into cpugen's packed layout at load. CPUGEN_LAYOUT=plain:
    never; packed: wherever a packed kernel runs (with AMX, kernels/packed_amx.h's tiles). auto: on
    CPUs with AVX-512 and without AMX (its kernel takes vdpbf16ps with AVX512-BF16, fp32 FMA on the
    widened pairs without; with AMX, oneDNN's tile kernels are prefill's fastest path on the plain
    layout: docs/performance.md, "AMX"), and at the AVX2 level
    where this host's measured choice says so (layout.py; otherwise for_batch packs them for
    decode batches above its `pack_above`)."""
    k = knobs.current().layout
    if k != "auto":
        return k == "packed"
    info = cpu_info()
    if info["avx512"]:
        return not info["amx_bf16"]
    return avx2_packs_at_load()


def _avx2_layout_ext():
    """The AVX2 module where the AVX2 level's layout is this host's choice (the level in use, the
    native kernels on, CPUGEN_LAYOUT=auto, the module built), else None."""
    info, k = cpu_info(), knobs.current()
    if k.layout != "auto" or not k.native or info["avx512"] or not info["avx2"]:
        return None
    return native.extension("avx2")


def avx2_packs_at_load() -> bool:
    """The AVX2 level's choice (layout.choose: this process's, the cached figures, or timed now)."""
    ext = _avx2_layout_ext()
    return ext is not None and layout.choose(ext)["packed"]


def avx2_pack_above() -> int:
    """At the AVX2 level, decode batches above this many sequences pack the plain weights: this
    host's choice under CPUGEN_LAYOUT=auto (layout.choose), else layout.PACK_ABOVE."""
    ext = _avx2_layout_ext()
    return layout.choose(ext)["pack_above"] if ext is not None else layout.PACK_ABOVE


def choose_layout(group=None, log=lambda *a: None, room_bytes: int | None = None) -> dict | None:
    """Before the weights load (the timing allocates its own, within `room_bytes` where given): at
    the AVX2 level under CPUGEN_LAYOUT=auto, this host's layout choice, made once; in a
    tensor-parallel run rank 0's, which every rank takes (each takes part in the broadcast, whatever
    its own level). Returns it (None where the level has no such choice), for the record."""
    ext = _avx2_layout_ext()
    mine = layout.choose(ext, log=log, room_bytes=room_bytes) if ext is not None and (
        group is None or group.rank == 0) else None
    if group is None:
        return mine
    chosen = distributed.same(group, mine)
    return layout.adopt(chosen, ext) if chosen is not None and ext is not None else None


def available(build: bool = True) -> bool:
    """Whether the eager backend gets cpugen's native bf16 decode kernels on this machine. With
    `build`, they are built first where `python -m cpugen build` has not; without, kernels not yet
    built count as available where the CPU can run them (choosing a backend compiles nothing)."""
    info = cpu_info()
    if not knobs.current().native or not info["avx512"]:
        return False
    names = ("gemv_bf16", "decode_attention" if info["avx512_bf16"] else "avx2")  # install()'s attention
    if not build and not all(native.is_built(n) for n in names):
        return all(native.can_run(n) is None for n in names)
    return all(native.extension(n) is not None for n in names)


def install(model: Transformer, pack: bool | None = None) -> bool:
    """Routes the model's bf16 work through the native kernels (see the module's docstring); False
    when they are unavailable or switched off, leaving torch's path in place. With `pack` (default:
    panels_wanted()), every weight not shared with the embedding is repacked into cpugen's layout,
    block by block, each block's freed originals handed back to the OS before the next: the model
    is never held twice."""
    if not knobs.current().native:
        return False
    ext = native.extension()
    if ext is None:
        return install_avx2(model, pack)
    # decode attention: vdpbf16ps where the CPU has it, else the AVX2 kernel (AVX-512 F alone)
    attn = native.extension("decode_attention") if cpu_info()["avx512_bf16"] else native.extension("avx2")
    _route(model, ext, attn)
    _pack(model, ext, pack)
    if all(b.attn.decode_step is not None for b in model.blocks):
        stack.install(model)
    return True


def _pack(model: Transformer, ext, pack: bool | None):
    """With `pack` (default: panels_wanted()) and where `ext` multiplies it, repacks every bf16
    weight not shared with the embedding into cpugen's layout, block by block, each block's freed
    originals handed back to the OS before the next."""
    if not ((panels_wanted() if pack is None else pack) and ext.packed_available()):
        return
    tied = model.wte.weight
    for part in [*model.blocks, model]:  # the model last: its lm_head (the blocks are done by then)
        for m in part.modules():
            if (type(m) is Linear and m.weight is not None and m.weight is not tied
                    and m.weight.dtype == torch.bfloat16 and m.in_features % 2 == 0):
                m.to_panels(ext)
        release_freed()


def _unpack(model: Transformer):
    """Puts every packed weight back into its plain layout, block by block, each block's freed
    panels handed back to the OS before the next (_pack's inverse)."""
    for part in [*model.blocks, model]:
        for m in part.modules():
            if type(m) is Linear and m.panels is not None:
                m.from_panels()
        release_freed()


def install_avx2(model: Transformer, pack: bool | None = None) -> bool:
    """On CPUs with AVX2 but without AVX-512 (or CPUGEN_ISA=avx2): kernels/avx2.cpp's kernels, the
    same routes as install() at 8 lanes: matmuls of up to 16 rows (decode) through the AVX2 gemv,
    which streams the bf16 weights itself instead of PyTorch's bf16 path; larger ones (prefill,
    larger batches) through the packed layout's kernel on the plain weights, packing them a chunk
    at a time as it goes (`linear_plain`: 1.08-1.67x the widened fp32 GEMM it replaces at 64-512
    rows, docs/performance.md); the fused decode step, the norms, a GLU's product, and where every
    block has them, the decode stack at the AVX2 level (up to the gemv's 32 rows). With `pack` (by
    default where this host's measured choice says so, panels_wanted(), else only when for_batch
    asks, for batches above avx2_pack_above()), the weights go into cpugen's packed layout, which
    kernels/packed_avx2.h multiplies at every batch, prefill's included."""
    if cpu_info()["avx512"] or not cpu_info()["avx2"]:
        return False
    ext = native.extension("avx2")
    if ext is None:
        return False
    _route(model, ext, ext, rows=ext.max_rows())
    _pack(model, ext, pack)
    if all(b.attn.decode_step is not None for b in model.blocks):
        stack.install(model)
    return True


def _route(model: Transformer, ext, attn, rows: int | None = None):
    """Gives every module its native kernel: `ext`'s gemv (for up to `rows` rows of x where given,
    else Linear.kernel_rows) and, where `ext` has one (the AVX2 level), its packed kernel on plain
    weights for more than its plain_above() rows, norm and GLU product, `attn`'s decode step (or
    none)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.kernel = ext.gemv
            if hasattr(ext, "linear_plain") and m.in_features % 2 == 0:
                m.plain_kernel, m.plain_above = ext.linear_plain, ext.plain_above()
            if rows is not None:
                m.kernel_rows = rows
        elif isinstance(m, Attention) and attn is not None and stack.attention_supported(m.hd):
            m.decode_step = attn.decode_step
        elif type(m) is Norm and m.weight.dtype == torch.bfloat16 and m.impl is None:
            m.impl = NativeNorm(ext, m)
        elif type(m) is MLP and m.glu and m.product is None:
            m.product = NativeGlu(ext, m)


class NativeNorm:
    """A Norm's computation through kernels/norm.h (bf16 rows, fp32 math); other dtypes take the
    module's torch path."""

    runs_native_kernel = True  # what the decode stack asks of a norm it runs (stack.py)

    def __init__(self, ext, norm):
        self.ext, self.norm = ext, norm

    def __call__(self, x):
        n = self.norm
        if x.dtype != torch.bfloat16:
            return n.reference(x)
        return self.ext.norm(x, n.weight, n.bias, n.eps, n.kind == "rmsnorm")


class NativeGlu:
    """A GLU MLP's act(gate) * up through kernels/glu.h (bf16); other dtypes take the module's
    torch path."""

    runs_native_kernel = True

    def __init__(self, ext, mlp):
        self.ext, self.mlp, self.code = ext, mlp, KERNEL_CODE[mlp.act]

    def __call__(self, gu):
        if gu.dtype != torch.bfloat16:
            return self.mlp.glu_reference(gu)
        return self.ext.glu(gu, self.code)


def gemv_max_batch(model: Transformer | None = None) -> int:
    """Where the weights stay plain, decode batches up to this use cpugen's gemv, larger ones
    oneDNN's reordered weights (docs/performance.md, "Gemv up to 4 rows at plain weights"): the
    model's gemv's rows where it has one (the AVX2 gemv takes 32), else Linear.kernel_rows."""
    m = model.blocks[0].mlp.w_in if model is not None else None
    return m.kernel_rows if m is not None and getattr(m, "kernel", None) is not None else Linear.kernel_rows


def for_batch(model: Transformer, backend: str, dtype: torch.dtype, batch: int):
    """Readies the eager backend's matmuls for decode at `batch`: above gemv_max_batch() the plain
    weights are reordered into oneDNN's blocked layout (in place, layer by layer, one way: the gemv
    needs the plain layout, so a model once reordered stays so). Without AVX-512, above
    avx2_pack_above() they are repacked into cpugen's layout instead, in place, and a later batch
    at or below it under the host's choice (CPUGEN_LAYOUT=auto) puts them back for the gemv, so
    that every batch runs what it would run alone. Weights packed at load serve every batch as they
    are."""
    if backend != "eager" or dtype != torch.bfloat16:
        return
    if not cpu_info()["avx512"] and knobs.current().layout != "plain":
        block, above = model.blocks[0].mlp.w_in, avx2_pack_above()
        if getattr(block, "kernel", None) is None:
            return
        if batch > above and block.panels is None:
            stack.drop(model)  # it holds the plain weights: dropped first, or packing would keep both
            _pack(model, native.extension("avx2"), True)
        elif batch <= above and block.panels is not None and _avx2_layout_ext() is not None:
            stack.drop(model)  # packed by a larger batch before (not at load): this batch's is the gemv
            _unpack(model)
        else:
            return
        if all(b.attn.decode_step is not None for b in model.blocks):
            stack.install(model)
        return
    if batch <= gemv_max_batch(model):
        return
    if not knobs.current().reorder or not cpu_info()["avx512"]:  # oneDNN's bf16 reorder needs AVX-512
        return
    tied = model.wte.weight
    plain = lambda part: [m for m in part.modules()  # noqa: E731
                          if type(m) is Linear and m.weight is not None and m.weight is not tied]
    if any(plain(b) for b in model.blocks):
        stack.drop(model)  # it holds the plain weights: dropped first, or reordering would keep both
    for part in [*model.blocks, model]:
        for m in plain(part):
            m.to_onednn()
        release_freed()


def packed_multiply(model: Transformer) -> str | None:
    """The instruction cpugen's packed kernel multiplies with above 6 rows (prefill, decode batches
    above 6), where the weights are packed at an AVX-512 level: "amx" (tiles), "vdpbf16ps", or
    "fma" (AVX-512 F; and at AVX512-BF16 on CPUs that run vdpbf16ps behind their FMAs: gemv_bf16.h,
    kFmaAhead); "fma" at the AVX2 level; None where the weights are plain."""
    block = model.blocks[0].mlp.w_in
    if getattr(block, "panels", None) is None:
        return None
    if not cpu_info()["avx512"]:
        return "fma"
    ext = native.extension()
    return "amx" if block.in_features % 32 == 0 and ext.packed_isa() == "amx" else ext.packed_multiply()


def decode_matmul(model: Transformer, backend: str, batch: int | None = None) -> str:
    """What ran decode's matmuls (at `batch` sequences, where given), for the record."""
    if backend != "eager":
        return backend
    block = model.blocks[0].mlp.w_in
    if getattr(block, "panels", None) is not None:  # on AMX tiles where the kernel takes them (packed_amx.h)
        amx = cpu_info()["amx_bf16"] and block.in_features % 32 == 0 and native.extension().packed_isa() == "amx"
        return "cpugen-packed-amx" if amx else "cpugen-packed"
    if getattr(block, "onednn", None) is not None:
        return "onednn-packed"
    if getattr(block, "plain_kernel", None) is not None and batch is not None and batch > block.plain_above:
        return "cpugen-plain"  # set beside the gemv, for every batch past plain_above
    if getattr(block, "kernel", None) is not None and (batch is None or batch <= block.kernel_rows):
        return "cpugen-gemv" if cpu_info()["avx512"] else "cpugen-gemv-avx2"
    return "torch-widened" if getattr(block, "widen_above", None) is not None else "torch"
