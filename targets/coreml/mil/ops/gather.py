"""Gather and scatter ops."""

from __future__ import annotations

from typing import Any

import numpy as np

from targets.coreml.mil.ops.base import int_of, norm_axis, register, variant_error


# gather / scatter
def _wrap(idx: np.ndarray, size: int) -> np.ndarray:
    idx = np.asarray(idx).astype(np.int64)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        raise IndexError(f"index out of range [{-size}, {size}) (got {int(idx.min())}..{int(idx.max())})")
    return np.where(idx < 0, idx + size, idx)


@register("gather")
def _gather(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a.get("axis", 0)), x.ndim)
    batch_dims = int_of(a.get("batch_dims", 0))
    idx = _wrap(a["indices"], x.shape[axis])
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    batch_shape = x.shape[:batch_dims]
    nb = int(np.prod(batch_shape, dtype=np.int64))
    xb = x.reshape((nb,) + x.shape[batch_dims:])
    ib = idx.reshape((nb,) + idx.shape[batch_dims:])
    out = [np.take(xb[b], ib[b], axis=axis - batch_dims) for b in range(nb)]
    return np.stack(out).reshape(batch_shape + out[0].shape)


@register("gather_along_axis")
def _gather_along_axis(a, n):
    x = np.asarray(a["x"])
    axis = norm_axis(int_of(a.get("axis", 0)), x.ndim)
    return np.take_along_axis(x, _wrap(a["indices"], x.shape[axis]), axis=axis)


@register("gather_nd")
def _gather_nd(a, n):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    batch_dims = int_of(a.get("batch_dims", 0))
    if batch_dims:
        raise variant_error(n, "batch_dims")
    k = idx.shape[-1]
    cols = tuple(_wrap(idx[..., i], x.shape[i]) for i in range(k))
    return x[cols]


_SCATTER_MODES = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, where: tuple, updates: np.ndarray, mode: str, n: Any) -> np.ndarray:
    if mode not in _SCATTER_MODES:
        raise variant_error(n, f"mode '{mode}'")
    if mode == "update":
        out[where] = updates
    else:
        _SCATTER_MODES[mode].at(out, where, updates)
    return out


@register("scatter")
def _scatter(a, n):
    data = np.array(a["data"], copy=True)
    axis = norm_axis(int_of(a.get("axis", 0)), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    upd = np.asarray(a["updates"]).astype(data.dtype)
    moved = np.moveaxis(data, axis, 0)
    upd_moved = np.moveaxis(upd, axis, 0) if upd.ndim == data.ndim else upd
    if idx.ndim != 1:
        raise variant_error(n, f"{idx.ndim}-D indices")
    _scatter_into(moved, (idx,), upd_moved, str(a.get("mode", "add")), n)
    return data


@register("scatter_along_axis")
def _scatter_along_axis(a, n):
    data = np.array(a["data"], copy=True)
    axis = norm_axis(int_of(a.get("axis", 0)), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    upd = np.asarray(a["updates"]).astype(data.dtype)
    grids = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    return _scatter_into(data, tuple(grids), upd, str(a.get("mode", "add")), n)


@register("scatter_nd")
def _scatter_nd(a, n):
    data = np.array(a["data"], copy=True)
    idx = np.asarray(a["indices"]).astype(np.int64)
    k = idx.shape[-1]
    where = tuple(_wrap(idx[..., i], data.shape[i]) for i in range(k))
    upd = np.asarray(a["updates"]).astype(data.dtype)
    return _scatter_into(data, where, upd, str(a.get("mode", "add")), n)
