"""Which weights the quantized recipes store as integers, and the coremltools passes that do it.

A weight is a float constant with at least :data:`MIN_WEIGHT_ELEMENTS` elements and two or more
dimensions whose every reader is a linear / conv / matmul / gather (:data:`WEIGHT_CONSUMERS`).

* int8-weight (and int8-static's weights): ``coremltools.optimize.coreml.linear_quantize_weights``,
  linear symmetric int8 per output channel, embedding table (``gather``) included: iOS 18
  ``constexpr_blockwise_shift_scale`` ops.
* int4-weight: the same pass with ``dtype="int4"`` in blocks of ``Recipe.group_size`` input channels
  (0: per output channel) for linear / conv / matmul weights; the embedding table, and any weight
  whose input channels the block does not tile (coremltools would skip it silently: the
  patch-embedding conv's 3 colour channels), get int8 per channel instead.

``Recipe.keep_float`` names model modules: a constant equal to one of their weights (fp16 bytes, or
its transpose) stays float, and the ops reading it are left out of activation quantization too.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from torch import nn

from core.errors import ExportError
from targets.coreml import compat
from targets.coreml.util import quiet

# weights with fewer elements stay float (norm scales, biases, the tiny fusion gate's 3 rows are 2-D and kept)
MIN_WEIGHT_ELEMENTS = 256
# ops whose constant (weight) inputs the int8 recipes quantize
WEIGHT_CONSUMERS = ("linear", "conv", "matmul", "gather")


def _fingerprint(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return (a.shape, a.tobytes())


def kept_arrays(model: nn.Module, keep: Iterable[str]) -> set[tuple]:
    """fp16 fingerprints (shape, bytes) of every weight of the ``keep`` modules (and their transposes)."""
    keep = tuple(k for k in keep if k)
    if not keep:
        return set()
    prints: set[tuple] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not any(name == k or name.startswith(k + ".") for k in keep) or p.ndim < 2:
            continue
        w = p.detach().float().numpy()
        prints.add(_fingerprint(w))
        if w.ndim == 2:
            prints.add(_fingerprint(w.T))
    return prints


def weight_plan(mlmodel: Any, keep_prints: set[tuple]) -> tuple[list[str], list[str], list[str]]:
    """(const ops to quantize, const ops kept float, non-const ops kept float) in one converted model.

    A weight whose value equals one of the ``keep`` modules' weights stays float, and so do the
    ops that use it (activation quantization skips them too).
    """
    quantize, kept_consts, kept_ops = [], [], []
    for op in compat.model_ops(mlmodel):
        val = compat.const_value(op)
        if not isinstance(val, np.ndarray) or val.ndim < 2 or val.size < MIN_WEIGHT_ELEMENTS:
            continue
        if not np.issubdtype(val.dtype, np.floating):
            continue
        readers = compat.consumer_types(op)
        if not readers or not all(t in WEIGHT_CONSUMERS for t in readers):
            continue
        if keep_prints and _fingerprint(val) in keep_prints:
            kept_consts.append(op.name)
            kept_ops.extend(compat.consumer_names(op))
        else:
            quantize.append(op.name)
    return quantize, kept_consts, sorted(set(kept_ops))


def _int8_config() -> Any:
    import coremltools.optimize.coreml as cto

    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1)


def _quantize_named(mlmodel: Any, names: Iterable[str], op_cfg: Any) -> Any:
    """``linear_quantize_weights`` on the const ops called ``names`` only."""
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=None, op_name_configs={name: op_cfg for name in names})
    with quiet():
        return cto.linear_quantize_weights(mlmodel, config=config)


def quantize_weights_int8(mlmodel: Any, keep_prints: set[tuple]) -> tuple[Any, dict[str, int]]:
    """Per-channel symmetric int8 weights (constexpr_blockwise_shift_scale on iOS 18)."""
    quantize, kept, _ = weight_plan(mlmodel, keep_prints)
    out = _quantize_named(mlmodel, quantize, _int8_config())
    return out, {"int8_weights": len(quantize), "float_weights_kept": len(kept)}


def _float_consts(mlmodel: Any, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are still float const ops in ``mlmodel`` (a quantized const is replaced)."""
    left = set()
    for op in compat.model_ops(mlmodel):
        val = compat.const_value(op)
        if isinstance(val, np.ndarray) and np.issubdtype(val.dtype, np.floating):
            left.add(op.name)
    return [n for n in names if n in left]


def quantize_weights_int4(mlmodel: Any, keep_prints: set[tuple], block_size: int) -> tuple[Any, dict[str, Any]]:
    """4-bit symmetric weights in blocks of ``block_size`` input channels (0: per output channel); the rest int8.

    Linear / conv / matmul weights go to int4 (constexpr_blockwise_shift_scale, iOS 18).
    coremltools skips, without a word, a weight whose input channels the block does not
    tile; those, and the embedding tables (gather), then get the int8 per-channel weights
    of int8-weight, so no planned weight stays float.
    """
    import coremltools.optimize.coreml as cto

    quantize, kept, _ = weight_plan(mlmodel, keep_prints)
    planned = set(quantize)
    users = {op.name: set(compat.consumer_types(op)) for op in compat.model_ops(mlmodel) if op.name in planned}
    four = [n for n in quantize if "gather" not in users.get(n, {"gather"})]
    extra = {"granularity": "per_block", "block_size": block_size} if block_size > 0 else {"granularity": "per_channel"}
    cfg4 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", weight_threshold=1, **extra)
    mlmodel = _quantize_named(mlmodel, four, cfg4)
    rest = _float_consts(mlmodel, quantize)
    if rest:
        mlmodel = _quantize_named(mlmodel, rest, _int8_config())
    still = _float_consts(mlmodel, quantize)
    if still:
        raise ExportError(f"int4-weight: coremltools left {len(still)} planned weight(s) in float: {', '.join(still[:3])}")
    return mlmodel, {"int4_weights": len(quantize) - len(rest), "int8_weights": len(rest), "float_weights_kept": len(kept),
                     "block_size": block_size}
