"""The functions cli.py calls: each is one step of the data flow in docs/ARCHITECTURE.md.

cli.py never touches torch; everything model-side happens here or below.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.errors import ArtifactError, BadInputError, ConfigError
from core.recipes import RecipeName
from exporter.model.config import ModelConfig
from exporter.reference import load_reference, resolve_config, source_of  # the reference model (parity, build load it too)

Progress = Callable[[str, int, int], None]


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
    # an ORT-format file picks the .ort models of the artifact
    session = target.open(art, "ort" if path.is_file() and path.suffix == ".ort" else None)
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
    smooth: float | None = None,
    gptq: bool | None = None,
    check_floor: float | None = None,
    activation_range: str | None = None,
):
    """Export one target x recipe into ``out`` (atomic). Returns the Artifact.

    ``prune_heads`` / ``skip_layers`` shrink the model first (exporter/compress.py), by the head importance and
    block influence of ``calibration`` (a calibrate --head-importance dir) or of the built-in calibration set.
    ``parity_target`` (e.g. "cos=0.999") keeps the most INT8-sensitive layers in float, the smallest such set
    found greedily by calibration.sensitivity. ``smooth`` (SmoothQuant alpha) folds per-channel activation
    scales into the weights first (calibration/smooth.py); ``gptq`` rounds the decoder's weights GPTQ-style
    onto the target's grid (calibration/gptq.py); None: the recipe's default on that target. ``activation_range``:
    how a static recipe sets its activation ranges (the target's ``RecipeSpec.activation_ranges``). The same :func:`exporter.export.export_model` builds every
    artifact of ``build``.
    """
    from exporter import export as ex

    config = resolve_config(preset, checkpoint, layers) if (prune_heads is not None or skip_layers is not None) else None
    job = ex.plan(target, recipe, out, calibration, keep_float, group_size, parity_target, prune_heads, skip_layers, config,
                  smooth=smooth, gptq=gptq, check_floor=check_floor, activation_range=activation_range)
    model = load_reference(preset, checkpoint, layers)
    return ex.export_model(model, job, source_of(preset, checkpoint, layers), progress)


# --- calibrate, parity, build, bench ----------------------------------------------------------


def sensitivity_scheme(target: str | None, recipe: str):
    """The QuantScheme ``calibrate --sensitivity`` simulates: ``recipe`` as ``target`` implements it
    (ONNX Runtime's when none is named, else the first target offering it)."""
    from calibration.sensitivity import simulates
    from targets import TARGETS, target_spec

    if target is not None and target not in TARGETS:
        raise BadInputError(f"--sensitivity-target '{target}': expected one of {', '.join(TARGETS)}")
    for name in [target] if target else sorted(TARGETS, key=lambda t: t != "ort"):
        spec = target_spec(name)
        if recipe in spec.recipe_names and simulates(spec.recipe(recipe).scheme):
            return spec.recipe(recipe).scheme
    raise BadInputError(f"--sensitivity-recipe '{recipe}': the sensitivity search simulates int8 recipes "
                        f"(int8-static, int8-weight){' on ' + target if target else ''}")


def calibrate(
    out: str | Path,
    manifest: str | Path | None = None,
    sensitivity: bool = False,
    preset: str | None = "tiny",
    checkpoint: str | Path | None = None,
    layers: int | None = None,
    progress: Progress | None = None,
    sensitivity_recipe: str = RecipeName.INT8_STATIC,
    sensitivity_target: str | None = None,
    head_importance: bool = False,
) -> list[str]:
    from core.components import build_components
    from core.runner import load_tokenizer
    from calibration import manifest as manifest_mod
    from calibration import stats
    from core.artifact import check_output_dir

    scheme = sensitivity_scheme(sensitivity_target, sensitivity_recipe) if sensitivity else None
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
        from calibration import sensitivity as sens

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
    blockwise: bool = False,
) -> tuple[list[str], dict]:
    """Run parity; returns (summary lines, report). Call check_parity(report) after showing the lines."""
    from exporter import parity as par

    report = par.run_parity(
        Path(artifact_dir),
        inputs=Path(inputs) if inputs else None,
        out_dir=Path(out) if out else None,
        thresholds=_parse_thresholds(thresholds or []) or None,
        steps=steps,
        progress=progress,
        blockwise=blockwise,
    )
    return par.summary_lines(report), report


def check_parity(report: dict) -> None:
    """Raise ParityFailure naming the failed method(s) and metric(s)."""
    from exporter import parity as par

    par.check(report)


def build(config: str | Path | None, out: str | Path, progress: Progress | None = None) -> Path:
    if config is not None and not Path(config).is_file():
        kind = "is a directory; give the .toml file" if Path(config).is_dir() else "file not found"
        raise BadInputError(f"build config {config}: {kind}")
    from exporter import build as builder

    return builder.build(Path(config) if config else None, Path(out), progress=progress)


def bench(
    artifact_dir: str | Path,
    json_out: str | Path | None = None,
    progress: Progress | None = None,
    prompt_len: int | None = None,
    steps: int = 32,
    repeats: int = 3,
    eager: bool = True,
) -> str:
    if json_out is not None and Path(json_out).is_dir():
        raise BadInputError(f"--json {json_out}: is a directory; give a file name")
    if json_out is not None and not Path(json_out).absolute().parent.is_dir():
        raise BadInputError(f"--json {json_out}: its folder does not exist")
    from exporter import bench as b

    for name, value, least in (("--prompt-len", prompt_len, 1), ("--steps", steps, 1), ("--repeats", repeats, 1)):
        if value is not None and value < least:
            raise BadInputError(f"{name} {value}: must be at least {least}")
    result = b.run_bench(Path(artifact_dir), Path(json_out) if json_out else None, progress=progress,
                         prompt_len=prompt_len, steps=steps, repeats=repeats, eager=eager)
    return b.format_table(result)
