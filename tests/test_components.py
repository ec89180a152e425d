"""Every method passes torch.export and the exported program equals eager."""

from __future__ import annotations

import pytest
import torch

from core.components import build_components


def _inputs(components, method: str, t: int = 9):
    cfg = components.config
    g = torch.Generator().manual_seed(7)
    if method == "token_embedding":
        return (torch.randint(0, cfg.text.vocab_size, (1, t), generator=g),)
    if method == "vision_encoder":
        s = cfg.shape.image_size
        return (torch.randn(1, 3, s, s, generator=g),)
    if method == "audio_encoder":
        return (torch.randn(1, cfg.audio.n_mels, cfg.shape.audio_frames, generator=g),)
    pos = torch.arange(3, 3 + t)
    return (torch.randn(1, t, cfg.text.hidden_size, generator=g), pos.expand(3, t).contiguous(), pos)


def _check_all_methods(components, tol: float):
    for method, module in components.methods().items():
        ep = components.export(method)
        args = _inputs(components, method)
        with torch.no_grad():
            if method == "text_decoder":
                components.text_decoder.cache.reset()
            eager = module(*args)
            exported = ep.module()(*args)
        assert exported.shape == eager.shape, method
        err = (exported - eager).abs().max().item()
        assert err <= tol, f"{method}: max abs {err}"


def test_tiny_exported_methods_equal_eager(tiny_components):
    assert set(tiny_components.methods()) == {"token_embedding", "vision_encoder", "audio_encoder", "text_decoder"}
    _check_all_methods(tiny_components, 1e-5)


def test_decoder_exports_with_dynamic_length(tiny_components):
    ep = tiny_components.export("text_decoder")
    for t in (1, 5, 17):
        args = _inputs(tiny_components, "text_decoder", t)
        with torch.no_grad():
            out = ep.module()(*args)
        assert out.shape == (1, t, tiny_components.config.text.vocab_size)


def test_cached_prefill_in_pieces_equals_full_sequence(tiny_model, tiny_components):
    cfg = tiny_model.config
    t = 12
    embeds = torch.randn(1, t, cfg.text.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(t).expand(3, t).contiguous()
    with torch.no_grad():
        full = tiny_model.text.forward_full(embeds, pos)
        dec = tiny_components.text_decoder
        parts = [dec(embeds[:, a:b], pos[:, a:b], torch.arange(a, b)) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_9b_shape_cut_to_one_layer_exports_equal_eager():
    """Real AutoGLM-Phone-9B widths (vocab 151552, hidden 4096, GQA 32/2, vision 1536) with 1 layer/block."""
    from exporter.model import build, get_preset

    cfg = get_preset("autoglm-phone-9b").with_layers(1, vision_layers=1)
    cfg = cfg.replace(shape=cfg.shape.__class__(max_seq_len=64, image_size=112, audio_frames=3000))
    model = build(cfg)
    _check_all_methods(build_components(model), 1e-3)
