"""SmoothQuant smoothing (calibration/smooth.py) on the tiny preset: folded, function-preserving, and it
makes planted activation outliers quantizable."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

OUTLIER_CHANNELS = {  # (layer module whose *input* gets an outlier channel, how the model is rescaled to plant it)
    "text.layers.0.mlp.down_proj": "up",
    "text.layers.1.self_attn.q_proj": "norm",
    "text.layers.1.self_attn.o_proj": "v",
}


def _plant(model, factor: float = 60.0):
    """Function-preserving rescalings that give three linears an input channel ``factor`` x larger than the
    rest, as trained LLMs have (norm weight / up row / v row x factor, the consuming columns / factor)."""
    import torch

    t = model.config.text
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, how in OUTLIER_CHANNELS.items():
            layer = mods[name.rsplit(".", 2)[0]]
            if how == "up":
                inter = layer.mlp.down_proj.in_features
                layer.mlp.gate_up_proj.weight[inter + 3] *= factor
                layer.mlp.down_proj.weight[:, 3] /= factor
            elif how == "norm":
                layer.input_layernorm.weight[5] *= factor
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.weight[:, 5] /= factor
            else:  # v row 2 of KV group 0 feeds o_proj column (h * head_dim + 2) of every query head of the group
                layer.self_attn.v_proj.weight[2] *= factor
                if layer.self_attn.v_proj.bias is not None:
                    layer.self_attn.v_proj.bias[2] *= factor
                rep = t.num_heads // t.num_kv_heads
                for h in range(rep):
                    layer.self_attn.o_proj.weight[:, h * t.head_dim + 2] /= factor
    return model


@pytest.fixture(scope="module")
def planted(tiny_calibration):
    """(components of the tiny model with planted outliers, its decoder calls, per-channel input max)."""
    from calibration.smooth import input_absmax
    from core.components import build_components
    from exporter.model import build, get_preset

    comps = build_components(_plant(build(get_preset("tiny"))))
    calls = {"text_decoder": tiny_calibration["text_decoder"][:24]}
    return comps, calls, input_absmax(comps, calls)


def _logits(comps, calls):
    from calibration.sensitivity import replay

    return replay(comps, "text_decoder", calls["text_decoder"])


def _stats(comps, calls):
    """Per-tensor activation ranges of ``comps``' own linears (what a static export calibrates)."""
    from calibration.smooth import input_absmax

    return SimpleNamespace(method_inputs=calls,
                           activation_stats={n: {"absmax": float(v.max()), "min": -float(v.max()), "max": float(v.max())}
                                             for n, v in input_absmax(comps, calls).items()})


def test_planted_outliers_are_there(planted):
    comps, calls, xmax = planted
    for name in OUTLIER_CHANNELS:
        v = xmax[name].numpy()
        assert v.max() > 10 * np.median(v), name


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_preserves_fp32_logits(planted, alpha):
    from calibration.smooth import smooth_model
    from core.components import build_components

    comps, calls, xmax = planted
    before = _logits(comps, calls)
    new, record = smooth_model(comps.model, xmax, alpha)
    after = _logits(build_components(new), calls)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(before, after))
    assert worst < 1e-4, worst
    assert record["alpha"] == alpha and record["layers"] == comps.config.text.num_layers
    # no op was added: same modules, same parameter shapes; the original model is untouched
    assert [(n, p.shape) for n, p in new.named_parameters()] == [(n, p.shape) for n, p in comps.model.named_parameters()]
    again = _logits(comps, calls)
    assert all(np.array_equal(a, b) for a, b in zip(before, again))
    changed = [n for (n, p), (_, q) in zip(new.named_parameters(), comps.model.named_parameters()) if not np.array_equal(p.detach().numpy(), q.detach().numpy())]
    assert any("input_layernorm" in n for n in changed) and any("v_proj" in n for n in changed)
    assert not any("lm_head" in n or "embed" in n for n in changed)


def test_smoothing_flattens_outlier_channels_and_int8_static_gains(planted):
    """Each planted outlier channel is pulled into the others' range, and the w8a8 simulation (static per-tensor
    int8 inputs, as int8-static exports) of the whole decoder gets closer to float."""
    from calibration.sensitivity import quantized_cosine
    from calibration.smooth import input_absmax, smooth_model
    from core.components import build_components

    comps, calls, xmax = planted
    smoothed = build_components(smooth_model(comps.model, xmax, 0.5)[0])
    after = input_absmax(smoothed, calls)
    for name in OUTLIER_CHANNELS:
        ratio = lambda v: float(v.max() / np.median(v.numpy()))  # noqa: E731
        assert ratio(after[name]) < ratio(xmax[name]) / 3, (name, ratio(xmax[name]), ratio(after[name]))
    plain = quantized_cosine(comps, _stats(comps, calls))["text_decoder"]
    smooth = quantized_cosine(smoothed, _stats(smoothed, calls))["text_decoder"]
    assert smooth > plain and (1 - smooth) < (1 - plain) / 2, (plain, smooth)


def test_alpha_is_checked():
    from calibration.smooth import check_alpha
    from core.errors import BadInputError

    for bad in (0, -0.5, 1.5):
        with pytest.raises(BadInputError, match="--smooth"):
            check_alpha(bad)
    assert check_alpha(1) == 1.0
