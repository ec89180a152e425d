"""One export, as the ``export`` command and every ``build`` entry do it.

:func:`plan` runs every check that needs no model (target, recipe, options, ``--out``, the calibration
manifest's lines) and returns an :class:`ExportPlan`; :func:`export_model` then takes a loaded reference
model through compression (head pruning / layer skipping), the keep-float search of ``--parity-target``
and the target's lifecycle (targets/lifecycle.py). ``build`` loads the model once and calls
:func:`export_model` per artifact with a shared calibration cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.artifact import Artifact, Progress, check_output_dir, no_progress
from core.errors import BadInputError
from core.recipes import Recipe, WeightGrid


@dataclass(frozen=True)
class ExportPlan:
    target: str
    recipe: Recipe
    out: Path
    calibration: Path | None = None  # a calibrate --out DIR, a manifest .jsonl, or None (the built-in set)
    parity_target: float | None = None  # cosine the keep-float search must reach
    prune_heads: float | None = None
    skip_layers: int | None = None
    smooth: float | None = None  # SmoothQuant migration strength (calibration/smooth.py)
    gptq: WeightGrid | None = None  # --gptq: GPTQ rounding onto the target's grid (calibration/gptq.py)
    gptq_by_default: bool = False  # the grid is the recipe's default (not --gptq): skipped where it does not fit
    check_floor: float | None = None  # the export check's cosine floor, instead of the recipe's gate

    @property
    def needs_calibration(self) -> bool:
        return self.recipe.needs_calibration or self.parity_target is not None or self.smooth is not None or self.gptq is not None


def plan(
    target: str,
    recipe: str,
    out: str | Path,
    calibration: str | Path | None = None,
    keep_float: tuple[str, ...] = (),
    group_size: int | None = None,
    parity_target: str | None = None,
    prune_heads: float | None = None,
    skip_layers: int | None = None,
    config: Any | None = None,
    check_out: bool = True,
    shared_calibration: bool = False,
    smooth: float | None = None,
    gptq: bool | None = None,
    check_floor: float | None = None,
    activation_range: str | None = None,
) -> ExportPlan:
    """Every check of an export's options before any model work; ``config`` (a ModelConfig) adds the
    checks against the model's shape (compression settings). ``shared_calibration``: ``calibration`` is a
    build's set for all its artifacts, dropped where this one needs none (instead of refused). ``gptq``: True
    (--gptq), False (--no-gptq) or None, the recipe's default on this target (``RecipeSpec.gptq_default``; off
    with --parity-target, which the two do not combine with yet)."""
    from targets import target_names, target_spec

    spec = target_spec(target)  # unknown target -> exit 2 before any model work
    rspec = spec.recipe(recipe)  # not offered by this target -> exit 2, naming what it offers
    rec = Recipe(rspec.recipe, keep_float=tuple(keep_float), group_size=group_size, activation_range=activation_range)
    if group_size is not None and not rspec.takes_group_size(rec):
        from core.recipes import GROUPED_RECIPES

        also = [f"{r.recipe.value} on {t}" for t in target_names() for r in target_spec(t).recipes if r.blocks_on_request]
        raise BadInputError(f"--group-size applies to {', '.join((*GROUPED_RECIPES, *also))}, not '{recipe}' on {target}")
    if group_size is not None and group_size != 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise BadInputError(f"--group-size {group_size}: must be a power of two >= 16 (e.g. 32, 64, 128), or 0 for per channel")
    spec.check(rec)
    if keep_float and not rec.is_quantized:
        raise BadInputError(f"--keep-float applies to quantized recipes; '{recipe}' keeps everything in float already")
    out = Path(out)
    if check_out:
        check_output_dir(out)  # the user's data is never replaced; refused before any model work
    if calibration is not None and not Path(calibration).exists():
        raise BadInputError(f"--calibration {calibration}: not found")
    if smooth is not None:
        from calibration.smooth import check_alpha

        check_alpha(smooth)
        if not rec.is_quantized:
            raise BadInputError(f"--smooth applies to quantized recipes; '{recipe}' keeps everything in float")
    grid = None
    by_default = gptq is None and rspec.gptq_default and rspec.weight_grid is not None and not parity_target
    if by_default:
        grid = rspec.weight_grid(rec)
    if gptq:
        if rspec.weight_grid is None:
            offered = [f"{r.recipe.value}" for r in spec.recipes if r.weight_grid is not None]
            why = ("it keeps its weights in float" if not rec.is_quantized else
                   "its quantizer's grid does not keep weights rounded beforehand (torchao scales by max / 127.5 or / 7.5)")
            raise BadInputError(f"--gptq does not apply to '{recipe}' on {target}: {why}; on {target} it applies to "
                                f"{', '.join(offered) or 'no recipe'}")
        if parity_target:
            raise BadInputError("--gptq with --parity-target: not combined yet (the layers the search keeps in float "
                                "would keep GPTQ-rounded weights); use one or the other")
        grid = rspec.weight_grid(rec)
    if calibration is not None and not (rec.needs_calibration or parity_target or prune_heads or skip_layers or smooth
                                        or grid is not None):
        if shared_calibration:
            calibration = None
        else:
            raise BadInputError(f"--calibration applies to int8-static, --parity-target, --prune-heads and --skip-layers, not '{recipe}' alone")
    target_cos = None
    if parity_target:
        from calibration.sensitivity import parse_parity_target, simulates

        target_cos = parse_parity_target(parity_target)
        if not simulates(rspec.scheme):
            raise BadInputError(f"--parity-target applies to int8 recipes, not '{recipe}'")
    if calibration is not None and Path(calibration).is_file():
        from calibration.manifest import read_manifest

        read_manifest(Path(calibration))  # every bad line, before the model is loaded
    if (prune_heads is not None or skip_layers is not None) and config is not None:
        from exporter.compress import check_settings

        check_settings(config, prune_heads, skip_layers)
    if check_floor is not None and not 0.0 < check_floor <= 1.0:
        raise BadInputError(f"--check-floor {check_floor}: a cosine in (0, 1], e.g. 0.8")
    return ExportPlan(target, rec, out, Path(calibration) if calibration is not None else None, target_cos,
                      prune_heads, skip_layers, smooth, grid, by_default, check_floor)


def export_model(
    model: Any,
    plan: ExportPlan,
    source: dict[str, Any] | None = None,
    progress: Progress | None = None,
    out: Path | None = None,
    calibration_cache: dict[Any, Any] | None = None,
) -> Artifact:
    """Export ``model`` (the eager reference) as ``plan`` says into ``out`` (default ``plan.out``).

    ``calibration_cache`` shares calibration data between exports of the same (uncompressed) model.
    """
    from core.components import build_components
    from exporter.model.upcast import float32_weights
    from targets import get_target, target_spec
    from targets.lifecycle import export

    progress = progress or no_progress
    target = get_target(plan.target)
    rec = plan.recipe
    compression: dict[str, Any] = {}
    if plan.gptq is not None:
        refusal = gptq_memory_refusal(model, rec.keep_float)
        if refusal and not plan.gptq_by_default:
            raise BadInputError(f"--gptq {refusal} (export without --gptq)")
        if refusal:  # the recipe's default, not asked for: round to nearest, and say why
            plan = replace(plan, gptq=None)
            compression["gptq_skipped"] = f"GPTQ (this recipe's default) {refusal}"
    if not target.spec.reads_stored_weights:  # e.g. ort upcasts per method and streams large ones
        float32_weights(model)  # a large bf16 checkpoint is kept mapped for eager use; exporters trace fp32 modules
    if plan.prune_heads or plan.skip_layers:
        model, record = _compress(model, plan.calibration, plan.prune_heads, plan.skip_layers, progress)
        compression.update(record)
    calibration_source = plan.calibration
    if plan.smooth is not None:
        model, record, calibration_source = _smooth(model, plan.calibration, plan.smooth, progress)
        compression["smooth"] = record
    if plan.gptq is not None:
        model, record, calibration_source = _gptq(model, calibration_source, plan.gptq, rec.keep_float, progress)
        compression["gptq"] = record
    check_keep_float(model, rec.keep_float)
    if rec.group_size:
        check_group_size(model, rec.group_size)
    comps = build_components(model)
    comps.text_decoder.cache.reset()
    calib = None
    if rec.needs_calibration or plan.parity_target is not None:  # (--smooth / --gptq calibrated their own)
        # (shared only while the model is the one loaded: a skipped GPTQ changed nothing)
        key = (str(plan.calibration), id(model)) if not set(compression) - {"gptq_skipped"} else None
        if calibration_cache is not None and key in calibration_cache:
            calib = calibration_cache[key]
        else:
            calib = calibration_data(comps, calibration_source, progress)
            if calibration_cache is not None and key is not None:
                calibration_cache[key] = calib
    if plan.parity_target is not None:
        from calibration.sensitivity import search_keep_float

        scheme = target_spec(plan.target).recipe(rec.name).scheme
        found = search_keep_float(comps, calib, plan.parity_target, progress=progress, scheme=scheme)
        compression["parity_search"] = found.record()  # says whether the target held on held-out prompts
        rec = replace(rec, keep_float=tuple(dict.fromkeys(rec.keep_float + found.keep)))
    return export(target, comps, rec, out or plan.out, calibration=calib if rec.needs_calibration else None,
                  progress=progress, source=source, compression=compression or None, check_floor=plan.check_floor)


def _smooth(model, calibration, alpha: float, progress):
    """SmoothQuant-smoothed copy of ``model``, its record, and where to calibrate the smoothed model from.

    The scales come from the calibration set run through the unsmoothed model; the smoothed model has other
    activations (and v cache), so a ``calibrate --out DIR`` given for the original is replaced by the
    manifest it was made from (the built-in set if that is gone) for the rest of the export."""
    from calibration.smooth import smooth
    from core.components import build_components

    comps = build_components(model)
    comps.text_decoder.cache.reset()
    calib = calibration_data(comps, calibration, progress)
    smoothed, record = smooth(comps, calib, alpha, progress)
    return smoothed, record, _recalibration_source(calibration, calib)


def _gptq(model, calibration, grid, keep_float: tuple[str, ...], progress):
    """``model``'s copy GPTQ-rounded onto the target's ``grid`` (--keep-float layers untouched), its record, where to
    calibrate it from."""
    from calibration.gptq import round_weights
    from core.components import build_components

    keep = _kept_modules(model, keep_float)
    comps = build_components(model)
    comps.text_decoder.cache.reset()
    calib = calibration_data(comps, calibration, progress)
    rounded, record = round_weights(comps, calib, grid, skip=keep, progress=progress)
    return rounded, record, _recalibration_source(calibration, calib)


def _kept_modules(model, keep_float: tuple[str, ...]) -> set[str]:
    return {n for n, _ in model.named_modules() if any(n == k or n.startswith(k + ".") for k in keep_float)}


def gptq_memory_refusal(model, keep_float: tuple[str, ...]) -> str | None:
    """Why GPTQ cannot round ``model`` here, or None: it rounds the whole model at once (a copy of it and one
    Hessian per distinct linear input), refused before any work where that would take more than half the memory."""
    from calibration.gptq import memory_needed

    need, have = memory_needed(model, _kept_modules(model, keep_float)), physical_memory()
    if need > have // 2:
        return (
            f"would hold {need / 2**30:.1f} GiB beside the model (a copy of it and one Hessian per decoder "
            f"linear), more than half of this machine's {have / 2**30:.1f} GiB: it rounds the whole model at once, "
            "which suits models up to a few billion parameters, not this one")
    return None


def physical_memory() -> int:
    """This machine's memory in bytes."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _recalibration_source(calibration, calib):
    """A changed model is calibrated again: from the manifest a ``calibrate --out DIR`` was made from (its
    statistics are the old model's), the built-in set if that is gone; a manifest or None as given."""
    if calibration is not None and Path(calibration).is_dir():
        return calib.manifest if calib.manifest is not None and Path(calib.manifest).is_file() else None
    return calibration


def _compress(model, calibration, prune_heads, skip_layers, progress):
    from calibration import importance
    from core.components import build_components
    from core.runner import load_tokenizer
    from exporter import compress

    t = model.config.text
    scores = None
    if calibration is not None and Path(calibration).is_dir():
        scores = importance.load(Path(calibration), t.num_layers, t.num_heads)
    if scores is None:
        comps = build_components(model)
        scores = importance.measure(comps, importance.builtin_prompts(), load_tokenizer(model.config), progress=progress)
    model, record = compress.apply(model, scores, prune_heads, skip_layers)
    return model, {**record, "scores": scores}


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


def calibration_data(components, calibration: str | Path | None, progress: Progress | None = None):
    """CalibrationData: a calibrate --out DIR, a manifest .jsonl, or the built-in set."""
    from calibration import stats
    from core.runner import load_tokenizer

    path = Path(calibration) if calibration else None
    if path is not None and not path.exists():
        raise BadInputError(f"--calibration {path}: not found")
    if path is not None and path.is_dir():
        data = stats.load_calibration(path)
        stats.check_compatible(data, components, path)
        return data
    return stats.calibrate(components, path, load_tokenizer(components.config), progress=progress)

