"""Blockwise parity (``parity --blockwise``, exporter/parity/blockwise.py + targets/ort/blocks.py): each decoder
layer and vision block of an ORT artifact against the reference's, isolated and accumulated.

The block graphs are cut out of the artifact's own .onnx; a block whose weights are broken must show up as that
block (isolated) and from that block on (accumulated), and the other blocks must not move.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from cli import app
from core.artifact import read_artifact
from core.recipes import RecipeName
from core.runner import EagerSession
from exporter.parity import blockwise as blocks
from exporter.parity.inputs import default_inputs, read_inputs
from targets import get_target
from targets.ort.blocks import block_boundaries


def _capture(tiny_components, tiny_tokenizer):
    item = blocks.pick_item(read_inputs(default_inputs()))
    tiny_components.text_decoder.cache.reset()
    captures = blocks.capture(EagerSession(tiny_components), tiny_components.config, tiny_tokenizer, item)
    return item, captures


def test_every_block_boundary_is_found_in_the_graph(exported, tiny_components):
    art = exported("ort", RecipeName.FP32)
    graph = onnx.load(art.dir / "text_decoder.onnx", load_external_data=False).graph
    bounds = block_boundaries(graph, "text.layers")
    assert len(bounds) == tiny_components.config.text.num_layers
    assert bounds[0][0] == "inputs_embeds"
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))  # each block starts where the last ended


def test_fp32_blocks_match_the_reference_isolated_and_accumulated(exported, tiny_components, tiny_tokenizer):
    art = exported("ort", RecipeName.FP32)
    item, captures = _capture(tiny_components, tiny_tokenizer)
    assert sorted(captures) == ["text_decoder", "vision_encoder"]  # the picked item has an image
    section = blocks.compare_blocks(get_target("ort"), art, captures, item)
    for method, rows in section["methods"].items():
        assert len(rows) == len(captures[method].outputs)
        for row in rows:
            for kind in ("isolated", "accumulated"):
                assert row[kind]["cosine"] > 0.99999 and row[kind]["relative_l2"] < 1e-3, (method, row)


def test_blocks_read_weights_from_external_data_as_the_9b_keeps_them(exported, tiny_components, tiny_tokenizer,
                                                                      tmp_path):
    """Every 9B method keeps its weights in <method>.onnx.data, which onnxruntime reads only from the model's own
    folder: the blocks of such an artifact give the numbers the inline-weight export gives."""
    art = exported("ort", RecipeName.INT8_WEIGHT)
    external = tmp_path / "external"
    shutil.copytree(art.dir, external)
    for m in ("text_decoder", "vision_encoder"):
        onnx.save_model(onnx.load(external / f"{m}.onnx"), str(external / f"{m}.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{m}.onnx.data", size_threshold=1024)
        assert (external / f"{m}.onnx.data").stat().st_size > 100_000
    item, captures = _capture(tiny_components, tiny_tokenizer)
    inline = blocks.compare_blocks(get_target("ort"), art, captures, item)
    moved = blocks.compare_blocks(get_target("ort"), read_artifact(external), captures, item)
    for method, rows in inline["methods"].items():
        for a, b in zip(rows, moved["methods"][method]):
            for kind in ("isolated", "accumulated"):
                assert b[kind]["cosine"] == pytest.approx(a[kind]["cosine"], abs=1e-9), (method, a["block"], kind)


def test_a_broken_layer_shows_as_that_layer_isolated_and_from_it_on_accumulated(exported, tiny_components,
                                                                                 tiny_tokenizer, tmp_path):
    art = exported("ort", RecipeName.INT8_WEIGHT)
    broken = tmp_path / "broken"
    shutil.copytree(art.dir, broken)
    model = onnx.load(broken / "text_decoder.onnx")
    g = model.graph
    dq_scale = {n.output[0]: n.input[1] for n in g.node if n.op_type == "DequantizeLinear"}
    targets = {dq_scale[i] for n in g.node if n.op_type == "MatMul"  # layer 1's attention output and MLP down
               and n.name.startswith(("text.layers.1.self_attn.o_proj/", "text.layers.1.mlp.down_proj/"))
               for i in n.input if i in dq_scale}
    assert len(targets) == 2, targets
    for init in g.initializer:  # their int8 weights' scales, sign flipped
        if init.name in targets:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, broken / "text_decoder.onnx")
    item, captures = _capture(tiny_components, tiny_tokenizer)
    rows = blocks.compare_blocks(get_target("ort"), read_artifact(broken), captures, item)["methods"]
    layers = rows["text_decoder"]
    assert layers[0]["isolated"]["cosine"] > 0.999 and layers[0]["accumulated"]["cosine"] > 0.999
    assert layers[1]["isolated"]["cosine"] < 0.95 and layers[1]["accumulated"]["cosine"] < 0.95, layers[1]
    assert all(r["isolated"]["cosine"] > 0.999 for r in rows["vision_encoder"])


def test_parity_blockwise_from_the_cli(exported, tmp_path):
    art = exported("ort", RecipeName.INT8_WEIGHT)
    result = CliRunner().invoke(app, ["parity", str(art.dir), "--blockwise", "--steps", "2", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "blockwise text_decoder" in result.output and "blockwise vision_encoder" in result.output
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    layers = report["blockwise"]["methods"]["text_decoder"]
    assert [r["block"] for r in layers] == [f"text.layers.{i}" for i in range(len(layers))]
    assert report["blockwise"]["prompt"]["image"]
    assert all(np.isfinite(r["isolated"]["cosine"]) for r in layers)


def test_blockwise_on_a_target_without_block_tensors_exits_2_before_any_work(exported, tmp_path):
    art = exported("executorch", RecipeName.FP32)
    result = CliRunner().invoke(app, ["parity", str(art.dir), "--blockwise", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert "--blockwise: executorch artifacts do not expose" in result.output
    assert not (tmp_path / "p").exists()
