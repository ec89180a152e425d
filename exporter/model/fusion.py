"""The seed article's gated fusion of the three modalities.

    gate = softmax(Linear(3h -> 3)(concat(text, image, audio)))
    out  = LayerNorm(g0 * text + g1 * image + g2 * audio)

Applied per position of the spliced sequence: a text position has zero image
and audio parts, an image position has the placeholder token's embedding as
its text part and the image embedding as its image part, and so on.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedFusion(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(3 * hidden, 3)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, text: torch.Tensor, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        # text, image, audio: [..., H] -> [..., H]
        g = torch.softmax(self.gate(torch.cat((text, image, audio), dim=-1)), dim=-1)
        return self.norm(g[..., 0:1] * text + g[..., 1:2] * image + g[..., 2:3] * audio)
