"""Model configuration: frozen dataclasses, validated once, and the named presets.

``PRESETS`` is plain data (gpt-fast style): ``tiny`` turns every modality on
with small widths so every path runs in seconds; ``autoglm-phone-9b`` has the
real GLM-4.1V-9B dimensions with the speech branch and gated fusion off (the
published checkpoint has neither).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError
from exporter.model.templates import GLM4V_CHAT_TEMPLATE, GLM_CHAT_TEMPLATE


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    # sum(mrope_section) == rotary_dim // 2; empty tuple = plain 1-D rope
    mrope_section: tuple[int, ...] = (8, 12, 12)
    # Family switches (GLM-4 defaults; a Llama-style block flips all four).
    attention_bias: bool = True  # q/k/v carry a bias, o never does
    sandwich_norms: bool = True  # post_self_attn + post_mlp RMSNorms
    rope_interleaved: bool = True  # GLM rotates (0,1),(2,3)..; Llama rotates halves
    tie_embeddings: bool = False
    head_dim_override: int = 0  # 0: hidden_size // num_heads (as transformers' Glm4v)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    depth: int
    num_heads: int
    out_hidden_size: int  # = text hidden size; also the block MLP width (as in Glm4v)
    intermediate_size: int  # merger context width
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    pos_grid_size: int = 336  # the learned position grid covers pos_grid_size/patch_size per side
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class AudioConfig:
    n_mels: int = 80
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1536
    max_frames: int = 3000  # learned positions cover max_frames // 2 conv steps
    pool: int = 4  # projector average-pools this many encoder steps per audio token


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids read from the checkpoint's config (never hard-coded in code paths)."""

    eos_ids: tuple[int, ...]
    bos_ids: tuple[int, ...] = ()  # prefix tokens, e.g. [gMASK]<sop>
    pad_id: int = 0
    image_token_id: int = -1
    image_start_id: int = -1
    image_end_id: int = -1
    video_token_id: int = -1
    audio_token_id: int = -1
    audio_start_id: int = -1
    audio_end_id: int = -1


@dataclass(frozen=True)
class ExportShape:
    """Static shapes fixed per artifact."""

    max_seq_len: int = 512
    image_size: int = 336  # one fixed square size per artifact, a multiple of patch*merge
    audio_frames: int = 3000  # log-mel frames per audio input (10 ms hop)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    text: TextConfig
    tokens: SpecialTokens
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    fusion: bool = False  # the seed article's gated 3-way fusion
    shape: ExportShape = field(default_factory=ExportShape)
    seed: int = 0  # for deterministic random weights (presets without a checkpoint)
    tokenizer: str = ""  # path of tokenizer.json ("" = none known yet)
    chat_template: str = ""  # jinja, rendered as transformers does ("" = the plain GLM layout)

    def __post_init__(self) -> None:
        validate(self)

    # --- derived static sizes -------------------------------------------------
    @property
    def image_grid(self) -> int:
        """Patches per side at the export image size."""
        assert self.vision is not None
        return self.shape.image_size // self.vision.patch_size

    @property
    def image_tokens(self) -> int:
        """Merged vision tokens per image at the export size."""
        if self.vision is None:
            return 0
        return (self.image_grid // self.vision.spatial_merge_size) ** 2

    @property
    def audio_tokens(self) -> int:
        if self.audio is None:
            return 0
        return ((self.shape.audio_frames + 1) // 2) // self.audio.pool

    # --- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        try:
            return cls(
                name=d["name"],
                text=TextConfig(**_tuples(d["text"])),
                tokens=SpecialTokens(**_tuples(d["tokens"])),
                vision=VisionConfig(**_tuples(d["vision"])) if d.get("vision") else None,
                audio=AudioConfig(**d["audio"]) if d.get("audio") else None,
                fusion=bool(d.get("fusion", False)),
                shape=ExportShape(**d.get("shape", {})),
                seed=int(d.get("seed", 0)),
                tokenizer=str(d.get("tokenizer", "")),
                chat_template=str(d.get("chat_template", "")),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"model config is not representable: {e}") from e

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_layers(self, num_layers: int, vision_layers: int | None = None) -> "ModelConfig":
        """The same model cut to ``num_layers`` decoder layers (and optionally vision blocks), widths kept."""
        if num_layers < 1 or (vision_layers is not None and vision_layers < 1):
            raise ConfigError(f"--layers must be >= 1, got {num_layers}" + (f"/{vision_layers}" if vision_layers is not None else ""))
        if num_layers > self.text.num_layers or (
            vision_layers is not None and self.vision is not None and vision_layers > self.vision.depth
        ):
            raise ConfigError(
                f"--layers {num_layers} is more than the {self.text.num_layers} decoder layers of '{self.name}'; "
                "--layers cuts a model, it cannot grow one"
            )
        vision = self.vision
        if vision is not None and vision_layers is not None:
            vision = dataclasses.replace(vision, depth=vision_layers)
        return self.replace(
            name=f"{self.name}-{num_layers}l",
            text=dataclasses.replace(self.text, num_layers=num_layers),
            vision=vision,
        )


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def validate(cfg: ModelConfig) -> None:
    """Reject a config the reference model cannot represent, naming the field."""
    t = cfg.text
    positive = {"text.vocab_size": t.vocab_size, "text.hidden_size": t.hidden_size, "text.num_layers": t.num_layers,
                "text.num_heads": t.num_heads, "text.num_kv_heads": t.num_kv_heads,
                "text.intermediate_size": t.intermediate_size}
    if cfg.vision is not None:
        positive.update({"vision.hidden_size": cfg.vision.hidden_size, "vision.depth": cfg.vision.depth,
                         "vision.num_heads": cfg.vision.num_heads, "vision.patch_size": cfg.vision.patch_size,
                         "vision.spatial_merge_size": cfg.vision.spatial_merge_size})
    if cfg.audio is not None:
        positive.update({"audio.num_heads": cfg.audio.num_heads, "audio.num_layers": cfg.audio.num_layers,
                         "audio.pool": cfg.audio.pool})
    bad = [f"{k} = {v}" for k, v in positive.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"config '{cfg.name}' cannot be represented: must be positive integers: {', '.join(bad)}")
    problems: list[str] = []
    if t.num_heads % t.num_kv_heads:
        problems.append(f"text.num_heads ({t.num_heads}) is not a multiple of num_kv_heads ({t.num_kv_heads})")
    if not t.head_dim_override and t.hidden_size % t.num_heads:
        problems.append(f"text.hidden_size ({t.hidden_size}) is not divisible by num_heads ({t.num_heads})")
    if t.rotary_dim % 2 or t.rotary_dim > t.head_dim:
        problems.append(f"rotary dim {t.rotary_dim} must be even and <= head_dim {t.head_dim}")
    if t.mrope_section and sum(t.mrope_section) * 2 != t.rotary_dim:
        problems.append(
            f"text.mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)}, "
            f"expected rotary_dim/2 = {t.rotary_dim // 2}"
        )
    v = cfg.vision
    if v is not None:
        unit = v.patch_size * v.spatial_merge_size
        if cfg.shape.image_size % unit:
            problems.append(f"image size {cfg.shape.image_size} is not a multiple of {unit} (patch x merge)")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision.out_hidden_size {v.out_hidden_size} != text.hidden_size {t.hidden_size}")
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            problems.append(f"vision head dim {v.hidden_size}/{v.num_heads} must be a multiple of 4")
        if cfg.tokens.image_token_id < 0:
            problems.append("vision is on but image_token_id is not set")
    a = cfg.audio
    if a is not None:
        if cfg.shape.audio_frames > a.max_frames:
            problems.append(f"audio frames {cfg.shape.audio_frames} exceed audio.max_frames {a.max_frames}")
        if cfg.audio_tokens < 1:
            problems.append("audio frames too few for one audio token")
        if a.hidden_size % a.num_heads:
            problems.append(f"audio.hidden_size {a.hidden_size} not divisible by heads {a.num_heads}")
        if cfg.tokens.audio_token_id < 0:
            problems.append("audio is on but audio_token_id is not set")
    if cfg.fusion and (v is None or a is None):
        problems.append("gated fusion needs both the vision and the audio branch")
    ids = [i for i in (cfg.tokens.image_token_id, cfg.tokens.audio_token_id, *cfg.tokens.eos_ids) if i >= 0]
    if any(i >= t.vocab_size for i in ids):
        problems.append(f"a special token id is >= vocab size {t.vocab_size}")
    if not cfg.tokens.eos_ids:
        problems.append("no eos id")
    if cfg.shape.max_seq_len < 16:
        problems.append(f"max_seq_len {cfg.shape.max_seq_len} is too small")
    if problems:
        raise ConfigError(f"config '{cfg.name}' cannot be represented: " + "; ".join(problems))


# Token ids of the tiny preset's own tokenizer (exporter/model/tiny_tokenizer.json):
# the special tokens are added first, in this order, so they own ids 0..12.
TINY_SPECIALS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|audio|>",
    "<|observation|>",
)
_T = {s: i for i, s in enumerate(TINY_SPECIALS)}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        text=TextConfig(
            vocab_size=2048,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
            mrope_section=(2, 3, 3),
        ),
        vision=VisionConfig(
            hidden_size=64,
            depth=2,
            num_heads=4,
            out_hidden_size=128,
            intermediate_size=192,
            pos_grid_size=84,  # a 6x6 learned grid, resampled to the 8x8 patch grid
        ),
        audio=AudioConfig(n_mels=80, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_frames=400),
        fusion=True,
        tokens=SpecialTokens(
            eos_ids=(_T["<|endoftext|>"], _T["<|user|>"], _T["<|observation|>"]),
            bos_ids=(_T["[gMASK]"], _T["<sop>"]),
            pad_id=_T["<|endoftext|>"],
            image_token_id=_T["<|image|>"],
            image_start_id=_T["<|begin_of_image|>"],
            image_end_id=_T["<|end_of_image|>"],
            audio_token_id=_T["<|audio|>"],
            audio_start_id=_T["<|begin_of_audio|>"],
            audio_end_id=_T["<|end_of_audio|>"],
        ),
        shape=ExportShape(max_seq_len=256, image_size=112, audio_frames=200),
        seed=1234,
        tokenizer="builtin:tiny",
        chat_template=GLM_CHAT_TEMPLATE,
    ),
    "autoglm-phone-9b": ModelConfig(
        name="autoglm-phone-9b",
        text=TextConfig(
            vocab_size=151552,
            hidden_size=4096,
            num_layers=40,
            num_heads=32,
            num_kv_heads=2,
            intermediate_size=13696,
            mrope_section=(8, 12, 12),
        ),
        vision=VisionConfig(
            hidden_size=1536,
            depth=24,
            num_heads=12,
            out_hidden_size=4096,
            intermediate_size=13696,
        ),
        audio=None,
        fusion=False,
        tokens=SpecialTokens(
            eos_ids=(151329, 151336, 151338),
            bos_ids=(151331, 151333),
            pad_id=151329,
            image_token_id=151343,
            image_start_id=151339,
            image_end_id=151340,
            video_token_id=151344,
        ),
        shape=ExportShape(max_seq_len=2048, image_size=336, audio_frames=3000),
        seed=0,
        chat_template=GLM4V_CHAT_TEMPLATE,
    ),
}


def get_preset(name: str, num_layers: int | None = None) -> ModelConfig:
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}") from None
    return cfg.with_layers(num_layers) if num_layers is not None else cfg
