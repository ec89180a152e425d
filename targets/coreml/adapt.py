"""The model as Core ML converts it: fp16 copies, the decoder with its KV cache as states, rope tables.

Core ML computes in fp16 and keeps state only in fp16 buffers; these modules adapt the reference
model to that without changing what it computes (each class says why it exists).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import ExportError
from exporter.model.decoder import RMSNorm, Rope, masked_attention
from exporter.model.upcast import typed_copy


class CoreMLDecoder(nn.Module):
    """text_decoder semantics (layers ``[first, stop)``) with the cache in fp16 buffers that Core ML turns into states.

    State names: ``cache_k_{i}`` / ``cache_v_{i}`` ``[1, kv_heads, max_seq_len, head_dim]``
    (Core ML states are fp16 only; ``i`` the layer's index in the whole decoder). The new keys/values are
    written with a slice at ``cache_position[0]`` (contiguous positions, as the runner calls it);
    the attention mask comes from ``cache_position`` inside the graph, without inf.

    The whole decoder by default; a chunk of a decoder split over several packages holds only its layers
    (what ``fp16_copy`` copies), takes the previous chunk's hidden states as ``embeds`` and returns its own,
    or, when ``head``, the final norm's and lm_head's logits.
    """

    def __init__(self, components: Any, first: int = 0, stop: int | None = None, head: bool = True):
        super().__init__()
        cfg = components.config
        t = cfg.text
        text = components.model.text
        stop = t.num_layers if stop is None else stop
        self.first = first
        self.layers = nn.ModuleList(text.layers[first:stop])
        self.rope = text.rope
        self.head = head
        if head:
            self.norm, self.lm_head = text.norm, text.lm_head
        self.max_seq_len = components.text_decoder.max_seq_len
        shape = (1, t.num_kv_heads, self.max_seq_len, t.head_dim)
        for i in range(first, stop):
            self.register_buffer(f"cache_k_{i}", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer(f"cache_v_{i}", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("slots", torch.arange(self.max_seq_len, dtype=torch.int32))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(b.shape) for name, b in self.named_buffers() if name.startswith("cache_")}

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # embeds: [1, T, H]; position_ids: [3, T] int32; cache_position: [T] int32 -> logits [1, T, V] (hidden [1, T, H])
        start = cache_position[0]
        n = embeds.shape[1]
        mask = self.slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, max_seq]

        def kv_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
            k_cache = getattr(self, f"cache_k_{layer}")
            v_cache = getattr(self, f"cache_v_{layer}")
            k_cache[:, :, start : start + n] = k.to(k_cache.dtype)
            v_cache[:, :, start : start + n] = v.to(v_cache.dtype)
            return k_cache.to(k.dtype), v_cache.to(v.dtype)

        # as TextModel.run, over this chunk's layers
        cos, sin = self.rope(position_ids)
        attend = masked_attention(mask, kv_fn)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, cos, sin, attend, self.first + i)
        return self.lm_head(self.norm(x)) if self.head else x


class TableRope(Rope):
    """The model's rotary embedding with cos/sin looked up in tables made at export time.

    The tables are the model's own ``Rope`` evaluated in float32 for every
    position below ``max_pos`` (all three M-RoPE axes equal), and ``axis_mask``
    says which axis each rotary dimension takes its position from (probed from
    the same ``Rope``). Under Core ML's fp16 compute the angle ``position * freq``
    would be rounded to fp16 (0.25 rad steps near position 1000); a table lookup
    keeps the float32 angles. ``apply`` is the model's.
    """

    def __init__(self, rope: Rope, max_pos: int):
        nn.Module.__init__(self)
        self.dim = rope.dim
        self.interleaved = rope.interleaved
        self.max_pos = max_pos
        with torch.no_grad():
            cos, sin = rope(torch.arange(max_pos, dtype=torch.long).expand(3, max_pos))  # [P, dim]
            masks = []
            for axis in range(3):
                probe = torch.zeros(3, 1, dtype=torch.long)
                probe[axis] = 1
                masks.append(rope(probe)[1][0] != 0)
        mask = torch.stack(masks).to(cos.dtype)  # [3, dim]
        if not torch.equal(mask.sum(0), torch.ones_like(mask[0])):
            raise ExportError("rotary embedding: could not tell which M-RoPE axis each rotary dimension uses")
        self.register_buffer("cos_table", cos.float())
        self.register_buffer("sin_table", sin.float())
        self.register_buffer("axis_mask", mask.unsqueeze(1))  # [3, 1, dim]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [3, T] -> cos, sin: [T, rotary_dim]
        idx = position_ids.clamp(0, self.max_pos - 1)
        return (self.cos_table[idx] * self.axis_mask).sum(0), (self.sin_table[idx] * self.axis_mask).sum(0)


def fp16_copy(module: nn.Module, safe_rmsnorm: bool = False) -> nn.Module:
    """A deep copy of ``module`` whose floating parameters and buffers are fp16, eval mode, no grad.

    Converting from fp16 weights keeps coremltools from holding several float32
    copies of every weight (measured: an fp32 embedding table of 592 MiB took
    4.7 GiB more peak RSS to convert; the same table in fp16, 0.01 GiB). The
    fp16 tensors are made first and handed to ``deepcopy`` through its memo, so
    no float32 copy of the model is ever made. The model itself is not touched, except that the mapped
    checkpoint pages of a kept (bf16) checkpoint's weights are handed back once copied; upcasting modules
    (exporter.model.upcast) become their base class in the copy, which computes in fp16.
    ``safe_rmsnorm`` swaps every RMSNorm for :class:`Fp16SafeRMSNorm` (the decoder).
    """
    copied = typed_copy(module, torch.float16, float32_types=(nn.LayerNorm,))
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, _Float32LayerNorm(child))
            elif safe_rmsnorm and isinstance(child, RMSNorm):
                setattr(parent, name, Fp16SafeRMSNorm(child))
    return copied


class Fp16SafeRMSNorm(nn.Module):
    """RMSNorm whose mean of squares cannot overflow fp16.

    Core ML runs FLOAT16: trained LLMs carry "massive activations" in the residual
    stream (SmolLM2-135M: |x| up to 23,852, inside fp16's 65,504), whose squares
    (5.7e8) overflow to inf, so ``rsqrt`` gives 0 and the row is wiped out (SmolLM2
    decoder cosine 0.088 before this). Each row is divided by its max |x| first;
    ``x * rsqrt(mean(x^2) + eps)`` equals ``y * rsqrt(mean(y^2) + eps / s^2)`` for
    ``y = x / s`` exactly, and now every square is <= 1.
    """

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-2)
        y = x / s
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / (s * s)))


class _Float32LayerNorm(nn.Module):
    """nn.LayerNorm computed in float32 inside an fp16 copy.

    coremltools' layer_norm converter gives an fp32 epsilon next to fp16 gamma
    and rejects the op; a float32 LayerNorm between two casts converts, and the
    FLOAT16 compute precision pass then lowers it to fp16 like every other op.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def fp16_args(args: tuple) -> tuple:
    """Example inputs for an fp16 copy: float tensors in fp16, the rest as given."""
    return tuple(a.to(torch.float16) if a.is_floating_point() else a for a in args)
