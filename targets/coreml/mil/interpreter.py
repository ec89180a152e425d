"""The run loop: inputs checked and fed, steps executed in order (cond / while_loop with their blocks),
each output cast to its declared dtype and shape-checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import BadInputError, RuntimeFailure, UnsupportedOpError
from targets.coreml.mil.dtypes import internal
from targets.coreml.mil.graph import Block, Node, where
from targets.coreml.mil.ops.base import bool_of
from targets.coreml.mil.values import Lazy, TensorType


def feed(name: str, value: Any, t: TensorType, ranges: list | None, fname: str) -> np.ndarray:
    """A caller's input checked against the function's declaration (rank, fixed dims, flexible ranges, kind)
    and converted to its run-time representation; Core ML refuses the same inputs."""
    arr = np.asarray(value)
    if arr.ndim != len(t.shape):
        raise BadInputError(f"input '{name}' of function '{fname}' has rank {arr.ndim}, expected {len(t.shape)} ({fmt(t.shape)})")
    for i, (got, want) in enumerate(zip(arr.shape, t.shape)):
        if want is not None and got != want:
            raise BadInputError(f"input '{name}' of function '{fname}' has shape {list(arr.shape)}, expected {fmt(t.shape)}")
        if ranges and i < len(ranges):
            lo, hi = ranges[i]
            if got < lo or (hi >= 0 and got > hi):
                raise BadInputError(
                    f"input '{name}' of function '{fname}': dim {i} is {got}, outside the allowed range {lo}..{hi if hi >= 0 else 'inf'}"
                )
    if t.dtype in (10, 11) and not np.issubdtype(arr.dtype, np.floating):
        raise BadInputError(f"input '{name}' of function '{fname}' must be floating point, got {arr.dtype}")
    if t.dtype in (21, 22, 23, 24, 31, 32) and not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"input '{name}' of function '{fname}' must be integer, got {arr.dtype}")
    return internal(t.dtype)(arr)


def fmt(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _resolve(kind: str, payload: Any, env: dict) -> Any:
    if kind == "n":
        value = env[payload]
        return value.value() if isinstance(value, Lazy) else value
    if kind == "v":
        return payload.value() if isinstance(payload, Lazy) else payload
    return [_resolve(k, p, env) for k, p in payload]


def execute(node: Node, env: dict) -> None:
    """Run one op on ``env``'s values; each output cast to its declared dtype and checked against its declared shape."""
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    result = node.impl(a, node)
    if len(node.outputs) == 1:
        result = (result,)
    elif not isinstance(result, tuple) or len(result) != len(node.outputs):
        raise RuntimeFailure(f"Core ML op '{node.type}' ({where(node)}) gave {len(result)} results for {len(node.outputs)} outputs")
    for name, value, cast, t in zip(node.outputs, result, node.casts, node.out_types):
        value = cast(value)
        if t is not None and isinstance(value, np.ndarray):
            if value.ndim != len(t.shape) or any(w is not None and g != w for g, w in zip(value.shape, t.shape)):
                raise RuntimeFailure(
                    f"Core ML op '{node.type}' ({where(node)}) produced shape {list(value.shape)}, the program declares {fmt(t.shape)}"
                )
        env[name] = value


def run_block(block: Block, env: dict) -> None:
    """Every step of ``block`` in order; any failure but a typed one becomes a RuntimeFailure naming the op."""
    for node in block.steps:
        try:
            if node.type == "cond":
                _run_cond(node, env)
            elif node.type == "while_loop":
                _run_while(node, env)
            else:
                execute(node, env)
        except (BadInputError, RuntimeFailure, UnsupportedOpError):
            raise
        except Exception as e:
            raise RuntimeFailure(f"Core ML op '{node.type}' ({where(node)}) failed: {type(e).__name__}: {e}") from e


def _run_cond(node: Node, env: dict) -> None:
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    block = node.blocks[0] if bool_of(a["pred"]) else node.blocks[1]
    local = dict(env)
    run_block(block, local)
    for name, src, cast in zip(node.outputs, block.outputs, node.casts):
        env[name] = cast(local[src])


def _run_while(node: Node, env: dict) -> None:
    a = {param: _resolve(kind, payload, env) for param, kind, payload in node.args}
    values = list(a["loop_vars"])
    cond_block, body_block = node.blocks[0], node.blocks[1]
    for _ in range(1_000_000):
        local = dict(env)
        local.update(zip(cond_block.inputs, values))
        run_block(cond_block, local)
        if not bool_of(local[cond_block.outputs[0]]):
            break
        local = dict(env)
        local.update(zip(body_block.inputs, values))
        run_block(body_block, local)
        values = [local[o] for o in body_block.outputs]
    else:
        raise RuntimeFailure(f"Core ML op 'while_loop' ({where(node)}) did not terminate")
    for name, value, cast in zip(node.outputs, values, node.casts):
        env[name] = cast(value)
