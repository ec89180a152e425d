"""Compiling a function of the program: constants decoded, ops on constants folded, the rest a flat list of steps."""

from __future__ import annotations

from typing import Any

from core.errors import ArtifactError, RuntimeFailure, UnsupportedOpError
from targets.coreml.mil.dtypes import as_f32, internal
from targets.coreml.mil.graph import Block, Function, Node, where
from targets.coreml.mil.interpreter import execute
from targets.coreml.mil.ops import MOVES_VALUES, OPS, STATE_OPS, TUPLE_PARAMS
from targets.coreml.mil.values import Lazy, Weights, decode_value, value_type


def compile_function(fname: str, fn: Any, weights: Weights, ranges: dict) -> Function:
    """One proto function as the interpreter runs it: typed inputs, states and outputs, folded constants, steps."""
    f = Function(fname)
    for inp in fn.inputs:
        t = value_type(inp.type)
        if t is None:
            raise ArtifactError(f"function '{fname}': input '{inp.name}' is not a tensor or state")
        (f.states if t.is_state else f.inputs)[inp.name] = t
    f.ranges = ranges
    block = fn.block_specializations[fn.opset]
    f.block = _compile_block(block, fname, weights, f.consts)
    types = {}
    _collect_types(block, types)
    for inp in fn.inputs:
        types[inp.name] = value_type(inp.type)
    f.outputs = {name: types.get(name) for name in block.outputs}
    return f


def _collect_types(block: Any, types: dict) -> None:
    for op in block.operations:
        for o in op.outputs:
            types[o.name] = value_type(o.type)
        for b in op.blocks:
            _collect_types(b, types)


def _compile_block(block: Any, fname: str, weights: Weights, consts: dict,
                   block_inputs: list[str] | None = None) -> Block:
    """Fold const / constexpr / pure ops on constants into ``consts``; the rest become steps."""
    steps: list[Node] = []
    for op in block.operations:
        out_types = [value_type(o.type) for o in op.outputs]
        node = Node(
            type=op.type,
            args=[],
            outputs=[o.name for o in op.outputs],
            out_types=out_types,
            casts=[as_f32 if t is not None and t.dtype == 10 and op.type in MOVES_VALUES
                   else internal(t.dtype) if t is not None else (lambda x: x) for t in out_types],
            function=fname,
        )
        site = f"function '{fname}', op '{op.type}' -> '{node.outputs[0] if node.outputs else '?'}'"
        if op.type == "const":
            val = op.attributes.get("val")
            if val is None:
                raise ArtifactError(f"{site}: const without a value")
            consts[node.outputs[0]] = decode_value(val, weights, site)
            continue
        for param, arg in op.inputs.items():
            bindings = []
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    bindings.append(("n", binding.name))
                else:
                    bindings.append(("v", decode_value(binding.value, weights, site)))
            if len(bindings) == 1 and (op.type, param) not in TUPLE_PARAMS:
                node.args.append((param,) + bindings[0])
            else:
                node.args.append((param, "t", bindings))
        node.impl = OPS.get(op.type)
        if op.type in ("cond", "while_loop"):
            node.blocks = [
                _compile_block(b, fname, weights, consts, [i.name for i in b.inputs]) for b in op.blocks
            ]
            steps.append(node)
            continue
        foldable = op.type not in STATE_OPS and all(_is_const(kind, payload, consts) for _, kind, payload in node.args)
        if foldable and any(_reads_lazy(kind, payload, consts) for _, kind, payload in node.args):
            # an op on a weight too large to hold decoded (a constexpr dequantization, mostly) is computed again
            # at each read, as Core ML decompresses such weights when it runs them
            for i, name in enumerate(node.outputs):
                consts[name] = Lazy(_deferred(node, consts, i))
            continue
        if foldable:
            _fold(node, consts)
            continue
        steps.append(node)
    return Block(block_inputs or [], steps, list(block.outputs))


def _reads_lazy(kind: str, payload: Any, consts: dict) -> bool:
    if kind == "n":
        return isinstance(consts.get(payload), Lazy)
    if kind == "t":
        return any(_reads_lazy(k, p, consts) for k, p in payload)
    return isinstance(payload, Lazy)


def _deferred(node: Node, consts: dict, output: int):
    """``node``'s output ``output``, computed from ``consts`` when asked (a :class:`Lazy`'s maker)."""
    def make() -> Any:
        env = dict(consts)  # a shallow copy: ``execute`` writes the outputs here, not into the constants
        _fold(node, env)
        return env[node.outputs[output]]
    return make


def _fold(node: Node, env: dict) -> None:
    """Run an op whose inputs are all constants; its outputs go into ``env``."""
    try:
        execute(node, env)
    except (ArtifactError, UnsupportedOpError):
        raise
    except Exception as e:
        raise RuntimeFailure(f"Core ML op '{node.type}' ({where(node)}) failed on its constant inputs: {e}") from e


def _is_const(kind: str, payload: Any, consts: dict) -> bool:
    if kind == "n":
        return payload in consts
    if kind == "t":
        return all(_is_const(k, p, consts) for k, p in payload)
    return True
