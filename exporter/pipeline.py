"""The functions cli.py calls: each is one step of the data flow in docs/ARCHITECTURE.md.

cli.py never touches torch; everything model-side happens here or below.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.errors import ArtifactError, BadInputError, ConfigError
from exporter.model.config import ModelConfig, get_preset

Progress = Callable[[str, int, int], None]


# --- the reference model ------------------------------------------------------------


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


def _checkpoint_kind(checkpoint: str | Path) -> tuple[str, Path]:
    """("glm4v" | "hf-text" | "gguf", path): a Glm4v directory, a Llama/Qwen2 directory, or a .gguf file."""
    from core.errors import CheckpointError
    from exporter.hf_text import FAMILIES, model_type

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
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
        return {"checkpoint": str(Path(checkpoint).resolve())}
    return {"preset": preset or "tiny", "layers": layers}


def reference_from_source(source: dict[str, Any]):
    return load_reference(preset=source.get("preset"), checkpoint=source.get("checkpoint"), layers=source.get("layers"))


# --- info -----------------------------------------------------------------------------


def info(preset: str | None = "tiny", checkpoint: str | Path | None = None, layers: int | None = None) -> dict[str, Any]:
    """Parameter count and size per component at fp32/fp16/int8, computed on the meta device."""
    import torch

    from exporter.model import build

    cfg = resolve_config(preset, checkpoint, layers)
    model = build(cfg, device="meta")

    def count(module: torch.nn.Module | None) -> int:
        if module is None:
            return 0
        return sum(p.numel() for p in module.parameters())

    t = model.text
    tied = cfg.text.tie_embeddings
    parts = {
        "token_embedding": count(t.embed_tokens),
        "vision_encoder": count(model.visual),
        "audio_encoder": count(model.audio),
        "gated_fusion": count(model.fusion),
        "text_decoder": count(t.layers) + count(t.norm) + (0 if tied else t.lm_head.weight.numel()),
    }
    rows = {
        name: {"params": n, "fp32_bytes": 4 * n, "fp16_bytes": 2 * n, "int8_bytes": n}
        for name, n in parts.items()
        if n or name in ("token_embedding", "text_decoder")
    }
    total = sum(parts.values())
    return {
        "model": cfg.name,
        "components": rows,
        "total": {"params": total, "fp32_bytes": 4 * total, "fp16_bytes": 2 * total, "int8_bytes": total},
        "config": {
            "layers": cfg.text.num_layers,
            "hidden": cfg.text.hidden_size,
            "vocab": cfg.text.vocab_size,
            "image_size": cfg.shape.image_size if cfg.vision else None,
            "image_tokens": cfg.image_tokens,
            "audio_tokens": cfg.audio_tokens,
            "max_seq_len": cfg.shape.max_seq_len,
            "fusion": cfg.fusion,
        },
    }


# --- generate -------------------------------------------------------------------------


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """Generation options in range, before any model is loaded."""
    import math

    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise BadInputError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy)")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise BadInputError(f"--top-p {top_p}: must be in (0, 1]")
    if seed < 0:
        raise BadInputError(f"--seed {seed}: must be >= 0")


@dataclass
class Loaded:
    """A session with what the runner needs beside it."""

    session: Any
    config: ModelConfig
    tokenizer: Any
    label: str


def open_reference(preset: str | None = "tiny", checkpoint: str | Path | None = None, layers: int | None = None) -> Loaded:
    from core.components import build_components
    from core.runner import EagerSession, load_tokenizer

    model = load_reference(preset, checkpoint, layers)
    comps = build_components(model)
    return Loaded(EagerSession(comps), model.config, load_tokenizer(model.config), f"reference {model.config.name}")


def open_artifact(path: str | Path) -> Loaded:
    from core.preprocess import load_tokenizer as load_tok
    from targets import get_target
    from core.artifact import read_artifact, verify_artifact

    path = Path(path)
    art = read_artifact(path)
    verify_artifact(art)
    try:
        config = ModelConfig.from_dict(art.metadata["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ArtifactError(f"{art.dir / 'artifact.json'}: metadata.model is not a model config: {e}") from None
    target = get_target(art.target)
    if path.is_file() and path.suffix == ".ort":  # an ORT-format file picks the .ort models of the artifact
        session = target.load(art, model_format="ort")
    else:
        session = target.load(art)
    return Loaded(session, config, load_tok(art.dir / "tokenizer.json"), f"{art.target}/{art.recipe} ({session.provenance})")


def generate(
    text: str,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    preset: str | None = "tiny",
    checkpoint: str | Path | None = None,
    layers: int | None = None,
    artifact: str | Path | None = None,
    thinking: bool | None = None,
):
    from core.chat import has_thinking_switch
    from core.runner import Prompt, Runner

    check_sampling(max_new_tokens, temperature, top_p, seed)
    for kind, p in (("image", image), ("audio", audio)):
        if p is not None and not Path(p).exists():
            raise BadInputError(f"--{kind} {p}: file not found")
        if p is not None and not Path(p).is_file():
            raise BadInputError(f"--{kind} {p}: is a directory, not a file")
    loaded = open_artifact(artifact) if artifact else open_reference(preset, checkpoint, layers)
    runner = Runner(loaded.session, loaded.config, loaded.tokenizer)
    if thinking is not None and not has_thinking_switch(runner.template):
        raise BadInputError(f"--thinking/--no-thinking: the chat template of '{loaded.config.name}' has no thinking switch")
    t0 = time.perf_counter()
    result = runner.generate(
        Prompt(text=text, image=image, audio=audio, thinking=thinking),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    result.timings["total_s"] = time.perf_counter() - t0
    return loaded.label, result


# --- export ---------------------------------------------------------------------------


def export(
    target: str,
    recipe: str,
    out: str | Path,
    preset: str | None = "tiny",
    checkpoint: str | Path | None = None,
    layers: int | None = None,
    calibration: str | Path | None = None,
    keep_float: tuple[str, ...] = (),
    group_size: int | None = None,
    progress: Progress | None = None,
    parity_target: str | None = None,
    prune_heads: float | None = None,
    skip_layers: int | None = None,
):
    """Export one target x recipe into ``out`` (atomic). Returns the Artifact.

    ``prune_heads`` / ``skip_layers`` shrink the model first (exporter/compress.py), by the head importance and
    block influence of ``calibration`` (a calibrate --head-importance dir) or of the built-in calibration set.

    ``parity_target`` (e.g. "cos=0.999") keeps the most INT8-sensitive layers in float,
    the smallest such set found greedily by calibration.sensitivity.
    """
    from core.components import build_components
    from exporter.model.upcast import float32_weights
    from targets import get_target
    from core.artifact import check_output_dir, no_progress
    from core.recipes import Recipe
    from targets.base import check_recipe

    progress = progress or no_progress
    tgt = get_target(target)  # unknown target -> exit 2 before any model work
    grouped = recipe in GROUPED_RECIPES
    if group_size is not None and not grouped:
        raise BadInputError(f"--group-size applies to {', '.join(GROUPED_RECIPES)}, not '{recipe}'")
    if group_size is not None and group_size != 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise BadInputError(f"--group-size {group_size}: must be a power of two >= 16 (e.g. 32, 64, 128), or 0 for per channel")
    rec = Recipe(recipe, keep_float=tuple(keep_float), group_size=32 if group_size is None else group_size)
    check_recipe(target, rec, tgt.recipes)
    if keep_float and not rec.is_quantized:
        raise BadInputError(f"--keep-float applies to quantized recipes; '{recipe}' keeps everything in float already")
    out = Path(out)
    check_output_dir(out)  # the user's data is never replaced; refused before any model work
    if calibration is not None and not Path(calibration).exists():
        raise BadInputError(f"--calibration {calibration}: not found")
    if calibration is not None and not (rec.needs_calibration or parity_target or prune_heads or skip_layers):
        raise BadInputError(f"--calibration applies to int8-static, --parity-target, --prune-heads and --skip-layers, not '{recipe}' alone")
    target_cos = None
    if parity_target:
        from calibration.sensitivity import parse_parity_target

        target_cos = parse_parity_target(parity_target)
        if not rec.is_quantized or recipe == "int4-weight":
            # the keep-float search simulates int8 schemes only (calibration/sensitivity.scheme_for)
            raise BadInputError(f"--parity-target applies to int8 recipes, not '{recipe}'")
    if calibration is not None and Path(calibration).is_file():
        from calibration.manifest import read_manifest

        read_manifest(Path(calibration))  # every bad line, before the model is loaded
    if prune_heads is not None or skip_layers is not None:
        from exporter.compress import check_settings

        check_settings(resolve_config(preset, checkpoint, layers), prune_heads, skip_layers)
    model = load_reference(preset, checkpoint, layers)
    float32_weights(model)  # a large bf16 checkpoint is kept mapped for eager use; exporters trace fp32 modules
    compression: dict[str, Any] = {}
    if prune_heads or skip_layers:
        model, compression = _compress(model, calibration, prune_heads, skip_layers, progress)
    check_keep_float(model, rec.keep_float)
    if grouped:
        check_group_size(model, rec.group_size)
    comps = build_components(model)
    calib = None
    if rec.needs_calibration or target_cos is not None:
        calib = calibration_data(comps, calibration, progress)
    if target_cos is not None:
        from calibration.sensitivity import cached_layer_sensitivity, choose_keep_float, scheme_for

        scheme = scheme_for(target, recipe)
        ranking = cached_layer_sensitivity(comps, calib, progress=progress, scheme=scheme)
        keep = choose_keep_float(comps, calib, ranking, target_cos, progress=progress, scheme=scheme)
        rec = Recipe(recipe, keep_float=tuple(dict.fromkeys(tuple(keep_float) + tuple(keep))), group_size=rec.group_size)
    artifact = tgt.export(comps, rec, out, calibration=calib, progress=progress)
    _record_source(artifact, source_of(preset, checkpoint, layers), compression)
    return artifact


def _compress(model, calibration, prune_heads, skip_layers, progress):
    from calibration import importance
    from exporter import compress
    from core.components import build_components
    from core.runner import load_tokenizer

    t = model.config.text
    scores = None
    if calibration is not None and Path(calibration).is_dir():
        scores = importance.load(Path(calibration), t.num_layers, t.num_heads)
    if scores is None:
        comps = build_components(model)
        scores = importance.measure(comps, importance.builtin_prompts(), load_tokenizer(model.config), progress=progress)
    model, record = compress.apply(model, scores, prune_heads, skip_layers)
    return model, {**record, "scores": scores}


# recipes whose weights are quantized in groups along the input dimension (--group-size)
GROUPED_RECIPES = ("8da4w", "int4-weight")


def check_keep_float(model, names: tuple[str, ...]) -> None:
    """Every --keep-float name is a module of the model holding at least one linear or conv."""
    from torch import nn

    modules = dict(model.named_modules())
    for name in names:
        mod = modules.get(name)
        if mod is None:
            near = sorted(n for n in modules if n and name.split(".")[-1] in n)[:3]
            hint = f"; e.g. {', '.join(near)}" if near else "; names are as in `model.named_modules()`, e.g. text.layers.0.mlp.down_proj"
            raise BadInputError(f"--keep-float '{name}': no such module in '{model.config.name}'{hint}")
        if not any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in mod.modules()):
            raise BadInputError(f"--keep-float '{name}': holds no linear or conv layer, so nothing would be kept")


def check_group_size(model, group_size: int) -> None:
    """Groups must tile every decoder linear's input, or those layers would silently stay float."""
    from torch import nn

    if group_size == 0:
        return
    for name, mod in model.text.named_modules():
        if isinstance(mod, nn.Linear) and mod.in_features % group_size:
            raise BadInputError(
                f"--group-size {group_size}: does not divide text.{name}'s {mod.in_features} inputs; "
                "pick a divisor of the hidden and intermediate sizes"
            )


def _record_source(artifact, source: dict[str, Any], compression: dict[str, Any] | None = None) -> None:
    """Add where the weights came from (parity rebuilds the reference from it) and what compression removed."""
    import json

    from core.artifact import ARTIFACT_JSON

    path = artifact.dir / ARTIFACT_JSON
    info = json.loads(path.read_text())
    info.setdefault("metadata", {})["source"] = source
    if compression:
        info["metadata"]["compression"] = compression
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    artifact.info = info


def calibration_data(components, calibration: str | Path | None, progress: Progress | None = None):
    """CalibrationData for int8-static: a calibrate --out DIR, a manifest .jsonl, or the built-in set."""
    from core.runner import load_tokenizer

    from calibration import stats

    tokenizer = load_tokenizer(components.config)
    path = Path(calibration) if calibration else None
    if path is not None and not path.exists():
        raise BadInputError(f"--calibration {path}: not found")
    if path is not None and path.is_dir():
        data = stats.load_calibration(path)
        stats.check_compatible(data, components, path)
        return data
    return stats.calibrate(components, path, tokenizer, progress=progress)


# --- calibrate, parity, build, bench ----------------------------------------------------------


def _module(name: str):
    """Import a pipeline stage; a missing stage is reported, never faked."""
    import importlib

    from core.errors import TargetNotAvailableError

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise TargetNotAvailableError(f"'{name}' is not available in this build") from None
        raise


def calibrate(
    out: str | Path,
    manifest: str | Path | None = None,
    sensitivity: bool = False,
    preset: str | None = "tiny",
    checkpoint: str | Path | None = None,
    layers: int | None = None,
    progress: Progress | None = None,
    sensitivity_recipe: str = "int8-static",
    sensitivity_target: str | None = None,
    head_importance: bool = False,
) -> list[str]:
    from core.components import build_components
    from core.runner import load_tokenizer
    from targets import TARGETS
    from core.artifact import check_output_dir

    if sensitivity_recipe not in ("int8-static", "int8-weight"):
        raise BadInputError(f"--sensitivity-recipe '{sensitivity_recipe}': expected int8-static or int8-weight")
    if sensitivity_target is not None and sensitivity_target not in TARGETS:
        raise BadInputError(f"--sensitivity-target '{sensitivity_target}': expected one of {', '.join(TARGETS)}")

    stats = _module("calibration.stats")
    manifest_mod = _module("calibration.manifest")
    check_output_dir(Path(out), marker="calibration.json", what="a calibration result")
    if manifest is not None:
        manifest_mod.read_manifest(Path(manifest))  # every bad line reported before any model work
    model = load_reference(preset, checkpoint, layers)
    comps = build_components(model)
    data = stats.calibrate(comps, Path(manifest) if manifest else None, load_tokenizer(model.config), progress=progress)
    lines = stats.save_calibration(data, Path(out))
    if head_importance:
        from calibration import importance

        prompts = [x.to_prompt() for x in manifest_mod.read_manifest(Path(manifest))] if manifest else importance.builtin_prompts()
        lines += importance.save(importance.measure(comps, prompts, load_tokenizer(model.config), progress=progress), Path(out))
    if sensitivity:
        sens = _module("calibration.sensitivity")
        scheme = sens.scheme_for(sensitivity_target, sensitivity_recipe)
        ranking = sens.cached_layer_sensitivity(comps, data, progress=progress, scheme=scheme)
        lines += sens.write_sensitivity_report(ranking, Path(out), scheme=scheme)
    return lines


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise BadInputError(f"--threshold '{item}': expected NAME=NUMBER, e.g. text_decoder.cosine=0.99") from None
    return out


def parity(
    artifact_dir: str | Path,
    inputs: str | Path | None = None,
    out: str | Path | None = None,
    steps: int = 32,
    thresholds: list[str] | None = None,
    progress: Progress | None = None,
) -> tuple[list[str], dict]:
    """Run parity; returns (summary lines, report). Call check_parity(report) after showing the lines."""
    par = _module("exporter.parity")
    report = par.run_parity(
        Path(artifact_dir),
        inputs=Path(inputs) if inputs else None,
        out_dir=Path(out) if out else None,
        thresholds=_parse_thresholds(thresholds or []) or None,
        steps=steps,
        progress=progress,
    )
    return par.summary_lines(report), report


def check_parity(report: dict) -> None:
    """Raise ParityFailure naming the failed method(s) and metric(s)."""
    _module("exporter.parity").check(report)


def build(config: str | Path | None, out: str | Path, progress: Progress | None = None) -> Path:
    if config is not None and not Path(config).is_file():
        kind = "is a directory; give the .toml file" if Path(config).is_dir() else "file not found"
        raise BadInputError(f"build config {config}: {kind}")
    return _module("exporter.build").build(Path(config) if config else None, Path(out), progress=progress)


def bench(artifact_dir: str | Path, json_out: str | Path | None = None, progress: Progress | None = None) -> str:
    if json_out is not None and Path(json_out).is_dir():
        raise BadInputError(f"--json {json_out}: is a directory; give a file name")
    if json_out is not None and not Path(json_out).absolute().parent.is_dir():
        raise BadInputError(f"--json {json_out}: its folder does not exist")
    b = _module("exporter.bench")
    result = b.run_bench(Path(artifact_dir), Path(json_out) if json_out else None, progress=progress)
    return b.format_table(result)
