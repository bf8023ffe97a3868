"""Reference implementations the native kernels are checked against: plain torch, fp32 math."""

import torch


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K)^T + bias, accumulated in fp32, rounded once to bf16."""
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
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
