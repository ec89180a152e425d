"""The text decoder as ExecuTorch runs it fast: its LLM custom ops for the KV cache and attention, and
every other op in a form the XNNPACK partitioner takes, so each layer lowers to one XNNPACK subgraph.

The eager decoder (exporter.model.decoder) writes its cache with ``index_copy_`` and attends with
matmul / where / softmax; XNNPACK takes neither the cache writes nor the masked attention over a
dynamic length, nor RMSNorm's 3-D ``mean``, nor reshapes of a symbolic length, nor slices of a
dynamic tensor (the rope halves), so the lowered decoder fell into many small delegate subgraphs
(362 on SmolLM2-135M) joined by portable ops. Here, as ExecuTorch's examples/models/llama
source transformations do for its own Llama (``--use_sdpa_with_kv_cache``, ``--use_custom_kv_cache``):

* the cache is ``[1, max_seq_len, kv_heads, head_dim]`` (the custom ops' layout) written by
  ``llama::update_cache`` at the call's first cache position;
* attention is ``llama::custom_sdpa`` (causal from that position, grouped-query heads, scale
  1/sqrt(head_dim)) reading the whole cache: the same mask as the eager one (key slot <= query
  position) for the contiguous cache positions both runners pass;
* RMSNorm takes its mean over a 4-D ``[T, 1, H, 1]`` view (XNNPACK's mean is a global pooling over
  the two inner dims), reshapes use static sizes and one inferred length (``-1``);
* M-RoPE is applied before the cache write, as eager: the rotation of a head is a constant
  ``[D, D]`` signed permutation (a linear, not slices and a concat), cos / sin cover the whole head
  (1 and 0 past the rotary part), so ``x * cos + rotate(x) * sin`` is the eager formula exactly.

The module shares its weights with the model (no copy); only the cache and the rope tables are its own.
The ``llama`` ops' kernels live in ``executorch/extension/llm/custom_ops/libcustom_ops_aot_lib.so``:
importing ``executorch.extension.llm.custom_ops.custom_ops`` registers them with torch (export, eager
calibration) and with the ExecuTorch runtime of this process (session.load_runtime_kernels); an app
links ExecuTorch's ``custom_ops`` library, as its llama runner does.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from targets.base import native_stderr_without

CUSTOM_OPS = ("llama.update_cache", "llama.custom_sdpa")  # what the exported decoder must contain


def register_custom_ops() -> None:
    """Register ExecuTorch's ``llama`` ops (update_cache, custom_sdpa) with torch, once (import side effect)."""
    importlib.import_module("executorch.extension.llm.custom_ops.custom_ops")


# What the custom ops' ATen wrappers print natively on every eager call: they run the ExecuTorch kernel with a
# KernelRuntimeContext that has no temp allocator, the kernel's allocate_temp logs this line (ET_LOG to fd 2) and
# the kernel falls back to its own buffer. Tiny's int8-static calibration printed it 352 times per export.
EAGER_OP_NOISE = "No temp allocator provided"


def eager_custom_ops() -> contextlib.AbstractContextManager[None]:
    """Run the decoder eagerly (calibration) without the custom ops' native noise; other native lines pass."""
    return native_stderr_without((EAGER_OP_NOISE,))


def rotation_matrix(head_dim: int, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """R [D, D] with ``x @ R`` = the eager rotation of the first ``rotary_dim`` channels, 0 past them.

    Interleaved (GLM): (x0, x1, ...) -> (-x1, x0, ...); halves (Llama): (a, b) -> (-b, a).
    """
    r = torch.zeros(head_dim, head_dim)
    half = rotary_dim // 2
    for i in range(half):
        if interleaved:
            src_a, src_b = 2 * i, 2 * i + 1  # out[2i] = -x[2i+1], out[2i+1] = x[2i]
        else:
            src_a, src_b = i, i + half  # out[i] = -x[i+half], out[i+half] = x[i]
        r[src_b, src_a] = -1.0
        r[src_a, src_b] = 1.0
    return r


class RopeTables(nn.Module):
    """cos / sin over the whole head [T, 1, D] from M-RoPE position ids [3, T] (the eager Rope's values)."""

    def __init__(self, rope: nn.Module, head_dim: int):
        super().__init__()
        dim, n = rope.dim, rope.dim // 2
        inv = rope.inv_freq.detach().float()
        onehot = rope.axis_onehot.detach()  # [3, dim/2]
        if rope.interleaved:
            inv, onehot = inv.repeat_interleave(2), onehot.repeat_interleave(2, dim=1)
        else:
            inv, onehot = torch.cat((inv, inv)), torch.cat((onehot, onehot), dim=1)
        pad = head_dim - dim  # channels past the rotary part: frequency 0 (cos 1, sin 0)
        self.register_buffer("inv_freq", torch.cat((inv, inv.new_zeros(pad))), persistent=False)
        self.register_buffer("axis_onehot", torch.cat((onehot, onehot.new_zeros(3, pad)), dim=1), persistent=False)
        assert self.inv_freq.shape[0] == head_dim and n * 2 == dim

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [3, T, 1, 1] x [3, 1, 1, D] summed over the axes: [T, 1, D] exact ints (portable int64 ops, once per call)
        pos = (position_ids[:, :, None, None] * self.axis_onehot[:, None, None, :]).sum(0)
        freqs = pos.float() * self.inv_freq  # float from here on: XNNPACK, with the first layer
        return freqs.cos(), freqs.sin()


class Rotation(nn.Module):
    """The rope's rotate(x) as ``x @ R`` (an XNNPACK linear). Never quantized (quantize.py keeps it float)."""

    def __init__(self, head_dim: int, rotary_dim: int, interleaved: bool):
        super().__init__()
        self.register_buffer("weight", rotation_matrix(head_dim, rotary_dim, interleaved).T.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager RMSNorm over [1, T, H], its mean taken on a [T, 1, H, 1] view (XNNPACK's 4-D mean)."""
    h = x.shape[-1]
    x4 = x.view(-1, 1, h, 1)
    ms = (x4 * x4).mean((2, 3), keepdim=True)
    return norm.weight * (x4 * torch.rsqrt(ms + norm.eps)).view(1, -1, h)


class EtAttention(nn.Module):
    """The eager Attention's projections with the custom cache write and SDPA ([1, T, heads, D] layout)."""

    def __init__(self, attn: nn.Module, rotation: Rotation, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.rotation = rotation
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        shape = (1, max_seq_len, self.kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + self.rotation(x) * sin

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v [1, T, heads, D] of the normed input, q and k rotated (all XNNPACK)."""
        d = self.head_dim
        q = self.rope(self.q_proj(x).view(1, -1, self.heads, d), cos, sin)
        k = self.rope(self.k_proj(x).view(1, -1, self.kv_heads, d), cos, sin)
        v = self.v_proj(x).view(1, -1, self.kv_heads, d)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start) -> torch.Tensor:
        """The cache writes and SDPA (the custom ops, outside XNNPACK): [1, T, heads, D]."""
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, self.head_dim**-0.5)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """o_proj of the SDPA output [1, T, heads, D] (XNNPACK)."""
        return self.o_proj(attended.view(1, -1, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start) -> torch.Tensor:
        return self.output(self.attend(*self.project(x, cos, sin), start))


def split_linear(linear: nn.Linear, lo: int, hi: int) -> nn.Linear:
    """A Linear of output rows lo..hi of ``linear`` (its weight a view: no copy). ``derived_from`` names the
    source module's id, so keep_float on the source keeps this one float too (quantize.keep_names)."""
    part = nn.Linear(linear.in_features, hi - lo, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[lo:hi], requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[lo:hi], requires_grad=False)
    part.derived_from = id(linear)
    return part


class EtMLP(nn.Module):
    """The eager MLP with gate_up_proj as two linears: XNNPACK takes no split of a dynamic-length tensor."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        n = mlp.gate_up_proj.out_features // 2
        self.gate_proj = split_linear(mlp.gate_up_proj, 0, n)
        self.up_proj = split_linear(mlp.gate_up_proj, n, 2 * n)
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))


class EtLayer(nn.Module):
    """The eager DecoderLayer (pre-norms, optional sandwich norms, residuals) around EtAttention and EtMLP."""

    NORMS = ("input_layernorm", "post_attention_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm")

    def __init__(self, layer: nn.Module, rotation: Rotation, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = EtAttention(layer.self_attn, rotation, max_seq_len, dtype)
        self.mlp = EtMLP(layer.mlp)
        self.sandwich = layer.sandwich
        for name in self.NORMS:
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Before the cache ops: q, k, v of the normed residual stream ``x``."""
        return self.self_attn.project(rms_norm(self.input_layernorm, x), cos, sin)

    def post(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """After them: o_proj, the residual, the MLP and its residual; the next layer's input."""
        h = self.self_attn.output(attended)
        if self.sandwich:
            h = rms_norm(self.post_self_attn_layernorm, h)
        x = x + h
        h = self.mlp(rms_norm(self.post_attention_layernorm, x))
        if self.sandwich:
            h = rms_norm(self.post_mlp_layernorm, h)
        return x + h

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start) -> torch.Tensor:
        return self.post(x, self.self_attn.attend(*self.pre(x, cos, sin), start))


class EtTextModel(nn.Module):
    """text_decoder's ``(embeds, position_ids, cache_position) -> logits`` on ExecuTorch's custom ops.

    ``method`` is the model's TextDecoderMethod (its TextModel and max_seq_len). The modules it runs are
    the model's own (shared weights, found by keep_float), except each gate_up_proj's two halves (views).
    ``cache_position`` must be contiguous (start .. start + T - 1), as both runners pass it.
    """

    def __init__(self, method: nn.Module):
        super().__init__()
        register_custom_ops()
        text = method.text
        cfg = text.cfg
        self.max_seq_len = method.max_seq_len
        dtype = method.cache.k_0.dtype
        self.rope_tables = RopeTables(text.rope, cfg.head_dim)
        self.rotation = Rotation(cfg.head_dim, cfg.rotary_dim, cfg.rope_interleaved)
        self.layers = nn.ModuleList(EtLayer(ly, self.rotation, self.max_seq_len, dtype) for ly in text.layers)
        self.norm, self.lm_head = text.norm, text.lm_head

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start < self.max_seq_len)
        cos, sin = self.rope_tables(position_ids)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return self.lm_head(rms_norm(self.norm, x))
