"""Shape and layout ops, index and fill ops, sorting, select and cast."""

from __future__ import annotations

import numpy as np

from targets.coreml.mil.dtypes import DTYPE_BY_NAME
from targets.coreml.mil.ops.base import bool_of, bools_of, float_of, int_of, ints_of, norm_axis, register, variant_error


# tensor shape / layout
def _reshape_target(x: np.ndarray, shape: list[int]) -> list[int]:
    out = list(shape)
    rank = x.ndim
    for i, s in enumerate(shape):
        if s == 0:  # iOS17: a 0 copies the input dim aligned from the right, else 1
            j = rank - (len(shape) - i)
            out[i] = x.shape[j] if 0 <= j < rank else 1
    return out


@register("reshape")
def _reshape(a, n):
    x = np.asarray(a["x"])
    return x.reshape(_reshape_target(x, ints_of(a["shape"])))


@register("reshape_like")
def _reshape_like(a, n):
    x = np.asarray(a["x"])
    ref_ts = a["ref_tensors"]
    begins, ends, masks = ints_of(a["begins"]), ints_of(a["ends"]), bools_of(a["end_masks"])
    shape: list[int] = []
    for ref, b, e, m in zip(ref_ts, begins, ends, masks):
        s = list(np.asarray(ref).shape)
        shape += s[b:] if m else s[b:e]
    return x.reshape(shape)


@register("transpose")
def _transpose(a, n):
    return np.transpose(a["x"], ints_of(a["perm"]))


@register("squeeze")
def _squeeze(a, n):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(norm_axis(ax, x.ndim) for ax in ints_of(a["axes"])))


@register("expand_dims")
def _expand_dims(a, n):
    x = np.asarray(a["x"])
    axes = ints_of(a["axes"])
    out_rank = x.ndim + len(axes)
    for ax in sorted(norm_axis(ax, out_rank) for ax in axes):
        x = np.expand_dims(x, ax)
    return x


@register("flatten2d")
def _flatten2d(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a.get("axis", 1)), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@register("concat")
def _concat(a, n):
    values = [np.asarray(v) for v in a["values"]]
    axis = norm_axis(int_of(a["axis"]), values[0].ndim)
    if bool_of(a.get("interleave", False)):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@register("stack")
def _stack(a, n):
    values = [np.asarray(v) for v in a["values"]]
    return np.stack(values, axis=norm_axis(int_of(a["axis"]), values[0].ndim + 1))


@register("split")
def _split(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a["axis"]), x.ndim)
    if a.get("split_sizes") is not None:
        sizes = ints_of(a["split_sizes"])
    else:
        k = int_of(a["num_splits"])
        sizes = [-(-x.shape[axis] // k)] * k
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@register("tile")
def _tile(a, n):
    return np.tile(a["x"], ints_of(a["reps"]))


@register("reverse")
def _reverse(a, n):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.flip(x)
    return np.flip(x, axis=tuple(ints_of(a["axes"])))


def _slices(x: np.ndarray, a: dict) -> tuple[tuple, list[int]]:
    rank = x.ndim
    begin, end = ints_of(a["begin"]), ints_of(a["end"])
    stride = ints_of(a["stride"]) if a.get("stride") is not None else [1] * rank
    bmask = bools_of(a["begin_mask"]) if a.get("begin_mask") is not None else [False] * rank
    emask = bools_of(a["end_mask"]) if a.get("end_mask") is not None else [False] * rank
    smask = bools_of(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [False] * rank
    sl, squeeze = [], []
    for i in range(rank):
        if smask[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            sl.append(slice(b, b + 1, 1))
            squeeze.append(i)
            continue
        sl.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return tuple(sl), squeeze


@register("slice_by_index")
def _slice_by_index(a, n):
    x = np.asarray(a["x"])
    sl, squeeze = _slices(x, a)
    out = x[sl]
    return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


@register("slice_update")
def _slice_update(a, n):
    x = np.array(a["x"], copy=True)
    sl, _ = _slices(x, a)
    target_shape = x[sl].shape
    x[sl] = np.asarray(a["update"]).reshape(target_shape)
    return x


@register("slice_by_size")
def _slice_by_size(a, n):
    x = np.asarray(a["x"])
    begin, size = ints_of(a["begin"]), ints_of(a["size"])
    sl = []
    for i in range(x.ndim):
        b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
        sl.append(slice(b, None if size[i] == -1 else b + size[i]))
    return x[tuple(sl)]


@register("pad")
def _pad(a, n):
    x = np.asarray(a["x"])
    p = ints_of(a["pad"])
    k = len(p) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=float_of(a.get("constant_val", 0.0)))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise variant_error(n, f"mode '{mode}'")


@register("shape")
def _shape(a, n):
    return np.array(np.asarray(a["x"]).shape, np.int32)


@register("fill")
def _fill(a, n):
    return np.full(ints_of(a["shape"]), np.asarray(a.get("value", 0.0)).reshape(()))


@register("fill_like")
def _fill_like(a, n):
    return np.full(np.asarray(a["ref_tensor"]).shape, np.asarray(a.get("value", 0.0)).reshape(()))


@register("range_1d")
def _range_1d(a, n):
    start, end, step = (np.asarray(a[k]).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)


@register("band_part")
def _band_part(a, n):
    x = np.asarray(a["x"])
    lower, upper = int_of(a.get("lower", -1)), int_of(a.get("upper", -1))
    rows, cols = x.shape[-2], x.shape[-1]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = np.ones((rows, cols), bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return np.where(keep, x, np.zeros((), x.dtype))


@register("cumsum")
def _cumsum(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a.get("axis", 0)), x.ndim)
    if bool_of(a.get("reverse", False)):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=np.float32 if np.issubdtype(x.dtype, np.floating) else x.dtype)
    if bool_of(a.get("exclusive", False)):
        out = out - x
    return np.flip(out, axis) if bool_of(a.get("reverse", False)) else out


@register("topk")
def _topk(a, n):
    x = np.asarray(a["x"])
    k = int_of(a.get("k", 1))
    axis = norm_axis(int_of(a.get("axis", -1)), x.ndim)
    ascending = bool_of(a.get("ascending", False))
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    return values if len(n.outputs) == 1 else (values, idx.astype(np.int32))  # iOS16 return_indices=False


@register("argsort")
def _argsort(a, n):
    x = np.asarray(a["x"])
    axis = int_of(a.get("axis", -1))
    return np.argsort(x if bool_of(a.get("ascending", False)) else -x, axis=axis, kind="stable").astype(np.int32)


@register("one_hot")
def _one_hot(a, n):
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = int_of(a["one_hot_vector_size"])
    axis = norm_axis(int_of(a.get("axis", -1)), idx.ndim + 1)
    on, off = np.asarray(a.get("on_value", 1)).reshape(()), np.asarray(a.get("off_value", 0)).reshape(())
    hot = np.expand_dims(idx, axis) == np.arange(depth).reshape([-1 if i == axis else 1 for i in range(idx.ndim + 1)])
    return np.where(hot, on, off)


@register("non_zero")
def _non_zero(a, n):
    return np.transpose(np.nonzero(np.asarray(a["x"]))).astype(np.int32)


@register("select")
def _select(a, n):
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


@register("cast")
def _cast(a, n):
    x = np.asarray(a["x"])
    target = DTYPE_BY_NAME.get(str(a["dtype"]))
    if target is None:
        raise variant_error(n, f"dtype '{a['dtype']}'")
    if target is np.bool_:
        return x != 0
    if np.issubdtype(np.dtype(target), np.integer) and np.issubdtype(x.dtype, np.floating):
        return np.trunc(x).astype(target)
    return x.astype(target)
