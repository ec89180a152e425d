"""Streaming export of the ExecuTorch text decoder: each run of layers quantized, exported and lowered to
XNNPACK on its own, from a float32 copy of just its weights, then the lowered pieces composed into one method.

Why: the whole-method path quantizes a copy of the whole decoder, exports it and lowers it in one
``to_edge_transform_and_lower``. At GLM-4.1V-9B widths that holds the decoder's float32 copy (33 GB), then its
int8-stored quantized weights (torchao keeps 4-bit values one per byte: 8.8 GB) beside the packed bytes XNNPACK
makes of them (~5 GB), before the program is emitted.

Here the decoder is cut at its attention calls, the ops XNNPACK does not take (ExecuTorch's
``llama::update_cache`` and ``llama::custom_sdpa``), so each piece is pure XNNPACK work:

* piece 0: the embeddings to layer 0's rotated q, k, v;
* piece i (1 .. L-1): layer i-1's residual stream and SDPA output through its o_proj and MLP (with their
  residuals) to layer i's q, k, v, and the residual stream;
* piece L: the last layer's o_proj and MLP, the final norm and the lm_head: logits.

Each piece is copied to float32 from the checkpoint's (mapped, bf16) weights, quantized as the recipe says
(the same torchao call as the whole path), exported, and lowered to exactly one XNNPACK delegate. Its weights
then live only as the delegate's packed bytes (the named data the program will store); the piece's program
kept inside the lowered module for tracing keeps shapes only (its tensors become zero-byte stand-ins), and the
checkpoint pages the piece read are handed back. :class:`StreamedTextModel` calls the lowered pieces in order
with the cache writes and SDPA between them, on the same caches and M-RoPE tables as
:class:`~targets.executorch.llm_decoder.EtTextModel`, so the method's contract and the stock runner's view of it
are unchanged; it is exported (ExecuTorch's composite-lowering flow: a module calling lowered modules) and
emitted with the other methods.

The packed weights of each piece are moved to files in the build's work directory as it is lowered
(ExecuTorch's serializer copies file-backed data into the .pte in chunks). Peak memory: one piece's float32
copy and its quantized and packed forms, beside the other methods.
"""

from __future__ import annotations

import copy
import gc
import operator
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.export import Dim

from core.artifact import trim_heap
from core.errors import ExportError
from exporter.model.upcast import release_pages, typed_copy
from targets.executorch.llm_decoder import EtLayer, EtTextModel, register_custom_ops, rms_norm, split_linear

# the decoder is streamed when its float32 weights would exceed this (the whole-method path below it)
STREAM_ABOVE_BYTES = 2 << 30
# packed weights of a lowered piece at least this large wait on disk until the program is written
SPILL_BYTES = 1 << 20
# a constant a piece's delegate reads as an input (norm weights, scalars) is kept beside it up to this size;
# anything larger would be a weight XNNPACK did not pack, held unquantized: refused
CONSTANT_INPUT_BYTES = 1 << 20


class FirstPiece(nn.Module):
    """embeds -> layer 0's q, k, v."""

    def __init__(self, layer: EtLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.layer.pre(x, cos, sin)


class MiddlePiece(nn.Module):
    """Layer i-1's stream and SDPA output -> layer i's input stream and its q, k, v."""

    def __init__(self, prev: EtLayer, layer: EtLayer):
        super().__init__()
        self.prev, self.layer = prev, layer

    def forward(self, x: torch.Tensor, attended: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = self.prev.post(x, attended)
        q, k, v = self.layer.pre(x, cos, sin)
        return x, q, k, v


# a linear of a piece whose float32 weight passes this is quantized and packed in row slices (RowSlices)
SLICE_BYTES = 512 << 20


class RowSlices(nn.Module):
    """A wide linear (the 9B's 151552 x 4096 lm_head: 2.5 GB in float32) as linears over slices of its output
    rows, their outputs concatenated. The slices are views of the source weight (no copy); the piece's float32
    copy is then made, and quantized by torchao, one slice at a time: the whole lm_head's quantization made
    temporaries of about twice its float32 bytes (the last piece of a 2-layer cut of the 9B peaked at 9.5 GiB
    from 2.0 GiB resident). Per output row the weights, their scales (per row or per group along the input) and the dynamic
    activation scales are those of the whole linear, so the numbers are unchanged."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        rows = -(-linear.out_features // parts)
        self.parts = nn.ModuleList(split_linear(linear, lo, min(lo + rows, linear.out_features))
                                   for lo in range(0, linear.out_features, rows))

    @staticmethod
    def of(linear: nn.Module) -> nn.Module:
        """``linear`` itself, or its RowSlices when its float32 weight passes :data:`SLICE_BYTES`."""
        if not isinstance(linear, nn.Linear) or linear.weight.numel() * 4 <= SLICE_BYTES:
            return linear
        return RowSlices(linear, -(-linear.weight.numel() * 4 // SLICE_BYTES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class LastPiece(nn.Module):
    """The last layer's stream and SDPA output -> logits (a wide lm_head in :class:`RowSlices`)."""

    def __init__(self, prev: EtLayer, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.prev, self.norm, self.lm_head = prev, norm, RowSlices.of(lm_head)

    def forward(self, x: torch.Tensor, attended: torch.Tensor):
        return self.lm_head(rms_norm(self.norm, self.prev.post(x, attended)))


class LoweredPiece(nn.Module):
    """A lowered piece called with the piece's own inputs and giving its own outputs, in its order.

    The delegate's arguments are the partitioner's: ``args`` lists, per argument, the index of the piece
    input it is (an int) or the name of a constant of the piece the delegate reads as an input rather than
    packing it (a str: an RMSNorm weight, a scalar), kept here as a buffer.
    """

    def __init__(self, lowered: nn.Module, args: list[int | str], outputs: list[int], constants: dict[str, torch.Tensor]):
        super().__init__()
        self.lowered, self.args, self.outputs = lowered, args, outputs
        for name, value in constants.items():
            self.register_buffer(name, value, persistent=False)

    def forward(self, *inputs: torch.Tensor):
        out = self.lowered(*(inputs[a] if isinstance(a, int) else getattr(self, a) for a in self.args))
        got = [out[i] for i in self.outputs]
        return got[0] if len(got) == 1 else tuple(got)


class StreamedTextModel(nn.Module):
    """EtTextModel's ``(embeds, position_ids, cache_position) -> logits`` over lowered pieces.

    ``model`` gives the caches, the M-RoPE tables and the shapes; its layers' weights are not held here.
    """

    def __init__(self, model: EtTextModel, pieces: list[LoweredPiece]):
        super().__init__()
        self.max_seq_len = model.max_seq_len
        self.rope_tables = model.rope_tables
        # each layer's attention without its projections: its caches and EtAttention.attend (the custom ops)
        self.attention = nn.ModuleList(_caches_only(layer.self_attn) for layer in model.layers)
        self.pieces = nn.ModuleList(pieces)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start < self.max_seq_len)
        cos, sin = self.rope_tables(position_ids)
        q, k, v = self.pieces[0](embeds, cos, sin)
        x = embeds
        last = len(self.attention) - 1
        for i in range(last):
            x, q, k, v = self.pieces[i + 1](x, self.attention[i].attend(q, k, v, start), cos, sin)
        return self.pieces[-1](x, self.attention[last].attend(q, k, v, start))


def _part(layer: EtLayer, own: tuple[str, ...], attention: tuple[str, ...]) -> EtLayer:
    """A shallow copy of ``layer`` holding only its children named in ``own`` and, of its self_attn, the
    children in ``attention`` (no caches): what its ``pre`` or its ``post`` reads, so a piece copies,
    quantizes and packs no weight it does not use. The layer itself is not changed."""
    attn = copy.copy(layer.self_attn)
    attn._modules = OrderedDict((n, m) for n, m in layer.self_attn._modules.items() if n in attention)
    attn._buffers = OrderedDict()
    part = copy.copy(layer)
    part._modules = OrderedDict((n, m) for n, m in layer._modules.items() if n in own)
    part._modules["self_attn"] = attn
    return part


def _caches_only(attn: nn.Module) -> nn.Module:
    """A shallow copy of an EtAttention with its caches and no children (no projection weights)."""
    part = copy.copy(attn)
    part._modules = OrderedDict()
    return part


def _pre(layer: EtLayer) -> EtLayer:
    return _part(layer, ("input_layernorm",), ("q_proj", "k_proj", "v_proj", "rotation"))


def _post(layer: EtLayer) -> EtLayer:
    return _part(layer, ("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm", "mlp"), ("o_proj",))


def pieces_of(model: EtTextModel) -> list[nn.Module]:
    """The decoder's pieces (module docstring), sharing the model's weights."""
    layers = list(model.layers)
    if not layers:
        raise ExportError("a text decoder without layers cannot be streamed")
    out: list[nn.Module] = [FirstPiece(_pre(layers[0]))]
    out += [MiddlePiece(_post(layers[i - 1]), _pre(layers[i])) for i in range(1, len(layers))]
    out.append(LastPiece(_post(layers[-1]), model.norm, model.lm_head))
    return out


def piece_inputs(piece: nn.Module, model: EtTextModel, seq_len: int = 4):
    """(example inputs, dynamic shapes) of a piece: the stream [1, T, H], SDPA output [1, T, heads, D],
    cos / sin [T, 1, D]; T dynamic up to max_seq_len."""
    attn = model.layers[0].self_attn
    hidden = attn.q_proj.in_features
    t = Dim("seq_len", min=1, max=model.max_seq_len)
    x = torch.zeros(1, seq_len, hidden)
    attended = torch.zeros(1, seq_len, attn.heads, attn.head_dim)
    cos = torch.zeros(seq_len, 1, attn.head_dim)
    if isinstance(piece, FirstPiece):
        return (x, cos, cos.clone()), ({1: t}, {0: t}, {0: t})
    if isinstance(piece, MiddlePiece):
        return (x, attended, cos, cos.clone()), ({1: t}, {1: t}, {0: t}, {0: t})
    return (x, attended), ({1: t}, {1: t})


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A zero-byte tensor of ``t``'s shape and dtype (a 0-stride expansion of one zero)."""
    s = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return nn.Parameter(s, requires_grad=False) if isinstance(t, nn.Parameter) else s


def strip_constants(program: Any) -> None:
    """Replace every tensor of an ExportedProgram (its state_dict and constants) by a zero-byte stand-in:
    the lowered module keeps the piece's program for tracing (shapes) only; its values are in the delegate."""
    for table in (program.state_dict, program.constants):
        for name, t in list(table.items()):
            if isinstance(t, torch.Tensor):
                table[name] = _stand_in(t)


# quantize(piece, its float32 copy) quantizes the copy in place and returns its report
PieceQuantizer = Callable[[nn.Module, nn.Module], dict[str, Any]]


def spill(lowered: nn.Module, stem: Path) -> None:
    """Move the packed weights of a lowered module (the named data XNNPACK handed the program) to files
    ``stem.N.bin``: ExecuTorch's serializer takes file-backed buffers (``FileBackedData``) and copies them
    into the .pte in chunks, so the packed model never has to be in memory whole."""
    from executorch.exir._serialize._cord import FileBackedData

    store = lowered.named_data_store_output
    if store is None:
        return
    for i, data in enumerate(store.buffers):
        if isinstance(data, (bytes, bytearray)) and len(data) >= SPILL_BYTES:
            path = stem.with_name(f"{stem.name}.{i}.bin")
            path.write_bytes(data)
            store.buffers[i] = FileBackedData(str(path))


def lower_piece(piece: nn.Module, args: tuple, dynamic_shapes: tuple, quantize: PieceQuantizer,
                name: str, spill_dir: Path | None = None) -> tuple[LoweredPiece, dict[str, Any]]:
    """``piece`` copied to float32, quantized by ``quantize``, exported and lowered to one XNNPACK
    delegate; (the lowered piece, the quantization report). With ``spill_dir``, its packed weights wait
    there as files (:func:`spill`)."""
    from executorch.exir.delegate import executorch_call_delegate

    from targets.executorch.lower import lower

    module = typed_copy(piece, torch.float32)
    release_pages(piece)
    report = quantize(piece, module)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    del module
    edge = lower(program)
    del program
    graph = edge.exported_program().graph_module
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    user_inputs = edge.exported_program().graph_signature.user_inputs
    inputs = [n for n in placeholders if n.name in user_inputs]
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is executorch_call_delegate]
    left = [str(n.target) for n in graph.graph.nodes
            if n.op == "call_function" and n.target is not executorch_call_delegate and n.target is not operator.getitem]
    if len(calls) != 1 or left:
        raise ExportError(f"streamed decoder {name}: expected one XNNPACK delegate and nothing else, got "
                          f"{len(calls)} delegate(s) and {', '.join(left) or 'no other ops'}")
    call = calls[0]
    ep = edge.exported_program()
    sig = ep.graph_signature
    stored = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    args: list[int | str] = []
    constants: dict[str, torch.Tensor] = {}
    for a in call.args[1:]:
        if a in inputs:
            args.append(inputs.index(a))
            continue
        key = stored.get(a.name)
        value = ep.state_dict.get(key, ep.constants.get(key)) if key is not None else None
        if not isinstance(value, torch.Tensor) or value.numel() * value.element_size() > CONSTANT_INPUT_BYTES:
            raise ExportError(f"streamed decoder {name}: its XNNPACK delegate reads '{a.name}' as an input "
                              "(not a piece input, nor a small constant)")
        args.append(f"const_{len(constants)}")
        constants[args[-1]] = value.detach().clone()
    outputs = []
    for out in graph.graph.output_node().args[0]:
        if out.target is not operator.getitem or out.args[0] is not call:
            raise ExportError(f"streamed decoder {name}: an output does not come from its XNNPACK delegate")
        outputs.append(out.args[1])
    lowered = getattr(graph, call.args[0].target)
    strip_constants(lowered.original_module)
    if spill_dir is not None:
        spill(lowered, spill_dir / name.replace(" ", "_"))
    return LoweredPiece(lowered, args, outputs, constants), report


def stream_decoder(model: EtTextModel, source: nn.Module, quantize: PieceQuantizer,
                   progress: Callable[[str, int, int], None],
                   spill_dir: Path | None = None) -> tuple[StreamedTextModel, dict[str, Any]]:
    """Every piece of ``model`` lowered in turn (progress "executorch decoder i/n"); the composed model and
    the summed quantization report. ``source`` is the eager module ``model`` was made from: its mapped pages
    are handed back after each piece (a piece's gate and up halves are views of the source's fused
    gate_up_proj, whose pages the piece's own release does not reach). ``spill_dir``: where the pieces'
    packed weights wait until the program is written (a directory that outlives the write)."""
    register_custom_ops()
    pieces = pieces_of(model)
    lowered: list[LoweredPiece] = []
    total: dict[str, Any] = {"pieces": len(pieces)}
    progress("executorch decoder", 0, len(pieces))
    for i, piece in enumerate(pieces):
        args, shapes = piece_inputs(piece, model)
        done, report = lower_piece(piece, args, shapes, quantize, f"piece {i}", spill_dir)
        lowered.append(done)
        release_pages(source)
        gc.collect()
        trim_heap()  # the piece's float32 copy and lowering temporaries, freed, leave the heap too
        for key, value in report.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, list):
                total.setdefault(key, []).extend(value)
        progress("executorch decoder", i + 1, len(pieces))
    return StreamedTextModel(model, lowered), total
