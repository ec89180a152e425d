"""Head pruning and layer skipping (the seed's compression) are exact structural removals.

A pruned model equals the original with the removed heads' o_proj columns zeroed; a model with skipped layers
equals the original with those layers turned into identities (their o_proj and down_proj zeroed). Scores come
from the calibration set; the export records what was removed and parity compares with the unpruned model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app


@pytest.fixture(scope="module")
def scored():
    from calibration import importance
    from core.components import build_components
    from exporter.model import build, get_preset
    from core.runner import load_tokenizer

    model = build(get_preset("tiny"))
    prompts = importance.builtin_prompts()[:4]
    return model, importance.measure(build_components(model), prompts, load_tokenizer(model.config))


def _logits(model, ids):
    t = ids.shape[1]
    with torch.no_grad():
        return model.text.forward_full(model.text.embed_tokens(ids), torch.arange(t)[None].expand(3, t))[0]


IDS = torch.tensor([[1, 2, 4, 100, 200, 300, 400, 500, 600, 700, 5, 13]])


def test_scores_have_the_models_shape(scored):
    model, s = scored
    t = model.config.text
    assert np.asarray(s["heads"]).shape == (t.num_layers, t.num_heads)
    assert np.asarray(s["blocks"]).shape == (t.num_layers,)
    assert (np.asarray(s["heads"]) > 0).all() and s["tokens"] > 100
    assert len(set(np.asarray(s["heads"]).ravel().round(6))) > 1  # the heads really differ


def test_pruned_model_equals_zeroed_heads(scored):
    from exporter.compress import prune_heads

    model, s = scored
    pruned, rec = prune_heads(model, s, 0.5)
    t = model.config.text
    assert pruned.config.text.num_heads == t.num_heads // 2 and pruned.config.text.head_dim == t.head_dim
    assert pruned.text.layers[0].self_attn.q_proj.weight.shape[0] == t.num_heads // 2 * t.head_dim
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    d = t.head_dim
    per_group = t.num_heads // t.num_kv_heads
    for i, heads in rec["removed_heads"].items():
        assert len(heads) == t.num_kv_heads  # one per KV group: GQA kept uniform
        assert sorted(h // per_group for h in heads) == list(range(t.num_kv_heads))
        for h in heads:
            ref[f"text.layers.{i}.self_attn.o_proj.weight"][:, h * d:(h + 1) * d] = 0
    zeroed = type(model)(model.config).eval()
    zeroed.load_state_dict(ref)
    assert (_logits(zeroed, IDS) - _logits(pruned, IDS)).abs().max().item() < 1e-5
    assert (_logits(model, IDS) - _logits(pruned, IDS)).abs().max().item() > 1e-3  # pruning did change the model


def test_skipped_layers_equal_identity_layers(scored):
    from exporter.compress import skip_layers

    model, s = scored
    short, rec = skip_layers(model, s, 1)
    assert rec["removed_layers"] == [int(np.argmin(s["blocks"]))]
    assert short.config.text.num_layers == model.config.text.num_layers - 1
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    i = rec["removed_layers"][0]
    for w in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        ref[f"text.layers.{i}.{w}"].zero_()
    identity = type(model)(model.config).eval()
    identity.load_state_dict(ref)
    assert (_logits(identity, IDS) - _logits(short, IDS)).abs().max().item() < 1e-5


@pytest.mark.parametrize("args, needle", [
    (["--prune-heads", "1.5"], "fraction in (0, 1)"),
    (["--prune-heads", "0.1"], "removes 0"),
    (["--skip-layers", "2"], "between 1 and 1"),
])
def test_bad_settings_are_refused(args, needle, tmp_path):
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "fp32", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_pruned_export_records_removal_and_parity_compares_with_unpruned(tmp_path):
    import onnx

    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "fp32", "--prune-heads", "0.5",
                                 "--skip-layers", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "artifact.json").read_text())["metadata"]
    comp = meta["compression"]
    assert comp["num_heads"] == [4, 2] and comp["num_layers"] == [2, 1] and len(comp["removed_layers"]) == 1
    graph = onnx.load(str(out / "text_decoder.onnx"), load_external_data=False).graph
    pasts = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert len(pasts) == 2  # one layer left: its key and value
    r = CliRunner().invoke(app, ["parity", str(out), "--steps", "4"])
    report = json.loads((out / "parity" / "report.json").read_text())
    assert report["methods"]["text_decoder"]["cosine"] < 0.999  # against the unpruned reference: the cost shows
    assert r.exit_code == 1  # fp32 thresholds are for exact exports
