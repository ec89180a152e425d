"""GLM-4.1V vision encoder (as transformers' Glm4vVisionModel) for one image.

Everything that depends only on the image grid (the bicubic resampling of the
learned position grid, the 2-D rope tables) is computed by
:meth:`VisionEncoder.grid_tables`; the exportable component precomputes it
for its one fixed size, so the graph has no data-dependent shapes.

The patch embedding is a Conv3d over two identical frames (a still image is
repeated along time, as Glm4vImageProcessor does); that equals a Conv2d with
the kernel summed over time, which is what runs here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporter.model.config import VisionConfig
from exporter.model.decoder import RMSNorm, rotate_halves


def block_major_coords(grid: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) of each patch in the processor's order: merge windows row-major, then inside each window."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    shape = (grid // merge, merge, grid // merge, merge)
    return h.reshape(shape).transpose(1, 2).flatten(), w.reshape(shape).transpose(1, 2).flatten()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def folded(self) -> nn.Conv2d:
        """The Conv2d that equals this Conv3d on a still image (time repeated)."""
        w = self.proj.weight
        conv = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=w.shape[-1], stride=w.shape[-1])
        with torch.no_grad():
            conv.weight.copy_(w.to(conv.weight.dtype).sum(2))  # summed in fp32 also when w is bf16
            conv.bias.copy_(self.proj.bias)
        return conv


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        # x: [N, C]; cos/sin: [N, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        q = q * cos + rotate_halves(q) * sin  # [heads, N, D]
        k = k * cos + rotate_halves(k) * sin
        scores = torch.matmul(q, k.transpose(1, 2)) * (self.head_dim**-0.5)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [heads, N, D]
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.out_hidden_size)  # Glm4v's block MLP is out_hidden wide

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x):
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PositionEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.position_embedding = nn.Embedding((cfg.pos_grid_size // cfg.patch_size) ** 2, cfg.hidden_size)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.embeddings = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)

    @torch.no_grad()
    def grid_tables(self, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a grid x grid patch image: (position embedding [N, C], rope cos [N, D], rope sin [N, D])."""
        cfg = self.cfg
        h, w = block_major_coords(grid, cfg.spatial_merge_size)
        table = self.embeddings.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        src = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
        norm_w = ((w.float() + 0.5) / grid) * 2 - 1
        norm_h = ((h.float() + 0.5) / grid) * 2 - 1
        where = torch.stack((norm_w, norm_h), dim=-1).view(1, -1, 1, 2)
        pos = F.grid_sample(src, where, mode="bicubic", align_corners=False, padding_mode="border")
        pos = pos.squeeze(0).squeeze(-1).T.to(torch.promote_types(table.dtype, torch.float32))  # [N, C], fp32 for a bf16 table
        quarter = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
        freqs = torch.cat((h[:, None].float() * inv_freq, w[:, None].float() * inv_freq), dim=-1)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return pos, freqs.cos(), freqs.sin()

    def encode(self, pixels, patch_conv: nn.Conv2d, pos, cos, sin) -> torch.Tensor:
        # pixels: [1, 3, S, S] -> merged image tokens [N / merge^2, out_hidden]
        m = self.cfg.spatial_merge_size
        x = patch_conv(pixels)  # [1, C, g, g]
        c, g = x.shape[1], x.shape[2]
        x = x.view(c, g // m, m, g // m, m).permute(1, 3, 2, 4, 0).reshape(g * g, c)  # block-major
        x = self.post_conv_layernorm(x) + pos
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.post_layernorm(x)
        x = x.view(-1, m, m, c).permute(0, 3, 1, 2)
        x = self.downsample(x).view(-1, self.cfg.out_hidden_size)
        return self.merger(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [1, 3, S, S] (eager reference; tables computed for this size) -> [N', out_hidden]
        grid = pixels.shape[-1] // self.cfg.patch_size
        pos, cos, sin = self.grid_tables(grid)
        return self.encode(pixels, self.patch_embed.folded(), pos, cos, sin)
