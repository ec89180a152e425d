"""transformers LlamaForCausalLM / Qwen2ForCausalLM directories on the reference decoder (text only).

A user's own small real model (SmolLM2, TinyLlama, Qwen2/2.5-0.5B, ...) as written by ``save_pretrained``:
config.json (model_type llama or qwen2), safetensors shards, tokenizer.json and tokenizer_config.json (its chat
template). The decoder runs with the Llama family switches (no sandwich norms, rope over halves on
``position_ids[0]``, no M-RoPE); Qwen2 adds q/k/v biases. gate_proj and up_proj are concatenated into the
decoder's fused gate_up_proj (the one copy this makes is of the MLP weights, fp32). Rope scaling variants
(llama3, yarn, dynamic, ...) are refused, naming the key: the decoder implements the plain rope only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from core.errors import CheckpointError, ConfigError

FAMILIES = ("llama", "qwen2")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SAME = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
}


def model_type(ckpt: Path) -> str | None:
    """config.json's model_type, or None when there is no readable config.json."""
    try:
        raw = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw.get("model_type") if isinstance(raw, dict) else None


def _int(raw: dict, key: str, path: Path, lo: int = 1, hi: int = 4_000_000, default: Any = None) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{path}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def text_config(ckpt: Path):
    """The ModelConfig of a Llama / Qwen2 directory (no weights touched)."""
    from core.chat import read_template, read_tokenizer_config
    from exporter.checkpoint import tokenizer_eos
    from exporter.model.config import ExportShape, ModelConfig, SpecialTokens, TextConfig

    path = ckpt / "config.json"
    raw = json.loads(path.read_text())
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{path}: model_type '{family}' is not one of {', '.join(FAMILIES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act '{raw.get('hidden_act')}' is not supported (only silu)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"{path}: rope_scaling type '{rope.get('rope_type', rope.get('type'))}' is not supported (plain rope only)")
    heads = _int(raw, "num_attention_heads", path, hi=1024)
    hidden = _int(raw, "hidden_size", path, hi=65_536)
    head_dim = raw.get("head_dim") or hidden // heads
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    gen = ckpt / "generation_config.json"
    gen_cfg = json.loads(gen.read_text()) if gen.is_file() else {}
    tok = ckpt / "tokenizer.json"
    eos: tuple[int, ...] = ()
    for src in (raw, gen_cfg):
        v = src.get("eos_token_id")
        if v is not None:
            eos = tuple(int(x) for x in (v if isinstance(v, list) else [v]))
            break
    if not eos:
        eos = tokenizer_eos(ckpt, tok)
    if not eos:
        raise CheckpointError(f"{path}: no eos_token_id in config.json, generation_config.json or tokenizer_config.json")
    try:
        text = TextConfig(
            vocab_size=_int(raw, "vocab_size", path),
            hidden_size=hidden,
            num_layers=_int(raw, "num_hidden_layers", path, hi=1000),
            num_heads=heads,
            num_kv_heads=_int(raw, "num_key_value_heads", path, hi=1024, default=heads),
            intermediate_size=_int(raw, "intermediate_size", path, hi=1_048_576),
            rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            partial_rotary_factor=1.0,
            mrope_section=(),
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            sandwich_norms=False,
            rope_interleaved=False,
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            head_dim_override=int(head_dim) if head_dim != hidden // heads else 0,
        )
        bos = raw.get("bos_token_id")
        adds_bos = bool(read_tokenizer_config(ckpt).get("add_bos_token", False))  # Llama-2 style tokenizers
        tokens = SpecialTokens(eos_ids=eos, pad_id=int(raw.get("pad_token_id") or eos[0]),
                               bos_ids=(int(bos),) if adds_bos and isinstance(bos, int) else ())
        ctx = int(raw.get("max_position_embeddings", 2048))
        return ModelConfig(
            name=ckpt.resolve().name,
            text=text,
            tokens=tokens,
            shape=ExportShape(max_seq_len=min(ctx, 512)),
            tokenizer=str(tok) if tok.is_file() else "",
            chat_template=read_template(ckpt),
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load(ckpt: Path):
    """A text-only MultimodalModel with the directory's weights (fp32)."""
    from exporter.checkpoint import iter_safetensors, shard_files
    from exporter.model.multimodal import build, materialize_buffers

    config = text_config(ckpt)
    t = config.text
    model = build(config, device="meta")
    expected = model.state_dict()
    if t.tie_embeddings:
        expected.pop("text.lm_head.weight", None)
    sd: dict[str, torch.Tensor] = {}
    halves: dict[int, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for shard in shard_files(ckpt):
        for key, tensor in iter_safetensors(shard):
            if not tensor.is_floating_point():
                raise CheckpointError(f"{shard}: tensor '{key}' is {tensor.dtype}; weights must be floating point")
            value = tensor.to(torch.float32)
            m = _LAYER.match(key)
            if key == "model.embed_tokens.weight":
                sd["text.embed_tokens.weight"] = value
            elif key == "model.norm.weight":
                sd["text.norm.weight"] = value
            elif key == "lm_head.weight":
                if not t.tie_embeddings:
                    sd["text.lm_head.weight"] = value
            elif m and m.group(2) in _SAME:
                sd[f"text.layers.{m.group(1)}.{m.group(2)}"] = value
            elif m and m.group(2) in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                halves.setdefault(int(m.group(1)), {})[m.group(2).split(".")[1]] = value
            elif m and m.group(2).endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints saved the rope table; the decoder computes it
            else:
                unexpected.append(key)
    for i, h in halves.items():
        if set(h) == {"gate_proj", "up_proj"}:
            sd[f"text.layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([h["gate_proj"], h["up_proj"]], dim=0)
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected keys: {', '.join(unexpected[:5])}")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{ckpt}: missing keys (as the reference names them): {', '.join(missing[:5])}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{ckpt}: '{k}' has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{ckpt}: '{k}' holds NaN or infinite values")
    model.load_state_dict(sd, strict=False, assign=True)
    if t.tie_embeddings:
        model.text.lm_head.weight = model.text.embed_tokens.weight
    materialize_buffers(model)
    return model.eval()
