"""The eager reference model, from a preset, a Glm4v checkpoint, a Llama/Qwen2 directory or a GGUF file.

The application's stages (export, parity, build, generate, info) all start here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError
from exporter.model.config import ModelConfig, get_preset


def resolve_config(preset: str | None = "tiny", checkpoint: str | Path | None = None, layers: int | None = None) -> ModelConfig:
    """The config of a preset or a checkpoint, without touching weights."""
    if checkpoint:
        kind, path = _checkpoint_kind(checkpoint)
        if kind == "gguf":
            from exporter.gguf import gguf_file_config

            cfg = gguf_file_config(path)
        elif kind == "hf-text":
            from exporter.hf_text import text_config

            cfg = text_config(path)
        else:
            from exporter.checkpoint import config_from_checkpoint

            cfg = config_from_checkpoint(path)
        return cfg.with_layers(layers) if layers is not None else cfg
    if preset == GGUF_PRESET:
        from exporter.gguf import gguf_file_config, smollm2_path

        cfg = gguf_file_config(smollm2_path())
        return cfg.with_layers(layers) if layers is not None else cfg
    return get_preset(preset or "tiny", layers)


# a preset whose weights are real, trained ones: SmolLM2-135M-Instruct's GGUF (text only, Llama switches)
GGUF_PRESET = "smollm2-135m"


def _checkpoint_path(checkpoint: str | Path) -> Path:
    """The one spelling of a checkpoint's path: the config's paths (tokenizer.json, ...) derive from it and
    source_of records it, and parity refuses a reference rebuilt from the record whose config differs (a
    checkpoint reached through a symlink once did)."""
    return Path(checkpoint).expanduser().resolve()


def _checkpoint_kind(checkpoint: str | Path) -> tuple[str, Path]:
    """("glm4v" | "hf-text" | "gguf", path): a Glm4v directory, a Llama/Qwen2 directory, or a .gguf file."""
    from core.errors import CheckpointError
    from exporter.hf_text import FAMILIES, model_type

    given = Path(checkpoint).expanduser()
    if not given.exists():  # (named as the user spelled it)
        raise CheckpointError(f"{given}: checkpoint directory not found")
    path = _checkpoint_path(given)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json, or a .gguf file)")
    return ("hf-text" if model_type(path) in FAMILIES else "glm4v"), path


def load_reference(preset: str | None = "tiny", checkpoint: str | Path | None = None, layers: int | None = None):
    """The eager reference model (MultimodalModel) from a preset or a local checkpoint (dir or .gguf)."""
    if checkpoint:
        if layers is not None:
            raise ConfigError("--layers applies to presets; a checkpoint is loaded whole")
        kind, path = _checkpoint_kind(checkpoint)
        if kind == "gguf":
            from exporter.gguf import load_gguf_llama

            return load_gguf_llama(path)
        if kind == "hf-text":
            from exporter.hf_text import load

            return load(path)
        from exporter.checkpoint import load_checkpoint

        return load_checkpoint(path)
    if preset == GGUF_PRESET:
        from exporter.gguf import load_gguf_llama, smollm2_path

        if layers is not None:
            raise ConfigError(f"--layers does not apply to the {GGUF_PRESET} preset (real weights are loaded whole)")
        return load_gguf_llama(smollm2_path())
    from exporter.model import build

    return build(get_preset(preset or "tiny", layers))


def source_of(preset: str | None, checkpoint: str | Path | None, layers: int | None) -> dict[str, Any]:
    """Where the weights came from, recorded in every artifact so parity can rebuild the reference."""
    if checkpoint:
        return {"checkpoint": str(_checkpoint_path(checkpoint))}
    return {"preset": preset or "tiny", "layers": layers}
