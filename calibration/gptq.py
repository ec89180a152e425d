"""GPTQ-style error-compensating rounding of weights onto a target's integer grid (Frantar et al. 2022).

Round-to-nearest rounds every weight on its own. GPTQ rounds a linear's input columns one at a time
and moves each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = sum x x^T of the layer's calibration inputs, so the layer's *output* error ||X W^T - X Q^T|| is what
is minimised, not the weights' own.

The result is written back as float weights that lie exactly on the grid the target's own quantizer will
use (:class:`core.recipes.WeightGrid`, declared per target and recipe in its spec): int8 per output channel
(scale = max|w_row| / 127: ORT's targets/ort/quantize_int8.py and static quantizer, XNNPACK's symmetric
per-channel observer, coremltools' linear_symmetric), onnxruntime's MatMulNBits blocks (4 or 8 bits, scale =
the block's signed extreme / -8 or / -128) and coremltools' int4 blocks (max / 7). In each group the value
that sets the scale is kept as it is (were it rounded, the quantizer would pick another scale and round
everything again), so the target's quantizer reproduces GPTQ's integers; tests check it against onnxruntime's
and coremltools' quantizers. ExecuTorch's torchao configs (int8-weight, 8da4w) scale by max / 127.5 or / 7.5,
which puts the largest weight between two integers: no rounded weight survives that quantizer as it was, and
``--gptq`` refuses them.

Why by hand: torchao 0.18's ``torchao.prototype.gptq`` asserts CUDA (``gptq_quantize``: "GPTQ only supports
CUDA currently") and returns its own Int8Tensor / Int4Tensor subclasses, which none of the exporters here
read; onnxruntime's bundled GPTQ (Intel Neural Compressor's, ``GPTQWeightOnlyQuantConfig``) rounds the ONNX
graph and needs the decoder's own inputs (KV cache buffers included) as calibration data, and serves one target.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TYPE_CHECKING

import numpy as np

from core.recipes import WeightGrid

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

Progress = Callable[[str, int, int], None]
BLOCK = 128  # columns rounded together before the lazy update of the rest (the paper's B)
ACT_ORDER = True  # round_weights rounds in act-order (measured better on ORT int4: README "GPTQ for 4 bits")
DAMP = 0.01  # fraction of mean(diag H) added to H's diagonal (the paper's lambda)


def hessians(components: Components, calib: Any, names: Iterable[str], progress: Progress | None = None) -> dict[str, Any]:
    """H = sum over every recorded decoder row of x x^T, per named linear (float64 sums of float32 products; one
    product per distinct input, shared by the linears that read it)."""
    import torch

    from calibration.sensitivity import replay

    mods = dict(components.model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    handles = []

    last: list = [None, None]  # (the input tensor, its x^T x): q, k and v (gate and up) read the same one

    def hook(name):
        def pre(_m, args):
            x = args[0]
            if last[0] is not x:
                flat = x.detach().float().reshape(-1, x.shape[-1])
                # float32 products (a few hundred rows per call), summed across calls in float64
                last[0], last[1] = x, (flat.T @ flat).double()
            hs[name] = hs[name] + last[1] if name in hs else last[1].clone()

        return pre

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(hook(n)))
    inputs = calib if isinstance(calib, dict) else calib.method_inputs
    try:
        replay(components, "text_decoder", inputs.get("text_decoder", []), keep=False, progress=progress, label="GPTQ statistics")
    finally:
        for h in handles:
            h.remove()
    return hs


def _group_scale(g, grid: WeightGrid):
    """Per row of ``g`` (a group's current weights [rows, width]): the grid's scale, the column of the value that
    sets it (it is kept exactly, so the target's quantizer finds the same scale) and that value."""
    import torch

    col = g.abs().argmax(dim=1)
    extreme = g.gather(1, col.unsqueeze(1)).squeeze(1)
    scale = extreme / grid.qmin if grid.full_range else extreme.abs() / grid.qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group rounds to zeros on any scale
    return scale, col, extreme


def gptq_round(w, h, grid: WeightGrid = WeightGrid(), block: int = BLOCK, damp: float = DAMP, act_order: bool = False):
    """``w`` [out, in] rounded GPTQ-style onto ``grid`` (for its width); returned as float on that grid.

    In input order, each group's scale is taken from its weights as they stand when GPTQ reaches the group (the
    columns before it have moved their error onto it), which is what the target's quantizer will see. With
    ``act_order`` the columns are rounded largest Hessian diagonal first (the paper's "act-order": the inputs with the
    most energy while the most columns are left to take their error), and every group's scale is fixed beforehand
    from the original weights ("static groups"), since a group's columns are then rounded far apart. Either way the
    value that sets a group's scale is kept as it is.
    """
    import torch

    grid = grid.for_width(w.shape[1])
    w0 = w.detach().double().clone()
    rows, cols = w0.shape
    group = grid.group or cols
    if not act_order:
        # every group starts at a lazy batch's start or lies inside one batch, so its weights are up to date then
        if block < group < cols and group % block:
            block = group
        elif group < block and block % group:
            block = group * max(1, block // group)
    h = h.double().clone()
    dead = torch.diag(h) == 0  # an input never seen non-zero: its rounding costs nothing, nothing to spread
    h[dead, dead] = 1.0
    h += torch.eye(cols, dtype=h.dtype) * (damp * torch.mean(torch.diag(h)))
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    static = None
    if act_order:
        fixed = [_group_scale(w0[:, c:c + group], grid) for c in range(0, cols, group)]
        static = [torch.stack(x, dim=1) for x in zip(*fixed)]  # scale, pin (within the group), value: [rows, groups]
        h = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    W = w0[:, perm].clone()
    Q = torch.zeros_like(W)
    scale = pin = pinned_value = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Q1, E1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), torch.zeros(rows, i2 - i1, dtype=W.dtype)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            orig = int(perm[c])
            if static is not None:
                g = orig // group
                scale, pin, pinned_value = static[0][:, g], static[1][:, g] + g * group, static[2][:, g]
            elif c % group == 0:
                current = W1[:, i:i + group] if group <= block else W[:, c:c + group]  # (c == i1 then: W1 is W's copy)
                scale, pin, pinned_value = _group_scale(current, grid)
                pin = pin + c
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale), grid.qmin, grid.qmax) * scale
            q = torch.where(pin == orig, pinned_value, q)
            Q1[:, i] = q
            err = (col - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.to(w.dtype)


def memory_needed(model: Any, skip: Iterable[str] = ()) -> int:
    """Bytes :func:`round_weights` holds beside the model: its copy of the model (rounded layers in float32) and one
    float64 Hessian [in, in] per rounded decoder linear, all held until the rounding ends."""
    from torch import nn

    skip = set(skip)
    copy_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hessians = sum(8 * m.in_features ** 2 for n, m in model.named_modules()
                   if n.startswith("text.layers.") and isinstance(m, nn.Linear) and n not in skip)
    return copy_bytes + hessians


def round_weights(
    components: Components, calib: Any, grid: WeightGrid = WeightGrid(), skip: Iterable[str] = (),
    progress: Progress | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A copy of the model with every decoder linear (but lm_head: tied to the embedding table in most small
    models, and ``skip``) GPTQ-rounded onto the target's ``grid``; and the record for artifact.json."""
    import copy

    from torch import nn

    skip = set(skip)
    model = copy.deepcopy(components.model)
    names = [n for n, m in components.model.named_modules()
             if n.startswith("text.layers.") and isinstance(m, nn.Linear) and n not in skip]
    hs = hessians(components, calib, names, progress)
    mods = dict(model.named_modules())
    gain = []
    for i, n in enumerate(names):
        if n not in hs:
            continue
        lin = mods[n]
        w = lin.weight.data
        q = gptq_round(w, hs[n], grid, act_order=ACT_ORDER)
        gain.append(_output_error_ratio(w, q, hs[n], grid))
        lin.weight.data = q
        if progress:
            progress("GPTQ rounding", i + 1, len(names))
    record = {"method": f"GPTQ rounding onto the target's grid: {grid.describe()} (calibration/gptq.py)", "layers": len(gain),
              "output_error_vs_rtn_median": round(float(np.median(gain)), 4) if gain else None}
    return model, record


def rtn(w, grid: WeightGrid = WeightGrid()):
    """``w`` rounded to nearest on ``grid`` (what the target's quantizer does with unrounded weights)."""
    import torch

    grid = grid.for_width(w.shape[1])
    rows, cols = w.shape
    group = grid.group or cols
    out = torch.empty_like(w)
    for c in range(0, cols, group):
        g = w[:, c:c + group]
        scale = _group_scale(g, grid)[0].unsqueeze(1)
        out[:, c:c + group] = torch.clamp(torch.round(g / scale), grid.qmin, grid.qmax) * scale
    return out


def output_error(w, q, h) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's summed squared output error over the calibration rows."""
    d = w.double() - q.double()
    return float((d @ h.double() @ d.T).diagonal().sum())


def _output_error_ratio(w, q, h, grid: WeightGrid) -> float:
    """GPTQ's output error over round-to-nearest's, on the calibration inputs (< 1: GPTQ helps)."""
    base = output_error(w, rtn(w.double(), grid), h)
    return output_error(w, q, h) / base if base > 0 else 1.0
