"""The four exportable methods as small nn.Modules with fixed signatures.

Every target exports these same modules (names and inputs identical on every
runtime; see docs/ARCHITECTURE.md). Anything that depends only on the fixed
export shape (vision position grid, rope tables, folded patch kernel, the
placeholder embeddings fused into media tokens) is precomputed here, so no
graph has a data-dependent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from exporter.model.config import ModelConfig
from exporter.model.kv_cache import KVCache
from exporter.model.multimodal import MultimodalModel


class TokenEmbedding(nn.Module):
    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.embed_tokens = model.text.embed_tokens
        self.fusion = model.fusion

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [1, T] int64 -> [1, T, H]
        x = self.embed_tokens(tokens)
        if self.fusion is not None:
            zero = torch.zeros_like(x)
            x = self.fusion(x, zero, zero)
        return x


class _MediaFusion(nn.Module):
    """Fuses a media embedding with its placeholder token's embedding (slot 1 image, 2 audio)."""

    def __init__(self, model: MultimodalModel, token_id: int, slot: int):
        super().__init__()
        self.fusion = model.fusion
        self.slot = slot
        if self.fusion is not None:
            self.register_buffer("placeholder", model.placeholder_embedding(token_id))

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        # media: [N, H] -> [1, N, H]
        media = media.reshape(1, -1, media.shape[-1])
        if self.fusion is None:
            return media
        text = self.placeholder.expand_as(media)
        zero = torch.zeros_like(media)
        return self.fusion(text, media, zero) if self.slot == 1 else self.fusion(text, zero, media)


class VisionEncoderMethod(nn.Module):
    def __init__(self, model: MultimodalModel):
        super().__init__()
        assert model.visual is not None
        cfg = model.config
        self.visual = model.visual
        self.patch_conv = model.visual.patch_embed.folded()
        pos, cos, sin = model.visual.grid_tables(cfg.image_grid)
        self.register_buffer("pos_embed", pos)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)
        self.fuse = _MediaFusion(model, cfg.tokens.image_token_id, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [1, 3, S, S] normalised -> [1, N, H]
        x = self.visual.encode(pixels, self.patch_conv, self.pos_embed, self.rope_cos, self.rope_sin)
        return self.fuse(x)


class AudioEncoderMethod(nn.Module):
    def __init__(self, model: MultimodalModel):
        super().__init__()
        assert model.audio is not None
        self.audio = model.audio
        self.fuse = _MediaFusion(model, model.config.tokens.audio_token_id, 2)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [1, n_mels, F] -> [1, A, H]
        return self.fuse(self.audio(mel))


class TextDecoderMethod(nn.Module):
    def __init__(self, model: MultimodalModel, max_seq_len: int | None = None):
        super().__init__()
        cfg = model.config
        t = cfg.text
        self.text = model.text
        self.max_seq_len = max_seq_len or cfg.shape.max_seq_len
        dtype = model.compute_dtype  # fp32 also for bf16-stored weights
        self.cache = KVCache(t.num_layers, t.num_kv_heads, self.max_seq_len, t.head_dim, dtype=dtype)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # embeds: [1, T, H]; position_ids: [3, T] int64; cache_position: [T] int64 -> logits [1, T, V]
        return self.text.forward_step(embeds, position_ids, cache_position, self.cache)


# method -> the module path of its repeated blocks (blockwise parity hooks them; torch.onnx names graph nodes after them)
BLOCK_FAMILIES = {"text_decoder": "text.layers", "vision_encoder": "visual.blocks"}


@dataclass
class Components:
    config: ModelConfig
    model: MultimodalModel
    token_embedding: TokenEmbedding
    vision_encoder: VisionEncoderMethod | None
    audio_encoder: AudioEncoderMethod | None
    text_decoder: TextDecoderMethod

    def methods(self) -> dict[str, nn.Module]:
        """The methods this model has, in the canonical order."""
        out: dict[str, nn.Module] = {"token_embedding": self.token_embedding}
        if self.vision_encoder is not None:
            out["vision_encoder"] = self.vision_encoder
        if self.audio_encoder is not None:
            out["audio_encoder"] = self.audio_encoder
        out["text_decoder"] = self.text_decoder
        return out

    def example_inputs(self, method: str, seq_len: int = 4) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        dtype = self.model.compute_dtype
        if method == "token_embedding":
            return (torch.zeros(1, seq_len, dtype=torch.long),)
        if method == "vision_encoder":
            s = cfg.shape.image_size
            return (torch.zeros(1, 3, s, s, dtype=dtype),)
        if method == "audio_encoder":
            assert cfg.audio is not None
            return (torch.zeros(1, cfg.audio.n_mels, cfg.shape.audio_frames, dtype=dtype),)
        if method == "text_decoder":
            pos = torch.arange(seq_len, dtype=torch.long)
            return (torch.zeros(1, seq_len, cfg.text.hidden_size, dtype=dtype), pos.expand(3, seq_len).contiguous(), pos)
        raise KeyError(method)

    def input_names(self, method: str) -> tuple[str, ...]:
        return {
            "token_embedding": ("tokens",),
            "vision_encoder": ("pixels",),
            "audio_encoder": ("mel",),
            "text_decoder": ("embeds", "position_ids", "cache_position"),
        }[method]

    def dynamic_shapes(self, method: str):
        """torch.export dynamic_shapes for ``method`` (None: fully static)."""
        max_t = self.config.shape.max_seq_len
        seq = Dim("seq_len", min=1, max=max_t)
        if method == "token_embedding":
            return {"tokens": {1: seq}}
        if method == "text_decoder":
            return {"embeds": {1: seq}, "position_ids": {1: seq}, "cache_position": {0: seq}}
        return None

    def export(self, method: str) -> torch.export.ExportedProgram:
        """torch.export one method (no graph breaks allowed), under no_grad."""
        module = self.methods()[method]
        with torch.no_grad():
            return torch.export.export(
                module, self.example_inputs(method), dynamic_shapes=self.dynamic_shapes(method), strict=False
            )


def build_components(model: MultimodalModel, max_seq_len: int | None = None) -> Components:
    model.eval()
    return Components(
        config=model.config,
        model=model,
        token_embedding=TokenEmbedding(model),
        vision_encoder=VisionEncoderMethod(model) if model.visual is not None else None,
        audio_encoder=AudioEncoderMethod(model) if model.audio is not None else None,
        text_decoder=TextDecoderMethod(model, max_seq_len),
    )
