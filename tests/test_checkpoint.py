"""Checkpoint loading: both key layouts, memory-mapped, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.checkpoint import iter_safetensors, load_checkpoint
from exporter.errors import CheckpointError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    cfg = Glm4vConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, eos_token_id=[0],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=48, image_size=56),
        image_token_id=250, image_start_token_id=251, image_end_token_id=252, video_token_id=253,
    )
    path = tmp_path_factory.mktemp("ckpt")
    Glm4vForConditionalGeneration(cfg).save_pretrained(path, max_shard_size="100KB")
    return path


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


def test_sharded_checkpoint_loads(ckpt):
    assert (ckpt / "model.safetensors.index.json").exists()
    model = load_checkpoint(ckpt)
    assert model.config.text.num_layers == 2 and model.visual is not None
    assert not any(p.is_meta for p in model.parameters())


def test_tensors_are_views_of_the_mapping_not_copies(ckpt):
    import struct

    shard = sorted(ckpt.glob("*.safetensors"))[0]
    ref = load_file(shard)
    raw = shard.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    tensors = dict(iter_safetensors(shard))
    names = sorted(tensors, key=lambda n: header[n]["data_offsets"][0])
    base = tensors[names[0]].data_ptr() - header[names[0]]["data_offsets"][0]
    for name in names:
        assert torch.equal(tensors[name], ref[name])
        # every tensor sits at its file offset inside one mapping: no per-tensor copy was made
        assert tensors[name].data_ptr() - base == header[name]["data_offsets"][0]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    (c / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_checkpoint(c)


def test_missing_shard(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    victim = sorted(c.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(c)


def test_truncated_shard(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    victim = sorted(c.glob("*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated"):
        load_checkpoint(c)


def test_corrupt_shard_header(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    victim = sorted(c.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"\x00garbage!!!\x01"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt safetensors header"):
        load_checkpoint(c)


def test_missing_key(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    index = json.loads((c / "model.safetensors.index.json").read_text())
    key = "model.language_model.norm.weight"
    shard = c / index["weight_map"][key]
    sd = load_file(shard)
    del sd[key]
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match=r"missing keys: text\.norm\.weight"):
        load_checkpoint(c)


def test_unexpected_key(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    shard = sorted(c.glob("*.safetensors"))[0]
    sd = load_file(shard)
    sd["model.language_model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.language_model\.layers\.9\.extra\.weight"):
        load_checkpoint(c)


def test_config_the_model_cannot_represent(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    cfg = json.loads((c / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    (c / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: .*mrope_section \[4, 4, 4\]"):
        load_checkpoint(c)


def test_cli_bad_checkpoint_is_one_line_exit_2(ckpt, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    c = _copy(ckpt, tmp_path)
    victim = sorted(c.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(c), "--prompt", "hi"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and victim.name in lines[0]
