"""The shared host runner: segment layout, cached decode equals full-sequence forwards, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.runner import EagerSession, Prompt, Runner


@pytest.fixture(scope="module")
def runner(tiny_components, tiny_tokenizer):
    return Runner(EagerSession(tiny_components), tiny_components.config, tiny_tokenizer)


@pytest.fixture(scope="module")
def media():
    from core.dataset import sample_inputs

    s = sample_inputs()
    return s["image"], s["audio"]


def _full_sequence_greedy(model, segments, steps):
    """Greedy decoding by re-running the whole sequence without a cache at every step."""
    tokens = [t for s in segments for t in s.tokens]
    pos = np.concatenate([s.position_ids for s in segments], axis=1)
    pixels = next((torch.from_numpy(s.data) for s in segments if s.kind == "image"), None)
    mel = next((torch.from_numpy(s.data) for s in segments if s.kind == "audio"), None)
    out = []
    next_pos = int(pos.max()) + 1
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), torch.from_numpy(pos), pixels=pixels, mel=mel)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        tokens.append(tok)
        pos = np.concatenate([pos, np.full((3, 1), next_pos)], axis=1)
        next_pos += 1
    return out


def test_segments_lay_out_image_and_audio_blocks(runner, media):
    cfg = runner.config
    segs = runner.segments(Prompt(text="what is this", image=media[0], audio=media[1]))
    kinds = [s.kind for s in segs]
    assert kinds == ["text", "image", "text", "audio", "text"]
    assert segs[0].tokens[-1] == cfg.tokens.image_start_id and segs[2].tokens[0] == cfg.tokens.image_end_id
    assert segs[1].length == cfg.image_tokens and segs[3].length == cfg.audio_tokens
    # text after an image continues at start + merged grid side, not start + token count
    g = cfg.image_grid // cfg.vision.spatial_merge_size
    assert segs[2].position_ids[0, 0] == segs[1].position_ids[0, 0] + g


def test_cached_greedy_decode_equals_full_sequence(runner, media, tiny_model):
    prompt = Prompt(text="describe the photo and the sound", image=media[0], audio=media[1])
    res = runner.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    expected = _full_sequence_greedy(tiny_model, runner.segments(prompt), 12)
    assert res.tokens == expected


def test_prompt_logits_equal_full_forward(runner, media, tiny_model):
    prompt = Prompt(text="hello", image=media[0])
    res = runner.generate(prompt, max_new_tokens=1, stop_at_eos=False)
    segs = runner.segments(prompt)
    pos = np.concatenate([s.position_ids for s in segs], axis=1)
    with torch.no_grad():
        full = tiny_model(
            torch.tensor([res.prompt_tokens]), torch.from_numpy(pos), pixels=torch.from_numpy(segs[1].data)
        )[0].numpy()
    assert np.abs(full - res.prompt_logits).max() <= 1e-4


def test_sampling_is_seeded_and_differs_from_greedy(runner):
    p = Prompt(text="open the camera")
    a = runner.generate(p, max_new_tokens=8, temperature=1.5, seed=1, stop_at_eos=False).tokens
    b = runner.generate(p, max_new_tokens=8, temperature=1.5, seed=1, stop_at_eos=False).tokens
    greedy = runner.generate(p, max_new_tokens=8, stop_at_eos=False).tokens
    assert a == b and a != greedy


def test_prompt_longer_than_the_cache_is_bad_input(runner):
    from core.errors import BadInputError

    with pytest.raises(BadInputError, match="max_seq_len"):
        runner.segments(Prompt(text="word " * 400))
