"""GPTQ-style error-compensating rounding of int8 weights (Frantar et al. 2022), target-independent.

Round-to-nearest int8 rounds every weight on its own. GPTQ rounds a linear's input columns one at a time
and moves each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = sum x x^T of the layer's calibration inputs, so the layer's *output* error ||X W^T - X Q^T|| is what
is minimised, not the weights' own.

The result is written back as float weights that lie exactly on the int8 grid every target uses for
per-output-channel symmetric int8 (scale = max|w_row| / 127, values rint(w / scale) in [-127, 127]: ORT's
targets/ort/quantize_int8.py, XNNPACK's symmetric per-channel observer, Core ML's linear_symmetric). Each
row's largest weight is held at its value (it sets the scale: were it rounded down, the target would pick
a smaller scale and round everything again), so the target's own quantizer reproduces GPTQ's integers.

Why by hand: torchao 0.18's ``torchao.prototype.gptq`` asserts CUDA (``gptq_quantize``: "GPTQ only supports
CUDA currently") and returns its own Int8Tensor / Int4Tensor subclasses, which none of the exporters here
read. 4-bit is not done: each target's 4-bit format has its own grid (ORT MatMulNBits blocks, XNNPACK
groups, Core ML blocks) that the rounding would have to reproduce exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

Progress = Callable[[str, int, int], None]
BLOCK = 128  # columns rounded together before the lazy update of the rest (the paper's B)
DAMP = 0.01  # fraction of mean(diag H) added to H's diagonal (the paper's lambda)


def hessians(components: Components, calib: Any, names: Iterable[str], progress: Progress | None = None) -> dict[str, Any]:
    """H = sum over every recorded decoder row of x x^T, per named linear (float64)."""
    import torch

    from calibration.sensitivity import replay

    mods = dict(components.model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def pre(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            hs[name] = hs[name] + x.T @ x if name in hs else x.T @ x

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


def gptq_int8(w, h, block: int = BLOCK, damp: float = DAMP):
    """``w`` [out, in] rounded GPTQ-style to the per-row symmetric int8 grid; returned as float on that grid."""
    import torch

    w0 = w.detach().double().clone()
    rows, cols = w0.shape
    scale = (w0.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
    pin = w0.abs().argmax(dim=1)  # each row's largest weight sets its scale: it keeps its value (+-127)
    h = h.double().clone()
    dead = torch.diag(h) == 0  # an input never seen non-zero: its rounding costs nothing, nothing to spread
    h[dead, dead] = 1.0
    h += torch.eye(cols, dtype=h.dtype) * (damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    W = w0.clone()
    Q = torch.zeros_like(W)
    ar = torch.arange(rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Q1, E1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), torch.zeros(rows, i2 - i1, dtype=W.dtype)
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale), -127, 127) * scale
            pinned = pin == i1 + i
            q = torch.where(pinned, w0[ar, i1 + i], q)
            Q1[:, i] = q
            err = (col - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    return Q.to(w.dtype)


def round_weights(
    components: Components, calib: Any, skip: Iterable[str] = (), progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """A copy of the model with every decoder linear (but lm_head: tied to the embedding table in most small
    models, and ``skip``) GPTQ-rounded to int8; and the record for artifact.json."""
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
        q = gptq_int8(w, hs[n])
        gain.append(_output_error_ratio(w, q, hs[n]))
        lin.weight.data = q
        if progress:
            progress("GPTQ rounding", i + 1, len(names))
    record = {"method": "GPTQ int8 per-channel rounding (calibration/gptq.py)", "layers": len(gain),
              "output_error_vs_rtn_median": round(float(np.median(gain)), 4) if gain else None}
    return model, record


def _rtn(w):
    import torch

    s = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-30)
    return torch.clamp(torch.round(w / s), -127, 127) * s


def output_error(w, q, h) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's summed squared output error over the calibration rows."""
    d = w.double() - q.double()
    return float((d @ h.double() @ d.T).diagonal().sum())


def _output_error_ratio(w, q, h) -> float:
    """GPTQ's output error over round-to-nearest's, on the calibration inputs (< 1: GPTQ helps)."""
    rtn = output_error(w, _rtn(w.double()), h)
    return output_error(w, q, h) / rtn if rtn > 0 else 1.0
