"""Load a transformers Glm4vForConditionalGeneration checkpoint onto the reference model.

A checkpoint directory holds ``config.json`` and one or more safetensors
shards (``model.safetensors`` or ``model.safetensors.index.json`` + shards),
optionally ``generation_config.json``, ``tokenizer.json`` and
``preprocessor_config.json``. Both key layouts are accepted: current
(``model.language_model.*``, ``model.visual.*``, ``lm_head.*``) and older
(``model.*`` for the text part).

Shards are memory-mapped and parsed here (8-byte header length, JSON header,
raw data); each tensor is a zero-copy view of the mapping, assigned straight
into a model built on the meta device, so the weights are never held twice.
Large bf16 checkpoints (a 9B) stay in bf16 and compute in fp32 one module at a
time (see :func:`load_checkpoint`); pages read by the NaN/inf check or by a
conversion are handed back to the kernel, so loading leaves RSS flat.
Truncated or corrupt shards, missing and unexpected keys, and configs the
model cannot represent each raise :class:`CheckpointError` naming the file or key.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from core.artifact import drop_mapped_pages
from core.chat import read_template, read_tokenizer_config, render, token_content
from core.errors import BadInputError, CheckpointError, ConfigError
from exporter.model.config import ExportShape, ModelConfig, SpecialTokens, TextConfig, VisionConfig
from exporter.model.multimodal import MultimodalModel, build, materialize_buffers
from exporter.model.templates import GLM_CHAT_TEMPLATE
from exporter.model.upcast import compute_in_float32

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# checkpoint key prefix -> reference model prefix (first match wins)
_KEY_RULES = [
    (re.compile(r"^model\.language_model\."), "text."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.audio\."), "audio."),
    (re.compile(r"^model\.fusion\."), "fusion."),
    (re.compile(r"^lm_head\."), "text.lm_head."),
    (re.compile(r"^model\."), "text."),  # older layout: text part directly under model.
]


def map_key(key: str) -> str:
    for pattern, repl in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


# --- config ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def _as_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


# config.json schema: (key, kind, lower bound, upper bound, required). Ranges are what a GLM-family
# model could sensibly have; beyond them a typo or a corrupt file is far more likely than a real model.
_TEXT_SCHEMA = (
    ("vocab_size", int, 1, 4_000_000, True),
    ("hidden_size", int, 1, 65_536, True),
    ("num_hidden_layers", int, 1, 1_000, True),
    ("num_attention_heads", int, 1, 1_024, True),
    ("num_key_value_heads", int, 1, 1_024, False),
    ("intermediate_size", int, 1, 1_048_576, True),
    ("max_position_embeddings", int, 1, 100_000_000, False),
    ("pad_token_id", int, 0, 4_000_000, False),
    ("rms_norm_eps", float, 1e-12, 0.1, False),
    ("rope_theta", float, 1.0, 1e12, False),
    ("partial_rotary_factor", float, 1e-3, 1.0, False),
)
_VISION_SCHEMA = (
    ("hidden_size", int, 1, 65_536, True),
    ("depth", int, 1, 1_000, True),
    ("num_heads", int, 1, 1_024, True),
    ("out_hidden_size", int, 1, 65_536, True),
    ("intermediate_size", int, 1, 1_048_576, True),
    ("patch_size", int, 1, 1_024, False),
    ("temporal_patch_size", int, 1, 64, False),
    ("in_channels", int, 1, 16, False),
    ("spatial_merge_size", int, 1, 64, False),
    ("image_size", int, 1, 16_384, False),
    ("rms_norm_eps", float, 1e-12, 0.1, False),
)
_TOKEN_KEYS = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id")


def _check_value(path: Path, where: str, value: Any, kind: type, lo: float, hi: float) -> None:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (kind is float and value != value):
        raise CheckpointError(f"{path}: {where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise CheckpointError(f"{path}: {where} = {value} is out of range [{lo:g}, {hi:g}]")


def _check_schema(path: Path, raw: Any) -> None:
    """Types and ranges of every config.json value the loader reads, each error naming its key."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(raw).__name__}")
    sections = [("text_config", _TEXT_SCHEMA, True), ("vision_config", _VISION_SCHEMA, False)]
    for name, schema, required in sections:
        sec = raw.get(name)
        if sec is None:
            if required:
                raise CheckpointError(f"{path}: missing key 'text_config' (is this a Glm4v checkpoint?)")
            continue
        if not isinstance(sec, dict):
            raise CheckpointError(f"{path}: {name} must be an object, got a {type(sec).__name__}")
        for key, kind, lo, hi, needed in schema:
            if sec.get(key) is None:
                if needed:
                    raise CheckpointError(f"{path}: missing key {name}.{key}")
                continue
            _check_value(path, f"{name}.{key}", sec[key], kind, lo, hi)
        for sub in ("rope_parameters", "rope_scaling"):
            if sec.get(sub) is not None and not isinstance(sec[sub], dict):
                raise CheckpointError(f"{path}: {name}.{sub} must be an object")
    for key in _TOKEN_KEYS:
        if raw.get(key) is not None:
            _check_value(path, key, raw[key], int, 0, 4_000_000)
    for where, value in (("eos_token_id", raw.get("eos_token_id")), ("text_config.eos_token_id", raw["text_config"].get("eos_token_id"))):
        for v in value if isinstance(value, list) else ([] if value is None else [value]):
            _check_value(path, where, v, int, 0, 4_000_000)


def config_from_checkpoint(ckpt: Path, shape: ExportShape | None = None) -> ModelConfig:
    """Translate a Glm4v ``config.json`` into a :class:`ModelConfig`, or say what cannot be represented."""
    path = ckpt / "config.json"
    raw = _read_json(path)
    _check_schema(path, raw)
    if raw.get("model_type") not in ("glm4v", None):
        raise CheckpointError(f"{path}: model_type '{raw.get('model_type')}' is not glm4v")
    try:
        tc = raw["text_config"]
        vc = raw.get("vision_config")
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    rope = dict(tc.get("rope_parameters") or {})
    rope.update({k: v for k, v in (tc.get("rope_scaling") or {}).items() if k == "mrope_section"})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in tc:
            rope.setdefault(key, tc[key])
    for sub, cfg in (("text_config", tc), ("vision_config", vc or {})):
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{path}: {sub}.hidden_act '{act}' is not supported (only silu)")
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise CheckpointError(f"{path}: text rope_type '{rope.get('rope_type')}' is not supported")
    gen = ckpt / "generation_config.json"
    gen_cfg = _read_json(gen) if gen.exists() else {}
    if not isinstance(gen_cfg, dict):
        raise CheckpointError(f"{gen}: expected a JSON object")
    for v in gen_cfg.get("eos_token_id") if isinstance(gen_cfg.get("eos_token_id"), list) else [gen_cfg.get("eos_token_id")]:
        if v is not None:
            _check_value(gen, "eos_token_id", v, int, 0, 4_000_000)
    tok = ckpt / "tokenizer.json"
    template = read_template(ckpt) or GLM_CHAT_TEMPLATE
    eos = _as_ids(tc.get("eos_token_id")) or _as_ids(raw.get("eos_token_id")) or _as_ids(gen_cfg.get("eos_token_id"))
    if not eos:
        eos = tokenizer_eos(ckpt, tok)
    if not eos:
        raise CheckpointError(
            f"{path}: no eos_token_id in config.json or generation_config.json, and no eos_token in "
            f"{ckpt / 'tokenizer_config.json'} that tokenizer.json knows"
        )
    pre = ckpt / "preprocessor_config.json"
    pre_cfg = _read_json(pre) if pre.exists() else {}
    if not isinstance(pre_cfg, dict):
        raise CheckpointError(f"{pre}: expected a JSON object")
    try:
        text = TextConfig(
            vocab_size=int(tc["vocab_size"]),
            hidden_size=int(tc["hidden_size"]),
            num_layers=int(tc["num_hidden_layers"]),
            num_heads=int(tc["num_attention_heads"]),
            num_kv_heads=int(tc.get("num_key_value_heads") or tc["num_attention_heads"]),
            intermediate_size=int(tc["intermediate_size"]),
            rms_eps=float(tc.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.5)),
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", (8, 12, 12))),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
        vision = None
        if vc:
            vision = VisionConfig(
                hidden_size=int(vc["hidden_size"]),
                depth=int(vc["depth"]),
                num_heads=int(vc["num_heads"]),
                out_hidden_size=int(vc["out_hidden_size"]),
                intermediate_size=int(vc["intermediate_size"]),
                patch_size=int(vc.get("patch_size", 14)),
                temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
                in_channels=int(vc.get("in_channels", 3)),
                spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                pos_grid_size=int(vc.get("image_size", 336)),
                rms_eps=float(vc.get("rms_norm_eps", 1e-5)),
                rope_theta=float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                attention_bias=bool(vc.get("attention_bias", False)),
                image_mean=tuple(pre_cfg.get("image_mean", VisionConfig.image_mean)),
                image_std=tuple(pre_cfg.get("image_std", VisionConfig.image_std)),
            )
        bos = tuple(
            i
            for i in (raw.get("gmask_token_id", tc.get("gmask_token_id")), raw.get("sop_token_id", tc.get("sop_token_id")))
            if i is not None
        ) or _template_prefix_ids(template, tok)
        tokens = SpecialTokens(
            eos_ids=eos,
            bos_ids=bos,
            pad_id=int(tc.get("pad_token_id") or eos[0]),
            image_token_id=int(raw.get("image_token_id", -1)),
            image_start_id=int(raw.get("image_start_token_id", -1)),
            image_end_id=int(raw.get("image_end_token_id", -1)),
            video_token_id=int(raw.get("video_token_id", -1)),
        )
        _check_tokenizer_fits(tok, text.vocab_size)
        if shape is None:
            size = vision.pos_grid_size if vision else 336
            shape = ExportShape(max_seq_len=min(int(tc.get("max_position_embeddings", 2048)), 2048), image_size=size)
        return ModelConfig(
            name=ckpt.resolve().name,
            text=text,
            tokens=tokens,
            vision=vision,
            shape=shape,
            tokenizer=str(tok) if tok.exists() else "",
            chat_template=template,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config value: {e}") from None


def _check_tokenizer_fits(tok: Path, vocab_size: int) -> None:
    """A tokenizer with ids beyond the embedding table would index past it on some prompt."""
    if not tok.is_file():
        return
    from core.preprocess import load_tokenizer

    n = load_tokenizer(tok).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise CheckpointError(
            f"{tok}: the tokenizer has {n} ids but config.json's text_config.vocab_size is {vocab_size}; "
            "they must belong to the same model"
        )


def tokenizer_eos(ckpt: Path, tok: Path) -> tuple[int, ...]:
    """tokenizer_config.json's eos_token, as an id of tokenizer.json (() when either is missing)."""
    name = token_content(read_tokenizer_config(ckpt).get("eos_token"))
    if not name or not tok.is_file():
        return ()
    from core.preprocess import load_tokenizer

    tid = load_tokenizer(tok).token_to_id(name)
    return () if tid is None else (int(tid),)


def _template_prefix_ids(template: str, tok: Path) -> tuple[int, ...]:
    """The special tokens every rendered prompt starts with (GLM: [gMASK]<sop>), the runtimes' bos ids."""
    if not tok.is_file():
        return ()
    from core.preprocess import load_tokenizer

    tokenizer = load_tokenizer(tok)
    try:
        prefix = render(template, [], add_generation_prompt=False)
    except BadInputError:
        return ()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    ids = []
    for piece in tokenizer.encode(prefix, add_special_tokens=False).tokens:
        if piece not in specials:
            break
        ids.append(tokenizer.token_to_id(piece))
    return tuple(ids)


# --- safetensors, memory-mapped -------------------------------------------------------------


def shard_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = [ckpt / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no *.safetensors weights found")
    return files


class _Pages:
    """The file pages under one tensor of a private (ACCESS_COPY) shard mapping.

    ``drop`` hands them back to the kernel (MADV_DONTNEED): a page read once stays in the
    process's RSS until then, so checking or converting a 20 GB checkpoint would otherwise
    leave all of it resident. Nothing writes to the mapping, so a dropped page is simply
    read from the file again when the tensor is next used.
    """

    def __init__(self, mm: mmap.mmap | None, offset: int, nbytes: int):
        self.mm, self.offset, self.nbytes = mm, offset, nbytes

    def drop(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the whole pages inside bytes [start, stop) of the tensor (page-aligned outward)."""
        stop = self.nbytes if stop is None else stop
        drop_mapped_pages(self.mm, self.offset + start, self.offset + stop)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a shard; tensors are copy-on-write views of an mmap."""
    for name, tensor, _ in _shard_tensors(path):
        yield name, tensor


def _shard_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, _Pages]]:
    """(name, tensor, its pages in the mapping) for every tensor of a shard, the header checked."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
    with fh:
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", fh.read(8))
        if hlen > size - 8 or hlen > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {hlen} for a {size}-byte file)")
        try:
            header = json.loads(fh.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        base = 8 + hlen
        try:
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (KeyError, TypeError, ValueError, IndexError):
            bad = next((k for k, v in header.items() if not isinstance(v, dict) or "data_offsets" not in v), "?")
            raise CheckpointError(f"{path}: tensor '{bad}' has a corrupt header entry") from None
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: header needs {base + end} bytes, file has {size}")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
        except (KeyError, TypeError):
            found = info.get("dtype") if isinstance(info, dict) else None
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {found!r}; supported: {', '.join(_DTYPES)}"
            ) from None
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a corrupt header entry") from None
        if start < 0 or stop < start or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor '{name}' has a corrupt header entry (offsets {start}..{stop}, shape {shape})")
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if stop - start != count * itemsize:
            raise CheckpointError(f"{path}: tensor '{name}' has {stop - start} bytes, expected {count * itemsize}")
        if count == 0:
            yield name, torch.empty(shape, dtype=dtype), _Pages(None, 0, 0)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
        yield name, t.view(shape), _Pages(mm, base + start, stop - start)


# dtype=None keeps bf16/fp16 weights as stored when an fp32 copy of the model would be larger than this
KEEP_STORED_ABOVE = 2 << 30
# the NaN/inf check reads a tensor this many bytes at a time, dropping each chunk's pages after it
_CHECK_CHUNK = 64 << 20
_HALF = (torch.bfloat16, torch.float16)


def _all_finite(tensor: torch.Tensor, pages: _Pages) -> bool:
    """No NaN or inf in ``tensor``, read in chunks whose pages are dropped again (RSS stays flat)."""
    flat = tensor.reshape(-1)  # a view: mapped tensors are contiguous
    size = flat.element_size()
    step = max(1, _CHECK_CHUNK // size)
    for i in range(0, flat.numel(), step):
        # min and max propagate NaN and hold any inf; one aminmax pass is ~15x faster than isfinite().all()
        lo, hi = torch.aminmax(flat[i : i + step])
        ok = bool(torch.isfinite(lo) & torch.isfinite(hi))
        pages.drop(i * size, min(i + step, flat.numel()) * size)
        if not ok:
            return False
    return True


def load_checkpoint(
    ckpt: str | Path, shape: ExportShape | None = None, dtype: torch.dtype | None = None
) -> MultimodalModel:
    """The reference model with a checkpoint's weights (eval mode); it computes in fp32 whatever ``dtype``.

    ``dtype`` is what the weights are held in. ``None`` (the default) converts them to fp32 unless an
    fp32 copy of the whole model would exceed :data:`KEEP_STORED_ABOVE` (2 GiB): then bf16/fp16
    tensors stay as stored, zero-copy views of the mapped shards, and the modules holding them
    upcast one module's weights per call (:func:`~exporter.model.upcast.compute_in_float32`), so a
    9B loads in its 20 GB of bf16 instead of 41 GB of fp32, with the numbers an fp32 copy gives.
    An explicit dtype converts every tensor to it (``torch.float32``: the fp32 copy, at any size).
    """
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory (expected a checkpoint directory with config.json)")
    config = config_from_checkpoint(ckpt, shape)
    model = build(config, device="meta")
    expected = {k: v for k, v in model.state_dict().items()}
    if config.text.tie_embeddings:
        expected.pop("text.lm_head.weight", None)
    keep_half = dtype is None and 4 * sum(t.numel() for t in expected.values()) > KEEP_STORED_ABOVE
    seen: set[str] = set()
    unexpected: list[str] = []
    mapped: dict[int, _Pages] = {}  # data_ptr of each weight kept as a view of the mapping -> its pages
    for shard in shard_files(ckpt):
        tensors = {}
        for key, tensor, pages in _shard_tensors(shard):
            name = map_key(key)
            if name not in expected:
                unexpected.append(f"{key} ({shard.name})")
                continue
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{shard}: tensor '{key}' has shape {tuple(tensor.shape)}, the config implies {want}"
                )
            if not tensor.is_floating_point():
                raise CheckpointError(f"{shard}: tensor '{key}' is {str(tensor.dtype).replace('torch.', '')}; weights must be floating point")
            if not _all_finite(tensor, pages):
                raise CheckpointError(f"{shard}: tensor '{key}' holds NaN or infinite values")
            target = tensor.dtype if keep_half and tensor.dtype in _HALF else (dtype or torch.float32)
            if tensor.dtype != target:
                tensor = tensor.to(target)
                pages.drop()  # the copy is what the model holds; the file's pages are not needed
            else:
                mapped[tensor.data_ptr()] = pages
            tensors[name] = tensor
            seen.add(name)
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ckpt}: unexpected keys: {', '.join(unexpected[:5])}{more}")
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{ckpt}: missing keys: {', '.join(missing[:5])}{more}")
    if config.text.tie_embeddings:
        model.text.lm_head.weight = model.text.embed_tokens.weight
    materialize_buffers(model)
    if compute_in_float32(model):  # bf16/fp16 weights were kept: the modules upcasting them per call
        _attach_pages(model, mapped)
    return model.eval()


def _attach_pages(model: torch.nn.Module, mapped: dict[int, _Pages]) -> None:
    """Give each upcasting module the mapped pages of its weights (``_mapped``): it drops them after each
    call (exporter/model/upcast.py), so an eager pass over a 9B keeps about one module's pages resident,
    not the 20 GB checkpoint. Tied weights (lm_head = embed_tokens) share one entry."""
    from exporter.model.upcast import UPCASTING

    for m in model.modules():
        if not isinstance(m, UPCASTING):
            continue
        own = {n: mapped[p.data_ptr()] for n, p in m.named_parameters(recurse=False) if p.data_ptr() in mapped}
        if own:
            m._mapped = own
