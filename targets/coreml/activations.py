"""int8-static (W8A8): activation ranges measured on real calibration samples, then coremltools' own
activation-quantization pass.

Each method's inputs as the reference runner recorded them (``calibration.stats.resolve_method_inputs``;
decoder samples start from the recorded past in the state) are run through the float ML program in
``targets.coreml.mil``, every intermediate float tensor made an output (as coremltools' ModelDebugger
does), and each tensor's min / max recorded. coremltools' pass (the one behind
``coremltools.optimize.coreml.linear_quantize_activations``) then inserts quantize/dequantize pairs
before every linear / conv (not around adds or pools). ``linear_quantize_activations`` itself gets its
ranges from ``MLModel.predict``, which exists only on macOS and does not take states; the interpreter
runs on every host.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import Progress
from core.errors import BadInputError, ExportError, MissingRuntimeError
from targets.coreml import compat
from targets.coreml.packaging import read_spec, save_model
from targets.coreml.session import as_int32
from targets.coreml.util import quiet
from targets.coreml.weights import weight_plan

# calibration samples per method: every one is run through the NumPy interpreter
MAX_CALIB_SAMPLES = 24


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
        return {"tokens": as_int32(sample["tokens"]).reshape(1, -1)}
    if method == "vision_encoder":
        return {"pixels": np.ascontiguousarray(sample["pixels"], np.float32)}
    if method == "audio_encoder":
        return {"mel": np.ascontiguousarray(sample["mel"], np.float32)}
    embeds = np.ascontiguousarray(sample["embeds"], np.float32)
    t = embeds.shape[1]
    return {
        "embeds": embeds,
        "position_ids": as_int32(sample["position_ids"]).reshape(3, t),
        "cache_position": as_int32(sample["cache_position"]).reshape(t),
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
    data_type = compat.mil_pb2().DataType
    allowed = (data_type.FLOAT16, data_type.FLOAT32)
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
    data_type, array_type = compat.mil_pb2().DataType, compat.feature_types_pb2().ArrayFeatureType
    kinds = {data_type.FLOAT16: array_type.FLOAT16, data_type.FLOAT32: array_type.FLOAT32}
    shutil.copytree(src, dest)
    spec = read_spec(src)
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    have = set(block.outputs)
    for name, dtype in names.items():
        if name in have:
            continue
        block.outputs.append(name)
        feature = compat.model_pb2().FeatureDescription()
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
    compat.adjust_concat_ranges([c for c in concats if all(n in stats for n in c)], stats)
    return stats


def _non_float_ops(mlmodel: Any) -> set[str]:
    """Ops computing on integers (index arithmetic such as an embedding's wrap-around add): never quantized."""
    return {op.name for op in compat.model_ops(mlmodel) if compat.computes_non_float(op)}


NOT_ACTIVATION_QUANTIZED = ("add", "avg_pool", "max_pool")  # coremltools' other activation-quantized op types


def quantize_activations_int8(mlmodel: Any, keep_prints: set[tuple], samples: list[dict[str, Any]], method: str,
                              function: str, work: Path) -> tuple[Any, dict[str, Any]]:
    """Int8 activations (quantize/dequantize pairs before linear / conv) from measured ranges.

    The same graph passes as ``coremltools.optimize.coreml.linear_quantize_activations``;
    only the ranges come from the interpreter instead of ``MLModel.predict``.
    """
    import coremltools.optimize.coreml as cto

    try:
        importlib.import_module("targets.coreml.mil")
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
    with quiet():
        out = compat.insert_activation_quantization(mlmodel, config, stats)
    shutil.rmtree(float_pkg, ignore_errors=True)
    quantized = sum(1 for op in compat.model_ops(out) if op.op_type == "quantize")
    return out, {"calibration_samples": len(picked), "activation_quantize_ops": quantized, "float_ops_kept": len(kept_ops)}
