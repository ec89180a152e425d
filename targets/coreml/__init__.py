"""Core ML target: one ML program (.mlpackage) per method for iOS 18, four recipes.

Export, as a list of steps (``CoreMLTarget.export``):

1. Convert each method with coremltools (``minimum_deployment_target=iOS18``,
   compute precision FLOAT16):

   * ``token_embedding`` (tokens int32 ``[1, T]``, T a RangeDim), ``vision_encoder``
     and ``audio_encoder`` (fixed shapes) from ``torch.export`` programs
     (``run_decompositions({})`` first: coremltools rejects the training dialect).
   * ``text_decoder`` from ``torch.jit.trace`` of :class:`CoreMLDecoder`, which
     runs the model's own decoder layers (``TextModel._run``) with the KV cache
     held in fp16 buffers written by a slice at ``cache_position[0]``; they become
     Core ML states (``ct.StateType``) updated in place. It is converted twice,
     ``prefill`` (T a RangeDim 1..max_seq_len) and ``decode`` (T = 1), and the two
     are saved as one multifunction package whose weights are deduplicated
     (``ct.utils.save_multifunction``).

2. Quantize (recipe), per converted model, before the decoder's functions are
   combined (the same deterministic weights in both, so they still share one copy):

   * ``fp16``: as converted.
   * ``int8-weight``: ``coremltools.optimize.coreml.linear_quantize_weights``,
     linear symmetric int8 per output channel, applied to the weights of every
     linear / conv / matmul and to the embedding table (``gather``): iOS 18
     ``constexpr_blockwise_shift_scale`` ops.
   * ``int4-weight``: the same pass with ``dtype="int4"``, linear symmetric,
     ``granularity="per_block"`` with ``block_size = Recipe.group_size`` along the
     input channels (iOS 18 blockwise linear quantization; ``--group-size 0``:
     per output channel) for the weights of every linear / conv / matmul:
     ``constexpr_blockwise_shift_scale`` with int4 data (two values a byte in the
     weight blob). The embedding table (``gather``) stays int8 per row, as on ORT,
     and so does any weight whose input channels the block does not tile
     (coremltools would skip it silently: the patch-embedding conv's 3 colour
     channels); the report counts both.
   * ``int8-static``: W8A8. Activation ranges are measured by running the
     float ML program over real calibration samples (each method's inputs as
     the reference runner recorded them, ``calibration.stats.resolve_method_inputs``;
     decoder samples start from the recorded past in the state); coremltools'
     own activation-quantization pass (the one behind
     ``coremltools.optimize.coreml.linear_quantize_activations``) then inserts
     quantize/dequantize pairs before every linear / conv (not around adds or
     pools), followed by the int8 weights above.
     ``linear_quantize_activations`` itself gets its ranges from ``MLModel.predict``,
     which exists only on macOS and does not take states; the ML program is run by
     ``targets.coreml.mil`` instead, on every host.

   ``Recipe.keep_float`` names model modules (``model.named_modules()`` names): the
   ops using those modules' weights (found by value) are left out of both passes.

3. Metadata: ``artifact_metadata`` into every package's user-defined metadata
   (values as JSON text) and artifact.json, which also holds ``runner_interface``
   (the runner's method contract) and ``programs`` (each package's inputs, outputs
   and states read back from its saved spec, per function for the decoder).
4. Determinism: each package's ``model.mlmodel`` is re-serialised with
   deterministic protobuf output, without coremltools' conversion-date entry, and Manifest.json gets identifiers derived from
   the item paths (uuid5), so two exports of the same model are byte-identical.

Loading (``CoreMLTarget.load``): on macOS with Core ML available the session
runs the packages with ``MLModel.predict`` and ``make_state()``; elsewhere it
runs the same saved packages through ``targets.coreml.mil`` (a NumPy
interpreter of ML programs) and its provenance says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from core.errors import ArtifactError, BadInputError, ExportError, MissingRuntimeError, RuntimeFailure
from exporter.model.decoder import RMSNorm, Rope
from core.artifact import (
    Artifact,
    Progress,
    atomic_artifact_dir,
    no_progress,
    peak_rss_mb,
    read_artifact,
    runtime_versions,
    write_artifact_json,
)
from core.recipes import Recipe
from targets.base import artifact_metadata, check_recipe, copy_tokenizer_files, export_gate, method_signatures

RECIPES = ("fp16", "int8-weight", "int8-static", "int4-weight")
DEPLOYMENT_TARGET = "iOS18"
DECODER_FUNCTIONS = ("prefill", "decode")
OUTPUT_NAMES = {
    "token_embedding": "embeds",
    "vision_encoder": "image_embeds",
    "audio_encoder": "audio_embeds",
    "text_decoder": "logits",
}
METADATA_PREFIX = "autoglm."
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
# weights with fewer elements stay float (norm scales, biases, the tiny fusion gate's 3 rows are 2-D and kept)
MIN_WEIGHT_ELEMENTS = 256
# ops whose constant (weight) inputs the int8 recipes quantize
WEIGHT_CONSUMERS = ("linear", "conv", "matmul", "gather")
# calibration samples per method (int8-static): every one is run through the NumPy interpreter
MAX_CALIB_SAMPLES = 24
# export check (targets.base.export_gate): per-method (cosine floor, relative-L2 ceiling or None) vs eager
# on a held-out sample; a program outside it is rejected and nothing is written
# int4-weight on tiny's random weights (held-out sample, fp16 compute): decoder cosine 0.977 at block 32, 0.965 at
# block 128, the other methods >= 0.997; with each byte's two int4 values swapped the decoder falls to 0.04, with
# one scale for every block (the mean) to 0.90
GATE = {"fp16": (0.999, None), "int8-weight": (0.99, None), "int8-static": (0.95, None), "int4-weight": (0.95, None)}


def package_name(method: str) -> str:
    return f"{method}.mlpackage"


# --- the decoder with its KV cache as Core ML state -------------------------------------


class CoreMLDecoder(nn.Module):
    """text_decoder semantics with the cache in fp16 buffers that Core ML turns into states.

    State names: ``cache_k_{i}`` / ``cache_v_{i}`` ``[1, kv_heads, max_seq_len, head_dim]``
    (Core ML states are fp16 only). The new keys/values are written with a
    slice at ``cache_position[0]`` (contiguous positions, as the runner calls it);
    the attention mask comes from ``cache_position`` inside the graph, without inf.
    """

    def __init__(self, components: Any):
        super().__init__()
        cfg = components.config
        t = cfg.text
        self.text = components.model.text
        self.num_layers = t.num_layers
        self.max_seq_len = components.text_decoder.max_seq_len
        shape = (1, t.num_kv_heads, self.max_seq_len, t.head_dim)
        for i in range(t.num_layers):
            self.register_buffer(f"cache_k_{i}", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer(f"cache_v_{i}", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("slots", torch.arange(self.max_seq_len, dtype=torch.int32))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(b.shape) for name, b in self.named_buffers() if name.startswith("cache_")}

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # embeds: [1, T, H]; position_ids: [3, T] int32; cache_position: [T] int32 -> logits [1, T, V]
        start = cache_position[0]
        n = embeds.shape[1]
        mask = self.slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # [T, max_seq]

        def kv_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
            k_cache = getattr(self, f"cache_k_{layer}")
            v_cache = getattr(self, f"cache_v_{layer}")
            k_cache[:, :, start : start + n] = k.to(k_cache.dtype)
            v_cache[:, :, start : start + n] = v.to(v_cache.dtype)
            return k_cache.to(k.dtype), v_cache.to(v.dtype)

        return self.text._run(embeds, position_ids, mask, kv_fn)


class TableRope(Rope):
    """The model's rotary embedding with cos/sin looked up in tables made at export time.

    The tables are the model's own ``Rope`` evaluated in float32 for every
    position below ``max_pos`` (all three M-RoPE axes equal), and ``axis_mask``
    says which axis each rotary dimension takes its position from (probed from
    the same ``Rope``). Under Core ML's fp16 compute the angle ``position * freq``
    would be rounded to fp16 (0.25 rad steps near position 1000); a table lookup
    keeps the float32 angles. ``apply`` is the model's.
    """

    def __init__(self, rope: Rope, max_pos: int):
        nn.Module.__init__(self)
        self.dim = rope.dim
        self.interleaved = rope.interleaved
        self.max_pos = max_pos
        with torch.no_grad():
            cos, sin = rope(torch.arange(max_pos, dtype=torch.long).expand(3, max_pos))  # [P, dim]
            masks = []
            for axis in range(3):
                probe = torch.zeros(3, 1, dtype=torch.long)
                probe[axis] = 1
                masks.append(rope(probe)[1][0] != 0)
        mask = torch.stack(masks).to(cos.dtype)  # [3, dim]
        if not torch.equal(mask.sum(0), torch.ones_like(mask[0])):
            raise ExportError("rotary embedding: could not tell which M-RoPE axis each rotary dimension uses")
        self.register_buffer("cos_table", cos.float())
        self.register_buffer("sin_table", sin.float())
        self.register_buffer("axis_mask", mask.unsqueeze(1))  # [3, 1, dim]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [3, T] -> cos, sin: [T, rotary_dim]
        idx = position_ids.clamp(0, self.max_pos - 1)
        return (self.cos_table[idx] * self.axis_mask).sum(0), (self.sin_table[idx] * self.axis_mask).sum(0)


# --- conversion ----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' progress bars, warnings and INFO logs."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("", "coremltools", "torch.export")]
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


def _register_converters() -> None:
    """torch.export's ``alias`` (a view, left by run_decompositions in the audio encoder) is a no-op."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    if _TORCH_OPS_REGISTRY.get_func("alias") is None:
        _TORCH_OPS_REGISTRY.set_func_by_name(_TORCH_OPS_REGISTRY.get_func("clone"), "alias")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def fp16_copy(module: nn.Module, safe_rmsnorm: bool = False) -> nn.Module:
    """A deep copy of ``module`` whose floating parameters and buffers are fp16, eval mode, no grad.

    Converting from fp16 weights keeps coremltools from holding several float32
    copies of every weight (measured: an fp32 embedding table of 592 MiB took
    4.7 GiB more peak RSS to convert; the same table in fp16, 0.01 GiB). The
    fp16 tensors are made first and handed to ``deepcopy`` through its memo, so
    no float32 copy of the model is ever made. The model itself is not touched.
    ``safe_rmsnorm`` swaps every RMSNorm for :class:`Fp16SafeRMSNorm` (the decoder).
    """
    import copy
    import itertools

    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) in memo or not t.is_floating_point():
            continue
        half = t.detach().to(torch.float16)
        memo[id(t)] = nn.Parameter(half, requires_grad=False) if isinstance(t, nn.Parameter) else half
    for m in module.modules():  # LayerNorm keeps float32 parameters (see _Float32LayerNorm)
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
    copied = copy.deepcopy(module, memo).eval()
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, _Float32LayerNorm(child))
            elif safe_rmsnorm and isinstance(child, RMSNorm):
                setattr(parent, name, Fp16SafeRMSNorm(child))
    return copied


class Fp16SafeRMSNorm(nn.Module):
    """RMSNorm whose mean of squares cannot overflow fp16.

    Core ML runs FLOAT16: trained LLMs carry "massive activations" in the residual
    stream (SmolLM2-135M: |x| up to 23,852, inside fp16's 65,504), whose squares
    (5.7e8) overflow to inf, so ``rsqrt`` gives 0 and the row is wiped out (SmolLM2
    decoder cosine 0.088 before this). Each row is divided by its max |x| first;
    ``x * rsqrt(mean(x^2) + eps)`` equals ``y * rsqrt(mean(y^2) + eps / s^2)`` for
    ``y = x / s`` exactly, and now every square is <= 1.
    """

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-2)
        y = x / s
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / (s * s)))


class _Float32LayerNorm(nn.Module):
    """nn.LayerNorm computed in float32 inside an fp16 copy.

    coremltools' layer_norm converter gives an fp32 epsilon next to fp16 gamma
    and rejects the op; a float32 LayerNorm between two casts converts, and the
    FLOAT16 compute precision pass then lowers it to fp16 like every other op.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def _fp16_args(args: tuple) -> tuple:
    return tuple(a.to(torch.float16) if a.is_floating_point() else a for a in args)


def convert_method(components: Any, method: str) -> Any:
    """token_embedding / vision_encoder / audio_encoder -> ct.models.MLModel (not yet saved).

    From ``torch.export`` of an fp16 copy of the method (``run_decompositions({})``
    first); the package's float inputs and outputs are float32.
    """
    import coremltools as ct

    _register_converters()
    try:
        with torch.no_grad(), _quiet():
            module = fp16_copy(components.methods()[method])
            example = _fp16_args(components.example_inputs(method))
            ep = torch.export.export(module, example, dynamic_shapes=components.dynamic_shapes(method), strict=False)
            ep = ep.run_decompositions({})
            del module
            if method == "token_embedding":
                seq = ct.RangeDim(1, components.config.shape.max_seq_len, default=4)
                inputs = [ct.TensorType("tokens", shape=(1, seq), dtype=np.int32)]
            else:
                name = components.input_names(method)[0]
                inputs = [ct.TensorType(name, shape=tuple(example[0].shape), dtype=np.float32)]
            return ct.convert(
                ep,
                inputs=inputs,
                outputs=[ct.TensorType(OUTPUT_NAMES[method], dtype=np.float32)],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
            )
    except Exception as e:  # coremltools raises many types
        raise ExportError(f"Core ML conversion of {method} failed: {_first_line(e)}") from e


def convert_decoder(components: Any, function: str) -> Any:
    """text_decoder's ``prefill`` (T in 1..max_seq_len) or ``decode`` (T = 1) function -> MLModel."""
    import coremltools as ct

    # the decoder's residual stream is where trained weights put massive activations
    decoder = fp16_copy(CoreMLDecoder(components), safe_rmsnorm=True)
    decoder.text.rope = TableRope(components.model.text.rope, decoder.max_seq_len).to(torch.float16)
    cfg = components.config
    h = cfg.text.hidden_size
    t = 4 if function == "prefill" else 1
    pos = torch.arange(t, dtype=torch.int32)
    example = (torch.zeros(1, t, h, dtype=torch.float16), pos.expand(3, t).contiguous(), pos)
    seq: Any = ct.RangeDim(1, decoder.max_seq_len, default=t) if function == "prefill" else 1
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
        for name, shape in decoder.state_shapes().items()
    ]
    try:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(decoder, example)
            return ct.convert(
                traced,
                inputs=[
                    ct.TensorType("embeds", shape=(1, seq, h), dtype=np.float32),
                    ct.TensorType("position_ids", shape=(3, seq), dtype=np.int32),
                    ct.TensorType("cache_position", shape=(seq,), dtype=np.int32),
                ],
                outputs=[ct.TensorType("logits", dtype=np.float32)],
                states=states,
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
            )
    except Exception as e:
        raise ExportError(f"Core ML conversion of text_decoder ({function}) failed: {_first_line(e)}") from e


# --- which weights the int8 recipes quantize ----------------------------------------------


def _program(mlmodel: Any) -> Any:
    prog = getattr(mlmodel, "_mil_program", None)
    if prog is None:
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

        spec = mlmodel.get_spec()
        prog = milproto_to_pymil(spec, spec.specificationVersion, mlmodel.weights_dir)
    return prog


def _all_ops(block: Any) -> Iterable[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _all_ops(inner)


def _fingerprint(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return (a.shape, a.tobytes())


def kept_arrays(model: nn.Module, keep: Iterable[str]) -> set[tuple]:
    """fp16 fingerprints (shape, bytes) of every weight of the ``keep`` modules (and their transposes)."""
    keep = tuple(k for k in keep if k)
    if not keep:
        return set()
    prints: set[tuple] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not any(name == k or name.startswith(k + ".") for k in keep) or p.ndim < 2:
            continue
        w = p.detach().float().numpy()
        prints.add(_fingerprint(w))
        if w.ndim == 2:
            prints.add(_fingerprint(w.T))
    return prints


def weight_plan(mlmodel: Any, keep_prints: set[tuple]) -> tuple[list[str], list[str], list[str]]:
    """(const ops to quantize, const ops kept float, non-const ops kept float) in one converted model.

    A weight is a constant with at least MIN_WEIGHT_ELEMENTS elements and two or
    more dimensions that feeds a linear / conv / matmul / gather. A weight whose
    value equals one of the ``keep`` modules' weights stays float, and so do the
    ops that use it (activation quantization skips them too).
    """
    quantize, kept_consts, kept_ops = [], [], []
    prog = _program(mlmodel)
    for func in prog.functions.values():
        for op in _all_ops(func):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.ndim < 2 or val.size < MIN_WEIGHT_ELEMENTS:
                continue
            if not np.issubdtype(val.dtype, np.floating):
                continue
            children = [c for out in op.outputs for c in out.child_ops]
            if not children or not all(c.op_type in WEIGHT_CONSUMERS for c in children):
                continue
            if keep_prints and _fingerprint(val) in keep_prints:
                kept_consts.append(op.name)
                kept_ops.extend(c.name for c in children)
            else:
                quantize.append(op.name)
    return quantize, kept_consts, sorted(set(kept_ops))


def quantize_weights_int8(mlmodel: Any, keep_prints: set[tuple]) -> tuple[Any, dict[str, int]]:
    """Per-channel symmetric int8 weights (constexpr_blockwise_shift_scale on iOS 18)."""
    import coremltools.optimize.coreml as cto

    quantize, kept, _ = weight_plan(mlmodel, keep_prints)
    op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1)
    config = cto.OptimizationConfig(global_config=None, op_name_configs={name: op_cfg for name in quantize})
    with _quiet():
        out = cto.linear_quantize_weights(mlmodel, config=config)
    return out, {"int8_weights": len(quantize), "float_weights_kept": len(kept)}


def _float_consts(mlmodel: Any, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are still float const ops in ``mlmodel`` (a quantized const is replaced)."""
    left = set()
    for func in _program(mlmodel).functions.values():
        for op in _all_ops(func):
            val = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(val, np.ndarray) and np.issubdtype(val.dtype, np.floating):
                left.add(op.name)
    return [n for n in names if n in left]


def quantize_weights_int4(mlmodel: Any, keep_prints: set[tuple], block_size: int) -> tuple[Any, dict[str, Any]]:
    """4-bit symmetric weights in blocks of ``block_size`` input channels (0: per output channel); the rest int8.

    Linear / conv / matmul weights go to int4 (constexpr_blockwise_shift_scale, iOS 18).
    coremltools skips, without a word, a weight whose input channels the block does not
    tile; those, and the embedding tables (gather), then get the int8 per-channel weights
    of int8-weight, so no planned weight stays float.
    """
    import coremltools.optimize.coreml as cto

    quantize, kept, _ = weight_plan(mlmodel, keep_prints)
    users: dict[str, set[str]] = {}
    for func in _program(mlmodel).functions.values():
        for op in _all_ops(func):
            if op.name in quantize:
                users[op.name] = {c.op_type for out in op.outputs for c in out.child_ops}
    four = [n for n in quantize if "gather" not in users.get(n, {"gather"})]
    extra = {"granularity": "per_block", "block_size": block_size} if block_size > 0 else {"granularity": "per_channel"}
    cfg4 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", weight_threshold=1, **extra)
    with _quiet():
        mlmodel = cto.linear_quantize_weights(mlmodel, config=cto.OptimizationConfig(op_name_configs={n: cfg4 for n in four}))
    rest = _float_consts(mlmodel, quantize)
    if rest:
        cfg8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1)
        with _quiet():
            mlmodel = cto.linear_quantize_weights(mlmodel, config=cto.OptimizationConfig(op_name_configs={n: cfg8 for n in rest}))
    still = _float_consts(mlmodel, quantize)
    if still:
        raise ExportError(f"int4-weight: coremltools left {len(still)} planned weight(s) in float: {', '.join(still[:3])}")
    return mlmodel, {"int4_weights": len(quantize) - len(rest), "int8_weights": len(rest), "float_weights_kept": len(kept),
                     "block_size": block_size}


# --- packages: combine, metadata, determinism ---------------------------------------------


def save_model(mlmodel: Any, path: Path) -> None:
    with _quiet():
        mlmodel.save(str(path))


def combine_decoder(prefill: Path, decode: Path, dest: Path) -> None:
    """One multifunction package (``prefill``, ``decode``; default ``decode``), weights deduplicated."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(prefill), src_function_name="main", target_function_name="prefill")
    desc.add_function(str(decode), src_function_name="main", target_function_name="decode")
    desc.default_function_name = "decode"
    with _quiet():
        ct.utils.save_multifunction(desc, str(dest))


def finalize_package(path: Path, metadata: dict[str, Any], method: str) -> None:
    """User-defined metadata in, deterministic bytes out (spec serialisation and Manifest.json ids)."""
    from coremltools.proto import Model_pb2

    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    user = spec.description.metadata.userDefined
    if CONVERSION_DATE_KEY in user:  # today's date: two builds on different days would differ
        del user[CONVERSION_DATE_KEY]
    user[f"{METADATA_PREFIX}method"] = method
    for key, value in metadata.items():
        user[f"{METADATA_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    spec.description.metadata.versionString = str(metadata.get("package_version", ""))
    spec.description.metadata.shortDescription = f"autoglm-export {method} ({metadata.get('model_name', '')}, {metadata.get('recipe', '')})"
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    spec_path.chmod(0o644)

    manifest_path = path / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest.get("itemInfoEntries", {})
    renamed, new_entries = {}, {}
    for old_id, entry in entries.items():
        new_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"autoglm-export:{entry.get('path', old_id)}")).upper()
        renamed[old_id] = new_id
        new_entries[new_id] = entry
    manifest["itemInfoEntries"] = dict(sorted(new_entries.items()))
    if manifest.get("rootModelIdentifier") in renamed:
        manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def read_spec(path: Path) -> Any:
    """The saved Model spec of a package (works on Linux)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((Path(path) / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    return spec


# numpy-style names of Core ML feature (ArrayFeatureType) and ML program (MIL DataType) element types
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "FLOAT64": "float64", "INT32": "int32",
           "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT64": "int64", "BOOL": "bool"}


def _array_shape(array: Any) -> list[int | str]:
    """A multiArray feature's shape: fixed dims as ints, a RangeDim as "lower..upper" (upper "" when unbounded).

    Core ML keeps no names for flexible dims (ct.RangeDim's symbol is not saved), only their bounds;
    an enumerated-shapes dim that varies is written "a|b|c".
    """
    shape: list[int | str] = [int(d) for d in array.shape]
    which = array.WhichOneof("ShapeFlexibility")
    if which == "shapeRange":
        for i, r in enumerate(array.shapeRange.sizeRanges):
            lo, hi = int(r.lowerBound), int(r.upperBound)
            if lo != hi:
                shape[i] = f"{lo}..{hi if hi >= 0 else ''}"
            else:
                shape[i] = lo
    elif which == "enumeratedShapes":
        options = [list(s.shape) for s in array.enumeratedShapes.shapes]
        shape = [vals[0] if len(set(vals)) == 1 else "|".join(str(v) for v in sorted(set(vals))) for vals in zip(*options)]
        shape = [int(d) if not isinstance(d, str) else d for d in shape]
    return shape


def _feature(feature: Any, mil_type: Any = None) -> dict[str, Any]:
    """A feature description as {name, dtype, shape}. ``mil_type``: the ML program's type for it, read when the
    description leaves the shape out (coremltools writes none for outputs): unknown dims there are "?"."""
    from coremltools.proto import FeatureTypes_pb2

    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else getattr(feature.type, kind)
    if kind not in ("multiArrayType", "stateType"):
        return {"name": feature.name, "dtype": kind, "shape": []}
    dtype = _DTYPES.get(FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType), "")
    shape = _array_shape(array)
    if not shape and mil_type is not None:
        t = mil_type.tensorType
        shape = [int(d.constant.size) if d.WhichOneof("dimension") == "constant" else "?" for d in t.dimensions]
        if not dtype:
            from coremltools.proto import MIL_pb2

            dtype = _DTYPES.get(MIL_pb2.DataType.Name(t.dataType), "")
    return {"name": feature.name, "dtype": dtype, "shape": shape}


def _mil_output_types(spec: Any, function: str) -> dict[str, Any]:
    """Output name -> its ValueType in the ML program's ``function``."""
    fn = spec.mlProgram.functions.get(function)
    if fn is None:
        return {}
    block = fn.block_specializations[fn.opset]
    outs = set(block.outputs)
    return {o.name: o.type for op in block.operations for o in op.outputs if o.name in outs}


def _function_io(description: Any, spec: Any, function: str) -> dict[str, list[dict[str, Any]]]:
    mil = _mil_output_types(spec, function)
    return {
        "inputs": [_feature(f) for f in description.input],
        "outputs": [_feature(f, mil.get(f.name)) for f in description.output],
        "states": [_feature(f) for f in description.state],
    }


def package_program(path: Path) -> dict[str, Any]:
    """One saved package's I/O as its spec declares it: inputs, outputs and states (the KV cache).

    A multifunction package (the decoder: ``prefill`` and ``decode``) lists each function under
    ``functions``; its top-level inputs/outputs/states are the default function's (what
    ``MLModel(path)`` loads).
    """
    import coremltools as ct

    with _quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    d = spec.description
    entry: dict[str, Any] = {"file": Path(path).name}
    if len(d.functions):
        functions = {f.name: _function_io(f, spec, f.name) for f in d.functions}
        entry["default_function"] = d.defaultFunctionName
        entry.update(functions[d.defaultFunctionName])
        entry["functions"] = functions
    else:
        entry.update(_function_io(d, spec, "main"))
    return entry


def coreml_programs(root: Path, methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """artifact.json's ``programs``: each method's package and its I/O read back from the saved spec.

    The runner's interface (``runner_interface``) differs: tokens and positions are int32 here, the
    decoder is two functions sharing its states, and flexible lengths are ranges.
    """
    return {m: package_program(root / package_name(m)) for m in methods}


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (Path(path) / "Data" / "com.apple.CoreML" / "weights").rglob("*") if p.is_file())


# --- the target --------------------------------------------------------------------------


class CoreMLTarget:
    name = "coreml"
    recipes = RECIPES

    def export(
        self,
        components: Any,
        recipe: Recipe,
        out: Path,
        calibration: Any | None = None,
        progress: Progress = no_progress,
    ) -> Artifact:
        check_recipe(self.name, recipe, self.recipes)
        t0 = time.perf_counter()
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise BadInputError(f"--out {out}: exists and is not a directory")
        config = components.config
        methods = list(components.methods())
        samples: dict[str, list[dict[str, Any]]] = {}
        if recipe.name == "int8-static":
            samples = calibration_samples(calibration, components, methods, progress)
        keep_prints = kept_arrays(components.model, recipe.keep_float) if recipe.is_quantized else set()
        meta = artifact_metadata(config, recipe)
        meta["deployment_target"] = DEPLOYMENT_TARGET
        if recipe.name == "int4-weight":
            meta["group_size"] = recipe.group_size
        report: dict[str, Any] = {"quantization": {}, "convert_s": {}, "packages": {}}
        steps = len(methods) + 1
        with atomic_artifact_dir(out) as root, tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=root.parent) as tmp:
            work = Path(tmp)
            files = []
            for i, method in enumerate(methods):
                progress("coreml convert", i, steps)
                m0 = time.perf_counter()
                dest = root / package_name(method)
                if method == "text_decoder":
                    parts = {}
                    for function in DECODER_FUNCTIONS:
                        mlmodel = convert_decoder(components, function)
                        mlmodel, qreport = self._quantize(mlmodel, recipe, keep_prints, samples, method, function, work)
                        report["quantization"][f"{method}.{function}"] = qreport
                        parts[function] = work / f"{method}.{function}.mlpackage"
                        save_model(mlmodel, parts[function])
                        del mlmodel
                    combine_decoder(parts["prefill"], parts["decode"], dest)
                    report["packages"][method] = {
                        "functions": list(DECODER_FUNCTIONS),
                        "default_function": "decode",
                        "weight_bytes": weight_bytes(dest),
                        "weight_bytes_per_function": {f: weight_bytes(p) for f, p in parts.items()},
                    }
                else:
                    mlmodel = convert_method(components, method)
                    mlmodel, qreport = self._quantize(mlmodel, recipe, keep_prints, samples, method, "main", work)
                    report["quantization"][method] = qreport
                    save_model(mlmodel, dest)
                    del mlmodel
                    report["packages"][method] = {"weight_bytes": weight_bytes(dest)}
                finalize_package(dest, meta, method)
                report["packages"][method]["bytes"] = package_bytes(dest)
                report["convert_s"][method] = round(time.perf_counter() - m0, 2)
                files.append(dest.name)
            progress("coreml convert", len(methods), steps)
            tokenizer_names = copy_tokenizer_files(config, root)
            if not tokenizer_names:
                report["tokenizer"] = f"none: model '{config.name}' names no tokenizer.json"
            files += tokenizer_names
            report["total_bytes"] = sum(report["packages"][m]["bytes"] for m in methods)
            report["convert_wall_s"] = round(time.perf_counter() - t0, 2)
            progress("coreml check", 0, 1)
            c0 = time.perf_counter()
            report["export_check"] = self._check(components, root, recipe, meta)
            report["export_check"]["wall_s"] = round(time.perf_counter() - c0, 2)
            progress("coreml check", 1, 1)
            info = {
                "target": self.name,
                "recipe": recipe.name,
                "files": files,
                "runner_interface": method_signatures(components),
                "programs": coreml_programs(root, methods),
                "metadata": meta,
                "runtime_versions": runtime_versions("coremltools"),
                "export": {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
                "report": {
                    **report,
                    "deployment_target": DEPLOYMENT_TARGET,
                    "compute_precision": "FLOAT16",
                    "execution_on_this_host": execution_note(),
                },
            }
            write_artifact_json(root, info)
            progress("coreml convert", steps, steps)
        return read_artifact(out)

    def _check(self, components: Any, root: Path, recipe: Recipe, meta: dict[str, Any]) -> dict[str, Any]:
        draft = Artifact(dir=root, target=self.name, recipe=recipe.name, files=[],
                         info={"metadata": meta, "runner_interface": method_signatures(components)})
        try:
            session = CoreMLSession(draft)
        except MissingRuntimeError as e:
            return {"measured": False, "why": str(e)}
        return export_gate(self.name, recipe, session, components, GATE)

    def _quantize(self, mlmodel, recipe, keep_prints, samples, method, function, work):
        if recipe.name == "fp16":
            return mlmodel, {}
        report: dict[str, Any] = {}
        if recipe.name == "int4-weight":
            return quantize_weights_int4(mlmodel, keep_prints, recipe.group_size)
        if recipe.name == "int8-static":
            mlmodel, areport = quantize_activations_int8(mlmodel, keep_prints, samples[method], method, function, work)
            report.update(areport)
        mlmodel, wreport = quantize_weights_int8(mlmodel, keep_prints)
        report.update(wreport)
        return mlmodel, report

    def load(self, artifact: Artifact) -> "CoreMLSession":
        if artifact.target != self.name:
            raise ArtifactError(f"{artifact.dir}: a '{artifact.target}' artifact, not a Core ML one")
        return CoreMLSession(artifact)


# --- int8-static: activation ranges from real samples ------------------------------------


def calibration_samples(calibration: Any, components: Any, methods: list[str], progress: Progress) -> dict[str, list[dict[str, Any]]]:
    from calibration.stats import resolve_method_inputs

    recorded = resolve_method_inputs(calibration, components, progress)
    out = {}
    for m in methods:
        calls = list(recorded.get(m, []))
        if not calls:
            raise BadInputError(f"int8-static: the calibration data has no samples for method '{m}'")
        out[m] = calls
    return out


def _coreml_feeds(method: str, sample: dict[str, Any]) -> dict[str, np.ndarray]:
    """One recorded runner call (runner names, int64) as the package's feeds."""
    if method == "token_embedding":
        return {"tokens": _as_int32(sample["tokens"]).reshape(1, -1)}
    if method == "vision_encoder":
        return {"pixels": np.ascontiguousarray(sample["pixels"], np.float32)}
    if method == "audio_encoder":
        return {"mel": np.ascontiguousarray(sample["mel"], np.float32)}
    embeds = np.ascontiguousarray(sample["embeds"], np.float32)
    t = embeds.shape[1]
    return {
        "embeds": embeds,
        "position_ids": _as_int32(sample["position_ids"]).reshape(3, t),
        "cache_position": _as_int32(sample["cache_position"]).reshape(t),
    }


def _function_samples(method: str, function: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_CALIB_SAMPLES of a method's recorded calls, spread over the set (decoder: T = 1 calls for decode)."""
    from calibration.stats import spread

    if method != "text_decoder":
        return spread(samples, MAX_CALIB_SAMPLES)
    want_decode = function == "decode"
    picked = [s for s in samples if (np.asarray(s["embeds"]).shape[1] == 1) == want_decode]
    if not picked:
        kind = "decode (T = 1)" if want_decode else "prefill (T > 1)"
        raise BadInputError(f"int8-static: the calibration data has no {kind} samples for text_decoder")
    return spread(picked, MAX_CALIB_SAMPLES)


def _intermediate_outputs(spec: Any, function: str) -> tuple[dict[str, int], list[list[str]]]:
    """{name: MIL dtype} of every non-const op output that can be a model output; concat ops' [inputs..., output]."""
    from coremltools.proto import MIL_pb2

    allowed = (MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.FLOAT32)
    fn = spec.mlProgram.functions[function]
    block = fn.block_specializations[fn.opset]
    names: dict[str, int] = {}
    concats: list[list[str]] = []
    for op in block.operations:
        if op.type == "const":
            continue
        for out in op.outputs:
            dtype = out.type.tensorType.dataType
            if dtype in allowed:
                names[out.name] = dtype
        if op.type == "concat":
            args = [a.name for a in op.inputs["values"].arguments if a.name]
            concats.append(args + [o.name for o in op.outputs])
    return names, concats


def _debug_package(src: Path, dest: Path, names: dict[str, int]) -> None:
    """A copy of a single-function package whose outputs also include ``names`` (as ModelDebugger builds)."""
    from coremltools.proto import FeatureTypes_pb2, MIL_pb2, Model_pb2

    kinds = {MIL_pb2.DataType.FLOAT16: FeatureTypes_pb2.ArrayFeatureType.FLOAT16,
             MIL_pb2.DataType.FLOAT32: FeatureTypes_pb2.ArrayFeatureType.FLOAT32}
    shutil.copytree(src, dest)
    spec = read_spec(src)
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    have = set(block.outputs)
    for name, dtype in names.items():
        if name in have:
            continue
        block.outputs.append(name)
        feature = Model_pb2.FeatureDescription()
        feature.name = name
        feature.type.multiArrayType.dataType = kinds[dtype]
        spec.description.output.append(feature)
    (dest / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString(deterministic=True))


def _fill_state(state: Any, past: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a recorded past ([1, kv, P, D] per layer) into the first P slots of an interpreter state."""
    for i, (k, v) in enumerate(past or []):
        for name, value in ((f"cache_k_{i}", k), (f"cache_v_{i}", v)):
            p = value.shape[2]
            if p:
                state[name][:, :, :p] = value.astype(state[name].dtype)


def activation_ranges(package: Path, method: str, samples: list[dict[str, Any]], work: Path) -> dict[str, dict[str, float]]:
    """{tensor name: {rmin, rmax}} over real samples, by running the float ML program in the interpreter."""
    from targets.coreml.mil import MILProgram

    spec = read_spec(package)
    names, concats = _intermediate_outputs(spec, "main")
    debug = work / f"{package.stem}.ranges.mlpackage"
    if debug.exists():
        shutil.rmtree(debug)
    _debug_package(package, debug, names)
    prog = MILProgram.load(debug)
    stats: dict[str, dict[str, float]] = {}

    def record(name: str, value: np.ndarray) -> None:
        value = np.asarray(value, np.float32)
        if value.size == 0:
            return
        lo, hi = float(value.min()), float(value.max())
        s = stats.setdefault(name, {"rmin": lo, "rmax": hi})
        s["rmin"], s["rmax"] = min(s["rmin"], lo), max(s["rmax"], hi)

    for sample in samples:
        feeds = _coreml_feeds(method, sample)
        for name, value in feeds.items():
            if np.issubdtype(value.dtype, np.floating):
                record(name, value)
        if method == "text_decoder":
            state = prog.new_state("main")
            _fill_state(state, sample.get("past"))
            outs = prog.run(feeds, function="main", state=state)
        else:
            outs = prog.run(feeds, function="main")
        for name in names:
            if name in outs:
                record(name, outs[name])
    shutil.rmtree(debug, ignore_errors=True)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ExportError(f"int8-static: the interpreter returned no value for {len(missing)} tensors of {method} (e.g. {missing[0]})")
    # as coremltools does: a concat's inputs and output share one range
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    _adjust_concat_surrounding_activation_stats([c for c in concats if all(n in stats for n in c)], stats)
    return stats


def _non_float_ops(mlmodel: Any) -> set[str]:
    """Ops computing on integers (index arithmetic such as an embedding's wrap-around add): never quantized."""
    from coremltools.converters.mil.mil import types

    return {
        op.name
        for f in _program(mlmodel).functions.values()
        for op in _all_ops(f)
        if op.outputs and op.outputs[0].dtype not in (types.fp16, types.fp32)
    }


NOT_ACTIVATION_QUANTIZED = ("add", "avg_pool", "max_pool")  # coremltools' other activation-quantized op types


def quantize_activations_int8(mlmodel: Any, keep_prints: set[tuple], samples: list[dict[str, Any]], method: str,
                              function: str, work: Path) -> tuple[Any, dict[str, Any]]:
    """Int8 activations (quantize/dequantize pairs before linear / conv) from measured ranges.

    The same graph passes as ``coremltools.optimize.coreml.linear_quantize_activations``;
    only the ranges come from the interpreter instead of ``MLModel.predict``.
    """
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.models.utils import _apply_graph_pass

    try:
        import targets.coreml.mil  # noqa: F401
    except ImportError as e:
        raise MissingRuntimeError("int8-static for Core ML measures activation ranges with targets.coreml.mil, which is not installed") from e
    picked = _function_samples(method, function, samples)
    float_pkg = work / f"{method}.{function}.float.mlpackage"
    if float_pkg.exists():
        shutil.rmtree(float_pkg)
    save_model(mlmodel, float_pkg)
    stats = activation_ranges(float_pkg, method, picked, work)
    _, _, kept_ops = weight_plan(mlmodel, keep_prints)
    skip = set(kept_ops) | _non_float_ops(mlmodel)
    # the inputs of linear / conv only, as ORT's int8-static and the sensitivity simulation (and, for
    # the inputs, ExecuTorch's): coremltools would also quantize both inputs of every add (the residual stream, whose
    # per-tensor range on trained weights is huge: SmolLM2's decoder collapsed to cosine 0.66) and, with
    # its suffix pass, the outputs of those patterns
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"),
        op_type_configs={t: None for t in NOT_ACTIVATION_QUANTIZED},
        op_name_configs={name: None for name in sorted(skip)},
    )
    p = PASS_REGISTRY["compression::insert_prefix_quantize_dequantize_pair"]
    p.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
    passes = [p, PASS_REGISTRY["common::dequantize_quantize_pair_elimination"]]
    with _quiet():
        out = _apply_graph_pass(mlmodel, passes, spec_version=mlmodel.get_spec().specificationVersion, skip_model_load=True)
    shutil.rmtree(float_pkg, ignore_errors=True)
    quantized = sum(1 for f in _program(out).functions.values() for op in _all_ops(f) if op.op_type == "quantize")
    return out, {"calibration_samples": len(picked), "activation_quantize_ops": quantized, "float_ops_kept": len(kept_ops)}


# --- export-time check: each method against the eager reference ------------------------------


# --- the session ---------------------------------------------------------------------------


def execution_note() -> str:
    if core_ml_available():
        return "Core ML predict (macOS)"
    return "Core ML cannot execute on this host: parity runs the saved ML programs in targets.coreml.mil (NumPy)"


def core_ml_available() -> bool:
    """Whether real Core ML prediction is possible here (macOS with coremltools' native library)."""
    if platform.system() != "Darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


def _as_int32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.int32)


class CoreMLSession:
    """The four packages behind the runner's Session interface.

    text_decoder: T > 1 runs the ``prefill`` function, T = 1 ``decode``; both
    read and write the same state (the KV cache), which ``reset()`` replaces.
    """

    def __init__(self, artifact: Artifact):
        from exporter.model.config import ModelConfig

        self.artifact = artifact
        self.config = ModelConfig.from_dict(artifact.metadata["model"])
        self.max_seq_len = int(artifact.metadata["max_seq_len"])
        self.recipe = artifact.recipe
        self.paths = {}
        # an artifact written before "methods" was renamed "runner_interface" still loads
        for method in artifact.info.get("runner_interface", artifact.info.get("methods", {})):
            p = artifact.dir / package_name(method)
            if not p.is_dir():
                raise ArtifactError(f"{artifact.dir}: no {p.name} in this Core ML artifact")
            self.paths[method] = p
        if core_ml_available():
            self.backend: Any = _CoreMLBackend(self.paths)
        else:
            self.backend = _InterpreterBackend(self.paths)
        self.provenance = f"{self.backend.provenance} ({self.recipe})"
        self.reset()

    def reset(self) -> None:
        self.backend.reset()

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        if method not in self.paths:
            raise BadInputError(f"this Core ML artifact has no method '{method}' (it has: {', '.join(self.paths)})")
        if method == "token_embedding":
            feeds = {"tokens": _as_int32(inputs["tokens"]).reshape(1, -1)}
            function = None
        elif method in ("vision_encoder", "audio_encoder"):
            name = "pixels" if method == "vision_encoder" else "mel"
            feeds = {name: np.ascontiguousarray(inputs[name], np.float32)}
            function = None
        elif method == "text_decoder":
            embeds = np.ascontiguousarray(inputs["embeds"], np.float32)
            cache_position = _as_int32(inputs["cache_position"]).reshape(-1)
            t = embeds.shape[1]
            if t < 1 or cache_position.size != t:
                raise BadInputError(f"text_decoder: embeds has {t} positions but cache_position has {cache_position.size}")
            start = int(cache_position[0])
            if start < 0 or start + t > self.max_seq_len:
                raise RuntimeFailure(
                    f"text_decoder: positions {start}..{start + t - 1} are outside the KV cache (max_seq_len {self.max_seq_len})"
                )
            if not np.array_equal(cache_position, np.arange(start, start + t)):
                raise BadInputError("text_decoder: cache_position must be consecutive positions (the Core ML cache is written as one slice)")
            feeds = {
                "embeds": embeds,
                "position_ids": _as_int32(inputs["position_ids"]).reshape(3, t),
                "cache_position": cache_position,
            }
            function = "prefill" if t > 1 else "decode"
        else:
            raise BadInputError(f"unknown method '{method}'")
        out = self.backend.run(method, function, feeds)
        return np.asarray(out[OUTPUT_NAMES[method]], np.float32)


class _InterpreterBackend:
    def __init__(self, paths: dict[str, Path]):
        try:
            from targets.coreml.mil import PROVENANCE, MILProgram
        except ImportError as e:
            raise MissingRuntimeError(
                "Core ML does not execute on this host and targets.coreml.mil is not available to emulate it"
            ) from e
        # parity reports tell emulated numbers from real ones by this word
        self.provenance = PROVENANCE if "emulat" in PROVENANCE.lower() else f"{PROVENANCE}, emulating Core ML"
        self.programs = {}
        for method, p in paths.items():
            try:
                self.programs[method] = MILProgram.load(p)
            except Exception as e:
                raise RuntimeFailure(f"cannot load {p} into the ML program interpreter: {_first_line(e)}") from e
        self.state = None

    def reset(self) -> None:
        prog = self.programs.get("text_decoder")
        self.state = prog.new_state(DECODER_FUNCTIONS[0]) if prog is not None else None

    def run(self, method: str, function: str | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prog = self.programs[method]
        fn = function or _default_function(prog)
        try:
            if method == "text_decoder":
                return prog.run(feeds, function=fn, state=self.state)
            return prog.run(feeds, function=fn)
        except (BadInputError, ExportError):
            raise
        except Exception as e:
            raise RuntimeFailure(f"ML program interpreter failed running {method} ({fn}): {_first_line(e)}") from e


def _default_function(prog: Any) -> str:
    functions = list(prog.functions)
    return "main" if "main" in functions else functions[0]


class _CoreMLBackend:
    """Real Core ML (macOS): one MLModel per method, one per decoder function, one shared state."""

    def __init__(self, paths: dict[str, Path]):
        import coremltools as ct

        self.provenance = f"Core ML predict on macOS {platform.mac_ver()[0]} (coremltools {ct.__version__})"
        self.models: dict[str, Any] = {}
        try:
            for method, p in paths.items():
                if method == "text_decoder":
                    for fn in DECODER_FUNCTIONS:
                        self.models[f"{method}.{fn}"] = ct.models.MLModel(str(p), function_name=fn)
                else:
                    self.models[method] = ct.models.MLModel(str(p))
        except Exception as e:
            raise RuntimeFailure(f"Core ML cannot load {p}: {_first_line(e)}") from e
        self.state = None

    def reset(self) -> None:
        model = self.models.get(f"text_decoder.{DECODER_FUNCTIONS[0]}")
        self.state = model.make_state() if model is not None else None

    def run(self, method: str, function: str | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = f"{method}.{function}" if function else method
        try:
            if method == "text_decoder":
                return self.models[key].predict(feeds, state=self.state)
            return self.models[key].predict(feeds)
        except Exception as e:
            raise RuntimeFailure(f"Core ML failed running {key}: {_first_line(e)}") from e
