"""make-checkpoint writes what transformers' Glm4v save_pretrained writes, and both loaders read it.

The round trip runs at small widths (the 9B preset's vocab, ids and layout, narrow
layers); the 9B's own shapes are checked on the meta device only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from core.errors import ConfigError, OutputError
from exporter.make_checkpoint import (
    FIRST_SPECIAL_ID,
    GLM_SPECIALS,
    MARKER,
    make_checkpoint,
    split_shards,
    tensor_specs,
    write_checkpoint,
)
from exporter.model.config import PRESETS

transformers = pytest.importorskip("transformers")

SPECIAL_IDS = {s: FIRST_SPECIAL_ID + i for i, s in enumerate(GLM_SPECIALS)}


def small_9b():
    """The 9B preset (vocab 151552, GLM ids, chat template) at narrow widths: seconds to write and load."""
    cfg = PRESETS["autoglm-phone-9b"]
    return cfg.replace(
        name="glm4v-small",
        text=dataclasses.replace(cfg.text, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=96, mrope_section=(2, 1, 1)),
        vision=dataclasses.replace(cfg.vision, hidden_size=32, depth=1, num_heads=2, out_hidden_size=64,
                                   intermediate_size=48),
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("mc") / "small"
    # 8 MB shards: the 19 MB embedding and lm_head each get a shard of their own, as save_pretrained does
    write_checkpoint(out, small_9b(), seed=7, max_shard_size="8MB")
    return out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sharded_layout_and_index(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and {p.name for p in shards} == set(index["weight_map"].values())
    specs = tensor_specs(small_9b())
    assert index["metadata"] == {"total_parameters": sum(s.numel for s in specs), "total_size": sum(s.nbytes for s in specs)}
    assert sum(p.stat().st_size for p in shards) > index["metadata"]["total_size"]  # + headers
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    from safetensors import safe_open

    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    marker = json.loads((ckpt / MARKER).read_text())
    assert {n: m["sha256"] for n, m in marker["files"].items()} == {p.name: _sha(p) for p in shards}


def test_config_files_are_what_transformers_writes(ckpt, tmp_path):
    from transformers import Glm4vConfig, GenerationConfig

    cfg = Glm4vConfig.from_pretrained(ckpt)
    assert cfg.text_config.vocab_size == 151552 and cfg.image_token_id == SPECIAL_IDS["<|image|>"]
    assert getattr(cfg.text_config, "bos_token_id", None) is None
    cfg.architectures = ["Glm4vForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    assert json.loads((ckpt / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())
    GenerationConfig.from_model_config(cfg).save_pretrained(tmp_path)
    ours = json.loads((ckpt / "generation_config.json").read_text())
    assert ours == json.loads((tmp_path / "generation_config.json").read_text())
    assert ours["eos_token_id"] == [151329, 151336, 151338]


def test_transformers_loads_every_weight(ckpt):
    from safetensors.torch import load_file
    from transformers import Glm4vForConditionalGeneration

    model, info = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {s.name: s.shape for s in tensor_specs(small_9b())}
    stored = {}
    for shard in ckpt.glob("*.safetensors"):
        stored.update(load_file(shard))
    assert all(torch.equal(sd[k], v) for k, v in stored.items())
    norm = stored["model.language_model.norm.weight"].float()
    assert 0.9 < norm.mean() < 1.1  # norm scales near 1
    w = stored["model.language_model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002
    with torch.no_grad():
        logits = model.float()(input_ids=torch.tensor([[151331, 151333, 151336, 100, 200, 151337]])).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0.1


def test_tokenizer_loads_in_transformers(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert len(tok) == FIRST_SPECIAL_ID + len(GLM_SPECIALS)  # GLM-4.1V's: 151329 BPE ids + 16 specials
    assert {s: tok.convert_tokens_to_ids(s) for s in GLM_SPECIALS} == SPECIAL_IDS
    assert tok.eos_token_id == tok.pad_token_id == 151329
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[:3] == [151331, 151333, 151336]
    assert tok.decode(ids[:3]) == "[gMASK]<sop><|user|>"
    for text in ("Hello, world! 1234 tabs\tand  spaces\n\n", "中文 émoji 🚀 <think>"):
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert all(i < FIRST_SPECIAL_ID for i in enc) and tok.decode(enc) == text


def test_our_loader_and_generate_match_transformers(ckpt):
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration

    from exporter import pipeline
    from exporter.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt)
    c = model.config
    assert (c.text.vocab_size, c.text.num_layers, c.vision.depth) == (151552, 2, 1)
    assert c.tokens.bos_ids == (151331, 151333)  # from the chat template's prefix: config.json has no gmask/sop ids
    assert c.tokens.eos_ids == (151329, 151336, 151338) and c.tokens.image_token_id == 151343
    _, result = pipeline.generate("hi", max_new_tokens=4, preset=None, checkpoint=ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    assert list(result.prompt_tokens) == list(prompt)
    hf = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert list(result.tokens) == out[0, len(prompt):].tolist()


def test_cli_generate_runs_on_it(ckpt):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "tokens: [" in result.output


def test_same_seed_same_bytes_other_seed_other_bytes(ckpt, tmp_path):
    again = tmp_path / "again"
    write_checkpoint(again, small_9b(), seed=7, max_shard_size="8MB")
    names = sorted(p.name for p in ckpt.iterdir() if p.name != MARKER)
    assert names == sorted(p.name for p in again.iterdir() if p.name != MARKER)
    assert all(_sha(ckpt / n) == _sha(again / n) for n in names)
    other = tmp_path / "other"
    write_checkpoint(other, small_9b(), seed=8, max_shard_size="8MB")
    shard = next(ckpt.glob("model-00001-*.safetensors")).name
    assert _sha(other / shard) != _sha(ckpt / shard)
    assert _sha(other / "tokenizer.json") == _sha(ckpt / "tokenizer.json")


def test_refuses_a_foreign_directory_and_leaves_it_alone(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["make-checkpoint", "--out", str(foreign), "--layers", "1", "--vision-layers", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refusing" in lines[0]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp dir left behind
    with pytest.raises(OutputError):
        write_checkpoint(foreign, small_9b())


def test_replaces_its_own_earlier_output(tmp_path):
    out = tmp_path / "ck"
    write_checkpoint(out, small_9b(), seed=1)
    first = _sha(out / "model.safetensors")
    write_checkpoint(out, small_9b(), seed=2)
    assert _sha(out / "model.safetensors") != first
    assert json.loads((out / MARKER).read_text())["recipe"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_presets_glm4v_cannot_represent_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be written as a Glm4v checkpoint"):
        make_checkpoint(tmp_path / "t", preset="tiny")
    assert not (tmp_path / "t").exists()


def test_9b_shapes_and_shard_plan_on_meta():
    """The full preset and the --layers 1 --vision-layers 1 cut, without writing a byte."""
    full = tensor_specs(PRESETS["autoglm-phone-9b"])
    assert sum(s.numel for s in full) == 10_292_777_472  # the published 9B: 10.29B parameters
    shapes = {s.name: s.shape for s in full}
    assert shapes["model.language_model.embed_tokens.weight"] == (151552, 4096)
    assert shapes["model.language_model.layers.39.mlp.gate_up_proj.weight"] == (2 * 13696, 4096)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (256, 4096)
    assert shapes["model.visual.blocks.23.attn.qkv.weight"] == (3 * 1536, 1536)
    shards = split_shards(full, 5_000_000_000)
    assert len(shards) == 5 and all(sum(s.nbytes for s in sh) <= 5_000_000_000 for sh in shards)
    cut = tensor_specs(PRESETS["autoglm-phone-9b"].with_layers(1, 1))
    assert sum(s.numel for s in cut) == 1_686_749_184


def test_shard_sizes_parse_as_transformers_does():
    from exporter.make_checkpoint import parse_size

    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MiB") == 500 * 2**20 and parse_size("100KB") == 100_000
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("five gigs")


@pytest.mark.slow
def test_coreml_export_of_the_bf16_checkpoint_in_chunks(ckpt, tmp_path, monkeypatch):
    """Core ML reads the kept bf16 weights itself (no fp32 copy of the model): each method and decoder chunk is
    copied to fp16 from them (the vision merger's LayerNorm to fp32). Split one layer per package, the decoder
    gives the whole package's numbers. (This narrow random GLM decoder loses more to fp16 compute than tiny:
    cosine 0.987 against eager, split or not, and with the earlier fp32-copy path too; hence the floor.)"""
    from typer.testing import CliRunner

    from cli import app
    from core.artifact import read_artifact
    from exporter import checkpoint
    from targets.coreml import spec as coreml_spec

    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)  # keep this small checkpoint in bf16, as the 9B is kept
    assert checkpoint.load_checkpoint(ckpt).visual.merger.post_projection_norm.weight.dtype == torch.bfloat16
    checks = {}
    for name, limit in (("whole", coreml_spec.DECODER_CHUNK_BYTES), ("split", 1)):
        monkeypatch.setattr(coreml_spec, "DECODER_CHUNK_BYTES", limit)  # 1: one layer per package
        out = tmp_path / name
        result = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "coreml", "--recipe", "fp16",
                                          "--out", str(out), "--check-floor", "0.9"])
        assert result.exit_code == 0, result.output
        art = read_artifact(out)
        checks[name] = art.info["report"]["export_check"]["methods"]
        chunks = [c["layers"] for c in art.metadata["decoder_chunks"]]
        assert chunks == ([[0, 2]] if name == "whole" else [[0, 1], [1, 2]])
    for method, c in checks["split"].items():
        assert c["cosine"] == pytest.approx(checks["whole"][method]["cosine"], abs=1e-6), method
        assert c["cosine"] > (0.98 if method == "text_decoder" else 0.999), (method, c)
