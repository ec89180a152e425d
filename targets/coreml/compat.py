"""Every coremltools internal the Core ML target relies on, in one place.

The paths below were read from **coremltools 9.0** (the version pinned in /work/shared/STACK.md).
None of them is public API: a coremltools upgrade may move or change any of them, and this module is
the one file to read and fix when it does. Nothing else in ``targets.coreml`` (converter, quantizer,
packaging, the MIL interpreter) imports a ``_``-prefixed name, ``coremltools.proto``, the pymil graph
or the milproto loader directly (tests/test_mil_interpreter.py checks); the pymil ops handed out here
are read elsewhere only through ``op_type`` and ``name``.

What is reached, and why:

* the protobuf messages (``coremltools.proto``: ``Model_pb2``, ``MIL_pb2``, ``FeatureTypes_pb2``):
  reading and rewriting a saved package's ``model.mlmodel`` (determinism, metadata, the interpreter);
* the pymil program of an in-memory ``MLModel`` (``MLModel._mil_program``, else
  ``converters.mil.frontend.milproto.load.load``) and its ops (``Operation.op_type / name / outputs /
  blocks``, ``Var.val / dtype / child_ops``, ``converters.mil.mil.types``): which weights to quantize;
* the torch frontend's op registry (``converters.mil.frontend.torch.torch_op_registry._TORCH_OPS_REGISTRY``):
  one converter alias;
* the graph passes behind ``optimize.coreml.linear_quantize_activations`` (``PASS_REGISTRY``,
  ``PassOption``, ``models.utils._apply_graph_pass``) and its concat range rule
  (``optimize.coreml.experimental._post_training_quantization._adjust_concat_surrounding_activation_stats``):
  int8-static with ranges measured by the interpreter instead of ``MLModel.predict``;
* ``converters.mil.mil.passes.defs.quantization.FP16ComputePrecision.fp16_overflow``: replaced by an
  equivalent that scans a constant in slices (9.0's builds an int64 index array of every element:
  13.9 GiB for the 9B's lm_head, which killed the conversion);
* the ``np`` that ``converters.mil.mil.passes.defs.cleanup.const_deduplication`` calls ``allclose`` through
  (``save_multifunction`` compares each weight of one function with its twin in the other): given a
  NumPy whose ``allclose`` compares equal-shaped arrays in slices (9.0's held ~20 GiB of float64
  temporaries for the 9B's lm_head);
* ``coremltools.libcoremlpython``: the native library, present only where Core ML can predict.

Every import is inside a function: importing this module imports nothing of coremltools.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Iterator

COREMLTOOLS_VERSION_READ = "9.0"  # the coremltools release these paths were read from


# --- protobuf messages -------------------------------------------------------------------------


def model_pb2() -> Any:
    """``coremltools.proto.Model_pb2`` (the saved model: description, metadata, the ML program)."""
    from coremltools.proto import Model_pb2

    return Model_pb2


def mil_pb2() -> Any:
    """``coremltools.proto.MIL_pb2`` (the ML program: functions, blocks, ops, value types)."""
    from coremltools.proto import MIL_pb2

    return MIL_pb2


def feature_types_pb2() -> Any:
    """``coremltools.proto.FeatureTypes_pb2`` (input / output / state feature types)."""
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2


# --- the pymil program of an in-memory model ---------------------------------------------------


def mil_program(mlmodel: Any) -> Any:
    """The pymil Program of ``mlmodel``: the one conversion kept, else the saved spec loaded back."""
    prog = getattr(mlmodel, "_mil_program", None)
    if prog is None:
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

        spec = mlmodel.get_spec()
        prog = milproto_to_pymil(spec, spec.specificationVersion, mlmodel.weights_dir)
    return prog


def block_ops(block: Any) -> Iterator[Any]:
    """Every op of a pymil block (or function), nested blocks (cond / while_loop bodies) included."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from block_ops(inner)


def model_ops(mlmodel: Any) -> Iterator[Any]:
    """Every op of every function of ``mlmodel``'s pymil program."""
    for func in mil_program(mlmodel).functions.values():
        yield from block_ops(func)


def computes_non_float(op: Any) -> bool:
    """Whether a pymil op's (first) output is not fp16 / fp32: integer or bool index arithmetic."""
    from coremltools.converters.mil.mil import types

    return bool(op.outputs) and op.outputs[0].dtype not in (types.fp16, types.fp32)


def const_value(op: Any) -> Any:
    """A const op's value (numpy array or scalar); None for any other op."""
    return op.outputs[0].val if op.op_type == "const" else None


def consumer_types(op: Any) -> list[str]:
    """The op types reading any output of ``op``."""
    return [c.op_type for out in op.outputs for c in out.child_ops]


def consumer_names(op: Any) -> list[str]:
    """The names of the ops reading any output of ``op``."""
    return [c.name for out in op.outputs for c in out.child_ops]


# --- the torch frontend ------------------------------------------------------------------------


def alias_torch_op(name: str, as_op: str) -> None:
    """Convert torch op ``name`` with the converter of ``as_op`` (when coremltools has none for it)."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    if _TORCH_OPS_REGISTRY.get_func(name) is None:
        _TORCH_OPS_REGISTRY.set_func_by_name(_TORCH_OPS_REGISTRY.get_func(as_op), name)


_SCAN_ELEMENTS = 1 << 24


def lean_fp16_overflow_check() -> None:
    """Make the FLOAT16 compute-precision pass's overflow test scan constants in slices.

    coremltools 9.0's ``FP16ComputePrecision.fp16_overflow(op)`` is True when a float32 constant input of
    ``op`` holds a finite (< 1e38) magnitude above 65504 (the op then stays fp32); it finds those with
    ``abs_value[np.where(abs_value < 1e38)]``, an int64 index per element and dimension (13.9 GiB for the
    9B's 151552 x 4096 lm_head). This answers the same question over 16M-element slices.
    """
    import numpy as np
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    if getattr(FP16ComputePrecision.fp16_overflow, "_lean", False):
        return

    def fp16_overflow(self: Any, op: Any) -> bool:
        for _, inputs in op.inputs.items():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    flat = np.asarray(var.op.val.val).reshape(-1)
                    for i in range(0, flat.size, _SCAN_ELEMENTS):
                        a = np.abs(flat[i : i + _SCAN_ELEMENTS])
                        if np.max(a, where=a < 1e38, initial=0.0) > 65504:
                            return True
        return False

    fp16_overflow._lean = True  # type: ignore[attr-defined]
    FP16ComputePrecision.fp16_overflow = fp16_overflow


class _SlicedAllclose:
    """NumPy, except that ``allclose`` of two equal-shaped arrays runs over 16M-element slices (same answer)."""

    def __init__(self, np: Any):
        self._np = np

    def __getattr__(self, name: str) -> Any:
        return getattr(self._np, name)

    def allclose(self, a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
        np = self._np
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.size <= _SCAN_ELEMENTS:
            return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan))
        fa, fb = a.reshape(-1), b.reshape(-1)
        return all(np.allclose(fa[i : i + _SCAN_ELEMENTS], fb[i : i + _SCAN_ELEMENTS], rtol=rtol, atol=atol,
                               equal_nan=equal_nan) for i in range(0, fa.size, _SCAN_ELEMENTS))


def lean_const_deduplication() -> None:
    """``save_multifunction``'s weight deduplication with slice-wise comparisons (see the module docstring)."""
    mod = importlib.import_module("coremltools.converters.mil.mil.passes.defs.cleanup.const_deduplication")
    if not isinstance(mod.np, _SlicedAllclose):
        mod.np = _SlicedAllclose(mod.np)


# --- activation quantization with ranges from elsewhere ----------------------------------------


def adjust_concat_ranges(concats: Iterable[list[str]], stats: dict[str, dict[str, float]]) -> None:
    """coremltools' rule: a concat's inputs and output share one range (``stats`` updated in place)."""
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    _adjust_concat_surrounding_activation_stats(list(concats), stats)


def insert_activation_quantization(mlmodel: Any, config: Any, stats: dict[str, dict[str, float]]) -> Any:
    """The passes of ``linear_quantize_activations`` (quantize/dequantize pairs before the configured ops,
    then pair elimination) with the given ranges; returns the new MLModel (not loaded)."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    p = PASS_REGISTRY["compression::insert_prefix_quantize_dequantize_pair"]
    p.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
    passes = [p, PASS_REGISTRY["common::dequantize_quantize_pair_elimination"]]
    return _apply_graph_pass(mlmodel, passes, spec_version=mlmodel.get_spec().specificationVersion, skip_model_load=True)


# --- the native library ------------------------------------------------------------------------


def has_native_core_ml() -> bool:
    """Whether coremltools' native library (``libcoremlpython``, built only for macOS) imports."""
    try:
        importlib.import_module("coremltools.libcoremlpython")
    except ImportError:
        return False
    return True
