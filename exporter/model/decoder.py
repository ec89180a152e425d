"""GLM-4 text decoder (as transformers' Glm4vTextModel), with Llama family switches.

One decoder core, two ways to hold the KV cache:

* ``forward_step``: the cache lives in :class:`~exporter.model.kv_cache.KVCache`
  buffers written in place at ``cache_position`` (ExecuTorch, Core ML).
* ``forward_with_past``: explicit past key/values in, presents out (the eager reference).

Both are an ``attend`` function handed to :meth:`TextModel.run`: each layer's attention computes
q, k, v and their rotation, and ``attend`` does the rest (cache, GQA, mask, softmax). The ONNX Runtime
graph hands in its own (targets/ort/attention.py: onnxruntime's fused GroupQueryAttention).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from exporter.model.config import TextConfig
from exporter.model.kv_cache import KVCache

# Masked attention scores are set to this (not -inf): it survives fp16 casts
# and Core ML weight quantization, which skips constants holding inf.
MASK_VALUE = -30000.0

KVFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (layer, q [1, T, heads * D], k / v [1, T, kv_heads * D] as projected, (heads, kv_heads, D), rope, cos, sin)
# -> attention output [1, T, heads * D]; the function rotates q and k itself (cos / sin: [T, rotary_dim]).
# The head counts travel as Python ints: sizes read off traced shapes become tensor arithmetic in a trace,
# which Core ML's converter cannot make constants (see rotate_halves).
AttendFn = Callable[..., torch.Tensor]
Heads = tuple[int, int, int]


def split_heads(x: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    """[1, T, n * D] -> [1, n, T, D]."""
    b, t, _ = x.shape
    return x.view(b, t, n, head_dim).transpose(1, 2)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: Heads,
                      scale: float | None = None) -> torch.Tensor:
    """q [1, heads, T, D] (rotated), k / v [1, kv_heads, S, D] (the whole cache), mask [T, S] bool (True = may
    attend) -> [1, T, heads * D]: each group of heads reads its one key/value head; scale D ** -0.5 by default."""
    n, n_kv, d = heads
    b, _, t, _ = q.shape
    rep = n // n_kv
    if rep > 1:
        s = k.shape[2]
        k = k[:, :, None].expand(b, n_kv, rep, s, d).reshape(b, n, s, d)
        v = v[:, :, None].expand(b, n_kv, rep, s, d).reshape(b, n, s, d)
    scores = torch.matmul(q, k.transpose(2, 3)) * (d**-0.5 if scale is None else scale)
    scores = torch.where(mask, scores, torch.full_like(scores, MASK_VALUE))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, t, n * d)


def masked_attention(mask: torch.Tensor, kv_fn: KVFn) -> AttendFn:
    """``attend`` over a cache that ``kv_fn`` keeps: mask [T, S] bool (True = may attend)."""

    def attend(layer: int, q, k, v, heads: Heads, rope: "Rope", cos, sin) -> torch.Tensor:
        n, n_kv, d = heads
        q = rope.apply(split_heads(q, n, d), cos, sin)
        k = rope.apply(split_heads(k, n_kv, d), cos, sin)
        k, v = kv_fn(layer, k, split_heads(v, n_kv, d))  # [1, kv_heads, S, head_dim]
        return grouped_attention(q, k, v, mask, heads)

    return attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        # x / sqrt(...), not x * rsqrt(...): onnxruntime's SimplifiedLayerNormFusion matches Pow -> ReduceMean -> Add
        # -> Sqrt -> Div -> Mul and fuses it into one SimplifiedLayerNormalization kernel; the rsqrt form (Sqrt ->
        # Reciprocal -> Mul) stays 6 kernels per norm (tiny's decoder: 219 -> 165 nodes after optimization). The
        # ExecuTorch and Core ML targets put their own norms in (llm_decoder.py, adapt.py).
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GLM's interleaved rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """Llama's rotation: (a, b) -> (-b, a) over the two halves.

    ``chunk`` rather than slicing at ``x.shape[-1] // 2``: a traced ``size // 2`` becomes a
    floor_divide + int cast on a tensor, which Core ML's converter cannot turn into a constant.
    """
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Rope(nn.Module):
    """Partial rotary embedding with 3-D M-RoPE sections (t, h, w)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # axis_onehot[a, f] = 1 where frequency f takes its position from axis a
        sections = cfg.mrope_section or (dim // 2,)
        axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
        onehot = F.one_hot(axis, 3).T.contiguous()  # [3, dim/2]
        self.register_buffer("axis_onehot", onehot, persistent=False)
        self.interleaved = cfg.rope_interleaved
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [3, T] int64 -> cos, sin: [T, rotary_dim]
        pos = (position_ids.unsqueeze(-1) * self.axis_onehot.unsqueeze(1)).sum(0)  # [T, dim/2], exact ints
        freqs = pos.float() * self.inv_freq
        if self.interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)
        else:
            freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [1, heads, T, head_dim]; cos/sin: [T, rotary_dim]
        rot, keep = x[..., : self.dim], x[..., self.dim :]
        turned = rotate_pairs(rot) if self.interleaved else rotate_halves(rot)
        return torch.cat((rot * cos + turned * sin, keep), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rope: Rope, cos, sin, attend: AttendFn, layer: int) -> torch.Tensor:
        # x: [1, T, H]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(attend(layer, q, k, v, (self.num_heads, self.num_kv_heads, self.head_dim), rope, cos, sin))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(self, x, rope, cos, sin, attend: AttendFn, layer: int) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, cos, sin, attend, layer)
        if self.sandwich:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            h = self.post_mlp_layernorm(h)
        return x + h


class TextModel(nn.Module):
    """Embedding, decoder layers, final norm and lm_head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.rope = Rope(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def run(self, embeds, position_ids, attend: AttendFn) -> torch.Tensor:
        # embeds: [1, T, H]; position_ids: [3, T] -> logits [1, T, V]
        cos, sin = self.rope(position_ids)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, cos, sin, attend, i)
        return self.lm_head(self.norm(x))

    def forward_step(self, embeds, position_ids, cache_position, cache: KVCache) -> torch.Tensor:
        # embeds: [1, T, H]; position_ids: [3, T]; cache_position: [T] -> logits [1, T, V]
        mask = cache.slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, max_seq]

        def kv_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
            return cache.update(layer, k, v, cache_position)

        return self.run(embeds, position_ids, masked_attention(mask, kv_fn))

    def forward_with_past(self, embeds, position_ids, past: list[tuple[torch.Tensor, torch.Tensor]]):
        # embeds: [1, T, H]; past[i]: ([1, kv, P, D], [1, kv, P, D])
        # -> logits [1, T, V], presents [1, kv, P+T, D]
        t = embeds.shape[1]
        p = past[0][0].shape[2]
        q_pos = torch.arange(t, device=embeds.device) + p
        k_pos = torch.arange(p + t, device=embeds.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [T, P+T]
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []

        def kv_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
            pk, pv = past[layer]
            kk, vv = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            presents.append((kk, vv))
            return kk, vv

        logits = self.run(embeds, position_ids, masked_attention(mask, kv_fn))
        return logits, presents

    def forward_full(self, embeds, position_ids) -> torch.Tensor:
        """Whole sequence at once, no cache (the reference the cached paths must equal)."""
        cfg = self.cfg
        empty = embeds.new_zeros(1, cfg.num_kv_heads, 0, cfg.head_dim)
        logits, _ = self.forward_with_past(embeds, position_ids, [(empty, empty)] * cfg.num_layers)
        return logits
