"""Quantization: quantize / dequantize and the constexpr weight decompressions (blockwise, affine, cast,
sparse, palettized).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from targets.coreml.mil.dtypes import DTYPE_BY_NAME, TORCH_CAST_MIN
from targets.coreml.mil.ops.base import as_torch, f32, int_of, norm_axis, register, torch_module, variant_error


# quantization
def _per_axis(param: Any, x: np.ndarray, axis: Any) -> np.ndarray:
    p = np.asarray(param)
    if p.ndim == 0 or p.ndim == x.ndim:
        return p
    if axis is None:
        raise ValueError("a vector scale / zero_point needs an axis")
    ax = norm_axis(int_of(axis), x.ndim)
    return p.reshape([-1 if i == ax else 1 for i in range(x.ndim)])


@register("quantize")
def _quantize(a, n):
    x = f32(a["input"])
    scale = f32(_per_axis(a["scale"], x, a.get("axis")))
    target = np.dtype(DTYPE_BY_NAME[str(a["output_dtype"])])
    q = np.round(x / scale)
    if a.get("zero_point") is not None:
        q = q + _per_axis(a["zero_point"], x, a.get("axis")).astype(np.float32)
    info = np.iinfo(target)
    return np.clip(q, info.min, info.max).astype(target)


@register("dequantize")
def _dequantize(a, n):
    x = np.asarray(a["input"]).astype(np.float32)
    if a.get("zero_point") is not None:
        x = x - _per_axis(a["zero_point"], x, a.get("axis")).astype(np.float32)
    return x * f32(_per_axis(a["scale"], x, a.get("axis")))


@register("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a, n):
    # (data - offset) * scale, each scale (offset) entry covering a block of data; computed on a blocked view
    # ([s0, d0 / s0, s1, d1 / s1, ...] against [s0, 1, s1, 1, ...]) so that no full-size scale is materialised
    data = np.asarray(a["data"])
    scale_fp16 = np.asarray(a["scale"]).dtype == np.float16
    scale = f32(a["scale"])
    offset = a.get("offset")
    if data.ndim != scale.ndim or any(d % s for d, s in zip(data.shape, scale.shape)):
        raise ValueError(f"scale shape {list(scale.shape)} does not tile data shape {list(data.shape)}")
    blocked = [x for d, s in zip(data.shape, scale.shape) for x in (s, d // s)]
    per_block = [x for s in scale.shape for x in (s, 1)]
    x = data.reshape(blocked)
    if offset is None and scale_fp16 and np.issubdtype(data.dtype, np.integer) and data.itemsize == 1 \
            and data.size >= TORCH_CAST_MIN:
        # An 8-bit (or 4-bit) integer times an fp16 scale is exact in float32 (at most 8 + 11 significant bits), so
        # torch's float16 product, computed in float32 and rounded once, is the fp16 rounding of the float32 product
        # the general path below gives; it skips a float32 copy of the weight and NumPy's slow float16 cast.
        torch = torch_module()
        t = as_torch(x).to(torch.float16)
        t.mul_(as_torch(np.asarray(a["scale"], np.float16)).reshape(per_block))
        return t.numpy().reshape(data.shape)
    if offset is not None:
        x = np.subtract(x, np.asarray(offset).astype(np.float32).reshape(per_block), dtype=np.float32)
        np.multiply(x, scale.reshape(per_block), out=x)
    else:
        x = np.multiply(x, scale.reshape(per_block), dtype=np.float32)
    return x.reshape(data.shape)


@register("constexpr_affine_dequantize")
def _affine_dequantize(a, n):
    q = np.asarray(a["quantized_data"]).astype(np.float32)
    axis = a.get("axis", 0)
    zp = _per_axis(a["zero_point"], q, axis).astype(np.float32)
    return (q - zp) * f32(_per_axis(a["scale"], q, axis))


@register("constexpr_cast")
def _constexpr_cast(a, n):
    return np.asarray(a["source_val"]).astype(DTYPE_BY_NAME[str(a["output_dtype"])])


@register("constexpr_sparse_to_dense")
def _sparse_to_dense(a, n):
    if "shape" in a:
        raise variant_error(n, "the iOS16 inputs (packed mask + shape)")
    mask = np.asarray(a["mask"])
    out = np.zeros(mask.shape, np.asarray(a["nonzero_data"]).dtype)
    out[mask != 0] = np.asarray(a["nonzero_data"])
    return out


@register("constexpr_lut_to_dense")
def _lut_to_dense(a, n):
    if "shape" in a:
        raise variant_error(n, "the iOS16 inputs (packed indices + shape)")
    idx = np.asarray(a["indices"]).astype(np.int64)
    lut = np.asarray(a["lut"])  # [*blocks (rank of indices), palette, vector size]
    if lut.shape[-1] != 1:
        raise variant_error(n, "vector palettization (lut vector size > 1)")
    # each index reads the lut of its block: lut dims tile the index dims blockwise
    grid = np.indices(idx.shape, sparse=True)
    block = tuple(g // (size // nb) for g, size, nb in zip(grid, idx.shape, lut.shape[:-2]))
    return lut[block + (idx, 0)]
