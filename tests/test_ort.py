"""ONNX Runtime mobile target: real onnxruntime on the tiny preset, each recipe exported once per session
(conftest's ``exported``, through targets.lifecycle). What every target shares (export succeeds, artifact.json,
session on the .onnx, parity) is the conformance suite's (tests/test_targets.py); here: ORT's own layout, graphs,
quantizers, the .ort files and the genai I/O."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from core.runner import EagerSession, Prompt, Runner
from heldout import cos, row_cos
from core.artifact import read_artifact
from core.recipes import Recipe, RecipeName
from targets import get_target
from targets.base import method_outputs
from targets.lifecycle import export
from targets.ort import SPEC
from targets.ort.graphs import decoder_feeds, graph_io
from targets.ort.session import OrtSession

pytestmark = pytest.mark.slow

METHOD_FILES = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")
FP32, INT8_WEIGHT, INT8_STATIC, INT4_WEIGHT = (RecipeName.FP32, RecipeName.INT8_WEIGHT, RecipeName.INT8_STATIC,
                                                RecipeName.INT4_WEIGHT)


@pytest.fixture(scope="session")
def ort_artifacts(exported):
    """recipe -> the shared tiny export of that recipe (built on first use)."""

    class Lazy(dict):
        def __missing__(self, recipe):
            return exported("ort", recipe)

    return Lazy()


def _open(art, variant=None):
    return get_target("ort").open(art, variant)


def _method_outputs(session, eager_run) -> dict[str, np.ndarray]:
    """Each method's output on the same (eager) inputs; the decoder is teacher-forced with eager embeddings."""
    return method_outputs(session, eager_run["runner"], eager_run["segments"], eager_run["result"].tokens[:-1])


@pytest.fixture(scope="module")
def reference_outputs(tiny_components, eager_run):
    return _method_outputs(EagerSession(tiny_components), eager_run)


# --- the spec ------------------------------------------------------------------------------


def test_spec_and_package_import_no_runtime():
    """--help and every check before model work read SPEC: importing it must not pull in torch, onnx or onnxruntime."""
    code = ("import sys, targets.ort as t; t.SPEC.recipe_names; "
            "print(sorted({'torch', 'onnx', 'onnxruntime', 'onnxscript', 'onnxruntime_genai'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def _ops(art) -> set[str]:
    """Every op type of every method's .onnx."""
    return {n.op_type for m in METHOD_FILES for n in onnx.load(art.dir / f"{m}.onnx", load_external_data=False).graph.node}


@pytest.mark.parametrize("recipe", [FP32, INT8_WEIGHT, INT8_STATIC, INT4_WEIGHT])
def test_spec_scheme_is_what_the_exported_graphs_hold(ort_artifacts, recipe):
    """The scheme the sensitivity simulation reads is what build wrote: weight bits, activations, embedding rows."""
    scheme, art = SPEC.recipe(recipe).scheme, ort_artifacts[recipe]
    ops = _ops(art)
    t = _config(ort_artifacts).text
    assert ("MatMulNBits" in ops) == (scheme.weight_bits == 4) == scheme.groupwise
    assert ("DequantizeLinear" in ops) == (scheme.weight_bits is not None), ops  # int8 weights (int4-weight: the convs)
    assert ("QuantizeLinear" in ops) == (scheme.activations == "static"), ops
    assert _embedding_table_is_int8(art.dir / "token_embedding.onnx", t.vocab_size, t.hidden_size) == (scheme.embedding_bits == 8)


def test_open_refuses_a_variant_that_is_not_onnx_or_ort(ort_artifacts):
    from core.errors import BadInputError

    with pytest.raises(BadInputError, match="'onnx' or 'ort', not 'pte'"):
        _open(ort_artifacts[FP32], "pte")
    assert _open(ort_artifacts[FP32], ".ort").format == "ort"


# --- layout ------------------------------------------------------------------------------


def test_artifact_holds_onnx_ort_ops_config_genai_config_and_usability_report(ort_artifacts):
    art = ort_artifacts[FP32]
    names = set(art.files)
    for m in METHOD_FILES:
        assert {f"{m}.onnx", f"{m}.ort"} <= names
    assert {"required_operators_and_types.config", "genai_config.json", "tokenizer.json", "mobile_usability.txt"} <= names
    ops = (art.dir / "required_operators_and_types.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops
    # the header names the converted models by file name, not by the export's staging path
    assert "# - text_decoder.ort" in ops.splitlines() and str(art.dir.parent) not in ops
    assert str(art.dir.parent) not in (art.dir / "mobile_usability.txt").read_text()
    report = art.info["report"]["mobile_usability"]
    assert set(report) == set(METHOD_FILES) and all(r["checked"] for r in report.values())
    text = (art.dir / "mobile_usability.txt").read_text()
    assert "NNAPI" in text and "CoreML" in text
    # nothing but the listed files and artifact.json
    assert {p.name for p in art.dir.iterdir()} == names | {"artifact.json"}


def test_decoder_has_genai_past_present_io_with_dynamic_lengths(ort_artifacts):
    model = onnx.load(ort_artifacts[FP32].dir / "text_decoder.onnx", load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    n = json.loads((ort_artifacts[FP32].dir / "artifact.json").read_text())["metadata"]["model"]["text"]["num_layers"]
    for i in range(n):
        for kv in ("key", "value"):
            past = inputs[f"past_key_values.{i}.{kv}"].type.tensor_type.shape.dim
            present = outputs[f"present.{i}.{kv}"].type.tensor_type.shape.dim
            assert past[2].dim_param and not past[2].dim_value  # dynamic past length
            assert present[2].dim_param and present[2].dim_param != past[2].dim_param
    seq = inputs["inputs_embeds"].type.tensor_type.shape.dim[1]
    assert seq.dim_param and inputs["position_ids"].type.tensor_type.shape.dim[2].dim_param == seq.dim_param
    assert set(inputs) == set(graph_io(_config(ort_artifacts))["text_decoder"][0])


ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 9: "bool"}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16", "tensor(int32)": "int32"}


def _declared(values) -> list[dict]:
    """Graph inputs/outputs as onnx declares them, read independently of targets.ort."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out.append({"name": v.name, "dtype": ONNX_DTYPES[t.elem_type], "shape": shape})
    return out


@pytest.mark.parametrize("recipe", [FP32, INT8_STATIC, INT4_WEIGHT])
def test_artifact_json_programs_are_the_saved_graphs_io(ort_artifacts, recipe):
    art = ort_artifacts[recipe]
    info = art.info
    assert "methods" not in info and set(info["runner_interface"]) == set(METHOD_FILES)
    programs = info["programs"]
    assert set(programs) == set(METHOD_FILES)
    for m in METHOD_FILES:
        entry = programs[m]
        assert entry["file"] == f"{m}.onnx" and entry["ort_file"] == f"{m}.ort"
        assert entry["file"] in art.files and entry["ort_file"] in art.files
        graph = onnx.load(art.dir / entry["file"], load_external_data=False).graph
        assert entry["inputs"] == _declared(graph.input), m
        assert entry["outputs"] == _declared(graph.output), m
        # the .ort is the same program: onnxruntime reports the same I/O for it
        import onnxruntime as ort

        sess = ort.InferenceSession(str(art.dir / entry["ort_file"]), providers=["CPUExecutionProvider"])
        for declared, actual in ((entry["inputs"], sess.get_inputs()), (entry["outputs"], sess.get_outputs())):
            assert [(d["name"], d["dtype"], d["shape"]) for d in declared] == [
                (a.name, ORT_DTYPES[a.type], list(a.shape)) for a in actual
            ], m


def test_programs_differ_from_the_runner_interface_where_the_graphs_do(ort_artifacts):
    """What a C++/Swift app reads from artifact.json: genai's names and layouts, not the runner's."""
    info = ort_artifacts[FP32].info
    cfg = _config(ort_artifacts)
    t = cfg.text
    dec = {d["name"]: d for d in info["programs"]["text_decoder"]["inputs"]}
    assert "embeds" in info["runner_interface"]["text_decoder"]["inputs"] and "embeds" not in dec
    assert dec["inputs_embeds"]["shape"] == [1, "sequence_length", t.hidden_size]
    assert dec["position_ids"] == {"name": "position_ids", "dtype": "int64", "shape": [3, 1, "sequence_length"]}
    for i in range(t.num_layers):
        for kv in ("key", "value"):
            assert dec[f"past_key_values.{i}.{kv}"] == {
                "name": f"past_key_values.{i}.{kv}", "dtype": "float32",
                "shape": [1, t.num_kv_heads, "past_sequence_length", t.head_dim],
            }
    outs = [d["name"] for d in info["programs"]["text_decoder"]["outputs"]]
    assert outs == ["logits"] + [f"present.{i}.{kv}" for i in range(t.num_layers) for kv in ("key", "value")]
    vision = info["programs"]["vision_encoder"]
    s = cfg.shape.image_size
    assert vision["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, s, s]}]
    assert vision["outputs"] == [{"name": "image_features", "dtype": "float32", "shape": [cfg.image_tokens, t.hidden_size]}]


def _config(ort_artifacts):
    from exporter.model.config import ModelConfig

    return ModelConfig.from_dict(ort_artifacts[FP32].metadata["model"])


def test_metadata_in_metadata_props_and_artifact_json(ort_artifacts):
    art = ort_artifacts[INT8_STATIC]
    for m in METHOD_FILES:
        props = {p.key: p.value for p in onnx.load(art.dir / f"{m}.onnx", load_external_data=False).metadata_props}
        assert props["autoglm.method"] == m
        assert props["autoglm.recipe"] == INT8_STATIC
        assert json.loads(props["autoglm.max_seq_len"]) == art.metadata["max_seq_len"]
        assert json.loads(props["autoglm.eos_ids"]) == art.metadata["eos_ids"]
    assert art.info["runtime_versions"]["onnxruntime"] and art.info["export"]["wall_s"] > 0


def test_genai_config_follows_the_multimodal_layout(ort_artifacts):
    art = ort_artifacts[FP32]
    cfg = json.loads((art.dir / "genai_config.json").read_text())["model"]
    assert cfg["decoder"]["filename"] == "text_decoder.onnx"
    assert cfg["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert cfg["decoder"]["outputs"]["present_value_names"] == "present.%d.value"
    assert cfg["embedding"]["filename"] == "token_embedding.onnx" and cfg["vision"]["filename"] == "vision_encoder.onnx"
    for section, method in (("decoder", "text_decoder"), ("embedding", "token_embedding"), ("vision", "vision_encoder")):
        model = onnx.load(art.dir / cfg[section]["filename"], load_external_data=False)
        names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
        for value in list(cfg[section]["inputs"].values()) + list(cfg[section]["outputs"].values()):
            assert value.replace("%d", "0") in names, (section, value)


# --- fp32 parity of the .ort files (the .onnx session is the conformance suite's) ---------------


def test_fp32_ort_files_each_method_equals_eager(ort_artifacts, eager_run, reference_outputs):
    session = _open(ort_artifacts[FP32], "ort")
    got = _method_outputs(session, eager_run)
    for m in METHOD_FILES:
        assert got[m].shape == reference_outputs[m].shape
        assert np.abs(got[m] - reference_outputs[m]).max() <= 1e-4, m


def test_fp32_ort_files_greedy_16_tokens_with_image_and_audio_equal_eager(ort_artifacts, tiny_components, tiny_tokenizer, media):
    prompt = Prompt(text=media["prompt"], image=media["image"], audio=media["audio"])
    cfg = tiny_components.config
    expected = Runner(EagerSession(tiny_components), cfg, tiny_tokenizer).generate(prompt, max_new_tokens=16, stop_at_eos=False)
    got = Runner(_open(ort_artifacts[FP32], "ort"), cfg, tiny_tokenizer).generate(
        prompt, max_new_tokens=16, stop_at_eos=False
    )
    assert len(got.tokens) == 16 and got.tokens == expected.tokens


@pytest.mark.parametrize("recipe", [FP32, INT8_STATIC, INT4_WEIGHT])
def test_ort_format_results_equal_onnx_results(ort_artifacts, eager_run, recipe):
    a = _method_outputs(_open(ort_artifacts[recipe], "onnx"), eager_run)
    b = _method_outputs(_open(ort_artifacts[recipe], "ort"), eager_run)
    for m in METHOD_FILES:
        np.testing.assert_allclose(b[m], a[m], rtol=0, atol=1e-5, err_msg=m)


def test_session_keeps_and_slices_the_past(ort_artifacts, tiny_components, eager_run):
    # replaying a segment at an earlier cache position overwrites the cache there, as the eager cache does
    session = _open(ort_artifacts[FP32])
    eager = EagerSession(tiny_components)
    segs, runner = eager_run["segments"], eager_run["runner"]
    emb = runner.embed(segs[0])
    n = segs[0].length
    for s in (session, eager):
        s.reset()
        s.run("text_decoder", embeds=emb, position_ids=segs[0].position_ids, cache_position=np.arange(n))
    half = n // 2
    args = dict(embeds=emb[:, half:], position_ids=segs[0].position_ids[:, half:], cache_position=np.arange(half, n))
    assert np.abs(session.run("text_decoder", **args) - eager.run("text_decoder", **args)).max() <= 1e-4
    assert session.cached == n
    assert session.kv, "the GroupQueryAttention decoder runs on shared past/present buffers (genai_config.json)"
    from core.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match="cache_position starts at"):
        session.run("text_decoder", embeds=emb[:, :1], position_ids=segs[0].position_ids[:, :1],
                    cache_position=np.array([n + 5]))


def test_shared_kv_buffers_equal_the_copied_presents(ort_artifacts, eager_run, tmp_path):
    """The same folder with genai_config.json's past_present_share_buffer false (as artifacts before the
    GroupQueryAttention graph say): the session feeds each call's presents back as arrays, and the logits are
    the shared buffers' bit for bit, through a prefill, decode steps and a replay at an earlier position."""
    art = ort_artifacts[FP32]
    copy = tmp_path / "copied"
    copy.mkdir()
    for f in art.dir.iterdir():
        if f.name != "genai_config.json":
            (copy / f.name).symlink_to(f)
    g = json.loads((art.dir / "genai_config.json").read_text())
    assert g["search"]["past_present_share_buffer"] is True
    g["search"]["past_present_share_buffer"] = False
    (copy / "genai_config.json").write_text(json.dumps(g))
    shared, copied = _open(art), _open(read_artifact(copy))
    assert shared.kv and not copied.kv
    seg, runner = eager_run["segments"][0], eager_run["runner"]
    emb, n = runner.embed(seg), seg.length

    def both(lo, hi):
        args = dict(embeds=emb[:, lo:hi], position_ids=seg.position_ids[:, lo:hi], cache_position=np.arange(lo, hi))
        a, b = shared.run("text_decoder", **args), copied.run("text_decoder", **args)
        np.testing.assert_array_equal(a, b)

    both(0, n - 3)
    both(n - 3, n - 2)
    both(n - 2, n - 1)
    both(n // 2, n)  # replayed from an earlier position
    assert shared.cached == copied.cached == n


# --- int8 ----------------------------------------------------------------------------------


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def test_int8_static_wraps_every_decoder_weight_matmul_in_qdq_and_leaves_attention_float(ort_artifacts):
    graph = onnx.load(ort_artifacts[INT8_STATIC].dir / "text_decoder.onnx").graph
    prod = _producers(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    mm = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    # a weight MatMul's second input is an int8 initializer behind its DequantizeLinear
    inits = {i.name: i for i in graph.initializer}
    weighted = [n for n in mm if n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear"
                and prod[n.input[1]].input[0] in inits]
    cfg = _config(ort_artifacts).text
    assert len(weighted) == 4 * cfg.num_layers + 1  # qkv (packed) o gate_up down per layer, lm_head
    for n in weighted:
        assert inits[prod[n.input[1]].input[0]].data_type == onnx.TensorProto.INT8, n.name
        assert n.input[0] in prod and prod[n.input[0]].op_type == "DequantizeLinear", n.name
        # int8 inputs, float outputs (the residual stream and attention stay float)
        assert not any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])), n.name
    assert [n for n in mm if n not in weighted] == []  # attention is onnxruntime's fused op, one per layer:
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == cfg.num_layers and all(n.domain == "com.microsoft" for n in attention)
    for n in attention:
        assert not any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input), n.name


def _static_model(components, calibration, method: str, tmp_path: Path, keep: tuple[str, ...] = (),
                  activation_range: str | None = None):
    """One method exported and quantized by int8-static's QDQ path (targets.ort.static) on the calibration set,
    in a scratch working directory that must stay empty; returns the quantized graph."""
    from core.artifact import no_progress
    from targets.ort.graphs import export_onnx
    from targets.ort.static import calibration_feeds, quantize_static_model

    raw, dst, work, cwd = tmp_path / f"{method}.onnx", tmp_path / "out.onnx", tmp_path / "work", tmp_path / "cwd"
    work.mkdir(parents=True)
    cwd.mkdir()
    components.text_decoder.cache.reset()
    feeds = calibration_feeds(calibration, components, [method], no_progress)
    export_onnx(components, method, raw, keep)
    with contextlib.chdir(cwd):
        quantize_static_model(raw, dst, feeds[method], work, keep=keep, activation_range=activation_range)
    # onnxruntime's symbolic shape inference drops sym_shape_infer_temp.onnx + <uuid>.data into the cwd when it
    # gives up (it does on tiny's decoder: "Incomplete symbolic shape inference")
    assert not list(cwd.iterdir()), f"quantization left files in the working directory: {sorted(p.name for p in cwd.iterdir())}"
    return onnx.load(dst).graph


def test_int8_static_keep_float_layer_reads_float_input_its_quantized_sibling_shares(tiny_components, tiny_calibration, tmp_path):
    """q, k and v read one tensor; onnxruntime's QDQ would hand its int8-rounded copy to a kept-float v too.
    (And the decoder's quantization leaves nothing in the working directory: see _static_model.)"""
    keep = "text.layers.0.self_attn.v_proj"
    graph = _static_model(tiny_components, tiny_calibration, "text_decoder", tmp_path, keep=(keep,))
    prod = _producers(graph)
    by_module = {n.name.split("/")[0]: n for n in graph.node if n.op_type == "MatMul" and "/" in n.name}
    v, q = by_module[keep], by_module["text.layers.0.self_attn.q_proj"]
    assert q.input[0] in prod and prod[q.input[0]].op_type == "DequantizeLinear"
    assert not any(i in prod and prod[i].op_type == "DequantizeLinear" for i in v.input)
    assert prod[prod[q.input[0]].input[0]].input[0] == v.input[0]  # the same tensor, before its QuantizeLinear
    # the layer with a kept-float projection keeps q, k and v apart; the other layers' are packed and quantized
    assert "text.layers.0.self_attn.qkv_proj" not in by_module and "text.layers.1.self_attn.q_proj" not in by_module
    packed = by_module["text.layers.1.self_attn.qkv_proj"]
    assert packed.input[0] in prod and prod[packed.input[0]].op_type == "DequantizeLinear"


def _optimized_decoder(path: Path, tmp_path: Path):
    """The decoder graph as the target's session optimises it (its options: targets/ort/session.py), saved back."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    return onnx.load(tmp_path / "optimized.onnx").graph


def test_int8_static_decoder_runs_u8s8_integer_matmuls(ort_artifacts, tmp_path):
    """onnxruntime fuses every weight linear's DQ -> MatMul into MatMulIntegerToFloat reading uint8 activations and
    int8 weights: the U8S8 GEMM MLAS runs fast everywhere (int8 activations land on its slow S8S8 path on x86:
    SmolLM2 decoded at 0.2x fp32). No weight is dequantized to float at run time."""
    graph = _optimized_decoder(ort_artifacts[INT8_STATIC].dir / "text_decoder.onnx", tmp_path)
    inits = {i.name: i for i in graph.initializer}
    prod = _producers(graph)
    fused = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 4 * _config(ort_artifacts).text.num_layers + 1, sorted({n.op_type for n in graph.node})
    for n in fused:
        a, b, a_zero, b_zero = n.input[0], n.input[1], n.input[4], n.input[5]
        while prod[a].op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"):  # moved past the quantized tensor
            a = prod[a].input[0]
        assert prod[a].op_type == "QuantizeLinear", n.name
        assert inits[a_zero].data_type == onnx.TensorProto.UINT8, n.name  # uint8 activations
        assert inits[b].data_type == onnx.TensorProto.INT8 and inits[b_zero].data_type == onnx.TensorProto.INT8, n.name
    assert not [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and len(inits[n.input[0]].dims) == 2], "a weight is still dequantized at run time"


def test_int8_static_ort_file_profiles_integer_matmul_kernels(ort_artifacts, tiny_components, tmp_path):
    """The .ort a phone gets runs the same fused kernels: onnxruntime's profiler sees MatMulIntegerToFloat, not MatMul,
    for every projection."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.add_session_config_entry("session.load_model_format", "ORT")
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    sess = ort.InferenceSession(str(ort_artifacts[INT8_STATIC].dir / "text_decoder.ort"), options,
                                providers=["CPUExecutionProvider"])
    t = tiny_components.config.text
    empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
    embeds = np.random.default_rng(0).standard_normal((1, 3, t.hidden_size)).astype(np.float32)
    sess.run(None, decoder_feeds(embeds, np.tile(np.arange(3), (3, 1)), [(empty, empty)] * t.num_layers))
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops = {e["args"]["op_name"] for e in kernels}
    assert sum(e["args"]["op_name"] == "MatMulIntegerToFloat" for e in kernels) == 4 * t.num_layers + 1, sorted(ops)
    assert "DequantizeLinear" not in ops, sorted(ops)
    assert not [e for e in kernels if e["args"]["op_name"] in ("MatMul", "Gemm") and "proj" in e["name"]]


def _activation_scales(graph) -> dict[str, float]:
    """Each activation QuantizeLinear's input -> its (per-tensor) scale."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_int8_static_percentile_ranges_clip_where_minmax_spans_everything(tiny_components, tiny_calibration, tmp_path,
                                                                          monkeypatch):
    """activation_range="percentile" calibrates through onnxruntime's Percentile histogram over samples of different
    lengths (one per collect_data: stacked they fail): no range wider than MinMax's over the same samples, and some
    narrower (the clipped tails; at the 99.9th percentile here, so tiny's few values have tails to clip); an unknown
    name is refused."""
    from core.errors import BadInputError
    from targets.ort import static
    from targets.ort.static import calibration_method

    from targets.ort.spec import ACTIVATION_RANGE_NAMES

    assert tuple(static.ACTIVATION_RANGES) == ACTIVATION_RANGE_NAMES  # a calibrator for every name the spec offers
    member, options = static.ACTIVATION_RANGES["percentile"]
    monkeypatch.setitem(static.ACTIVATION_RANGES, "percentile", (member, {**options, "CalibPercentile": 99.9}))
    with pytest.raises(BadInputError, match="activation range"):
        calibration_method("mse")
    minmax = _activation_scales(_static_model(tiny_components, tiny_calibration, "text_decoder", tmp_path / "a"))
    pct = _activation_scales(_static_model(tiny_components, tiny_calibration, "text_decoder", tmp_path / "b",
                                           activation_range="percentile"))
    assert minmax.keys() == pct.keys() and minmax
    assert all(pct[k] <= minmax[k] * 1.01 for k in minmax), {k: (pct[k], minmax[k]) for k in minmax if pct[k] > minmax[k] * 1.01}
    assert sum(pct[k] < minmax[k] * 0.99 for k in minmax) >= len(minmax) // 2


def test_export_sets_activation_ranges_with_the_recipes_algorithm(ort_artifacts, tiny_components, tiny_calibration,
                                                                  tmp_path):
    """--activation-range reaches onnxruntime's calibrator and artifact.json: entropy's decoder ranges are the
    same tensors as the default MinMax artifact's, none wider and some narrower."""
    import onnx

    art = export(get_target("ort"), tiny_components, Recipe(INT8_STATIC, activation_range="entropy"), tmp_path / "e",
                 calibration=tiny_calibration)
    minmax = ort_artifacts[INT8_STATIC]
    assert art.info["metadata"]["activation_range"] == "entropy"
    assert minmax.info["metadata"]["activation_range"] == "minmax"  # the default, recorded
    ent = _activation_scales(onnx.load(str(art.dir / "text_decoder.onnx")).graph)
    mm = _activation_scales(onnx.load(str(minmax.dir / "text_decoder.onnx")).graph)
    assert ent.keys() == mm.keys() and mm
    assert all(ent[k] <= mm[k] * 1.01 for k in mm)
    assert sum(ent[k] < mm[k] * 0.99 for k in mm) >= 1


def test_int8_weight_is_int8_weights_with_float_activations(ort_artifacts):
    for m in METHOD_FILES:
        graph = onnx.load(ort_artifacts[INT8_WEIGHT].dir / f"{m}.onnx").graph
        inits = {i.name: i for i in graph.initializer}
        prod = _producers(graph)
        assert not [n for n in graph.node if n.op_type == "QuantizeLinear"], m  # activations stay float
        for n in graph.node:
            if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in prod:
                dq = prod[n.input[1]]
                if dq.op_type == "DequantizeLinear":
                    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            if n.op_type in ("MatMul", "Gemm", "Conv"):
                assert n.input[1] not in inits, f"{m}: float weight left on {n.name}"


def _embedding_table_is_int8(path: Path, vocab: int, hidden: int) -> bool:
    graph = onnx.load(path).graph
    inits = {i.name: i for i in graph.initializer}
    float_tables = [i for i in graph.initializer if list(i.dims) == [vocab, hidden] and i.data_type == onnx.TensorProto.FLOAT]
    int8_gathers = [
        n for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8
        and list(inits[n.input[0]].dims) == [vocab, hidden]
    ]
    return not float_tables and len(int8_gathers) == 1


@pytest.mark.parametrize("recipe", [INT8_WEIGHT, INT8_STATIC])
def test_int8_embedding_table_is_quantized(ort_artifacts, recipe):
    t = _config(ort_artifacts).text
    assert _embedding_table_is_int8(ort_artifacts[recipe].dir / "token_embedding.onnx", t.vocab_size, t.hidden_size)


def test_int8_static_is_at_most_035x_fp32_size(ort_artifacts):
    fp32 = ort_artifacts[FP32].info["report"]["onnx_bytes"]
    int8 = ort_artifacts[INT8_STATIC].info["report"]["onnx_bytes"]
    measured = sum(ort_artifacts[INT8_STATIC].info["files"][f"{m}.onnx"]["bytes"] for m in METHOD_FILES)
    assert int8 == measured
    assert int8 <= 0.35 * fp32, f"{int8} / {fp32} = {int8 / fp32:.3f}"


@pytest.mark.parametrize("recipe, floor", [(INT8_WEIGHT, 0.999), (INT8_STATIC, 0.97)])
def test_int8_cosine_per_method(ort_artifacts, eager_run, reference_outputs, recipe, floor):
    got = _method_outputs(_open(ort_artifacts[recipe]), eager_run)
    for m in METHOD_FILES:
        assert cos(got[m], reference_outputs[m]) >= floor, m
    assert row_cos(got["text_decoder"], reference_outputs["text_decoder"]) >= floor


# --- int4-weight (MatMulNBits) -----------------------------------------------------------------


def _weight_matmuls(graph) -> list:
    """MatMul / Gemm nodes reading a float initializer (a weight left in float)."""
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    return [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in floats for i in n.input)]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_int4_weight_every_linear_is_a_4bit_blockwise_matmulnbits(ort_artifacts, tiny_components):
    art = ort_artifacts[INT4_WEIGHT]
    assert art.metadata["group_size"] == 32
    linears = {n: m for n, m in tiny_components.model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = set()
    for m in METHOD_FILES:
        graph = onnx.load(art.dir / f"{m}.onnx").graph
        inits = {i.name: i for i in graph.initializer}
        assert not _weight_matmuls(graph), (m, [n.name for n in _weight_matmuls(graph)])
        for n in graph.node:
            if n.op_type != "MatMulNBits":
                continue
            a = _attrs(n)
            assert n.domain == "com.microsoft" and a["bits"] == 4 and a["block_size"] == 32 and a["accuracy_level"] == 4
            k, nout = a["K"], a["N"]
            blocks = -(-k // 32)
            # symmetric: no zero points; B holds two 4-bit values a byte, one fp32 scale per block of 32 inputs
            assert len(n.input) == 3, n.name
            b, scales = inits[n.input[1]], inits[n.input[2]]
            assert b.data_type == onnx.TensorProto.UINT8 and list(b.dims) == [nout, blocks, 16], n.name
            assert scales.data_type == onnx.TensorProto.FLOAT and np.prod(scales.dims) == nout * blocks, n.name
            module = n.name.split("/", 1)[0]
            if module in linears:
                lin = linears[module]
                assert (lin.in_features, lin.out_features) == (k, nout), n.name
                seen.add(module)
            elif module.endswith(".self_attn.qkv_proj"):  # the decoder's q, k and v, packed (targets/ort/fusions.py)
                parts = [linears[module.replace(".qkv_proj", f".{p}_proj")] for p in "qkv"]
                assert {p.in_features for p in parts} == {k} and sum(p.out_features for p in parts) == nout, n.name
                seen.update(module.replace(".qkv_proj", f".{p}_proj") for p in "qkv")
        # convs (not tiled by a block) keep int8 per-channel weights
        prod = _producers(graph)
        for n in graph.node:
            if n.op_type == "Conv":
                assert prod[n.input[1]].op_type == "DequantizeLinear", n.name
                assert inits[prod[n.input[1]].input[0]].data_type == onnx.TensorProto.INT8
    # every Linear of the language, vision and audio towers (the vision Gemms included) is 4-bit
    assert seen == set(linears), sorted(set(linears) - seen)
    t = _config(ort_artifacts).text
    assert _embedding_table_is_int8(art.dir / "token_embedding.onnx", t.vocab_size, t.hidden_size)
    q = art.info["report"]["quantization"]
    assert q["vision_encoder"]["gemm_as_matmul"] > 0 and q["text_decoder"]["matmul_nbits"] == 2 * 4 + 1


def test_int4_weight_linears_are_smaller_than_int8_weight(ort_artifacts):
    def linear_bytes(art, m):
        """Bytes of the linears' weights: MatMulNBits data + scales, or the int8 data + scales a MatMul / Gemm
        dequantizes (the convs, int8 in both, are left out)."""
        graph = onnx.load(art.dir / f"{m}.onnx").graph
        readers = {i: n.op_type for n in graph.node for i in n.input}
        used = {i for n in graph.node if n.op_type == "MatMulNBits" for i in n.input}
        used |= {i for n in graph.node if n.op_type == "DequantizeLinear" and readers.get(n.output[0]) in ("MatMul", "Gemm")
                 for i in n.input}
        return sum(len(i.raw_data) for i in graph.initializer if i.name in used)

    for m in ("text_decoder", "vision_encoder", "audio_encoder"):
        int4, int8 = linear_bytes(ort_artifacts[INT4_WEIGHT], m), linear_bytes(ort_artifacts[INT8_WEIGHT], m)
        assert int8 > 0 and int4 <= 0.7 * int8, (m, int4, int8)
    r4, r8 = (ort_artifacts[r].info["report"] for r in (INT4_WEIGHT, INT8_WEIGHT))
    files4, files8 = ort_artifacts[INT4_WEIGHT].info["files"], ort_artifacts[INT8_WEIGHT].info["files"]
    assert files4["text_decoder.ort"]["bytes"] < 0.7 * files8["text_decoder.ort"]["bytes"]
    assert r4["onnx_bytes"] < r8["onnx_bytes"] and r4["ort_bytes"] < r8["ort_bytes"]


def test_int4_weight_ort_file_runs_matmulnbits_kernels(ort_artifacts, tiny_components, tmp_path):
    """The .ort (reduced-build config included) keeps MatMulNBits, and onnxruntime's profiler sees them run."""
    import onnxruntime as ort

    art = ort_artifacts[INT4_WEIGHT]
    ops = (art.dir / "required_operators_and_types.config").read_text()
    contrib = [ln for ln in ops.splitlines() if ln.startswith("com.microsoft;")]
    assert contrib and "MatMulNBits" in contrib[0]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.add_session_config_entry("session.load_model_format", "ORT")
    sess = ort.InferenceSession(str(art.dir / "text_decoder.ort"), options, providers=["CPUExecutionProvider"])
    t = tiny_components.config.text
    empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
    embeds = np.random.default_rng(0).standard_normal((1, 5, t.hidden_size)).astype(np.float32)
    sess.run(None, decoder_feeds(embeds, np.tile(np.arange(5), (3, 1)), [(empty, empty)] * t.num_layers))
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nbits = [e for e in kernels if e["args"]["op_name"] == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1, sorted({e["args"]["op_name"] for e in kernels})
    assert {e["args"]["provider"] for e in nbits} == {"CPUExecutionProvider"}
    assert not [e for e in kernels if e["args"]["op_name"] in ("MatMul", "Gemm") and "proj" in e["name"]]


def test_int4_weight_cosine_per_method(ort_artifacts, eager_run, reference_outputs):
    got = _method_outputs(_open(ort_artifacts[INT4_WEIGHT], "ort"), eager_run)
    for m in METHOD_FILES:
        floor = 0.96 if m == "text_decoder" else 0.99
        assert cos(got[m], reference_outputs[m]) >= floor, (m, cos(got[m], reference_outputs[m]))
    assert cos(got["text_decoder"], reference_outputs["text_decoder"]) < 0.9999  # the 4-bit weights are what ran


def _break_int4(model, how: str) -> int:
    """Corrupt every MatMulNBits weight as a faulty quantizer/kernel would; returns how many."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    for n in nodes:
        if how == "nibbles_swapped":  # the two 4-bit values of each byte read in the wrong order
            b = numpy_helper.to_array(inits[n.input[1]])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(((b >> 4) | (b << 4)).astype(np.uint8), n.input[1]))
        else:  # "scales_dropped": one scale for every block
            s = numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.full_like(s, np.abs(s).mean()), n.input[2]))
    return len(nodes)


@pytest.mark.parametrize("how", ["nibbles_swapped", "scales_dropped"])
def test_int4_export_check_rejects_a_broken_4bit_program(ort_artifacts, tiny_components, tmp_path, how):
    import shutil

    from core.errors import ExportError
    from targets.base import export_gate

    broken = tmp_path / "broken"
    shutil.copytree(ort_artifacts[INT4_WEIGHT].dir, broken)
    recipe = Recipe(INT4_WEIGHT)
    gate = SPEC.recipe(INT4_WEIGHT).gate
    # the copy as exported passes the gate (the precondition), as .onnx as well as .ort
    export_gate("ort", recipe, OrtSession(read_artifact(broken), "onnx"), tiny_components, gate)
    for m in METHOD_FILES:
        model = onnx.load(broken / f"{m}.onnx")
        if _break_int4(model, how):
            onnx.save(model, broken / f"{m}.onnx")
    session = OrtSession(read_artifact(broken), "onnx")  # read_artifact checks presence, not hashes
    with pytest.raises(ExportError, match="int4-weight program rejected by the export check: text_decoder"):
        export_gate("ort", recipe, session, tiny_components, gate)


def test_int4_weight_honours_group_size_and_keep_float(tiny_components, tmp_path):
    keep = "text.layers.0.mlp"
    tiny_components.text_decoder.cache.reset()
    art = export(get_target("ort"), tiny_components, Recipe(INT4_WEIGHT, keep_float=(keep,), group_size=64), tmp_path / "a")
    graph = onnx.load(art.dir / "text_decoder.onnx").graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {_attrs(n)["block_size"] for n in nbits} == {64}
    assert not [n for n in nbits if n.name.startswith(keep + ".")]
    kept = _weight_matmuls(graph)
    assert sorted(n.name.split("/")[0] for n in kept) == [f"{keep}.down_proj", f"{keep}.gate_up_proj"]
    assert art.metadata["group_size"] == 64 and art.info["report"]["export_check"]["measured"]


@pytest.mark.slow
def test_int8_weight_with_a_group_size_writes_8bit_matmulnbits_blocks_streamed_or_whole(ort_artifacts, tiny_components,
                                                                                       tmp_path, monkeypatch):
    """--group-size N on int8-weight: 8-bit MatMulNBits in blocks of N (what the 9B needs to open within 16 GiB),
    the same from the whole-model and the streamed path, at least as close to eager as the per-channel default."""
    import targets.ort.streaming as streaming
    from targets.ort.target import OrtTarget

    tiny_components.text_decoder.cache.reset()
    whole = export(get_target("ort"), tiny_components, Recipe(INT8_WEIGHT, group_size=32), tmp_path / "whole")
    monkeypatch.setattr(streaming, "SPLIT_BYTES", 100_000)  # the lm_head goes through in slices
    tiny_components.text_decoder.cache.reset()
    streamed = export(OrtTarget(stream_above=0), tiny_components, Recipe(INT8_WEIGHT, group_size=32), tmp_path / "s")
    for m in ("text_decoder", "vision_encoder", "audio_encoder"):
        graph = onnx.load(whole.dir / f"{m}.onnx").graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits and {(_attrs(n)["bits"], _attrs(n)["block_size"]) for n in nbits} == {(8, 32)}, m
        dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        assert not _weight_matmuls(graph), m  # no float weight left
        assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and dq & set(n.input)], m  # nor a DQ one
        assert graph.node == onnx.load(streamed.dir / f"{m}.onnx").graph.node, m
    assert whole.metadata["group_size"] == 32 and ort_artifacts[INT8_WEIGHT].metadata.get("group_size") is None
    q = whole.info["report"]["quantization"]["text_decoder"]
    assert (q["bits"], q["block_size"]) == (8, 32) and streamed.info["report"]["quantization"]["text_decoder"]["streamed"]
    blocks = whole.info["report"]["export_check"]["methods"]
    channels = ort_artifacts[INT8_WEIGHT].info["report"]["export_check"]["methods"]
    for m, numbers in blocks.items():
        assert numbers["cosine"] >= channels[m]["cosine"] - 1e-4, m  # blocks of 32 are finer than whole channels
        assert streamed.info["report"]["export_check"]["methods"][m]["cosine"] == pytest.approx(numbers["cosine"], abs=1e-6)


@pytest.mark.parametrize("group_size, needle", [(0, "--group-size 0"), (48, "block size 48 must be a power of two")])
def test_int4_weight_refuses_a_block_size_matmulnbits_lacks_before_writing(tiny_components, tmp_path, group_size, needle):
    from core.errors import BadInputError

    with pytest.raises(BadInputError, match=needle):
        export(get_target("ort"), tiny_components, Recipe(INT4_WEIGHT, group_size=group_size), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- the command line and bad input ------------------------------------------------------------


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--recipe", "fp16"], "recipe 'fp16' is not supported by target 'ort'"),
        (["--recipe", "int4"], "'--recipe': 'int4' is not one of"),  # Typer's choices, from the registry
        (["--recipe", "int8-static", "--calibration", "/no/such/calib.jsonl"], "/no/such/calib.jsonl"),
        (["--recipe", "int8-static", "--activation-range", "mse"],
         "--activation-range mse: int8-static on ort offers minmax, percentile, entropy, distribution (default minmax)"),
        (["--recipe", "int8-weight", "--activation-range", "minmax"],
         "--activation-range applies to static recipes (int8-static); 'int8-weight' on ort calibrates no activation"),
    ],
)
def test_export_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, extra, needle):
    from cli import app

    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["export", "--target", "ort", "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert needle in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_target_rejects_calibration_without_samples_before_writing(tiny_components, tiny_calibration, tmp_path):
    from core.errors import BadInputError

    partial = {"token_embedding": tiny_calibration["token_embedding"][:2]}
    with pytest.raises(BadInputError, match="no samples for method 'vision_encoder'"):
        export(get_target("ort"), tiny_components, Recipe(INT8_STATIC), tmp_path / "x", calibration=partial)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe, floor", [(FP32, 0.99999), (INT8_WEIGHT, 0.99), (INT8_STATIC, 0.95), (INT4_WEIGHT, 0.96)])
def test_export_records_its_check_of_the_ort_files_against_eager(ort_artifacts, recipe, floor):
    check = ort_artifacts[recipe].info["report"]["export_check"]
    assert check["measured"] and "(ort, " in check["how"] and check["floor_cosine"] == floor
    assert set(check["methods"]) == set(METHOD_FILES)
    for m, r in check["methods"].items():
        assert r["cosine"] >= floor and r["relative_l2"] <= check["max_relative_l2"], (m, r)


def test_loading_a_missing_ort_file_is_an_artifact_error(ort_artifacts, tmp_path):
    import shutil

    from core.errors import ArtifactError

    broken = tmp_path / "broken"
    shutil.copytree(ort_artifacts[FP32].dir, broken)
    (broken / "vision_encoder.ort").unlink()
    with pytest.raises(ArtifactError, match="vision_encoder"):
        _open(read_artifact(broken), "ort")


@pytest.mark.parametrize("path", ["", "text_decoder.ort"])
def test_cli_generate_runs_the_artifact_as_onnx_and_as_ort(ort_artifacts, tiny_components, tiny_tokenizer, path):
    from cli import app

    art = ort_artifacts[FP32]
    result = CliRunner().invoke(
        app, ["generate", "--artifact", str(art.dir / path) if path else str(art.dir), "--prompt", "Open the camera.",
              "--max-new-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    expected = Runner(EagerSession(tiny_components), tiny_components.config, tiny_tokenizer).generate(
        Prompt(text="Open the camera."), max_new_tokens=8
    )
    assert f"tokens: {expected.tokens}" in result.output
    assert ("(ort, fp32)" if path.endswith(".ort") else "(onnx, fp32)") in result.output


# --- the decoder's attention as onnxruntime's GroupQueryAttention (targets/ort/attention.py) -----------


class _AttentionGraph(torch.nn.Module):
    """One attention call through ``gqa_attend``: q/k/v projections in, output and presents out."""

    def __init__(self, rope, heads):
        super().__init__()
        self.rope, self.heads = rope, heads

    def forward(self, q, k, v, attention_mask, position_ids, past_key, past_value):
        from targets.ort.attention import gqa_attend

        presents: list = []
        cos, sin = self.rope(position_ids)
        out = gqa_attend([(past_key, past_value)], attention_mask, presents)(0, q, k, v, self.heads, self.rope, cos, sin)
        return out, presents[0][0], presents[0][1]


@pytest.mark.parametrize("rotary_dim,interleaved,fused", [(32, True, True), (64, False, True), (8, True, False)],
                         ids=["partial-interleaved-fused", "halves-fused", "rotated-before"])
def test_group_query_attention_node_equals_the_reference_attention(tmp_path, rotary_dim, interleaved, fused):
    """The GroupQueryAttention node onnxruntime runs (its own rotation from per-call M-RoPE tables, or ours before
    it) equals the eager attention (masked_attention over a concatenated cache) on a prompt, a decode step and a
    chunk after a past, with 3-D positions that differ per axis (an image's)."""
    from torch.export import Dim

    from exporter.model.config import TextConfig
    from exporter.model.decoder import Rope, masked_attention
    from targets.ort.attention import TRANSLATIONS, fused_rotary

    n, n_kv, d = 4, 2, 64
    cfg = TextConfig(vocab_size=8, hidden_size=n * d, num_layers=1, num_heads=n, num_kv_heads=n_kv,
                     intermediate_size=8, partial_rotary_factor=rotary_dim / d,
                     mrope_section=(rotary_dim // 8, rotary_dim // 8, rotary_dim // 4), rope_interleaved=interleaved)
    rope = Rope(cfg)
    assert fused_rotary(rope, d) == fused
    graph = _AttentionGraph(rope, (n, n_kv, d)).eval()
    seq, past = Dim("sequence_length", min=1, max=64), Dim("past_sequence_length", min=0, max=63)
    g = torch.Generator().manual_seed(0)

    def inputs(p, t):
        pos = torch.stack([torch.arange(p, p + t), torch.arange(p, p + t) % 3 + p, torch.arange(p, p + t) // 2 + p])
        return (torch.randn(1, t, n * d, generator=g), torch.randn(1, t, n_kv * d, generator=g),
                torch.randn(1, t, n_kv * d, generator=g), torch.ones(1, p + t, dtype=torch.long), pos,
                torch.randn(1, n_kv, p, d, generator=g), torch.randn(1, n_kv, p, d, generator=g))

    args = inputs(2, 3)
    shapes = ({1: seq}, {1: seq}, {1: seq}, {1: Dim.AUTO}, {1: seq}, {2: past}, {2: past})
    names = ["q", "k", "v", "attention_mask", "position_ids", "past_key", "past_value"]
    with torch.no_grad():
        program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                    output_names=["out", "present_key", "present_value"], optimize=True,
                                    custom_translation_table=TRANSLATIONS)
    model = program.model_proto
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("GroupQueryAttention") == 1 and "Softmax" not in ops and "MatMul" not in ops
    gqa = next(nd for nd in model.graph.node if nd.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in gqa.attribute}.get("do_rotary", 0) == int(fused)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for p, t in [(0, 5), (5, 1), (6, 3)]:
        q, k, v, mask, pos, pk, pv = inputs(p, t)
        got = session.run(None, dict(zip(names, (x.numpy() for x in (q, k, v, mask, pos, pk, pv)))))
        cache = []

        def kv_fn(layer, kk, vv):
            cache.append((torch.cat((pk, kk), 2), torch.cat((pv, vv), 2)))
            return cache[-1]

        causal = torch.arange(p + t)[None] <= (torch.arange(t) + p)[:, None]
        cos, sin = rope(pos)
        want = masked_attention(causal, kv_fn)(0, q, k, v, (n, n_kv, d), rope, cos, sin)
        for a, b in zip(got, (want, *cache[0])):
            np.testing.assert_allclose(a, b.numpy(), atol=2e-5, rtol=1e-4)
        with torch.no_grad():  # the custom ops' eager bodies (what the graph module computes in PyTorch) agree too
            eager = graph(q, k, v, mask, pos, pk, pv)
        for a, b in zip(eager, (want, *cache[0])):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5, rtol=1e-4)


def test_decoder_graph_fuses_attention_and_norms(ort_artifacts, tiny_components):
    """tiny's fp32 decoder: one GroupQueryAttention per layer rotating itself, the norm after attention's residual
    add fused with it (SkipSimplifiedLayerNormalization), every fused node named after its layer's module; none of
    the op-by-op attention and rotation (Softmax, the GQA Expand, the KV Concat, Neg) left in a layer."""
    graph = onnx.load(ort_artifacts[RecipeName.FP32].dir / "text_decoder.onnx").graph
    layers = tiny_components.config.text.num_layers
    ops = [n.op_type for n in graph.node]
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers and all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in gqa)
    skip = [n for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert [n.name.split("/")[0] for n in skip] == [f"text.layers.{i}.post_attention_layernorm" for i in range(layers)]
    assert not {"Softmax", "Pow", "Sqrt"} & set(ops)
    # past the first layer (which makes the per-call rotary tables), a layer is its linears, norms, GQA and the MLP
    last = {n.op_type for n in graph.node if n.name.startswith(f"text.layers.{layers - 1}.")}
    assert not {"Concat", "Expand", "Transpose", "Reshape", "Where", "Neg"} & last, last
    # q, k and v are one MatMul (+ bias) whose output is the packed query; the node's key and value are empty
    prod = _producers(graph)
    for i, n in enumerate(gqa):
        assert list(n.input[1:3]) == ["", ""], n.name
        assert prod[n.input[0]].name.startswith(f"text.layers.{i}.self_attn.qkv_proj/"), prod[n.input[0]].name
    t = tiny_components.config.text
    width = {tuple(i.dims) for i in graph.initializer if i.name.startswith("text.layers.") and "qkv_proj.weight" in i.name}
    assert width == {(t.hidden_size, (t.num_heads + 2 * t.num_kv_heads) * t.head_dim)}
    assert not [n for n in graph.node if ".q_proj" in n.name or ".k_proj" in n.name or ".v_proj" in n.name]
