"""Core ML target on the tiny preset: saved ML programs read back, and run through the ML program interpreter.

Core ML itself executes only on macOS; here every number comes from
``targets.coreml.mil`` running the saved packages (the session's
provenance says so). Each recipe is exported once per session (the shared ``exported`` fixture,
through targets.lifecycle); what every target shares (artifact.json completeness, parity, bench, the
gate refusing a program) is tested once for all in tests/test_targets.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from heldout import cos, row_cos
from core.runner import EagerSession, Prompt, Runner
from core.artifact import read_artifact
from core.recipes import Recipe, RecipeName
from targets.base import method_outputs
from targets.coreml import compat, load_target
from targets.coreml.convert import convert_decoder
from targets.coreml.packaging import read_spec, weight_bytes
from targets.coreml.session import CoreMLSession
from targets.coreml.spec import DECODER_FUNCTIONS, SPEC
from targets.coreml.weights import kept_arrays, quantize_weights_int4, quantize_weights_int8
from targets.lifecycle import export

pytestmark = pytest.mark.slow

METHODS = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")
IOS18_SPEC_VERSION = 9


def _spec_ops(path: Path) -> dict[str, list]:
    """{function: [MIL op protos]} of a saved package."""
    spec = read_spec(path)
    out = {}
    for name, fn in spec.mlProgram.functions.items():
        out[name] = list(fn.block_specializations[fn.opset].operations)
    return out


def _print_report(art) -> None:
    r = art.info["report"]
    print(f"\ncoreml {art.recipe}: {r['total_bytes']} bytes, export {art.info['export']['wall_s']} s, "
          f"peak RSS {art.info['export']['peak_rss_mb']} MiB, convert s {r['convert_s']}")
    for m, c in r["export_check"].get("methods", {}).items():
        print(f"  {m}: max abs {c['max_abs']:.4g}, cosine {c['cosine']:.6f}")


@pytest.fixture(scope="session")
def coreml_calibration(tiny_calibration):
    return tiny_calibration


@pytest.fixture(scope="session")
def coreml_artifacts(exported):
    arts = {name: exported("coreml", name) for name in (RecipeName.FP16, RecipeName.INT8_WEIGHT)}
    for art in arts.values():
        _print_report(art)
    return arts


@pytest.fixture(scope="session")
def int8_static_artifact(exported):
    art = exported("coreml", RecipeName.INT8_STATIC)
    _print_report(art)
    return art


@pytest.fixture(scope="session")
def int4_artifact(exported):
    art = exported("coreml", RecipeName.INT4_WEIGHT)
    _print_report(art)
    return art


def _export(components, recipe: str, out: Path, calibration=None):
    """An export of our own (the shared fixture's are not to be modified), through the one lifecycle."""
    components.text_decoder.cache.reset()
    return export(load_target(), components, Recipe(recipe), out, calibration=calibration)


# --- what the saved packages hold -----------------------------------------------------------


def test_every_package_is_an_ios18_ml_program_and_the_artifact_lists_them(coreml_artifacts):
    art = coreml_artifacts[RecipeName.FP16]
    assert set(art.files) == {f"{m}.mlpackage" for m in METHODS} | {"tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in art.dir.iterdir()} == set(art.files) | {"artifact.json"}
    for m in METHODS:
        spec = read_spec(art.dir / f"{m}.mlpackage")
        assert spec.specificationVersion == IOS18_SPEC_VERSION, m
        assert spec.WhichOneof("Type") == "mlProgram", m


def test_decoder_is_one_package_with_prefill_and_decode_sharing_state(coreml_artifacts, tiny_components):
    spec = read_spec(coreml_artifacts[RecipeName.FP16].dir / "text_decoder.mlpackage")
    t = tiny_components.config.text
    max_seq = tiny_components.config.shape.max_seq_len
    functions = {fn.name: fn for fn in spec.description.functions}
    assert set(functions) == set(DECODER_FUNCTIONS) == set(spec.mlProgram.functions)
    expected_states = {f"cache_{kv}_{i}" for i in range(t.num_layers) for kv in "kv"}
    for name, fn in functions.items():
        assert [i.name for i in fn.input] == ["embeds", "position_ids", "cache_position"]
        assert [o.name for o in fn.output] == ["logits"]
        assert {s.name for s in fn.state} == expected_states
        for s in fn.state:
            arr = s.type.stateType.arrayType
            assert list(arr.shape) == [1, t.num_kv_heads, max_seq, t.head_dim]
            assert arr.dataType == arr.FLOAT16
    # prefill takes any length 1..max_seq_len, decode exactly one position
    embeds = {name: fn.input[0].type.multiArrayType for name, fn in functions.items()}
    ranges = embeds["prefill"].shapeRange.sizeRanges
    assert ranges[1].lowerBound == 1 and ranges[1].upperBound == max_seq
    assert list(embeds["decode"].shape) == [1, 1, t.hidden_size]
    # the cache is written in place: every function updates every state
    for name, ops in _spec_ops(coreml_artifacts[RecipeName.FP16].dir / "text_decoder.mlpackage").items():
        written = [op.inputs["input"].arguments[0].name for op in ops if op.type == "write_state"]
        assert sorted(written) == sorted(expected_states), name


def _spec_io(features) -> list[tuple]:
    """(name, dtype, declared shape, flexible ranges) of spec features, read with coremltools itself."""
    out = []
    for f in features:
        kind = f.type.WhichOneof("Type")
        arr = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        out.append((f.name, {arr.FLOAT32: "float32", arr.FLOAT16: "float16", arr.INT32: "int32"}[arr.dataType], list(arr.shape), ranges))
    return out


def _as_declared(entries: list[dict]) -> list[tuple]:
    """artifact.json program entries in _spec_io's terms: a "lo..hi" dim is a range over the default shape."""
    out = []
    for e in entries:
        ranges = [tuple(int(x) for x in d.split("..")) if isinstance(d, str) else (d, d) for d in e["shape"]]
        out.append((e["name"], e["dtype"], ranges))
    return out


@pytest.mark.parametrize("recipe", [RecipeName.FP16, RecipeName.INT8_WEIGHT])
def test_artifact_json_programs_are_the_saved_packages_io(coreml_artifacts, tiny_components, recipe):
    import coremltools as ct

    art = coreml_artifacts[recipe]
    cfg = tiny_components.config
    t = cfg.text
    assert "methods" not in art.info and set(art.info["runner_interface"]) == set(METHODS)
    programs = art.info["programs"]
    assert set(programs) == set(METHODS)
    for m in METHODS:
        entry = programs[m]
        assert entry["file"] == f"{m}.mlpackage" and entry["file"] in art.files
        spec = ct.models.MLModel(str(art.dir / entry["file"]), skip_model_load=True).get_spec()
        d = spec.description
        functions = {f.name: f for f in d.functions} or {"main": d}
        listed = entry.get("functions", {"main": entry})
        assert set(listed) == set(functions), m
        for name, fn in functions.items():
            got = listed[name]
            for key, features in (("inputs", fn.input), ("states", fn.state)):
                spec_io = _spec_io(features)
                assert [(n, dt) for n, dt, _, _ in spec_io] == [(e["name"], e["dtype"]) for e in got[key]], (m, name, key)
                for (n, dt, shape, ranges), (_, _, declared) in zip(spec_io, _as_declared(got[key])):
                    assert declared == (ranges or [(s, s) for s in shape]), (m, name, n)
            assert [o["name"] for o in got["outputs"]] == [o.name for o in fn.output], (m, name)
    # the default function's I/O is the method's own (what MLModel(path) loads), the decoder's states its KV cache
    dec = programs["text_decoder"]
    assert dec["default_function"] == "decode"
    assert {k: dec[k] for k in ("inputs", "outputs", "states")} == dec["functions"]["decode"]
    cache = [1, t.num_kv_heads, cfg.shape.max_seq_len, t.head_dim]
    assert dec["states"] == [{"name": f"cache_{kv}_{i}", "dtype": "float16", "shape": cache}
                             for i in range(t.num_layers) for kv in "kv"]
    assert dec["functions"]["decode"]["inputs"] == [
        {"name": "embeds", "dtype": "float32", "shape": [1, 1, t.hidden_size]},
        {"name": "position_ids", "dtype": "int32", "shape": [3, 1]},
        {"name": "cache_position", "dtype": "int32", "shape": [1]},
    ]
    seq = f"1..{cfg.shape.max_seq_len}"
    assert dec["functions"]["prefill"]["inputs"][1] == {"name": "position_ids", "dtype": "int32", "shape": [3, seq]}
    assert dec["functions"]["prefill"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, "?", t.vocab_size]}]
    assert programs["token_embedding"]["inputs"] == [{"name": "tokens", "dtype": "int32", "shape": [1, seq]}]
    s = cfg.shape.image_size
    assert programs["vision_encoder"]["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [1, 3, s, s]}]
    assert programs["vision_encoder"]["outputs"] == [
        {"name": "image_embeds", "dtype": "float32", "shape": [1, cfg.image_tokens, t.hidden_size]}]
    assert all(not programs[m]["states"] for m in METHODS if m != "text_decoder")
    # the runner's interface is another thing: int64 tokens, symbolic T
    assert art.info["runner_interface"]["token_embedding"]["inputs"]["tokens"] == ["int64", [1, "T"]]


@pytest.mark.parametrize("recipe", [RecipeName.FP16, RecipeName.INT8_WEIGHT])
def test_decoder_functions_share_one_copy_of_the_weights(coreml_artifacts, recipe):
    art = coreml_artifacts[recipe]
    pkg = art.info["report"]["packages"]["text_decoder"]
    one = pkg["weight_bytes_per_function"]["prefill"]
    assert weight_bytes(art.dir / "text_decoder.mlpackage") == pkg["weight_bytes"]
    assert pkg["weight_bytes"] <= 1.05 * one, pkg  # ~1x, not 2x


def test_metadata_in_every_package_and_artifact_json(coreml_artifacts, tiny_components):
    art = coreml_artifacts[RecipeName.INT8_WEIGHT]
    cfg = tiny_components.config
    for m in METHODS:
        user = read_spec(art.dir / f"{m}.mlpackage").description.metadata.userDefined
        assert user["autoglm.method"] == m
        assert user["autoglm.recipe"] == RecipeName.INT8_WEIGHT
        assert json.loads(user["autoglm.max_seq_len"]) == cfg.shape.max_seq_len == art.metadata["max_seq_len"]
        assert json.loads(user["autoglm.vocab_size"]) == cfg.text.vocab_size
        assert json.loads(user["autoglm.eos_ids"]) == list(cfg.tokens.eos_ids)
        assert json.loads(user["autoglm.bos_ids"]) == list(cfg.tokens.bos_ids)
        assert json.loads(user["autoglm.image_token_id"]) == cfg.tokens.image_token_id
        assert json.loads(user["autoglm.image_size"]) == cfg.shape.image_size
        assert json.loads(user["autoglm.audio_frames"]) == cfg.shape.audio_frames
        assert user["autoglm.package_version"] == art.metadata["package_version"]
        assert "com.github.apple.coremltools.conversion_date" not in user  # builds on different days stay identical
    assert art.info["runtime_versions"]["coremltools"] and art.info["export"]["wall_s"] > 0
    assert art.info["report"]["deployment_target"] == "iOS18"


def _int8_weight_ops(path: Path) -> list:
    return [op for ops in _spec_ops(path).values() for op in ops if op.type == "constexpr_blockwise_shift_scale"]


@pytest.mark.parametrize("recipe", [RecipeName.INT8_WEIGHT, RecipeName.INT8_STATIC])
def test_int8_recipes_store_int8_weights_including_the_embedding_table(coreml_artifacts, int8_static_artifact, recipe):
    art = coreml_artifacts[RecipeName.INT8_WEIGHT] if recipe == RecipeName.INT8_WEIGHT else int8_static_artifact
    fp16 = coreml_artifacts[RecipeName.FP16]
    for m in METHODS:
        assert _int8_weight_ops(art.dir / f"{m}.mlpackage"), m
        assert not _int8_weight_ops(fp16.dir / f"{m}.mlpackage"), m
    # the embedding table: a gather whose table comes from an int8 constexpr
    ops = _spec_ops(art.dir / "token_embedding.mlpackage")["main"]
    producers = {o.name: op for op in ops for o in op.outputs}
    gathers = [op for op in ops if op.type == "gather"]
    tables = [producers.get(op.inputs["x"].arguments[0].name) for op in gathers]
    assert any(t is not None and t.type == "constexpr_blockwise_shift_scale" for t in tables)
    # the weight blobs (the program text, a fixed cost that dominates at tiny widths, is left out)
    fp16_bytes, int8_bytes = (sum(p["weight_bytes"] for p in a.info["report"]["packages"].values()) for a in (fp16, art))
    assert int8_bytes <= 0.6 * fp16_bytes, f"{int8_bytes} / {fp16_bytes}"


MIL_INT4, MIL_INT8 = 25, 21  # MIL_pb2.DataType


def _blockwise_data_dtype(op) -> int:
    return op.inputs["data"].arguments[0].value.type.tensorType.dataType


def _dims(arg) -> list[int]:
    return [d.constant.size for d in arg.value.type.tensorType.dimensions]


def test_int4_weight_stores_4bit_per_block_linears_and_an_int8_embedding_table(int4_artifact, tiny_components):
    art = int4_artifact
    assert art.metadata["group_size"] == 32
    for m in METHODS:
        for fn, ops in _spec_ops(art.dir / f"{m}.mlpackage").items():
            producers = {o.name: op for op in ops for o in op.outputs}
            linears = [op for op in ops if op.type == "linear"]
            assert linears, (m, fn)
            for op in linears:
                w = producers[op.inputs["weight"].arguments[0].name]
                # every linear's weight: int4 data, one fp16 scale per 32 input channels, no offset (symmetric)
                assert w.type == "constexpr_blockwise_shift_scale" and _blockwise_data_dtype(w) == MIL_INT4, (m, fn, op.name)
                out_ch, in_ch = _dims(w.inputs["data"].arguments[0])
                assert _dims(w.inputs["scale"].arguments[0]) == [out_ch, in_ch // 32] and "offset" not in w.inputs
    ops = _spec_ops(art.dir / "token_embedding.mlpackage")["main"]
    producers = {o.name: op for op in ops for o in op.outputs}
    tables = [producers.get(op.inputs["x"].arguments[0].name) for op in ops if op.type == "gather"]
    assert any(t is not None and t.type == "constexpr_blockwise_shift_scale" and _blockwise_data_dtype(t) == MIL_INT8
               for t in tables)
    q = art.info["report"]["quantization"]
    assert q["text_decoder.decode"]["int4_weights"] == 2 * 6 + 1 and q["text_decoder.decode"]["float_weights_kept"] == 0


def test_int4_weight_is_smaller_than_int8_weight(coreml_artifacts, int4_artifact):
    packages = {r: a.info["report"]["packages"]
                for r, a in ((RecipeName.INT8_WEIGHT, coreml_artifacts[RecipeName.INT8_WEIGHT]), (RecipeName.INT4_WEIGHT, int4_artifact))}
    # the decoder is linears plus two small rope tables; its weight blob shrinks close to half
    int8, int4 = (packages[r]["text_decoder"]["weight_bytes"] for r in (RecipeName.INT8_WEIGHT, RecipeName.INT4_WEIGHT))
    assert int4 <= 0.65 * int8, (int4, int8)
    for m in ("vision_encoder", "audio_encoder"):
        assert packages[RecipeName.INT4_WEIGHT][m]["weight_bytes"] < packages[RecipeName.INT8_WEIGHT][m]["weight_bytes"], m
    pkg = packages[RecipeName.INT4_WEIGHT]["text_decoder"]
    assert pkg["weight_bytes"] <= 1.05 * pkg["weight_bytes_per_function"]["prefill"]  # prefill/decode still share


def test_int4_weight_through_the_interpreter_matches_eager(int4_artifact, eager_run, reference_outputs):
    got = _method_outputs(_session(int4_artifact), eager_run)
    for m in METHODS:
        floor = 0.95 if m == "text_decoder" else 0.99
        print(f"coreml int4-weight {m}: cosine {cos(got[m], reference_outputs[m]):.6f}")
        assert cos(got[m], reference_outputs[m]) >= floor, m
    check = int4_artifact.info["report"]["export_check"]
    assert check["measured"] and check["floor_cosine"] == 0.95
    assert all(r["cosine"] >= 0.95 for r in check["methods"].values()), check["methods"]


def _int4_blobs(package: Path) -> dict[int, int]:
    """{offset of each int4 data blob: offset of its scale blob} in a package's weight file."""
    out = {}
    for ops in _spec_ops(package).values():
        for op in ops:
            if op.type == "constexpr_blockwise_shift_scale" and _blockwise_data_dtype(op) == MIL_INT4:
                data, scale = (op.inputs[k].arguments[0].value.blobFileValue.offset for k in ("data", "scale"))
                out[int(data)] = int(scale)
    return out


@pytest.mark.parametrize("how", ["nibbles_swapped", "scales_dropped"])
def test_int4_export_check_rejects_a_broken_4bit_program(int4_artifact, tiny_components, tmp_path, how):
    """The same weight blobs corrupted as a faulty packer would (each byte's two values swapped, or one scale for
    every block) fail the export check that the program as written passes."""
    import shutil
    import struct

    from core.errors import ExportError
    from targets.base import export_gate

    broken = tmp_path / "broken"
    shutil.copytree(int4_artifact.dir, broken)
    recipe = Recipe(RecipeName.INT4_WEIGHT)
    gate = SPEC.recipe(recipe.name).gate
    export_gate("coreml", recipe, CoreMLSession(read_artifact(broken)), tiny_components, gate)  # the precondition
    corrupted = 0
    for pkg in broken.glob("*.mlpackage"):
        path = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        buf = bytearray(path.read_bytes())
        for data, scale in _int4_blobs(pkg).items():
            # blob metadata: u32 sentinel, u32 dtype, u64 bytes, u64 data offset
            _, _, size, off = struct.unpack_from("<IIQQ", buf, data if how == "nibbles_swapped" else scale)
            if how == "nibbles_swapped":
                a = np.frombuffer(bytes(buf[off:off + size]), np.uint8)
                buf[off:off + size] = ((a >> 4) | (a << 4)).astype(np.uint8).tobytes()
            else:
                a = np.frombuffer(bytes(buf[off:off + size]), np.float16).astype(np.float32)
                buf[off:off + size] = np.full(a.shape, np.abs(a).mean(), np.float16).tobytes()
            corrupted += 1
        path.write_bytes(bytes(buf))
    assert corrupted >= 2 * 6 + 1
    with pytest.raises(ExportError, match="int4-weight program rejected by the export check: text_decoder"):
        export_gate("coreml", recipe, CoreMLSession(read_artifact(broken)), tiny_components, gate)


def test_int4_keep_float_and_per_channel(tiny_components):
    from coremltools.converters.mil.mil import types

    decode = convert_decoder(tiny_components, "decode")
    keep = ("text.lm_head", "text.layers.1.mlp")
    model, kept = quantize_weights_int4(decode, kept_arrays(tiny_components.model, keep), 32)
    assert kept["float_weights_kept"] == 3 and kept["int4_weights"] == 2 * 6 + 1 - 3
    lm_head = tiny_components.model.text.lm_head.weight.detach().numpy().astype(np.float16)
    consts = [op for op in compat.model_ops(model) if op.op_type == "const"]
    assert any(isinstance(op.outputs[0].val, np.ndarray) and np.array_equal(op.outputs[0].val, lm_head) for op in consts)
    # --group-size 0: one scale per output channel
    model, counts = quantize_weights_int4(decode, set(), 0)
    assert counts["int4_weights"] == 2 * 6 + 1
    scales = [op.scale.val for op in compat.model_ops(model)
              if op.op_type == "constexpr_blockwise_shift_scale" and types.builtin_to_string(op.data.dtype) == "int4"]
    assert len(scales) == 2 * 6 + 1 and all(s.shape[1] == 1 for s in scales)


def test_int8_static_quantizes_activations(int8_static_artifact):
    q = int8_static_artifact.info["report"]["quantization"]
    for key in ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder.prefill", "text_decoder.decode"):
        assert q[key]["calibration_samples"] > 0 and q[key]["activation_quantize_ops"] > 0, key
    ops = [op.type for fn in _spec_ops(int8_static_artifact.dir / "text_decoder.mlpackage").values() for op in fn]
    assert "quantize" in ops and "dequantize" in ops


def test_keep_float_leaves_the_named_layers_weights_in_float(tiny_components):
    decode = convert_decoder(tiny_components, "decode")
    _, all_int8 = quantize_weights_int8(decode, set())
    keep = ("text.lm_head", "text.layers.1.mlp")
    model, kept = quantize_weights_int8(decode, kept_arrays(tiny_components.model, keep))
    assert kept["float_weights_kept"] == 3  # lm_head, gate_up_proj, down_proj
    assert kept["int8_weights"] == all_int8["int8_weights"] - 3
    lm_head = tiny_components.model.text.lm_head.weight.detach().numpy().astype(np.float16)
    consts = [op for op in compat.model_ops(model) if op.op_type == "const"]
    assert any(isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.shape == lm_head.shape
               and np.array_equal(op.outputs[0].val, lm_head) for op in consts)


def test_int8_activations_are_linear_inputs_only_and_keep_float_leaves_the_named_layers_float(
    tiny_components, coreml_calibration, tmp_path
):
    from targets.coreml.activations import quantize_activations_int8

    decode = convert_decoder(tiny_components, "decode")
    keep = kept_arrays(tiny_components.model, ("text.lm_head",))
    model, report = quantize_activations_int8(decode, keep, coreml_calibration["text_decoder"], "text_decoder", "decode", tmp_path)
    assert report["calibration_samples"] > 0 and report["activation_quantize_ops"] > 0
    vocab = tiny_components.config.text.vocab_size
    fed_by_dequantize = {}
    for op in compat.model_ops(model):
        if op.op_type == "linear":
            is_head = op.inputs["weight"].val is not None and op.inputs["weight"].val.shape[0] == vocab
            producer = op.inputs["x"].op
            fed_by_dequantize[is_head] = fed_by_dequantize.get(is_head, []) + [producer is not None and producer.op_type == "dequantize"]
    assert fed_by_dequantize[True] == [False]  # lm_head kept float
    assert fed_by_dequantize[False] and all(fed_by_dequantize[False])  # every other linear takes int8 activations
    ops = list(compat.model_ops(model))
    adds = [op for op in ops if op.op_type == "add"]
    assert adds  # the residual stream
    # adds (the residual stream) stay float, and nothing quantizes a linear's output
    assert not [op.name for op in adds if any(v.op is not None and v.op.op_type == "dequantize" for v in op.inputs.values())]
    assert not [op.name for op in ops if op.op_type == "quantize" and op.inputs["input"].op is not None
                and op.inputs["input"].op.op_type == "linear"]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "artifact.json"}


def test_two_exports_are_byte_identical(coreml_artifacts, tiny_components, tmp_path):
    again = _export(tiny_components, RecipeName.FP16, tmp_path / "again")
    first = coreml_artifacts[RecipeName.FP16]
    assert _tree_hashes(again.dir) == _tree_hashes(first.dir)
    assert again.info["files"] == first.info["files"]


# --- parity through the ML program interpreter ------------------------------------------------


def _method_outputs(session, eager_run) -> dict[str, np.ndarray]:
    """Each method's output on the same (eager) inputs; the decoder is teacher-forced with eager embeddings."""
    return method_outputs(session, eager_run["runner"], eager_run["segments"], eager_run["result"].tokens[:-1])


@pytest.fixture(scope="module")
def reference_outputs(tiny_components, eager_run):
    return _method_outputs(EagerSession(tiny_components), eager_run)


def _session(art):
    session = load_target().open(art)
    assert "emulat" in session.provenance.lower() and art.recipe in session.provenance
    return session


@pytest.mark.parametrize("recipe, floor", [(RecipeName.FP16, 0.999), (RecipeName.INT8_WEIGHT, 0.999), (RecipeName.INT8_STATIC, 0.97)])
def test_each_method_through_the_interpreter_matches_eager(coreml_artifacts, int8_static_artifact, eager_run,
                                                           reference_outputs, recipe, floor):
    art = int8_static_artifact if recipe == RecipeName.INT8_STATIC else coreml_artifacts[recipe]
    got = _method_outputs(_session(art), eager_run)
    for m in METHODS:
        ref = reference_outputs[m]
        assert got[m].shape == ref.shape, m
        print(f"coreml {recipe} {m}: max abs {np.abs(got[m] - ref).max():.4g}, cosine {cos(got[m], ref):.6f}")
        assert cos(got[m], ref) >= floor, m
    assert row_cos(got["text_decoder"], reference_outputs["text_decoder"]) >= floor


@pytest.mark.parametrize("recipe, floor", [(RecipeName.FP16, 0.999), (RecipeName.INT8_WEIGHT, 0.999)])
def test_export_records_its_own_check_against_eager_in_the_report(coreml_artifacts, recipe, floor):
    check = coreml_artifacts[recipe].info["report"]["export_check"]
    assert check["measured"] and "emulat" in check["how"].lower()
    assert set(check["methods"]) == set(METHODS)
    for m, r in check["methods"].items():
        assert r["cosine"] >= floor and r["max_abs"] < 1.0, (m, r)


def test_fp16_greedy_16_tokens_with_image_and_audio_equal_eager(coreml_artifacts, tiny_components, tiny_tokenizer, media):
    prompt = Prompt(text=media["prompt"], image=media["image"], audio=media["audio"])
    cfg = tiny_components.config
    expected = Runner(EagerSession(tiny_components), cfg, tiny_tokenizer).generate(prompt, max_new_tokens=16, stop_at_eos=False)
    got = Runner(_session(coreml_artifacts[RecipeName.FP16]), cfg, tiny_tokenizer).generate(prompt, max_new_tokens=16, stop_at_eos=False)
    assert len(got.tokens) == 16 and got.tokens == expected.tokens


def test_reset_forgets_the_cache_and_positions_past_the_cache_fail(coreml_artifacts, tiny_components):
    from core.errors import RuntimeFailure

    session = load_target().open(coreml_artifacts[RecipeName.FP16])
    h = tiny_components.config.text.hidden_size
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 3, h)).astype(np.float32)
    pos = np.arange(3, dtype=np.int64)
    args = dict(embeds=emb, position_ids=np.stack([pos] * 3), cache_position=pos)
    first = session.run("text_decoder", **args)
    session.run("text_decoder", embeds=emb[:, :1], position_ids=np.full((3, 1), 3), cache_position=np.array([3]))
    session.reset()
    np.testing.assert_array_equal(session.run("text_decoder", **args), first)
    max_seq = tiny_components.config.shape.max_seq_len
    with pytest.raises(RuntimeFailure, match="outside the KV cache"):
        session.run("text_decoder", embeds=emb, position_ids=np.stack([pos] * 3), cache_position=pos + max_seq - 1)


@pytest.fixture(scope="module")
def chunked_fp16(tiny_components, tmp_path_factory):
    """tiny's decoder split one layer per package (the chunk limit set to one layer's fp16 bytes), as a 9B's is."""
    from targets.coreml import spec as coreml_spec

    layer = 2 * sum(p.numel() for p in tiny_components.model.text.layers[0].parameters())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coreml_spec, "DECODER_CHUNK_BYTES", layer)
        return _export(tiny_components, RecipeName.FP16, tmp_path_factory.mktemp("coreml") / "chunked")


def test_a_decoder_split_into_chunks_runs_like_the_whole_package(chunked_fp16, coreml_artifacts, tiny_components,
                                                                   tiny_tokenizer, media):
    art, n = chunked_fp16, tiny_components.config.text.num_layers
    names = [f"text_decoder.chunk{k}.mlpackage" for k in range(n)]
    assert [c["layers"] for c in art.metadata["decoder_chunks"]] == [[k, k + 1] for k in range(n)]
    assert [c["package"] for c in art.metadata["decoder_chunks"]] == names
    assert set(names) <= set(art.files) and "text_decoder.mlpackage" not in art.files
    chunks = art.info["programs"]["text_decoder"]["chunks"]
    for k, entry in enumerate(chunks):
        assert entry["file"] == names[k] and set(entry["functions"]) == set(DECODER_FUNCTIONS)
        assert {s["name"] for s in entry["states"]} == {f"cache_k_{k}", f"cache_v_{k}"}  # each chunk its layers' cache
        assert [o["name"] for o in entry["outputs"]] == (["logits"] if k == n - 1 else ["hidden"])
        assert [i["name"] for i in entry["inputs"]] == ["embeds", "position_ids", "cache_position"]
    assert min(c["cosine"] for c in art.info["report"]["export_check"]["methods"].values()) > 0.999  # its own check
    # the same prompt (image and audio included) through both artifacts: the chunks hand over fp16-exact hidden
    # states, so the logits are the whole package's
    whole, split = _session(coreml_artifacts[RecipeName.FP16]), _session(art)
    h = tiny_components.config.text.hidden_size
    emb = np.random.default_rng(1).standard_normal((1, 5, h)).astype(np.float32)
    pos = np.arange(5, dtype=np.int64)
    for s in (whole, split):
        s.reset()
    args = dict(embeds=emb, position_ids=np.stack([pos] * 3), cache_position=pos)
    np.testing.assert_allclose(split.run("text_decoder", **args), whole.run("text_decoder", **args), rtol=0, atol=1e-5)
    step = dict(embeds=emb[:, :1], position_ids=np.full((3, 1), 5), cache_position=np.array([5]))
    np.testing.assert_allclose(split.run("text_decoder", **step), whole.run("text_decoder", **step), rtol=0, atol=1e-5)
    prompt = Prompt(text=media["prompt"], image=media["image"], audio=media["audio"])
    cfg = tiny_components.config
    expected = Runner(EagerSession(tiny_components), cfg, tiny_tokenizer).generate(prompt, max_new_tokens=12, stop_at_eos=False)
    got = Runner(_session(art), cfg, tiny_tokenizer).generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert got.tokens == expected.tokens


def test_int8_static_on_a_chunked_decoder_is_refused_before_writing(tiny_components, coreml_calibration, tmp_path,
                                                                      monkeypatch):
    from core.errors import ExportError
    from targets.coreml import spec as coreml_spec

    monkeypatch.setattr(coreml_spec, "DECODER_CHUNK_BYTES", 1)
    with pytest.raises(ExportError, match="split into 2 chunks"):
        _export(tiny_components, RecipeName.INT8_STATIC, tmp_path / "x", calibration=coreml_calibration)
    assert list(tmp_path.iterdir()) == []


# --- the command line and bad input -----------------------------------------------------------


def test_int8_static_without_samples_for_a_method_fails_before_writing(tiny_components, coreml_calibration, tmp_path):
    from core.errors import BadInputError

    partial = {"token_embedding": coreml_calibration["token_embedding"][:2]}
    with pytest.raises(BadInputError, match="no samples for method 'vision_encoder'"):
        _export(tiny_components, RecipeName.INT8_STATIC, tmp_path / "x", calibration=partial)
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_runs_the_coreml_artifact(coreml_artifacts, tiny_components, tiny_tokenizer):
    from cli import app

    art = coreml_artifacts[RecipeName.FP16]
    result = CliRunner().invoke(app, ["generate", "--artifact", str(art.dir), "--prompt", "Open the camera.", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    expected = Runner(EagerSession(tiny_components), tiny_components.config, tiny_tokenizer).generate(
        Prompt(text="Open the camera."), max_new_tokens=8
    )
    assert f"tokens: {expected.tokens}" in result.output
    assert "coreml/fp16" in result.output and "emulated" in result.output


def test_loading_an_artifact_with_a_missing_package_is_an_artifact_error(coreml_artifacts, tmp_path):
    import shutil

    from core.errors import ArtifactError

    broken = tmp_path / "broken"
    shutil.copytree(coreml_artifacts[RecipeName.FP16].dir, broken)
    shutil.rmtree(broken / "vision_encoder.mlpackage")
    with pytest.raises(ArtifactError, match="vision_encoder"):
        load_target().open(read_artifact(broken))


def test_llama_family_decoder_converts_and_matches_eager():
    """The family switches a Llama-style model (SmolLM2) uses: rotate-halves rope, no sandwich norms, no q/k/v bias,
    tied embeddings. Its decode function converts and runs through the interpreter like GLM's."""
    import dataclasses

    from core.components import build_components
    from exporter.model import build, get_preset

    cfg = get_preset("tiny").with_layers(1, vision_layers=1)
    text = dataclasses.replace(cfg.text, rope_interleaved=False, sandwich_norms=False, attention_bias=False, tie_embeddings=True)
    comps = build_components(build(cfg.replace(name="tiny-llama", text=text)))
    model = convert_decoder(comps, "prefill")  # traced size // 2 in the rope used to break conversion here
    h = text.hidden_size
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 5, h)).astype(np.float32)
    pos = np.arange(5)
    from targets.coreml.mil import MILProgram

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save(f"{d}/dec.mlpackage")
        prog = MILProgram.load(Path(d) / "dec.mlpackage")
        feeds = {"embeds": emb, "position_ids": np.stack([pos] * 3).astype(np.int32), "cache_position": pos.astype(np.int32)}
        got = prog.run(feeds, state=prog.new_state())
    import torch

    with torch.no_grad():
        comps.text_decoder.cache.reset()
        ref = comps.text_decoder(torch.from_numpy(emb), torch.from_numpy(np.stack([pos] * 3)), torch.from_numpy(pos)).numpy()
    agreement = cos(got["logits"], ref)
    assert agreement >= 0.999, agreement


def test_fp16_rmsnorm_survives_massive_activations():
    # trained LLMs carry residual values in the tens of thousands (SmolLM2-135M: 23,852); squared in fp16 they overflow
    import torch

    from exporter.model.decoder import RMSNorm
    from targets.coreml.adapt import Fp16SafeRMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 576)
    x[..., 7] = 23852.0
    tiny_rows = torch.randn(1, 576) * 1e-4
    half = Fp16SafeRMSNorm(norm).half()
    for inp in (x, tiny_rows):
        ref = norm(inp)
        got = half(inp.half()).float()
        assert torch.isfinite(got).all()
        assert torch.allclose(got, ref, rtol=2e-3, atol=2e-3), float((got - ref).abs().max())
