"""What each recipe's QuantScheme does to a method's module before it is exported for XNNPACK.

* ``embedding_bits == 8``: every nn.Embedding becomes int8 rows + a per-row scale (embedding_byte);
* ``activations == "dynamic"``: torchao's Int8DynamicActivationIntxWeightConfig on the linears (int8 or
  int4 weights, per output channel or per group), lowered to XNNPACK's qd8 kernels;
* ``activations == "static"``: PT2E with the XNNPACK quantizer on linear/conv only, its observers fed
  with recorded calibration calls (the decoder's in whole prompts, in order: its state is internal).

Modules named in ``Recipe.keep_float`` stay float on every path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from calibration.stats import spread
from core.errors import BadInputError, ExportError
from core.recipes import QuantScheme, Recipe, RecipeName
from exporter.model.upcast import typed_copy
from targets.executorch.llm_decoder import Rotation, eager_custom_ops
from targets.executorch.program import COMPONENT_INPUTS, STATE, ByteEmbedding, export_module
from targets.executorch.spec import SPEC

# int8-static: the ops PT2E quantizes (one overload per pattern family; each annotator takes the whole family)
PT2E_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
MAX_CALIB = {"token_embedding": 64, "vision_encoder": 24, "audio_encoder": 24}
CALIB_PROMPTS = 16  # whole prompts replayed through the decoder (its cache is internal state)


def quantize_method(components: Any, method: str, module: nn.Module, recipe: Recipe, scheme: QuantScheme,
                    recorded: dict[str, list[dict]] | None) -> tuple[Any, dict[str, Any]]:
    """``module`` (method ``method``) quantized as ``scheme`` says and exported; (program, report entry).

    The module is copied first (in float32): quantization rewrites modules, and the eager reference stays as it is.
    """
    keep = keep_names(module, components.model, recipe.keep_float)
    module = typed_copy(module, torch.float32)  # (a kept bf16 checkpoint's weights: float32 for this method only)
    q: dict[str, Any] = {"embeddings_int8": quantize_embedding(module, keep) if scheme.embedding_bits == 8 else 0}
    if scheme.activations == "static":
        samples, before = calibration_calls(method, recorded or {})
        q["calibration_calls"] = len(samples)
        q["kept_float"] = sorted(keep)
        return pt2e_quantize(components, method, module, samples, keep | rotation_names(module), before,
                             recipe.activation_range), q
    q.update(quantize_linears(module, scheme, recipe.group_size, keep))
    return export_module(components, method, module), q


def piece_quantizer(components: Any, recipe: Recipe, scheme: QuantScheme):
    """The streamed decoder's quantizer (targets.executorch.streaming.PieceQuantizer): the linears of a piece's
    float32 copy as :func:`quantize_linears` does the whole method's, keep_float found on the piece itself."""

    def run(piece: nn.Module, copied: nn.Module) -> dict[str, Any]:
        if not scheme.quantized:
            return {}
        return quantize_linears(copied, scheme, recipe.group_size, keep_names(piece, components.model, recipe.keep_float))

    return run


def keep_names(module: nn.Module, model: nn.Module, keep_float: tuple[str, ...]) -> set[str]:
    """Names (inside ``module``) of the model modules listed in keep_float (model.named_modules() names)."""
    if not keep_float:
        return set()
    wanted = {id(m) for n, m in model.named_modules() if n in keep_float or any(n.startswith(k + ".") for k in keep_float)}
    # a module the ExecuTorch decoder derived from a model module (a gate_up_proj half) goes with its source
    return {n for n, m in module.named_modules() if id(m) in wanted or getattr(m, "derived_from", None) in wanted}


def rotation_names(module: nn.Module) -> set[str]:
    """Every path to the decoder's rope rotation (a constant signed permutation as a linear, shared by the
    layers): PT2E would take it for a weight-bearing linear and quantize the query / key it rotates."""
    return {n for n, m in module.named_modules(remove_duplicate=False) if isinstance(m, Rotation)}


def quantize_embedding(module: nn.Module, keep: set[str]) -> int:
    """Swap every nn.Embedding not kept in float for a ByteEmbedding; returns how many were swapped."""
    n = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Embedding) and full not in keep:
                setattr(child, attr, ByteEmbedding(sub))
                n += 1
    return n


# --- dynamic activations (torchao) ------------------------------------------------------------------


def torchao_config(scheme: QuantScheme, group_size: int):
    """torchao's config for ``scheme``: int8 dynamic activations, int8/int4 weights per channel or per group."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    dtypes = {8: torch.int8, 4: torch.int4}
    if scheme.activations != "dynamic" or scheme.weight_bits not in dtypes:
        raise ExportError(f"ExecuTorch has no torchao path for {scheme.describe()}")
    granularity = PerGroup(group_size) if scheme.groupwise and group_size > 0 else PerAxis(0)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtypes[scheme.weight_bits], weight_granularity=granularity)


def quantize_linears(module: nn.Module, scheme: QuantScheme, group_size: int, keep: set[str]) -> dict[str, Any]:
    """torchao's quantize_ on every nn.Linear except the kept ones and those whose inputs don't split into groups."""
    from torchao.quantization.quant_api import quantize_

    picked, skipped = [], []
    grouped = scheme.groupwise and group_size > 0

    def want(mod: nn.Module, fqn: str) -> bool:
        if not isinstance(mod, nn.Linear):
            return False
        if fqn in keep:
            skipped.append(fqn)
            return False
        if grouped and mod.in_features % group_size:
            skipped.append(f"{fqn} (in_features {mod.in_features} not a multiple of group {group_size})")
            return False
        picked.append(fqn)
        return True

    quantize_(module, torchao_config(scheme, group_size), filter_fn=want)
    return {"quantized_linears": len(picked), "kept_float": skipped}


# --- static activations (PT2E) ---------------------------------------------------------------------


def xnnpack_static_quantizer(keep: Iterable[str] = (), activation_range: str | None = None):
    """The PT2E quantizer of the int8-static recipe: per-channel int8 weights, static int8 activations, their ranges
    set by ``activation_range``, one of the spec's names (None: its default): "mse" (the XNNPACK quantizer's
    HistogramObserver: the range whose quantization minimises the L2 error over the calibration histogram) or
    "minmax" (torchao's MinMaxObserver).

    W8A8 on the weight-bearing ops only (linear, conv): the quantizer's global config would also put
    per-tensor int8 on every add / mul / cat, i.e. the residual stream, the RMSNorm scaling, the rope
    products and the KV cache concat, which costs far more accuracy than it saves time (tiny decoder
    cosine 0.9775 -> 0.9995). Nodes inside a module named in ``keep`` stay float.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_module_name_filter,
        get_symmetric_quantization_config,
    )

    offered = SPEC.recipe(RecipeName.INT8_STATIC).activation_ranges
    activation_range = activation_range or offered[0]
    if activation_range not in offered:
        raise BadInputError(f"int8-static on executorch: unknown activation range '{activation_range}' "
                            f"({', '.join(offered)})")
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)  # its observer: "mse"
    if activation_range == "minmax":
        from torchao.quantization.pt2e import MinMaxObserver

        act = replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = replace(config, input_activation=act, output_activation=act)
    quantizer = XNNPACKQuantizer()
    for op in PT2E_OPS:
        quantizer.set_operator_type(op, config)
    kept = [get_module_name_filter(name) for name in sorted(keep)]
    if kept:  # (set_module_name(name, None) is not supported by this quantizer)
        quantizer.set_filter_function(lambda n: not any(f(n) for f in kept))
    return quantizer


def pt2e_quantize(
    components: Any,
    method: str,
    module: nn.Module,
    samples: list[tuple],
    keep: set[str],
    before_call: Callable[[nn.Module, int], None] | None = None,
    activation_range: str | None = None,
):
    """PT2E static int8 (XNNPACK quantizer, per-channel weights); returns the re-exported program."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xnnpack_static_quantizer(keep, activation_range)
    with torch.no_grad():
        prepared = prepare_pt2e(export_module(components, method, module).module(), quantizer)
        with eager_custom_ops():
            for i, args in enumerate(samples):
                if before_call is not None:
                    before_call(prepared, i)
                prepared(*args)
        converted = convert_pt2e(prepared)
        return export_module(components, method, converted)


def calibration_calls(method: str, recorded: dict[str, list[dict]]):
    """The recorded calls replayed through ``method``'s observers, and a check run before each one.

    Encoders: up to MAX_CALIB calls spread over the set. The decoder: CALIB_PROMPTS whole prompts in
    order, each image prefill checked to follow <|begin_of_image|> (the observers must see each prefill
    with the positions the program will give it).
    """
    samples = list(recorded.get(method, []))
    if not samples:
        raise BadInputError(f"int8-static: the calibration data has no samples for method '{method}'")
    if method != "text_decoder":
        names = COMPONENT_INPUTS[method]
        picked = spread(samples, MAX_CALIB[method])
        return [tuple(torch.from_numpy(np.ascontiguousarray(s[n])) for n in names) for s in picked], None
    calls = [c for p in spread(decoder_prompts(samples), CALIB_PROMPTS) for c in p]
    image = [is_image_call(c) for c in calls]
    args = [
        (torch.from_numpy(np.ascontiguousarray(c["embeds"], np.float32)),
         torch.from_numpy(np.ascontiguousarray(c["cache_position"], np.int64)))
        for c in calls
    ]
    if not any(image):  # text only (a model without vision has no image marker: torch.export drops the unused buffer)
        return args, None

    def before(prepared: nn.Module, i: int) -> None:
        marked = int(prepared.get_buffer(f"{STATE}.image_next")[0]) > 0
        if image[i] and not marked:
            raise ExportError(
                f"int8-static calibration: recorded decoder call {i} is an image prefill that does not follow "
                "<|begin_of_image|>; the program would give it text positions"
            )

    return args, before


def decoder_prompts(samples: list[dict]) -> list[list[dict]]:
    """Recorded decoder calls split into prompts (a call at cache position 0 starts one)."""
    prompts: list[list[dict]] = []
    for s in samples:
        if int(np.asarray(s["cache_position"]).reshape(-1)[0]) == 0 or not prompts:
            prompts.append([])
        prompts[-1].append(s)
    return prompts


def is_image_call(sample: dict) -> bool:
    pos = np.asarray(sample["position_ids"])
    return bool(pos.shape[-1] > 1 and np.any(pos[1] != pos[0]))
