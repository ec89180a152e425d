"""MultimodalModel: the reference model built from its parts with one ``build(config)``.

The eager forward here is the ground truth every exported artifact is
compared with: embed the tokens, splice image and audio embeddings in at
their placeholder tokens, run the decoder over the whole sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.model.audio import AudioEncoder
from exporter.model.config import ModelConfig
from exporter.model.decoder import TextModel
from exporter.model.fusion import GatedFusion
from exporter.model.vision import VisionEncoder


class MultimodalModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text = TextModel(config.text)
        self.visual = VisionEncoder(config.vision) if config.vision else None
        self.audio = AudioEncoder(config.audio, config.text.hidden_size) if config.audio else None
        self.fusion = GatedFusion(config.text.hidden_size) if config.fusion else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations (and the KV cache) flow in: fp32 also when weights are stored in bf16/fp16.

        Such weights are upcast one module at a time as it runs (exporter.model.upcast).
        """
        return torch.promote_types(next(self.parameters()).dtype, torch.float32)

    # --- per-modality embeddings (what the exported methods compute) ------------
    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [1, T] -> [1, T, H]
        x = self.text.embed_tokens(tokens)
        if self.fusion is not None:
            zero = torch.zeros_like(x)
            x = self.fusion(x, zero, zero)
        return x

    def placeholder_embedding(self, token_id: int) -> torch.Tensor:
        """The text part fused into every image/audio position: that placeholder's embedding [H]."""
        # through the module, not its weight: a mapped table's upcasting module hands the page back after the read
        row = self.text.embed_tokens(torch.tensor([token_id], device=self.text.embed_tokens.weight.device))[0]
        return row.detach().clone().to(self.compute_dtype)

    def fuse_media(self, media: torch.Tensor, placeholder: torch.Tensor, slot: int) -> torch.Tensor:
        # media: [N, H] of one image (slot 1) or audio clip (slot 2); placeholder: [H] -> [1, N, H]
        media = media.reshape(1, -1, media.shape[-1])
        if self.fusion is None:
            return media
        text = placeholder.expand_as(media)
        zero = torch.zeros_like(media)
        parts = (text, media, zero) if slot == 1 else (text, zero, media)
        return self.fusion(*parts)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [1, 3, S, S] -> [1, N, H]
        assert self.visual is not None, "this model has no vision branch"
        return self.fuse_media(self.visual(pixels), self.placeholder_embedding(self.config.tokens.image_token_id), 1)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [1, n_mels, F] -> [1, A, H]
        assert self.audio is not None, "this model has no audio branch"
        return self.fuse_media(self.audio(mel), self.placeholder_embedding(self.config.tokens.audio_token_id), 2)

    # --- the eager reference over a whole spliced sequence ------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # tokens: [1, T] with placeholder ids; position_ids: [3, T] -> logits [1, T, V]
        x = self.embed_text(tokens)
        ids = self.config.tokens
        for media, embed, tok in ((pixels, self.embed_image, ids.image_token_id), (mel, self.embed_audio, ids.audio_token_id)):
            if media is None:
                continue
            where = (tokens[0] == tok).nonzero().flatten()
            emb = embed(media)[0]
            if where.numel() != emb.shape[0]:
                raise ValueError(f"{where.numel()} placeholder tokens ({tok}) for {emb.shape[0]} embeddings")
            x = x.clone()
            x[0, where] = emb.to(x.dtype)
        return self.text.forward_full(x, position_ids)


def build(config: ModelConfig, seed: int | None = None, device: str | torch.device = "cpu") -> MultimodalModel:
    """The reference model with deterministic weights (seeded), in eval mode.

    On the meta device nothing is allocated (used by ``info`` and before a
    checkpoint is assigned in).
    """
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            return MultimodalModel(config).eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed if seed is None else seed)
    try:
        with torch.device(device):
            model = MultimodalModel(config)
        _init_weights(model)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


@torch.no_grad()
def _init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Small normal weights (as HF's initializer_range), unit norms: a stable random model."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.normal_(0.0, std)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            p.normal_(1.0, 0.05)


def materialize_buffers(model: MultimodalModel) -> None:
    """Recompute the non-persistent buffers of a model whose weights were assigned onto meta."""
    from exporter.model.audio import sinusoids
    from exporter.model.decoder import Rope

    cfg = model.config
    if model.text.rope.inv_freq.is_meta:
        model.text.rope = Rope(cfg.text)
    if model.audio is not None and model.audio.embed_positions.is_meta:
        a = cfg.audio
        model.audio.register_buffer("embed_positions", sinusoids((a.max_frames + 1) // 2, a.hidden_size), persistent=False)
    still = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise RuntimeError(f"tensors left on the meta device: {', '.join(still[:5])}")
