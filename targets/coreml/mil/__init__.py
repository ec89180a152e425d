"""A NumPy interpreter of Core ML ML programs (MIL), for parity on hosts without Core ML.

Core ML executes only on macOS. To measure a saved ``.mlpackage`` honestly on
Linux this module reads the package as Core ML would (``model.mlmodel``: the
MIL program proto; ``weights/weight.bin``: the MIL blob file; function states)
and executes the program op by op with NumPy. Every number it yields is
labelled :data:`PROVENANCE`.

fp16 emulation: a value whose type in the program is fp16 is held as a float32
array whose values are exactly representable in fp16; every op computes in
float32 from those and rounds its output to fp16 (``np.float16``) when the
program types that output fp16. ``cast`` converts dtypes. Program outputs and
states are returned in their declared dtypes (fp16 states stay ``np.float16``).

Load (``MILProgram.load``) parses the proto once, decodes every weight blob
once, folds every op whose inputs are all constant (``const``, ``constexpr_*``
and any pure op on constants) and compiles the remaining ops of each function
into a flat list of steps; an op type the interpreter does not implement
fails the load with :class:`~core.errors.UnsupportedOpError` naming it.
``run`` then walks the compiled steps only.

Usage::

    prog = MILProgram.load("text_decoder.mlpackage")
    state = prog.new_state("decode")          # {name: np.float16 zeros}
    out = prog.run({"embeds": ..., ...}, function="decode", state=state)

Op semantics follow coremltools' MIL op definitions (``coremltools/converters/
mil/mil/ops/defs/iOS15..iOS18``).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import ArtifactError, BadInputError, MissingRuntimeError, RuntimeFailure, UnsupportedOpError

PROVENANCE = "Core ML program emulated on Linux (NumPy MIL interpreter)"

__all__ = ["MILProgram", "PROVENANCE", "SUPPORTED_OPS"]


# --- dtypes -----------------------------------------------------------------------------------

# MIL_pb2.DataType numbers -> (name, numpy dtype of the *declared* value)
_PROTO_DTYPES: dict[int, tuple[str, Any]] = {
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
_SUB_BYTE_BITS = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}
_SIGNED_SUB_BYTE = {25}

# dtype strings used by cast / quantize / constexpr_cast
_DTYPE_BY_NAME = {
    "bool": np.bool_, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}

# blob file (MIL weight storage, version 2): 64-byte header {u32 count, u32 version, ...};
# per blob, at the offset the proto names, 64-byte metadata
# {u32 sentinel 0xDEADBEEF, u32 blob dtype, u64 size in bytes, u64 data offset, u64 padding bits, ...}
_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_DTYPES = {1: 10, 2: 11, 3: 31, 4: 21, 5: 13, 6: 22, 7: 32, 8: 25, 9: 37, 10: 36, 11: 35, 12: 39, 13: 38,
                14: 23, 15: 33}  # blob dtype -> proto dtype (bf16 = 13 is not a MIL tensor dtype we run)


def _round_fp16(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _as_f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)


def _internal(dtype_num: int) -> Callable[[Any], Any]:
    """How a value of this declared dtype is held while the program runs."""
    if dtype_num == 10:
        return _round_fp16
    if dtype_num == 11:
        return lambda x: np.asarray(x, np.float32)
    if dtype_num == 2:
        return lambda x: x
    np_dtype = _PROTO_DTYPES.get(dtype_num, (None, None))[1]
    if np_dtype is None:
        return lambda x: x
    if np_dtype is np.bool_:
        return lambda x: np.asarray(x).astype(np.bool_)
    return lambda x: np.asarray(x).astype(np_dtype)


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorType:
    dtype: int                      # proto DataType number
    shape: tuple                    # ints, None where unknown; () for a scalar
    is_state: bool = False

    @property
    def np_dtype(self) -> Any:
        return _PROTO_DTYPES.get(self.dtype, ("?", None))[1]

    @property
    def dtype_name(self) -> str:
        return _PROTO_DTYPES.get(self.dtype, (f"dtype#{self.dtype}", None))[0]


def _value_type(vt: Any) -> _TensorType | None:
    kind = vt.WhichOneof("type")
    if kind == "stateType":
        inner = _value_type(vt.stateType.wrappedType)
        return _TensorType(inner.dtype, inner.shape, True) if inner else None
    if kind != "tensorType":
        return None
    tt = vt.tensorType
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
    return _TensorType(int(tt.dataType), dims)


def _unpack_bits(raw: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    bits = np.unpackbits(raw.view(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    vals = (bits.astype(np.int32) << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        vals = np.where(vals >= (1 << (nbits - 1)), vals - (1 << nbits), vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


class _BlobFile:
    """One MIL blob storage file, memory-mapped; each blob decoded on request."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.size = path.stat().st_size
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read the weight file ({e.strerror or e})") from e
        if self.size < 64:
            raise ArtifactError(f"{path}: weight file is truncated ({self.size} bytes, no storage header)")
        count, version = struct.unpack_from("<II", self.data, 0)
        if version != 2:
            raise ArtifactError(f"{path}: unknown weight storage version {version} (expected 2)")

    def read(self, offset: int, dtype_num: int, shape: tuple) -> np.ndarray:
        where = f"{self.path} at offset {offset}"
        if offset + 64 > self.size:
            raise ArtifactError(f"{where}: blob metadata lies past the end of the file ({self.size} bytes); the file is truncated")
        sentinel, blob_dtype, nbytes, data_off = struct.unpack_from("<IIQQ", self.data, offset)
        if sentinel != _BLOB_SENTINEL:
            raise ArtifactError(f"{where}: bad blob sentinel 0x{sentinel:08x}; the weight file is corrupt")
        proto_dtype = _BLOB_DTYPES.get(blob_dtype)
        if proto_dtype != dtype_num:
            raise ArtifactError(
                f"{where}: blob holds dtype #{blob_dtype} but the program expects {_PROTO_DTYPES.get(dtype_num, ('?',))[0]}"
            )
        if data_off + nbytes > self.size:
            raise ArtifactError(
                f"{where}: blob data ({nbytes} bytes at {data_off}) lies past the end of the file ({self.size} bytes); the file is truncated"
            )
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = np.frombuffer(self.data, np.uint8, count=nbytes, offset=data_off)
        if dtype_num in _SUB_BYTE_BITS:
            nbits = _SUB_BYTE_BITS[dtype_num]
            if nbytes * 8 < count * nbits:
                raise ArtifactError(f"{where}: blob has {nbytes} bytes, too few for {count} {nbits}-bit values")
            return _unpack_bits(raw, nbits, count, dtype_num in _SIGNED_SUB_BYTE).reshape(shape)
        np_dtype = np.dtype(_PROTO_DTYPES[dtype_num][1])
        if nbytes != count * np_dtype.itemsize:
            raise ArtifactError(f"{where}: blob has {nbytes} bytes but the program expects {count} x {np_dtype.name}")
        return np.array(raw.view(np_dtype)).reshape(shape)


class _Weights:
    def __init__(self, weights_dir: Path):
        self.dir = weights_dir
        self.files: dict[str, _BlobFile] = {}
        self.cache: dict[tuple, np.ndarray] = {}

    def close(self) -> None:
        """Every blob is decoded (copied) at load: unmap the files."""
        for f in self.files.values():
            if isinstance(f.data, mmap.mmap):
                f.data.close()
        self.files.clear()
        self.cache.clear()

    def read(self, file_name: str, offset: int, dtype_num: int, shape: tuple) -> np.ndarray:
        key = (file_name, offset, dtype_num, shape)
        if key not in self.cache:
            name = file_name.split("/")[-1]
            if name not in self.files:
                path = self.dir / name
                if not path.is_file():
                    raise ArtifactError(f"{path}: weight file named by the program ({file_name}) is missing")
                self.files[name] = _BlobFile(path)
            # held in the run-time representation, shared by every function that names this blob
            self.cache[key] = _internal(dtype_num)(self.files[name].read(offset, dtype_num, shape))
        return self.cache[key]


def _decode_value(value: Any, weights: _Weights, where: str) -> Any:
    """A MIL_pb2.Value -> numpy array (internal representation), str, list or dict."""
    vtype = value.type.WhichOneof("type")
    kind = value.WhichOneof("value")
    if vtype == "tensorType":
        tt = _value_type(value.type)
        if any(d is None for d in tt.shape):
            raise ArtifactError(f"{where}: constant with an unknown dimension")
        if kind == "blobFileValue":
            return weights.read(value.blobFileValue.fileName, int(value.blobFileValue.offset), tt.dtype, tt.shape)
        tv = value.immediateValue.tensor
        which = tv.WhichOneof("value")
        if which == "bytes":
            raw = np.frombuffer(tv.bytes.values, np.uint8)
            count = int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1
            if tt.dtype in _SUB_BYTE_BITS:
                arr = _unpack_bits(raw, _SUB_BYTE_BITS[tt.dtype], count, tt.dtype in _SIGNED_SUB_BYTE)
            else:
                arr = raw.view(_PROTO_DTYPES[tt.dtype][1])
        elif which == "strings":
            vals = list(tv.strings.values)
            if tt.shape == ():
                return vals[0] if vals else ""
            return np.array(vals, dtype=object).reshape(tt.shape)
        elif which is None:
            arr = np.zeros(0, _PROTO_DTYPES[tt.dtype][1])
        else:
            arr = np.array(list(getattr(tv, which).values))
        if arr.size != (int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1):
            raise ArtifactError(f"{where}: constant has {arr.size} values for shape {list(tt.shape)}")
        arr = arr.reshape(tt.shape)
        return _internal(tt.dtype)(arr)
    if kind == "immediateValue":
        iv = value.immediateValue
        which = iv.WhichOneof("value")
        if which in ("list", "tuple"):
            return [_decode_value(v, weights, where) for v in getattr(iv, which).values]
        if which == "dictionary":
            return {_decode_value(e.key, weights, where): _decode_value(e.value, weights, where) for e in iv.dictionary.values}
    raise ArtifactError(f"{where}: cannot decode a constant of type {vtype}")


# --- op implementations -----------------------------------------------------------------------
# Each takes (a: {param: value}, node: _Node) and returns one value or a tuple (one per output).
# Float inputs arrive as float32 (fp16 values already rounded); outputs are cast to their
# declared dtype by the caller.

_OPS: dict[str, Callable[[dict, Any], Any]] = {}


def _op(*names: str):
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def _i(v: Any) -> int:
    return int(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else int(v)


def _ints(v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _bools(v: Any) -> list[bool]:
    return [bool(x) for x in np.asarray(v).reshape(-1)]


def _b(v: Any) -> bool:
    return bool(np.asarray(v).reshape(-1)[0])


def _f(v: Any) -> float:
    return float(np.asarray(v).reshape(-1)[0])


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _f32(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _variant(n: Any, what: str) -> UnsupportedOpError:
    """A supported op type used in a form the interpreter does not implement."""
    return UnsupportedOpError(
        f"Core ML op '{n.type}' with {what} ({_where(n)}) is not supported by the Linux interpreter"
    )


def _torch():
    import torch

    return torch


# elementwise binary
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    _op(_name)(lambda a, n, _fn=_fn: _fn(a["x"], a["y"]))


@_op("real_div")
def _real_div(a, n):
    x, y = a["x"], a["y"]
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.trunc(np.true_divide(x, y))  # int32: true division, truncated by the int32 output
    return np.true_divide(_f32(x), _f32(y))


@_op("floor_div")
def _floor_div(a, n):
    return np.floor_divide(a["x"], a["y"])


@_op("mod")
def _mod(a, n):
    return np.mod(a["x"], a["y"])


@_op("pow")
def _pow(a, n):
    x, y = a["x"], a["y"]
    if np.issubdtype(np.asarray(x).dtype, np.floating) or np.issubdtype(np.asarray(y).dtype, np.floating):
        return np.power(_f32(x), _f32(y))
    return np.power(x, y)


# elementwise unary
def _erf(x: np.ndarray) -> np.ndarray:
    torch = _torch()
    return torch.special.erf(torch.from_numpy(_f32(x))).numpy()


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "logical_not": np.logical_not, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh, "erf": _erf,
    "relu": lambda x: np.maximum(x, 0).astype(np.asarray(x).dtype),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f32(x))),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(np.float32(0), _f32(x)),
    "silu": lambda x: _f32(x) / (1.0 + np.exp(-_f32(x))),
    "identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    _op(_name)(lambda a, n, _fn=_fn: _fn(a["x"]))


@_op("rsqrt")
def _rsqrt(a, n):
    return 1.0 / np.sqrt(_f32(a["x"]) + np.float32(_f(a.get("epsilon", 1e-12))))


@_op("log")
def _log(a, n):
    return np.log(_f32(a["x"]) + np.float32(_f(a.get("epsilon", 1e-45))))


@_op("inverse")
def _inverse(a, n):
    return 1.0 / (_f32(a["x"]) + np.float32(_f(a.get("epsilon", 1e-4))))


@_op("clip")
def _clip(a, n):
    return np.clip(a["x"], _f(a["alpha"]), _f(a["beta"]))


@_op("threshold")
def _threshold(a, n):
    return np.maximum(a["x"], np.float32(_f(a["alpha"])))


@_op("leaky_relu")
def _leaky_relu(a, n):
    x = _f32(a["x"])
    return np.where(x >= 0, x, np.float32(_f(a.get("alpha", 0.01))) * x)


@_op("elu")
def _elu(a, n):
    x = _f32(a["x"])
    return np.where(x > 0, x, np.float32(_f(a.get("alpha", 1.0))) * (np.exp(x) - 1))


@_op("clamped_relu")
def _clamped_relu(a, n):
    x = _f32(a["x"])
    alpha, beta = np.float32(_f(a["alpha"])), np.float32(_f(a["beta"]))
    return np.minimum(np.where(x >= 0, x, alpha * x), beta)


@_op("linear_activation")
def _linear_activation(a, n):
    return np.float32(_f(a["alpha"])) * _f32(a["x"]) + np.float32(_f(a.get("beta", 0.0)))


@_op("scaled_tanh")
def _scaled_tanh(a, n):
    return np.float32(_f(a.get("alpha", 1.0))) * np.tanh(np.float32(_f(a.get("beta", 1.0))) * _f32(a["x"]))


@_op("sigmoid_hard")
def _sigmoid_hard(a, n):
    return np.clip(np.float32(_f(a.get("alpha", 0.2))) * _f32(a["x"]) + np.float32(_f(a.get("beta", 0.5))), 0, 1)


@_op("prelu")
def _prelu(a, n):
    x = _f32(a["x"])
    alpha = _f32(a["alpha"]).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@_op("gelu")
def _gelu(a, n):
    x = _f32(a["x"])
    mode = a.get("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-np.float32(1.702) * x))
    raise _variant(n, f"mode '{mode}'")


@_op("softmax")
def _softmax(a, n):
    x = _f32(a["x"])
    axis = _i(a.get("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# reductions
def _reduce_axes(a: dict, rank: int) -> tuple | None:
    axes = a.get("axes")
    if axes is None:
        return None
    return tuple(sorted(_axis(x, rank) for x in _ints(axes)))


def _reduction(fn):
    def run(a, n):
        x = np.asarray(a["x"])
        if np.issubdtype(x.dtype, np.floating):
            x = _f32(x)
        return fn(x, _reduce_axes(a, x.ndim), _b(a.get("keep_dims", False)))
    return run


_op("reduce_sum")(_reduction(lambda x, ax, k: np.sum(x, axis=ax, keepdims=k)))
_op("reduce_mean")(_reduction(lambda x, ax, k: np.mean(x, axis=ax, keepdims=k)))
_op("reduce_max")(_reduction(lambda x, ax, k: np.max(x, axis=ax, keepdims=k)))
_op("reduce_min")(_reduction(lambda x, ax, k: np.min(x, axis=ax, keepdims=k)))
_op("reduce_prod")(_reduction(lambda x, ax, k: np.prod(x, axis=ax, keepdims=k)))
_op("reduce_sum_square")(_reduction(lambda x, ax, k: np.sum(x * x, axis=ax, keepdims=k)))
_op("reduce_l1_norm")(_reduction(lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k)))
_op("reduce_l2_norm")(_reduction(lambda x, ax, k: np.sqrt(np.sum(x * x, axis=ax, keepdims=k))))
_op("reduce_log_sum")(_reduction(lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k))))


@_op("reduce_log_sum_exp")
def _reduce_lse(a, n):
    x = _f32(a["x"])
    ax = _reduce_axes(a, x.ndim)
    m = np.max(x, axis=ax, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return out if _b(a.get("keep_dims", False)) else np.squeeze(out, axis=ax)


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a.get("axis", -1)), x.ndim)
    idx = (np.argmax if n.type == "reduce_argmax" else np.argmin)(x, axis=axis)
    if _b(a.get("keep_dims", False)):
        idx = np.expand_dims(idx, axis)
    return idx.astype(np.int32)


# linear algebra
@_op("linear")
def _linear(a, n):
    out = np.matmul(_f32(a["x"]), _f32(a["weight"]).T)
    if a.get("bias") is not None:
        out = out + _f32(a["bias"])
    return out


@_op("matmul")
def _matmul(a, n):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if _b(a.get("transpose_x", False)) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if _b(a.get("transpose_y", False)) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(y.dtype, np.floating):
        x, y = _f32(x), _f32(y)
    return np.matmul(x, y)


@_op("einsum")
def _einsum(a, n):
    values = [_f32(v) for v in a["values"]]
    return np.einsum(str(a["equation"]), *values)


def _conv_pads(a: dict, spatial_in: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = a.get("pad_type", "valid")
    d = len(spatial_in)
    if pad_type == "valid":
        return [(0, 0)] * d
    if pad_type == "custom":
        p = _ints(a["pad"]) if a.get("pad") is not None else [0] * (2 * d)
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


@_op("conv")
def _conv(a, n):
    torch = _torch()
    x, w = _f32(a["x"]), _f32(a["weight"])
    d = x.ndim - 2
    strides = _ints(a["strides"]) if a.get("strides") is not None else [1] * d
    dilations = _ints(a["dilations"]) if a.get("dilations") is not None else [1] * d
    groups = _i(a.get("groups", 1))
    pads = _conv_pads(a, list(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    tx = torch.from_numpy(np.ascontiguousarray(x))
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        tx = torch.nn.functional.pad(tx, flat)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[d]
    bias = a.get("bias")
    out = conv(tx, torch.from_numpy(np.ascontiguousarray(w)), None if bias is None else torch.from_numpy(_f32(bias).copy()),
               stride=strides, dilation=dilations, groups=groups)
    return out.numpy()


@_op("conv_transpose")
def _conv_transpose(a, n):
    torch = _torch()
    x, w = _f32(a["x"]), _f32(a["weight"])
    d = x.ndim - 2
    strides = _ints(a["strides"]) if a.get("strides") is not None else [1] * d
    dilations = _ints(a["dilations"]) if a.get("dilations") is not None else [1] * d
    groups = _i(a.get("groups", 1))
    pad_type = a.get("pad_type", "valid")
    if pad_type not in ("valid", "custom"):
        raise _variant(n, f"pad_type '{pad_type}'")
    p = _ints(a["pad"]) if pad_type == "custom" and a.get("pad") is not None else [0] * (2 * d)
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
          3: torch.nn.functional.conv_transpose3d}[d]
    bias = a.get("bias")
    out = fn(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(w)),
             None if bias is None else torch.from_numpy(_f32(bias).copy()), stride=strides, dilation=dilations,
             groups=groups).numpy()
    sl = [slice(None), slice(None)] + [slice(p[2 * i], out.shape[2 + i] - p[2 * i + 1]) for i in range(d)]
    return out[tuple(sl)]


def _pool(a, n, kind: str):
    torch = _torch()
    x = _f32(a["x"])
    d = x.ndim - 2
    kernel = _ints(a["kernel_sizes"])
    strides = _ints(a["strides"]) if a.get("strides") is not None else [1] * d
    if _b(a.get("ceil_mode", False)):
        raise _variant(n, "ceil_mode")
    pads = _conv_pads(a, list(x.shape[2:]), kernel, strides, [1] * d)
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
        ones = torch.nn.functional.pad(ones, flat, value=0.0 if _b(a.get("exclude_padding_from_average", False)) else 1.0)
    total = fn(tx, kernel, strides)
    count = fn(ones, kernel, strides)
    return (total / count).numpy() if any(flat) else total.numpy()


_op("max_pool")(lambda a, n: _pool(a, n, "max"))
_op("avg_pool")(lambda a, n: _pool(a, n, "avg"))


# normalization
def _scale_shift(out: np.ndarray, a: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The optional per-channel ``gamma`` (scale) and ``beta`` (shift) of the normalisation ops."""
    if a.get("gamma") is not None:
        out = out * _f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        out = out + _f32(a["beta"]).reshape(shape)
    return out


def _param_shape(x: np.ndarray, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))


@_op("layer_norm")
def _layer_norm(a, n):
    x = _f32(a["x"])
    axes = _reduce_axes(a, x.ndim) or tuple(range(x.ndim))
    eps = np.float32(_f(a.get("epsilon", 1e-5)))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    shape = _param_shape(x, axes)
    return _scale_shift(out, a, shape)


@_op("batch_norm")
def _batch_norm(a, n):
    x = _f32(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = np.float32(_f(a.get("epsilon", 1e-5)))
    out = (x - _f32(a["mean"]).reshape(shape)) / np.sqrt(_f32(a["variance"]).reshape(shape) + eps)
    return _scale_shift(out, a, shape)


@_op("instance_norm")
def _instance_norm(a, n):
    x = _f32(a["x"])
    axes = tuple(range(2, x.ndim))
    eps = np.float32(_f(a.get("epsilon", 1e-5)))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return _scale_shift(out, a, shape)


@_op("l2_norm")
def _l2_norm(a, n):
    x = _f32(a["x"])  # normalised over the last three dims, leading dims are batch
    eps = np.float32(_f(a.get("epsilon", 1e-6)))
    return x / np.sqrt(np.sum(x * x, axis=(-3, -2, -1), keepdims=True) + eps)


@_op("scaled_dot_product_attention")
def _sdpa(a, n):
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(1.0 / math.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + _f32(mask)
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(e / np.sum(e, axis=-1, keepdims=True), v)


# tensor shape / layout
def _reshape_target(x: np.ndarray, shape: list[int]) -> list[int]:
    out = list(shape)
    rank = x.ndim
    for i, s in enumerate(shape):
        if s == 0:  # iOS17: a 0 copies the input dim aligned from the right, else 1
            j = rank - (len(shape) - i)
            out[i] = x.shape[j] if 0 <= j < rank else 1
    return out


@_op("reshape")
def _reshape(a, n):
    x = np.asarray(a["x"])
    return x.reshape(_reshape_target(x, _ints(a["shape"])))


@_op("reshape_like")
def _reshape_like(a, n):
    x = np.asarray(a["x"])
    ref_ts = a["ref_tensors"]
    begins, ends, masks = _ints(a["begins"]), _ints(a["ends"]), _bools(a["end_masks"])
    shape: list[int] = []
    for ref, b, e, m in zip(ref_ts, begins, ends, masks):
        s = list(np.asarray(ref).shape)
        shape += s[b:] if m else s[b:e]
    return x.reshape(shape)


@_op("transpose")
def _transpose(a, n):
    return np.transpose(a["x"], _ints(a["perm"]))


@_op("squeeze")
def _squeeze(a, n):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(ax, x.ndim) for ax in _ints(a["axes"])))


@_op("expand_dims")
def _expand_dims(a, n):
    x = np.asarray(a["x"])
    axes = _ints(a["axes"])
    out_rank = x.ndim + len(axes)
    for ax in sorted(_axis(ax, out_rank) for ax in axes):
        x = np.expand_dims(x, ax)
    return x


@_op("flatten2d")
def _flatten2d(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a.get("axis", 1)), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@_op("concat")
def _concat(a, n):
    values = [np.asarray(v) for v in a["values"]]
    axis = _axis(_i(a["axis"]), values[0].ndim)
    if _b(a.get("interleave", False)):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@_op("stack")
def _stack(a, n):
    values = [np.asarray(v) for v in a["values"]]
    return np.stack(values, axis=_axis(_i(a["axis"]), values[0].ndim + 1))


@_op("split")
def _split(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a["axis"]), x.ndim)
    if a.get("split_sizes") is not None:
        sizes = _ints(a["split_sizes"])
    else:
        k = _i(a["num_splits"])
        sizes = [-(-x.shape[axis] // k)] * k
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@_op("tile")
def _tile(a, n):
    return np.tile(a["x"], _ints(a["reps"]))


@_op("reverse")
def _reverse(a, n):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.flip(x)
    return np.flip(x, axis=tuple(_ints(a["axes"])))


def _slices(x: np.ndarray, a: dict) -> tuple[tuple, list[int]]:
    rank = x.ndim
    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a["stride"]) if a.get("stride") is not None else [1] * rank
    bmask = _bools(a["begin_mask"]) if a.get("begin_mask") is not None else [False] * rank
    emask = _bools(a["end_mask"]) if a.get("end_mask") is not None else [False] * rank
    smask = _bools(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [False] * rank
    sl, squeeze = [], []
    for i in range(rank):
        if smask[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            sl.append(slice(b, b + 1, 1))
            squeeze.append(i)
            continue
        sl.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return tuple(sl), squeeze


@_op("slice_by_index")
def _slice_by_index(a, n):
    x = np.asarray(a["x"])
    sl, squeeze = _slices(x, a)
    out = x[sl]
    return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


@_op("slice_update")
def _slice_update(a, n):
    x = np.array(a["x"], copy=True)
    sl, _ = _slices(x, a)
    target_shape = x[sl].shape
    x[sl] = np.asarray(a["update"]).reshape(target_shape)
    return x


@_op("slice_by_size")
def _slice_by_size(a, n):
    x = np.asarray(a["x"])
    begin, size = _ints(a["begin"]), _ints(a["size"])
    sl = []
    for i in range(x.ndim):
        b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
        sl.append(slice(b, None if size[i] == -1 else b + size[i]))
    return x[tuple(sl)]


@_op("pad")
def _pad(a, n):
    x = np.asarray(a["x"])
    p = _ints(a["pad"])
    k = len(p) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=_f(a.get("constant_val", 0.0)))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise _variant(n, f"mode '{mode}'")


@_op("shape")
def _shape(a, n):
    return np.array(np.asarray(a["x"]).shape, np.int32)


@_op("fill")
def _fill(a, n):
    return np.full(_ints(a["shape"]), np.asarray(a.get("value", 0.0)).reshape(()))


@_op("fill_like")
def _fill_like(a, n):
    return np.full(np.asarray(a["ref_tensor"]).shape, np.asarray(a.get("value", 0.0)).reshape(()))


@_op("range_1d")
def _range_1d(a, n):
    start, end, step = (np.asarray(a[k]).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)


@_op("band_part")
def _band_part(a, n):
    x = np.asarray(a["x"])
    lower, upper = _i(a.get("lower", -1)), _i(a.get("upper", -1))
    rows, cols = x.shape[-2], x.shape[-1]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = np.ones((rows, cols), bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return np.where(keep, x, np.zeros((), x.dtype))


@_op("cumsum")
def _cumsum(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a.get("axis", 0)), x.ndim)
    if _b(a.get("reverse", False)):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=np.float32 if np.issubdtype(x.dtype, np.floating) else x.dtype)
    if _b(a.get("exclusive", False)):
        out = out - x
    return np.flip(out, axis) if _b(a.get("reverse", False)) else out


@_op("topk")
def _topk(a, n):
    x = np.asarray(a["x"])
    k = _i(a.get("k", 1))
    axis = _axis(_i(a.get("axis", -1)), x.ndim)
    ascending = _b(a.get("ascending", False))
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    return values if len(n.outputs) == 1 else (values, idx.astype(np.int32))  # iOS16 return_indices=False


@_op("argsort")
def _argsort(a, n):
    x = np.asarray(a["x"])
    axis = _i(a.get("axis", -1))
    return np.argsort(x if _b(a.get("ascending", False)) else -x, axis=axis, kind="stable").astype(np.int32)


@_op("one_hot")
def _one_hot(a, n):
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = _i(a["one_hot_vector_size"])
    axis = _axis(_i(a.get("axis", -1)), idx.ndim + 1)
    on, off = np.asarray(a.get("on_value", 1)).reshape(()), np.asarray(a.get("off_value", 0)).reshape(())
    hot = np.expand_dims(idx, axis) == np.arange(depth).reshape([-1 if i == axis else 1 for i in range(idx.ndim + 1)])
    return np.where(hot, on, off)


@_op("non_zero")
def _non_zero(a, n):
    return np.transpose(np.nonzero(np.asarray(a["x"]))).astype(np.int32)


@_op("select")
def _select(a, n):
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


@_op("cast")
def _cast(a, n):
    x = np.asarray(a["x"])
    target = _DTYPE_BY_NAME.get(str(a["dtype"]))
    if target is None:
        raise _variant(n, f"dtype '{a['dtype']}'")
    if target is np.bool_:
        return x != 0
    if np.issubdtype(np.dtype(target), np.integer) and np.issubdtype(x.dtype, np.floating):
        return np.trunc(x).astype(target)
    return x.astype(target)


# gather / scatter
def _wrap(idx: np.ndarray, size: int) -> np.ndarray:
    idx = np.asarray(idx).astype(np.int64)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        raise IndexError(f"index out of range [{-size}, {size}) (got {int(idx.min())}..{int(idx.max())})")
    return np.where(idx < 0, idx + size, idx)


@_op("gather")
def _gather(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a.get("axis", 0)), x.ndim)
    batch_dims = _i(a.get("batch_dims", 0))
    idx = _wrap(a["indices"], x.shape[axis])
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    batch_shape = x.shape[:batch_dims]
    nb = int(np.prod(batch_shape, dtype=np.int64))
    xb = x.reshape((nb,) + x.shape[batch_dims:])
    ib = idx.reshape((nb,) + idx.shape[batch_dims:])
    out = [np.take(xb[b], ib[b], axis=axis - batch_dims) for b in range(nb)]
    return np.stack(out).reshape(batch_shape + out[0].shape)


@_op("gather_along_axis")
def _gather_along_axis(a, n):
    x = np.asarray(a["x"])
    axis = _axis(_i(a.get("axis", 0)), x.ndim)
    return np.take_along_axis(x, _wrap(a["indices"], x.shape[axis]), axis=axis)


@_op("gather_nd")
def _gather_nd(a, n):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    batch_dims = _i(a.get("batch_dims", 0))
    if batch_dims:
        raise _variant(n, "batch_dims")
    k = idx.shape[-1]
    cols = tuple(_wrap(idx[..., i], x.shape[i]) for i in range(k))
    return x[cols]


_SCATTER_MODES = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, where: tuple, updates: np.ndarray, mode: str, n: Any) -> np.ndarray:
    if mode not in _SCATTER_MODES:
        raise _variant(n, f"mode '{mode}'")
    if mode == "update":
        out[where] = updates
    else:
        _SCATTER_MODES[mode].at(out, where, updates)
    return out


@_op("scatter")
def _scatter(a, n):
    data = np.array(a["data"], copy=True)
    axis = _axis(_i(a.get("axis", 0)), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    upd = np.asarray(a["updates"]).astype(data.dtype)
    moved = np.moveaxis(data, axis, 0)
    upd_moved = np.moveaxis(upd, axis, 0) if upd.ndim == data.ndim else upd
    if idx.ndim != 1:
        raise _variant(n, f"{idx.ndim}-D indices")
    _scatter_into(moved, (idx,), upd_moved, str(a.get("mode", "add")), n)
    return data


@_op("scatter_along_axis")
def _scatter_along_axis(a, n):
    data = np.array(a["data"], copy=True)
    axis = _axis(_i(a.get("axis", 0)), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    upd = np.asarray(a["updates"]).astype(data.dtype)
    grids = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    return _scatter_into(data, tuple(grids), upd, str(a.get("mode", "add")), n)


@_op("scatter_nd")
def _scatter_nd(a, n):
    data = np.array(a["data"], copy=True)
    idx = np.asarray(a["indices"]).astype(np.int64)
    k = idx.shape[-1]
    where = tuple(_wrap(idx[..., i], data.shape[i]) for i in range(k))
    upd = np.asarray(a["updates"]).astype(data.dtype)
    return _scatter_into(data, where, upd, str(a.get("mode", "add")), n)


# quantization
def _per_axis(param: Any, x: np.ndarray, axis: Any) -> np.ndarray:
    p = np.asarray(param)
    if p.ndim == 0 or p.ndim == x.ndim:
        return p
    if axis is None:
        raise ValueError("a vector scale / zero_point needs an axis")
    ax = _axis(_i(axis), x.ndim)
    return p.reshape([-1 if i == ax else 1 for i in range(x.ndim)])


@_op("quantize")
def _quantize(a, n):
    x = _f32(a["input"])
    scale = _f32(_per_axis(a["scale"], x, a.get("axis")))
    target = np.dtype(_DTYPE_BY_NAME[str(a["output_dtype"])])
    q = np.round(x / scale)
    if a.get("zero_point") is not None:
        q = q + _per_axis(a["zero_point"], x, a.get("axis")).astype(np.float32)
    info = np.iinfo(target)
    return np.clip(q, info.min, info.max).astype(target)


@_op("dequantize")
def _dequantize(a, n):
    x = np.asarray(a["input"]).astype(np.float32)
    if a.get("zero_point") is not None:
        x = x - _per_axis(a["zero_point"], x, a.get("axis")).astype(np.float32)
    return x * _f32(_per_axis(a["scale"], x, a.get("axis")))


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a, n):
    data = np.asarray(a["data"]).astype(np.float32)
    scale = _f32(a["scale"])
    offset = a.get("offset")
    offset = None if offset is None else np.asarray(offset).astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if s != d:
            scale = np.repeat(scale, d // s, axis)
            if offset is not None:
                offset = np.repeat(offset, d // s, axis)
    if offset is not None:
        data = data - offset
    return scale * data


@_op("constexpr_affine_dequantize")
def _affine_dequantize(a, n):
    q = np.asarray(a["quantized_data"]).astype(np.float32)
    axis = a.get("axis", 0)
    zp = _per_axis(a["zero_point"], q, axis).astype(np.float32)
    return (q - zp) * _f32(_per_axis(a["scale"], q, axis))


@_op("constexpr_cast")
def _constexpr_cast(a, n):
    return np.asarray(a["source_val"]).astype(_DTYPE_BY_NAME[str(a["output_dtype"])])


@_op("constexpr_sparse_to_dense")
def _sparse_to_dense(a, n):
    if "shape" in a:
        raise _variant(n, "the iOS16 inputs (packed mask + shape)")
    mask = np.asarray(a["mask"])
    out = np.zeros(mask.shape, np.asarray(a["nonzero_data"]).dtype)
    out[mask != 0] = np.asarray(a["nonzero_data"])
    return out


@_op("constexpr_lut_to_dense")
def _lut_to_dense(a, n):
    if "shape" in a:
        raise _variant(n, "the iOS16 inputs (packed indices + shape)")
    idx = np.asarray(a["indices"]).astype(np.int64)
    lut = np.asarray(a["lut"])  # [*blocks (rank of indices), palette, vector size]
    if lut.shape[-1] != 1:
        raise _variant(n, "vector palettization (lut vector size > 1)")
    # each index reads the lut of its block: lut dims tile the index dims blockwise
    grid = np.indices(idx.shape, sparse=True)
    block = tuple(g // (size // nb) for g, size, nb in zip(grid, idx.shape, lut.shape[:-2]))
    return lut[block + (idx, 0)]


# states (values in env are the caller's state arrays; read copies, write updates in place)
@_op("read_state")
def _read_state(a, n):
    x = a["input"]
    return x if x.dtype == np.float16 else np.array(x, copy=True)  # fp16 is copied to float32 by the output cast


@_op("write_state")
def _write_state(a, n):
    a["input"][...] = np.asarray(a["data"]).astype(a["input"].dtype)
    return ()


@_op("coreml_update_state")
def _coreml_update_state(a, n):
    a["state"][...] = np.asarray(a["value"]).astype(a["state"].dtype)
    return np.asarray(a["value"])


_STATE_OPS = {"read_state", "write_state", "coreml_update_state"}
# ops that only move or pick values (input dtype = output dtype): an fp16 output needs no re-rounding
_MOVES_VALUES = {"reshape", "transpose", "squeeze", "expand_dims", "slice_by_index", "slice_by_size", "slice_update",
                 "concat", "stack", "split", "tile", "gather", "gather_along_axis", "gather_nd", "select", "read_state",
                 "identity", "reverse", "flatten2d", "maximum", "minimum", "relu"}
_TUPLE_PARAMS = {("concat", "values"), ("stack", "values"), ("einsum", "values"), ("reshape_like", "ref_tensors"),
                 ("while_loop", "loop_vars")}

SUPPORTED_OPS: frozenset[str] = frozenset(_OPS) | {"const", "cond", "while_loop"}


# --- compiled program -------------------------------------------------------------------------


@dataclass
class _Node:
    type: str
    args: list                      # [(param, kind, payload)]: kind "n" name, "v" value, "t" tuple of (kind, payload)
    outputs: list[str]
    out_types: list                 # _TensorType | None per output
    casts: list                     # callable per output
    function: str
    blocks: list = field(default_factory=list)   # nested _Block for cond / while_loop
    impl: Callable | None = None


@dataclass
class _Block:
    inputs: list[str]
    steps: list[_Node]
    outputs: list[str]


class _Function:
    def __init__(self, name: str):
        self.name = name
        self.inputs: dict[str, _TensorType] = {}
        self.states: dict[str, _TensorType] = {}
        self.outputs: dict[str, _TensorType | None] = {}
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        self.consts: dict[str, Any] = {}
        self.block: _Block | None = None


def _where(node: _Node) -> str:
    return f"in function '{node.function}', output '{node.outputs[0] if node.outputs else '?'}'"


def _unsupported(op_type: str, fn: str, out: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"Core ML op '{op_type}' (in function '{fn}', output '{out}') is not supported by the Linux interpreter"
    )


class MILProgram:
    """A saved Core ML ML program, ready to run with NumPy. See the module docstring."""

    def __init__(self, path: Path, spec: Any, functions: dict[str, _Function], default_function: str,
                 op_types: dict[str, set[str]]):
        self.path = path
        self.spec = spec
        self._functions = functions
        self.default_function = default_function
        self._op_types = op_types

    # -- loading --

    @classmethod
    def load(cls, path: str | Path) -> "MILProgram":
        path = Path(path)
        model_file, weights_dir = _locate(path)
        try:
            from coremltools.proto import Model_pb2
        except ImportError as e:
            raise MissingRuntimeError(f"reading {path} needs coremltools (its Core ML protobuf definitions): {e}") from e

        try:
            data = model_file.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{model_file}: cannot read ({e.strerror or e})") from e
        spec = Model_pb2.Model()
        try:
            spec.ParseFromString(data)
        except Exception as e:  # protobuf DecodeError
            raise ArtifactError(f"{model_file}: not a Core ML model file ({e})") from e
        if spec.WhichOneof("Type") != "mlProgram":
            raise ArtifactError(f"{model_file}: holds a '{spec.WhichOneof('Type')}' model, not an ML program")
        program = spec.mlProgram
        if not program.functions:
            raise ArtifactError(f"{model_file}: the ML program has no functions")
        op_types: dict[str, set[str]] = {}
        # fail on an unknown op before decoding any weight
        for fname, fn in program.functions.items():
            block = fn.block_specializations.get(fn.opset)
            if block is None:
                raise ArtifactError(f"{model_file}: function '{fname}' has no block for its opset '{fn.opset}'")
            _check_ops(block, fname, op_types.setdefault(fname, set()))
        weights = _Weights(weights_dir)
        ranges = _shape_ranges(spec)
        functions = {}
        try:
            for fname, fn in program.functions.items():
                functions[fname] = _compile_function(fname, fn, weights, ranges.get(fname, ranges.get("", {})))
        finally:
            weights.close()
        default = spec.description.defaultFunctionName or ("main" if "main" in functions else next(iter(functions)))
        if default not in functions:
            raise ArtifactError(f"{model_file}: default function '{default}' is not in the program")
        return cls(path, spec, functions, default, op_types)

    # -- introspection --

    @property
    def functions(self) -> list[str]:
        return list(self._functions)

    def _fn(self, function: str | None) -> _Function:
        name = function or self.default_function
        if name not in self._functions:
            raise BadInputError(f"{self.path}: no function '{name}' in this ML program (it has: {', '.join(self._functions)})")
        return self._functions[name]

    def inputs(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        """{name: (shape with None for a flexible dim, numpy dtype)}, states excluded."""
        return {k: (t.shape, np.dtype(t.np_dtype)) for k, t in self._fn(function).inputs.items()}

    def outputs(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        out = {}
        for k, t in self._fn(function).outputs.items():
            out[k] = (t.shape, np.dtype(t.np_dtype)) if t is not None else (None, None)
        return out

    def states(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        return {k: (t.shape, np.dtype(t.np_dtype)) for k, t in self._fn(function).states.items()}

    def new_state(self, function: str | None = None) -> dict[str, np.ndarray]:
        return {k: np.zeros(t.shape, t.np_dtype) for k, t in self._fn(function).states.items()}

    def op_types(self, function: str | None = None) -> set[str]:
        """Op type names used by the program: all functions, or the one named (nested blocks included)."""
        if function is not None:
            self._fn(function)
            return set(self._op_types[function])
        return set().union(*self._op_types.values())

    # -- running --

    def run(self, inputs: dict[str, np.ndarray], function: str | None = None,
            state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        fn = self._fn(function)
        env = dict(fn.consts)
        for name, t in fn.inputs.items():
            if name not in inputs:
                raise BadInputError(f"{self.path}: function '{fn.name}' needs input '{name}' (given: {', '.join(inputs) or 'none'})")
            env[name] = _feed(name, inputs[name], t, fn.ranges.get(name), fn.name)
        extra = set(inputs) - set(fn.inputs)
        if extra:
            raise BadInputError(f"{self.path}: function '{fn.name}' has no input(s) {', '.join(sorted(extra))}")
        if fn.states:
            if state is None:
                state = self.new_state(fn.name)
            for name, t in fn.states.items():
                arr = state.get(name)
                if arr is None:
                    raise BadInputError(f"{self.path}: state '{name}' of function '{fn.name}' was not given")
                if not isinstance(arr, np.ndarray) or tuple(arr.shape) != t.shape or arr.dtype != t.np_dtype:
                    raise BadInputError(
                        f"{self.path}: state '{name}' is {getattr(arr, 'dtype', type(arr).__name__)} {list(np.shape(arr))}, "
                        f"function '{fn.name}' expects {t.dtype_name} {list(t.shape)} (use new_state)"
                    )
                env[name] = arr
        _run_block(fn.block, env)
        out = {}
        for name, t in fn.outputs.items():
            value = env[name]
            if t is not None and t.dtype == 10:
                out[name] = value.astype(np.float16)
            else:  # a copy: an output may be a constant of the program
                out[name] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value
        return out


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        return path, path.parent / "weights"
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such Core ML package")
    model_file = None
    manifest = path / "Manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            root = info.get("rootModelIdentifier")
            entry = info.get("itemInfoEntries", {}).get(root, {})
            if entry.get("path"):
                model_file = path / "Data" / entry["path"]
        except (ValueError, AttributeError) as e:
            raise ArtifactError(f"{manifest}: unreadable package manifest ({e})") from e
    if model_file is None or not model_file.is_file():
        model_file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not model_file.is_file():
        raise ArtifactError(f"{path}: no model.mlmodel in this Core ML package")
    return model_file, model_file.parent / "weights"


def _check_ops(block: Any, fname: str, seen: set[str]) -> None:
    for op in block.operations:
        seen.add(op.type)
        if op.type not in SUPPORTED_OPS:
            raise _unsupported(op.type, fname, op.outputs[0].name if op.outputs else "?")
        for b in op.blocks:
            _check_ops(b, fname, seen)


def _shape_ranges(spec: Any) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """{function ('' for a single-function model): {input: [(lo, hi) per dim]}} from the model description."""
    def from_inputs(features) -> dict:
        out = {}
        for feat in features:
            if feat.type.WhichOneof("Type") != "multiArrayType":
                continue
            ma = feat.type.multiArrayType
            if ma.WhichOneof("ShapeFlexibility") == "shapeRange":
                out[feat.name] = [(int(r.lowerBound), int(r.upperBound)) for r in ma.shapeRange.sizeRanges]
        return out

    desc = spec.description
    ranges = {f.name: from_inputs(f.input) for f in desc.functions}
    ranges[""] = from_inputs(desc.input)
    return ranges


def _feed(name: str, value: Any, t: _TensorType, ranges: list | None, fname: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != len(t.shape):
        raise BadInputError(f"input '{name}' of function '{fname}' has rank {arr.ndim}, expected {len(t.shape)} ({_fmt(t.shape)})")
    for i, (got, want) in enumerate(zip(arr.shape, t.shape)):
        if want is not None and got != want:
            raise BadInputError(f"input '{name}' of function '{fname}' has shape {list(arr.shape)}, expected {_fmt(t.shape)}")
        if ranges and i < len(ranges):
            lo, hi = ranges[i]
            if got < lo or (hi >= 0 and got > hi):
                raise BadInputError(
                    f"input '{name}' of function '{fname}': dim {i} is {got}, outside the allowed range {lo}..{hi if hi >= 0 else 'inf'}"
                )
    if t.dtype in (10, 11) and not np.issubdtype(arr.dtype, np.floating):
        raise BadInputError(f"input '{name}' of function '{fname}' must be floating point, got {arr.dtype}")
    if t.dtype in (21, 22, 23, 24, 31, 32) and not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"input '{name}' of function '{fname}' must be integer, got {arr.dtype}")
    return _internal(t.dtype)(arr)


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _compile_function(fname: str, fn: Any, weights: _Weights, ranges: dict) -> _Function:
    f = _Function(fname)
    for inp in fn.inputs:
        t = _value_type(inp.type)
        if t is None:
            raise ArtifactError(f"function '{fname}': input '{inp.name}' is not a tensor or state")
        (f.states if t.is_state else f.inputs)[inp.name] = t
    f.ranges = ranges
    block = fn.block_specializations[fn.opset]
    f.block = _compile_block(block, fname, weights, f.consts)
    types = {}
    _collect_types(block, types)
    for inp in fn.inputs:
        types[inp.name] = _value_type(inp.type)
    f.outputs = {name: types.get(name) for name in block.outputs}
    return f


def _collect_types(block: Any, types: dict) -> None:
    for op in block.operations:
        for o in op.outputs:
            types[o.name] = _value_type(o.type)
        for b in op.blocks:
            _collect_types(b, types)


def _compile_block(block: Any, fname: str, weights: _Weights, consts: dict,
                   block_inputs: list[str] | None = None) -> _Block:
    """Fold const / constexpr / pure ops on constants into ``consts``; the rest become steps."""
    steps: list[_Node] = []
    for op in block.operations:
        out_types = [_value_type(o.type) for o in op.outputs]
        node = _Node(
            type=op.type,
            args=[],
            outputs=[o.name for o in op.outputs],
            out_types=out_types,
            casts=[_as_f32 if t is not None and t.dtype == 10 and op.type in _MOVES_VALUES
                   else _internal(t.dtype) if t is not None else (lambda x: x) for t in out_types],
            function=fname,
        )
        where = f"function '{fname}', op '{op.type}' -> '{node.outputs[0] if node.outputs else '?'}'"
        if op.type == "const":
            val = op.attributes.get("val")
            if val is None:
                raise ArtifactError(f"{where}: const without a value")
            consts[node.outputs[0]] = _decode_value(val, weights, where)
            continue
        for param, arg in op.inputs.items():
            bindings = []
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    bindings.append(("n", binding.name))
                else:
                    bindings.append(("v", _decode_value(binding.value, weights, where)))
            if len(bindings) == 1 and (op.type, param) not in _TUPLE_PARAMS:
                node.args.append((param,) + bindings[0])
            else:
                node.args.append((param, "t", bindings))
        node.impl = _OPS.get(op.type)
        if op.type in ("cond", "while_loop"):
            node.blocks = [
                _compile_block(b, fname, weights, consts, [i.name for i in b.inputs]) for b in op.blocks
            ]
            steps.append(node)
            continue
        foldable = op.type not in _STATE_OPS and all(_is_const(kind, payload, consts) for _, kind, payload in node.args)
        if foldable:
            try:
                _execute(node, consts)
            except (ArtifactError, UnsupportedOpError):
                raise
            except Exception as e:
                raise RuntimeFailure(f"Core ML op '{op.type}' ({_where(node)}) failed on its constant inputs: {e}") from e
            continue
        steps.append(node)
    return _Block(block_inputs or [], steps, list(block.outputs))


def _is_const(kind: str, payload: Any, consts: dict) -> bool:
    if kind == "n":
        return payload in consts
    if kind == "t":
        return all(_is_const(k, p, consts) for k, p in payload)
    return True


def _resolve(kind: str, payload: Any, env: dict) -> Any:
    if kind == "n":
        return env[payload]
    if kind == "v":
        return payload
    return [_resolve(k, p, env) for k, p in payload]


def _execute(node: _Node, env: dict) -> None:
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    result = node.impl(a, node)
    if len(node.outputs) == 1:
        result = (result,)
    elif not isinstance(result, tuple) or len(result) != len(node.outputs):
        raise RuntimeFailure(f"Core ML op '{node.type}' ({_where(node)}) gave {len(result)} results for {len(node.outputs)} outputs")
    for name, value, cast, t in zip(node.outputs, result, node.casts, node.out_types):
        value = cast(value)
        if t is not None and isinstance(value, np.ndarray):
            if value.ndim != len(t.shape) or any(w is not None and g != w for g, w in zip(value.shape, t.shape)):
                raise RuntimeFailure(
                    f"Core ML op '{node.type}' ({_where(node)}) produced shape {list(value.shape)}, the program declares {_fmt(t.shape)}"
                )
        env[name] = value


def _run_block(block: _Block, env: dict) -> None:
    for node in block.steps:
        try:
            if node.type == "cond":
                _run_cond(node, env)
            elif node.type == "while_loop":
                _run_while(node, env)
            else:
                _execute(node, env)
        except (BadInputError, RuntimeFailure, UnsupportedOpError):
            raise
        except Exception as e:
            raise RuntimeFailure(f"Core ML op '{node.type}' ({_where(node)}) failed: {type(e).__name__}: {e}") from e


def _run_cond(node: _Node, env: dict) -> None:
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    block = node.blocks[0] if _b(a["pred"]) else node.blocks[1]
    local = dict(env)
    _run_block(block, local)
    for name, src, cast in zip(node.outputs, block.outputs, node.casts):
        env[name] = cast(local[src])


def _run_while(node: _Node, env: dict) -> None:
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    values = list(a["loop_vars"])
    cond_block, body_block = node.blocks[0], node.blocks[1]
    for _ in range(1_000_000):
        local = dict(env)
        local.update(zip(cond_block.inputs, values))
        _run_block(cond_block, local)
        if not _b(local[cond_block.outputs[0]]):
            break
        local = dict(env)
        local.update(zip(body_block.inputs, values))
        _run_block(body_block, local)
        values = [local[o] for o in body_block.outputs]
    else:
        raise RuntimeFailure(f"Core ML op 'while_loop' ({_where(node)}) did not terminate")
    for name, value, cast in zip(node.outputs, values, node.casts):
        env[name] = cast(value)
