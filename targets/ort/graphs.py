"""The graphs exported per method, their I/O names, the export itself, and the feeds that drive them.

Graph I/O follows onnxruntime-genai's default names, so genai_config.json needs no renaming; the
session (targets/ort/session.py) and the int8-static calibration reader map the runner's names onto
them through :func:`method_feeds`:

=================  ===========================================  ==============================
method             graph inputs                                 graph outputs
=================  ===========================================  ==============================
token_embedding    input_ids [1,T], image_features [N,H],       inputs_embeds [1,T,H]
                   audio_features [A,H] (spliced in at the
                   placeholder tokens, as genai's embedding
                   model does; the runner passes none)
vision_encoder     pixel_values [1,3,S,S]                       image_features [N,H]
audio_encoder      audio_embeds [1,n_mels,F] (log-mel)          audio_features [A,H]
text_decoder       inputs_embeds [1,T,H], attention_mask        logits [1,T,V],
                   [1,P+T], position_ids [3,1,T],               present.N.key / .value
                   past_key_values.N.key / .value [1,kv,P,D]    [1,kv,P+T,D]
=================  ===========================================  ==============================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from core.artifact import METHODS
from core.errors import BadInputError, ExportError
from targets.ort.attention import TRANSLATIONS, gqa_attend
from targets.ort.files import EXTERNAL_DATA_BYTES, save_model
from targets.ort.fusions import fuse_decoder
from targets.ort.quiet import quiet

class EmbeddingGraph(nn.Module):
    """token_embedding, plus genai's splice of media features at their placeholder tokens."""

    def __init__(self, components: Any):
        super().__init__()
        cfg = components.config
        self.embed = components.token_embedding
        self.media: list[tuple[str, int]] = []
        if cfg.vision is not None:
            self.media.append(("image_features", cfg.tokens.image_token_id))
        if cfg.audio is not None:
            self.media.append(("audio_features", cfg.tokens.audio_token_id))

    def forward(self, input_ids: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        # input_ids: [1, T]; features[i]: [N_i, H] (N_i may be 0) -> inputs_embeds [1, T, H]
        x = self.embed(input_ids)
        for (_, token), feats in zip(self.media, features):
            hit = input_ids[0] == token  # [T]
            index = torch.cumsum(hit.long(), 0) * hit.long()  # k-th placeholder -> k, others -> 0
            # a placeholder with no feature left for it (e.g. generated as text) keeps its token embedding
            hit = hit & (index <= feats.shape[0])
            index = torch.clamp(index, max=feats.shape[0])
            table = torch.cat((feats.new_zeros(1, feats.shape[-1]), feats.to(x.dtype)), dim=0)
            x = torch.where(hit[None, :, None], table[index][None], x)
        return x


class MediaGraph(nn.Module):
    """vision_encoder / audio_encoder with genai's 2-D [N, H] features output."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method(x)  # [1, N, H]
        return out.reshape(-1, out.shape[-1])


class DecoderGraph(nn.Module):
    """The decoder core with explicit past key/values in and presents out, attention as onnxruntime's fused
    GroupQueryAttention (targets/ort/attention.py; it reads ``attention_mask`` as lengths, as genai's graphs do)."""

    def __init__(self, components: Any):
        super().__init__()
        self.text = components.model.text

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        # inputs_embeds: [1, T, H]; attention_mask: [1, P+T]; position_ids: [3, 1, T];
        # past[i]: ([1, kv, P, D], [1, kv, P, D]) -> logits [1, T, V], presents [1, kv, P+T, D]
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = self.text.run(inputs_embeds, position_ids[:, 0, :], gqa_attend(past, attention_mask, presents))
        return logits, presents


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def graph_io(config: Any) -> dict[str, tuple[list[str], list[str]]]:
    """Graph input and output names per method present in this model."""
    n = config.text.num_layers
    io_: dict[str, tuple[list[str], list[str]]] = {
        "token_embedding": (
            ["input_ids"]
            + (["image_features"] if config.vision else [])
            + (["audio_features"] if config.audio else []),
            ["inputs_embeds"],
        ),
        "vision_encoder": (["pixel_values"], ["image_features"]),
        "audio_encoder": (["audio_embeds"], ["audio_features"]),
        "text_decoder": (
            ["inputs_embeds", "attention_mask", "position_ids"] + past_names(n),
            ["logits"] + present_names(n),
        ),
    }
    have = {"token_embedding", "text_decoder"} | ({"vision_encoder"} if config.vision else set())
    have |= {"audio_encoder"} if config.audio else set()
    return {m: io_[m] for m in METHODS if m in have}


def _graph(components: Any, method: str):
    """(module, example args, dynamic_shapes) for ``method``."""
    from torch.export import Dim

    cfg = components.config
    t = cfg.text
    dtype = next(components.model.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):  # a checkpoint kept in half computes in fp32: so do the graphs
        dtype = torch.float32
    max_t = cfg.shape.max_seq_len
    seq = Dim("sequence_length", min=1, max=max_t)
    if method == "token_embedding":
        module = EmbeddingGraph(components)
        args: list[Any] = [torch.tensor([[cfg.tokens.image_token_id if cfg.vision else 0, 1, 2, 3]], dtype=torch.long)]
        shapes: list[Any] = [{1: seq}]
        for name, _ in module.media:
            args.append(torch.zeros(2, t.hidden_size, dtype=dtype))
            shapes.append({0: Dim(name.replace("_features", "_tokens"), min=0, max=max_t)})
        # forward(input_ids, *features): the features travel as one tuple argument (none: text-only model)
        return module, (args[0], *args[1:]), (shapes[0], tuple(shapes[1:])) if len(args) > 1 else (shapes[0],)
    if method in ("vision_encoder", "audio_encoder"):
        module = MediaGraph(components.methods()[method])
        return module, components.example_inputs(method), None
    if method == "text_decoder":
        module = DecoderGraph(components)
        past_len = Dim("past_sequence_length", min=0, max=max_t - 1)
        p, n = 2, 3
        past = [
            (torch.zeros(1, t.num_kv_heads, p, t.head_dim, dtype=dtype), torch.zeros(1, t.num_kv_heads, p, t.head_dim, dtype=dtype))
            for _ in range(t.num_layers)
        ]
        pos = torch.arange(p, p + n, dtype=torch.long).expand(3, 1, n).contiguous()
        args = (torch.zeros(1, n, t.hidden_size, dtype=dtype), torch.ones(1, p + n, dtype=torch.long), pos, past)
        shapes = ({1: seq}, {1: Dim.AUTO}, {2: seq}, [({2: past_len}, {2: past_len}) for _ in range(t.num_layers)])
        return module, args, shapes
    raise KeyError(method)


def _param_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(module.parameters()) + list(module.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def export_onnx(components: Any, method: str, path: Path, keep: Iterable[str] = ()) -> None:
    """torch.onnx (dynamo) export of one method's graph to ``path`` (external data when large). The decoder's
    norms and q/k/v projections are fused (targets/ort/fusions.py), except the linears of ``keep`` modules."""
    module, args, shapes = _graph(components, method)
    inputs, outputs = graph_io(components.config)[method]
    try:
        with torch.no_grad(), quiet():
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=inputs,
                output_names=outputs,
                optimize=True,
                verbose=False,
                custom_translation_table=TRANSLATIONS,
            )
    except Exception as e:  # torch.onnx raises its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx export of {method} failed: {first}") from e
    name_by_module(program.model.graph, module, components.model)
    if method == "text_decoder":  # residual add + RMSNorm, and q/k/v, fused (targets/ort/fusions.py)
        import onnx_ir as ir

        save_model(fuse_decoder(ir.serde.serialize_model(program.model), keep)[0], path)
        return
    program.save(str(path), external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES)


def name_by_module(graph: Any, wrapper: nn.Module, model: nn.Module) -> None:
    """Name each node after the model module it came from and drop the exporter's per-node debug metadata.

    ``model.text.layers.0.self_attn.q_proj/MatMul_12``: ``--keep-float`` names
    (``model.named_modules()`` names) then select nodes by prefix, and the
    stack traces the exporter attaches to every node (a third of a tiny
    model's file) are not shipped.
    """
    import ast

    model_names = {id(m): n for n, m in model.named_modules() if n}
    local = {n: model_names.get(id(m), "") for n, m in wrapper.named_modules() if n}
    for i, node in enumerate(graph.all_nodes()):  # onnx_ir nodes
        try:
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        scope = next((local[s] for s in reversed(scopes) if local.get(s)), "")
        node.name = f"{scope}/{node.op_type}_{i}" if scope else f"{node.op_type}_{i}"
        node.metadata_props.clear()
        node.doc_string = None


# --- feeds: the runner's inputs under the graphs' names ---------------------------------------


def method_feeds(method: str, sample: dict[str, Any], config: Any) -> dict[str, np.ndarray]:
    """One recorded runner call (runner names) as graph feeds (genai names)."""
    h = config.text.hidden_size
    if method == "token_embedding":
        feeds = {"input_ids": np.asarray(sample["tokens"], np.int64)}
        if config.vision:
            feeds["image_features"] = np.zeros((0, h), np.float32)
        if config.audio:
            feeds["audio_features"] = np.zeros((0, h), np.float32)
        return feeds
    if method == "vision_encoder":
        return {"pixel_values": np.asarray(sample["pixels"], np.float32)}
    if method == "audio_encoder":
        return {"audio_embeds": np.asarray(sample["mel"], np.float32)}
    if method == "text_decoder":
        embeds = np.asarray(sample["embeds"], np.float32)
        past = sample.get("past")
        t = config.text
        start = int(np.asarray(sample["cache_position"]).reshape(-1)[0])
        if past is None:
            if start:
                raise BadInputError("calibration decoder sample without 'past' at cache position > 0")
            empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
            past = [(empty, empty)] * t.num_layers
        return decoder_feeds(embeds, np.asarray(sample["position_ids"], np.int64), past)
    raise KeyError(method)


def decoder_feeds(embeds: np.ndarray, position_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]]):
    """text_decoder's feeds: the runner's [3, T] positions as genai's [3, 1, T], an all-ones mask over past + new."""
    p = past[0][0].shape[2]
    feeds = {
        "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
        "attention_mask": np.ones((1, p + embeds.shape[1]), np.int64),
        "position_ids": np.ascontiguousarray(position_ids.reshape(3, 1, -1), np.int64),
    }
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(k, np.float32)
        feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(v, np.float32)
    return feeds
