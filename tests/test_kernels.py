"""Native kernels against their torch references (kernels/reference.py), and the model's use of them."""

import re
import sys

import pytest
import torch

from cpugen import knobs
from cpugen.runtime import eager, layout, sampling, stack
from cpugen.runtime import native
from cpugen.model.config import from_name
from cpugen.host.cpu import cpu_info
from cpugen.runtime.engine import Engine, Prompts, compute_context
from cpugen.model.transformer import Linear
from cpugen.model.weights import random_model
from cpugen.perf import roofline
from helpers import ROOT, cli

import check_gemv  # noqa: E402  (kernels/, by file name: tests/helpers.py)
import reference  # noqa: E402


@pytest.fixture
def avx2_gemv_at_load(monkeypatch):
    """The AVX2 level's layout choice pinned to the gemv on plain weights (what a host where the
    gemv streams faster measures: runtime/layout.py), packed for decode batches above
    layout.PACK_ABOVE, for the tests of that route."""
    monkeypatch.setattr(eager, "avx2_packs_at_load", lambda: False)
    monkeypatch.setattr(eager, "avx2_pack_above", lambda: layout.PACK_ABOVE)


def _decode(model, prompts, steps=4):
    """Prefill then `steps` greedy decode steps; the logits of each, stacked (steps + 1, B, V)."""
    B, T = prompts.tokens.shape
    e = Engine(model, B, T + steps + 1, torch.bfloat16)
    out = []
    with compute_context(torch.bfloat16):
        lg = e.prefill(prompts)
        out.append(lg)
        for _ in range(steps):
            lg = e.decode_one_token(lg.argmax(-1))
            out.append(lg)
    model.free_caches()
    return torch.stack(out).float()


needs_avx512 = pytest.mark.skipif(not cpu_info()["avx512"], reason="the native gemv needs AVX-512; "
                                  "machines without it run the torch reference (tested below)")
needs_native = pytest.mark.skipif(not cpu_info()["avx2"], reason="cpugen's kernels need AVX2 and FMA at least; "
                                  "CPUs without them run torch's ops")


@needs_avx512
def test_gemv_matches_reference_on_awkward_shapes():
    ext = native.extension()
    assert ext is not None, native.why_not()
    assert ext.isa() == ("avx512_bf16" if cpu_info()["avx512_bf16"] else "avx512")
    # the packed layout on AMX tiles at the amx level, and nowhere below it (CPUGEN_ISA caps it)
    assert ext.packed_isa() == ("amx" if cpu_info()["amx_bf16"] else ext.isa())
    # above 6 rows off the tiles: vdpbf16ps, or FMA where this CPU runs vdpbf16ps at under 1/1.25 of
    # FMA's rate as the register-only limits measure them (Intel's Xeons: 0.5; Zen 4 and 5: 2)
    hw = roofline.measure_hw(1)
    fma = not cpu_info()["avx512_bf16"] or hw["avx512"] > 1.25 * hw["avx512_bf16"]
    assert ext.packed_multiply() == ("fma" if fma else "vdpbf16ps"), hw
    results = check_gemv.check(ext, seed=3)  # raises past 2 bf16 ulps of the largest output
    assert len(results) == (2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.SHAPES)


@needs_avx512
def test_gemv_avx512f_path_matches_reference_too():
    """The path for AVX-512 CPUs without BF16 (bf16 -> fp32 shifts, FMA, rounding by hand), forced
    with CPUGEN_ISA=avx512 in a fresh process."""
    import os
    import subprocess

    code = ("import sys; sys.path[:0] = ['.', 'kernels']; from cpugen.runtime.native import extension; "
            "import check_gemv; e = extension(); print(e.isa(), len(check_gemv.check(e, seed=4)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "CPUGEN_ISA": "avx512"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["avx512", str((2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.SHAPES))]


@needs_avx512
def test_gemv_rejects_what_it_cannot_do():
    ext = native.extension()
    x = torch.randn(17, 64).bfloat16()
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        ext.gemv(x, w, None)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ext.gemv(x[:2].float(), w.float(), None)
    if ext.packed_available():
        p = torch.empty(ext.packed_shape(8, 64), dtype=torch.bfloat16)
        ext.pack_into(w, p)
        with pytest.raises(RuntimeError, match="packed"):
            ext.linear_packed(x[:, :62], p, 8, None)  # K does not match
        with pytest.raises(RuntimeError, match="packed"):
            ext.linear_packed(x, p, 65, None)  # 65 outputs need two panels
        with pytest.raises(RuntimeError, match="K even"):
            ext.pack_into(torch.randn(8, 63).bfloat16(), p)


def _small(name: str, **kw):
    """A preset shrunk to test size, keeping its family's features (head dims the kernels take)."""
    import dataclasses

    base = dict(n_layer=2, vocab_size=1000, n_embd=256, n_head=8, n_kv_head=8, head_dim=32, intermediate_size=512)
    return dataclasses.replace(from_name(name), **{**base, **kw})


# GPT-J: partial rotary, parallel residual, gelu_new + bias fused into the gemv; Llama 3: GQA 4:1,
# full rotary, RMSNorm, SwiGLU, here with Qwen2's qkv bias; OPT: learned positions, relu
FAMILIES = {"gptj": lambda: from_name("gptj-1b").with_layers(2),
            "llama-gqa": lambda: _small("llama-3-8b", n_kv_head=2, head_dim=64, rotary_dim=64, qkv_bias=True),
            "opt": lambda: _small("opt-125m", n_head=4, n_kv_head=4, head_dim=64)}


class _Counted:
    """Counts the calls made through a kernel (a gemv function or the decode stack)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, *a):
        self.calls.append(x.shape[0])
        return self.fn(x, *a)

    def step(self, x, *a):  # the decode stack's entry point
        self.calls.append(x.shape[0])
        return self.fn.step(x, *a)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_answers_as_torch_does(dtype):
    """Greedy decoding's argmax (kernels/argmax.h) against torch.argmax: random rows, rows of
    ties (the first maximum wins), rows with NaN (the first NaN wins, as torch orders it above
    everything) or +inf, rows of -inf only, and row lengths off the 16-wide vectors."""
    from check_step_ops import argmax_cases

    ext = native.extension()
    cases = 0
    for name, x in argmax_cases(dtype):
        want = torch.argmax(x, dim=-1)
        assert torch.equal(ext.argmax(x), want), name
        assert torch.equal(sampling.argmax(x), want)
        cases += 1
    assert cases == 36
    g = torch.Generator().manual_seed(0)
    # a view that is not contiguous is read as its values
    x = torch.randn(8, 40, generator=g).to(dtype)[:, ::2]
    assert torch.equal(ext.argmax(x), torch.argmax(x, dim=-1))
    with pytest.raises(RuntimeError, match="logits"):
        ext.argmax(torch.zeros(2, 3, 4, dtype=dtype))


@needs_avx512
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_native_norm_matches_torch(kind):
    """kernels/norm.h against the module's torch path (model.py's Norm.reference): rows of 3 to
    2050 values (off the 16-wide vectors), a (B, T, h) input, rows far from zero mean; within one
    bf16 rounding (the fp32 sums run in another order). Non-bf16 input takes the torch path."""
    import dataclasses

    from cpugen.model.transformer import Norm

    g = torch.Generator().manual_seed(0)
    for h, shape in [(3, (1, 3)), (17, (4, 17)), (256, (2, 5, 256)), (2050, (3, 2050))]:
        cfg = dataclasses.replace(from_name("tiny-gptj"), n_embd=h, norm=kind)
        n = Norm(cfg).to(torch.bfloat16)
        with torch.no_grad():
            n.weight.copy_(torch.randn(h, generator=g) + 1)
            if n.bias is not None:
                n.bias.copy_(torch.randn(h, generator=g))
        x = (torch.randn(shape, generator=g) * 3 + 5).to(torch.bfloat16)
        want = n.reference(x)
        n.impl = eager.NativeNorm(native.extension(), n)
        got = n(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # one bf16 ulp of the larger value, where the two fp32 results round to neighbours
        ulp = want.float().abs().clamp(min=2 ** -20) * 2 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all(), (h, (got.float() - want.float()).abs().max())
        assert (got == want).float().mean() > 0.9  # mostly the very same value
        assert torch.equal(n(x.float()), n.reference(x.float()))  # fp32 input: torch's ops
    with pytest.raises(RuntimeError, match="weight and bias"):
        native.extension().norm(torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(7, dtype=torch.bfloat16), None,
                                1e-5, True)


@needs_avx512
@pytest.mark.parametrize("act", ["silu", "gelu_new", "gelu", "relu"])
def test_native_glu_matches_torch(act):
    """kernels/glu.h against model.py's MLP.glu_reference (torch's activation rounded to bf16, then
    the product rounded): every activation, widths off the 16-wide vectors, a (B, T, 2 ffn) input.
    The activation's fp32 value may differ from torch's in its last bits, so a result may land one
    bf16 rounding away; most are the very same. Non-bf16 input takes the torch path."""
    import dataclasses

    from cpugen.model.transformer import MLP

    g = torch.Generator().manual_seed(0)
    same = total = 0
    for ffn, shape in [(5, (1, 10)), (40, (3, 80)), (1376, (2, 3, 2752))]:
        cfg = dataclasses.replace(from_name("llama-3-8b"), n_embd=64, intermediate_size=ffn, activation=act)
        mlp = MLP(cfg)
        gu = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
        want = mlp.glu_reference(gu)
        mlp.product = eager.NativeGlu(native.extension(), mlp)
        got = mlp.product(gu)
        assert got.shape == want.shape == (*shape[:-1], ffn) and got.dtype == torch.bfloat16
        # two bf16 roundings (activation, product); where the activation's tail is near zero
        # (gelu of a large negative input, ~1e-12) its fp32 value differs in more than its last bits
        tol = want.float().abs() * 2 ** -6 + 1e-6 * want.float().abs().max()
        assert ((got.float() - want.float()).abs() <= tol).all(), (ffn, (got.float() - want.float()).abs().max())
        same += int((got == want).sum())
        total += got.numel()
        assert torch.equal(mlp.product(gu.float()), mlp.glu_reference(gu.float()))
    assert same > 0.9 * total, same / total


@needs_native
@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_decode_with_and_without_the_kernels(family, layout):
    """The same model decodes to the same logits (within bf16 rounding) through the native kernels
    and through torch's ops, with the weights plain (the gemv takes decode's matmuls) or repacked
    into cpugen's layout (its kernel takes every matmul, prefill's included), at the CPU's level
    (CPUGEN_ISA caps it: test_every_level_in_a_fresh_process). Two native routes: a whole step in
    one call (the decode stack, kernels/decode_layer.cpp), and block by block from Python (the
    matmul kernels with their fused epilogue, the fused decode step), which the stack must match
    exactly: it runs the same kernels in the same order. Prefill's blocks (3 x 16 rows) reach only
    the packed kernel; its lm_head (the last position only: 3 rows) either kernel."""
    packed = layout == "packed"
    cfg = FAMILIES[family]()
    model = random_model(cfg, torch.bfloat16, 0)
    prompts = Prompts(torch.randint(1000, (3, 16), generator=torch.Generator().manual_seed(0)),
                      torch.ones(3, 16, dtype=torch.bool))
    run = lambda: _decode(model, prompts)  # noqa: E731

    plain = run()
    assert eager.install(model, pack=packed)
    # every native matmul counted, in one list: the packed kernel where a weight was repacked, the
    # gemv where it stayed plain (a tied lm_head stays the embedding's)
    kernel = _Counted(None)
    for m in model.modules():
        if type(m) is Linear:
            attr = "panel_kernel" if m.panels is not None else "kernel"
            setattr(m, attr, _Counted(getattr(m, attr)))
            getattr(m, attr).calls = kernel.calls
    tied = model.lm_head.weight is model.wte.weight
    assert all((m.panels is not None) == (packed and m is not model.lm_head or packed and not tied)
               for m in model.modules() if type(m) is Linear)
    assert model.decode_stack is not None, model.stack_refused  # every level has its decode attention
    model.decode_stack = stack = _Counted(model.decode_stack)
    assert len(stack.fn) == cfg.n_layer
    stacked = run()
    n_linear = 4 * cfg.n_layer + 1
    prefill_blocks = [3 * 16] * (n_linear - 1) if packed else []
    assert stack.calls == [3] * 4  # every decode step in one call, its lm_head included
    assert kernel.calls == prefill_blocks + [3]  # otherwise only prefill: its blocks, its lm_head
    model.decode_stack = None
    kernel.calls.clear()
    steps = []
    step = model.blocks[0].attn.decode_step
    for b in model.blocks:
        b.attn.decode_step = lambda *a: steps.append(1) or step(*a)
    per_block = run()
    assert kernel.calls == prefill_blocks + [3] * (4 * n_linear + 1)  # every linear of every decode step
    assert len(steps) == 4 * cfg.n_layer  # every layer of every step
    assert torch.equal(stacked, per_block)
    # measured 0.1-0.7% (bf16 rounding in another order); attending one position short moves
    # these logits 1.9% (OPT) to 135% (GPT-J, Llama)
    rel = (per_block - plain).abs().max() / plain.abs().max()
    assert rel < 1e-2, rel


@needs_avx512
def test_packed_layout_matches_reference():
    """cpugen's packed-layout kernel against the fp32 reference, from one row of x to prefill's
    hundreds, outputs not a multiple of the 64-wide panels, K past one 256-pair chunk: vdpbf16ps
    with AVX512-BF16, fp32 FMA at AVX-512 F/BW (test_every_level_in_a_fresh_process runs both)."""
    results = check_gemv.check_packed(native.extension(), seed=5)  # raises past 2 bf16 ulps
    assert len(results) == (2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.PACKED_SHAPES)


@needs_native
def test_packing_replaces_the_weights_in_place():
    """Repacking holds one matrix twice at most, never the model (the OS's count of resident
    memory, before, at its peak and after), and leaves nothing for a large batch to repack. (A
    tied lm_head stays the embedding's: test_model_decode_with_and_without_the_kernels[opt-packed].)"""

    from cpugen.host.memory import peak_rss_bytes, release_freed, reset_peak_rss, rss_bytes
    from cpugen.model.weights import weight_bytes

    cfg = from_name("gptj-1b").with_layers(4)
    model = random_model(cfg, torch.bfloat16, 0)
    native.extension() if cpu_info()["avx512"] else native.extension("avx2")  # loaded (and built) before measuring
    largest = max(m.weight.numel() * 2 for m in model.modules() if type(m) is Linear)
    weights = weight_bytes(model)
    release_freed()
    before = rss_bytes()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert eager.install(model, pack=True)
    peak, after = peak_rss_bytes(), rss_bytes()
    mib = {k: round(v / 2**20) for k, v in dict(before=before, peak=peak, after=after, largest=largest).items()}
    assert peak - before < largest + 0.05 * weights, mib
    assert abs(after - before) < 0.05 * weights, mib
    pad = (-cfg.vocab_size % 64) * cfg.n_embd * 2  # the lm_head's last panel, filled out with zeros
    assert weight_bytes(model) == weights + pad
    assert all(m.weight is None for m in model.modules() if type(m) is Linear)
    eager.for_batch(model, "eager", torch.bfloat16, eager.gemv_max_batch(model) + 1)
    assert eager.decode_matmul(model, "eager") == ("cpugen-packed-amx" if cpu_info()["amx_bf16"] else "cpugen-packed")
    assert model.decode_stack is not None and weight_bytes(model) == weights + pad


@pytest.mark.skipif(not cpu_info()["avx2"], reason="the AVX2 level's kernels need AVX2 and FMA")
def test_a_smaller_batch_after_a_packed_one_unpacks_in_place(monkeypatch, avx2_gemv_at_load):
    """At the AVX2 level, weights packed for a large decode batch go back to the plain layout for a
    smaller one (the gemv's): one matrix held twice at most, never the model (the OS's count of
    resident memory), and the weights exactly as loaded."""
    from cpugen.host.memory import peak_rss_bytes, release_freed, reset_peak_rss, rss_bytes
    from cpugen.model.weights import weight_bytes

    monkeypatch.setenv("CPUGEN_ISA", "avx2")
    knobs.reload()
    cfg = from_name("gptj-1b").with_layers(4)
    model = random_model(cfg, torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
    linears = [m for m in model.modules() if type(m) is Linear]
    largest = max(m.weight.numel() * 2 for m in linears)
    sums = [m.weight.view(torch.int16).sum(dtype=torch.int64).item() for m in linears]  # no second copy kept
    eager.for_batch(model, "eager", torch.bfloat16, layout.PACK_ABOVE + 1)
    assert all(m.weight is None for m in linears)
    weights = weight_bytes(model)
    release_freed()
    before = rss_bytes()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    eager.for_batch(model, "eager", torch.bfloat16, 1)
    peak, after = peak_rss_bytes(), rss_bytes()
    mib = {k: round(v / 2**20) for k, v in dict(before=before, peak=peak, after=after, largest=largest).items()}
    assert peak - before < largest + 0.05 * weights, mib
    assert abs(after - before) < 0.05 * weights, mib
    assert eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2" and model.decode_stack is not None
    assert [m.weight.view(torch.int16).sum(dtype=torch.int64).item() for m in linears] == sums
    assert all(m.panels is None and m.weight.shape == (m.out_features, m.in_features) for m in linears)


@pytest.mark.skipif(not cpu_info()["avx512_bf16"], reason="the decode stack needs AVX512-BF16")
def test_decode_stack_holds_the_weights_without_copying_them():
    """The stack keeps references to the blocks' own tensors: building it allocates nothing the
    size of a weight (the OS's count of resident memory), and packing for a large batch drops it
    first, so the plain weights are freed as they are packed."""

    from cpugen.host.memory import rss_bytes
    from cpugen.model.weights import weight_bytes

    model = random_model(from_name("gptj-1b").with_layers(4), torch.bfloat16, 0)
    blocks = weight_bytes(model.blocks)
    assert eager.install(model, pack=False)  # the native norms the stack asks for; the stack itself built
    model.decode_stack = None
    before = rss_bytes()
    assert stack.install(model)
    assert rss_bytes() - before < blocks / 100, (rss_bytes() - before, blocks)
    eager.for_batch(model, "eager", torch.bfloat16, eager.gemv_max_batch(model) + 1)
    assert model.decode_stack is None


@pytest.mark.skipif(not cpu_info()["avx512_bf16"], reason="the decode stack needs AVX512-BF16")
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_decode_stack_is_not_used_where_it_does_not_apply(layout):
    """Padded batches (a mask) and prefill take the Python blocks; so do batches above the gemv's
    rows where the weights are plain. With every weight packed the stack takes any batch, and its
    logits are the Python blocks' (the packed kernel takes any number of rows)."""
    from cpugen.runtime.engine import generate
    from cpugen.runtime.sampling import Sampling

    cfg = FAMILIES["gptj"]()
    model = random_model(cfg, torch.bfloat16, 0)
    assert eager.install(model, pack=layout == "packed")
    model.decode_stack = stack = _Counted(model.decode_stack)
    generate(model, [[1, 2, 3], [4, 5]], 3, Sampling(), torch.bfloat16)  # left-padded: masked
    assert stack.calls == []
    generate(model, [[1, 2, 3]] * 2, 3, Sampling(), torch.bfloat16)
    assert stack.calls == [2, 2]
    stack.calls.clear()
    generate(model, [[1, 2, 3]] * 5, 3, Sampling(), torch.bfloat16)  # 5 rows > 4
    assert stack.calls == ([5, 5] if layout == "packed" else [])
    if layout == "packed":  # 17 rows, past the gemv's 16: the same logits as the Python blocks
        prompts = Prompts(torch.randint(1000, (17, 8), generator=torch.Generator().manual_seed(1)),
                          torch.ones(17, 8, dtype=torch.bool))
        stacked = _decode(model, prompts, steps=2)
        assert stack.calls[-2:] == [17, 17]
        model.decode_stack = None
        assert torch.equal(stacked, _decode(model, prompts, steps=2))


def test_activation_codes_match_the_kernels_enum():
    """cpugen's one activation table against the enum the kernels switch on (kernels/vec_math.h)."""
    import re

    from cpugen.model.activations import KERNEL_CODE, NAMES

    enum = re.search(r"enum Act : int64_t \{([^}]*)\}", (ROOT / "kernels" / "vec_math.h").read_text()).group(1)
    codes = {n.strip(): int(v) for n, v in (e.split("=") for e in enum.split(","))}
    kernel_name = {None: "kNone", "gelu_new": "kGeluTanh", "gelu": "kGelu", "relu": "kRelu", "silu": "kSilu"}
    assert set(NAMES) == set(kernel_name) - {None}
    assert KERNEL_CODE == {a: codes[k] for a, k in kernel_name.items()}


def test_reference_is_fp32_math_rounded_once():
    x = torch.randn(2, 64).bfloat16()
    w = torch.randn(5, 64).bfloat16()
    want = (x.double() @ w.double().T).to(torch.bfloat16)
    assert torch.equal(reference.gemv(x, w), want)


def test_switched_off_kernel_leaves_torch_path(monkeypatch):
    monkeypatch.setenv("CPUGEN_NATIVE", "0")
    knobs.reload()
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) is False
    assert all(getattr(m, "kernel", None) is None for m in model.modules())


def test_large_decode_batches_use_onednn_packed_weights_in_place(monkeypatch, avx2_gemv_at_load):
    """Where the weights stay plain (CPUs with AMX; here by CPUGEN_LAYOUT=plain), above the gemv's
    batches the eager backend reorders each weight once into oneDNN's layout, replacing it: same
    results as F.linear on the plain weights, same weight bytes."""
    from cpugen.runtime import backends
    monkeypatch.setenv("CPUGEN_LAYOUT", "plain")
    knobs.reload()
    from cpugen.model.weights import weight_bytes

    cfg = from_name("gptj-1b").with_layers(2)
    model = random_model(cfg, torch.bfloat16, 0)
    prompts = Prompts(torch.randint(1000, (8, 12), generator=torch.Generator().manual_seed(1)),
                      torch.ones(8, 12, dtype=torch.bool))

    run = lambda: _decode(model, prompts, 3)  # noqa: E731

    before, plain = weight_bytes(model), run()
    backends.apply(model, "eager", torch.bfloat16)
    eager.for_batch(model, "eager", torch.bfloat16, 1)
    # oneDNN's bf16 reorder needs AVX-512; without it the packed kernel takes the plain weights
    avx2 = not cpu_info()["avx512"]
    assert eager.decode_matmul(model, "eager", 1) in (("cpugen-gemv-avx2",) if avx2 else ("cpugen-gemv", "torch"))
    eager.for_batch(model, "eager", torch.bfloat16, eager.gemv_max_batch(model) + 1)
    assert eager.decode_matmul(model, "eager", eager.gemv_max_batch(model) + 1) == ("cpugen-plain" if avx2
                                                                                else "onednn-packed")
    assert all(m.weight is None for m in model.blocks.modules() if hasattr(m, "onednn") and m.onednn is not None)
    assert weight_bytes(model) == before
    packed = run()
    assert (packed - plain).abs().max() / plain.abs().max() < 1e-2


@pytest.mark.skipif(not cpu_info()["avx512_bf16"], reason="the native decode attention needs AVX512-BF16; "
                    "elsewhere PyTorch's SDPA runs (the model's default path, tested by test_parity)")
def test_decode_attention_matches_reference():
    import check_decode_attention

    ext = native.extension("decode_attention")
    assert ext is not None, native.why_not("decode_attention")
    results = check_decode_attention.check(ext, seed=5)  # GQA, strided cache views, head dims 64-256
    assert len(results) == len(check_decode_attention.SHAPES)
    steps = check_decode_attention.check_step(ext, seed=6)  # partial, full and no rotary; exact cache writes
    assert len(steps) == len(check_decode_attention.STEP_SHAPES)
    model = random_model(from_name("gptj-1b").with_layers(1), torch.bfloat16, 0)  # head dim 128
    eager.install(model)
    assert all(b.attn.decode_step is not None for b in model.blocks)
    tiny = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)  # head dim 16: not a multiple of 32
    eager.install(tiny)
    assert all(b.attn.decode_step is None for b in tiny.blocks)


@needs_avx512
def test_the_step_ops_check_passes_every_case():
    import check_step_ops

    ext = native.extension()
    assert (check_step_ops.check_argmax(ext), check_step_ops.check_norm(ext), check_step_ops.check_glu(ext)) == (72, 6, 12)


def test_the_step_ops_references_are_the_models_own_computation():
    """kernels/reference.py's norm and glu, which the check holds the kernels to, give what the
    model's torch path gives (Norm.reference, MLP.glu_reference), bit for bit."""
    import dataclasses

    from cpugen.model.transformer import MLP, Norm

    g = torch.Generator().manual_seed(1)
    for kind in ("layernorm", "rmsnorm"):
        n = Norm(dataclasses.replace(from_name("tiny-gptj"), norm=kind)).to(torch.bfloat16)
        with torch.no_grad():
            n.weight.copy_(torch.randn(64, generator=g) + 1)
            if n.bias is not None:
                n.bias.copy_(torch.randn(64, generator=g))
        x = (torch.randn(3, 64, generator=g) * 3 + 5).bfloat16()
        assert torch.equal(reference.norm(x, n.weight, n.bias, n.eps, kind == "rmsnorm"), n.reference(x))
    for act in ("silu", "gelu_new", "gelu", "relu"):
        mlp = MLP(dataclasses.replace(from_name("llama-3-8b"), n_embd=64, intermediate_size=40, activation=act))
        gu = (torch.randn(3, 80, generator=g) * 3).bfloat16()
        assert torch.equal(reference.glu(gu, act), mlp.glu_reference(gu))


def test_widened_linear_gives_the_bf16_gemms_answer():
    """widened_linear (fp32 GEMM over weight blocks widened into a reused buffer, for CPUs without
    AVX-512) against fp32 math rounded once and against torch's own bf16 F.linear: within one bf16
    rounding, across block boundaries (N off the block's rows), with and without bias, 3-d input."""
    import torch.nn.functional as F

    from cpugen.model import transformer

    g = torch.Generator().manual_seed(3)
    for (M, K, N) in [(9, 64, 300), (17, 1024, 1100), (2, 5, 7)]:
        rows = max(16, min(N, transformer.WIDEN_BLOCK_BYTES // (4 * K)))
        assert N % rows or N == rows or M == 2  # the last block is partial in the first two
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        for b in (None, torch.randn(N, generator=g).bfloat16()):
            want = x.float() @ w.float().T + (b.float() if b is not None else 0)
            for got in (transformer.widened_linear(x, w, b), transformer.widened_linear(x.view(1, M, K), w, b)[0]):
                assert got.dtype == torch.bfloat16 and got.shape == (M, N)
                ulp = want.abs().clamp(min=2 ** -20) * 2 ** -7
                assert ((got.float() - want).abs() <= ulp).all()
            torch_bf16 = F.linear(x, w, b)
            assert ((transformer.widened_linear(x, w, b).float() - torch_bf16.float()).abs()
                    <= 2 * torch_bf16.float().abs().clamp(min=2 ** -20) * 2 ** -7).all()


def test_the_eager_backend_widens_only_where_the_cpu_lacks_avx512(monkeypatch):
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    eager.prepare(model)
    widened = {m.widen_above for m in model.modules() if isinstance(m, Linear)}
    assert widened == ({None} if cpu_info()["avx512"] else {eager.WIDEN_ABOVE_ROWS})
    monkeypatch.setenv("CPUGEN_WIDEN", "0")
    knobs.reload()
    assert not eager.widen_wanted()


@needs_native
def test_every_avx2_kernel_matches_its_reference():
    """kernels/avx2.cpp: every x86-64 CPU with AVX2 and FMA runs it, AVX-512 or not: the gemv at
    every shape and epilogue, the packed layout's kernel on packed weights and on plain ones (packing
    them as it goes), decode attention and the decode step (GQA, strided caches, partial
    and no rotary, exact cache writes), the norms, a GLU's product and the argmax (ties, NaN,
    infinities, row tails), each against kernels/reference.py or torch."""
    import check_decode_attention
    import check_step_ops

    ext = native.extension("avx2")
    assert ext is not None and ext.available() and ext.isa() == "avx2"
    results = check_gemv.check_avx2(ext, seed=6)  # raises past 2 bf16 ulps of the largest output
    assert len(results) == (2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.AVX2_SHAPES)
    assert ext.max_rows() == 32
    with pytest.raises(RuntimeError, match="1 to 32 rows"):
        ext.gemv(torch.zeros(33, 8, dtype=torch.bfloat16), torch.zeros(3, 8, dtype=torch.bfloat16), None, 0)
    # cpugen's packed layout at this level (kernels/packed_avx2.h), one row to prefill's hundreds
    assert ext.packed_available()
    results = check_gemv.check_packed(ext, seed=7)
    assert len(results) == (2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.PACKED_SHAPES)
    p = torch.empty(ext.packed_shape(8, 64), dtype=torch.bfloat16)
    ext.pack_into(torch.randn(8, 64).bfloat16(), p)
    with pytest.raises(RuntimeError, match="packed"):
        ext.linear_packed(torch.randn(3, 62).bfloat16(), p, 8, None)  # K does not match
    with pytest.raises(RuntimeError, match="packed"):
        ext.linear_packed(torch.randn(3, 64).bfloat16(), p, 65, None)  # 65 outputs need two panels
    # the same kernel on plain weights, packing them as it goes (prefill above the gemv's rows)
    results = check_gemv.check_plain(ext, seed=8)
    assert len(results) == (2 + len(reference.ACTIVATIONS) - 1) * len(check_gemv.PACKED_SHAPES)
    for x, w, b, what in ((torch.randn(3, 63), torch.randn(8, 63), None, "K even"),
                          (torch.randn(3, 64), torch.randn(8, 62), None, "K even"),
                          (torch.randn(3, 64), torch.randn(8, 64), torch.randn(7), "bias of 7 for 8")):
        with pytest.raises(RuntimeError, match=what):
            ext.linear_plain(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16())
    assert len(check_decode_attention.check(ext, seed=5)) == len(check_decode_attention.SHAPES)
    assert len(check_decode_attention.check_step(ext, seed=6)) == len(check_decode_attention.STEP_SHAPES)
    assert (check_step_ops.check_argmax(ext), check_step_ops.check_norm(ext), check_step_ops.check_glu(ext)) == (72, 6, 12)


def test_decode_through_the_avx2_gemv_gives_the_reference_tokens(avx2_gemv_at_load):
    """Decode's 1-4 row matmuls through the AVX2 gemv (what the eager backend installs on a CPU
    without AVX-512; installed by hand here, so that any x86 CPU runs it) give the greedy tokens of
    torch's ops on the same weights, the logits within a few bf16 roundings."""
    cfg = from_name("gptj-1b").with_layers(2)
    model = random_model(cfg, torch.bfloat16, 0)
    prompts = Prompts(torch.randint(1000, (2, 12), generator=torch.Generator().manual_seed(2)),
                      torch.ones(2, 12, dtype=torch.bool))
    ref = _decode(model, prompts, 4)
    if cpu_info()["avx512"]:
        ext = native.extension("avx2")
        for m in model.modules():
            if isinstance(m, Linear):
                m.kernel = ext.gemv
    else:  # the backend's own choice on this CPU, the weights kept plain
        assert eager.install(model) and eager.decode_matmul(model, "eager") == "cpugen-gemv-avx2"
    assert all(m.kernel is not None for m in model.modules() if isinstance(m, Linear))
    got = _decode(model, prompts, 4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.03


@needs_native
@pytest.mark.parametrize("batch", [7, 32])
def test_decode_batches_up_to_32_on_plain_weights_at_the_avx2_level(batch):
    """At the AVX2 level, plain weights go through the AVX2 gemv up to 16 rows of x (above 4 it takes
    x in blocks of 4 rows against chunks of W's rows: kernels/gemv_avx2.h) and above that through
    the packed layout's kernel, packing them a chunk at a time as it goes (linear_plain), which
    leaves them as they were: decode at 7 and 32 sequences gives the greedy tokens of torch's ops on
    the same weights, the logits within a few bf16 roundings; where the CPU has no AVX-512 the decode
    stack takes those batches too, with the Python blocks' logits exactly. Prefill (4 tokens a
    sequence: 28 and 128 rows) goes through linear_plain."""
    cfg = from_name("gptj-1b").with_layers(1)
    model = random_model(cfg, torch.bfloat16, 0)
    prompts = Prompts(torch.randint(1000, (batch, 4), generator=torch.Generator().manual_seed(3)),
                      torch.ones(batch, 4, dtype=torch.bool))
    ref = _decode(model, prompts, 3)
    ext = native.extension("avx2")
    above = ext.plain_above()
    if cpu_info()["avx512"]:  # the AVX2 level's matmul route by hand, block by block
        eager._route(model, ext, None, rows=ext.max_rows())
    else:  # the backend's own choice on this CPU with the weights plain, the decode stack included
        assert eager.install(model, pack=False) and model.decode_stack is not None and model.decode_stack_rows == 32
        assert eager.decode_matmul(model, "eager", batch) == ("cpugen-gemv-avx2" if batch <= above else "cpugen-plain")
    kernel, plain = _Counted(None), _Counted(None)
    weights = [m.weight for m in model.modules() if type(m) is Linear]
    for m in model.modules():
        if type(m) is Linear:
            m.kernel, m.plain_kernel = _Counted(m.kernel), _Counted(m.plain_kernel)
            m.kernel.calls, m.plain_kernel.calls = kernel.calls, plain.calls
    got = _decode(model, prompts, 3)  # (4, B, V)
    assert all(m.weight is w for m, w in zip([m for m in model.modules() if type(m) is Linear], weights))  # left plain
    tg, tr, scale = got.argmax(-1), ref.argmax(-1), ref.abs().max()
    for b in range(batch):
        # the same tokens, except where the random model's logits nearly tie (a gap of a bf16
        # rounding or two, which fp32 sums in another order may flip); the logits agree up to and
        # with the step that flipped (its inputs were the same)
        flips = (tg[:, b] != tr[:, b]).nonzero().flatten().tolist()
        last = flips[0] if flips else tg.shape[0] - 1
        if flips:
            assert ref[last, b, tr[last, b]] - ref[last, b, tg[last, b]] < 0.02 * scale, (b, last)
        assert ((got[: last + 1, b] - ref[: last + 1, b]).abs().max() / scale).item() < 0.03, b
    assert (tg == tr).all(0).sum() >= batch - 2  # near-ties are rare
    # prefill's four matmuls, its lm_head (the last position), then 3 steps x 5 matmuls: each
    # through the gemv up to `above` rows, through linear_plain past them
    calls = [4 * batch] * 4 + [batch] * 16
    split = lambda cs: ([c for c in cs if c <= above], [c for c in cs if c > above])  # noqa: E731
    if model.decode_stack is not None:
        assert (kernel.calls, plain.calls) == split(calls[:5])  # decode went through the stack, not the Python blocks
        model.decode_stack = None
        kernel.calls.clear()
        plain.calls.clear()
        assert torch.equal(_decode(model, prompts, 3), got)
    assert (kernel.calls, plain.calls) == split(calls)


@needs_native
def test_large_decode_batches_without_avx512_repack_into_cpugens_layout(monkeypatch, avx2_gemv_at_load):
    """Without AVX-512 (here CPUGEN_ISA=avx2, so that every x86 CPU runs it) the weights stay plain
    for decode up to the layout choice's batch (here PACK_ABOVE: the AVX2 gemv), and a larger batch
    repacks them once, in place, into cpugen's layout (kernels/packed_avx2.h): no weight held twice, the decode stack
    rebuilt on the packed weights for any batch, its logits the Python blocks' exactly, and torch's
    ops' within bf16 rounding (the greedy tokens too, but for near-ties). Prefill (4 tokens a
    sequence) goes through the packed kernel as well."""
    from cpugen.model.weights import weight_bytes

    monkeypatch.setenv("CPUGEN_ISA", "avx2")
    knobs.reload()
    cfg = from_name("gptj-1b").with_layers(1)
    model = random_model(cfg, torch.bfloat16, 0)
    batch = layout.PACK_ABOVE + 5  # groups of 5 and 4 rows in the micro-kernel
    prompts = Prompts(torch.randint(1000, (batch, 4), generator=torch.Generator().manual_seed(4)),
                      torch.ones(batch, 4, dtype=torch.bool))
    ref = _decode(model, prompts, 3)
    before = weight_bytes(model)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 4) == "cpugen-gemv-avx2"
    eager.for_batch(model, "eager", torch.bfloat16, layout.PACK_ABOVE)
    assert eager.decode_matmul(model, "eager") == "cpugen-gemv-avx2"  # at the threshold nothing moves
    eager.for_batch(model, "eager", torch.bfloat16, batch)
    assert eager.decode_matmul(model, "eager", batch) == "cpugen-packed"
    assert all(m.weight is None and m.panels is not None for m in model.modules() if type(m) is Linear)
    pad = (-cfg.vocab_size % 64) * cfg.n_embd * 2  # the lm_head's last panel, filled out with zeros
    assert weight_bytes(model) == before + pad
    assert model.decode_stack is not None and model.decode_stack_rows == stack.ANY_BATCH
    got = _decode(model, prompts, 3)  # (4, B, V)
    tg, tr, scale = got.argmax(-1), ref.argmax(-1), ref.abs().max()
    for b in range(batch):  # as in test_decode_batches_up_to_32_on_plain_weights_at_the_avx2_level
        flips = (tg[:, b] != tr[:, b]).nonzero().flatten().tolist()
        last = flips[0] if flips else tg.shape[0] - 1
        if flips:
            assert ref[last, b, tr[last, b]] - ref[last, b, tg[last, b]] < 0.02 * scale, (b, last)
        assert ((got[: last + 1, b] - ref[: last + 1, b]).abs().max() / scale).item() < 0.03, b
    assert (tg == tr).all(0).sum() >= batch - 2
    model.decode_stack = None
    assert torch.equal(_decode(model, prompts, 3), got)


@pytest.mark.skipif(not cpu_info()["avx512"], reason="a cap below the CPU's own level needs a CPU with AVX-512")
def test_a_cap_lowered_in_the_process_never_reaches_the_higher_levels_kernels(monkeypatch, avx2_gemv_at_load):
    """The AVX-512 module loaded first, then CPUGEN_ISA=avx2 (knobs.reload): the module is no longer
    handed out, and the eager backend routes a model through the AVX2 kernels, its decode (stack
    and Python blocks alike) the same as in a process that never loaded the AVX-512 module."""
    assert native.extension("gemv_bf16") is not None
    monkeypatch.setenv("CPUGEN_ISA", "avx2")
    knobs.reload()
    assert native.extension("gemv_bf16") is None and native.extension("decode_attention") is None
    assert "AVX-512" in native.why_not("gemv_bf16")
    assert native.step_kernels() is native.extension("avx2") is not None
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert eager.install(model) and eager.decode_matmul(model, "eager", 1) == "cpugen-gemv-avx2"
    assert all(m.kernel is native.extension("avx2").gemv for m in model.modules() if type(m) is Linear)


@pytest.mark.parametrize("level", ["avx2", "avx512", "avx512_bf16", "amx"])
def test_every_level_in_a_fresh_process(level, tmp_path):
    """CPUGEN_ISA=level makes the whole engine run as on a CPU with at most that level. At each level
    this CPU has, a fresh process runs the kernels' checks and the model's decode through the
    kernels (the decode stack against the Python blocks at that level, both against torch's ops),
    and a run records the level; above the CPU's level, a run is a one-line error. The children
    keep their measurements (the AVX2 level's layout timing) in a cache of their own."""
    import os
    import subprocess

    from cpugen.host.cpu import LEVELS
    from helpers import cli, fake_roofline

    cache = {**fake_roofline(tmp_path / "cache"), "CPUGEN_NATIVE": "1", "CPUGEN_LIMITS": "measured"}  # builds shared
    env = {**os.environ, **cache, "CPUGEN_ISA": level}
    own = cpu_info()["cpu_isa"]
    if own is None or LEVELS.index(level) > LEVELS.index(own):
        r = cli("run", "--model", "tiny-gptj", "--gen-len", "2", env={"CPUGEN_ISA": level})
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"CPUGEN_ISA={level} is above this CPU's level ({own or 'no AVX2'})" in r.stderr
        return
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels.py"),
                        "-k", "decode_with_and_without or every_avx2_kernel or gemv_matches or step_ops_check "
                              "or decode_attention_matches or packed_layout_matches or packing_replaces or kernel_benches_run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    out = tmp_path / "r.json"
    (tmp_path / "cache" / "layout.json").unlink(missing_ok=True)  # the run below times the layout afresh
    r = cli("run", "--model", "gptj-1b", "--layers", "1", "--prompt-len", "8", "--gen-len", "3", "--json", out,
            env={**cache, "CPUGEN_ISA": level, "ONEDNN_VERBOSE": "1"})
    assert r.returncode == 0, r.stderr
    import json

    from cpugen.host.cpu import LIBRARY_CAPS

    rec = json.loads(out.read_text())
    assert rec["knobs"]["CPUGEN_ISA"] == level and rec["isa"] == level and rec["cpu_isa"] == own
    # torch's and oneDNN's kernels capped too: ATen as torch reports it, oneDNN as its own log says
    assert rec["library_caps"] == LIBRARY_CAPS[level]
    assert rec["torch_cpu_capability"] == LIBRARY_CAPS[level]["ATEN_CPU_CAPABILITY"].upper()
    onednn = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("onednn_verbose") and ",isa:" in ln]
    if level == "avx512":  # its prefill is oneDNN's, at AVX-512 without bf16 instructions
        assert onednn and all("AVX512BW" in ln and "bfloat16" not in ln for ln in onednn), onednn
    if level == "avx2":  # nothing of oneDNN's runs here, and nothing above AVX2 would
        assert all("AVX-512" not in ln for ln in onednn), onednn
    assert rec["decode_blocks"] == "native-stack"
    # the packed kernel's instruction is recorded where the weights are packed, and only there
    assert (rec["packed_multiply"] is None) == (not rec["decode_matmul"].startswith("cpugen-packed")), rec
    if level == "avx2":  # the layout this run timed (runtime/layout.py), kept for the next, and the matmuls it gives
        choice = rec["layout_choice"]
        assert choice["source"] == "measured" and choice["timing_s"] > 0, choice
        kept = json.loads((tmp_path / "cache" / "layout.json").read_text())
        assert [{k: v[k] for k in ("gemv_gbps", "packed_gbps")} for v in kept.values()] == [
            {k: choice[k] for k in ("gemv_gbps", "packed_gbps")}]
        assert rec["decode_matmul"] == ("cpugen-packed" if choice["packed"] else "cpugen-gemv-avx2")
    else:
        assert rec["layout_choice"] is None and not (tmp_path / "cache" / "layout.json").exists()


def test_bench_ab_builds_a_commit_beside_this_tree():
    """kernels/bench_ab.py (the packed kernel of a commit against this tree's, side by side in one
    process) takes HEAD's kernels/ from git, builds them beside this tree's, times both, and finds
    their outputs the same bit for bit where the sources are (a clean checkout, as CI's); a commit
    git does not know is a one-line error. At this CPU's own level only: one build of the module."""
    import subprocess

    if native.step_kernels() is None or not native.step_kernels().packed_available():
        pytest.skip(f"no packed kernel on this CPU: {native.why_not('avx2')}")
    script = str(ROOT / "kernels" / "bench_ab.py")
    p = subprocess.run([sys.executable, script, "--base", "no-such-commit"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "pass a commit of this repository" in p.stderr, p.stderr
    # 70 rows: prefill's 12-row kernel where the FMA path runs; K = 256 and 1024
    p = subprocess.run([sys.executable, script, "--base", "HEAD", "--rows", "8,70", "--rounds", "1", "--layers", "1",
                        "--hidden", "256"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    table = [ln for ln in p.stdout.splitlines() if ln.startswith(("| 8 |", "| 70 |"))]
    assert len(table) == 2 and all(float(c) > 0 for ln in table for c in re.findall(r"(\d+\.\d+) \(", ln)), p.stdout
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kernels"], cwd=ROOT).returncode == 0:
        assert all(ln.endswith("| yes |") for ln in table), p.stdout


def test_every_kernel_module_compiles_and_imports_here_even_where_it_cannot_run():
    """Each level's code is compiled with its own target attributes, so every module builds on any
    x86-64 machine, and importing one runs nothing of a level the CPU lacks (only the CPU checks):
    a module this CPU cannot run is still compiled and imported here, so a change that breaks the
    AVX-512 code is caught on an AVX2-only host too. The ones not yet built compile side by side,
    as `cpugen build` compiles them, each in a child process; the loads below find them built."""
    names = (*native.MODULES, *native.X86)
    took = native.compile_parallel(names)
    assert not [w for w in took.values() if isinstance(w, str)], took
    for name in names:
        if native.can_run(name) is None:
            assert native.extension(name) is not None, native.why_not(name)
            continue
        m = native.compile_module(name)
        assert callable(getattr(m, "gemv", None) or getattr(m, "decode_step", None)), name


def test_build_with_a_broken_compiler_says_why_for_each_module_and_runs_without_them(tmp_path):
    """`cpugen build` where the compiler fails (CXX=false, an empty cache): every module this CPU
    could run is reported unavailable with the compiler's error, in one line each, nothing hangs
    or is left half-built, and a run afterwards takes torch's ops and says so."""
    env = {"CXX": "false", "CPUGEN_CACHE": str(tmp_path)}
    p = cli("build", env=env, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.strip().splitlines())
    runnable = [n for n in (*native.PORTABLE, *native.X86, *native.MODULES) if native.can_run(n) is None]
    assert runnable and all(lines[n].startswith("unavailable: ") and "false" in lines[n] for n in runnable), lines
    assert not list(tmp_path.glob("ext/*/*.so"))
    r = cli("generate", "--model", "gptj-1b", "--layers", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
            env={**env, "CPUGEN_LIMITS": "cached"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unavailable" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_kernel_benches_run_at_this_level():
    """The microbenchmarks beside the kernels run at the level in use (CPUGEN_ISA caps it:
    test_every_level_in_a_fresh_process), each a short pass on small shapes: bench_step_ops.py
    checks cpugen's argmax against torch.argmax on every call it times, bench_decode_layer.py runs
    the decode stack, the Python blocks and the matmuls on packed and plain weights. (Both once
    asked the AVX-512 module for their kernels, which is None on an AVX2-only CPU.)"""
    import os
    import subprocess

    if native.step_kernels() is None:
        pytest.skip(f"no native kernels on this CPU: {native.why_not('avx2')}")
    env = {**os.environ, "CPUGEN_NATIVE": "1", "CPUGEN_LAYOUT": "packed"}  # the packed stack at every level
    for script, args, want in (("bench_step_ops.py", ["--calls", "2", "--vocab", "1000", "--hidden", "256"],
                                "| argmax 32 x 1000 |"),
                               ("bench_decode_layer.py", ["--model", "gptj-1b", "--layers", "1", "--rounds", "1", "--steps", "2"],
                                "matmuls plain")):
        p = subprocess.run([sys.executable, str(ROOT / "kernels" / script), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=300, env=env)
        assert p.returncode == 0 and want in p.stdout, f"{script}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
