"""MIL dtypes: the proto's DataType numbers, and how a value of each declared dtype is held while a
program runs (fp16 as float32 arrays of fp16-representable values).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


# MIL_pb2.DataType numbers -> (name, numpy dtype of the *declared* value)
PROTO_DTYPES: dict[int, tuple[str, Any]] = {
    1: ("bool", np.bool_),
    2: ("string", object),
    10: ("fp16", np.float16),
    11: ("fp32", np.float32),
    12: ("fp64", np.float64),
    21: ("int8", np.int8),
    22: ("int16", np.int16),
    23: ("int32", np.int32),
    24: ("int64", np.int64),
    25: ("int4", np.int8),
    31: ("uint8", np.uint8),
    32: ("uint16", np.uint16),
    33: ("uint32", np.uint32),
    34: ("uint64", np.uint64),
    35: ("uint4", np.uint8),
    36: ("uint2", np.uint8),
    37: ("uint1", np.uint8),
    38: ("uint6", np.uint8),
    39: ("uint3", np.uint8),
}
SUB_BYTE_BITS = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}
SIGNED_SUB_BYTE = {25}

# dtype strings used by cast / quantize / constexpr_cast
DTYPE_BY_NAME = {
    "bool": np.bool_, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}


# Arrays at least this large (a weight, mostly) are converted by torch: NumPy's float16 casts are scalar loops, five
# times slower than torch's vectorised ones on two threads, and at 9B every decompressed weight is cast at each call.
# Both round to nearest even (overflow to inf, NaN kept, subnormals kept), so the values are the same.
TORCH_CAST_MIN = 1 << 16


def round_fp16(x: Any) -> np.ndarray:
    """Float32 values rounded to fp16 (how an fp16 value is held); a float16 array is widened exactly."""
    a = np.asarray(x)
    if a.size >= TORCH_CAST_MIN and a.dtype in (np.float32, np.float16):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))
        if t.dtype == torch.float32:
            t = t.to(torch.float16)
        return t.to(torch.float32).numpy()
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def as_f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)


def internal(dtype_num: int) -> Callable[[Any], Any]:
    """How a value of this declared dtype is held while the program runs."""
    if dtype_num == 10:
        return round_fp16
    if dtype_num == 11:
        return lambda x: np.asarray(x, np.float32)
    if dtype_num == 2:
        return lambda x: x
    np_dtype = PROTO_DTYPES.get(dtype_num, (None, None))[1]
    if np_dtype is None:
        return lambda x: x
    if np_dtype is np.bool_:
        return lambda x: np.asarray(x).astype(np.bool_)
    return lambda x: np.asarray(x).astype(np_dtype)
