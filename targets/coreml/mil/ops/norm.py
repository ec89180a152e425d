"""Normalisations and scaled dot-product attention."""

from __future__ import annotations

import math

import numpy as np

from targets.coreml.mil.ops.base import f32, float_of, register
from targets.coreml.mil.ops.reduce import reduce_axes


# normalization
def _scale_shift(out: np.ndarray, a: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The optional per-channel ``gamma`` (scale) and ``beta`` (shift) of the normalisation ops."""
    if a.get("gamma") is not None:
        out = out * f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        out = out + f32(a["beta"]).reshape(shape)
    return out


def _param_shape(x: np.ndarray, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))


@register("layer_norm")
def _layer_norm(a, n):
    x = f32(a["x"])
    axes = reduce_axes(a, x.ndim) or tuple(range(x.ndim))
    eps = np.float32(float_of(a.get("epsilon", 1e-5)))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    shape = _param_shape(x, axes)
    return _scale_shift(out, a, shape)


@register("batch_norm")
def _batch_norm(a, n):
    x = f32(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = np.float32(float_of(a.get("epsilon", 1e-5)))
    out = (x - f32(a["mean"]).reshape(shape)) / np.sqrt(f32(a["variance"]).reshape(shape) + eps)
    return _scale_shift(out, a, shape)


@register("instance_norm")
def _instance_norm(a, n):
    x = f32(a["x"])
    axes = tuple(range(2, x.ndim))
    eps = np.float32(float_of(a.get("epsilon", 1e-5)))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return _scale_shift(out, a, shape)


@register("l2_norm")
def _l2_norm(a, n):
    x = f32(a["x"])  # normalised over the last three dims, leading dims are batch
    eps = np.float32(float_of(a.get("epsilon", 1e-6)))
    return x / np.sqrt(np.sum(x * x, axis=(-3, -2, -1), keepdims=True) + eps)


@register("scaled_dot_product_attention")
def _sdpa(a, n):
    q, k, v = f32(a["query"]), f32(a["key"]), f32(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(1.0 / math.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + f32(mask)
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(e / np.sum(e, axis=-1, keepdims=True), v)
