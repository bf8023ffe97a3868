"""The decoder-only transformer: GPT-J, OPT and the Llama family from one set of modules.

Shapes: B batch, T tokens in this call, S cache positions attended (start + T), h hidden,
nh query heads, nkv key/value heads, hd head dim, V vocabulary.

q/k/v are one fused linear (`wqkv`) and a GLU MLP's gate/up one fused linear (`w13`): fewer,
larger matmuls. Rotary embedding is applied in the half-split layout (pairs (i, i + rd/2));
GPT-J checkpoints rotate interleaved pairs, so `checkpoint.py` permutes their q/k rows once at
load, which leaves every score q.k unchanged.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from cpugen.model.activations import KERNEL_CODE as KERNEL_ACT
from cpugen.model.activations import TORCH as ACTIVATIONS
from cpugen.model.config import ModelConfig
from cpugen.model.kv_cache import KVCache
from cpugen.model.shapes import block_matrices


class Linear(nn.Linear):
    """nn.Linear with cpugen's native routes for bf16, chosen by what a backend installs:
    - `panels`: the weight repacked once into cpugen's packed layout (kernels/gemv_bf16.h), which
      `panel_kernel` multiplies for any number of rows, decode and prefill alike;
    - `kernel`: the gemv on the plain weight, for skinny inputs (decode: at most `kernel_rows`);
    - `plain_kernel`: above `plain_above` rows, cpugen's packed-layout kernel on the plain weight,
      packing it a chunk at a time as it goes (the AVX2 level: kernels/packed_avx2.h);
    - `onednn`: the weight reordered into oneDNN's blocked layout (large decode batches);
    otherwise F.linear (oneDNN on the plain weight). `act` names an activation applied to the
    output: inside the native kernels' epilogue where they run, after the matmul otherwise."""

    kernel = None  # (x (M, K), weight (N, K), bias, act code) -> (M, N), set per instance by a backend
    kernel_rows = 4  # measured: the gemv leads F.linear and oneDNN up to 4 rows (kernels/bench_gemv.py)
    onednn = None  # the weight in oneDNN's blocked layout, once to_onednn() has replaced it
    panels = None  # the weight in cpugen's packed layout (N/64, K/2, 128), once to_panels() has replaced it
    panel_kernel = None  # (x (M, K), panels, N, bias, act code) -> (M, N)
    plain_kernel = None  # (x (M, K), weight (N, K), bias, act code) -> (M, N), for more than plain_above rows
    plain_above = None
    widen_above = None  # rows above which bf16 runs as fp32 GEMM on widened blocks (widened_linear)

    def to_onednn(self):
        """Reorders the weight once into oneDNN's blocked layout, replacing it (never two copies):
        faster than F.linear at every batch, slower than the gemv at 1-2 rows (bench_gemv.py)."""
        if self.onednn is None:
            w = self.weight.detach()
            self.weight = None
            self.onednn = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def to_panels(self, ext):
        """Repacks the weight once into cpugen's layout through the native extension `ext`,
        replacing it: one matrix is held twice for the moment of the copy, never the model."""
        from cpugen.host.memory import empty_huge

        w = self.weight.detach()
        p = empty_huge(tuple(ext.packed_shape(*w.shape)), torch.bfloat16)
        ext.pack_into(w, p)
        self.weight = None
        self.panels, self.panel_kernel = p, ext.linear_packed

    def from_panels(self):
        """Puts the plain weight back from cpugen's layout (P[p, j, 2c + i] = W[64p + c, 2j + i]),
        replacing the panels: one matrix is held twice for the moment of the copy, never the model."""
        from cpugen.host.memory import empty_huge

        n, k = self.out_features, self.in_features
        full = n // 64
        src = self.panels.view(torch.int32)  # (P, K/2, 64): a pair of bf16 a value
        w = empty_huge((n, k), torch.bfloat16)
        dst = w.view(torch.int32)  # (N, K/2)
        dst[: full * 64].view(full, 64, k // 2).copy_(src[:full].transpose(1, 2))
        if n > full * 64:  # the last panel's outputs, zeros past N
            dst[full * 64:].copy_(src[full].t()[: n - full * 64])
        self.panels = self.panel_kernel = None
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x, act: str | None = None):
        if self.panels is not None:
            y = self.panel_kernel(x.reshape(-1, x.shape[-1]), self.panels, self.out_features, self.bias,
                                  KERNEL_ACT[act])  # (M, N)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.onednn is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.onednn, self.bias, "none", [], "")
        elif (self.plain_kernel is not None and x.dtype == self.weight.dtype == torch.bfloat16
              and x.numel() > self.plain_above * x.shape[-1]):
            y = self.plain_kernel(x.reshape(-1, x.shape[-1]), self.weight, self.bias, KERNEL_ACT[act])  # (M, N)
            return y.view(*x.shape[:-1], y.shape[-1])
        elif self.kernel is not None and x.dtype == torch.bfloat16 and x.numel() <= self.kernel_rows * x.shape[-1]:
            y = self.kernel(x.reshape(-1, x.shape[-1]), self.weight, self.bias, KERNEL_ACT[act])  # (M, N)
            return y.view(*x.shape[:-1], y.shape[-1])
        elif (self.widen_above is not None and x.dtype == self.weight.dtype == torch.bfloat16
              and x.numel() > self.widen_above * x.shape[-1]):
            y = widened_linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if act is None else ACTIVATIONS[act](y)


WIDEN_BLOCK_BYTES = 2 << 20  # fp32 rows of W widened at a time: a buffer reused by every call


def widened_linear(x, w, bias):
    """x (..., K) @ w (N, K)^T + bias in bf16 out, fp32 math through PyTorch's fp32 GEMM: W is
    widened to fp32 a block of rows at a time into a reused buffer (no fp32 copy of W, no fresh
    pages), each block's output rounded into the bf16 result. For CPUs without AVX-512, where
    PyTorch's bf16 matmuls run 8-170x slower than its fp32 ones (docs/performance.md, "CPUs
    without AVX-512"); its answer is the bf16 GEMM's, up to the order of the fp32 sums."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    rows = max(16, min(N, WIDEN_BLOCK_BYTES // (4 * K)))
    out = torch.empty(M, N, dtype=torch.bfloat16)  # (M, N)
    with torch.autocast("cpu", enabled=False):  # autocast would send the fp32 GEMM back to bf16
        xf = x2.float()  # (M, K)
        wf = _scratch(rows * K).view(rows, K)  # (rows, K) fp32
        yf = torch.empty(M, rows)  # (M, rows) fp32
        for n in range(0, N, rows):
            e = min(N, n + rows)
            wb, yb = wf[: e - n], yf[:, : e - n]
            wb.copy_(w[n:e])
            if bias is not None:
                torch.addmm(bias[n:e].float(), xf, wb.t(), out=yb)
            else:
                torch.mm(xf, wb.t(), out=yb)
            out[:, n:e] = yb
    return out.view(*x.shape[:-1], N)


_scratch_buf = torch.empty(0)


def _scratch(n: int) -> torch.Tensor:
    global _scratch_buf
    if _scratch_buf.numel() < n:
        with torch.inference_mode(False):  # a plain tensor: written in place in and out of inference mode
            _scratch_buf = torch.empty(n)
    return _scratch_buf[:n]


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in fp32 whatever the activation dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.empty(cfg.n_embd))
        self.bias = nn.Parameter(torch.empty(cfg.n_embd)) if cfg.norm == "layernorm" else None
        self.impl = None  # a backend's fused kernel for the same computation (runtime/eager.py's NativeNorm, IPEX's)

    def forward(self, x):  # (B, T, h)
        return self.impl(x) if self.impl is not None else self.reference(x)

    def reference(self, x):  # torch's ops
        if self.kind == "layernorm":
            if x.dtype == self.weight.dtype == torch.bfloat16:
                # PyTorch's CPU kernel computes bf16 in fp32 and rounds once: the same numbers as
                # the fp32 route below, without its four conversions (3.5 us against 9.6 at h=2048)
                return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
            y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
            return y.to(x.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """cos/sin tables for every position, fp32, (max_positions, rd/2). Not a module buffer, so that
    a model built on the meta device gets real tables."""

    def __init__(self, cfg: ModelConfig):
        rd = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float64, device="cpu") / rd))
        inv_freq = _scale_rope(inv_freq, cfg.rope_scaling)
        t = torch.arange(cfg.max_positions, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, inv_freq)  # (P, rd/2)
        self.cos, self.sin = freqs.cos().float(), freqs.sin().float()
        self.rd = rd

    def tables(self, pos):  # pos (B, T) -> cos, sin (B, T, 1, rd/2)
        return self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)


def _scale_rope(inv_freq, scaling: dict | None):
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths slowed by factor, short kept, smooth between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope_scaling type {kind!r}")


def apply_rotary(x, cos, sin, rd: int):
    """x (B, T, H, hd); rotates the first rd dims in fp32 (half-split pairs)."""
    xr = x[..., :rd].float()
    x1, x2 = xr.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


_NO_ROPE = torch.empty(0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.rd = cfg.rotary_dim if cfg.position == "rotary" else 0
        (qkv, h), (_, q) = (mats := block_matrices(cfg))["wqkv"], mats["wo"]
        self.wqkv = Linear(h, qkv, bias=cfg.qkv_bias)  # (q_dim + 2 kv_dim, h)
        self.wo = Linear(q, h, bias=cfg.out_bias)  # (h, q_dim)
        self.cache: KVCache | None = None
        # a backend's fused decode step: (qkv (B, (nh + 2 nkv) hd), cos, sin (B, rd/2), k_cache,
        # v_cache, index, nh, rd) -> (B, nh hd); rotates q/k, writes the cache, attends
        self.decode_step = None

    def forward(self, x, rope, mask, start: int, rows: slice):
        B, T, _ = x.shape
        if (T == 1 and mask is None and self.decode_step is not None and x.dtype == torch.bfloat16
                and self.cache.k.dtype == torch.bfloat16 and rows == slice(None)):
            # unpadded decode over the whole batch: every cached position is attended
            cos, sin = (t.reshape(B, -1) for t in rope) if self.rd else (_NO_ROPE, _NO_ROPE)  # (B, rd/2)
            y = self.decode_step(self.wqkv(x).view(B, -1), cos, sin, self.cache.k, self.cache.v, start,
                                 self.nh, self.rd)  # (B, nh hd)
            return self.wo(y.view(B, 1, -1))
        q, k, v = self.wqkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd)
        if self.rd:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin, self.rd), apply_rotary(k, cos, sin, self.rd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        k, v = self.cache.update(start, k, v, rows)  # (B, nkv, S, hd), S = start + T
        causal = mask is None and T > 1  # no padding and no cache before this call
        # CPU SDPA reads the strided cache views in place; enable_gqa lets each kv head serve
        # nh/nkv query heads without materializing repeated keys/values
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.glu, self.act = cfg.mlp == "glu", cfg.activation
        (width, h), (_, ffn) = (mats := block_matrices(cfg))["w_in"], mats["w_out"]
        self.w_in = Linear(h, width, bias=cfg.mlp_bias)  # fc_in, or [gate; up]: (ffn or 2 ffn, h)
        self.w_out = Linear(ffn, h, bias=cfg.mlp_bias)  # (h, ffn)
        self.product = None  # a backend's kernel for a GLU's act(gate) * up (runtime/eager.py's NativeGlu)

    def forward(self, x):  # (B, T, h)
        if self.glu:
            gu = self.w_in(x)  # (B, T, 2 ffn): [gate; up]
            return self.w_out(self.product(gu) if self.product is not None else self.glu_reference(gu))
        if isinstance(self.w_in, Linear):  # the activation fused into the matmul where it can be
            return self.w_out(self.w_in(x, self.act))  # (B, T, ffn) -> (B, T, h)
        return self.w_out(ACTIVATIONS[self.act](self.w_in(x)))  # a backend's own linear module

    def glu_reference(self, gu):  # torch's ops: (..., 2 ffn) -> (..., ffn)
        gate, up = gu.chunk(2, dim=-1)
        return ACTIVATIONS[self.act](gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln_1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = None if self.parallel else Norm(cfg)
        self.mlp = MLP(cfg)
        # tensor parallel (runtime/distributed.py): sums the ranks' partial outputs of the
        # row-parallel matmuls in place, once per residual add
        self.reduce = None

    def forward(self, x, rope, mask, start: int, rows: slice):
        if self.parallel:  # GPT-J: one norm feeds attention and MLP
            h = self.ln_1(x)
            if self.reduce is not None:  # both partial sums in ONE all-reduce
                return x + self.reduce(self.attn(h, rope, mask, start, rows) + self.mlp(h))
            return x + self.attn(h, rope, mask, start, rows) + self.mlp(h)
        if self.reduce is not None:
            x = x + self.reduce(self.attn(self.ln_1(x), rope, mask, start, rows))
            return x + self.reduce(self.mlp(self.ln_2(x)))
        x = x + self.attn(self.ln_1(x), rope, mask, start, rows)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_rows: tuple[int, int] | None = None):
        """vocab_rows: the lm_head's rows [first, last) where a tensor-parallel rank holds only
        those (model/shard.py); None: all."""
        super().__init__()
        self.cfg = cfg
        self.vocab_rows = vocab_rows
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = (nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.n_embd)
                    if cfg.position == "learned" else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(cfg)
        v0, v1 = vocab_rows or (0, cfg.vocab_size)
        self.lm_head = Linear(cfg.n_embd, v1 - v0, bias=cfg.lm_head_bias)
        self.gather = None  # tensor parallel: (B, V/ranks) logits -> (B, V), the same on every rank
        self.same_tokens = None  # tensor parallel: rank 0's sampled tokens, on every rank
        self.rotary = Rotary(cfg) if cfg.position == "rotary" else None
        # a backend's native decode stack (kernels/decode_layer.cpp): an unpadded decode step of
        # at most decode_stack_rows sequences in one call, from the tokens to the logits
        self.decode_stack = None
        self.decode_stack_rows = 0
        self.stack_refused: str | None = None  # why a backend gave no stack (runtime/stack.py)
        self.decode_paths = Counter()  # decode steps run by each path: "native-stack", "python"
        self._caches = ([], [])  # every block's k and v cache, as the stack takes them

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            if self.vocab_rows is None:
                self.lm_head.weight = self.wte.weight
            else:  # this rank's rows of the embedding, a view: no second copy
                self.lm_head.weight = nn.Parameter(self.wte.weight[slice(*self.vocab_rows)], requires_grad=False)

    # --- KV cache ----------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype):
        """One static cache per layer for (batch, max_len); allocated once, written in place."""
        self.free_caches()
        for b in self.blocks:
            b.attn.cache = KVCache(batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim, dtype)
        self._caches = ([b.attn.cache.k for b in self.blocks], [b.attn.cache.v for b in self.blocks])

    def free_caches(self):
        for b in self.blocks:
            b.attn.cache = None
        self._caches = ([], [])

    # --- forward -----------------------------------------------------------------------------
    def forward(self, tokens, pos, mask=None, start: int = 0, last_only: bool = True, rows: slice = slice(None)):
        """tokens, pos (B, T) -> logits (B, V) for the last position, or (B, T, V).

        The T new keys/values go to cache positions start..start+T-1 of the cache's sequences
        `rows` (a prefill micro-batch; all by default) and the queries attend to cache positions
        0..start+T-1. mask (B or 1, 1, T, start+T) bool, True = may attend; None means no padding
        and start == 0 (plain causal) or T == 1 (attend everything)."""
        B, T = tokens.shape
        if (self.decode_stack is not None and T == 1 and mask is None and rows == slice(None)
                and B <= self.decode_stack_rows and self.wte.weight.dtype == torch.bfloat16):
            logits = self.decode_stack.step(tokens.view(B), pos.view(B), *self._caches, start)  # (B, V or this rank's)
            self.decode_paths["native-stack"] += 1
            if self.gather is not None:
                logits = self.gather(logits)  # (B, V)
            return logits if last_only else logits.view(B, 1, -1)
        if T == 1:
            self.decode_paths["python"] += 1
        x = self.wte(tokens)  # (B, T, h)
        if self.wpe is not None:
            x = x + self.wpe(pos + self.cfg.position_offset)
        rope = self.rotary.tables(pos) if self.rotary is not None else None
        for block in self.blocks:
            x = block(x, rope, mask, start, rows)
        if last_only:
            x = x[:, -1]  # (B, h): prefill needs only the last position's logits
        logits = self.lm_head(self.ln_f(x))  # (B, [T,] V or this rank's V rows)
        return logits if self.gather is None else self.gather(logits)


def build(cfg: ModelConfig, dtype: torch.dtype, device: str = "meta",
          vocab_rows: tuple[int, int] | None = None) -> Transformer:
    """The module tree with parameters on `device` (meta by default: nothing is allocated)."""
    with torch.device(device):
        model = Transformer(cfg, vocab_rows)
    model.to(dtype)
    model.tie_weights()
    return model.eval().requires_grad_(False)
