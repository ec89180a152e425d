"""The vision and audio encoders as ExecuTorch runs them fast: every op in a form the XNNPACK partitioner
takes, so each encoder lowers to a few XNNPACK subgraphs instead of one per op run between portable ops.

What the eager encoders (exporter.model.vision / audio, core.components) contain that XNNPACK 1.5.1's
partitioner leaves to portable kernels, and what stands in for it here (the same math):

* RMSNorm and LayerNorm (``mean`` over the last dim of a 2-D / 3-D tensor, ``native_layer_norm``): XNNPACK's
  mean is a global pooling over the two inner dims of a 4-D tensor, so both norms take their means over a
  ``[rows, 1, H, 1]`` view (llm_decoder.rms_norm; :func:`layer_norm`);
* ``matmul`` of 3-D / 4-D attention tensors (decomposed into ``expand_copy`` + ``bmm``): ``bmm`` directly;
* the fused qkv projection split with ``view`` + ``unbind`` (``split_with_sizes_copy``, ``squeeze_copy``):
  three linears over row views of the one weight (llm_decoder.split_linear: no copy, keep_float follows
  the source);
* the vision rope's ``rotate_halves`` (a ``chunk``): the constant signed permutation as a linear
  (llm_decoder.Rotation, kept out of quantization as the decoder's is);
* the audio pooling's ``mean`` over a middle dim: the same mean over a permuted 4-D view;
* the gated fusion of a media embedding with its placeholder token (``zeros_like`` + ``cat`` of three
  ``[N, H]`` parts + ``expand``): the gate's columns for the media part as a linear whose bias holds the
  placeholder's part (a constant), so nothing is concatenated and no zero part exists.

On tiny, every recipe's vision_encoder and audio_encoder now lower to one XNNPACK subgraph each with no
portable kernel call (eager forms: 15 and 12 subgraphs, 28 and 18 portable calls; tests/test_executorch.py,
README "ExecuTorch decoder"). The modules share the model's weights (no copy) except the fusion gate's media
columns (a small contiguous copy); the rope tables are the method module's own buffers, reshaped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from targets.executorch.llm_decoder import Rotation, rms_norm, split_linear


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm over the last dim of ``x``, its two means taken on a ``[rows, 1, H, 1]`` view (XNNPACK's mean)."""
    h = x.shape[-1]
    x4 = x.reshape(-1, 1, h, 1)
    xc = x4 - x4.mean((2, 3), keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean((2, 3), keepdim=True) + norm.eps)
    return y.reshape(x.shape) * norm.weight + norm.bias


def norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vision RMSNorm of an ``[N, C]`` tensor (llm_decoder.rms_norm's 4-D mean), ``[N, C]`` out."""
    return rms_norm(norm, x).reshape(x.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over ``[N, heads, D]`` tensors with ``bmm``; ``[N, heads, D]`` out."""
    scores = torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0)) * scale  # [heads, N, N]
    return torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1)).transpose(0, 1)


class EtVisionAttention(nn.Module):
    """VisionAttention with q / k / v as three linears and the rope rotation as a linear."""

    def __init__(self, attn: nn.Module, rotation: Rotation):
        super().__init__()
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        c = self.heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = (split_linear(attn.qkv, i * c, (i + 1) * c) for i in range(3))
        self.proj = attn.proj
        self.rotation = rotation

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [N, C]; cos / sin: [N, 1, D]
        n, h, d = x.shape[0], self.heads, self.head_dim
        q = self.q_proj(x).view(n, h, d)
        k = self.k_proj(x).view(n, h, d)
        q = q * cos + self.rotation(q) * sin
        k = k * cos + self.rotation(k) * sin
        out = attention(q, k, self.v_proj(x).view(n, h, d), d**-0.5)
        return self.proj(out.reshape(n, h * d))


class EtVisionBlock(nn.Module):
    def __init__(self, block: nn.Module, rotation: Rotation):
        super().__init__()
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.attn = EtVisionAttention(block.attn, rotation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(norm_2d(self.norm1, x), cos, sin)
        return x + self.mlp(norm_2d(self.norm2, x))


class EtMediaFusion(nn.Module):
    """core.components._MediaFusion for its one slot (1 image, 2 audio): ``[N, H]`` -> ``[1, N, H]``.

    The eager gate is ``Linear(3H -> 3)`` of ``cat(placeholder, image, audio)`` with the other media part
    zero; here it is the gate's columns of this slot's part, with the placeholder's columns times the
    placeholder (a constant) folded into the bias, and the LayerNorm of ``g0 * placeholder + g_slot * media``.
    """

    def __init__(self, fuse: nn.Module):
        super().__init__()
        self.fused = fuse.fusion is not None  # (the GatedFusion itself is not a submodule: only its norm runs here)
        if not self.fused:
            return
        gate = fuse.fusion.gate
        h = gate.in_features // 3
        s = fuse.slot
        w = gate.weight.detach()
        lin = nn.Linear(h, 3, bias=True, device="meta")
        lin.weight = nn.Parameter(w[:, s * h:(s + 1) * h].contiguous(), requires_grad=False)
        bias = w[:, :h].float() @ fuse.placeholder.float().reshape(-1) + gate.bias.detach().float()
        lin.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
        lin.derived_from = id(gate)  # keep_float on the gate keeps this one float (quantize.keep_names)
        self.gate, self.slot, self.norm = lin, s, fuse.fusion.norm
        self.register_buffer("placeholder", fuse.placeholder.detach().reshape(1, 1, -1))

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        media = media.reshape(1, -1, media.shape[-1])
        if not self.fused:
            return media
        g = torch.softmax(self.gate(media), dim=-1)
        return layer_norm(self.norm, g[..., 0:1] * self.placeholder + g[..., self.slot:self.slot + 1] * media)


class EtVisionEncoder(nn.Module):
    """vision_encoder ``pixels [1, 3, S, S] -> [1, N', H]`` (core.components.VisionEncoderMethod) in XNNPACK forms."""

    def __init__(self, method: nn.Module):
        super().__init__()
        visual = method.visual
        self.merge, self.out_hidden = visual.cfg.spatial_merge_size, visual.cfg.out_hidden_size
        self.patch_conv = method.patch_conv
        self.register_buffer("pos_embed", method.pos_embed)
        n, d = method.rope_cos.shape
        self.register_buffer("rope_cos", method.rope_cos.reshape(n, 1, d))
        self.register_buffer("rope_sin", method.rope_sin.reshape(n, 1, d))
        self.rotation = Rotation(d, d, interleaved=False)  # rotate_halves over the whole head
        self.post_conv_layernorm, self.post_layernorm = visual.post_conv_layernorm, visual.post_layernorm
        self.blocks = nn.ModuleList(EtVisionBlock(b, self.rotation) for b in visual.blocks)
        self.downsample, self.merger = visual.downsample, visual.merger
        self.fuse = EtMediaFusion(method.fuse)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.merge
        x = self.patch_conv(pixels)  # [1, C, g, g]
        c, g = x.shape[1], x.shape[2]
        x = x.view(c, g // m, m, g // m, m).permute(1, 3, 2, 4, 0).reshape(g * g, c)  # block-major
        x = norm_2d(self.post_conv_layernorm, x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        x = norm_2d(self.post_layernorm, x)
        x = self.downsample(x.view(-1, m, m, c).permute(0, 3, 1, 2)).view(-1, self.out_hidden)
        mg = self.merger
        x = F.gelu(layer_norm(mg.post_projection_norm, mg.proj(x)))
        return self.fuse(mg.down_proj(F.silu(mg.gate_proj(x)) * mg.up_proj(x)))


class EtAudioEncoder(nn.Module):
    """audio_encoder ``mel [1, n_mels, F] -> [1, A, H]`` (core.components.AudioEncoderMethod) in XNNPACK forms."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.audio = method.audio
        self.fuse = EtMediaFusion(method.fuse)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        a = self.audio
        x = F.gelu(a.conv1(mel))
        x = F.gelu(a.conv2(x)).transpose(1, 2)  # [1, L, C]
        n, c = x.shape[1], x.shape[2]
        x = x + a.embed_positions[:n]
        for layer in a.layers:
            at = layer.self_attn
            h = at.heads
            y = layer_norm(layer.self_attn_layer_norm, x)
            q, k, v = (p(y).view(n, h, c // h) for p in (at.q_proj, at.k_proj, at.v_proj))
            x = x + at.out_proj(attention(q, k, v, (c // h) ** -0.5).reshape(1, n, c))
            x = x + layer.fc2(F.gelu(layer.fc1(layer_norm(layer.final_layer_norm, x))))
        x = layer_norm(a.layer_norm, x)
        pool = a.cfg.pool
        keep = (n // pool) * pool
        if keep != n:
            x = x[:, :keep]
        # the mean over each pool of steps: [A, pool, C] -> [A, C, pool, 1], XNNPACK's inner-dims mean
        x = x.reshape(-1, pool, c).transpose(1, 2).unsqueeze(-1).mean((2, 3), keepdim=True).view(1, -1, c)
        return self.fuse(a.proj2(F.gelu(a.proj1(x))))
