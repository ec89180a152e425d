"""Values of a saved ML program: tensor types, the MIL blob file (weights), and constants decoded
from the proto into their run-time representation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import drop_mapped_pages
from core.errors import ArtifactError
from targets.coreml.mil.dtypes import PROTO_DTYPES, SIGNED_SUB_BYTE, SUB_BYTE_BITS, internal


# blob file (MIL weight storage, version 2): 64-byte header {u32 count, u32 version, ...};
# per blob, at the offset the proto names, 64-byte metadata
# {u32 sentinel 0xDEADBEEF, u32 blob dtype, u64 size in bytes, u64 data offset, u64 padding bits, ...}
_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_DTYPES = {1: 10, 2: 11, 3: 31, 4: 21, 5: 13, 6: 22, 7: 32, 8: 25, 9: 37, 10: 36, 11: 35, 12: 39, 13: 38,
                14: 23, 15: 33}  # blob dtype -> proto dtype (bf16 = 13 is not a MIL tensor dtype we run)


@dataclass(frozen=True)
class TensorType:
    dtype: int                      # proto DataType number
    shape: tuple                    # ints, None where unknown; () for a scalar
    is_state: bool = False

    @property
    def np_dtype(self) -> Any:
        return PROTO_DTYPES.get(self.dtype, ("?", None))[1]

    @property
    def dtype_name(self) -> str:
        return PROTO_DTYPES.get(self.dtype, (f"dtype#{self.dtype}", None))[0]


def value_type(vt: Any) -> TensorType | None:
    kind = vt.WhichOneof("type")
    if kind == "stateType":
        inner = value_type(vt.stateType.wrappedType)
        return TensorType(inner.dtype, inner.shape, True) if inner else None
    if kind != "tensorType":
        return None
    tt = vt.tensorType
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
    return TensorType(int(tt.dataType), dims)


# a weight blob whose run-time form (float32) passes this many bytes is not decoded at load: it stays in the
# mapped file and is decoded again each time an op reads it (:class:`Lazy`), its pages handed back after
# each read, so a 9B program does not become 41 GB of float32 constants (at 64 MiB, the 4096 x 4096
# projections alone were still 5.6 GB of them, and the 9B's check was OOM-killed at 20.8 GiB)
LAZY_BYTES = 4 << 20


class Lazy:
    """A constant decoded (or computed from other constants) on each read, never held: see :data:`LAZY_BYTES`."""

    __slots__ = ("make",)

    def __init__(self, make: Any):
        self.make = make

    def value(self) -> Any:
        return self.make()


def unpack_bits(raw: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    if nbits == 4:  # two values per byte, the first in the low nibble (the general path's order, ~20x faster)
        raw = raw.view(np.uint8)[: (count + 1) // 2]
        vals = np.empty(raw.size * 2, np.uint8)
        np.bitwise_and(raw, 0x0F, out=vals[0::2])
        np.right_shift(raw, 4, out=vals[1::2])
        vals = vals[:count]
        if signed:
            return (vals.view(np.int8) ^ 8) - np.int8(8)  # sign-extend 4 bits
        return vals
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

    def read(self, offset: int, dtype_num: int, shape: tuple, check_only: bool = False,
             release: bool = False) -> np.ndarray | None:
        where = f"{self.path} at offset {offset}"
        if offset + 64 > self.size:
            raise ArtifactError(f"{where}: blob metadata lies past the end of the file ({self.size} bytes); the file is truncated")
        sentinel, blob_dtype, nbytes, data_off = struct.unpack_from("<IIQQ", self.data, offset)
        if sentinel != _BLOB_SENTINEL:
            raise ArtifactError(f"{where}: bad blob sentinel 0x{sentinel:08x}; the weight file is corrupt")
        proto_dtype = _BLOB_DTYPES.get(blob_dtype)
        if proto_dtype != dtype_num:
            raise ArtifactError(
                f"{where}: blob holds dtype #{blob_dtype} but the program expects {PROTO_DTYPES.get(dtype_num, ('?',))[0]}"
            )
        if data_off + nbytes > self.size:
            raise ArtifactError(
                f"{where}: blob data ({nbytes} bytes at {data_off}) lies past the end of the file ({self.size} bytes); the file is truncated"
            )
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = np.frombuffer(self.data, np.uint8, count=nbytes, offset=data_off)
        if dtype_num in SUB_BYTE_BITS:
            nbits = SUB_BYTE_BITS[dtype_num]
            if nbytes * 8 < count * nbits:
                raise ArtifactError(f"{where}: blob has {nbytes} bytes, too few for {count} {nbits}-bit values")
            if check_only:
                return None
            out = unpack_bits(raw, nbits, count, dtype_num in SIGNED_SUB_BYTE).reshape(shape)
        else:
            np_dtype = np.dtype(PROTO_DTYPES[dtype_num][1])
            if nbytes != count * np_dtype.itemsize:
                raise ArtifactError(f"{where}: blob has {nbytes} bytes but the program expects {count} x {np_dtype.name}")
            if check_only:
                return None
            out = np.array(raw.view(np_dtype)).reshape(shape)
        del raw
        if release and isinstance(self.data, mmap.mmap):  # ``out`` is a copy: the pages wait for the next read
            drop_mapped_pages(self.data, data_off, data_off + nbytes)
        return out


class Weights:
    def __init__(self, weights_dir: Path):
        self.dir = weights_dir
        self.files: dict[str, _BlobFile] = {}
        self.cache: dict[tuple, Any] = {}
        self.lazy_files: set[str] = set()

    def close(self) -> None:
        """Blobs decoded at load are copies: unmap the files no :class:`Lazy` blob reads from."""
        for name, f in self.files.items():
            if isinstance(f.data, mmap.mmap) and name not in self.lazy_files:
                f.data.close()
        self.files.clear()
        self.cache.clear()

    def read(self, file_name: str, offset: int, dtype_num: int, shape: tuple) -> Any:
        """The blob in its run-time representation, or a :class:`Lazy` that decodes it on each read when it
        is larger than :data:`LAZY_BYTES` (the blob is validated here either way)."""
        key = (file_name, offset, dtype_num, shape)
        if key not in self.cache:
            name = file_name.split("/")[-1]
            if name not in self.files:
                path = self.dir / name
                if not path.is_file():
                    raise ArtifactError(f"{path}: weight file named by the program ({file_name}) is missing")
                self.files[name] = _BlobFile(path)
            blob, cast = self.files[name], internal(dtype_num)
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if count * 4 > LAZY_BYTES:
                blob.read(offset, dtype_num, shape, check_only=True)
                self.lazy_files.add(name)
                self.cache[key] = Lazy(lambda: cast(blob.read(offset, dtype_num, shape, release=True)))
            else:
                # held in the run-time representation, shared by every function that names this blob
                self.cache[key] = cast(blob.read(offset, dtype_num, shape))
        return self.cache[key]


def decode_value(value: Any, weights: Weights, where: str) -> Any:
    """A MIL_pb2.Value -> numpy array (internal representation), str, list or dict."""
    vtype = value.type.WhichOneof("type")
    kind = value.WhichOneof("value")
    if vtype == "tensorType":
        tt = value_type(value.type)
        if any(d is None for d in tt.shape):
            raise ArtifactError(f"{where}: constant with an unknown dimension")
        if kind == "blobFileValue":
            return weights.read(value.blobFileValue.fileName, int(value.blobFileValue.offset), tt.dtype, tt.shape)
        tv = value.immediateValue.tensor
        which = tv.WhichOneof("value")
        if which == "bytes":
            raw = np.frombuffer(tv.bytes.values, np.uint8)
            count = int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1
            if tt.dtype in SUB_BYTE_BITS:
                arr = unpack_bits(raw, SUB_BYTE_BITS[tt.dtype], count, tt.dtype in SIGNED_SUB_BYTE)
            else:
                arr = raw.view(PROTO_DTYPES[tt.dtype][1])
        elif which == "strings":
            vals = list(tv.strings.values)
            if tt.shape == ():
                return vals[0] if vals else ""
            return np.array(vals, dtype=object).reshape(tt.shape)
        elif which is None:
            arr = np.zeros(0, PROTO_DTYPES[tt.dtype][1])
        else:
            arr = np.array(list(getattr(tv, which).values))
        if arr.size != (int(np.prod(tt.shape, dtype=np.int64)) if tt.shape else 1):
            raise ArtifactError(f"{where}: constant has {arr.size} values for shape {list(tt.shape)}")
        arr = arr.reshape(tt.shape)
        return internal(tt.dtype)(arr)
    if kind == "immediateValue":
        iv = value.immediateValue
        which = iv.WhichOneof("value")
        if which in ("list", "tuple"):
            return [decode_value(v, weights, where) for v in getattr(iv, which).values]
        if which == "dictionary":
            return {decode_value(e.key, weights, where): decode_value(e.value, weights, where) for e in iv.dictionary.values}
    raise ArtifactError(f"{where}: cannot decode a constant of type {vtype}")
