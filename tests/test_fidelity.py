"""The reference model equals transformers' Glm4vForConditionalGeneration number for number.

A small random Glm4vConfig is built in transformers, saved with save_pretrained,
loaded through exporter.checkpoint, and compared on a text-only prompt and a
prompt with a real photo (scikit-image's bundled images).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

CONFIGS = {
    "mrope-2-3-3_heads4_kv2_img84": dict(
        text=dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(hidden_size=32, num_heads=4, image_size=56),
        image=84,
        photo="astronaut",
    ),
    "mrope-4-6-6_heads6_kv1_img112_older-keys": dict(
        text=dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=1, mrope_section=[4, 6, 6]),
        vision=dict(hidden_size=48, num_heads=6, image_size=84),
        image=112,
        photo="chelsea",
        older_keys=True,
    ),
}


def _save_hf(tmp_path, spec):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    t, v = spec["text"], spec["vision"]
    cfg = Glm4vConfig(
        text_config=dict(
            vocab_size=320,
            hidden_size=t["hidden_size"],
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"],
            eos_token_id=[0, 1],
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=t["mrope_section"]
            ),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=v["hidden_size"],
            num_heads=v["num_heads"],
            out_hidden_size=t["hidden_size"],
            intermediate_size=96,
            image_size=v["image_size"],
            patch_size=14,
        ),
        image_token_id=310,
        image_start_token_id=311,
        image_end_token_id=312,
        video_token_id=313,
    )
    torch.manual_seed(0)
    hf = Glm4vForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make the tiny random model less flat so differences would show
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path)
    if spec.get("older_keys"):
        _rewrite_to_older_layout(tmp_path)
    return hf


def _rewrite_to_older_layout(path):
    """Rename model.language_model.* to model.* (the older Glm4v key layout)."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(f)
    save_file({k.replace("model.language_model.", "model."): v for k, v in sd.items()}, f)


def _hf_patches(pixels: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Glm4vImageProcessor's flattening of one normalised image [1,3,S,S] -> [grid^2, 3*2*14*14]."""
    g = pixels.shape[-1] // patch
    x = pixels[0].unsqueeze(0).repeat(temporal, 1, 1, 1)
    x = x.reshape(1, temporal, 3, g // merge, merge, patch, g // merge, merge, patch)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(g * g, 3 * temporal * patch * patch)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    from exporter.checkpoint import load_checkpoint
    from exporter.model.config import ExportShape

    spec = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = _save_hf(path, spec)
    ours = load_checkpoint(path, shape=ExportShape(max_seq_len=128, image_size=spec["image"]))
    return spec, hf, ours


def test_text_logits_match_transformers(pair):
    _, hf, ours = pair
    ids = torch.tensor([[5, 17, 42, 99, 150, 7, 8, 300, 2, 64, 65, 66, 67, 12]])
    t = ids.shape[1]
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(t).expand(3, t))
    assert (expected - got).abs().max().item() <= 1e-4


def test_photo_prompt_logits_match_transformers(pair):
    from core.preprocess import image_to_pixels

    spec, hf, ours = pair
    cfg = ours.config
    photo = getattr(skdata, spec["photo"])()
    pixels = torch.from_numpy(image_to_pixels(photo, spec["image"], cfg.vision.image_mean, cfg.vision.image_std))
    g = spec["image"] // 14
    n = (g // 2) ** 2
    ids = torch.cat(
        [torch.tensor([[5, 6, 311]]), torch.full((1, n), 310), torch.tensor([[312, 7, 8, 9, 10]])], dim=1
    )
    mm = (ids == 310).int()
    thw = torch.tensor([[1, g, g]])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=_hf_patches(pixels), image_grid_thw=thw, mm_token_type_ids=mm).logits
        positions, _ = hf.model.get_rope_index(ids, mm, thw)
        got = ours(ids, positions[:, 0], pixels=pixels)
    assert (expected - got).abs().max().item() <= 1e-4


def test_runner_positions_equal_transformers_rope_index(pair):
    """The host runner's M-RoPE layout is transformers' get_rope_index for the same token layout."""
    from core.runner import Runner

    spec, hf, ours = pair

    ids = ours.config.tokens
    specials = {"<|image|>": ids.image_token_id, "<|begin_of_image|>": ids.image_start_id, "<|end_of_image|>": ids.image_end_id}

    class _Tok:  # the layout under test needs ids only: the image markers are tokens, every other char one id
        def encode(self, text, add_special_tokens=False):
            out = []
            for piece in re.split(r"(<\|[a-z_]+\|>)", text):
                out += [specials[piece]] if piece in specials else [20 + (ord(c) % 50) for c in piece]
            return type("E", (), {"ids": out})()

    runner = Runner(session=None, config=ours.config, tokenizer=_Tok())
    from core.runner import Prompt

    s = spec["image"]
    segs = runner.segments(Prompt(text="what is this", image=np.zeros((1, 3, s, s), np.float32)))
    ids = torch.tensor([[t for seg in segs for t in seg.tokens]])
    mm = (ids == ours.config.tokens.image_token_id).int()
    g = s // 14
    expected, _ = hf.model.get_rope_index(ids, mm, torch.tensor([[1, g, g]]))
    got = np.concatenate([seg.position_ids for seg in segs], axis=1)
    np.testing.assert_array_equal(expected[:, 0].numpy(), got)
