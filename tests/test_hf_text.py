"""A user's own small Llama / Qwen2 model (a transformers save_pretrained directory) on the reference decoder.

Random LlamaForCausalLM and Qwen2ForCausalLM (q/k/v biases) written by transformers, with a tokenizer.json and a
ChatML chat template: logits equal transformers' within 1e-3 (in fact ~1e-6), and ``generate --checkpoint`` lays
the prompt out with the template and gives transformers' greedy tokens.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli import app

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPT = "Turn on Wi-Fi and open the camera."


def _save(d, family: str, tie: bool):
    from tokenizers import AddedToken, Tokenizer

    from core.preprocess import tokenizer_file

    kw = dict(vocab_size=2056, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie,
              eos_token_id=2046, bos_token_id=2047)
    if family == "llama":
        cfg = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.08) if p.dim() > 1 or name.endswith("bias") else p.normal_(1.0, 0.05)
    model.eval().save_pretrained(d)
    tok = Tokenizer.from_file(str(tokenizer_file("builtin:tiny")))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return model


@pytest.fixture(scope="module", params=[("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-bias"])
def pair(request, tmp_path_factory):
    family, tie = request.param
    d = tmp_path_factory.mktemp(family)
    hf = _save(d, family, tie)
    from exporter.pipeline import load_reference

    return d, hf, load_reference(checkpoint=d)


def _both_logits(hf, ours):
    """transformers' and the reference decoder's logits on the same ids."""
    ids = torch.tensor([[5, 77, 300, 1024, 9, 1500, 42, 2000, 17, 600]])
    t = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = ours.text.forward_full(ours.text.embed_tokens(ids), torch.arange(t)[None].expand(3, t))[0]
    return ref, got


def test_config_switches(pair):
    d, hf, ours = pair
    t = ours.config.text
    assert not t.sandwich_norms and not t.rope_interleaved and t.mrope_section == ()
    assert t.attention_bias == (hf.config.model_type == "qwen2")
    assert ours.visual is None and ours.audio is None


def test_logits_match_transformers(pair):
    d, hf, ours = pair
    ref, got = _both_logits(hf, ours)
    assert (ref - got).abs().max().item() <= 1e-3
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_generate_checkpoint_equals_transformers_greedy(pair):
    d, hf, ours = pair
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    out = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(d), "--prompt", PROMPT, "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    got = json.loads(re.search(r"tokens: (\[.*\])", r.output).group(1))
    cut = theirs.index(2046) if 2046 in theirs else 8
    assert got == theirs[:cut] and len(got) >= 3
    assert re.search(r"prompt tokens: (\d+)", r.output).group(1) == str(len(ids))


def _export_one_family(pair, tmp_path, target: str, recipe: str) -> dict:
    """``export --checkpoint`` of the llama pair to tmp_path/a (the qwen2 one is skipped: the path does not depend
    on the family); its artifact.json."""
    d, _, _ = pair
    if "qwen2" in d.name:
        pytest.skip("one family is enough: the path does not depend on it")
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(d), "--target", target, "--recipe", recipe,
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / "a" / "artifact.json").read_text())


@pytest.mark.slow
def test_executorch_int8_static_of_a_text_only_model(pair, tmp_path):
    """PT2E calibration of a decoder without vision: no image-marker state to check (torch.export drops the
    unused buffer; asking for it failed with "Module has no attribute `image_next`" on SmolLM2)."""
    info = _export_one_family(pair, tmp_path, "executorch", "int8-static")
    assert info["recipe"] == "int8-static" and info["report"]["export_check"]["measured"]


def test_text_only_ort_folder_says_genai_cannot_open_it(pair, tmp_path):
    """onnxruntime-genai 0.18's qwen2_5_vl type (3-D M-RoPE positions from the host) opens only with a vision
    model: a text-only folder's report says so instead of promising og.Model(dir), and og refuses it."""
    og = pytest.importorskip("onnxruntime_genai")
    genai = _export_one_family(pair, tmp_path, "ort", "fp32")["report"]["genai"]
    assert genai["loads"] is False and "not loadable" in genai["text"]
    # a Llama's bias-free q, k and v are packed too (targets/ort/fusions.py), and passed the export check
    import onnx

    graph = onnx.load(tmp_path / "a" / "text_decoder.onnx").graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(list(n.input[1:3]) == ["", ""] for n in gqa)
    assert not [n for n in graph.node if ".q_proj/" in n.name or ".qkv_proj/Add" in n.name]
    with pytest.raises(Exception):
        og.Model(str(tmp_path / "a"))


def test_rope_scaling_is_refused(tmp_path, pair):
    d, _, _ = pair
    bad = tmp_path / "scaled"
    shutil.copytree(d, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    raw.pop("rope_parameters", None)
    (bad / "config.json").write_text(json.dumps(raw))
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(bad), "--prompt", "hi"])
    assert r.exit_code == 2 and "llama3" in r.output


def _permute(w, n_head):
    """llama.cpp's Q/K row permutation for the llama architecture (the inverse of exporter.gguf._unpermute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf, tokenizer_json):
    """The HF model's weights as llama.cpp's converter lays them out (f32 tensors, byte-level BPE tokenizer)."""
    import gguf
    import numpy as np

    cfg = hf.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    tok = json.loads(tokenizer_json.read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    n = cfg.vocab_size
    tokens = [added.get(i) or (vocab[i][0] if i < len(vocab) else f"[PAD{i}]") for i in range(n)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(n)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(cfg.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute(q, h), _permute(k, kv)
        w.add_tensor(b + "attn_q.weight", np.ascontiguousarray(q))
        w.add_tensor(b + "attn_k.weight", np.ascontiguousarray(k))
        for src, dst in names.items():
            w.add_tensor(b + dst + ".weight", sd[p + src + ".weight"])
        if arch == "qwen2":
            for x in ("q", "k", "v"):
                w.add_tensor(b + f"attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_matches_transformers(pair, tmp_path):
    """--checkpoint FILE.gguf (llama with llama.cpp's Q/K permutation; qwen2 with biases, unpermuted)."""
    d, hf, _ = pair
    path = tmp_path / "model.gguf"
    _write_gguf(path, hf, d / "tokenizer.json")
    from exporter.pipeline import load_reference

    ours = load_reference(checkpoint=path)
    assert ours.config.text.attention_bias == (hf.config.model_type == "qwen2")
    ref, got = _both_logits(hf, ours)
    assert (ref - got).abs().max().item() <= 1e-3
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(path), "--prompt", "hi", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
