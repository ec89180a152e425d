"""Reading a saved ML program (``model.mlmodel`` and its weight files) into a runnable :class:`MILProgram`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ArtifactError, BadInputError, MissingRuntimeError, UnsupportedOpError
from targets.coreml import compat
from targets.coreml.mil.compile import compile_function
from targets.coreml.mil.graph import Function
from targets.coreml.mil.interpreter import feed, run_block
from targets.coreml.mil.ops import SUPPORTED_OPS
from targets.coreml.mil.values import Weights


def _unsupported(op_type: str, fn: str, out: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"Core ML op '{op_type}' (in function '{fn}', output '{out}') is not supported by the Linux interpreter"
    )


class MILProgram:
    """A saved Core ML ML program, ready to run with NumPy. See the module docstring."""

    def __init__(self, path: Path, spec: Any, functions: dict[str, Function], default_function: str,
                 op_types: dict[str, set[str]]):
        self.path = path
        self.spec = spec
        self._functions = functions
        self.default_function = default_function
        self._op_types = op_types

    # -- loading --

    @classmethod
    def load(cls, path: str | Path) -> "MILProgram":
        path = Path(path)
        model_file, weights_dir = _locate(path)
        try:
            Model_pb2 = compat.model_pb2()
        except ImportError as e:
            raise MissingRuntimeError(f"reading {path} needs coremltools (its Core ML protobuf definitions): {e}") from e

        try:
            data = model_file.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{model_file}: cannot read ({e.strerror or e})") from e
        spec = Model_pb2.Model()
        try:
            spec.ParseFromString(data)
        except Exception as e:  # protobuf DecodeError
            raise ArtifactError(f"{model_file}: not a Core ML model file ({e})") from e
        if spec.WhichOneof("Type") != "mlProgram":
            raise ArtifactError(f"{model_file}: holds a '{spec.WhichOneof('Type')}' model, not an ML program")
        program = spec.mlProgram
        if not program.functions:
            raise ArtifactError(f"{model_file}: the ML program has no functions")
        op_types: dict[str, set[str]] = {}
        # fail on an unknown op before decoding any weight
        for fname, fn in program.functions.items():
            block = fn.block_specializations.get(fn.opset)
            if block is None:
                raise ArtifactError(f"{model_file}: function '{fname}' has no block for its opset '{fn.opset}'")
            _check_ops(block, fname, op_types.setdefault(fname, set()))
        weights = Weights(weights_dir)
        ranges = _shape_ranges(spec)
        functions = {}
        try:
            for fname, fn in program.functions.items():
                functions[fname] = compile_function(fname, fn, weights, ranges.get(fname, ranges.get("", {})))
        finally:
            weights.close()
        default = spec.description.defaultFunctionName or ("main" if "main" in functions else next(iter(functions)))
        if default not in functions:
            raise ArtifactError(f"{model_file}: default function '{default}' is not in the program")
        return cls(path, spec, functions, default, op_types)

    # -- introspection --

    @property
    def functions(self) -> list[str]:
        return list(self._functions)

    def _fn(self, function: str | None) -> Function:
        name = function or self.default_function
        if name not in self._functions:
            raise BadInputError(f"{self.path}: no function '{name}' in this ML program (it has: {', '.join(self._functions)})")
        return self._functions[name]

    def inputs(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        """{name: (shape with None for a flexible dim, numpy dtype)}, states excluded."""
        return {k: (t.shape, np.dtype(t.np_dtype)) for k, t in self._fn(function).inputs.items()}

    def outputs(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        out = {}
        for k, t in self._fn(function).outputs.items():
            out[k] = (t.shape, np.dtype(t.np_dtype)) if t is not None else (None, None)
        return out

    def states(self, function: str | None = None) -> dict[str, tuple[tuple, Any]]:
        return {k: (t.shape, np.dtype(t.np_dtype)) for k, t in self._fn(function).states.items()}

    def new_state(self, function: str | None = None) -> dict[str, np.ndarray]:
        return {k: np.zeros(t.shape, t.np_dtype) for k, t in self._fn(function).states.items()}

    def op_types(self, function: str | None = None) -> set[str]:
        """Op type names used by the program: all functions, or the one named (nested blocks included)."""
        if function is not None:
            self._fn(function)
            return set(self._op_types[function])
        return set().union(*self._op_types.values())

    # -- running --

    def run(self, inputs: dict[str, np.ndarray], function: str | None = None,
            state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        fn = self._fn(function)
        env = dict(fn.consts)
        for name, t in fn.inputs.items():
            if name not in inputs:
                raise BadInputError(f"{self.path}: function '{fn.name}' needs input '{name}' (given: {', '.join(inputs) or 'none'})")
            env[name] = feed(name, inputs[name], t, fn.ranges.get(name), fn.name)
        extra = set(inputs) - set(fn.inputs)
        if extra:
            raise BadInputError(f"{self.path}: function '{fn.name}' has no input(s) {', '.join(sorted(extra))}")
        if fn.states:
            if state is None:
                state = self.new_state(fn.name)
            for name, t in fn.states.items():
                arr = state.get(name)
                if arr is None:
                    raise BadInputError(f"{self.path}: state '{name}' of function '{fn.name}' was not given")
                if not isinstance(arr, np.ndarray) or tuple(arr.shape) != t.shape or arr.dtype != t.np_dtype:
                    raise BadInputError(
                        f"{self.path}: state '{name}' is {getattr(arr, 'dtype', type(arr).__name__)} {list(np.shape(arr))}, "
                        f"function '{fn.name}' expects {t.dtype_name} {list(t.shape)} (use new_state)"
                    )
                env[name] = arr
        run_block(fn.block, env)
        out = {}
        for name, t in fn.outputs.items():
            value = env[name]
            if t is not None and t.dtype == 10:
                out[name] = value.astype(np.float16)
            else:  # a copy: an output may be a constant of the program
                out[name] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value
        return out


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        return path, path.parent / "weights"
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such Core ML package")
    model_file = None
    manifest = path / "Manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            root = info.get("rootModelIdentifier")
            entry = info.get("itemInfoEntries", {}).get(root, {})
            if entry.get("path"):
                model_file = path / "Data" / entry["path"]
        except (ValueError, AttributeError) as e:
            raise ArtifactError(f"{manifest}: unreadable package manifest ({e})") from e
    if model_file is None or not model_file.is_file():
        model_file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not model_file.is_file():
        raise ArtifactError(f"{path}: no model.mlmodel in this Core ML package")
    return model_file, model_file.parent / "weights"


def _check_ops(block: Any, fname: str, seen: set[str]) -> None:
    for op in block.operations:
        seen.add(op.type)
        if op.type not in SUPPORTED_OPS:
            raise _unsupported(op.type, fname, op.outputs[0].name if op.outputs else "?")
        for b in op.blocks:
            _check_ops(b, fname, seen)


def _shape_ranges(spec: Any) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """{function ('' for a single-function model): {input: [(lo, hi) per dim]}} from the model description."""
    def from_inputs(features) -> dict:
        out = {}
        for feat in features:
            if feat.type.WhichOneof("Type") != "multiArrayType":
                continue
            ma = feat.type.multiArrayType
            if ma.WhichOneof("ShapeFlexibility") == "shapeRange":
                out[feat.name] = [(int(r.lowerBound), int(r.upperBound)) for r in ma.shapeRange.sizeRanges]
        return out

    desc = spec.description
    ranges = {f.name: from_inputs(f.input) for f in desc.functions}
    ranges[""] = from_inputs(desc.input)
    return ranges
