"""The op registry and the argument coercions every op implementation uses.

Each implementation takes (a: {param: value}, node: Node) and returns one value or a tuple (one per
output). Float inputs arrive as float32 (fp16 values already rounded); outputs are cast to their
declared dtype by the caller.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from core.errors import UnsupportedOpError
from targets.coreml.mil.graph import where


OPS: dict[str, Callable[[dict, Any], Any]] = {}


def register(*names: str):
    def add(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return add


def int_of(v: Any) -> int:
    return int(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else int(v)


def ints_of(v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def bools_of(v: Any) -> list[bool]:
    return [bool(x) for x in np.asarray(v).reshape(-1)]


def bool_of(v: Any) -> bool:
    return bool(np.asarray(v).reshape(-1)[0])


def float_of(v: Any) -> float:
    return float(np.asarray(v).reshape(-1)[0])


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def f32(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def variant_error(n: Any, what: str) -> UnsupportedOpError:
    """A supported op type used in a form the interpreter does not implement."""
    return UnsupportedOpError(
        f"Core ML op '{n.type}' with {what} ({where(n)}) is not supported by the Linux interpreter"
    )


def torch_module():
    import torch

    return torch


def as_torch(x: np.ndarray):
    """A torch view of ``x`` (a copy if it is not contiguous); a read-only array (a weight mapped from the blob) is
    only read, so torch's warning about it is silenced."""
    torch = torch_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(x))
