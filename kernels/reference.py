"""Reference implementations the native kernels are checked against: plain torch, fp32 math."""

import torch


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K)^T + bias, accumulated in fp32, rounded once to bf16."""
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)
