"""Checkpoint loading: both key layouts, memory-mapped, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.checkpoint import iter_safetensors, load_checkpoint
from core.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _save_glm4v(path, vocab: int, hidden: int, intermediate: int, heads: int, kv_heads: int, mrope: list[int],
                shard: str, dtype=None):
    """A random Glm4vForConditionalGeneration of these text shapes (one small vision block), saved by transformers."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    cfg = Glm4vConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=kv_heads, eos_token_id=[0],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=mrope),
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=hidden, intermediate_size=48, image_size=56),
        image_token_id=vocab - 6, image_start_token_id=vocab - 5, image_end_token_id=vocab - 4, video_token_id=vocab - 3,
    )
    model = Glm4vForConditionalGeneration(cfg)
    (model.to(dtype) if dtype is not None else model).save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_glm4v(tmp_path_factory.mktemp("ckpt"), 256, 64, 96, 2, 1, [2, 3, 3], "100KB")


def _copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


def test_a_checkpoint_reached_through_a_symlink_gives_the_config_parity_rebuilds(ckpt, tmp_path):
    """The config's paths (tokenizer.json) are the resolved checkpoint's, as the source record parity rebuilds the
    reference from: a build of ~/models/X -> /data/X failed parity with "does not have the artifact's model config"."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from exporter.reference import resolve_config, source_of

    real = _copy(ckpt, tmp_path)
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(real / "tokenizer.json"))
    link = tmp_path / "link"
    link.symlink_to(real)
    record = source_of(None, link, None)
    assert record == {"checkpoint": str(real.resolve())}
    via_link = resolve_config(None, link, None).to_dict()
    assert via_link["tokenizer"] == str(real.resolve() / "tokenizer.json")
    assert via_link == resolve_config(None, record["checkpoint"], None).to_dict()


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


# --- bf16 checkpoints: kept as stored, computed in fp32 --------------------------------------


@pytest.fixture(scope="module")
def ckpt_bf16(ckpt, tmp_path_factory):
    """The same model saved in bf16 (as GLM-4.1V ships), sharded."""
    from transformers import Glm4vForConditionalGeneration

    path = tmp_path_factory.mktemp("ckpt_bf16")
    Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


def _mapped_file_offset(ptr: int) -> tuple[str, int] | None:
    """(file, offset in it) of the file mapping holding address ``ptr`` in this process, None if none does."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, stop = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < stop and len(parts) == 6:
                return parts[5].strip(), int(parts[2], 16) + ptr - start
    return None


def _header_offsets(ckpt) -> dict[str, tuple[str, int]]:
    """Checkpoint key -> (shard path, file offset of its data)."""
    import struct

    out = {}
    for shard in ckpt.glob("*.safetensors"):
        raw = shard.read_bytes()
        hlen = struct.unpack("<Q", raw[:8])[0]
        for key, info in json.loads(raw[8 : 8 + hlen]).items():
            if key != "__metadata__":
                out[key] = (str(shard.resolve()), 8 + hlen + info["data_offsets"][0])
    return out


def _reference_logits(model):
    """The eager reference over text and an image: every kind of module (linear, conv, norms, embeddings) runs."""
    ids = model.config.tokens
    n = (model.config.image_grid // model.config.vision.spatial_merge_size) ** 2
    tokens = torch.tensor([[5, 6, ids.image_start_id] + [ids.image_token_id] * n + [ids.image_end_id, 7, 8]])
    pos = torch.arange(tokens.shape[1]).expand(3, -1)
    pixels = torch.randn(1, 3, model.config.shape.image_size, model.config.shape.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens, pos, pixels=pixels)


def test_small_bf16_checkpoint_is_converted_to_fp32(ckpt_bf16):
    from exporter.model.upcast import Float32Linear

    model = load_checkpoint(ckpt_bf16)  # dtype=None: an fp32 copy of this model is far below 2 GiB
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(isinstance(m, Float32Linear) for m in model.modules())


def test_large_bf16_checkpoint_stays_mapped_and_computes_like_fp32(ckpt_bf16, monkeypatch):
    from exporter import checkpoint
    from exporter.model.upcast import Float32Linear

    converted = load_checkpoint(ckpt_bf16, dtype=torch.float32)
    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)  # this model counts as large
    kept = load_checkpoint(ckpt_bf16)
    where = _header_offsets(ckpt_bf16)
    keys = {checkpoint.map_key(k): k for k in where}
    params = dict(kept.named_parameters())
    assert len(params) == len(keys) and all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in params.items():
        # each weight is the shard's own bytes at its file offset: no copy, no fp32 twin
        assert _mapped_file_offset(p.data_ptr()) == where[keys[name]], name
    assert isinstance(kept.text.lm_head, Float32Linear) and isinstance(kept.text.lm_head, torch.nn.Linear)
    assert kept.compute_dtype == torch.float32
    ref, got = _reference_logits(converted), _reference_logits(kept)
    assert got.dtype == torch.float32 and ref.std() > 0.01
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())  # running upcast nothing in place


def test_chunked_upcast_of_large_linears_gives_the_same_logits(ckpt_bf16, monkeypatch):
    from exporter import checkpoint
    from exporter.model import upcast

    converted = load_checkpoint(ckpt_bf16, dtype=torch.float32)
    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)
    monkeypatch.setattr(upcast, "CHUNK_BYTES", 4 * 64 * 10)  # 10-row chunks: lm_head (256 rows) in 26 pieces
    torch.testing.assert_close(_reference_logits(load_checkpoint(ckpt_bf16)), _reference_logits(converted), rtol=0, atol=1e-6)


def _mapped_rss(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of ``paths`` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
                current = parts[5] if len(parts) == 6 else None
            elif parts[0] == "Rss:" and current in paths:
                total += int(parts[1]) * 1024
    return total


@pytest.fixture(scope="module")
def ckpt_bf16_wide(tmp_path_factory):
    """A wider bf16 checkpoint (~21 MB): its tensors span many pages, so the kernel's fault-around
    (pages mapped beside each page read) is small beside them."""
    torch.manual_seed(0)
    return _save_glm4v(tmp_path_factory.mktemp("ckpt_bf16_wide"), 4096, 512, 1536, 8, 2, [4, 6, 6], "8MB", torch.bfloat16)


@pytest.mark.parametrize("chunk_rows", [None, 64])
def test_an_eager_pass_hands_the_mapped_pages_back(ckpt_bf16_wide, monkeypatch, chunk_rows):
    ckpt_bf16 = ckpt_bf16_wide
    # a page of the mapped checkpoint read by a forward stays in the process's RSS unless it is dropped: at 9B
    # an eager pass would otherwise hold all 20 GB; each upcasting module drops its weights' pages after use
    from exporter import checkpoint
    from exporter.model import upcast

    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)
    if chunk_rows:
        monkeypatch.setattr(upcast, "CHUNK_BYTES", 4 * 512 * chunk_rows)  # lm_head dropped chunk by chunk
    shards = {str(f.resolve()) for f in checkpoint.shard_files(ckpt_bf16)}  # as /proc/self/smaps names them
    size = sum(os.path.getsize(f) for f in shards)
    kept = load_checkpoint(ckpt_bf16)
    # (a stray read of a small tensor maps its neighbours too: the kernel's fault-around, large folios; hence
    # a margin, measured ~4-5 % here)
    assert _mapped_rss(shards) < 0.15 * size  # the loader's NaN check drops what it reads
    logits = _reference_logits(kept)
    assert _mapped_rss(shards) < 0.15 * size, f"{_mapped_rss(shards)} of {size} bytes resident after a forward"
    torch.testing.assert_close(_reference_logits(kept), logits, rtol=0, atol=0)  # dropped pages read back intact
    # the precondition: without the drop the same pass leaves most of the checkpoint resident
    for m in kept.modules():
        m.__dict__.pop("_mapped", None)
    _reference_logits(kept)
    assert _mapped_rss(shards) > 0.6 * size  # measured ~90 %


def test_float32_weights_for_export_turns_a_kept_model_into_the_converted_one(ckpt_bf16, monkeypatch):
    from exporter import checkpoint
    from exporter.model.upcast import float32_weights

    converted = load_checkpoint(ckpt_bf16, dtype=torch.float32)
    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)
    kept = load_checkpoint(ckpt_bf16)
    assert float32_weights(kept) == len(list(kept.parameters()))
    assert {type(m) for m in kept.modules()} == {type(m) for m in converted.modules()}  # plain nn classes again
    ref = dict(converted.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in kept.named_parameters())
    assert torch.equal(_reference_logits(kept), _reference_logits(converted))


def test_nan_in_a_large_bf16_tensor_is_found_past_the_first_chunk(ckpt_bf16, tmp_path, monkeypatch):
    from exporter import checkpoint

    c = _copy(ckpt_bf16, tmp_path)
    index = json.loads((c / "model.safetensors.index.json").read_text())
    key = "model.language_model.embed_tokens.weight"
    shard = c / index["weight_map"][key]
    sd = load_file(shard)
    sd[key][-1, -1] = float("nan")  # the last element: only a check that reads every chunk sees it
    save_file(sd, shard, metadata={"format": "pt"})
    monkeypatch.setattr(checkpoint, "_CHECK_CHUNK", 4096)
    monkeypatch.setattr(checkpoint, "KEEP_STORED_ABOVE", 0)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{key}' holds NaN or infinite values"):
        load_checkpoint(c)


_PEAK_SCRIPT = """
import os, sys, torch
from exporter import checkpoint
checkpoint.KEEP_STORED_ABOVE = 0  # these small-width cuts count as large: bf16 is kept unless fp32 is asked for

def load_and_run(ckpt, mode):
    model = checkpoint.load_checkpoint(ckpt, dtype=torch.float32 if mode == "fp32" else None)
    assert {p.dtype for p in model.text.layers.parameters()} == {torch.float32 if mode == "fp32" else torch.bfloat16}
    tokens = torch.tensor([[151331, 151333, 151336, 100, 200, 300, 151337]])
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand(3, -1))
    assert torch.isfinite(logits).all()

# torch is imported once; each load + forward runs in a child of its own, whose peak RSS wait4 reports
for arg in sys.argv[1:]:
    ckpt, mode = arg.rsplit(":", 1)
    pid = os.fork()
    if pid == 0:
        try:
            load_and_run(ckpt, mode)
        except BaseException as e:
            print(f"{arg}: {e!r}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, arg
    print(arg, usage.ru_maxrss * 1024)
"""


def test_peak_rss_of_load_and_forward_grows_by_less_than_the_layers_fp32_weights(tmp_path):
    """Twice the layers: an fp32 copy adds their fp32 weights to the peak; kept bf16 only their touched pages."""
    import dataclasses
    import subprocess
    import sys

    from exporter.make_checkpoint import tensor_specs, write_checkpoint
    from exporter.model.config import PRESETS

    base = PRESETS["autoglm-phone-9b"]
    paths, layer_bytes = {}, 0
    for layers in (1, 2):
        cfg = base.replace(
            name=f"wide{layers}",
            text=dataclasses.replace(base.text, hidden_size=512, num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=16384),
            vision=dataclasses.replace(base.vision, hidden_size=32, depth=1, num_heads=2, out_hidden_size=512, intermediate_size=48),
        )
        paths[layers] = tmp_path / cfg.name
        write_checkpoint(paths[layers], cfg, seed=1, max_shard_size="200MB")
        (paths[layers] / "tokenizer.json").unlink()  # not needed here, and parsing it twice per load is slow
        layer_bytes = 4 * sum(s.numel for s in tensor_specs(cfg) if ".layers.0." in s.name)

    jobs = [f"{paths[n]}:{mode}" for mode in ("fp32", "keep") for n in (1, 2)]
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *jobs], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())
    grown = {mode: int(peak[f"{paths[2]}:{mode}"]) - int(peak[f"{paths[1]}:{mode}"]) for mode in ("fp32", "keep")}
    mib = {m: round(v / 2**20) for m, v in grown.items()}
    # the measurement sees one more layer's fp32 weights (99 MiB here) when they are copied to fp32 ...
    assert grown["fp32"] > 0.85 * layer_bytes, (mib, layer_bytes >> 20)
    # ... and with bf16 kept only that layer's bf16 pages, read by the forward (half of it): no fp32 copy
    assert grown["keep"] < 0.75 * layer_bytes, (mib, layer_bytes >> 20)
