"""Half-precision weights, fp32 compute: upcast one module's weights at a time, as it runs.

A 9B checkpoint stored in bf16 is 20 GB; converted to fp32 at load it would be
41 GB. Instead its tensors stay as stored (views of the memory-mapped shards)
and :func:`compute_in_float32` switches each module holding such weights to a
subclass whose ``forward`` upcasts them for the call only. Activations stay
fp32 throughout, so the numbers equal those of an fp32-converted copy of the
same weights (bit for bit, except that a Linear split into row chunks may round
differently, ~1e-7), while at most one module's fp32 weights exist at a time
(large Linears, the lm_head above all, are upcast in row chunks).

A module whose weights are views of a memory-mapped file may also carry ``_mapped`` (parameter name ->
an object with ``drop(start_byte, stop_byte)``, set by the loader): after each use the module hands those
pages back to the kernel, so a pass over a 20 GB checkpoint does not leave all of it resident (a page read
once otherwise stays in the process's RSS); the next call reads them again from the page cache or the file.

The switch changes ``__class__`` only: parameters, names and ``state_dict``
keys are untouched, and ``isinstance(m, nn.Linear)`` still holds. Modules
whose weights are fp32 are left alone, so fp32 models run exactly as before.
Our own RMSNorm needs no switch: ``weight * x`` promotes a bf16 weight to fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# a Linear whose fp32 weight would exceed this is upcast and applied in row chunks of this size
CHUNK_BYTES = 256 << 20


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _release(m: nn.Module, name: str = "", rows: tuple[int, int] | None = None) -> None:
    """Hand the mapped file pages of ``m``'s parameter ``name`` (default: all of them) back to the kernel;
    ``rows``: only those of rows [start, stop) of the weight. A no-op for weights that are not mapped."""
    mapped = getattr(m, "_mapped", None)
    if not mapped:
        return
    if rows is not None:
        w = getattr(m, name)
        row_bytes = w[0].numel() * w.element_size()
        mapped[name].drop(rows[0] * row_bytes, rows[1] * row_bytes)
        return
    for key, pages in mapped.items():
        if not name or key == name:
            pages.drop()


class Float32Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_BYTES // (4 * self.in_features))
        if self.out_features <= rows:
            y = F.linear(x, self.weight.float(), _f32(self.bias))
            _release(self)
            return y
        outs = []
        for i in range(0, self.out_features, rows):
            b = None if self.bias is None else self.bias[i : i + rows]
            outs.append(F.linear(x, self.weight[i : i + rows].float(), _f32(b)))
            # from row 0: reading this chunk mapped the kernel's fault-around window, which reaches back into
            # the chunk dropped before it
            _release(self, "weight", (0, min(i + rows, self.out_features)))
        _release(self, "bias")
        return torch.cat(outs, dim=-1)


class Float32Embedding(nn.Embedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).float()  # gather the rows, then upcast only those
        _release(self)
        return y


class Float32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, _f32(self.weight), _f32(self.bias), self.eps)
        _release(self)
        return y


class Float32Conv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight.float(), _f32(self.bias))
        _release(self)
        return y


class Float32Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight.float(), _f32(self.bias))
        _release(self)
        return y


class Float32Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight.float(), _f32(self.bias))
        _release(self)
        return y


_SWITCH = {
    nn.Linear: Float32Linear,
    nn.Embedding: Float32Embedding,
    nn.LayerNorm: Float32LayerNorm,
    nn.Conv1d: Float32Conv1d,
    nn.Conv2d: Float32Conv2d,
    nn.Conv3d: Float32Conv3d,
}


def compute_in_float32(model: nn.Module) -> int:
    """Switch every module with bf16/fp16 weights to its upcasting subclass; returns how many were switched."""
    switched = 0
    for m in model.modules():
        cls = _SWITCH.get(type(m))
        if cls is not None and any(p.dtype in (torch.bfloat16, torch.float16) for p in m.parameters(recurse=False)):
            m.__class__ = cls
            switched += 1
    return switched


def float32_weights(model: nn.Module) -> int:
    """Undo :func:`compute_in_float32` for export: bf16/fp16 weights become fp32 copies, modules their base class.

    The exporters trace plain fp32 modules; torch.onnx, for one, turned a Float32Linear's upcast into a
    MatMul of a bf16 initializer with fp32 activations, which onnxruntime refuses. Returns how many
    tensors were converted. This is the fp32 copy a kept checkpoint avoided, so it belongs to export only.
    """
    copies: dict[int, nn.Parameter] = {}  # one copy per tensor: tied weights stay tied
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.dtype in (torch.bfloat16, torch.float16):
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                setattr(m, name, copies[id(p)])
        if type(m) in _BASE:
            m.__class__ = _BASE[type(m)]
        m.__dict__.pop("_mapped", None)  # the fp32 copies are not the mapped pages
    return len(copies)


_BASE = {sub: base for base, sub in _SWITCH.items()}


def release_pages(module: nn.Module) -> None:
    """Hand the mapped checkpoint pages of every weight in ``module`` back to the kernel (after a copy of them
    was made, e.g. Core ML's per-chunk fp16 copy); a no-op for weights that are not mapped."""
    for m in module.modules():
        _release(m)


def base_class(module: nn.Module) -> None:
    """Switch an upcasting module (:func:`compute_in_float32`) back to its base class, in place: for a copy
    whose weights are already in the dtype it is to compute in (Core ML's fp16 copies)."""
    if type(module) in _BASE:
        module.__class__ = _BASE[type(module)]
UPCASTING = tuple(_SWITCH.values())  # the module classes that upcast (and release) their weights per call


def typed_copy(module: nn.Module, dtype: torch.dtype, float32_types: tuple[type, ...] = ()) -> nn.Module:
    """A deep copy of ``module`` whose floating parameters and buffers are ``dtype`` (those of modules of
    ``float32_types``: float32), in eval mode, its upcasting modules switched to their base class.

    Each copied tensor is made first and handed to ``deepcopy`` through its memo, so the copy is made one
    tensor at a time in the target dtype (no intermediate float32 copy of the module). ``module`` itself is
    not touched, except that the mapped checkpoint pages of its weights are handed back once copied: the
    exporters that read a kept (bf16) checkpoint's weights themselves copy one method, chunk or layer at a time.
    """
    import copy
    import itertools

    memo: dict[int, Any] = {}

    def put(t: torch.Tensor, to: torch.dtype) -> None:
        c = t.detach().to(to, copy=True)
        memo[id(t)] = nn.Parameter(c, requires_grad=False) if isinstance(t, nn.Parameter) else c

    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in memo and t.is_floating_point():
            put(t, dtype)
    for m in module.modules():
        if float32_types and isinstance(m, float32_types):
            for t in m.parameters(recurse=False):
                put(t, torch.float32)
        if "_mapped" in m.__dict__:  # the checkpoint's pages, not copied
            memo[id(m.__dict__["_mapped"])] = {}
    copied = copy.deepcopy(module, memo).eval()
    release_pages(module)
    for m in copied.modules():
        base_class(m)
        m.__dict__.pop("_mapped", None)
    return copied


def float_bytes(module: nn.Module) -> int:
    """The module's parameters' size in fp32 (tied tensors once)."""
    seen = {id(p): p.numel() for p in module.parameters()}
    return 4 * sum(seen.values())


def as_float32(module: nn.Module) -> nn.Module:
    """``module`` itself when every floating tensor in it is float32, else its float32 :func:`typed_copy`."""
    import itertools

    if all(t.dtype == torch.float32 for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()):
        return module
    return typed_copy(module, torch.float32)
