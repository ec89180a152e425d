"""SmoothQuant-style smoothing (Xiao et al. 2022), folded into the model's own weights.

Per-tensor static int8 inputs cannot hold a trained LLM's outlier channels: a few input channels of a
linear are 10-100x larger than the rest, so one scale either clips them or rounds every other channel to
a handful of levels (SmolLM2-135M int8-static: decoder cosine -0.78, perplexity +675%). Smoothing moves
that range from the activation into the weight, per input channel j of a linear:

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        X' = X / s,  W' = W * s  (columns)

and ``X / s`` is folded into the op that produces X, so no op is added and every target exports an
ordinary model whose fp32 outputs equal the original's up to rounding:

* q/k/v (one shared input): into ``input_layernorm``'s RMSNorm weight;
* gate_up (the fused gate and up projections): into ``post_attention_layernorm``'s weight;
* down_proj: into the *up* rows of gate_up (``up * silu(gate)`` is linear in up);
* o_proj: into v_proj's rows (and bias): attention is linear in v. With GQA one v row serves the
  o_proj input channel ``d`` of every query head of its KV group, so those channels share one scale
  (the group's max);
* lm_head is left alone: in a tied model its weight is the embedding table.

Why by hand: torchao 0.18's ``torchao.prototype.smoothquant`` keeps the smoothing as a runtime
multiplication (``act_pre_scale``) inside its own quantized tensor subclass, which neither the ONNX
Runtime nor the Core ML exporter can read, and folds nothing into the preceding norm. The scales use the
same formula as its ``SmoothQuantObserver``.

The statistics come from replaying the calibration set's recorded decoder calls through the unsmoothed
model; a smoothed model changes every linear's input, so the caller calibrates it again before a
static export (exporter/export.py does).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, TYPE_CHECKING

import numpy as np

from core.errors import BadInputError

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

Progress = Callable[[str, int, int], None]
MIN_SCALE = 1e-5  # a channel never seen non-zero keeps scale 1; others are clamped to at least this


def check_alpha(alpha: float) -> float:
    """``--smooth ALPHA``: the migration strength, in (0, 1] (SmoothQuant uses 0.5; 0.75-0.85 for harder models)."""
    if not (0.0 < float(alpha) <= 1.0):
        raise BadInputError(f"--smooth {alpha}: the migration strength must be in (0, 1], e.g. 0.5")
    return float(alpha)


def input_absmax(components: Components, calib: Any, progress: Progress | None = None) -> dict[str, Any]:
    """Per decoder linear (module name): max |x| per input channel over every recorded decoder call."""
    import torch
    from torch import nn

    from calibration.sensitivity import replay

    model = components.model
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def pre(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)

        return pre

    for name, mod in model.named_modules():
        if name.startswith("text.layers.") and isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(hook(name)))
    inputs = calib if isinstance(calib, dict) else calib.method_inputs
    calls = inputs.get("text_decoder", [])
    try:
        replay(components, "text_decoder", calls, keep=False, progress=progress, label="smoothing statistics")
    finally:
        for h in handles:
            h.remove()
    return seen


def _scales(xmax, wmax, alpha: float):
    import torch

    xmax, wmax = xmax.double(), wmax.double()
    s = xmax.clamp(min=1e-12) ** alpha / wmax.clamp(min=1e-12) ** (1.0 - alpha)
    s = torch.where((xmax > 0) & (wmax > 0), s.clamp(min=MIN_SCALE), torch.ones_like(s))
    return s.float()


def _mul_cols(lin, s) -> None:
    lin.weight.data = (lin.weight.data.float() * s.unsqueeze(0)).to(lin.weight.dtype)


def _div_rows(lin, rows: slice | Any, s) -> None:
    w = lin.weight.data.float()
    w[rows] = w[rows] / s.unsqueeze(1)
    lin.weight.data = w.to(lin.weight.dtype)
    if lin.bias is not None:
        b = lin.bias.data.float()
        b[rows] = b[rows] / s
        lin.bias.data = b.to(lin.bias.dtype)


def _div_norm(norm, s) -> None:
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)


def smooth_layer(layer, prefix: str, xmax: dict[str, Any], alpha: float, heads: tuple[int, int, int],
                 scales: dict[str, Any] | None = None) -> dict[str, float]:
    """Fold the four smoothings into one decoder layer in place; returns each group's largest scale.
    ``scales`` (if given) receives each consuming linear's input scale s (its input is now x / s)."""
    import torch

    num_heads, num_kv, hd = heads
    attn, mlp = layer.self_attn, layer.mlp
    out: dict[str, float] = {}
    # q/k/v <- input_layernorm
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    wmax = torch.cat([m.weight.data.float() for m in qkv]).abs().amax(dim=0)
    s = _scales(xmax[prefix + "self_attn.q_proj"], wmax, alpha)
    _div_norm(layer.input_layernorm, s)
    for m in qkv:
        _mul_cols(m, s)
    out["qkv"] = float(s.max())
    got = {prefix + f"self_attn.{n}_proj": s for n in "qkv"}
    # gate_up <- post_attention_layernorm
    s = _scales(xmax[prefix + "mlp.gate_up_proj"], mlp.gate_up_proj.weight.data.float().abs().amax(dim=0), alpha)
    _div_norm(layer.post_attention_layernorm, s)
    _mul_cols(mlp.gate_up_proj, s)
    out["gate_up"] = float(s.max())
    got[prefix + "mlp.gate_up_proj"] = s
    # down_proj <- the up rows of gate_up
    inter = mlp.down_proj.in_features
    s = _scales(xmax[prefix + "mlp.down_proj"], mlp.down_proj.weight.data.float().abs().amax(dim=0), alpha)
    _div_rows(mlp.gate_up_proj, slice(inter, 2 * inter), s)
    _mul_cols(mlp.down_proj, s)
    out["down"] = float(s.max())
    got[prefix + "mlp.down_proj"] = s
    # o_proj <- v_proj rows: one scale per (KV group, head dim), the max over the group's query heads
    rep = num_heads // num_kv
    xo = xmax[prefix + "self_attn.o_proj"].view(num_kv, rep, hd).amax(dim=1)
    wo = attn.o_proj.weight.data.float().abs().amax(dim=0).view(num_kv, rep, hd).amax(dim=1)
    s_kv = _scales(xo, wo, alpha)  # [kv, hd]
    _div_rows(attn.v_proj, slice(None), s_kv.reshape(-1))
    s = s_kv[:, None, :].expand(num_kv, rep, hd).reshape(-1)
    _mul_cols(attn.o_proj, s)
    out["o"] = float(s_kv.max())
    got[prefix + "self_attn.o_proj"] = s
    if scales is not None:
        scales.update(got)
    return out


def smooth_model(model, xmax: dict[str, Any], alpha: float, scales: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A smoothed copy of ``model`` (the original is left as it is: ``build`` exports it again) and the
    record for artifact.json (``metadata.compression.smooth``); ``scales`` as in :func:`smooth_layer`."""
    check_alpha(alpha)
    t = model.config.text
    new = copy.deepcopy(model)
    largest: dict[str, float] = {}
    for i, layer in enumerate(new.text.layers):
        heads = (t.num_heads, t.num_kv_heads, t.head_dim)
        for k, v in smooth_layer(layer, f"text.layers.{i}.", xmax, alpha, heads, scales).items():
            largest[k] = max(largest.get(k, 0.0), v)
    record = {
        "alpha": alpha,
        "method": "SmoothQuant, folded into RMSNorm / up rows / v rows (calibration/smooth.py)",
        "layers": len(new.text.layers),
        "largest_scale": {k: round(v, 3) for k, v in largest.items()},
    }
    return new, record


def smooth(components: Components, calib: Any, alpha: float, progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Statistics from ``calib`` (recorded with ``components``' model), then :func:`smooth_model`."""
    check_alpha(alpha)
    xmax = input_absmax(components, calib, progress)
    if not xmax:
        raise BadInputError("--smooth: the calibration set has no decoder calls to measure activations on")
    return smooth_model(components.model, xmax, alpha)


def smoothed_absmax(xmax: dict[str, Any], scales: dict[str, Any]) -> dict[str, Any]:
    """Per-channel max |x| of the smoothed model's linear inputs without running it: the smoothed model
    computes the same function, so each smoothed input is exactly the original divided by its scale."""
    return {n: (v / scales[n] if n in scales else v) for n, v in xmax.items()}


def activation_range_ratio(xmax: dict[str, Any]) -> dict[str, float]:
    """Per linear: largest / median per-channel max |x| (how much one per-tensor scale wastes); a diagnostic."""
    return {n: float(v.max() / max(float(np.median(v.numpy())), 1e-12)) for n, v in xmax.items()}
