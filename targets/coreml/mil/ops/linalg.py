"""Linear algebra: linear, matmul, einsum, convolutions and pooling (torch for the convolutions)."""

from __future__ import annotations

import numpy as np

from targets.coreml.mil.ops.base import as_torch, bool_of, f32, int_of, ints_of, register, torch_module, variant_error


# linear algebra
@register("linear")
def _linear(a, n):
    # torch, as the weight's decompression and fp16 cast were: NumPy's BLAS threads would contend with torch's
    # thread pool still spinning after those (measured: GEMMs several times slower on two cores)
    out = (as_torch(f32(a["x"])) @ as_torch(f32(a["weight"])).T).numpy()
    if a.get("bias") is not None:
        out = out + f32(a["bias"])
    return out


@register("matmul")
def _matmul(a, n):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if bool_of(a.get("transpose_x", False)) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool_of(a.get("transpose_y", False)) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(y.dtype, np.floating):
        return (as_torch(f32(x)) @ as_torch(f32(y))).numpy()  # torch, as linear (the thread pools)
    return np.matmul(x, y)


@register("einsum")
def _einsum(a, n):
    values = [f32(v) for v in a["values"]]
    return np.einsum(str(a["equation"]), *values)


def conv_pads(a: dict, spatial_in: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = a.get("pad_type", "valid")
    d = len(spatial_in)
    if pad_type == "valid":
        return [(0, 0)] * d
    if pad_type == "custom":
        p = ints_of(a["pad"]) if a.get("pad") is not None else [0] * (2 * d)
        return [(p[2 * i], p[2 * i + 1]) for i in range(d)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, dil in zip(spatial_in, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * dil + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise ValueError(f"unknown pad_type '{pad_type}'")  # rejected by coremltools itself


def conv_geometry(a, d: int) -> tuple[list[int], list[int], int]:
    """A conv op's strides and dilations (default 1 on each of its ``d`` spatial axes) and groups."""
    strides = ints_of(a["strides"]) if a.get("strides") is not None else [1] * d
    dilations = ints_of(a["dilations"]) if a.get("dilations") is not None else [1] * d
    return strides, dilations, int_of(a.get("groups", 1))


@register("conv")
def _conv(a, n):
    torch = torch_module()
    x, w = f32(a["x"]), f32(a["weight"])
    d = x.ndim - 2
    strides, dilations, groups = conv_geometry(a, d)
    pads = conv_pads(a, list(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    tx = torch.from_numpy(np.ascontiguousarray(x))
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        tx = torch.nn.functional.pad(tx, flat)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[d]
    bias = a.get("bias")
    out = conv(tx, torch.from_numpy(np.ascontiguousarray(w)), None if bias is None else torch.from_numpy(f32(bias).copy()),
               stride=strides, dilation=dilations, groups=groups)
    return out.numpy()


@register("conv_transpose")
def _conv_transpose(a, n):
    torch = torch_module()
    x, w = f32(a["x"]), f32(a["weight"])
    d = x.ndim - 2
    strides, dilations, groups = conv_geometry(a, d)
    pad_type = a.get("pad_type", "valid")
    if pad_type not in ("valid", "custom"):
        raise variant_error(n, f"pad_type '{pad_type}'")
    p = ints_of(a["pad"]) if pad_type == "custom" and a.get("pad") is not None else [0] * (2 * d)
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
          3: torch.nn.functional.conv_transpose3d}[d]
    bias = a.get("bias")
    out = fn(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(w)),
             None if bias is None else torch.from_numpy(f32(bias).copy()), stride=strides, dilation=dilations,
             groups=groups).numpy()
    sl = [slice(None), slice(None)] + [slice(p[2 * i], out.shape[2 + i] - p[2 * i + 1]) for i in range(d)]
    return out[tuple(sl)]


def _pool(a, n, kind: str):
    torch = torch_module()
    x = f32(a["x"])
    d = x.ndim - 2
    kernel = ints_of(a["kernel_sizes"])
    strides = ints_of(a["strides"]) if a.get("strides") is not None else [1] * d
    if bool_of(a.get("ceil_mode", False)):
        raise variant_error(n, "ceil_mode")
    pads = conv_pads(a, list(x.shape[2:]), kernel, strides, [1] * d)
    flat = [p for pair in reversed(pads) for p in pair]
    tx = torch.from_numpy(np.ascontiguousarray(x))
    if kind == "max":
        if any(flat):
            tx = torch.nn.functional.pad(tx, flat, value=-float("inf"))
        fn = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[d]
        return fn(tx, kernel, strides).numpy()
    fn = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}[d]
    ones = torch.ones((1, 1) + tuple(x.shape[2:]))
    if any(flat):
        tx = torch.nn.functional.pad(tx, flat)
        ones = torch.nn.functional.pad(ones, flat, value=0.0 if bool_of(a.get("exclude_padding_from_average", False)) else 1.0)
    total = fn(tx, kernel, strides)
    count = fn(ones, kernel, strides)
    return (total / count).numpy() if any(flat) else total.numpy()


register("max_pool")(lambda a, n: _pool(a, n, "max"))
register("avg_pool")(lambda a, n: _pool(a, n, "avg"))
