"""ONNX Runtime mobile target: one .onnx and one .ort per method, a genai_config.json, four recipes.

Export, as a list of steps (``OrtTarget.export``):

1. ``torch.onnx.export(dynamo=True)`` of one small graph module per method
   (below). A model with over 1 GiB of weights keeps them in
   ``<model>.onnx.data`` (external data; protobuf stops at 2 GiB). Nodes are
   named after the model module they came from (``--keep-float`` selects by
   that name) and the exporter's per-node stack traces are dropped.
2. Quantize (recipe), each model on its own:

   * ``fp32``: as exported.
   * ``int8-weight``: per-channel symmetric int8 weights, float activations,
     written as standard ONNX ops: every MatMul/Gemm/Conv weight becomes an
     int8 initializer feeding ``DequantizeLinear(axis=output channel)``, and the
     embedding table an int8 ``Gather`` whose rows are rescaled by a gathered
     per-row scale (only the looked-up rows are dequantized). Why not the
     stock tools: ``quantize_dynamic`` quantizes activations too (W8A8 with
     ``DynamicQuantizeLinear``/``MatMulInteger``, not weight-only), and
     ``MatMulNBitsQuantizer(bits=8)`` emits block-wise ``com.microsoft``
     contrib ops (``MatMulNBits``, ``GatherBlockQuantized``) that the NNAPI and
     Core ML EPs never take and that are block-wise, not per-channel. Plain
     ``DequantizeLinear`` runs in every ORT build, mobile included, and ORT's
     QDQ-aware EPs see an ordinary DQ -> MatMul pattern.
   * ``int8-static``: QDQ by ``onnxruntime.quantization``: ``quant_pre_process``
     (shape inference + optimisation), then ``quantize_static`` with per-channel
     symmetric int8 weights and int8 activations calibrated by a
     ``CalibrationDataReader`` per method over real samples (each method's
     inputs recorded by the reference runner over the calibration set; never
     random tensors), on the inputs of the weight MatMuls only (outputs, attention's
     activation x activation MatMuls and keep-float layers stay float: see
     :func:`float_inputs_for`). Embedding tables stay float under ORT static by
     default, so they are then quantized as in ``int8-weight``.
   * ``int4-weight``: 4-bit symmetric weights in blocks of ``Recipe.group_size``
     along the input dimension, float activations at the graph boundary, by
     onnxruntime's own ``MatMulNBitsQuantizer`` (RTN): every MatMul with a
     constant weight becomes a ``com.microsoft`` ``MatMulNBits`` (bits=4,
     ``accuracy_level`` 4, see :data:`INT4_ACCURACY_LEVEL`). The vision linears
     come out of the exporter as ``Gemm`` (2-D input, bias), which the quantizer
     does not take, so they are rewritten as MatMul + Add first
     (:func:`gemm_to_matmul`). What stays: convs (patch embedding, audio
     front-end; their input channels rarely tile a block) get int8 per-channel
     ``DequantizeLinear`` weights, and the embedding table the int8 ``Gather``
     of ``int8-weight``. Why not a 4-bit ``GatherBlockQuantized`` table:
     onnxruntime 1.32 runs it from the .onnx, but its ORT-format serialiser has
     no int4 tensor type ("Unsupported tensor data type ... Invalid ORT format
     model" on load), and the .ort is what a phone gets. ``--group-size 0`` (per
     channel) is refused: MatMulNBits quantizes in blocks.

3. Metadata (``artifact_metadata``) into every model's ``metadata_props``.
4. Mobile: every model converted to ORT format (Fixed optimisation style,
   ARM target so int8 QDQ stays int8) with
   ``required_operators_and_types.config`` for a reduced-size build (a model
   over the ORT format's 2 GiB flatbuffer limit, i.e. fp32 at 9B widths,
   keeps only its .onnx and the report says so), and
   ``onnxruntime``'s mobile usability check (which ops the NNAPI / Core ML EPs
   would take) recorded per model in ``mobile_usability.txt`` and the report.
5. ``genai_config.json`` in onnxruntime-genai's multimodal layout (qwen2_5_vl
   family, the one with host-side 3-D M-RoPE): ``decoder``, ``embedding`` and
   ``vision`` sections naming these files and their I/O (no ``speech``: genai
   opens no speech session for that type). With the tokenizer files
   (targets.base) the folder opens as ``og.Model`` + ``og.Tokenizer``; images go
   in as named tensors (:func:`genai_inputs`), not through genai's processor.
6. artifact.json: ``runner_interface`` (the runner's method contract),
   ``programs`` (each method's file and I/O read back from the saved .onnx),
   ``report.genai`` (what genai runs, what the app does) and the
   onnxruntime-genai version in ``runtime_versions``.

Graph I/O follows onnxruntime-genai's default names, so the config needs no
renaming; the Session maps the runner's names (targets/base.py) onto them:

=================  ===========================================  ==============================
method             graph inputs                                 graph outputs
=================  ===========================================  ==============================
token_embedding    input_ids [1,T], image_features [N,H],       inputs_embeds [1,T,H]
                   audio_features [A,H] (spliced in at the
                   placeholder tokens, as genai's embedding
                   model does; the runner passes none)
vision_encoder     pixel_values [1,3,S,S]                       image_features [N,H]
audio_encoder      audio_embeds [1,n_mels,F] (log-mel)          audio_features [A,H]
text_decoder       inputs_embeds [1,T,H], attention_mask        logits [1,T,V],
                   [1,P+T], position_ids [3,1,T],               present.N.key / .value
                   past_key_values.N.key / .value [1,kv,P,D]    [1,kv,P+T,D]
=================  ===========================================  ==============================

The session keeps the presents between decoder calls and slices them to
``cache_position[0]`` (the runner's convention), so an empty past (P = 0)
is the prefill.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from calibration.stats import resolve_method_inputs, spread
from core.errors import ArtifactError, BadInputError, ExportError, RuntimeFailure
from core.artifact import (
    METHODS,
    Artifact,
    Progress,
    atomic_artifact_dir,
    no_progress,
    peak_rss_mb,
    runtime_versions,
    write_artifact_json,
)
from core.recipes import Recipe
from targets.base import artifact_metadata, check_recipe, copy_tokenizer_files, export_gate, method_signatures

RECIPES = ("fp32", "int8-weight", "int8-static", "int4-weight")
# export check (targets.base.export_gate): per-method cosine floor and relative-L2 ceiling vs eager on a
# held-out sample, run on the files a phone gets (.ort, or .onnx where over the ORT format's limit)
# int4-weight on tiny's random weights (held-out sample): decoder cosine 0.9875 / 0.982 / 0.979 / 0.974 and relative
# L2 0.16 / 0.19 / 0.21 / 0.23 at block 16 / 32 / 64 / 128, the other methods >= 0.997; with the MatMulNBits scales
# flattened to their mean or the nibbles of each byte swapped the decoder falls to cosine ~0.0 (L2 1.4) and the audio
# encoder to 0.68-0.74
GATE = {"fp32": (0.99999, 1e-3), "int8-weight": (0.99, 0.15), "int8-static": (0.95, 0.35), "int4-weight": (0.96, 0.3)}
# MatMulNBits accuracy_level 4: the CPU kernel quantizes each activation block to int8 on the fly and runs
# int8 dot products (MLAS SQNBitGemm CompInt8: ARM64 SDOT/I8MM, x86 AVX2/AVX-VNNI). Measured here on a
# 4096 x 4096 block-32 weight: 2x faster than the fp32-compute levels 0/1 at M = 1 (4.2 vs 8.6-9.1 ms, one
# thread), same cosine vs the float product (0.9964); tiny's decoder on random inputs: cosine 0.9788 vs 0.9790
# at level 1. It is also what ExecuTorch's 8da4w computes (int8 activations x int4 weights).
INT4_ACCURACY_LEVEL = 4
# protobuf's hard limit is 2 GiB; leave room for the graph itself
EXTERNAL_DATA_BYTES = 1 << 30
ORT_FORMAT_LIMIT = 2 << 30
GENAI_CONFIG = "genai_config.json"
USABILITY_TXT = "mobile_usability.txt"
OPS_CONFIG = "required_operators_and_types.config"
# calibration samples per method (int8-static); the decoder's are the most expensive to replay
MAX_CALIB_SAMPLES = 64


# --- the graphs exported per method ------------------------------------------------------


class EmbeddingGraph(nn.Module):
    """token_embedding, plus genai's splice of media features at their placeholder tokens."""

    def __init__(self, components: Any):
        super().__init__()
        cfg = components.config
        self.embed = components.token_embedding
        self.media: list[tuple[str, int]] = []
        if cfg.vision is not None:
            self.media.append(("image_features", cfg.tokens.image_token_id))
        if cfg.audio is not None:
            self.media.append(("audio_features", cfg.tokens.audio_token_id))

    def forward(self, input_ids: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        # input_ids: [1, T]; features[i]: [N_i, H] (N_i may be 0) -> inputs_embeds [1, T, H]
        x = self.embed(input_ids)
        for (_, token), feats in zip(self.media, features):
            hit = input_ids[0] == token  # [T]
            index = torch.cumsum(hit.long(), 0) * hit.long()  # k-th placeholder -> k, others -> 0
            # a placeholder with no feature left for it (e.g. generated as text) keeps its token embedding
            hit = hit & (index <= feats.shape[0])
            index = torch.clamp(index, max=feats.shape[0])
            table = torch.cat((feats.new_zeros(1, feats.shape[-1]), feats.to(x.dtype)), dim=0)
            x = torch.where(hit[None, :, None], table[index][None], x)
        return x


class MediaGraph(nn.Module):
    """vision_encoder / audio_encoder with genai's 2-D [N, H] features output."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method(x)  # [1, N, H]
        return out.reshape(-1, out.shape[-1])


class DecoderGraph(nn.Module):
    """The decoder core with explicit past key/values in and presents out."""

    def __init__(self, components: Any):
        super().__init__()
        self.text = components.model.text

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        # inputs_embeds: [1, T, H]; attention_mask: [1, P+T]; position_ids: [3, 1, T];
        # past[i]: ([1, kv, P, D], [1, kv, P, D]) -> logits [1, T, V], presents [1, kv, P+T, D]
        return self.text.forward_with_past(inputs_embeds, position_ids[:, 0, :], past, key_mask=attention_mask[0].bool())


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def graph_io(config: Any) -> dict[str, tuple[list[str], list[str]]]:
    """Graph input and output names per method present in this model."""
    n = config.text.num_layers
    io_: dict[str, tuple[list[str], list[str]]] = {
        "token_embedding": (
            ["input_ids"]
            + (["image_features"] if config.vision else [])
            + (["audio_features"] if config.audio else []),
            ["inputs_embeds"],
        ),
        "vision_encoder": (["pixel_values"], ["image_features"]),
        "audio_encoder": (["audio_embeds"], ["audio_features"]),
        "text_decoder": (
            ["inputs_embeds", "attention_mask", "position_ids"] + past_names(n),
            ["logits"] + present_names(n),
        ),
    }
    have = {"token_embedding", "text_decoder"} | ({"vision_encoder"} if config.vision else set())
    have |= {"audio_encoder"} if config.audio else set()
    return {m: io_[m] for m in METHODS if m in have}


def _graph(components: Any, method: str):
    """(module, example args, dynamic_shapes) for ``method``."""
    from torch.export import Dim

    cfg = components.config
    t = cfg.text
    dtype = next(components.model.parameters()).dtype
    max_t = cfg.shape.max_seq_len
    seq = Dim("sequence_length", min=1, max=max_t)
    if method == "token_embedding":
        module = EmbeddingGraph(components)
        args: list[Any] = [torch.tensor([[cfg.tokens.image_token_id if cfg.vision else 0, 1, 2, 3]], dtype=torch.long)]
        shapes: list[Any] = [{1: seq}]
        for name, _ in module.media:
            args.append(torch.zeros(2, t.hidden_size, dtype=dtype))
            shapes.append({0: Dim(name.replace("_features", "_tokens"), min=0, max=max_t)})
        # forward(input_ids, *features): the features travel as one tuple argument (none: text-only model)
        return module, (args[0], *args[1:]), (shapes[0], tuple(shapes[1:])) if len(args) > 1 else (shapes[0],)
    if method in ("vision_encoder", "audio_encoder"):
        module = MediaGraph(components.methods()[method])
        return module, components.example_inputs(method), None
    if method == "text_decoder":
        module = DecoderGraph(components)
        past_len = Dim("past_sequence_length", min=0, max=max_t - 1)
        p, n = 2, 3
        past = [
            (torch.zeros(1, t.num_kv_heads, p, t.head_dim, dtype=dtype), torch.zeros(1, t.num_kv_heads, p, t.head_dim, dtype=dtype))
            for _ in range(t.num_layers)
        ]
        pos = torch.arange(p, p + n, dtype=torch.long).expand(3, 1, n).contiguous()
        args = (torch.zeros(1, n, t.hidden_size, dtype=dtype), torch.ones(1, p + n, dtype=torch.long), pos, past)
        shapes = ({1: seq}, {1: Dim.AUTO}, {2: seq}, [({2: past_len}, {2: past_len}) for _ in range(t.num_layers)])
        return module, args, shapes
    raise KeyError(method)


def _param_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(module.parameters()) + list(module.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def export_onnx(components: Any, method: str, path: Path) -> None:
    """torch.onnx (dynamo) export of one method's graph to ``path`` (external data when large)."""
    module, args, shapes = _graph(components, method)
    inputs, outputs = graph_io(components.config)[method]
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=inputs,
                output_names=outputs,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch.onnx raises its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx export of {method} failed: {first}") from e
    name_by_module(program.model.graph, module, components.model)
    program.save(str(path), external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES)


def name_by_module(graph: Any, wrapper: nn.Module, model: nn.Module) -> None:
    """Name each node after the model module it came from and drop the exporter's per-node debug metadata.

    ``model.text.layers.0.self_attn.q_proj/MatMul_12``: ``--keep-float`` names
    (``model.named_modules()`` names) then select nodes by prefix, and the
    stack traces the exporter attaches to every node (a third of a tiny
    model's file) are not shipped.
    """
    import ast

    model_names = {id(m): n for n, m in model.named_modules() if n}
    local = {n: model_names.get(id(m), "") for n, m in wrapper.named_modules() if n}
    for i, node in enumerate(graph.all_nodes()):  # onnx_ir nodes
        try:
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        scope = next((local[s] for s in reversed(scopes) if local.get(s)), "")
        node.name = f"{scope}/{node.op_type}_{i}" if scope else f"{node.op_type}_{i}"
        node.metadata_props.clear()
        node.doc_string = None


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (stdout/stderr prints, warnings, INFO logs)."""
    import warnings

    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "onnxscript", "ort_format_model.utils",
                                              "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield buf
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# --- saving with or without external data -----------------------------------------------


def load_model(path: Path, with_data: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def save_model(model: Any, path: Path) -> None:
    """Save, putting initializers in ``<name>.data`` when the model would pass protobuf's limit."""
    import onnx

    data = Path(str(path) + ".data")
    if data.exists():
        data.unlink()
    size = sum(init.ByteSize() for init in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def model_files(path: Path) -> list[Path]:
    """The .onnx file and its external data file, if any."""
    data = Path(str(path) + ".data")
    return [path] + ([data] if data.exists() else [])


def set_metadata(path: Path, props: dict[str, Any]) -> None:
    """Write ``props`` into metadata_props without touching external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    onnx.save_model(model, str(path))


# --- the programs as saved (artifact.json "programs") ----------------------------------------


def _value_info(value: Any) -> dict[str, Any]:
    """A graph input/output as {name, dtype (numpy-style), shape}; a symbolic dim keeps its dim_param name."""
    from onnx import helper

    t = value.type.tensor_type
    dims: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:  # an anonymous dim (neither set) is written "?"
            dims.append(d.dim_param or "?")
    return {"name": value.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name, "shape": dims}


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a saved .onnx graph (its weights are not read)."""
    graph = load_model(path, with_data=False).graph
    return {"inputs": [_value_info(v) for v in graph.input], "outputs": [_value_info(v) for v in graph.output]}


def onnx_programs(root: Path, methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """artifact.json's ``programs``: each method's file and its I/O as the saved .onnx declares it.

    Read back from the files, not from the runner's interface: the graphs use
    onnxruntime-genai's names and layouts (``input_ids``, ``position_ids [3,1,T]``,
    ``past_key_values.N.*``), which differ from the runner's. The .ort beside the
    .onnx is the same graph in ORT format (same I/O).
    """
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        entry: dict[str, Any] = {"file": f"{m}.onnx", **onnx_io(root / f"{m}.onnx")}
        if (root / f"{m}.ort").is_file():
            entry["ort_file"] = f"{m}.ort"
        out[m] = entry
    return out


# --- int8 weight quantization (standard ONNX ops) ------------------------------------------


def kept_float(node_name: str, keep: Iterable[str]) -> bool:
    """Whether a node (named ``module.path/Op_i``) lies inside one of the ``keep`` modules."""
    module = node_name.split("/", 1)[0] if "/" in node_name else ""
    return any(k and (module == k or module.startswith(k + ".")) for k in keep)


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 along ``axis`` (the first or the last): (q, scale).

    Works through the weight in blocks of rows so a multi-GiB table (the 9B
    embedding and lm_head) needs no full-size float temporaries.
    """
    per_row = axis == 0
    if not per_row and axis != w.ndim - 1:
        raise ValueError(f"per-channel axis must be the first or the last, got {axis} of {w.ndim}")
    rows = w.reshape(w.shape[0], -1) if per_row else w.reshape(-1, w.shape[-1])
    step = max(1, (1 << 22) // max(1, rows.shape[1]))
    blocks = range(0, rows.shape[0], step)
    if per_row:
        amax = np.concatenate([np.abs(rows[i : i + step]).max(axis=1) for i in blocks]).astype(np.float32)
    else:
        amax = np.zeros(rows.shape[1], np.float32)
        for i in blocks:
            np.maximum(amax, np.abs(rows[i : i + step]).max(axis=0), out=amax)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.empty(rows.shape, np.int8)
    for i in blocks:
        div = scale[i : i + step, None] if per_row else scale[None, :]
        q[i : i + step] = np.clip(np.rint(rows[i : i + step] / div), -127, 127)
    return q.reshape(w.shape), scale


def _set_nodes(g: Any, nodes: list[Any]) -> None:
    """Replace the graph's nodes and drop the initializers no node reads any more."""
    del g.node[:]
    g.node.extend(nodes)
    used = {n for node in g.node for n in node.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)


def quantize_weights(model: Any, matmuls: bool = True, gathers: bool = True, keep: Iterable[str] = ()) -> dict[str, int]:
    """Per-channel symmetric int8 weights with float activations, in place; returns counts.

    MatMul/Gemm/Conv with a constant weight: weight -> int8 initializer +
    DequantizeLinear (axis = output channel). Gather on a constant table
    (an embedding): int8 table, per-row scale gathered alongside, Cast * scale.
    Weights already fed by a DequantizeLinear (a QDQ model) are left alone.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = tuple(keep)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_nodes: dict[int, list[Any]] = {}  # index of the node the new nodes go before
    replaced: dict[str, str] = {}
    drop: set[int] = set()  # original Gathers, replaced by their int8 version
    counts = {"matmul": 0, "gather": 0}

    def skip(node) -> bool:
        return kept_float(node.name, keep)

    for idx, node in enumerate(g.node):
        if skip(node):
            continue
        if matmuls and node.op_type in ("MatMul", "Gemm", "Conv"):
            wi = 1
            name = node.input[wi] if len(node.input) > wi else ""
            if name not in inits:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.dtype != np.float32 or w.ndim < 2:
                continue
            if name not in replaced:
                if node.op_type == "MatMul":
                    axis = w.ndim - 1
                elif node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                else:
                    axis = 0
                # all users must agree on the axis; otherwise leave the weight float
                users = consumers.get(name, [])
                if any(u.op_type != node.op_type for u in users) or any(list(u.input).index(name) != wi for u in users):
                    continue
                q, scale = _symmetric_int8(w, axis)
                qn, sn, zn, out = f"{name}_q8", f"{name}_scale", f"{name}_zero", f"{name}_dq"
                g.initializer.extend([
                    numpy_helper.from_array(q, qn),
                    numpy_helper.from_array(scale, sn),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn),
                ])
                new_nodes.setdefault(idx, []).append(
                    helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=f"{name}_DequantizeLinear", axis=axis)
                )
                replaced[name] = out
                counts["matmul"] += 1
            node.input[wi] = replaced[name]
        elif gathers and node.op_type == "Gather":
            name = node.input[0]
            if name not in inits or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.dtype != np.float32 or w.ndim != 2:
                continue
            q, scale = _symmetric_int8(w, 0)
            qn, sn = f"{name}_q8", f"{name}_rowscale"
            if qn not in {i.name for i in g.initializer}:
                g.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
            ids, out, base = node.input[1], node.output[0], f"{node.name or name}_q8"
            new_nodes.setdefault(idx, []).extend([
                helper.make_node("Gather", [qn, ids], [f"{base}_rows"], name=f"{base}_Gather", axis=0),
                helper.make_node("Cast", [f"{base}_rows"], [f"{base}_float"], name=f"{base}_Cast", to=TensorProto.FLOAT),
                helper.make_node("Gather", [sn, ids], [f"{base}_scale"], name=f"{base}_GatherScale", axis=0),
                helper.make_node("Unsqueeze", [f"{base}_scale", f"{base}_axes"], [f"{base}_scale2"], name=f"{base}_Unsqueeze"),
                helper.make_node("Mul", [f"{base}_float", f"{base}_scale2"], [out], name=f"{base}_Mul"),
            ])
            g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{base}_axes"))
            drop.add(idx)
            counts["gather"] += 1

    nodes = []
    for idx, node in enumerate(g.node):
        nodes.extend(new_nodes.get(idx, []))
        if idx not in drop:
            nodes.append(node)
    _set_nodes(g, nodes)
    return counts


# --- int4 weights (MatMulNBits) --------------------------------------------------------------


def gemm_to_matmul(model: Any, keep: Iterable[str] = ()) -> int:
    """Rewrite ``Gemm(A, B, C)`` with a constant 2-D B as ``MatMul(A, B') + C``, in place; returns the count.

    MatMulNBitsQuantizer takes MatMul only, and the exporter writes a linear on a
    2-D input (the vision encoder's) as Gemm. Only the plain form is rewritten
    (alpha = beta = 1, no transA); a transposed B gets a transposed copy (shared
    by every Gemm that reads it). The new nodes keep the Gemm's module prefix, so
    ``--keep-float`` still selects them; kept-float Gemms are left as they are.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    transposed: dict[str, str] = {}
    nodes, count = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        b = node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "Gemm" or not plain or b not in inits or len(inits[b].dims) != 2 or kept_float(node.name, keep):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            if b not in transposed:
                transposed[b] = f"{b}_T"
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[b]).T), transposed[b]))
            b = transposed[b]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        out = node.output[0]
        mm_out = f"{out}_matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], name=f"{node.name}_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}_Add"))
        count += 1
    _set_nodes(g, nodes)
    return count


def quantize_int4(model: Any, block_size: int, keep: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
    """4-bit symmetric block-wise MatMul weights (MatMulNBits) by onnxruntime's quantizer; the rest int8.

    Returns (the quantized model, counts). Convs and any weight MatMul the quantizer
    leaves (none on our graphs) get int8 per-channel DequantizeLinear weights and the
    embedding table the int8 Gather, as in int8-weight, so no weight silently stays
    float; ``keep`` nodes stay float throughout.
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise BadInputError(f"int4-weight on ort: block size {block_size} must be a power of two >= 16 (MatMulNBits)")
    keep = tuple(keep)
    gemms = gemm_to_matmul(model, keep)
    exclude = [n.name for n in model.graph.node if kept_float(n.name, keep)]
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=4,
    )
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
        quantizer.process()
    model = quantizer.model.model
    nbits = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    counts = quantize_weights(model, keep=keep)
    return model, {"matmul_nbits": nbits, "gemm_as_matmul": gemms, "int8_matmul_or_conv": counts["matmul"],
                   "int8_gather": counts["gather"], "block_size": block_size, "accuracy_level": INT4_ACCURACY_LEVEL}


# --- int8 static (QDQ) -------------------------------------------------------------------


def _feeds(method: str, sample: dict[str, Any], config: Any) -> dict[str, np.ndarray]:
    """One recorded runner call (runner names) as graph feeds (genai names)."""
    h = config.text.hidden_size
    if method == "token_embedding":
        feeds = {"input_ids": np.asarray(sample["tokens"], np.int64)}
        if config.vision:
            feeds["image_features"] = np.zeros((0, h), np.float32)
        if config.audio:
            feeds["audio_features"] = np.zeros((0, h), np.float32)
        return feeds
    if method == "vision_encoder":
        return {"pixel_values": np.asarray(sample["pixels"], np.float32)}
    if method == "audio_encoder":
        return {"audio_embeds": np.asarray(sample["mel"], np.float32)}
    if method == "text_decoder":
        embeds = np.asarray(sample["embeds"], np.float32)
        past = sample.get("past")
        t = config.text
        start = int(np.asarray(sample["cache_position"]).reshape(-1)[0])
        if past is None:
            if start:
                raise BadInputError("calibration decoder sample without 'past' at cache position > 0")
            empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
            past = [(empty, empty)] * t.num_layers
        return decoder_feeds(embeds, np.asarray(sample["position_ids"], np.int64), past)
    raise KeyError(method)


def decoder_feeds(embeds: np.ndarray, position_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]]):
    p = past[0][0].shape[2]
    feeds = {
        "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
        "attention_mask": np.ones((1, p + embeds.shape[1]), np.int64),
        "position_ids": np.ascontiguousarray(position_ids.reshape(3, 1, -1), np.int64),
    }
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(k, np.float32)
        feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(v, np.float32)
    return feeds


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def activation_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes neither of whose inputs is a constant (an initializer or a Constant's output)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def float_inputs_for(model: Any, names: set[str]) -> None:
    """The ``names`` nodes read their activations in float again.

    onnxruntime's QDQ quantizer quantizes a tensor once and points every consumer at the
    DequantizeLinear output, excluded nodes included: a kept-float v_proj whose input the
    quantized q_proj shares would otherwise run on int8-rounded activations.
    """
    prod = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, name in enumerate(node.input):
            dq = prod.get(name)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]


def quantize_static_model(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], work: Path, keep: Iterable[str] = ()) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = work / f"{src.stem}.pre.onnx"
    large = sum(p.stat().st_size for p in model_files(src)) > EXTERNAL_DATA_BYTES
    ext = {"save_as_external_data": large, "all_tensors_to_one_file": True,
           "external_data_location": pre.name + ".data" if large else None}
    # (in the work dir: when onnxruntime's symbolic shape inference gives up it saves its partial
    # model as sym_shape_infer_temp.onnx + <uuid>.data into the current directory)
    src, pre = src.resolve(), pre.resolve()
    with _quiet(), contextlib.chdir(work):
        try:
            quant_pre_process(str(src), str(pre), **ext)
        except Exception:
            # onnxruntime's symbolic shape inference gives up on some graphs (the embedding's
            # splice); ONNX shape inference + ORT optimisation still run
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, **ext)
    model = load_model(pre, with_data=False)
    keep = tuple(keep)
    exclude = [n.name for n in model.graph.node if kept_float(n.name, keep)]
    # the layers' MatMuls (a weight initializer on one side) are W8A8; attention's activation x activation
    # MatMuls (q.k^T, probs.v) stay float, as in ExecuTorch's int8-static and in the sensitivity simulation
    exclude += activation_matmuls(model)
    qdq = work / f"{src.stem}.qdq.onnx"
    with _quiet():
        quantize_static(
            str(pre),
            str(qdq),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            # int8 inputs, float outputs: as Core ML's int8-static and the sensitivity simulation
            # (XNNPACK's int8 linear, ExecuTorch's, also quantizes its output)
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]},
        )
    model = load_model(qdq)
    float_inputs_for(model, set(exclude))
    quantize_weights(model, matmuls=False, gathers=True, keep=keep)
    save_model(model, dst)


# --- ORT format, mobile usability ------------------------------------------------------------


def convert_to_ort(folder: Path) -> str:
    """Every .onnx under ``folder`` -> .ort beside it, plus required_operators_and_types.config.

    Fixed optimisation style (the CPU EP's; NNAPI / Core ML users may prefer
    re-converting with the Runtime style), ARM target: int8 QDQ stays int8.
    A model the converter cannot take is left without .ort (the caller checks).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with _quiet() as log:
        convert_onnx_models_to_ort(
            folder,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
            enable_type_reduction=True,
            allow_conversion_failures=True,
        )
    return log.getvalue()


def mobile_usability(path: Path) -> tuple[str, dict[str, Any]]:
    """onnxruntime's mobile usability check on one model: (full log text, short summary)."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
    logger = logging.getLogger(f"autoglm.ort.usability.{path.stem}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with _quiet():
            try_eps = usability_checker.analyze_model(path, skip_optimize=False, logger=logger)
    except Exception as e:  # the checker is advisory: record why it could not run
        return f"check failed: {type(e).__name__}: {e}\n", {"checked": False, "error": f"{type(e).__name__}: {e}"}
    text = stream.getvalue()
    summary: dict[str, Any] = {"checked": True, "try_nnapi_or_coreml": bool(try_eps)}
    section = None
    for line in text.splitlines():
        body = line.split(":", 1)[-1].strip()
        low = body.lower()
        if "checking" in low and "nnapi" in low:
            section = "nnapi"
        elif "checking" in low and "coreml" in low:
            section = "coreml_mlprogram" if "mlprogram" in low else "coreml"
        if section and ("partitions" in low or "unsupported ops" in low or "should perform well" in low):
            summary.setdefault(section, []).append(body)
    return text, summary


# --- genai_config.json -----------------------------------------------------------------------


def genai_config(config: Any, files: dict[str, str]) -> dict[str, Any]:
    """onnxruntime-genai's multimodal config for these files (the qwen2_5_vl layout: host 3-D M-RoPE)."""
    t, ids = config.text, config.tokens
    sess = {"log_id": "onnxruntime-genai", "provider_options": []}
    inputs, outputs = graph_io(config)["text_decoder"]
    model: dict[str, Any] = {
        "type": "qwen2_5_vl",
        "bos_token_id": list(ids.bos_ids)[0] if ids.bos_ids else ids.pad_id,
        "eos_token_id": list(ids.eos_ids),
        "pad_token_id": ids.pad_id,
        "vocab_size": t.vocab_size,
        "context_length": config.shape.max_seq_len,
        "decoder": {
            "session_options": sess,
            "filename": files["text_decoder"],
            "head_size": t.head_dim,
            "hidden_size": t.hidden_size,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "num_hidden_layers": t.num_layers,
            "inputs": {
                "inputs_embeds": "inputs_embeds",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        },
        "embedding": {
            "session_options": sess,
            "filename": files["token_embedding"],
            "inputs": {"input_ids": "input_ids", **({"image_features": "image_features"} if config.vision else {}),
                       **({"audio_features": "audio_features"} if config.audio else {})},
            "outputs": {"inputs_embeds": "inputs_embeds"},
        },
    }
    if config.vision:
        v = config.vision
        model["image_token_id"] = ids.image_token_id
        model["video_token_id"] = ids.video_token_id if ids.video_token_id >= 0 else ids.image_token_id
        model["vision_start_token_id"] = ids.image_start_id
        model["vision"] = {
            "session_options": sess,
            "filename": files["vision_encoder"],
            "spatial_merge_size": v.spatial_merge_size,
            "patch_size": v.patch_size,
            "tokens_per_second": 2.0,
            "inputs": {"pixel_values": "pixel_values"},
            "outputs": {"image_features": "image_features"},
        }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": config.shape.max_seq_len,
        "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
        "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
        "past_present_share_buffer": False,
    }
    return {"model": model, "search": search}


GENAI_PACKAGE = "onnxruntime-genai"
# the onnxruntime-genai release genai_config.json and the named-tensor recipe were written and tested for (the
# test extra's pin); runtime_versions also records the one installed at export ("not installed" where absent)
GENAI_VERSION = "0.18.0"


def genai_inputs(config: Any, prompt_ids: list[int], pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The named tensors an app hands ``og.Generator.set_inputs`` for a prompt with (or without) an image.

    onnxruntime-genai's own multimodal processor for its qwen2_5_vl type cannot
    feed this folder: it expects Qwen's vision markers and emits flattened
    patches ``[N, C*2*P*P]``, while vision_encoder.onnx takes normalised pixels
    ``[1, 3, S, S]`` (patchify is in the graph). genai's pipeline itself takes
    them unchanged: given ``pixel_values`` (4-D, so one image),
    ``num_image_tokens`` and ``image_grid_thw`` it runs vision_encoder.onnx,
    hands its ``image_features [N, H]`` to token_embedding.onnx (which splices
    them in at the placeholder tokens) and computes the 3-D M-RoPE positions from
    the grid, the same positions as the runner (an image at p: (p, p+row,
    p+col), text after it at p + grid/merge). ``prompt_ids`` are the rendered
    chat template's ids with one placeholder per image, as the runner tokenizes
    them; each placeholder is repeated to the image's token count here.
    """
    ids = config.tokens
    expanded: list[int] = []
    for tok in prompt_ids:
        n = config.image_tokens if (pixels is not None and tok == ids.image_token_id) else 1
        expanded += [int(tok)] * n
    out = {"input_ids": np.asarray([expanded], np.int32)}
    if pixels is None:
        return out
    if config.vision is None:
        raise BadInputError(f"model '{config.name}' has no vision encoder; drop the image")
    s = config.shape.image_size
    pixels = np.ascontiguousarray(pixels, np.float32)
    if pixels.shape != (1, 3, s, s):
        raise BadInputError(f"pixel_values must be normalised pixels [1, 3, {s}, {s}], got {list(pixels.shape)}")
    if prompt_ids.count(ids.image_token_id) != 1:
        raise BadInputError(f"the prompt must hold exactly one image placeholder (id {ids.image_token_id}) for one image")
    out["pixel_values"] = pixels
    out["image_grid_thw"] = np.asarray([[1, config.image_grid, config.image_grid]], np.int64)
    out["num_image_tokens"] = np.asarray([config.image_tokens], np.int64)
    return out


def genai_usage(config: Any, tokenizer_files: list[str]) -> dict[str, Any]:
    """artifact.json's account of what onnxruntime-genai runs in this folder and what the app does itself."""
    if {"tokenizer.json", "tokenizer_config.json"} <= set(tokenizer_files):
        text = ("og.Model(dir), og.Tokenizer(model) (tokenizer.json + tokenizer_config.json, which carries the chat "
                "template for tokenizer.apply_chat_template), generator.append_tokens(prompt ids)")
    else:  # og.Tokenizer needs both files
        text = (f"og.Model(dir), generator.append_tokens(prompt ids); no og.Tokenizer: model '{config.name}' ships "
                "no tokenizer.json + tokenizer_config.json, so the app tokenizes")
    out: dict[str, Any] = {"package": GENAI_PACKAGE, "written_for": GENAI_VERSION, "config": GENAI_CONFIG,
                           "model_type": "qwen2_5_vl", "text": text}
    if config.vision:
        v = config.vision
        s = config.shape.image_size
        out["image"] = {
            "processor": "none: genai's qwen2_5_vl processor emits Qwen's flattened patches and markers; do not call "
                         "model.create_multimodal_processor()",
            "preprocess": f"RGB, bicubic resize to {s}x{s}, /255, (x - image_mean) / image_std per channel, CHW",
            "image_mean": list(v.image_mean),
            "image_std": list(v.image_std),
            "set_inputs": {
                "input_ids": f"int32 [1, T]: the prompt ids with the image placeholder {config.tokens.image_token_id} "
                             f"repeated {config.image_tokens} times, right after {config.tokens.image_start_id}",
                "pixel_values": f"float32 [1, 3, {s}, {s}]",
                "image_grid_thw": [[1, config.image_grid, config.image_grid]],
                "num_image_tokens": [config.image_tokens],
            },
        }
    if config.audio:
        out["audio"] = ("not through onnxruntime-genai: its qwen2_5_vl model type opens no speech session, so audio "
                        "placeholders would keep their token embeddings; run audio_encoder and the other graphs with "
                        "onnxruntime directly (as OrtSession does)")
    return out


# --- the target ------------------------------------------------------------------------------


class OrtTarget:
    name = "ort"
    recipes = RECIPES

    def export(
        self,
        components: Any,
        recipe: Recipe,
        out: Path,
        calibration: Any | None = None,
        progress: Progress = no_progress,
    ) -> Artifact:
        import tempfile

        check_recipe(self.name, recipe, self.recipes)
        if recipe.name == "int4-weight" and recipe.group_size <= 0:
            raise BadInputError("int4-weight on ort quantizes in blocks (MatMulNBits): --group-size 0 (per channel) "
                                "is not available; use a power of two >= 16 such as 32")
        t0 = time.perf_counter()
        config = components.config
        methods = list(graph_io(config))
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise BadInputError(f"--out {out}: exists and is not a directory")
        feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        if recipe.name == "int8-static":
            recorded = resolve_method_inputs(calibration, components, progress)
            for m in methods:
                samples = spread(list(recorded.get(m, [])), MAX_CALIB_SAMPLES)
                if not samples:
                    raise BadInputError(f"int8-static: the calibration data has no samples for method '{m}'")
                feeds[m] = [_feeds(m, s, config) for s in samples]
        steps = len(methods) * 2 + 2
        done = 0
        meta = artifact_metadata(config, recipe)
        if recipe.name == "int4-weight":
            meta["group_size"] = recipe.group_size
        report: dict[str, Any] = {"quantization": {}, "mobile_usability": {}}
        with atomic_artifact_dir(out) as root, tempfile.TemporaryDirectory(
            prefix=f".{out.name}.work-", dir=root.parent
        ) as tmp:
            work = Path(tmp)
            files: dict[str, str] = {}
            for m in methods:
                progress("onnx export", done, steps)
                raw = work / f"{m}.onnx"
                export_onnx(components, m, raw)
                done += 1
                progress("onnx export", done, steps)
                final = root / f"{m}.onnx"
                if recipe.name == "fp32":
                    save_model(load_model(raw), final)
                elif recipe.name == "int8-weight":
                    model = load_model(raw)
                    report["quantization"][m] = quantize_weights(model, keep=recipe.keep_float)
                    save_model(model, final)
                elif recipe.name == "int4-weight":
                    model, report["quantization"][m] = quantize_int4(load_model(raw), recipe.group_size, recipe.keep_float)
                    save_model(model, final)
                    del model
                else:
                    quantize_static_model(raw, final, feeds[m], work, keep=recipe.keep_float)
                    report["quantization"][m] = {"calibration_samples": len(feeds[m])}
                set_metadata(final, {"autoglm.method": m, **{f"autoglm.{k}": v for k, v in meta.items()}})
                files[m] = final.name
                done += 1
                gc.collect()  # the previous model's protobuf before the next export (GiBs at 9B widths)
            progress("onnx export", done, steps)
            try:
                log = convert_to_ort(root)
            except Exception as e:
                raise ExportError(f"ORT format conversion of {root} failed: {e}") from e
            ops = root / OPS_CONFIG
            if ops.is_file():  # its header names each model by its staging path: name them by file name
                text = ops.read_text()
                for prefix in {str(root) + os.sep, str(root.resolve()) + os.sep}:
                    text = text.replace(prefix, "")
                ops.write_text(text)
            report["ort_format"] = {}
            for m in methods:
                size = sum(p.stat().st_size for p in model_files(root / files[m]))
                if (root / f"{m}.ort").is_file():
                    report["ort_format"][m] = f"{m}.ort"
                elif size >= ORT_FORMAT_LIMIT:
                    # ORT format is one flatbuffer: no external data, 2 GiB at most
                    report["ort_format"][m] = f"not converted: {size / 2**30:.1f} GiB is over the ORT format's 2 GiB limit"
                else:
                    why = [ln for ln in log.splitlines() if ln.startswith("Error converting") and f"{m}.onnx" in ln]
                    raise ExportError(f"ORT format conversion of {files[m]} failed: {(why or ['no .ort written'])[0]}")
            done += 1
            progress("onnx export", done, steps)
            texts = []
            for m in methods:
                text, summary = mobile_usability(root / files[m])
                texts.append(f"=== {files[m]} ===\n{text.replace(str(root) + os.sep, '')}")
                report["mobile_usability"][m] = summary
            (root / USABILITY_TXT).write_text("\n".join(texts))
            (root / GENAI_CONFIG).write_text(json.dumps(genai_config(config, files), indent=4) + "\n")
            tokenizer_names = copy_tokenizer_files(config, root)
            if not tokenizer_names:
                report["tokenizer"] = f"none: model '{config.name}' names no tokenizer.json"
            listed = []
            for m in methods:
                listed += [p.name for p in model_files(root / files[m])]
                if (root / f"{m}.ort").is_file():
                    listed.append(f"{m}.ort")
            listed += [OPS_CONFIG, USABILITY_TXT, GENAI_CONFIG, *tokenizer_names]
            progress("ort check", 0, 1)
            t = time.perf_counter()
            fmt = "ort" if all((root / f"{m}.ort").is_file() for m in methods) else "onnx"
            draft = Artifact(dir=root, target=self.name, recipe=recipe.name, files=listed, info={"metadata": meta})
            report["export_check"] = export_gate(self.name, recipe, OrtSession(draft, fmt), components, GATE)
            report["export_check"]["wall_s"] = round(time.perf_counter() - t, 2)
            progress("ort check", 1, 1)
            sizes = {name: (root / name).stat().st_size for name in listed}
            report["onnx_bytes"] = sum(sizes[p.name] for m in methods for p in model_files(root / files[m]))
            report["ort_bytes"] = sum(sizes.get(f"{m}.ort", 0) for m in methods)
            info = {
                "target": self.name,
                "recipe": recipe.name,
                "files": listed,
                "runner_interface": method_signatures(components),
                "programs": onnx_programs(root, methods),
                "metadata": meta,
                "runtime_versions": runtime_versions("onnx", "onnxscript", "onnxruntime", GENAI_PACKAGE),
                "export": {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
                "report": {
                    **report,
                    "models": {m: {"onnx": files[m], "ort": f"{m}.ort", "inputs": graph_io(config)[m][0],
                                   "outputs": graph_io(config)[m][1]} for m in methods},
                    "ops_config": OPS_CONFIG,
                    "genai_config": GENAI_CONFIG,
                    "genai": genai_usage(config, tokenizer_names),
                },
            }
            write_artifact_json(root, info)
            done = steps
            progress("onnx export", done, steps)
        from core.artifact import read_artifact

        return read_artifact(out)

    def load(self, artifact: Artifact, model_format: str | None = None) -> "OrtSession":
        fmt = (model_format or "onnx").lstrip(".")
        if fmt not in ("onnx", "ort"):
            raise BadInputError(f"ORT artifact model format must be 'onnx' or 'ort', not '{model_format}'")
        return OrtSession(artifact, fmt)


# --- the session -------------------------------------------------------------------------------


class OrtSession:
    """onnxruntime.InferenceSession (CPU provider) per method, behind the runner's Session interface."""

    def __init__(self, artifact: Artifact, model_format: str = "onnx"):
        import onnxruntime as ort

        from exporter.model.config import ModelConfig

        self.config = ModelConfig.from_dict(artifact.metadata["model"])
        self.format = model_format
        self.provenance = f"ONNX Runtime {ort.__version__} CPU ({model_format}, {artifact.recipe})"
        self.sessions: dict[str, Any] = {}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # the same graph transforms as the ORT-format conversion (ARM target keeps int8 QDQ int8)
        options.add_session_config_entry("session.qdqisint8allowed", "1")
        if model_format == "ort":
            options.add_session_config_entry("session.load_model_format", "ORT")
        for method in graph_io(self.config):
            path = artifact.dir / f"{method}.{model_format}"
            if not path.is_file():
                why = artifact.info.get("report", {}).get("ort_format", {}).get(method, "missing")
                raise ArtifactError(f"{artifact.dir}: no {path.name} in this ORT artifact ({why})")
            try:
                # NCHWc is x86-only and left out of the .ort conversion: leave it out here too
                self.sessions[method] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
                )
            except Exception as e:
                raise RuntimeFailure(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e
        t = self.config.text
        self._empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
        self.reset()

    def reset(self) -> None:
        n = self.config.text.num_layers
        self.past: list[tuple[np.ndarray, np.ndarray]] = [(self._empty, self._empty)] * n

    def _call(self, method: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if method not in self.sessions:
            raise BadInputError(f"this ORT artifact has no method '{method}' (it has: {', '.join(self.sessions)})")
        try:
            return self.sessions[method].run(None, feeds)
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed running {method}: {str(e).splitlines()[0]}") from e

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        cfg = self.config
        if method == "token_embedding":
            return self._call(method, _feeds(method, inputs, cfg))[0]
        if method in ("vision_encoder", "audio_encoder"):
            out = self._call(method, _feeds(method, inputs, cfg))[0]
            return out.reshape(1, -1, out.shape[-1])
        if method == "text_decoder":
            embeds = np.asarray(inputs["embeds"], np.float32)
            cache_position = np.asarray(inputs["cache_position"]).reshape(-1)
            start = int(cache_position[0]) if cache_position.size else 0
            have = self.past[0][0].shape[2]
            if start > have:
                raise RuntimeFailure(f"text_decoder: cache_position starts at {start} but only {have} positions are cached")
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in self.past]
            outs = self._call(method, decoder_feeds(embeds, np.asarray(inputs["position_ids"], np.int64), past))
            n = cfg.text.num_layers
            self.past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(n)]
            return outs[0]
        raise BadInputError(f"unknown method '{method}'")
