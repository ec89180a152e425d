"""Write a random-weight checkpoint laid out exactly as transformers saves ``Glm4vForConditionalGeneration``.

The published AutoGLM-Phone-9B / GLM-4.1V-9B weights are ~20 GB behind a
download this project cannot rely on, yet the loader, the exporters and their
memory budget must be exercised at the real widths and with the real file
layout. ``make_checkpoint`` writes that layout with seeded random weights:

* ``config.json`` / ``generation_config.json`` with the keys transformers 5
  writes for a ``Glm4vConfig`` (no bos / gmask / sop ids: the chat template
  supplies ``[gMASK]<sop>``, as in the published checkpoint);
* bf16 safetensors shards (``model-0000i-of-0000N.safetensors`` + index), split
  as ``save_pretrained(max_shard_size=...)`` splits them;
* ``tokenizer.json`` + ``tokenizer_config.json``: a deterministic byte-level BPE
  filling ids 0..151328 and GLM-4.1V's 16 special tokens at their real ids
  151329..151344 (the published tokenizer has exactly these: 151345 ids, while
  the embedding has 151552 rows; ``<think>`` etc. are ordinary text there).

Memory stays flat at any size: each shard's header is written first from the
known shapes, then every tensor is generated in fixed-size chunks, written and
freed. Each tensor has its own generator seeded from (seed, name), so the bytes
do not depend on shard layout or write order. The directory is written beside
``out`` and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from core.errors import ConfigError, OutputError
from exporter.model.config import ModelConfig, get_preset
from exporter.model.templates import GLM4V_CHAT_TEMPLATE

Progress = Callable[[str, int, int], None]

MARKER = "make_checkpoint.json"  # identifies a directory this module wrote (may be replaced)
DEFAULT_SHARD = "5GB"  # the published GLM-4.1V-9B shards (transformers 5's own default is 50GB)
TRANSFORMERS_VERSION = "5.24.0"  # the version whose save_pretrained layout this mirrors
CHUNK_ELEMS = 1 << 24  # generation chunk: fixed, so the bytes do not depend on memory settings
MODEL_MAX_LENGTH = 65536

# GLM-4.1V's special tokens, in id order from 151329 (GLM-4-0414 / GLM-4.1V tokenizer_config.json).
GLM_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)
FIRST_SPECIAL_ID = 151329
# GLM-4's pre-tokenizer split (the tiktoken pattern of its ChatGLM4Tokenizer)
GLM_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --- what gets written ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # checkpoint key (transformers' current layout)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


def check_writable(cfg: ModelConfig) -> None:
    """Refuse a config that transformers' Glm4v cannot represent (the file layout would be a lie)."""
    t = cfg.text
    problems = []
    if cfg.vision is None:
        problems.append("it has no vision tower")
    if cfg.audio is not None or cfg.fusion:
        problems.append("it has an audio branch / gated fusion (Glm4v has neither)")
    if not (t.attention_bias and t.sandwich_norms and t.rope_interleaved) or t.tie_embeddings or t.head_dim_override:
        problems.append("its decoder is not a GLM-4 block (bias, sandwich norms, interleaved rope, untied, default head dim)")
    if t.vocab_size < FIRST_SPECIAL_ID + len(GLM_SPECIALS):
        problems.append(f"vocab {t.vocab_size} is below GLM's special ids (up to {FIRST_SPECIAL_ID + len(GLM_SPECIALS) - 1})")
    if problems:
        raise ConfigError(f"'{cfg.name}' cannot be written as a Glm4v checkpoint: " + "; ".join(problems))


def checkpoint_key(name: str) -> str:
    """Reference-model state_dict name -> checkpoint key (the inverse of exporter.checkpoint.map_key)."""
    if name.startswith("text.lm_head."):
        return name[len("text.") :]
    if name.startswith("text."):
        return "model.language_model." + name[len("text.") :]
    if name.startswith("visual."):
        return "model." + name
    raise ConfigError(f"no Glm4v checkpoint key for reference tensor '{name}'")


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Keys and shapes, in transformers' state_dict order (visual, language model, lm_head).

    Derived from the reference model built on the meta device (nothing allocated):
    its names are the checkpoint's after the prefix the loader maps.
    """
    from exporter.model.multimodal import build

    check_writable(cfg)
    model = build(cfg, device="meta")
    specs = [TensorSpec(checkpoint_key(n), tuple(t.shape)) for n, t in model.state_dict().items()]
    group = {"model.visual.": 0, "model.language_model.": 1, "lm_head.": 2}
    return sorted(specs, key=lambda s: next(g for p, g in group.items() if s.name.startswith(p)))  # stable


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 500 * 2**20, as transformers' convert_file_size_to_int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"max shard size '{size}' is not a size like 5GB or 500MiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if unit.endswith("IB") else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]] if unit != "B" else 0
    n = int(float(m.group(1)) * base**power)
    if n < 1:
        raise ConfigError(f"max shard size '{size}' is not positive")
    return n


def split_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in state_dict order, a new shard when the next tensor would overflow (save_pretrained's rule)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# --- weights ---------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's bf16 values, row-major, in chunks of at most CHUNK_ELEMS.

    1-D weights are norm scales (near 1); everything else, biases included,
    is N(0, 0.02) as transformers' initializer_range: finite, non-degenerate logits.
    """
    gen = _generator(seed, spec.name)
    mean = 1.0 if len(spec.shape) == 1 and spec.name.endswith(".weight") else 0.0
    left = spec.numel
    while left:
        n = min(left, CHUNK_ELEMS)
        yield torch.empty(n, dtype=torch.bfloat16).normal_(mean, 0.02, generator=gen)
        left -= n


def _header(specs: list[TensorSpec]) -> tuple[bytes, list[TensorSpec]]:
    """safetensors header (tensors sorted by name, as the safetensors library writes them), 8-byte aligned."""
    ordered = sorted(specs, key=lambda s: s.name)
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in ordered:
        meta[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def write_shard(path: Path, specs: list[TensorSpec], seed: int, on_bytes: Callable[[int], None]) -> str:
    """Header first, then each tensor chunk by chunk; returns the file's sha256."""
    header, ordered = _header(specs)
    sha = hashlib.sha256(header)
    with open(path, "wb") as f:
        f.write(header)
        for spec in ordered:
            for chunk in tensor_chunks(spec, seed):
                buf = chunk.view(torch.uint8).numpy()
                f.write(buf)
                sha.update(buf)
                on_bytes(buf.nbytes)
                del chunk, buf
    return sha.hexdigest()


# --- config files ----------------------------------------------------------------------


def config_json(cfg: ModelConfig) -> dict[str, Any]:
    """config.json with the keys and layout transformers 5.24 writes for a Glm4vConfig."""
    t, v, tok = cfg.text, cfg.vision, cfg.tokens
    assert v is not None
    rope = {"partial_rotary_factor": t.partial_rotary_factor, "rope_theta": t.rope_theta, "rope_type": "default"}
    if t.mrope_section:
        rope = {"mrope_section": list(t.mrope_section), **rope}
    text_config = {
        "attention_dropout": 0.0,
        "eos_token_id": list(tok.eos_ids),
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "model_type": "glm4v_text",
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "pad_token_id": tok.pad_id,
        "rms_norm_eps": t.rms_eps,
        "rope_parameters": rope,
        "use_cache": True,
        "vocab_size": t.vocab_size,
    }
    vision_config = {
        "attention_bias": v.attention_bias,
        "attention_dropout": 0.0,
        "depth": v.depth,
        "hidden_act": "silu",
        "hidden_size": v.hidden_size,
        "image_size": v.pos_grid_size,
        "in_channels": v.in_channels,
        "initializer_range": 0.02,
        "intermediate_size": v.intermediate_size,
        "model_type": "glm4v_vision",
        "num_heads": v.num_heads,
        "out_hidden_size": v.out_hidden_size,
        "patch_size": v.patch_size,
        "rms_norm_eps": v.rms_eps,
        "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "axial"},
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
    }
    ids = {s: FIRST_SPECIAL_ID + i for i, s in enumerate(GLM_SPECIALS)}
    return {
        "architectures": ["Glm4vForConditionalGeneration"],
        "dtype": "bfloat16",
        "image_end_token_id": ids["<|end_of_image|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_token_id": ids["<|image|>"],
        "model_type": "glm4v",
        "text_config": text_config,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_VERSION,
        "video_end_token_id": ids["<|end_of_video|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_token_id": ids["<|video|>"],
        "vision_config": vision_config,
    }


def generation_config_json(cfg: ModelConfig) -> dict[str, Any]:
    """What GenerationConfig.from_model_config writes for that config."""
    return {
        "_from_model_config": True,
        "eos_token_id": list(cfg.tokens.eos_ids),
        "output_attentions": False,
        "output_hidden_states": False,
        "pad_token_id": cfg.tokens.pad_id,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }


def _check_token_ids(cfg: ModelConfig) -> None:
    """The preset's ids must be the ones the written tokenizer gives those tokens."""
    ids = {s: FIRST_SPECIAL_ID + i for i, s in enumerate(GLM_SPECIALS)}
    tok = cfg.tokens
    want = {
        "image_token_id": (tok.image_token_id, ids["<|image|>"]),
        "image_start_id": (tok.image_start_id, ids["<|begin_of_image|>"]),
        "image_end_id": (tok.image_end_id, ids["<|end_of_image|>"]),
        "pad_id": (tok.pad_id, ids["<|endoftext|>"]),
    }
    wrong = [f"{k}={have} (GLM: {real})" for k, (have, real) in want.items() if have != real]
    wrong += [f"eos id {i} is not a GLM special token" for i in tok.eos_ids if i not in ids.values()]
    if wrong:
        raise ConfigError(f"'{cfg.name}' token ids differ from GLM-4.1V's: {', '.join(wrong)}")


# --- tokenizer -------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization produces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _merge_candidates() -> Iterator[tuple[str, str]]:
    """(left, right) byte strings in rank order; every left is an earlier token, so the BPE is valid.

    All printable ASCII pairs, 3-digit numbers, then word-like pieces
    ([ a-zA-Z][a-z]+, with and without a leading space) of growing length.
    """
    printable = [chr(c) for c in range(0x20, 0x7F)]
    lower = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    first = [" "] + lower + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    digits = [str(d) for d in range(10)]
    for a in printable:
        for b in printable:
            yield a, b
    for a in digits:
        for b in digits:
            for c in digits:
                yield a + b, c
    prefixes = [a + b for a in first for b in lower]
    while True:
        longer = []
        for p in prefixes:
            for c in lower:
                yield p, c
                longer.append(p + c)
        prefixes = longer


def tokenizer_json(bpe_size: int = FIRST_SPECIAL_ID) -> dict[str, Any]:
    """A byte-level BPE with ``bpe_size`` regular ids, then GLM's specials; built, not trained (deterministic, fast)."""
    enc = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[enc[b]] = b
    merges: list[list[str]] = []
    for left, right in _merge_candidates():
        if len(vocab) >= bpe_size:
            break
        lt = "".join(enc[x] for x in left.encode())
        rt = "".join(enc[x] for x in right.encode())
        if lt + rt in vocab:
            continue
        vocab[lt + rt] = len(vocab)
        merges.append([lt, rt])
    added = [
        {"id": bpe_size + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, s in enumerate(GLM_SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GLM_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config_json() -> dict[str, Any]:
    """tokenizer_config.json as GLM-4.1V ships it, with this project's GLM-4.1V chat template."""
    decoder = {
        str(FIRST_SPECIAL_ID + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}
        for i, s in enumerate(GLM_SPECIALS)
    }
    return {
        "added_tokens_decoder": decoder,
        "chat_template": GLM4V_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "extra_special_tokens": list(GLM_SPECIALS),
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --- the whole directory ---------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _claim_output(out: Path) -> None:
    """An existing non-empty --out is only replaced when an earlier make-checkpoint wrote it."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"--out {out}: not empty and not written by make-checkpoint; refusing to overwrite it")


def write_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    max_shard_size: str | int = DEFAULT_SHARD,
    progress: Progress | None = None,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``cfg`` as a transformers Glm4v checkpoint directory; returns the summary also saved as make_checkpoint.json."""
    out = Path(out)
    check_writable(cfg)
    _check_token_ids(cfg)
    _claim_output(out)
    specs = tensor_specs(cfg)
    shards = split_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        done, shown = [0], [-1]
        mib = max(1, -(-total >> 20))

        def advance(n: int) -> None:
            done[0] += n
            now = mib if done[0] >= total else done[0] >> 20
            if progress is not None and now != shown[0]:
                shown[0] = now
                progress("writing weights (MiB)", now, mib)

        files: dict[str, dict[str, Any]] = {}
        for name, shard in zip(names, shards):
            sha = write_shard(tmp / name, shard, seed, advance)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha}
        if len(names) > 1:
            _write_json(
                tmp / "model.safetensors.index.json",
                {
                    "metadata": {"total_parameters": sum(s.numel for s in specs), "total_size": total},
                    "weight_map": dict(sorted((s.name, n) for n, shard in zip(names, shards) for s in shard)),
                },
            )
        _write_json(tmp / "config.json", config_json(cfg))
        _write_json(tmp / "generation_config.json", generation_config_json(cfg))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False), encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config_json())
        summary = {
            "written_by": "autoglm-export make-checkpoint",
            "recipe": {**(recipe or {}), "seed": seed, "max_shard_size": max_shard_size},
            "model": cfg.name,
            "parameters": sum(s.numel for s in specs),
            "bytes": total,
            "files": files,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        _write_json(tmp / MARKER, summary)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an earlier make-checkpoint output is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_checkpoint(
    out: str | Path,
    preset: str = "autoglm-phone-9b",
    layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
    max_shard_size: str | int = DEFAULT_SHARD,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The cli's make-checkpoint: a preset, optionally cut to ``layers`` decoder / ``vision_layers`` vision blocks."""
    cfg = get_preset(preset)
    if layers is not None or vision_layers is not None:
        cfg = cfg.with_layers(layers if layers is not None else cfg.text.num_layers, vision_layers)
    recipe = {"preset": preset, "layers": layers, "vision_layers": vision_layers}
    return write_checkpoint(out, cfg, seed, max_shard_size, progress, recipe)
