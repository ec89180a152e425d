"""Streaming export of the text decoder: the graph once without its weights, then each weight from the checkpoint.

Why: the whole-model path (targets/ort/graphs.py ``export_onnx``, then the recipe's quantizer on the loaded
model) holds the decoder's float weights several times over (the fp32 copy torch.onnx traces, the
transposed initializers its optimizer folds, the ModelProto the quantizer loads): ~33 GB per copy at
GLM-4.1V-9B widths. Here:

1. every >= 2-D parameter of the decoder becomes a zero-byte stand-in (a 0-stride expanded fp32 zero of the
   same shape) while torch.onnx exports the graph, unoptimized;
2. each ``Transpose`` of such a weight (how torch.onnx writes ``linear``) is folded by hand into an
   initializer named as the Transpose's output, the name onnxscript's optimizer gives it when it folds the
   real thing; the optimizer then runs as in the whole path and finds nothing large to fold;
3. the weights are taken out of the graph (a small protobuf is left) and streamed in node order: for each
   node reading weights, the weights come from the model (the checkpoint's memory-mapped bf16, upcast to
   fp32 one tensor at a time, the mapping's pages dropped after), a one-node model goes through the
   recipe's own quantizer (quantize_nbits / quantize_weights: the same code, so the same nodes, names and
   numbers as the whole path), and the quantized initializers are appended to ``<model>.onnx.data``.

Peak memory: the model as mapped, the graph protobuf, and one weight's fp32 copy plus its quantized form.
Models whose weights end up under :data:`~targets.ort.files.EXTERNAL_DATA_BYTES` get them inline, as
``save_model`` does. int8-static is not streamed (its calibration quantizes the whole loaded model).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from exporter.model.upcast import _BASE as _UPCAST_BASE  # Float32Linear -> nn.Linear, ... (read only)
from exporter.model.upcast import float_bytes
from targets.ort.attention import TRANSLATIONS
from targets.ort.files import EXTERNAL_DATA_BYTES
from targets.ort.fusions import fuse_decoder
from targets.ort.graphs import _graph, graph_io, name_by_module
from targets.ort.quiet import quiet

# the decoder is streamed when its weights, in fp32, would exceed this (the whole path below it, as always)
STREAM_ABOVE_BYTES = EXTERNAL_DATA_BYTES
# a weight larger than this in fp32 is quantized in slices along its output channels (one protobuf message
# holds at most 2 GiB; the 9B's embedding table and lm_head are 2.5 GB)
SPLIT_BYTES = 256 << 20
# the axis of the weight along which a node's outputs are independent: MatMul B [K, N], Gather table [V, H]
CHANNEL_AXIS = {"MatMul": 1, "Gather": 0}
# tensors of at least ALIGN bytes start at a multiple of ALIGN in the data file (onnxruntime can map them)
ALIGN = 4096

# a one-node model (ModelProto) -> (the model quantized, counts to sum over all nodes)
MiniQuantizer = Callable[[Any], tuple[Any, dict[str, int]]]


@dataclass(frozen=True)
class Source:
    """Where one streamed initializer comes from: a model tensor, transposed or not (as the graph reads it)."""

    tensor: torch.Tensor
    transpose: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """The initializer's shape (the tensor's, reversed when transposed)."""
        return tuple(self.tensor.shape[::-1]) if self.transpose else tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return 4 * self.tensor.numel()

    def array(self, axis: int = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The initializer's fp32 value, or its slice [start, stop) along ``axis`` (0 or 1): only that slice
        is upcast and copied (a bf16 mapped tensor is read here)."""
        t = self.tensor.detach()
        if stop is not None or start:
            cut = axis if not self.transpose else 1 - axis  # the tensor's axis under the initializer's
            t = t[start:stop] if cut == 0 else t[:, start:stop]
        t = t.float()
        if self.transpose:
            t = t.T
        return np.ascontiguousarray(t.numpy())

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The model tensors read (whose mapped pages are dropped after)."""
        return (self.tensor,)


@dataclass(frozen=True)
class Joined:
    """One streamed initializer made of several, side by side along ``axis`` (q, k and v as one packed
    projection: targets/ort/fusions.py ``pack_qkv``); each part is read only where a slice asks for it."""

    parts: tuple[Source, ...]
    axis: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        first = list(self.parts[0].shape)
        first[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(first)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for p in self.parts for t in p.tensors)

    def array(self, axis: int = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
        if axis != self.axis:
            return np.concatenate([p.array(axis, start, stop) for p in self.parts], axis=self.axis)
        stop = self.shape[axis] if stop is None else stop
        pieces, offset = [], 0
        for p in self.parts:
            width = p.shape[axis]
            lo, hi = max(start, offset), min(stop, offset + width)
            if hi > lo:
                pieces.append(p.array(axis, lo - offset, hi - offset))
            offset += width
        return np.concatenate(pieces, axis=axis)


@contextlib.contextmanager
def swapped_parameters(module: nn.Module, stand_in: Callable[[nn.Parameter], torch.Tensor | None]) -> Iterator[dict[str, torch.Tensor]]:
    """Replace parameters by ``stand_in(p)`` (None: keep ``p``) and upcasting modules by their torch base
    class for the duration; yields {parameter name in ``module``: original tensor} of those replaced.

    Tied parameters stay tied (one stand-in per tensor); everything is put back on exit, so the eager
    model (kept in the checkpoint's dtype, exporter/model/upcast.py) runs as before afterwards.
    """
    swaps: list[tuple[nn.Module, str, nn.Parameter]] = []
    stands: dict[int, nn.Parameter | None] = {}
    originals: dict[str, torch.Tensor] = {}
    classes = [(m, type(m)) for m in module.modules() if type(m) in _UPCAST_BASE]
    try:
        for prefix, m in module.named_modules(remove_duplicate=False):
            for name, p in list(m.named_parameters(recurse=False)):
                if id(p) not in stands:
                    new = stand_in(p)
                    stands[id(p)] = None if new is None else nn.Parameter(new, requires_grad=False)
                if stands[id(p)] is None:
                    continue
                originals[f"{prefix}.{name}" if prefix else name] = p.detach()
                swaps.append((m, name, p))
                setattr(m, name, stands[id(p)])
        for m, cls in classes:
            m.__class__ = _UPCAST_BASE[cls]
        yield originals
    finally:
        for m, cls in classes:
            m.__class__ = cls
        for m, name, p in reversed(swaps):
            setattr(m, name, p)


def _half_to_float(p: nn.Parameter) -> torch.Tensor | None:
    return p.detach().float() if p.dtype in (torch.bfloat16, torch.float16) else None


def _zero_stand_in(p: nn.Parameter) -> torch.Tensor | None:
    """>= 2-D weights: an fp32 zero expanded to the shape (no memory); vectors: fp32 values (small)."""
    if p.dim() >= 2:
        return torch.zeros((), dtype=torch.float32).expand(p.shape)
    return _half_to_float(p)


def float32_module(module: nn.Module):
    """The non-streamed methods (vision, embedding) traced in fp32: their half weights as fp32 copies for the
    duration of one export only (the eager model keeps its mapped bf16)."""
    return swapped_parameters(module, _half_to_float)


# --- 1-2: the graph without weights ---------------------------------------------------------------------


def _fold_weight_transposes(graph: Any, stand_ins: dict[str, torch.Tensor]) -> dict[str, Source]:
    """Fold Transpose(weight) into an initializer named as the Transpose output; {initializer: Source}.

    The folded initializers hold an ``ir.LazyTensor`` of the real values: nothing reads them here (the
    optimizer skips large constants; the weights are taken out before serialization), and anything that
    did would get the right numbers.
    """
    import onnx_ir as ir

    sources: dict[str, Source] = {}
    for name, tensor in stand_ins.items():
        value = graph.initializers.get(name)
        if value is None:
            continue  # not read by this graph (e.g. the embedding table in the decoder)
        users = list(value.uses())
        node = users[0].node if len(users) == 1 else None
        perm = node.attributes.get("perm") if node is not None and node.op_type == "Transpose" else None
        if node is not None and perm is not None and list(perm.as_ints()) == [1, 0] and tensor.dim() == 2:
            out = node.outputs[0]
            src = Source(tensor, transpose=True)
            lazy = _lazy(src, out.name)
            folded = ir.Value(name=out.name, shape=lazy.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=lazy)
            out.replace_all_uses_with(folded)
            graph.remove(node, safe=False)
            del graph.initializers[name]
            out.name = None
            graph.register_initializer(folded)
            sources[folded.name] = src
        else:
            src = Source(tensor, transpose=False)
            value.const_value = _lazy(src, name)
            sources[name] = src
    return sources


def _lazy(src: Source, name: str):
    import onnx_ir as ir

    shape = tuple(src.tensor.shape[::-1]) if src.transpose else tuple(src.tensor.shape)
    return ir.LazyTensor(lambda: ir.Tensor(src.array()), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def export_graph(components: Any, method: str, keep: Iterable[str] = ()) -> tuple[Any, dict[str, Source | Joined]]:
    """torch.onnx export of ``method`` with zero-byte weights: (the ModelProto without the streamed
    weights, {initializer name: Source}); the decoder fused as the whole path fuses it (``keep``: the
    --keep-float modules, whose q/k/v stay apart)."""
    import onnx_ir as ir

    module, args, shapes = _graph(components, method)
    inputs, outputs = graph_io(components.config)[method]
    with swapped_parameters(module, _zero_stand_in) as originals:
        stand_ins = _real_tensors(module, originals)
        try:
            with torch.no_grad(), quiet():
                program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                            output_names=outputs, optimize=False, verbose=False,
                                            custom_translation_table=TRANSLATIONS)
                sources = _fold_weight_transposes(program.model.graph, stand_ins)
                program.optimize()
        except Exception as e:  # torch.onnx raises its own error types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx export of {method} failed: {first}") from e
    name_by_module(program.model.graph, module, components.model)
    graph = program.model.graph
    for name in list(sources):
        if name not in graph.initializers:  # folded by the optimizer into a small constant (from its real values)
            del sources[name]
            continue
        del graph.initializers[name]  # the nodes keep reading the name; the streaming pass adds it back
    model = ir.serde.serialize_model(program.model)
    if method != "text_decoder":
        return model, sources
    model, joins = fuse_decoder(model, keep, {n: src.shape for n, src in sources.items()})
    joined: dict[str, Source | Joined] = dict(sources)
    for name, parts in joins.items():
        joined[name] = Joined(tuple(sources[p] for p in parts))
        for p in parts:
            del joined[p]
    return model, joined


def _real_tensors(module: nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name torch.onnx gives the initializer: the real tensor} for the stand-ins (names as in
    ``named_parameters``; tied names all map to the one tensor)."""
    return {name: t for name, t in originals.items() if t.dim() >= 2}


# --- 3: the weights, one at a time -----------------------------------------------------------------------


def drop_pages(t: torch.Tensor) -> None:
    """Hand a checkpoint tensor's whole pages back to the kernel (MADV_DONTNEED), as the checkpoint loader
    does after its checks: a page of the mapped shards read once otherwise stays in RSS.

    Only for tensors inside a private mapping of a ``.safetensors`` file (/proc/self/maps says which):
    nothing writes there, so a dropped page is read from the file again if used. On anonymous memory
    MADV_DONTNEED would zero the tensor, so anything else is left alone.
    """
    if not hasattr(mmap, "MADV_DONTNEED") or t.device.type != "cpu" or t.numel() == 0:
        return
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    span = _file_mapping(lo)
    if span is None:
        return
    page = mmap.PAGESIZE
    first, last = -(-max(lo, span[0]) // page) * page, min(hi, span[1]) // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _file_mapping(address: int) -> tuple[int, int] | None:
    """(start, end) of the private ``.safetensors`` file mapping holding ``address``, or None."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= address < end:
            private = len(parts) > 1 and parts[1].endswith("p")
            return (start, end) if private and len(parts) == 6 and parts[5].endswith(".safetensors") else None
    return None


def release_pages_after_use(model: nn.Module) -> int:
    """Drop the mapped checkpoint pages of each module's own weights after every forward; returns how many
    modules got the hook.

    The eager reference of the export check (and anything else run on the model afterwards) upcasts a
    mapped bf16 module per call (exporter/model/upcast.py); the pages it read would stay in RSS, and a 9B
    pass would leave all 20 GB of the shards resident. Dropped, they are re-read (from the page cache,
    usually) on the next call. Models with no file-mapped weights get no hook.
    """
    count = 0
    for m in model.modules():
        mapped = [p for p in m.parameters(recurse=False) if p.numel() and _file_mapping(p.data_ptr()) is not None]
        if mapped and not getattr(m, "_autoglm_releases_pages", False):
            m.register_forward_hook(_drop_after_forward)
            m._autoglm_releases_pages = True
            count += 1
    return count


def _drop_after_forward(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return  # traced (fake tensors, stand-ins): nothing mapped to drop
    for p in module.parameters(recurse=False):
        drop_pages(p)


_LIBC: Any = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


class _DataFile:
    """``<model>.onnx.data``, appended to one tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "wb")
        self.offset = 0

    def put(self, name: str, array: np.ndarray) -> Any:
        """Append ``array``'s bytes; returns the initializer (a TensorProto) that refers to them."""
        from onnx import TensorProto, helper

        data = np.ascontiguousarray(array)
        if data.nbytes >= ALIGN and self.offset % ALIGN:
            pad = ALIGN - self.offset % ALIGN
            self.fh.write(b"\0" * pad)
            self.offset += pad
        self.fh.write(memoryview(data.reshape(-1)).cast("B"))
        init = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(data.dtype))
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(data.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        self.offset += data.nbytes
        return init

    def close(self) -> None:
        self.fh.close()


def _inline(model: Any, data: Path) -> None:
    """Bring every external tensor back into the model and delete the data file (small models)."""
    from onnx import TensorProto

    with open(data, "rb") as fh:
        for init in model.graph.initializer:
            if init.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in init.external_data}
            fh.seek(int(info.get("offset", 0)))
            init.raw_data = fh.read(int(info["length"]))
            del init.external_data[:]
            init.data_location = TensorProto.DEFAULT
    data.unlink()


def _one_node_model(model: Any, node: Any, weights: dict[str, np.ndarray]) -> Any:
    """``node`` alone in a model with ``weights`` as initializers (what the recipe's quantizer takes)."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.input if n and n not in weights]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output if n]
    graph = helper.make_graph([node], "one_node", inputs, outputs, [numpy_helper.from_array(w, n) for n, w in weights.items()])
    mini = helper.make_model(graph, opset_imports=list(model.opset_import))
    mini.ir_version = model.ir_version
    return mini


def _detached(node: Any) -> Any:
    """A copy of ``node`` that owns its memory: protobuf keeps a whole message (here a one-node model with its
    fp32 weights) alive while any of its sub-messages is referenced."""
    from onnx import NodeProto

    copy = NodeProto()
    copy.CopyFrom(node)
    return copy


def _arrays(mini: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in mini.graph.initializer}


def _quantize_node(model: Any, node: Any, sources: dict[str, Source], quantize: MiniQuantizer):
    """(the quantized one-node model, its initializers as arrays, counts) for ``node`` and its weights.

    A weight over :data:`SPLIT_BYTES` (the 9B's embedding table and lm_head: 2.5 GB in fp32, past
    protobuf's 2 GiB per message) goes through the quantizer in slices along its output channels
    (:data:`CHANNEL_AXIS`), where every quantizer here is independent per channel (per-row int8, per-column
    int8 and 4-bit blocks): each output initializer is the slices' results joined along the axis that has
    the slice's size, and a MatMulNBits ``N`` attribute takes the whole width.
    """
    big = [n for n, src in sources.items() if src.nbytes > SPLIT_BYTES]
    if not big or len(sources) != 1 or node.op_type not in CHANNEL_AXIS or len(sources[big[0]].shape) != 2:
        # whole (a conv, a node reading several weights: none near protobuf's limit in these models)
        mini, counts = quantize(_one_node_model(model, node, {n: src.array() for n, src in sources.items()}))
        return mini, _arrays(mini), counts
    name, src = big[0], sources[big[0]]
    axis = CHANNEL_AXIS[node.op_type]
    width = src.shape[axis]
    step = -(-width // -(-src.nbytes // SPLIT_BYTES))
    first, counts = None, {}
    parts: dict[str, list[tuple[np.ndarray, int]]] = {}
    for start in range(0, width, step):
        chunk = src.array(axis, start, start + step)
        size = chunk.shape[axis]
        mini, got = quantize(_one_node_model(model, node, {name: chunk}))
        del chunk
        if first is None:
            first, counts = mini, got
        for key, array in _arrays(mini).items():
            parts.setdefault(key, []).append((array, size))
        del mini
    arrays = {key: _join(key, pieces, src.shape, axis) for key, pieces in parts.items()}
    for n in first.graph.node:
        for attr in n.attribute:
            if n.op_type == "MatMulNBits" and attr.name == "N":
                attr.i = width
    return first, arrays, counts


def _join(name: str, pieces: list[tuple[np.ndarray, int]], shape: tuple[int, ...] | None = None,
          axis: int | None = None) -> np.ndarray:
    """One initializer from its per-slice results: joined along the one axis sized as each slice, or, when
    every slice gave the same array (a constant such as an axes list), that array.

    Where several axes are sized as the slice (a square slice of q, k and v packed): a result laid out as the
    weight (``shape``, cut along ``axis``: an int8 weight, a float one) joins along ``axis``; any other (the
    quantizers' own layouts: MatMulNBits' ``[N, blocks, bytes]``, per-channel scales) along its first axis,
    where those layouts keep the output channels."""
    if all(a.shape == pieces[0][0].shape and np.array_equal(a, pieces[0][0]) for a, _ in pieces[1:]):
        if not any(size in a.shape for a, size in pieces):
            return pieces[0][0]
    axes = {tuple(i for i, d in enumerate(a.shape) if d == size) for a, size in pieces}
    if len(axes) != 1 or not next(iter(axes)):
        raise ExportError(f"streamed export: cannot tell along which axis to join the slices of {name}")
    candidates = next(iter(axes))
    if len(candidates) == 1:
        along = candidates[0]
    elif shape is not None and axis in candidates and all(
            a.shape == shape[:axis] + (size,) + shape[axis + 1:] for a, size in pieces):
        along = axis
    elif 0 in candidates:
        along = 0
    else:
        raise ExportError(f"streamed export: cannot tell along which axis to join the slices of {name}")
    return np.concatenate([a for a, _ in pieces], axis=along)


def stream_weights(model: Any, sources: dict[str, Source], quantize: MiniQuantizer, path: Path,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Add the streamed weights to ``model`` (the graph from :func:`export_graph`) in node order, each through
    ``quantize``, and save it at ``path`` (weights in ``<path>.data`` past EXTERNAL_DATA_BYTES). Returns the
    quantization counts summed over the nodes."""
    import onnx

    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            if name in sources:
                readers[name] = readers.get(name, 0) + 1
    shared = sorted(n for n, k in readers.items() if k > 1)
    if shared:
        raise ExportError(f"streamed export: weights read by several nodes are not streamed: {', '.join(shared[:3])}")
    data = Path(str(path) + ".data")
    out = _DataFile(data)
    nodes: list[Any] = []
    counts: dict[str, int] = {}
    opsets = {o.domain: o.version for o in model.opset_import}
    total, done = len(readers), 0
    try:
        for node in list(model.graph.node):
            names = [n for n in dict.fromkeys(node.input) if n in sources]
            if not names:
                nodes.append(node)
                continue
            mini, arrays, got = _quantize_node(model, node, {n: sources[n] for n in names}, quantize)
            for key, value in got.items():
                counts[key] = counts.get(key, 0) + value
            for name, array in arrays.items():
                model.graph.initializer.append(out.put(name, array))
            del arrays
            nodes.extend(_detached(n) for n in mini.graph.node)  # a kept sub-message would keep the weights alive
            for o in mini.opset_import:
                opsets.setdefault(o.domain, o.version)
            for n in names:
                for t in sources[n].tensors:
                    drop_pages(t)
            del mini
            done += len(names)
            if progress is not None:
                progress(done, total)
    finally:
        out.close()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    if out.offset <= EXTERNAL_DATA_BYTES:
        _inline(model, data)
    onnx.save_model(model, str(path))
    return counts


def export_streamed(components: Any, method: str, path: Path, quantize: MiniQuantizer,
                    progress: Callable[[int, int], None] | None = None, keep: Iterable[str] = ()) -> dict[str, Any]:
    """``method`` exported and quantized weight by weight to ``path`` (see the module docstring)."""
    import gc

    model, sources = export_graph(components, method, keep)
    gc.collect()
    return stream_weights(model, sources, quantize, path, progress)
