"""KV cache as registered buffers, written in place at a cache-position tensor.

Buffers are named ``k_{i}`` / ``v_{i}`` ([1, kv_heads, max_seq_len, head_dim]);
``torch.export`` keeps them as mutable buffers (ExecuTorch), and Core ML turns
them into states. Slots beyond the current position are masked by the
decoder, so the cache never needs clearing between prompts.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len
        shape = (1, num_kv_heads, max_seq_len, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("slots", torch.arange(max_seq_len, dtype=torch.long), persistent=False)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        # k, v: [1, kv_heads, T, D]; cache_position: [T] -> full caches [1, kv_heads, max_seq, D]
        k_cache: torch.Tensor = getattr(self, f"k_{layer}")
        v_cache: torch.Tensor = getattr(self, f"v_{layer}")
        k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
        return k_cache, v_cache

    def reset(self) -> None:
        for i in range(self.num_layers):
            getattr(self, f"k_{i}").zero_()
            getattr(self, f"v_{i}").zero_()
