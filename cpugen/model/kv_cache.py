"""A static KV cache: allocated once for (batch, max_len), written in place, never grown."""

import torch

from cpugen.host.memory import empty_huge


class KVCache:
    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype):
        shape = (batch, n_kv_head, max_len, head_dim)  # (B, nkv, S_max, hd)
        # zeroed now, so the memory a run needs is resident from the start; on huge pages where
        # the kernel gives them, as decode at long context streams the cache like the weights
        self.k, self.v = empty_huge(shape, dtype), empty_huge(shape, dtype)
        self.k.zero_()
        self.v.zero_()

    def update(self, start: int, k, v, rows: slice = slice(None)):
        """k, v (b, nkv, T, hd) go to positions start..start+T-1 of the sequences `rows`; returns
        their filled prefix (b, nkv, start+T, hd) as views (no copy)."""
        end = start + k.shape[2]
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


def kv_cache_bytes(cfg, batch: int, max_len: int, itemsize: int) -> int:
    """Bytes of all layers' caches: 2 (k, v) x L x B x nkv x S x hd x itemsize."""
    return 2 * cfg.n_layer * batch * cfg.n_kv_head * max_len * cfg.head_dim * itemsize
