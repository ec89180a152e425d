"""SmoothQuant smoothing (calibration/smooth.py) on the tiny preset: folded, function-preserving, and it
makes planted activation outliers quantizable."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

OUTLIER_CHANNELS = {  # (layer module whose *input* gets an outlier channel, how the model is rescaled to plant it)
    "text.layers.0.mlp.down_proj": "up",
    "text.layers.1.self_attn.q_proj": "norm",
    "text.layers.1.self_attn.o_proj": "v",
}


def _plant(model, factor: float = 60.0):
    """Function-preserving rescalings that give three linears an input channel ``factor`` x larger than the
    rest, as trained LLMs have (norm weight / up row / v row x factor, the consuming columns / factor)."""
    import torch

    t = model.config.text
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, how in OUTLIER_CHANNELS.items():
            layer = mods[name.rsplit(".", 2)[0]]
            if how == "up":
                inter = layer.mlp.down_proj.in_features
                layer.mlp.gate_up_proj.weight[inter + 3] *= factor
                layer.mlp.down_proj.weight[:, 3] /= factor
            elif how == "norm":
                layer.input_layernorm.weight[5] *= factor
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.weight[:, 5] /= factor
            else:  # v row 2 of KV group 0 feeds o_proj column (h * head_dim + 2) of every query head of the group
                layer.self_attn.v_proj.weight[2] *= factor
                if layer.self_attn.v_proj.bias is not None:
                    layer.self_attn.v_proj.bias[2] *= factor
                rep = t.num_heads // t.num_kv_heads
                for h in range(rep):
                    layer.self_attn.o_proj.weight[:, h * t.head_dim + 2] /= factor
    return model


@pytest.fixture(scope="module")
def planted(tiny_calibration):
    """(components of the tiny model with planted outliers, its decoder calls, per-channel input max)."""
    from calibration.smooth import input_absmax
    from core.components import build_components
    from exporter.model import build, get_preset

    comps = build_components(_plant(build(get_preset("tiny"))))
    calls = {"text_decoder": tiny_calibration["text_decoder"][:24]}
    return comps, calls, input_absmax(comps, calls)


def _logits(comps, calls):
    from calibration.sensitivity import replay

    return replay(comps, "text_decoder", calls["text_decoder"])


def _stats(comps, calls):
    """Per-tensor activation ranges of ``comps``' own linears (what a static export calibrates)."""
    from calibration.smooth import input_absmax

    return SimpleNamespace(method_inputs=calls,
                           activation_stats={n: {"absmax": float(v.max()), "min": -float(v.max()), "max": float(v.max())}
                                             for n, v in input_absmax(comps, calls).items()})


def test_planted_outliers_are_there(planted):
    comps, calls, xmax = planted
    for name in OUTLIER_CHANNELS:
        v = xmax[name].numpy()
        assert v.max() > 10 * np.median(v), name


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_preserves_fp32_logits(planted, alpha):
    from calibration.smooth import smooth_model
    from core.components import build_components

    comps, calls, xmax = planted
    before = _logits(comps, calls)
    new, record = smooth_model(comps.model, xmax, alpha)
    after = _logits(build_components(new), calls)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(before, after))
    assert worst < 1e-4, worst
    assert record["alpha"] == alpha and record["layers"] == comps.config.text.num_layers
    # no op was added: same modules, same parameter shapes; the original model is untouched
    assert [(n, p.shape) for n, p in new.named_parameters()] == [(n, p.shape) for n, p in comps.model.named_parameters()]
    again = _logits(comps, calls)
    assert all(np.array_equal(a, b) for a, b in zip(before, again))
    changed = [n for (n, p), (_, q) in zip(new.named_parameters(), comps.model.named_parameters()) if not np.array_equal(p.detach().numpy(), q.detach().numpy())]
    assert any("input_layernorm" in n for n in changed) and any("v_proj" in n for n in changed)
    assert not any("lm_head" in n or "embed" in n for n in changed)


def test_smoothing_flattens_outlier_channels_and_int8_static_gains(planted):
    """Each planted outlier channel is pulled into the others' range, and the w8a8 simulation (static per-tensor
    int8 inputs, as int8-static exports) of the whole decoder gets closer to float."""
    from calibration.sensitivity import quantized_cosine
    from calibration.smooth import input_absmax, smooth_model
    from core.components import build_components

    from calibration.smooth import smoothed_absmax

    comps, calls, xmax = planted
    scales = {}
    smoothed = build_components(smooth_model(comps.model, xmax, 0.5, scales)[0])
    after = input_absmax(smoothed, calls)
    predicted = smoothed_absmax(xmax, scales)  # without running the smoothed model
    assert len(scales) == 6 * comps.config.text.num_layers
    for name, v in after.items():
        np.testing.assert_allclose(predicted[name].numpy(), v.numpy(), rtol=1e-4, atol=1e-6)
    for name in OUTLIER_CHANNELS:
        ratio = lambda v: float(v.max() / np.median(v.numpy()))  # noqa: E731
        assert ratio(after[name]) < ratio(xmax[name]) / 3, (name, ratio(xmax[name]), ratio(after[name]))
    plain = quantized_cosine(comps, _stats(comps, calls))["text_decoder"]
    smooth = quantized_cosine(smoothed, _stats(smoothed, calls))["text_decoder"]
    assert smooth > plain and (1 - smooth) < (1 - plain) / 2, (plain, smooth)


def test_alpha_is_checked():
    from calibration.smooth import check_alpha
    from core.errors import BadInputError

    for bad in (0, -0.5, 1.5):
        with pytest.raises(BadInputError, match="--smooth"):
            check_alpha(bad)
    assert check_alpha(1) == 1.0


# --- the one-pass --parity-target search (calibration.sensitivity.search_keep_float) -----------------------


def test_search_keeps_the_outlier_layers_and_validates_on_held_out(planted, tiny_calibration):
    """Every layer int8 in one pass, errors attributed by gradient: the planted outlier layers are what it keeps,
    the set meets the target on the search prompts, and it is measured again on prompts it never saw."""
    from calibration.sensitivity import evaluate, search_keep_float, split_calls

    comps, _, xmax = planted
    calls = {"text_decoder": tiny_calibration["text_decoder"]}
    calib = _stats(comps, calls)
    search, held = split_calls(calib, "text_decoder")
    assert search and held and not {id(c) for u in held for c in u} & {id(c) for u in search for c in u}
    all_int8 = evaluate(comps, calib, "text_decoder", search, (), "w8a8")
    target = 1 - (1 - all_int8) / 20  # needs float layers
    found = search_keep_float(comps, calib, target)
    assert found.keep and set(found.keep) & set(OUTLIER_CHANNELS), found.keep
    assert found.met_on_search and found.search_cosine["text_decoder"] >= target
    assert found.heldout_cosine["text_decoder"] == pytest.approx(evaluate(comps, calib, "text_decoder", held, found.keep, "w8a8"))
    # shortest prefix of its order: one layer fewer misses the target on the search prompts
    assert evaluate(comps, calib, "text_decoder", search, found.keep[:-1], "w8a8") < target
    assert found.passes < len(found.keep) + 8  # not a replay per layer
    rec = found.record()
    assert rec["kept"] == len(found.keep) and rec["prompts"]["heldout"] == len(held)
    assert ("target met on both" in found.summary()) == found.met_on_heldout


def test_search_says_when_the_target_is_missed():
    from calibration.sensitivity import SearchResult

    r = SearchResult(("a",), 0.999, 10, {"text_decoder": 0.9992}, {"text_decoder": 0.995}, 3, prompts=(16, 8))
    assert not r.met_on_heldout and r.met_on_search
    assert "TARGET MISSED on the held-out prompts" in r.summary() and "0.99500 on 8 held-out" in r.summary()
    assert r.record()["met_on_heldout"] is False
    r = SearchResult(("a",), 0.999, 10, {"text_decoder": 0.99}, {"text_decoder": 0.99}, 3)
    assert "TARGET MISSED even with every searched layer in float" in r.summary()


@pytest.mark.parametrize("args", [
    ["--recipe", "int8-static", "--smooth", "0"],
    ["--recipe", "int8-static", "--smooth", "1.5"],
    ["--recipe", "fp32", "--smooth", "0.5"],
])
def test_export_refuses_bad_smooth_before_model_work(args, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["export", "--target", "ort", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert "--smooth" in r.output and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smoothed_int8_static_export_records_and_passes_its_check(tmp_path):
    """--smooth through the export command's path (exporter.export): the artifact records it, the export check
    ran against the unsmoothed eager model and passed its gate, and --parity-target's search is recorded."""
    from exporter import pipeline
    from heldout import calibration_subset

    calib = calibration_subset(tmp_path / "calib.jsonl")
    art = pipeline.export("ort", "int8-static", tmp_path / "a", calibration=calib, smooth=0.5, parity_target="cos=0.9999")
    comp = art.metadata["compression"]
    assert comp["smooth"]["alpha"] == 0.5 and comp["smooth"]["layers"] == 2
    assert comp["parity_search"]["kept"] == len(art.metadata["keep_float"])
    assert "held-out" in comp["parity_search"]["summary"]
    check = art.info["report"]["export_check"]
    assert check["measured"] and check["methods"]["text_decoder"]["cosine"] > 0.99


# --- GPTQ-style int8 rounding (calibration/gptq.py) -----------------------------------------------------


def _correlated_inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 256, generator=g) * torch.where(torch.rand(256, generator=g) < 0.03, 20.0, 1.0)
    x[:, :128] += 0.5 * x[:, 128:]  # correlated channels: what GPTQ's error spreading uses
    w = torch.randn(48, 256, generator=g) * 0.05
    return x, w


def test_gptq_lowers_output_error_and_stays_on_every_targets_int8_grid():
    """Less output error than round-to-nearest on its inputs; the float result is reproduced integer for
    integer by ORT's own per-channel int8 quantizer (the grid the other targets share)."""
    import torch

    from calibration.gptq import gptq_round, output_error, rtn as _rtn
    from targets.ort.quantize_int8 import _symmetric_int8

    x, w = _correlated_inputs()
    h = x.double().T @ x.double()
    q = gptq_round(w, h)
    rtn = _rtn(w.double()).float()
    assert output_error(w, q, h) < 0.9 * output_error(w, rtn, h)
    assert not torch.equal(q, rtn)  # it really rounded differently
    ints, scale = _symmetric_int8(q.numpy(), 0)
    np.testing.assert_allclose(scale, (w.abs().amax(dim=1) / 127).numpy(), rtol=1e-6)  # each row's scale unchanged
    np.testing.assert_allclose(ints.astype(np.float32) * scale[:, None], q.numpy(), rtol=0, atol=1e-7)


def test_gptq_rounds_the_decoder_linears_not_lm_head_or_kept_layers(planted):
    from torch import nn

    from calibration.gptq import round_weights
    from targets.ort.quantize_int8 import _symmetric_int8

    comps, calls, _ = planted
    skip = {"text.layers.1.mlp.down_proj"}
    model, record = round_weights(comps, calls, skip=skip)
    old, new = dict(comps.model.named_modules()), dict(model.named_modules())
    rounded = {n for n, m in new.items() if n.startswith("text.layers.") and isinstance(m, nn.Linear)} - skip
    assert record["layers"] == len(rounded) and record["output_error_vs_rtn_median"] < 1.0
    for n in rounded:
        w = new[n].weight.detach().numpy()
        ints, scale = _symmetric_int8(w, 0)
        np.testing.assert_allclose(ints * scale[:, None], w, rtol=0, atol=1e-6)
        assert not np.array_equal(w, old[n].weight.detach().numpy()), n
    for n in ("text.lm_head", *skip):
        assert np.array_equal(new[n].weight.detach().numpy(), old[n].weight.detach().numpy()), n


def _onnx_matmul_nbits_ints(w, bits: int, block: int):
    """onnxruntime's own MatMulNBits quantizer on ``w`` [out, in]: the integers (as signed) and the scales per block."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out_f, in_f = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_f])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_f])],
                          [numpy_helper.from_array(np.ascontiguousarray(w.T, np.float32), "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits,
                                       quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    node = next(n for n in q.model.model.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in q.model.model.graph.initializer}
    packed = inits[node.input[1]].reshape(out_f, -1).astype(np.int16)
    if bits == 4:
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(out_f, -1)
    ints = packed[:, :in_f] - (1 << (bits - 1))
    return ints, inits[node.input[2]].reshape(out_f, -1)


@pytest.mark.parametrize("bits,block,act_order", [(4, 32, False), (4, 128, False), (8, 64, False), (4, 32, True)])
def test_gptq_on_onnxruntimes_block_grid_is_what_its_quantizer_writes(bits, block, act_order):
    """GPTQ onto MatMulNBits' grid (scale = a block's signed extreme / -2^(bits-1)): onnxruntime's own quantizer,
    given GPTQ's float weights, writes GPTQ's integers and scales, and the output error is below its own
    round-to-nearest's; also with act-order (columns out of order, every block's scale fixed beforehand)."""
    import torch

    from calibration.gptq import gptq_round, output_error, rtn
    from core.recipes import WeightGrid

    x, w = _correlated_inputs()
    h = x.double().T @ x.double()
    grid = WeightGrid(bits, block, full_range=True)
    q = gptq_round(w, h, grid, act_order=act_order)
    ints, scales = _onnx_matmul_nbits_ints(q.numpy(), bits, block)
    deq = ints.reshape(48, -1, block) * scales[..., None]
    np.testing.assert_allclose(deq.reshape(48, -1), q.numpy(), rtol=0, atol=1e-6)
    assert ints.min() >= -(1 << (bits - 1)) and ints.max() < (1 << (bits - 1))
    rtn_ints, rtn_scales = _onnx_matmul_nbits_ints(w.numpy(), bits, block)  # what the quantizer does on its own
    ort_rtn = torch.from_numpy((rtn_ints.reshape(48, -1, block) * rtn_scales[..., None]).reshape(48, -1).astype(np.float32))
    np.testing.assert_allclose(rtn(w.double(), grid).numpy(), ort_rtn.numpy(), rtol=0, atol=1e-6)  # our RTN is theirs
    assert output_error(w, q, h) < (0.8 if act_order else 0.9) * output_error(w, ort_rtn, h)


@pytest.mark.parametrize("block", [32, 0])
def test_gptq_on_coremltools_int4_grid_is_what_its_quantizer_writes(block):
    """coremltools' linear_symmetric int4 (scale max / 7, integers +-7) per block and per channel, run on the fp16
    weights a Core ML program holds: GPTQ's integers come back; a width the block does not tile falls back to int8."""
    from coremltools.optimize._utils import compute_qparams

    from calibration.gptq import gptq_round, output_error, rtn
    from core.recipes import WeightGrid

    x, w = _correlated_inputs()
    h = x.double().T @ x.double()
    grid = WeightGrid(4, block, tiles_only=True)
    q = gptq_round(w, h, grid)
    ints, scale, _ = compute_qparams(q.numpy().astype(np.float16), nbits=4, signed=True,
                                     quantization_mode="LINEAR_SYMMETRIC", dtype=np.int8, block_sizes=[1, block])
    full = np.repeat(scale.reshape(48, -1).astype(np.float32), block or 256, axis=1)
    np.testing.assert_allclose(ints * full, q.numpy(), rtol=2e-3, atol=1e-6)  # fp16 scale: 1e-3 relative
    assert np.abs(ints).max() == 7
    assert output_error(w, q, h) < 0.9 * output_error(w, rtn(w.double(), grid), h)
    assert grid.for_width(250) == WeightGrid() if block else grid.for_width(250) == grid


@pytest.mark.slow
def test_gptq_int4_export_writes_gptqs_integers_into_the_onnx(tmp_path):
    """`export --target ort --recipe int4-weight --gptq` on tiny: the decoder's MatMulNBits hold exactly the
    weights GPTQ rounded (recomputed here from the same built-in calibration set), not onnxruntime's own RTN."""
    import onnx
    import torch
    from onnx import numpy_helper

    from calibration.gptq import round_weights
    from core.components import build_components
    from core.recipes import WeightGrid
    from exporter import pipeline
    from exporter.export import calibration_data
    from exporter.reference import load_reference

    from heldout import calibration_subset

    calib = calibration_subset(tmp_path / "calib.jsonl", {"text": 8})  # GPTQ reads the decoder's inputs only
    art = pipeline.export("ort", "int4-weight", tmp_path / "a", calibration=calib, gptq=True)
    rec = art.metadata["compression"]["gptq"]
    assert "int4 blocks of 32, scale signed extreme / -8" in rec["method"] and rec["output_error_vs_rtn_median"] < 1
    comps = build_components(load_reference("tiny"))
    comps.text_decoder.cache.reset()
    model, _ = round_weights(comps, calibration_data(comps, calib, None), WeightGrid(4, 32, full_range=True))
    want = dict(model.named_modules())["text.layers.0.mlp.down_proj"].weight.detach().numpy()
    m = onnx.load(str(tmp_path / "a" / "text_decoder.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("text.layers.0.mlp.down_proj/"))
    out_f, in_f = want.shape
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(out_f, -1).astype(np.int16)
    ints = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(out_f, -1)[:, :in_f] - 8
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(out_f, -1)
    got = (ints.reshape(out_f, -1, 32) * scales[..., None]).reshape(out_f, in_f)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    rtn = torch.from_numpy(load_reference("tiny").text.layers[0].mlp.down_proj.weight.detach().numpy())
    assert not np.allclose(got, rtn.numpy(), atol=1e-3)


def test_gptq_that_would_not_fit_in_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    """--gptq rounds the whole model at once (a copy and a Hessian per linear): on a machine too small for that
    (here: tiny on a pretend 1 MiB machine; in life the 9B on 24 GiB) it is one line, exit 2, nothing written."""
    from typer.testing import CliRunner

    import calibration.gptq
    from cli import app
    from exporter import export
    from exporter.reference import load_reference

    monkeypatch.setattr(export, "physical_memory", lambda: 1 << 20)
    called = []
    monkeypatch.setattr(calibration.gptq, "hessians", lambda *a, **k: called.append(1))
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "int4-weight", "--gptq",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "--gptq would hold" in r.output and "GiB" in r.output and not called
    assert not (tmp_path / "o").exists()
    need = calibration.gptq.memory_needed(load_reference("tiny"))
    assert 0 < need < (1 << 30)


@pytest.mark.parametrize("target,args", [
    ("executorch", ["--recipe", "8da4w", "--gptq"]),  # torchao's grid: max / 7.5
    ("executorch", ["--recipe", "int8-weight", "--gptq"]),  # max / 127.5
    ("ort", ["--recipe", "fp32", "--gptq"]),
    ("ort", ["--recipe", "int8-static", "--gptq", "--parity-target", "cos=0.999"]),
])
def test_export_refuses_gptq_where_it_does_not_apply(target, args, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["export", "--target", target, "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert "--gptq" in r.output and not (tmp_path / "o").exists()


# --- GPTQ as a recipe's default ------------------------------------------------------------------------


@pytest.mark.parametrize("target, recipe, extra, default_on", [
    ("ort", "int4-weight", {}, True),  # the drift table: top-1 0.604 -> 0.836 on SmolLM2
    ("coreml", "int8-weight", {}, True),  # 0.961 -> 0.984
    ("ort", "int8-weight", {}, False),  # onnxruntime's int8 input blocks: GPTQ measured worse (0.975 -> 0.961)
    ("coreml", "int4-weight", {}, True),  # 0.524 -> 0.766, perplexity +36.2 % -> +20.7 %
    ("executorch", "8da4w", {}, False),  # torchao's grid: GPTQ refused
    ("ort", "int4-weight", {"gptq": False}, False),  # --no-gptq
    ("coreml", "int8-weight", {"parity_target": "cos=0.999"}, False),  # not combined with the search
])
def test_gptq_is_the_default_where_the_drift_table_measured_it_better(tmp_path, target, recipe, extra, default_on):
    from exporter.export import plan

    p = plan(target, recipe, tmp_path / "o", **extra)
    assert (p.gptq is not None) == default_on and p.gptq_by_default == default_on
    assert p.needs_calibration == (default_on or "parity_target" in extra)
    explicit = plan(target, recipe, tmp_path / "o", gptq=True) if target != "executorch" else None
    assert explicit is None or (explicit.gptq is not None and not explicit.gptq_by_default)


@pytest.mark.slow
def test_default_gptq_too_large_for_the_machine_rounds_to_nearest_and_says_so(tmp_path, monkeypatch):
    """The recipe's default GPTQ on a model it cannot hold (tiny on a pretend 1 MiB machine; the 9B on 24 GiB) is
    skipped, not an error: the export rounds to nearest, prints why, and records it in artifact.json. Asked for
    with --gptq it is still refused (test above)."""
    from typer.testing import CliRunner

    import calibration.gptq
    from cli import app
    from core.artifact import read_artifact
    from exporter import export

    monkeypatch.setattr(export, "physical_memory", lambda: 1 << 20)
    called = []
    monkeypatch.setattr(calibration.gptq, "hessians", lambda *a, **k: called.append(1))
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "int4-weight", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "gptq: not applied, rounded to nearest: GPTQ (this recipe's default) would hold" in r.output and not called
    comp = read_artifact(tmp_path / "o").metadata["compression"]
    assert "gptq" not in comp and "GiB" in comp["gptq_skipped"]
