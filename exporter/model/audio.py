"""The seed article's speech front-end: a Whisper-style log-mel encoder plus a projector.

log-mel [1, n_mels, F] -> Conv1d(k3) -> GELU -> Conv1d(k3, stride 2) -> GELU
-> + sinusoidal positions -> pre-LN transformer blocks -> LayerNorm
-> average-pool ``pool`` steps -> Linear -> GELU -> Linear (decoder width).
Names follow Whisper's encoder so Whisper weights can be mapped onto it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exporter.model.config import AudioConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal position table [length, channels]."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat((t.sin(), t.cos()), dim=1)


class AudioAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        # x: [1, L, C]
        b, n, c = x.shape
        d = c // self.heads
        q = self.q_proj(x).view(b, n, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, d).transpose(1, 2)
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * d**-0.5, dim=-1)
        return self.out_proj(torch.matmul(p, v).transpose(1, 2).reshape(b, n, c))


class AudioBlock(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = AudioAttention(cfg.hidden_size, cfg.num_heads)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig, out_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.hidden_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=3, stride=2, padding=1)
        self.register_buffer("embed_positions", sinusoids((cfg.max_frames + 1) // 2, cfg.hidden_size), persistent=False)
        self.layers = nn.ModuleList(AudioBlock(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.proj1 = nn.Linear(cfg.hidden_size, out_hidden)
        self.proj2 = nn.Linear(out_hidden, out_hidden)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [1, n_mels, F] -> audio tokens [1, (ceil(F/2)) // pool, out_hidden]
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [1, L, C]
        n = x.shape[1]
        x = x + self.embed_positions[:n]
        for layer in self.layers:
            x = layer(x)
        x = self.layer_norm(x)
        pool = self.cfg.pool
        keep = (n // pool) * pool
        x = x[:, :keep].reshape(1, keep // pool, pool, -1).mean(2)
        return self.proj2(F.gelu(self.proj1(x)))
