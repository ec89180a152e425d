"""Reductions (reduce_*, argmax / argmin)."""

from __future__ import annotations

import numpy as np

from targets.coreml.mil.ops.base import bool_of, f32, int_of, ints_of, norm_axis, register


# reductions
def reduce_axes(a: dict, rank: int) -> tuple | None:
    axes = a.get("axes")
    if axes is None:
        return None
    return tuple(sorted(norm_axis(x, rank) for x in ints_of(axes)))


def _reduction(fn):
    def run(a, n):
        x = np.asarray(a["x"])
        if np.issubdtype(x.dtype, np.floating):
            x = f32(x)
        return fn(x, reduce_axes(a, x.ndim), bool_of(a.get("keep_dims", False)))
    return run


register("reduce_sum")(_reduction(lambda x, ax, k: np.sum(x, axis=ax, keepdims=k)))
register("reduce_mean")(_reduction(lambda x, ax, k: np.mean(x, axis=ax, keepdims=k)))
register("reduce_max")(_reduction(lambda x, ax, k: np.max(x, axis=ax, keepdims=k)))
register("reduce_min")(_reduction(lambda x, ax, k: np.min(x, axis=ax, keepdims=k)))
register("reduce_prod")(_reduction(lambda x, ax, k: np.prod(x, axis=ax, keepdims=k)))
register("reduce_sum_square")(_reduction(lambda x, ax, k: np.sum(x * x, axis=ax, keepdims=k)))
register("reduce_l1_norm")(_reduction(lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k)))
register("reduce_l2_norm")(_reduction(lambda x, ax, k: np.sqrt(np.sum(x * x, axis=ax, keepdims=k))))
register("reduce_log_sum")(_reduction(lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k))))


@register("reduce_log_sum_exp")
def _reduce_lse(a, n):
    x = f32(a["x"])
    ax = reduce_axes(a, x.ndim)
    m = np.max(x, axis=ax, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return out if bool_of(a.get("keep_dims", False)) else np.squeeze(out, axis=ax)


@register("reduce_argmax", "reduce_argmin")
def _reduce_arg(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a.get("axis", -1)), x.ndim)
    idx = (np.argmax if n.type == "reduce_argmax" else np.argmin)(x, axis=axis)
    if bool_of(a.get("keep_dims", False)):
        idx = np.expand_dims(idx, axis)
    return idx.astype(np.int32)
