"""The modules each method of the .pte is exported from, and the image marker they rely on.

GLM's 3-D M-RoPE positions cannot come from the stock runner, so they are ``text_decoder``'s own state
(:class:`RopeState`, mutable buffers no other method touches: the stock runner's C++ ``Module`` gives
each method its own memory). The decoder recognises an image prefill by the ``<|begin_of_image|>``
row that ends the text segment before it (:class:`EtTextDecoder`); the marker checks here make sure
no other token passes for it and that the saved program's own row for it does.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from targets.executorch.encoders import EtAudioEncoder, EtVisionEncoder
from targets.executorch.llm_decoder import EtTextModel

STATE = "mrope"  # text_decoder's position-state module (buffers mrope.offset, mrope.image_next)
# relative L2 distance within which a row is <|begin_of_image|>: int8 byte rows of it lie ~0.006 away on tiny,
# other tokens' rows > 1; the export checks both sides (report["image_marker"])
MARKER_TOL = 0.1
# each encoder method's inputs (the decoder's are in input_names)
COMPONENT_INPUTS = {"token_embedding": ("tokens",), "vision_encoder": ("pixels",), "audio_encoder": ("mel",)}
ET_ENCODERS = {"vision_encoder": EtVisionEncoder, "audio_encoder": EtAudioEncoder}


class RopeState(nn.Module):
    """text_decoder's M-RoPE state: the rope offset, and whether the last call ended with <|begin_of_image|>."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("image_next", torch.zeros(1, dtype=torch.long), persistent=False)


class EtTextDecoder(nn.Module):
    """text_decoder(embeds, cache_position): positions from its own state (the runner's rule).

    ``image_start`` is the <|begin_of_image|> embedding row [H] (None: the model has no vision, every
    call is text); an image is ``grid`` x ``grid`` rows. Position arithmetic uses int64 constant tensors,
    never Python scalars: PT2E turns scalar operands into float32 constants, which made the int8-static
    program compute positions in float (through XNNPACK) and cast them back into the int64 state.
    """

    def __init__(self, inner: nn.Module, grid: int, max_seq_len: int, image_start: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.vision = image_start is not None
        g = max(grid, 1)
        steps = torch.arange(max_seq_len, dtype=torch.long)
        self.register_buffer("steps", steps, persistent=False)
        self.register_buffer("one", torch.ones(1, dtype=torch.long), persistent=False)
        if image_start is not None:
            row = image_start.detach().float().reshape(-1)
            self.register_buffer("image_start", row.clone(), persistent=False)
            # squared distance below which a row is <|begin_of_image|>: (MARKER_TOL * |row|)^2
            self.threshold = float((MARKER_TOL * row.norm()) ** 2)
            self.register_buffer("rows", torch.div(steps, g, rounding_mode="floor"), persistent=False)
            self.register_buffer("cols", steps % g, persistent=False)
            self.register_buffer("side", torch.full((1,), g, dtype=torch.long), persistent=False)
            self.register_buffer("image_len", torch.full((1,), g * g, dtype=torch.long), persistent=False)
        setattr(self, STATE, RopeState())

    def forward(self, embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        state: RopeState = getattr(self, STATE)
        t = embeds.shape[1]
        idx = self.steps[:t]
        fresh = cache_position[:1] == 0
        offset = torch.where(fresh, torch.zeros_like(state.offset), state.offset)
        text = offset + idx
        after_text = text[-1:] + self.one
        if not self.vision:
            state.offset.copy_(after_text)
            return self.inner(embeds, text.unsqueeze(0).expand(3, t), cache_position)
        marked = (state.image_next > 0) & ~fresh
        image = marked & (idx[-1:] + self.one == self.image_len)  # a marked call of exactly one image's rows
        grid = torch.stack([offset.expand(t), offset + self.rows[:t], offset + self.cols[:t]])
        position_ids = torch.where(image, grid, text.unsqueeze(0).expand(3, t))
        state.offset.copy_(torch.where(image, offset + self.side, after_text))
        diff = embeds[0, -1:].float() - self.image_start  # [1, H]: this call's last row
        state.image_next.copy_(((diff * diff).sum(dim=-1) <= self.threshold).long())
        return self.inner(embeds, position_ids, cache_position)


class ByteEmbedding(nn.Module):
    """An embedding table stored as int8 rows + one fp32 scale per row (ExecuTorch embedding_byte)."""

    ROWS = 8192  # rows quantized at a time

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        importlib.import_module("executorch.exir.passes._quant_patterns_and_replacements")  # registers the op

        table = emb.weight.detach()
        weight = torch.empty(table.shape, dtype=torch.int8)
        scales = torch.empty(table.shape[0], dtype=torch.float32)
        for lo in range(0, table.shape[0], self.ROWS):  # in row blocks: no float temporaries of the whole table
            w = table[lo : lo + self.ROWS].float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            weight[lo : lo + self.ROWS] = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
            scales[lo : lo + self.ROWS] = scale
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, tokens, dtype=torch.float32
        )


# --- the modules and their export signatures ---------------------------------------------------------


def program_modules(components: Any, image_start: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """The modules each .pte method is exported from (stock-runner signatures)."""
    grid = components.config.image_grid // components.config.vision.spatial_merge_size if components.config.vision else 1
    out: dict[str, nn.Module] = {}
    for name, module in components.methods().items():
        if name == "text_decoder":  # the decoder on ExecuTorch's custom cache / SDPA ops (llm_decoder)
            inner = EtTextModel(module)
            out[name] = EtTextDecoder(inner, grid, inner.max_seq_len, image_start)
        elif name in ET_ENCODERS:  # the encoders in the forms XNNPACK takes whole (encoders)
            out[name] = ET_ENCODERS[name](module)
        else:
            out[name] = module
    return out


def example_inputs(components: Any, method: str) -> tuple[torch.Tensor, ...]:
    ex = components.example_inputs(method, seq_len=4)
    if method == "text_decoder":
        return (ex[0], ex[2])
    return ex


def dynamic_shapes(components: Any, method: str):
    ds = components.dynamic_shapes(method)
    if method == "text_decoder":
        return {"embeds": ds["embeds"], "cache_position": ds["cache_position"]}
    return ds


def export_module(components: Any, method: str, module: nn.Module):
    """torch.export of ``module`` as method ``method`` of the program (its example inputs and dynamic shapes)."""
    with torch.no_grad():
        return torch.export.export(
            module, example_inputs(components, method), dynamic_shapes=dynamic_shapes(components, method), strict=False
        )


def input_names(method: str) -> tuple[str, ...]:
    """The .pte method's inputs (the stock runner's: the decoder takes no position_ids)."""
    return ("embeds", "cache_position") if method == "text_decoder" else COMPONENT_INPUTS[method]


def constant_methods(config: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata the stock LLM runner reads, plus ours (strings and int lists are allowed).

    ``metadata`` is the artifact's (targets.base.artifact_metadata), so the program and artifact.json agree.
    """
    t = config.tokens
    out: dict[str, Any] = {
        "get_max_seq_len": config.shape.max_seq_len,
        "get_max_context_len": config.shape.max_seq_len,
        "get_vocab_size": config.text.vocab_size,
        "get_bos_id": t.bos_ids[0] if t.bos_ids else -1,
        "get_eos_ids": list(t.eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }
    for key in ("image_size", "image_tokens", "audio_frames", "audio_tokens", "n_mels", "image_token_id",
                "image_start_id", "image_end_id", "audio_token_id", "audio_start_id", "audio_end_id"):
        out[f"get_{key}"] = int(metadata[key])
    out["get_recipe"] = str(metadata["recipe"])
    out["get_package_version"] = metadata["package_version"]
    out["get_model_name"] = config.name
    return out


# --- the image marker ----------------------------------------------------------------------------


def image_start_row(components: Any) -> torch.Tensor | None:
    """The <|begin_of_image|> row token_embedding returns (the eager reference's), or None without vision."""
    cfg = components.config
    if cfg.vision is None:
        return None
    if cfg.tokens.image_start_id < 0:
        raise ExportError(
            f"model '{cfg.name}' has vision but no image_start_id: the ExecuTorch text_decoder recognises an "
            "image prefill by the <|begin_of_image|> row that ends the text before it"
        )
    with torch.no_grad():
        return components.token_embedding(torch.tensor([[cfg.tokens.image_start_id]]))[0, 0].float()


def nearest_other_row(components: Any, row: torch.Tensor, chunk: int = 4096) -> tuple[int, float]:
    """The token whose embedding is nearest ``row`` (other than image_start_id), and its relative L2 distance.

    The marker is only sound when no other token comes within MARKER_TOL of it.
    """
    cfg = components.config
    best, best_id = float("inf"), -1
    with torch.no_grad():
        for lo in range(0, cfg.text.vocab_size, chunk):
            ids = torch.arange(lo, min(lo + chunk, cfg.text.vocab_size))
            d = (components.token_embedding(ids[None])[0].float() - row).norm(dim=-1) / row.norm()
            d[ids == cfg.tokens.image_start_id] = float("inf")
            i = int(d.argmin())
            if float(d[i]) < best:
                best, best_id = float(d[i]), int(ids[i])
    return best_id, best


def check_marker_unique(components: Any, marker: torch.Tensor) -> dict[str, Any]:
    """No other token's embedding may pass for <|begin_of_image|> (with a 2x margin)."""
    cfg = components.config
    other, dist = nearest_other_row(components, marker)
    if dist < 2 * MARKER_TOL:
        raise ExportError(
            f"model '{cfg.name}': token {other}'s embedding lies {dist:.3g} (relative L2) from "
            f"<|begin_of_image|> ({cfg.tokens.image_start_id}); the ExecuTorch text_decoder could not tell "
            f"them apart (it needs > {2 * MARKER_TOL})"
        )
    return {"token_id": cfg.tokens.image_start_id, "tolerance": MARKER_TOL, "nearest_other_token": other,
            "nearest_other_relative_l2": round(dist, 4)}


def check_marker_in_program(session: Any, components: Any, marker: torch.Tensor) -> dict[str, Any]:
    """The saved program's own token_embedding row for <|begin_of_image|> must match the decoder's marker
    (with a 2x margin): it is what the stock runner hands text_decoder."""
    tid = components.config.tokens.image_start_id
    row = torch.from_numpy(session.run("token_embedding", tokens=np.array([[tid]], np.int64)).reshape(-1))
    dist = float((row - marker).norm() / marker.norm())
    if not dist <= MARKER_TOL / 2:
        raise ExportError(
            f"the program's token_embedding row for <|begin_of_image|> ({tid}) lies {dist:.3g} (relative L2) from "
            f"the reference row; the text_decoder would not recognise an image prefill (needs <= {MARKER_TOL / 2})"
        )
    return {"program_row_relative_l2": round(dist, 5)}
