"""Reference implementations the native kernels are checked against: plain torch, fp32 math."""

import torch

from cpugen.model.activations import KERNEL_CODE, TORCH


# the kernels' activation codes and torch functions: cpugen's one table
ACTIVATIONS = KERNEL_CODE
_ACT_FN = TORCH


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """y (M, N) = act(x (M, K) @ w (N, K)^T + bias), in fp32, rounded once to bf16."""
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    if act is not None:
        y = _ACT_FN[act](y)
    return y.to(torch.bfloat16)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, nh, hd), k/v (B, nkv, S, hd) -> (B, nh, hd): softmax(q k^T / sqrt(hd)) v in fp32,
    each kv head serving nh/nkv consecutive query heads, rounded once to bf16."""
    B, nh, hd = q.shape
    g = nh // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)  # (B, nh, S, hd)
    vf = v.float().repeat_interleave(g, dim=1)
    p = (q.float()[:, :, None, :] @ kf.transpose(-1, -2) / hd**0.5).softmax(-1)  # (B, nh, 1, S)
    return (p @ vf)[:, :, 0].to(torch.bfloat16)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rd: int) -> torch.Tensor:
    """x (B, H, hd) bf16 rotated on its first rd dims, pairs (i, i + rd/2); cos, sin (B, rd/2)."""
    if not rd:
        return x
    c, s = cos[:, None].float(), sin[:, None].float()
    x1, x2 = x[..., : rd // 2].float(), x[..., rd // 2: rd].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., rd:].float()), dim=-1).to(x.dtype)


def decode_step(qkv, cos, sin, k_cache, v_cache, index: int, nh: int, rd: int) -> torch.Tensor:
    """qkv (B, (nh + 2 nkv) hd): rotates q and k, writes k and v to cache position `index`, attends
    over positions 0..index -> (B, nh hd)."""
    B, nkv, hd = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.view(B, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=1)
    k_cache[:, :, index] = rotate(k, cos, sin, rd)
    v_cache[:, :, index] = v
    y = decode_attention(rotate(q, cos, sin, rd), k_cache[:, :, : index + 1], v_cache[:, :, : index + 1])
    return y.reshape(B, nh * hd)


def norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor:
    """LayerNorm (or RMSNorm) of each row of x in fp32, rounded as cpugen's Norm rounds: LayerNorm
    once; RMSNorm the normalized row to x's dtype, then times the weight."""
    xf = x.float()
    if not rms:
        return torch.nn.functional.layer_norm(xf, xf.shape[-1:], w.float(), b.float(), eps).to(x.dtype)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def glu(gu: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up over the halves [gate; up] of the last dim, each rounded to gu's dtype."""
    gate, up = gu.chunk(2, dim=-1)
    return _ACT_FN[act](gate) * up
